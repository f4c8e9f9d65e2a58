//! `controlnet train --model SD (--controlnet CN | --init) --dataset PATH --output RUN_DIR [options]`: teach a
//! ControlNet a condition from a small dataset (see `docs/training.md`).
//!
//! RUN_DIR receives `checkpoint-<step>/` folders, `loss.jsonl` + `loss.png`, `validation/step-<N>.png` +
//! `validation.jsonl`, `train_config.json`, and at the end `controlnet/` (a diffusers ControlNet folder that
//! `generate` and diffusers load; plus `unet/` with `--unlock-decoder`). Ctrl-C saves a checkpoint and exits with
//! status 130, printing the command that continues; `--resume` continues exactly where the newest valid checkpoint
//! left off, with the run's saved settings: only the flags that change something need typing again.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;

use super::progress::Progress;
use crate::io::single_file::load_controlnet;
use crate::pipeline::sd::LoadOptions;
use crate::pipeline::StableDiffusion;
use crate::train::feed::Source;
use crate::train::init::{controlnet_from_unet, load_base_unet, InitOptions, DEFAULT_HINT_CHANNELS};
use crate::train::resume;
use crate::train::settings::{fidelity_by_name, TrainSettings, ValidationSettings};
use crate::train::stream::{Fields, StreamKind};
use crate::train::trainer::{RunEnd, RunInputs, Trainer, RESULT_DIR, RESULT_UNET_DIR};

/// The run's own record of how it was started (`RUN_DIR/train_config.json`); `--resume` reads it back.
const RUN_CONFIG: &str = "train_config.json";

