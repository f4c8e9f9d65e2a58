//! The `controlnet` command line: one file per subcommand; `main.rs` only calls [`main`].
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod annotate;
pub mod batch;
pub mod bench;
pub mod cache_latents;
pub mod convert;
pub mod dataset;
pub mod evaluate;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod progress;
pub mod reproduce;
pub mod serve;
pub mod train;
pub mod train_base;

#[derive(Parser, Debug)]
#[command(name = "controlnet", version, about = "ControlNet for Stable Diffusion, in one Rust binary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate images from a prompt and (optionally) one or several ControlNet conditions.
    Generate(Box<generate::GenerateArgs>),
    /// Run many generate jobs from a JSONL file (one JSON object of settings per line), models loaded once.
    Batch(batch::BatchArgs),
    /// Make a synthetic training dataset (the demo's circles).
    Dataset(dataset::DatasetArgs),
    /// Score the demo's circles model on its held-out circles (IoU, colours) and draw a grid of results.
    Evaluate(evaluate::EvaluateArgs),
    /// Make an image again from the recipe its PNG carries.
    Reproduce(reproduce::ReproduceArgs),
    /// Tell what a weights file or model folder is: kind, base model, naming, parameters, dtype.
    Inspect(inspect::InspectArgs),
    /// Convert a ControlNet between its original single file and a diffusers folder, or a single-file base model into a pipeline folder.
    Convert(convert::ConvertArgs),
    /// Make control maps (canny edges, lineart, shuffle, ...) from an image or a folder of images.
    Annotate(annotate::AnnotateArgs),
    /// Make a new, untrained ControlNet from a base model's UNet (encoder copied, zero convolutions).
    Init(init::InitArgs),
    /// Train a ControlNet on your own (target image, condition, caption) data.
    Train(train::TrainArgs),
    /// Precompute a dataset's VAE latents and caption embeddings into shards that `train` reads instead of images.
    CacheLatents(cache_latents::CacheLatentsArgs),
    /// Train a small Stable Diffusion base from scratch (VAE, then UNet and text encoder): the demo model's recipe.
    TrainBase(train_base::TrainBaseArgs),
    /// Measure speed and memory of the full-size UNet, ControlNet and VAE (random weights, no downloads).
    Bench(bench::BenchArgs),
    /// Serve the models over HTTP: AUTOMATIC1111's API (with ControlNet units), a job API and a web page.
    Serve(serve::ServeArgs),
}

/// candle looks up its thread count on every parallel op and, unless `RAYON_NUM_THREADS` is set, works it out
/// by parsing `/proc/cpuinfo` each time (`num_cpus::get_physical`): ~4 % of a small-model training step. The
/// count is worked out once here, before any thread exists (setting the environment is only sound then).
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
}

pub fn main() -> ExitCode {
    pin_thread_count();
    init_tracing();
    let tuned = crate::memory::reuse_freed_memory();
    tracing::debug!("malloc keeps freed memory for reuse: {tuned}");
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match &cli.command {
        Command::Generate(args) => {
            let sub = matches.subcommand_matches("generate").expect("clap matched the generate subcommand");
            generate::run(args, sub)
        }
        Command::Reproduce(args) => reproduce::run(args),
        Command::Batch(args) => match batch::run(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Dataset(args) => dataset::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Init(args) => init::run(args),
        Command::Train(args) => train::run(args),
        Command::TrainBase(args) => train_base::run(args),
        Command::CacheLatents(args) => cache_latents::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Annotate(args) => match annotate::run(args) {
            Ok(code) => return code,
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Library settings whose flag is not simply `--` + the name in kebab case.
const FLAG_NAMES: &[(&str, &str)] =
    &[("controlnet", "--controlnet"), ("control", "--control"), ("embeddings", "--embedding")];

/// A library setting's name (`crate::Error::Setting`) as this command line spells it: `num_images` →
/// `--num-images`, `controls[1].control_end` → `--control-end (ControlNet 2)`.
pub fn flag_for(setting: &str) -> String {
    let flag = |name: &str| match FLAG_NAMES.iter().find(|(s, _)| *s == name) {
        Some((_, f)) => f.to_string(),
        None => format!("--{}", name.replace(['_', '.'], "-")),
    };
    if let Some(rest) = setting.strip_prefix("controls[") {
        if let Some((index, field)) = rest.split_once("].") {
            if let Ok(i) = index.parse::<usize>() {
                return format!("{} (ControlNet {})", flag(field), i + 1);
            }
        }
    }
    flag(setting)
}

/// The error as the user reads it: the chain of causes joined by ": ", each library setting named by its flag.
pub fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<crate::Error>() {
            Some(crate::Error::Setting { setting, msg }) => format!("{}: {msg}", flag_for(setting)),
            _ => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings only), coloured only on a terminal (a log file
/// or a pipe gets plain text, no escape codes).
fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A flag the first Ctrl-C raises, so a loop stops after its current step (training saves a checkpoint then);
/// a second Ctrl-C quits at once. `what` says what happens after the step.
pub fn stop_on_ctrl_c(what: &'static str) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping now");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step{what} (Ctrl-C again to quit at once)");
    });
    stop
}

/// A run stopped by Ctrl-C ends as an interrupted process does: status 130 (after its message).
pub(crate) fn exit_interrupted() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(130)
}

/// The compute device: CUDA device 0 when built with `--features cuda`, else the CPU.
pub fn device() -> anyhow::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(candle_core::Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_named_by_their_flags() {
        assert_eq!(flag_for("num_images"), "--num-images");
        assert_eq!(flag_for("hires.scale"), "--hires-scale");
        assert_eq!(flag_for("controls[1].control_end"), "--control-end (ControlNet 2)");
        let e = anyhow::Error::from(crate::Error::setting("width", "100000 is too large")).context("generate");
        assert_eq!(describe(&e), "generate: --width: 100000 is too large");
    }

    #[test]
    fn io_errors_are_told_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::from(crate::Error::io("nope.png", io));
        assert_eq!(describe(&e), "nope.png: No such file or directory");
    }
}
