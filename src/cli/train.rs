//! `controlnet train --model SD (--controlnet CN | --init) --dataset PATH --output RUN_DIR [options]`: teach a
//! ControlNet a condition from a small dataset (see `docs/training.md`).
//!
//! RUN_DIR receives `checkpoint-<step>/` folders, `loss.jsonl` + `loss.png`, `validation/step-<N>.png` +
//! `validation.jsonl`, `train_config.json`, and at the end `controlnet/` (a diffusers ControlNet folder that
//! `generate` and diffusers load; plus `unet/` with `--unlock-decoder`). Ctrl-C saves a checkpoint and stops;
//! `--resume` continues exactly where the newest valid checkpoint left off.
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;

use crate::io::single_file::load_controlnet;
use crate::pipeline::sd::LoadOptions;
use crate::pipeline::StableDiffusion;
use crate::train::dataset::Dataset;
use crate::train::init::{controlnet_from_unet, load_base_unet, InitOptions, DEFAULT_HINT_CHANNELS};
use crate::train::optimizer::AdamWConfig;
use crate::train::resume;
use crate::train::trainer::{RunEnd, RunInputs, TrainSettings, Trainer, ValidationSettings, RESULT_DIR};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The base Stable Diffusion 1.x/2.x (locked): a diffusers pipeline folder, a single-file checkpoint or a hub id.
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub model: String,
    /// The ControlNet to train further (diffusers folder, original file or hub id).
    #[arg(long, value_name = "DIR_FILE_OR_ID", conflicts_with = "init")]
    pub controlnet: Option<String>,
    /// Start from a new ControlNet made from the base UNet (as `controlnet init`).
    #[arg(long)]
    pub init: bool,
    /// Condition channels of the new ControlNet (with --init).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub conditioning_channels: usize,
    /// Channels of the hint encoder's convolutions (diffusers' conditioning_embedding_out_channels); one stride-2
    /// step between consecutive entries, so 4 entries take the condition to the latent size of an 8x VAE.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_HINT_CHANNELS, value_name = "C,C,..")]
    pub hint_channels: Vec<usize>,
    /// The data: a fill50k-style prompt.json (or its folder), or a folder with metadata.jsonl.
    #[arg(long, value_name = "PATH")]
    pub dataset: PathBuf,
    /// The run folder (checkpoints, logs, validation images, the result).
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Continue from the newest valid checkpoint in OUTPUT (`--resume`) or from a checkpoint folder.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "latest|CHECKPOINT")]
    pub resume: Option<String>,
    /// Training images are resized (shorter side) and centre-cropped to this square size.
    #[arg(long, default_value_t = 512, value_name = "PX")]
    pub resolution: u32,
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub batch_size: usize,
    /// Micro-batches per optimizer update.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub gradient_accumulation_steps: usize,
    /// Optimizer updates of the whole run.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub max_steps: u64,
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    #[arg(long, default_value_t = 1e-5, value_name = "F")]
    pub learning_rate: f64,
    /// Linear warm-up of the learning rate from 0 over this many updates (diffusers' constant_with_warmup).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub lr_warmup_steps: usize,
    #[arg(long, default_value_t = 0.9, value_name = "F")]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999, value_name = "F")]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-2, value_name = "F")]
    pub adam_weight_decay: f64,
    #[arg(long, default_value_t = 1e-8, value_name = "F")]
    pub adam_epsilon: f64,
    /// Gradients are clipped to this global 2-norm.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub max_grad_norm: f64,
    /// Share of captions replaced by "" so the ControlNet learns to read the condition alone.
    #[arg(long, default_value_t = 0.5, value_name = "F")]
    pub proportion_empty_prompts: f64,
    /// Train the UNet's decoder too (the original `sd_locked = False`); the result adds `unet/`.
    #[arg(long)]
    pub unlock_decoder: bool,
    /// The UNet gets only the ControlNet's middle-block residual (the original `only_mid_control`).
    #[arg(long)]
    pub only_mid_control: bool,
    /// Keep VAE latents, conditions and text embeddings in memory (small datasets).
    #[arg(long)]
    pub cache: bool,
    /// Save a checkpoint every N updates (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub checkpointing_steps: u64,
    /// Keep only the newest K checkpoints.
    #[arg(long, value_name = "K")]
    pub checkpoints_total_limit: Option<usize>,
    /// Condition image(s) for validation; pair with --validation-prompt (one of either may serve all).
    #[arg(long = "validation-image", value_name = "IMAGE")]
    pub validation_images: Vec<PathBuf>,
    #[arg(long = "validation-prompt", value_name = "TEXT")]
    pub validation_prompts: Vec<String>,
    /// Validate every N updates.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub validation_steps: u64,
    /// Images per validation pair.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_validation_images: usize,
    /// Denoising steps of a validation image (UniPC).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub validation_inference_steps: usize,
    #[arg(long, default_value_t = 7.5, value_name = "F")]
    pub validation_guidance: f64,
    /// Score validation images against their condition: `canny` (edge F1 of the re-annotated image).
    #[arg(long, value_name = "KIND")]
    pub fidelity: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl TrainArgs {
    fn settings(&self) -> TrainSettings {
        TrainSettings {
            resolution: self.resolution,
            batch_size: self.batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_steps: self.max_steps,
            seed: self.seed,
            adamw: AdamWConfig {
                lr: self.learning_rate,
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.adam_weight_decay,
            },
            max_grad_norm: self.max_grad_norm,
            lr_warmup_steps: self.lr_warmup_steps,
            proportion_empty_prompts: self.proportion_empty_prompts,
            unlock_decoder: self.unlock_decoder,
            only_mid_control: self.only_mid_control,
            cache: self.cache,
            checkpointing_steps: self.checkpointing_steps,
            checkpoints_total_limit: self.checkpoints_total_limit,
        }
    }

    /// diffusers' pairing: as many images as prompts, or one of either for all of the other.
    fn validation(&self) -> anyhow::Result<Option<ValidationSettings>> {
        let (imgs, prompts) = (&self.validation_images, &self.validation_prompts);
        if imgs.is_empty() && prompts.is_empty() {
            return Ok(None);
        }
        if imgs.is_empty() || prompts.is_empty() {
            bail!("--validation-image and --validation-prompt go together");
        }
        let pairs: Vec<(PathBuf, String)> = if imgs.len() == prompts.len() {
            imgs.iter().cloned().zip(prompts.iter().cloned()).collect()
        } else if imgs.len() == 1 {
            prompts.iter().map(|p| (imgs[0].clone(), p.clone())).collect()
        } else if prompts.len() == 1 {
            imgs.iter().map(|i| (i.clone(), prompts[0].clone())).collect()
        } else {
            bail!(
                "{} --validation-image and {} --validation-prompt: give as many of each, or one of either",
                imgs.len(),
                prompts.len()
            );
        };
        for (img, _) in &pairs {
            crate::io::images::load_rgb(img).with_context(|| "--validation-image")?;
        }
        let canny_fidelity = match self.fidelity.as_deref() {
            None => false,
            Some("canny") => true,
            Some(other) => bail!("--fidelity {other}: only canny is implemented"),
        };
        Ok(Some(ValidationSettings {
            pairs,
            every: self.validation_steps,
            num_images: self.num_validation_images.max(1),
            inference_steps: self.validation_inference_steps,
            guidance: self.validation_guidance,
            canny_fidelity,
        }))
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    // 1. Settings and data, checked before any model loads.
    let settings = args.settings();
    settings.validate()?;
    let validation = args.validation()?;
    let dataset = Dataset::open(&args.dataset)?;
    dataset.check()?;
    let run_dir = args.output.clone();
    let resume_from = match args.resume.as_deref() {
        None => {
            if !resume::list(&run_dir)?.is_empty() {
                bail!(
                    "{} already holds checkpoints: pass --resume to continue that run, or choose another --output",
                    run_dir.display()
                );
            }
            None
        }
        Some("latest") => {
            let (found, skipped) = resume::latest_valid(&run_dir)?;
            for line in skipped {
                eprintln!("warning: {line}");
            }
            if found.is_none() {
                eprintln!("no valid checkpoint in {}: starting a new run", run_dir.display());
            }
            found.map(|(_, dir)| dir)
        }
        Some(path) => {
            let dir = PathBuf::from(path);
            resume::verify(&dir).with_context(|| format!("--resume {path}"))?;
            Some(dir)
        }
    };
    if resume_from.is_none() && args.controlnet.is_none() && !args.init {
        bail!("say which ControlNet to train: --controlnet DIR, or --init for a new one from the base UNet");
    }

    // 2. Models.
    let device = super::device()?;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: device.clone(),
        variant: None,
        prediction_type: None,
        config_dir: None,
    };
    let sd = StableDiffusion::open(&args.model, &opts)?;
    let need_unet = args.unlock_decoder || (resume_from.is_none() && args.init);
    let unet = if need_unet { Some(load_base_unet(&args.model, &opts)?) } else { None };
    let (controlnet_config, controlnet) = match (&resume_from, &args.controlnet) {
        (Some(dir), _) => {
            let c = load_controlnet(&dir.join("controlnet"))?;
            (c.config, c.tensors)
        }
        (None, Some(spec)) => {
            let path = crate::io::hub::resolve(spec, None)?;
            let c = load_controlnet(&path)?;
            (c.config, c.tensors)
        }
        (None, None) => {
            let (config, tensors) = unet.as_ref().expect("loaded for --init");
            let init = InitOptions {
                conditioning_channels: args.conditioning_channels,
                hint_channels: args.hint_channels.clone(),
                seed: args.seed,
            };
            let new = controlnet_from_unet(config, tensors, &init)?;
            (new.config, new.tensors)
        }
    };
    let unet = if args.unlock_decoder { unet } else { None };
    let mut trainer = Trainer::new(RunInputs {
        sd,
        unet,
        controlnet_config,
        controlnet,
        dataset,
        settings: settings.clone(),
        validation,
        run_dir: run_dir.clone(),
    })?;
    if let Some(dir) = &resume_from {
        trainer.restore(dir)?;
        eprintln!("resuming from {} (update {})", dir.display(), trainer.step());
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let config = serde_json::json!({
        "model": args.model, "controlnet": args.controlnet, "init": args.init, "dataset": args.dataset,
        "settings": settings, "trainable_parameters": trainer.params().num_elements(),
    });
    std::fs::write(run_dir.join("train_config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    if args.cache {
        let bar = bar(args.quiet, 0, "caching latents");
        trainer.fill_cache(&mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
    }

    // 3. Train, stopping cleanly on Ctrl-C.
    let stop = super::stop_on_ctrl_c();
    let progress = bar(args.quiet, settings.max_steps, "");
    progress.set_position(trainer.step());
    progress.reset_eta();
    let end = trainer.run(&stop, &mut |r| {
        progress.set_position(r.step);
        progress.set_message(format!("loss {:.4}  lr {:.2e}  {:.2} samples/s", r.loss, r.lr, r.samples_per_second));
    })?;
    progress.finish_and_clear();
    match end {
        RunEnd::Finished => {
            println!(
                "trained {} updates; wrote {} (use it with controlnet generate --controlnet {})",
                trainer.step(),
                run_dir.join(RESULT_DIR).display(),
                run_dir.join(RESULT_DIR).display()
            );
            Ok(())
        }
        RunEnd::Interrupted { step, checkpoint } => {
            println!("interrupted at update {step}; saved {}; continue with --resume", checkpoint.display());
            Ok(())
        }
    }
}

fn bar(quiet: bool, len: u64, prefix: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let template = format!("{prefix}{{spinner}} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (ETA {{eta}})");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// This command line as a shell would take it back, with `extra` appended when it is not there yet.
pub(crate) fn command_line(extra: Option<&str>) -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(program) = args.first_mut() {
        // The name the user typed when it is on PATH, else the path it ran from.
        if let Some(name) = std::path::Path::new(program).file_name() {
            *program = name.to_string_lossy().into_owned();
        }
    }
    if let Some(extra) = extra {
        if !args.iter().any(|a| a == extra || a.starts_with(&format!("{extra}="))) {
            args.push(extra.to_string());
        }
    }
    args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

/// `a` quoted for a POSIX shell when it needs it.
fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// A run stopped by Ctrl-C ends as an interrupted process does (status 130, as `generate` does), after its
/// checkpoint and the message saying how to continue.
pub(crate) fn exit_interrupted() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(130)
}
