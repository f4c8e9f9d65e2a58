//! Training a small Stable Diffusion base from scratch on a fill50k-layout dataset (the bundled demo model,
//! `controlnet train-base`) or on shards streamed as `train` streams them ([`data`]: WebDataset tar files, local
//! or at URLs, or parquet files; only the images and captions are read).
//!
//! Three parts, each a diffusers folder under `RUN_DIR/model/`, made in order and skipped when already there
//! (so a stopped run picks up where it was):
//! 1. `text_encoder/` + `tokenizer/` ([`text_encoder`]): a CLIP text encoder at its seeded random initialisation
//!    and the real CLIP BPE vocabulary. By default the encoder then trains along with the UNet (part 3): left
//!    frozen and random, it gave the UNet the colour words but not which one is the circle's, and the demo base
//!    painted colours regardless of the prompt (docs/demo.md);
//! 2. `vae/` ([`vae`], then [`decoder`]): an autoencoder trained on the targets, reconstruction MSE + a small KL
//!    term (the latent-diffusion recipe, without the perceptual and adversarial terms a flat-colour dataset does
//!    not need); its `scaling_factor` is then set to 1/std of the training latents, as Stable Diffusion's 0.18215
//!    was found; then its decoder alone on the fixed latents;
//! 3. `unet/` ([`unet`]): the denoiser, trained with diffusers' text-to-image objective ([`loss`]) on cached
//!    latents, with a share of captions dropped so classifier-free guidance works; the text encoder trains with
//!    it (one AdamW over both) unless frozen, when its embeddings are cached too. A trained encoder is written
//!    back to `text_encoder/` (f32).
//!
//! Each training stage ([`stage`]) keeps checkpoints (`RUN_DIR/<stage>/checkpoint-N`: weights, AdamW moments,
//! step and generator state) and `loss.jsonl`/`loss.png`; a stage that was stopped resumes from its newest valid
//! checkpoint and continues exactly, and a finished stage asked for more steps continues to them. Changes an
//! earlier run's stages cannot take are refused before anything is written ([`rerun`]). One torch-compatible
//! generator per stage, seeded from the run's seed, draws everything (batches, crops, caption drops, noise,
//! timesteps).
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::train::feed::Source;
use crate::train::files::{self, Entry};
use crate::train::resume;
use crate::train::stream::StreamKind;
use crate::{Error, Result};

pub mod data;
pub mod decoder;
pub mod demo;
pub mod loss;
pub mod rerun;
pub mod settings;
pub mod stage;
#[cfg(test)]
mod tests;
pub mod text_encoder;
pub mod unet;
pub mod vae;

pub use demo::Architecture;
pub use settings::{Settings, StageSettings};
pub use stage::StageReport;

/// The finished model folder inside the run folder.
pub const MODEL_DIR: &str = "model";
/// The run's settings, as last applied.
pub const SETTINGS_FILE: &str = "base_config.json";
/// Stage folders (checkpoints and logs) inside the run folder.
pub const VAE_STAGE: &str = "vae";
pub const VAE_DECODER_STAGE: &str = "vae-decoder";
pub const UNET_STAGE: &str = "unet";
/// Seeds of the parts, offset from the run's seed so no two parts share a stream.
const TEXT_SEED_OFFSET: u64 = 1;
const VAE_SEED_OFFSET: u64 = 2;
const UNET_SEED_OFFSET: u64 = 3;
const VAE_DECODER_SEED_OFFSET: u64 = 4;

/// What a call to [`train`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The model folder is complete; `steps` optimisation steps were taken by this call (0: it already was).
    Finished { steps: u64 },
    /// Stopped (Ctrl-C) during `stage`, after a checkpoint at `step`.
    Interrupted { stage: &'static str, step: u64 },
}

/// What every stage reads: the run, its data and the images and latents loaded so far.
struct Run<'a> {
    data: &'a Source,
    dir: &'a Path,
    model_dir: PathBuf,
    arch: &'a Architecture,
    settings: &'a Settings,
    device: &'a Device,
    stop: &'a AtomicBool,
    /// A folder dataset's targets at training resolution, in memory once a stage needs them (the demo's 128 px
    /// images are 196 KB each as f32). Streamed data is read batch by batch instead.
    targets: Option<Vec<Tensor>>,
    /// The VAE's posterior means and log-variances of every target of a folder dataset, once computed (the UNet
    /// stage reuses them).
    posteriors: Option<Vec<(Tensor, Tensor)>>,
    /// Optimisation steps taken by this call.
    steps: u64,
}

