//! The `controlnet` command line: one file per subcommand.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod annotate;

#[derive(Parser, Debug)]
#[command(
    name = "controlnet",
    version,
    about = "ControlNet for Stable Diffusion in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make control maps (canny edges, lineart, shuffle, ...) from an image or a folder of images.
    Annotate(annotate::AnnotateArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Annotate(args) => annotate::run(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}
