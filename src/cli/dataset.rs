//! `controlnet dataset circles --count N --size PX --output DIR [--seed N] [--variety wide | --split test]`: the demo's synthetic Fill50k-style
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
        /// How varied the circles are: the first demo's training set, or the range a user may draw.
        #[arg(long, value_enum, default_value_t = circles::Variety::Fill50k)]
        variety: circles::Variety,
        /// Write the demo's held-out evaluation set instead (its own fixed seed: --seed and --variety do not
        /// apply); the first --count circles.
        #[arg(long, value_enum, conflicts_with_all = ["seed", "variety"])]
        split: Option<circles::Split>,
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
        DatasetKind::Circles { count, size, seed, variety, split, output, quiet } => {
            let mut progress = Progress::new(*quiet, "sample", *count as u64);
            let mut done = 0;
            let mut on_sample = || {
                done += 1;
                progress.set(done, *count as u64);
            };
            match split {
                Some(split) => circles::write_split(output, *split, *count, *size, &mut on_sample)?,
                None => circles::write_dataset(output, *count, *size, *seed, *variety, &mut on_sample)?,
            }
            progress.finish();
            println!("wrote {count} samples to {}", output.display());
            Ok(())
        }
    }
}