/// Settings flags are optional: a new run takes the library's defaults (shown in each help line), a resumed
/// run the values its checkpoint was trained with.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The base Stable Diffusion 1.x/2.x (locked): a diffusers pipeline folder, a single-file checkpoint or a hub id
    /// [with --resume: the run's].
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub model: Option<String>,
    /// The ControlNet to train further (diffusers folder, original file or hub id).
    #[arg(long, value_name = "DIR_FILE_OR_ID", conflicts_with = "init")]
    pub controlnet: Option<String>,
    /// Start from a new ControlNet made from the base UNet (as `controlnet init`).
    #[arg(long)]
    pub init: bool,
    /// Condition channels of the new ControlNet (with --init): 3 reads the condition images as RGB, 1 as grey.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub conditioning_channels: usize,
    /// Channels of the hint encoder's convolutions (with --init; diffusers' conditioning_embedding_out_channels);
    /// one stride-2 step between consecutive entries, so 4 entries take the condition to the latent size of an
    /// 8x VAE.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_HINT_CHANNELS, value_name = "C,C,..")]
    pub hint_channels: Vec<usize>,
    /// The data: a fill50k-style prompt.json (or its folder), a folder with metadata.jsonl, or shards streamed
    /// from disk: WebDataset .tar or Hugging Face .parquet files, as a pattern ('shards/{00000..00127}.tar',
    /// globs, several joined by ::) or a folder holding them [with --resume: the run's].
    #[arg(long, value_name = "PATH_OR_PATTERN")]
    pub dataset: Option<PathBuf>,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Sharded data: samples the shuffle buffer holds (shards are shuffled too; 1 keeps each shard's order)
    /// [default: 1000].
    #[arg(long, value_name = "N")]
    pub shuffle_buffer: Option<usize>,
    /// Sharded data: threads decoding images ahead of training; the order does not depend on it (0: the cores
    /// but one, at most 8) [default: 0].
    #[arg(long, value_name = "N")]
    pub data_workers: Option<usize>,
    /// The run folder (checkpoints, logs, validation images, the result).
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Continue from the newest valid checkpoint in OUTPUT (`--resume`) or from a checkpoint folder, with the
    /// run's saved settings (flags given override those that may change).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "latest|CHECKPOINT")]
    pub resume: Option<String>,
    /// Training images are resized (shorter side) and centre-cropped to this square size [default: 512].
    #[arg(long, value_name = "PX")]
    pub resolution: Option<u32>,
    /// Examples per micro-batch [default: 4].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer update [default: 1].
    #[arg(long, value_name = "N")]
    pub gradient_accumulation_steps: Option<usize>,
    /// Optimizer updates of the whole run [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Seed of the noise generator (the data generator's is derived from it) [default: 0].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// AdamW's learning rate [default: 1e-5].
    #[arg(long, value_name = "F")]
    pub learning_rate: Option<f64>,
    /// Linear warm-up of the learning rate from 0 over this many updates (diffusers' constant_with_warmup)
    /// [default: 0].
    #[arg(long, value_name = "N")]
    pub lr_warmup_steps: Option<usize>,
    /// AdamW's β1 [default: 0.9].
    #[arg(long, value_name = "F")]
    pub adam_beta1: Option<f64>,
    /// AdamW's β2 [default: 0.999].
    #[arg(long, value_name = "F")]
    pub adam_beta2: Option<f64>,
    /// AdamW's decoupled weight decay [default: 0.01].
    #[arg(long, value_name = "F")]
    pub adam_weight_decay: Option<f64>,
    /// AdamW's ε [default: 1e-8].
    #[arg(long, value_name = "F")]
    pub adam_epsilon: Option<f64>,
    /// Gradients are clipped to this global 2-norm [default: 1].
    #[arg(long, value_name = "F")]
    pub max_grad_norm: Option<f64>,
    /// Share of captions replaced by "" so the ControlNet learns to read the condition alone [default: 0.5].
    #[arg(long, value_name = "F")]
    pub proportion_empty_prompts: Option<f64>,
    /// Train the UNet's decoder too (the original `sd_locked = False`); the result adds `unet/`.
    #[arg(long)]
    pub unlock_decoder: bool,
    /// The UNet gets only the ControlNet's middle-block residual (the original `only_mid_control`).
    #[arg(long)]
    pub only_mid_control: bool,
    /// Keep VAE latents, conditions and text embeddings in memory (small datasets).
    #[arg(long)]
    pub cache: bool,
    /// Mixed precision, as diffusers' --mixed_precision: bf16 keeps the locked VAE, text encoder and UNet in bf16
    /// weights on the CPU's bf16 kernels (half their memory, faster where the CPU has AVX512-BF16 or AMX); f16
    /// keeps them in f16 weights with f32 activations and products (half their memory, closer to f32 than bf16;
    /// no gradient is held in f16, so no loss scaling; CPU only). The ControlNet, its gradients and AdamW's state
    /// stay f32. auto: bf16 where the CPU multiplies bf16 natively [default: f32].
    #[arg(long, value_name = "f32|bf16|f16|auto", value_parser = crate::pipeline::request::ComputeDtype::parse)]
    pub dtype: Option<crate::pipeline::request::ComputeDtype>,
    /// Save a checkpoint every N updates (0: only at the end and on Ctrl-C) [default: 500].
    #[arg(long, value_name = "N")]
    pub checkpointing_steps: Option<u64>,
    /// Keep only the newest K checkpoints [default: all].
    #[arg(long, value_name = "K")]
    pub checkpoints_total_limit: Option<usize>,
    /// Condition image(s) for validation; pair with --validation-prompt (one of either may serve all).
    #[arg(long = "validation-image", value_name = "IMAGE")]
    pub validation_images: Vec<PathBuf>,
    /// Prompt(s) for validation.
    #[arg(long = "validation-prompt", value_name = "TEXT")]
    pub validation_prompts: Vec<String>,
    /// Validate every N updates [default: 100].
    #[arg(long, value_name = "N")]
    pub validation_steps: Option<u64>,
    /// Images per validation pair [default: 1].
    #[arg(long, value_name = "N")]
    pub num_validation_images: Option<usize>,
    /// Denoising steps of a validation image (UniPC) [default: 20].
    #[arg(long, value_name = "N")]
    pub validation_inference_steps: Option<usize>,
    /// Classifier-free guidance of the validation images [default: 7.5].
    #[arg(long, value_name = "F")]
    pub validation_guidance: Option<f64>,
    /// Score validation images against their condition: `canny` (edge F1 of the re-annotated image).
    #[arg(long, value_name = "KIND")]
    pub fidelity: Option<String>,
    /// No progress display (without it: a bar on a terminal, a line every 10 s in a log).
    #[arg(long, short)]
    pub quiet: bool,
}

