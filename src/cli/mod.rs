//! The `controlnet` command line: one file per subcommand; `main.rs` only calls [`main`].
//! (This branch holds only `inspect` and `convert`; the integrator merges it with `generate`.)
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod convert;
pub mod inspect;

#[derive(Parser, Debug)]
#[command(name = "controlnet", version, about = "ControlNet for Stable Diffusion, in one Rust binary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Tell what a weights file or model folder is: kind, base model, naming, parameters, dtype.
    Inspect(inspect::InspectArgs),
    /// Convert a ControlNet between the original single-file layout and a diffusers folder.
    Convert(convert::ConvertArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
