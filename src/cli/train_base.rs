//! `controlnet train-base --dataset PATH --output RUN_DIR [options]`: train a small Stable Diffusion base
//! from scratch (the bundled demo model's recipe, see `docs/demo.md` and `train::from_scratch`).
//!
//! RUN_DIR receives `model/` (a diffusers pipeline folder `generate`, `init` and `train` load), `vae/`,
//! `vae-decoder/` and `unet/` (checkpoints, `loss.jsonl`, `loss.png`), `base_config.json`, and `samples.png`:
//! images the finished base makes for a few prompts. Run the same command again to continue a stopped run, or
//! with more `--unet-steps` to train further; Ctrl-C saves a checkpoint and exits with status 130.
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;
use clap::Args;

use super::progress::Progress;
use crate::pipeline::{generate, GenerateParams, StableDiffusion};
use crate::train::feed::Source;
use crate::train::from_scratch::{self, Architecture, End, Settings as BaseSettings, StageSettings, MODEL_DIR};
use crate::train::stream::{Fields, SkipReport, StreamKind};
use crate::train::validation::image_grid;

/// Prompts of the sample grid written at the end.
const SAMPLE_PROMPTS: [&str; 4] = [
    "a red circle on a light blue background",
    "a yellow circle on a dark blue background",
    "a white circle on a black background",
    "a green circle on a pink background",
];
const SAMPLES_PER_PROMPT: usize = 4;

#[derive(Args, Debug, Clone)]
pub struct TrainBaseArgs {
    /// The data: a fill50k-style prompt.json (or its folder), a folder with metadata.jsonl, or shards as `train`
    /// takes them: WebDataset .tar files or parquet files, a brace pattern or glob of them
    /// ('shards/{00000..00127}.tar'), http(s):// URLs of tar shards, or a folder holding them. Only the images
    /// and captions are read.
    #[arg(long, value_name = "PATH_PATTERN_OR_URL")]
    pub dataset: String,
    /// Sharded data: the image's WebDataset extension(s) ('jpg;png') or parquet column [default: jpg;jpeg;png;webp,
    /// or image].
    #[arg(long, value_name = "NAME")]
    pub image_column: Option<String>,
    /// Sharded data: the caption's extension(s) or column [default: txt;json, or text].
    #[arg(long, value_name = "NAME")]
    pub caption_column: Option<String>,
    /// Sharded data: samples the shuffle buffer holds (shards are shuffled too; 1 keeps each shard's order). It
    /// shapes the order, so a stopped run continues with the same value.
    #[arg(long, default_value_t = BaseSettings::default().shuffle_buffer, value_name = "N")]
    pub shuffle_buffer: usize,
    /// Sharded data: threads that decode images [default: the cores but one, at most 8].
    #[arg(long, value_name = "N")]
    pub data_workers: Option<usize>,
    /// The run folder; the model is written to OUTPUT/model. Run again with the same OUTPUT to continue.
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Training images are resized and centre-cropped to this square size.
    #[arg(long, default_value_t = BaseSettings::default().resolution, value_name = "PX")]
    pub resolution: u32,
    /// Seed of every stage's generator (weights, batches, crops, noise).
    #[arg(long, default_value_t = BaseSettings::default().seed, value_name = "N")]
    pub seed: u64,
    /// Optimizer steps of the VAE stage (encoder and decoder, reconstruction + KL loss); 0 skips it.
    #[arg(long, default_value_t = BaseSettings::default().vae.steps, value_name = "N")]
    pub vae_steps: u64,
    /// Images per VAE step (also the decoder stage's).
    #[arg(long, default_value_t = BaseSettings::default().vae.batch_size, value_name = "N")]
    pub vae_batch_size: usize,
    /// AdamW learning rate of the VAE stage (also the decoder stage's).
    #[arg(long, default_value_t = BaseSettings::default().vae.learning_rate, value_name = "F")]
    pub vae_learning_rate: f64,
    /// The VAE trains on random crops of this size.
    #[arg(long, default_value_t = BaseSettings::default().vae_crop, value_name = "PX")]
    pub vae_crop: u32,
    /// Weight of the KL term that keeps the VAE's latents near a unit Gaussian.
    #[arg(long, default_value_t = BaseSettings::default().kl_weight, value_name = "F")]
    pub kl_weight: f64,
    /// Steps of the decoder-only stage after the VAE (the encoder and its latents stay fixed; the decoder
    /// learns exact colours). Batch size and learning rate are the VAE's; 0 skips it.
    #[arg(long, default_value_t = BaseSettings::default().vae_decoder.steps, value_name = "N")]
    pub vae_decoder_steps: u64,
    /// Optimizer steps of the UNet + text encoder stage; a rerun with more continues to the new count.
    #[arg(long, default_value_t = BaseSettings::default().unet.steps, value_name = "N")]
    pub unet_steps: u64,
    /// Images per UNet step.
    #[arg(long, default_value_t = BaseSettings::default().unet.batch_size, value_name = "N")]
    pub unet_batch_size: usize,
    /// AdamW learning rate of the UNet stage.
    #[arg(long, default_value_t = BaseSettings::default().unet.learning_rate, value_name = "F")]
    pub unet_learning_rate: f64,
    /// Decay of the UNet stage's moving average of the weights (diffusers' --use_ema), which is what the run
    /// writes out; 0 writes the last step's weights.
    #[arg(long, default_value_t = BaseSettings::default().unet.ema_decay.unwrap_or(0.0), value_name = "F")]
    pub unet_ema_decay: f64,
    /// Linear learning-rate warm-up of each stage.
    #[arg(long, default_value_t = BaseSettings::default().unet.warmup_steps, value_name = "N")]
    pub warmup_steps: usize,
    /// Share of captions replaced by "" (so classifier-free guidance has an unconditional model).
    #[arg(long, default_value_t = BaseSettings::default().proportion_empty_prompts, value_name = "F")]
    pub proportion_empty_prompts: f64,
    /// Save a resumable checkpoint of the running stage every N steps (and at its last step).
    #[arg(long, default_value_t = BaseSettings::default().checkpointing_steps, value_name = "N")]
    pub checkpointing_steps: u64,
    /// Keep the text encoder at its random initialisation instead of training it with the UNet (by default it
    /// trains).
    #[arg(long)]
    pub freeze_text_encoder: bool,
    /// Min-SNR weighting γ of the UNet loss (diffusers' --snr_gamma); 0 for the plain MSE.
    #[arg(long, default_value_t = BaseSettings::default().snr_gamma.unwrap_or(0.0), value_name = "F")]
    pub snr_gamma: f64,
    /// Offset noise of the UNet stage (diffusers' --noise_offset): lets the prompt, not the seed, set the
    /// background colour; 0 for none.
    #[arg(long, default_value_t = BaseSettings::default().noise_offset, value_name = "F")]
    pub noise_offset: f64,
    /// No progress display (without it: a bar on a terminal, a line every 10 s in a log).
    #[arg(long, short)]
    pub quiet: bool,
}