/// Where a shard's sample parts are (`train` and `cache-latents` read the same shards).
#[derive(Args, Debug, Clone, Default)]
pub struct ColumnArgs {
    /// Sharded data: where the target image is: WebDataset extensions (a;b: the first one a sample has) or a
    /// parquet column [default: jpg;jpeg;png;webp, or image].
    #[arg(long, value_name = "EXT_OR_COLUMN")]
    pub image_column: Option<String>,
    /// Sharded data: where the condition image is [default: cond.jpg;cond.jpeg;cond.png;cond.webp, or
    /// conditioning_image].
    #[arg(long, value_name = "EXT_OR_COLUMN")]
    pub conditioning_image_column: Option<String>,
    /// Sharded data: where the caption is (WebDataset .json: a string, a list, or a caption/text/prompt field)
    /// [default: txt;json, or text].
    #[arg(long, value_name = "EXT_OR_COLUMN")]
    pub caption_column: Option<String>,
}

impl ColumnArgs {
    /// These flags over `saved` (a resumed run's), else the kind's defaults.
    pub fn fields(&self, kind: StreamKind, saved: Option<&Fields>) -> Fields {
        let base = saved.cloned().unwrap_or_else(|| Fields::defaults(kind));
        base.with(
            kind,
            self.image_column.as_deref(),
            self.conditioning_image_column.as_deref(),
            self.caption_column.as_deref(),
        )
    }

    /// Whether any was given.
    pub fn any(&self) -> bool {
        self.image_column.is_some() || self.conditioning_image_column.is_some() || self.caption_column.is_some()
    }
}

/// What `train_config.json` records: where the run's model and data are, and its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RunConfig {
    model: String,
    controlnet: Option<String>,
    init: bool,
    dataset: PathBuf,
    /// Sharded data: where each sample's parts are (as resolved when the run started).
    #[serde(default)]
    fields: Option<Fields>,
    settings: TrainSettings,
    #[serde(default)]
    validation: Option<ValidationSettings>,
    #[serde(default)]
    trainable_parameters: usize,
}

impl TrainArgs {
    /// The settings: these flags over `base` (the library's defaults, or a resumed run's).
    fn settings(&self, base: &TrainSettings) -> TrainSettings {
        let b = base.clone();
        TrainSettings {
            resolution: self.resolution.unwrap_or(b.resolution),
            batch_size: self.batch_size.unwrap_or(b.batch_size),
            gradient_accumulation_steps: self.gradient_accumulation_steps.unwrap_or(b.gradient_accumulation_steps),
            max_steps: self.max_steps.unwrap_or(b.max_steps),
            seed: self.seed.unwrap_or(b.seed),
            adamw: crate::train::optimizer::AdamWConfig {
                lr: self.learning_rate.unwrap_or(b.adamw.lr),
                beta1: self.adam_beta1.unwrap_or(b.adamw.beta1),
                beta2: self.adam_beta2.unwrap_or(b.adamw.beta2),
                eps: self.adam_epsilon.unwrap_or(b.adamw.eps),
                weight_decay: self.adam_weight_decay.unwrap_or(b.adamw.weight_decay),
            },
            max_grad_norm: self.max_grad_norm.unwrap_or(b.max_grad_norm),
            lr_warmup_steps: self.lr_warmup_steps.unwrap_or(b.lr_warmup_steps),
            proportion_empty_prompts: self.proportion_empty_prompts.unwrap_or(b.proportion_empty_prompts),
            unlock_decoder: self.unlock_decoder || b.unlock_decoder,
            only_mid_control: self.only_mid_control || b.only_mid_control,
            cache: self.cache || b.cache,
            checkpointing_steps: self.checkpointing_steps.unwrap_or(b.checkpointing_steps),
            checkpoints_total_limit: self.checkpoints_total_limit.or(b.checkpoints_total_limit),
            shuffle_buffer: self.shuffle_buffer.unwrap_or(b.shuffle_buffer),
            data_workers: self.data_workers.unwrap_or(b.data_workers),
            dtype: self.dtype.unwrap_or(b.dtype),
        }
    }

