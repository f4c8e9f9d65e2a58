//! `controlnet cache-latents --model SD --dataset PATH --output DIR`: the VAE posteriors, conditions and caption
//! embeddings of a dataset, computed once into shards that `train --dataset DIR` streams instead of images
//! (`train::latent_cache`).
use std::path::PathBuf;

use anyhow::bail;
use candle_core::DType;
use clap::Args;

use super::progress::Progress;
use super::train::ColumnArgs;
use crate::pipeline::sd::LoadOptions;
use crate::pipeline::StableDiffusion;
use crate::train::feed::Source;
use crate::train::latent_cache::{write_cache, DEFAULT_SHARD_SIZE};
use crate::train::settings::TrainSettings;

#[derive(Args, Debug, Clone)]
pub struct CacheLatentsArgs {
    /// The base model whose VAE and text encoders make the cache (train with the same one).
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub model: String,
    /// The data, as `train --dataset` takes it: a folder dataset or shards.
    #[arg(long, value_name = "PATH_OR_PATTERN")]
    pub dataset: String,
    /// The cache folder (latents-NNNNN.tar shards, latents.json, empty_caption.safetensors).
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Images are resized and centre-cropped to this size first; train at the same one [default: 512].
    #[arg(long, value_name = "PX")]
    pub resolution: Option<u32>,
    /// Examples per shard [default: 1000].
    #[arg(long, value_name = "N")]
    pub shard_size: Option<usize>,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: &CacheLatentsArgs) -> anyhow::Result<()> {
    // 1. The data and its size (for the progress bar).
    let settings = TrainSettings {
        resolution: args.resolution.unwrap_or(TrainSettings::default().resolution),
        ..Default::default()
    };
    settings.validate()?;
    let source = Source::open(&args.dataset, |kind| args.columns.fields(kind, None))?;
    source.check()?;
    if let Source::Stream(s) = &source {
        if s.kind == crate::train::stream::StreamKind::Latents {
            bail!("--dataset {}: is a latent cache already", args.dataset);
        }
    }
    eprintln!("data: {}", source.describe());
    let total = match &source {
        Source::Folder(d) => d.len() as u64,
        Source::Stream(_) => 0,
    };
    // 2. The model's VAE and text encoders.
    let opts = LoadOptions {
        dtype: DType::F32,
        device: super::device()?,
        variant: None,
        prediction_type: None,
        config_dir: None,
    };
    let sd = StableDiffusion::open(&args.model, &opts)?;
    // 3. Encode and write.
    let mut progress = Progress::new(args.quiet, "example", total);
    let info = write_cache(
        &sd,
        &args.model,
        &source,
        settings.resolution,
        &args.output,
        args.shard_size.unwrap_or(DEFAULT_SHARD_SIZE),
        &mut |done| progress.set(done, total.max(done)),
    )?;
    progress.finish();
    if info.skipped > 0 {
        eprintln!("left out {} bad samples (see the warnings above)", info.skipped);
    }
    println!(
        "cached {} examples in {} shards in {} (train on them with --dataset {} --resolution {})",
        info.samples,
        info.shards,
        args.output.display(),
        args.output.display(),
        info.resolution
    );
    Ok(())
}