impl TrainBaseArgs {
    fn settings(&self) -> BaseSettings {
        BaseSettings {
            resolution: self.resolution,
            seed: self.seed,
            vae: StageSettings {
                steps: self.vae_steps,
                batch_size: self.vae_batch_size,
                learning_rate: self.vae_learning_rate,
                warmup_steps: self.warmup_steps,
                ema_decay: None,
            },
            vae_crop: self.vae_crop,
            kl_weight: self.kl_weight,
            vae_decoder: StageSettings {
                steps: self.vae_decoder_steps,
                batch_size: self.vae_batch_size,
                learning_rate: self.vae_learning_rate,
                warmup_steps: self.warmup_steps,
                ema_decay: None,
            },
            unet: StageSettings {
                steps: self.unet_steps,
                batch_size: self.unet_batch_size,
                learning_rate: self.unet_learning_rate,
                warmup_steps: self.warmup_steps,
                ema_decay: (self.unet_ema_decay != 0.0).then_some(self.unet_ema_decay),
            },
            proportion_empty_prompts: self.proportion_empty_prompts,
            checkpointing_steps: self.checkpointing_steps,
            train_text_encoder: !self.freeze_text_encoder,
            snr_gamma: (self.snr_gamma != 0.0).then_some(self.snr_gamma),
            noise_offset: self.noise_offset,
            shuffle_buffer: self.shuffle_buffer,
            data_workers: self.data_workers.unwrap_or(0),
        }
    }