    /// Validation: the pairs given, else `saved`'s (a resumed run's); the numbers given over the pairs'.
    fn validation(&self, saved: Option<&ValidationSettings>) -> anyhow::Result<Option<ValidationSettings>> {
        let given = ValidationSettings::pair(&self.validation_images, &self.validation_prompts)?;
        let Some(mut v) = given.or_else(|| saved.cloned()) else {
            return Ok(None);
        };
        v.every = self.validation_steps.unwrap_or(v.every);
        v.num_images = self.num_validation_images.unwrap_or(v.num_images);
        v.inference_steps = self.validation_inference_steps.unwrap_or(v.inference_steps);
        v.guidance = self.validation_guidance.unwrap_or(v.guidance);
        if let Some(name) = &self.fidelity {
            v.canny_fidelity = fidelity_by_name(name)?;
        }
        v.validate()?;
        Ok(Some(v))
    }
}

/// Which checkpoint `--resume` names (None: a new run), refusing a new run over an old one.
fn resume_point(args: &TrainArgs) -> anyhow::Result<Option<PathBuf>> {
    let run_dir = &args.output;
    match args.resume.as_deref() {
        None => {
            if !resume::list(run_dir)?.is_empty() {
                bail!(
                    "{} already holds checkpoints: pass --resume to continue that run, or choose another --output",
                    run_dir.display()
                );
            }
            Ok(None)
        }
        Some("latest") => {
            let (found, skipped) = resume::latest_valid(run_dir)?;
            for line in skipped {
                eprintln!("warning: {line}");
            }
            if found.is_none() {
                eprintln!("no valid checkpoint in {}: starting a new run", run_dir.display());
            }
            Ok(found.map(|(_, dir)| dir))
        }
        Some(path) => {
            let dir = PathBuf::from(path);
            resume::verify(&dir).with_context(|| format!("--resume {path}"))?;
            Ok(Some(dir))
        }
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    // 1. Where to start: a new run, or a checkpoint with the run's saved settings under the flags given.
    let run_dir = args.output.clone();
    let resume_from = resume_point(args)?;
    let saved_config: Option<RunConfig> = match &resume_from {
        Some(_) if run_dir.join(RUN_CONFIG).is_file() => {
            let path = run_dir.join(RUN_CONFIG);
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("{}: not a train_config.json", path.display()))?)
        }
        _ => None,
    };
    let base = match &resume_from {
        Some(dir) => Trainer::saved_settings(dir)?,
        None => TrainSettings::default(),
    };
    let settings = args.settings(&base);
    settings.validate()?;
    let validation = args.validation(saved_config.as_ref().and_then(|c| c.validation.as_ref()))?;
    let model = match (&args.model, &saved_config) {
        (Some(m), _) => m.clone(),
        (None, Some(c)) => c.model.clone(),
        (None, None) => bail!("say which base model to train on: --model DIR_FILE_OR_ID"),
    };
    let dataset_path = match (&args.dataset, &saved_config) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => c.dataset.clone(),
        (None, None) => bail!("say which data to train on: --dataset PATH"),
    };
    if let Some(dir) = &resume_from {
        for (name, now, then) in settings.changes(&base) {
            eprintln!("resuming with {} {now} (the checkpoint had {then})", super::flag_for(name));
        }
        if let Some(e) = settings.trajectory_mismatch(&base) {
            return Err(anyhow::Error::from(e).context(format!("cannot resume from {}", dir.display())));
        }
    }
    let Some(pattern) = dataset_path.to_str() else { bail!("--dataset {}: not UTF-8", dataset_path.display()) };
    let saved_fields = saved_config.as_ref().and_then(|c| c.fields.clone());
    let source = Source::open(pattern, |kind| args.columns.fields(kind, saved_fields.as_ref()))?;
    source.check()?;
    eprintln!("data: {}", source.describe());
    let fields = match &source {
        Source::Stream(s) => Some(s.fields.clone()),
        Source::Folder(_) => {
            if args.columns.any() {
                eprintln!("warning: the column flags apply to sharded data; a folder dataset names its own files");
            }
            None
        }
    };
    crate::io::atomic::check_output_is_not_input("output", &run_dir, &[&dataset_path, Path::new(&model)])?;
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
    // The locked models in the run's precision; the UNet's tensors for --init and --unlock-decoder in f32.
    let sd = StableDiffusion::open(&model, &LoadOptions { dtype: settings.locked_dtype(&device), ..opts.clone() })?;
    match sd.unet.weights_dtype() {
        DType::BF16 => {
            let kernel = crate::model::ops::bf16::Kernel::detect().name();
            eprintln!("precision: bf16 locked models ({kernel} kernel), f32 ControlNet and optimizer (--dtype bf16)");
        }
        DType::F16 => eprintln!(
            "precision: f16 locked models (f32 activations and products), f32 ControlNet and optimizer (--dtype f16)"
        ),
        _ => {}
    }
    let need_unet = settings.unlock_decoder || (resume_from.is_none() && args.init);
    let unet = if need_unet { Some(load_base_unet(&model, &opts)?) } else { None };
    let (controlnet_config, controlnet) = match (&resume_from, &args.controlnet) {
        (Some(dir), _) => {
            let c = load_controlnet(&dir.join("controlnet"))?;
            (c.config, c.tensors)
        }
        (None, Some(spec)) => {
            let path = crate::io::hub::resolve(spec, None)?;
            let c = load_controlnet(&path)?;
            if crate::io::single_file::is_union(&c.config) {
                bail!(
                    "--controlnet {spec}: a union ControlNet (ControlNetUnionModel) cannot be trained yet: its \
                     condition-type tokens have no training recipe here"
                );
            }
            (c.config, c.tensors)
        }
        (None, None) => {
            let Some((config, tensors)) = unet.as_ref() else { bail!("--init needs the base model's UNet") };
            let init = InitOptions {
                conditioning_channels: args.conditioning_channels,
                hint_channels: args.hint_channels.clone(),
                seed: settings.seed,
                vae_scale_factor: sd.vae_scale_factor(),
            };
            let new = controlnet_from_unet(config, tensors, &init)?;
            (new.config, new.tensors)
        }
    };
    let unet = if settings.unlock_decoder { unet } else { None };
    let mut trainer = Trainer::new(RunInputs {
        sd,
        unet,
        controlnet_config,
        controlnet,
        source,
        settings: settings.clone(),
        validation: validation.clone(),
        run_dir: run_dir.clone(),
    })?;
    if let Some(dir) = &resume_from {
        trainer.restore(dir)?;
        eprintln!("resuming from {} (update {})", dir.display(), trainer.step());
    }
    let (controlnet, init) = match &saved_config {
        Some(c) if args.controlnet.is_none() && !args.init => (c.controlnet.clone(), c.init),
        _ => (args.controlnet.clone(), args.init),
    };
    let config = RunConfig {
        model,
        controlnet,
        init,
        dataset: dataset_path,
        fields,
        settings: settings.clone(),
        validation,
        trainable_parameters: trainer.params().num_elements(),
    };
    let text = serde_json::to_string_pretty(&config)? + "\n";
    let config_path = run_dir.join(RUN_CONFIG);
    crate::io::atomic::write_atomic(&config_path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| crate::Error::io(tmp, e))
    })?;
    if settings.cache {
        let mut progress = Progress::new(args.quiet, "caching example", 0);
        trainer.fill_cache(&mut |done, total| progress.set(done as u64, total as u64))?;
        progress.finish();
    }

    // 3. Train, stopping cleanly on Ctrl-C.
    let stop = super::stop_on_ctrl_c(" and saving a checkpoint");
    let mut progress = Progress::new(args.quiet, "update", settings.max_steps);
    let end = trainer.run(&stop, &mut |r| {
        progress.set_message(format!("loss {:.4}, lr {:.2e}, {:.2} samples/s", r.loss, r.lr, r.samples_per_second));
        progress.set(r.step, settings.max_steps);
    })?;
    progress.finish();
    if let Some(report) = trainer.skipped().filter(|r| r.samples + r.shards > 0) {
        eprintln!(
            "skipped {} bad samples and the rest of {} damaged shards (see the warnings above); the first:\n  {}",
            report.samples,
            report.shards,
            report.lines.join("\n  ")
        );
    }
    match end {
        RunEnd::Finished => {
            let result = run_dir.join(RESULT_DIR);
            println!(
                "trained {} updates; wrote {} (use it with controlnet generate --controlnet {})",
                trainer.step(),
                result.display(),
                result.display()
            );
            if settings.unlock_decoder {
                println!(
                    "the UNet's decoder trained too: {} holds the trained UNet, to use in place of the base model's",
                    run_dir.join(RESULT_UNET_DIR).display()
                );
            }
            if settings.only_mid_control {
                println!("trained with --only-mid-control: the UNet should get only the middle-block residual");
            }
            Ok(())
        }
        RunEnd::Interrupted { step, checkpoint } => {
            println!(
                "interrupted at update {step}; saved {} (its controlnet/ loads in generate); to continue:",
                checkpoint.display()
            );
            println!("  {}", resume_command(&run_dir));
            super::exit_interrupted()
        }
    }
}

