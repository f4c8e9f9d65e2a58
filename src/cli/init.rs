//! `controlnet init --model SD --output CN_DIR [--conditioning-channels N] [--seed N]`: a new, untrained
//! ControlNet made from the base model's UNet (diffusers' `ControlNetModel.from_unet`, the original
//! `tool_add_control.py`), written as a diffusers folder. It prints which tensors are copied and which are new.
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::pipeline::sd::LoadOptions;
use crate::train::files::write_diffusers_folder;
use crate::train::init::{
    controlnet_from_unet, load_base_unet, vae_scale_factor, InitOptions, InitReport, DEFAULT_HINT_CHANNELS,
};
use crate::train::params::TensorMap;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The base Stable Diffusion 1.x/2.x or SDXL: a diffusers pipeline folder, a single-file checkpoint, or a hub id.
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub model: String,
    /// Where to write the ControlNet folder (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Channels of the condition images it will read (3: RGB; 1: grey, which `train` makes from the images).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub conditioning_channels: usize,
    /// Channels of the hint encoder's convolutions (diffusers' conditioning_embedding_out_channels); one stride-2
    /// step between consecutive entries, so 4 entries take the condition to the latent size of an 8x VAE.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_HINT_CHANNELS, value_name = "C,C,..")]
    pub hint_channels: Vec<usize>,
    /// Seed of the hint encoder's initialisation (as torch.manual_seed before from_unet).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    if args.output.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.output.display());
    }
    let opts = LoadOptions {
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        variant: None,
        prediction_type: None,
        config_dir: None,
    };
    let path = crate::io::hub::resolve(&args.model, None)?;
    crate::io::atomic::check_output_is_not_input("output", &args.output, &[&path])?;
    let (unet_config, unet) = load_base_unet(&path.to_string_lossy(), &opts)?;
    let init = InitOptions {
        conditioning_channels: args.conditioning_channels,
        hint_channels: args.hint_channels.clone(),
        seed: args.seed,
        vae_scale_factor: vae_scale_factor(&path)?,
    };
    let new = controlnet_from_unet(&unet_config, &unet, &init)?;
    write_diffusers_folder(&args.output, &new.config, &new.tensors)?;
    print!("{}", summary(&new.report, &new.tensors));
    println!("wrote {}", args.output.display());
    Ok(())
}

/// What `tool_add_control.py` prints, grouped: copied tensors counted, new ones listed.
pub fn summary(report: &InitReport, tensors: &TensorMap) -> String {
    let params = |names: &[String]| -> usize { names.iter().map(|n| tensors[n].elem_count()).sum() };
    let mut out = format!(
        "copied from the UNet's encoder: {} tensors ({} parameters)\n",
        report.copied.len(),
        params(&report.copied)
    );
    out += &format!("new, zero (zero convolutions and the hint encoder's output): {} tensors\n", report.zero.len());
    for n in &report.zero {
        out += &format!("  {n} {:?}\n", tensors[n].dims());
    }
    out += &format!(
        "new, random (hint encoder, torch's default Conv2d init): {} tensors ({} parameters)\n",
        report.random.len(),
        params(&report.random)
    );
    for n in &report.random {
        out += &format!("  {n} {:?}\n", tensors[n].dims());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::controlnet::ControlNetModel;

    #[test]
    fn writes_a_loadable_controlnet_and_lists_new_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cn");
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15").to_string();
        let args = InitArgs {
            model,
            output: out.clone(),
            conditioning_channels: 3,
            hint_channels: DEFAULT_HINT_CHANNELS.to_vec(),
            seed: 0,
            force: false,
        };
        run(&args).unwrap();
        let cn = ControlNetModel::load(&out, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(cn.config().conditioning_channels, 3);
        let err = run(&args).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
    }
}
