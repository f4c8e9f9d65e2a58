//! `controlnet dataset circles --count N --size PX --output DIR [--seed N]`: the demo's synthetic Fill50k-style
//! dataset (see `synthetic::circles`).
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::progress::Progress;
use crate::synthetic::circles;

#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[command(subcommand)]
    pub kind: DatasetKind,
}

#[derive(Subcommand, Debug)]
pub enum DatasetKind {
    /// Filled circles of named colours; the condition is the outline ("a red circle on a light blue background").
    Circles {
        /// Number of (condition, target, prompt) samples.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Seed of the circles' colours, places and sizes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder to write: source/, target/, prompt.json (an earlier dataset there is replaced once the new one
        /// is complete; a folder that is not a dataset is refused).
        #[arg(long, short)]
        output: PathBuf,
        /// No progress display.
        #[arg(long, short)]
        quiet: bool,
    },
}

pub fn run(args: &DatasetArgs) -> anyhow::Result<()> {
    match &args.kind {
        DatasetKind::Circles { count, size, seed, output, quiet } => {
            let mut progress = Progress::new(*quiet, "sample", *count as u64);
            let mut done = 0;
            circles::write_dataset(output, *count, *size, *seed, &mut || {
                done += 1;
                progress.set(done, *count as u64);
            })?;
            progress.finish();
            println!("wrote {count} samples to {}", output.display());
            Ok(())
        }
    }
}
