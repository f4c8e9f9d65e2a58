//! `controlnet dataset circles --count N --size PX --output DIR [--seed N]`: the demo's synthetic Fill50k-style
//! dataset (see `synthetic::circles`).
use std::path::PathBuf;

use clap::{Args, Subcommand};

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
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder to write (created): source/, target/, prompt.json.
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long, short)]
        quiet: bool,
    },
}

pub fn run(args: &DatasetArgs) -> anyhow::Result<()> {
    match &args.kind {
        DatasetKind::Circles { count, size, seed, output, quiet } => {
            let bar =
                if *quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(*count as u64) };
            circles::write_dataset(output, *count, *size, *seed, &mut || bar.inc(1))?;
            bar.finish_and_clear();
            println!("wrote {count} samples to {}", output.display());
            Ok(())
        }
    }
}