    /// The sample parts read from shards: the image and the caption (a base model needs no condition, so the
    /// image stands in for it and no sample is skipped for lacking one).
    fn fields(&self, kind: StreamKind) -> Fields {
        let f = Fields::defaults(kind).with(kind, self.image_column.as_deref(), None, self.caption_column.as_deref());
        Fields { conditioning_image: f.image.clone(), ..f }
    }
}

pub fn run(args: &TrainBaseArgs) -> anyhow::Result<()> {
    // 1. Settings and data, checked before anything is written.
    let settings = args.settings();
    settings.validate()?;
    let dataset = Source::open(&args.dataset, |kind| args.fields(kind))?;
    dataset.check()?;
    eprintln!("data: {}", dataset.describe());
    crate::io::atomic::check_output_is_not_input("output", &args.output, &[Path::new(&args.dataset)])?;
    let device = super::device()?;

    // 2. Train, stopping cleanly on Ctrl-C; one progress display per stage.
    let stop = super::stop_on_ctrl_c(" and saving a checkpoint");
    let started = std::time::Instant::now();
    let mut progress: Option<(&'static str, Progress)> = None;
    let mut skipped: Vec<(&'static str, SkipReport)> = Vec::new();
    let end =
        from_scratch::train(&dataset, &args.output, &Architecture::demo(), &settings, &device, &stop, &mut |r| {
            if let Some(report) = &r.skipped {
                match skipped.last_mut() {
                    Some((stage, last)) if *stage == r.stage => *last = report.clone(),
                    _ => skipped.push((r.stage, report.clone())),
                }
            }
            if progress.as_ref().is_none_or(|(stage, _)| *stage != r.stage) {
                if let Some((_, p)) = progress.take() {
                    p.finish();
                }
                progress = Some((r.stage, Progress::new(args.quiet, &format!("{} step", r.stage), r.steps)));
            }
            if let Some((_, p)) = progress.as_mut() {
                p.set_message(format!("loss {:.4}, {:.1} samples/s", r.loss, r.samples_per_second));
                p.set(r.step, r.steps);
            }
        })?;
    if let Some((_, p)) = progress.take() {
        p.finish();
    }
    for (stage, report) in skipped.iter().filter(|(_, r)| r.samples + r.shards > 0) {
        eprintln!(
            "the {stage} stage skipped {} bad samples and the rest of {} damaged shards (see the warnings above); \
             the first:\n  {}",
            report.samples,
            report.shards,
            report.lines.join("\n  ")
        );
    }

    // 3. Samples of the finished model, or how to continue.
    let model_dir = args.output.join(MODEL_DIR);
    match end {
        End::Interrupted { stage, step } => {
            println!("interrupted in the {stage} stage at step {step}; to continue, run the same command again:");
            println!("  {}", super::train::command_line(None));
            super::exit_interrupted()
        }
        End::Finished { steps } => {
            let samples = args.output.join("samples.png");
            if steps == 0 && samples.is_file() {
                println!("{} is already trained to these settings: nothing to train", model_dir.display());
                return Ok(());
            }
            write_samples(&model_dir, &samples, args.resolution as usize, &device)
                .with_context(|| format!("writing {}", samples.display()))?;
            println!(
                "trained {steps} steps; wrote {} in {:.0} s (samples: {}); try: controlnet generate --model {} --prompt \"{}\"",
                model_dir.display(),
                started.elapsed().as_secs_f64(),
                samples.display(),
                model_dir.display(),
                SAMPLE_PROMPTS[0]
            );
            Ok(())
        }
    }
}

/// A grid: one row per sample prompt, four seeds each.
fn write_samples(
    model_dir: &std::path::Path,
    out: &std::path::Path,
    size: usize,
    device: &candle_core::Device,
) -> anyhow::Result<()> {
    let sd = StableDiffusion::load(model_dir, DType::F32, device)?;
    let mut rows = Vec::new();
    for prompt in SAMPLE_PROMPTS {
        let params = GenerateParams {
            num_images: SAMPLES_PER_PROMPT,
            ..GenerateParams::plain(prompt.to_string(), size, size, 25, 5.0, 0)
        };
        rows.push(generate(&sd, &[], &params, &mut |_, _| {})?.images);
    }
    crate::io::images::save_png(out, &image_grid(&rows), &[])?;
    Ok(())
}
