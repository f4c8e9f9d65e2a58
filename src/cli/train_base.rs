//! `controlnet train-base --dataset PATH --output RUN_DIR [options]`: train a small Stable Diffusion base
//! from scratch (the bundled demo model's recipe, see `docs/demo.md` and `train::base`).
//!
//! RUN_DIR receives `model/` (a diffusers pipeline folder `generate`, `init` and `train` load), `vae/` and
//! `unet/` (checkpoints, `loss.jsonl`, `loss.png`), `base_config.json`, and `samples.png`: images the finished
//! base makes for a few prompts. Run the same command again to continue a stopped run.
use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use clap::Args;

use crate::pipeline::{generate, GenerateParams, StableDiffusion};
use crate::train::base::{train_base, Architecture, BaseEnd, BaseSettings, StageSettings, MODEL_DIR};
use crate::train::dataset::Dataset;
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
    /// The data: a fill50k-style prompt.json (or its folder), or a folder with metadata.jsonl.
    #[arg(long, value_name = "PATH")]
    pub dataset: PathBuf,
    /// The run folder; the model is written to OUTPUT/model. Run again with the same OUTPUT to continue.
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    #[arg(long, default_value_t = 128, value_name = "PX")]
    pub resolution: u32,
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    #[arg(long, default_value_t = BaseSettings::default().vae.steps, value_name = "N")]
    pub vae_steps: u64,
    #[arg(long, default_value_t = BaseSettings::default().vae.batch_size, value_name = "N")]
    pub vae_batch_size: usize,
    #[arg(long, default_value_t = BaseSettings::default().vae.learning_rate, value_name = "F")]
    pub vae_learning_rate: f64,
    /// The VAE trains on random crops of this size.
    #[arg(long, default_value_t = BaseSettings::default().vae_crop, value_name = "PX")]
    pub vae_crop: u32,
    #[arg(long, default_value_t = BaseSettings::default().kl_weight, value_name = "F")]
    pub kl_weight: f64,
    /// Steps of the decoder-only stage after the VAE (the encoder and its latents stay fixed; the decoder
    /// learns exact colours). Batch size and learning rate are the VAE's; 0 skips it.
    #[arg(long, default_value_t = BaseSettings::default().vae_decoder.steps, value_name = "N")]
    pub vae_decoder_steps: u64,
    #[arg(long, default_value_t = BaseSettings::default().unet.steps, value_name = "N")]
    pub unet_steps: u64,
    #[arg(long, default_value_t = BaseSettings::default().unet.batch_size, value_name = "N")]
    pub unet_batch_size: usize,
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
    #[arg(long, default_value_t = BaseSettings::default().checkpointing_steps, value_name = "N")]
    pub checkpointing_steps: u64,
    /// Keep the text encoder at its random initialisation instead of training it with the UNet.
    #[arg(long)]
    pub freeze_text_encoder: bool,
    /// Min-SNR weighting γ of the UNet loss (diffusers' --snr_gamma); 0 for the plain MSE.
    #[arg(long, default_value_t = 5.0, value_name = "F")]
    pub snr_gamma: f64,
    /// Offset noise of the UNet stage (diffusers' --noise_offset): lets the prompt, not the seed, set the
    /// background colour; 0 for none.
    #[arg(long, default_value_t = BaseSettings::default().noise_offset, value_name = "F")]
    pub noise_offset: f64,
    /// No progress bar: a log line every 50 steps instead (for runs in the background).
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
        }
    }
}

pub fn run(args: &TrainBaseArgs) -> anyhow::Result<()> {
    let settings = args.settings();
    settings.validate()?;
    let dataset = Dataset::open(&args.dataset)?;
    dataset.check()?;
    let device = super::device()?;

    let stop = super::stop_on_ctrl_c();
    let started = std::time::Instant::now();
    let mut bar: Option<(&'static str, indicatif::ProgressBar)> = None;
    let end = train_base(&dataset, &args.output, &Architecture::demo(), &settings, &device, &stop, &mut |r| {
        if args.quiet {
            if r.step.is_multiple_of(50) || r.step == r.steps {
                eprintln!(
                    "{} step {}/{}  loss {:.4}  {:.1} samples/s  {:.0} s",
                    r.stage,
                    r.step,
                    r.steps,
                    r.loss,
                    r.samples_per_second,
                    started.elapsed().as_secs_f64()
                );
            }
            return;
        }
        if bar.as_ref().is_none_or(|(stage, _)| *stage != r.stage) {
            if let Some((_, b)) = bar.take() {
                b.finish_and_clear();
            }
            let b = indicatif::ProgressBar::new(r.steps);
            let template = format!("{} {{spinner}} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (ETA {{eta}})", r.stage);
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_position(r.step.saturating_sub(1));
            b.reset_eta();
            bar = Some((r.stage, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(r.step);
            b.set_message(format!("loss {:.4}  {:.1} samples/s", r.loss, r.samples_per_second));
        }
    })?;
    if let Some((_, b)) = bar.take() {
        b.finish_and_clear();
    }
    let model_dir = args.output.join(MODEL_DIR);
    match end {
        BaseEnd::Interrupted { stage, step } => {
            println!("interrupted in the {stage} stage at step {step}; run the same command again to continue");
            Ok(())
        }
        BaseEnd::Finished => {
            let samples = args.output.join("samples.png");
            write_samples(&model_dir, &samples, args.resolution as usize, &device)
                .with_context(|| format!("writing {}", samples.display()))?;
            println!(
                "wrote {} in {:.0} s (samples: {}); try: controlnet generate --model {} --prompt \"{}\"",
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
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            width: size,
            height: size,
            steps: 25,
            guidance: 5.0,
            scheduler: None,
            seed: 0,
            num_images: SAMPLES_PER_PROMPT,
            guess_mode: false,
            vae_tiling: false,
        };
        rows.push(generate(&sd, &[], &params, &mut |_, _| {})?.images);
    }
    crate::io::images::save_png(out, &image_grid(&rows), &[])?;
    Ok(())
}
