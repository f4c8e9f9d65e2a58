//! `controlnet serve`: flags → `serve::ServeOptions` → the server, until SIGTERM or Ctrl-C.
use std::path::PathBuf;

use clap::Args;

use crate::serve::{self, ModelSpecs, ServeOptions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, printed on start).
    #[arg(long, default_value_t = serve::DEFAULT_PORT)]
    pub port: u16,
    /// The Stable Diffusion model: pipeline folder, single-file checkpoint or hub id [default: the bundled demo
    /// model and its ControlNet].
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub model: Option<String>,
    /// A ControlNet to keep loaded (repeat for several); clients name it by its file or folder name.
    #[arg(long = "controlnet", value_name = "DIR_FILE_OR_ID")]
    pub controlnets: Vec<String>,
    /// Load every ControlNet in this folder too (sub-folders with a config.json, .safetensors and .pth files).
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// The LoRA folder: `<lora:name:weight>` in a prompt merges `name.safetensors` from it (subfolders too);
    /// without it such tags are refused.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Require this key on every API call (Authorization: Bearer KEY, basic auth with KEY as password, or
    /// X-API-Key).
    #[arg(long, value_name = "KEY", env = "CONTROLNET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Jobs that may wait behind the running one; past it, requests get 503 with Retry-After.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_QUEUE, value_name = "N")]
    pub max_queue: usize,
    /// Largest request body, in MiB (413 past it).
    #[arg(long, default_value_t = serve::DEFAULT_MAX_BODY_MB, value_name = "N")]
    pub max_body_mb: usize,
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let options = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        models: ModelSpecs {
            model: args.model.clone(),
            controlnets: args.controlnets.clone(),
            models_dir: args.models_dir.clone(),
            lora_dir: args.lora_dir.clone(),
        },
        api_key: args.api_key.clone(),
        max_queue: args.max_queue,
        max_body_mb: args.max_body_mb,
    };
    serve::bind_address(&options)?;
    eprintln!("loading the models...");
    serve::run(&options, super::device()?, |addr, catalog| {
        eprintln!(
            "model {} with ControlNets {}",
            catalog.model_name,
            if catalog.nets.is_empty() { "(none)".to_string() } else { catalog.net_names() }
        );
        // Scripts and tests read this line for the port.
        println!("listening on http://{addr}");
    })?;
    Ok(())
}