/// The command that continues the run in `run_dir` (its settings, model and data are read back from it).
fn resume_command(run_dir: &Path) -> String {
    let program = std::env::args().next().unwrap_or_else(|| "controlnet".into());
    let program = Path::new(&program).file_name().map(|n| n.to_string_lossy().into_owned());
    let args = [program.unwrap_or_else(|| "controlnet".into()), "train".into(), "--output".into()];
    let mut line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    line.push(shell_quote(&run_dir.to_string_lossy()));
    line.push("--resume".into());
    line.join(" ")
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The defaults a help line shows are the library's (a flag without a value takes them).
    #[test]
    fn help_defaults_are_the_librarys() {
        let d = TrainSettings::default();
        let v = ValidationSettings::default();
        let want: Vec<(&str, String)> = vec![
            ("resolution", d.resolution.to_string()),
            ("batch_size", d.batch_size.to_string()),
            ("gradient_accumulation_steps", d.gradient_accumulation_steps.to_string()),
            ("max_steps", d.max_steps.to_string()),
            ("seed", d.seed.to_string()),
            ("learning_rate", format!("{:e}", d.adamw.lr)),
            ("lr_warmup_steps", d.lr_warmup_steps.to_string()),
            ("adam_beta1", d.adamw.beta1.to_string()),
            ("adam_beta2", d.adamw.beta2.to_string()),
            ("adam_weight_decay", d.adamw.weight_decay.to_string()),
            ("adam_epsilon", format!("{:e}", d.adamw.eps)),
            ("max_grad_norm", d.max_grad_norm.to_string()),
            ("proportion_empty_prompts", d.proportion_empty_prompts.to_string()),
            ("checkpointing_steps", d.checkpointing_steps.to_string()),
            ("shuffle_buffer", d.shuffle_buffer.to_string()),
            ("data_workers", d.data_workers.to_string()),
            ("validation_steps", v.every.to_string()),
            ("num_validation_images", v.num_images.to_string()),
            ("validation_inference_steps", v.inference_steps.to_string()),
            ("validation_guidance", v.guidance.to_string()),
        ];
        let cmd = crate::cli::Cli::command();
        let train = cmd.find_subcommand("train").unwrap();
        for (id, value) in want {
            let arg = train.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("no {id}"));
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.ends_with(&format!("[default: {value}].")) || help.ends_with(&format!("[default: {value}]")),
                "--{id}: help says {help:?}, the library's default is {value}"
            );
        }
        let a = TrainArgs::try_parse_from_for_test(&["--output", "run"]);
        assert_eq!(a.settings(&d), d, "no flags: the library's defaults");
    }

    impl TrainArgs {
        fn try_parse_from_for_test(args: &[&str]) -> TrainArgs {
            #[derive(clap::Parser)]
            struct Wrap {
                #[command(flatten)]
                args: TrainArgs,
            }
            use clap::Parser;
            Wrap::parse_from(std::iter::once("train").chain(args.iter().copied())).args
        }
    }
}
