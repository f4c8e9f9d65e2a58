//! The `controlnet` command line.
use std::process::ExitCode;

pub fn main() -> ExitCode {
    eprintln!("controlnet: not yet wired");
    ExitCode::FAILURE
}