impl Run<'_> {
    /// A folder dataset's targets, all in memory (`None` for streamed data).
    fn targets(&mut self) -> Result<Option<Vec<Tensor>>> {
        let Source::Folder(dataset) = self.data else { return Ok(None) };
        if self.targets.is_none() {
            let mut v = Vec::with_capacity(dataset.len());
            for i in 0..dataset.len() {
                v.push(dataset.load(i, self.settings.resolution, 3, self.device)?.pixel_values);
            }
            self.targets = Some(v);
        }
        Ok(self.targets.clone())
    }

    /// A stage's data, at its start.
    fn batches(&self) -> data::Batches {
        data::Batches::new(self.data, self.settings)
    }

    fn stage<'s>(&self, name: &'static str, settings: &'s StageSettings, seed_offset: u64) -> stage::Stage<'s> {
        stage::Stage {
            name,
            dir: self.dir.join(name),
            settings,
            seed: self.settings.seed.wrapping_add(seed_offset),
            checkpointing_steps: self.settings.checkpointing_steps,
        }
    }

    /// The stage was stopped: where its newest checkpoint is.
    fn interrupted(&self, stage: &'static str) -> End {
        let step = resume::list(&self.dir.join(stage)).ok().and_then(|l| l.last().map(|(s, _)| *s)).unwrap_or(0);
        End::Interrupted { stage, step }
    }
}

/// Trains (or finishes training, or trains further) the base model of `run_dir` on `data`; the result is
/// `run_dir/model`, a diffusers Stable Diffusion folder.
pub fn train(
    data: &Source,
    run_dir: &Path,
    arch: &Architecture,
    settings: &Settings,
    device: &Device,
    stop: &AtomicBool,
    report: &mut dyn FnMut(&StageReport),
) -> Result<End> {
    // 1. Check the settings, the data, and that an earlier run in this folder can take them.
    settings.validate()?;
    data.check()?;
    if let Source::Stream(s) = data {
        if s.kind == StreamKind::Latents {
            return Err(Error::setting(
                "dataset",
                format!(
                    "{} is a latent cache: it holds another model's VAE latents and text embeddings, and train-base \
                     trains its own VAE and text encoder; give it the images the cache was made from",
                    s.pattern
                ),
            ));
        }
    }
    let done = rerun::check(run_dir, settings)?;
    let mut run = Run {
        data,
        dir: run_dir,
        model_dir: run_dir.join(MODEL_DIR),
        arch,
        settings,
        device,
        stop,
        targets: None,
        posteriors: None,
        steps: 0,
    };

    // 2. Record the settings and make the pipeline folder's own files.
    write_json(&run_dir.join(SETTINGS_FILE), &serde_json::to_value(settings).map_err(invalid)?)?;
    write_pipeline_files(&run.model_dir, arch)?;

    // 3. The text encoder at its seeded start, and the tokenizer.
    text_encoder::write_initial(&run)?;

    // 4. The VAE.
    if done.vae_pending(settings, &run.model_dir) && !vae::train(&mut run, report)? {
        return Ok(run.interrupted(VAE_STAGE));
    }

    // 5. The decoder alone (its last checkpoint is its record: a finished stage writes the same decoder).
    if settings.vae_decoder.steps > 0 && !decoder::train(&mut run, report)? {
        return Ok(run.interrupted(VAE_DECODER_STAGE));
    }

    // 6. The UNet, with the text encoder.
    if done.unet_pending(settings, &run.model_dir) && !unet::train(&mut run, report)? {
        return Ok(run.interrupted(UNET_STAGE));
    }
    Ok(End::Finished { steps: run.steps })
}

/// `model_index.json` and `scheduler/scheduler_config.json`: what makes the parts one pipeline folder.
fn write_pipeline_files(model_dir: &Path, arch: &Architecture) -> Result<()> {
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", arch.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [null, null],
        "feature_extractor": [null, null],
        "requires_safety_checker": false
    });
    write_json(&model_dir.join("model_index.json"), &index)?;
    files::write_folder(
        &model_dir.join("scheduler"),
        &[Entry::Json(crate::schedulers::SCHEDULER_CONFIG_FILE, &arch.scheduler)],
    )
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(invalid)? + "\n";
    crate::io::atomic::write_atomic(path, |tmp| std::fs::write(tmp, &text).map_err(|e| Error::io(tmp, e)))
}

fn invalid(e: serde_json::Error) -> Error {
    Error::Invalid(e.to_string())
}

/// A part's folder has its config and weights (folders are written whole, by rename).
fn is_complete(dir: &Path, weights: &str) -> bool {
    dir.join("config.json").is_file() && dir.join(weights).is_file()
}
