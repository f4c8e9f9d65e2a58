//! The training loop: batches in a seeded shuffled order, gradient accumulation, clipping, AdamW with a
//! warm-up, checkpoints that resume exactly, the loss log, validation images and Ctrl-C.
//!
//! One *update* (a "step" in diffusers' progress bar) is `gradient_accumulation_steps` micro-batches: each
//! micro-batch's loss is divided by that number before `backward` (as `accelerate` does), the gradients are
//! summed, clipped to `max_grad_norm`, and AdamW updates the trainable tensors at the warm-up learning rate
//! of that update.
//!
//! Randomness comes from two torch-compatible generators, both saved in every checkpoint: the *noise*
//! generator, seeded with `--seed`, and the *data* generator, seeded with `--seed` + [`DATA_SEED_OFFSET`] (the
//! engine reads only the seed's low 32 bits; equal seeds would make the two streams the same numbers). The data
//! generator shuffles each epoch (torch's `randperm` algorithm), drops captions
//! (`--proportion-empty-prompts`) and picks one of several captions; the noise generator draws each
//! micro-batch's posterior noise, noise and timesteps in diffusers' order. A streamed (sharded) dataset instead
//! takes one seed per epoch from the data generator for its shard order and shuffle buffer, and its position is
//! (that seed, samples taken), see [`super::stream`]. With the weights, the optimizer's
//! moments and step counts, the epoch's order and the position in it, a resumed run continues exactly: N
//! updates, a checkpoint, resume, N more give the same weights as 2N in one run (tested).
//!
//! Differences from diffusers' script, on purpose: an update always takes `gradient_accumulation_steps`
//! micro-batches (continuing into the next epoch; `accelerate` also closes an update at an epoch's end),
//! and the logged loss is the mean over the update's micro-batches (the script logs the last one's).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dataset::{condition_tensor, resize_center_crop};
use super::feed::{Feed, Source, StreamState};
use super::files::{self, Entry};
use super::objective::{Draws, Objective};
use super::optimizer::{warmup_lr, AdamW, AdamWSteps, Grads};
use super::params::{Params, TensorMap};
use super::resume;
pub use super::settings::{TrainSettings, ValidationSettings};
use super::trainable::{Trainable, UNET_PREFIX};
use super::validation::{self, Fidelity, LossRecord, ValidationRecord};
use crate::model::controlnet::{ControlNetConfig, ControlNetModel};
use crate::pipeline::request::ComputeDtype;
use crate::pipeline::{generate, Control, GenerateParams, StableDiffusion};
use crate::rng::{randperm, GeneratorState, TorchGenerator};
use crate::schedulers::SchedulerKind;
use crate::{Error, Result};

/// Files of a run folder.
pub const LOSS_LOG: &str = "loss.jsonl";
pub const LOSS_CURVE: &str = "loss.png";
pub const VALIDATION_LOG: &str = "validation.jsonl";
pub const VALIDATION_DIR: &str = "validation";
pub const RESULT_DIR: &str = "controlnet";
pub const RESULT_UNET_DIR: &str = "unet";
/// Files inside a checkpoint.
const CK_CONTROLNET: &str = "controlnet";
const CK_UNET_DECODER: &str = "unet_decoder.safetensors";
const CK_OPTIMIZER: &str = "optimizer.safetensors";
const CK_STATE: &str = "state.json";
/// Added to `--seed` for the data generator (shuffling, caption dropping): the golden-ratio constant's high
/// word, so the two generators' low 32-bit seeds always differ.
pub const DATA_SEED_OFFSET: u64 = 0x9E37_79B9;

/// Where the run is: saved in each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer updates done.
    pub step: u64,
    pub epoch: u64,
    /// This epoch's example order and how far it has been read (folder datasets).
    pub order: Vec<usize>,
    pub cursor: usize,
    pub data_rng: GeneratorState,
    pub noise_rng: GeneratorState,
    /// Where a streamed dataset's epoch is.
    #[serde(default)]
    pub stream: Option<StreamState>,
}

impl TrainState {
    /// Step 0 of a run with `seed`: epoch 0's order (a folder's shuffled indices, or a stream's seed) drawn from
    /// the data generator.
    pub fn new(feed: &Feed, seed: u64) -> Self {
        let mut data_rng = TorchGenerator::new(seed.wrapping_add(DATA_SEED_OFFSET));
        let order = feed.folder().map(|d| randperm(d.len(), &mut data_rng)).unwrap_or_default();
        let stream = feed.first_stream_state(&mut data_rng);
        Self {
            step: 0,
            epoch: 0,
            order,
            cursor: 0,
            data_rng: data_rng.state(),
            noise_rng: TorchGenerator::new(seed).state(),
            stream,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    state: TrainState,
    optimizer: AdamWSteps,
    settings: TrainSettings,
    /// Examples of a folder dataset, shards of a streamed one.
    dataset_len: usize,
    /// A streamed dataset's shards (name, size): a resumed run must read the same ones.
    #[serde(default)]
    shards: Option<Vec<(String, u64)>>,
    /// The bad samples and shards a streamed dataset skipped up to here (the resumed run goes on counting).
    #[serde(default)]
    skipped: Option<super::stream::SkipReport>,
}

/// What one update did (for the progress bar and the log).
#[derive(Debug, Clone)]
pub struct UpdateReport {
    pub step: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_second: f64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// `max_steps` reached; the result folder was written.
    Finished,
    /// Stopped by the stop flag (Ctrl-C) after saving a checkpoint at this step.
    Interrupted { step: u64, checkpoint: PathBuf },
}

/// The inputs of a run, loaded by the caller.
pub struct RunInputs {
    /// The base pipeline (its UNet is used as is when the decoder stays locked).
    pub sd: StableDiffusion,
    /// The base UNet's `config.json` value and tensors: needed only with `unlock_decoder`.
    pub unet: Option<(Value, TensorMap)>,
    /// The ControlNet to train: `config.json` value and tensors.
    pub controlnet_config: Value,
    pub controlnet: TensorMap,
    pub source: Source,
    pub settings: TrainSettings,
    pub validation: Option<ValidationSettings>,
    pub run_dir: PathBuf,
}

pub struct Trainer {
    sd: StableDiffusion,
    /// The ControlNet (and the UNet's decoder) being trained.
    nets: Trainable,
    optimizer: AdamW,
    objective: Objective,
    /// The examples each micro-batch takes, and their latents, embeddings and conditions.
    feed: Feed,
    settings: TrainSettings,
    validation: Option<ValidationSettings>,
    state: TrainState,
    run_dir: PathBuf,
    device: Device,
    last_checkpoint: Option<u64>,
}

impl Trainer {
    /// Sets up a new run (state at step 0).
    pub fn new(inputs: RunInputs) -> Result<Self> {
        let RunInputs { mut sd, unet, controlnet_config, controlnet, source, settings, validation, run_dir } = inputs;
        settings.validate()?;
        if settings.cache && matches!(source, Source::Stream(_)) {
            return Err(Error::setting(
                "cache",
                "keeps every example in memory, which a folder dataset allows; sharded data is streamed instead",
            ));
        }
        let device = sd.unet.device().clone();
        if settings.dtype == ComputeDtype::F16 && !device.is_cpu() {
            // There f16 runs the locked models' activations, and so the gradients through them, in f16: that
            // needs a loss scale (diffusers' GradScaler), which is not built.
            return Err(Error::setting("dtype", "f16 training runs on the CPU only here (on a GPU: bf16)"));
        }
        let cn_config: ControlNetConfig = serde_json::from_value(controlnet_config.clone())
            .map_err(|e| Error::Invalid(format!("ControlNet config: {e}")))?;
        // Condition images are read as RGB, or as grey for a 1-channel net (PIL's "L" conversion).
        let condition_channels = cn_config.conditioning_channels;
        if condition_channels != 3 && condition_channels != 1 {
            return Err(Error::setting(
                "conditioning_channels",
                format!(
                    "this ControlNet reads {condition_channels}-channel conditions; training makes RGB (3) or grey \
                     (1) conditions from the dataset's images"
                ),
            ));
        }
        if let Source::Stream(s) = &source {
            if s.kind == super::stream::StreamKind::Latents {
                let dir = s.shards[0].parent().unwrap_or(Path::new("."));
                super::latent_cache::LatentsInfo::read(dir)?.check_fits(&sd, settings.resolution)?;
            }
        }
        let nets = Trainable::new(controlnet_config, controlnet, unet, settings.unlock_decoder, &mut sd)?;
        let mut objective = Objective::from_scheduler_config(&sd.scheduler_config)?;
        objective.only_mid_control = settings.only_mid_control;
        // Mixed precision: the locked models were loaded in bf16; the ControlNet's products follow (autocast).
        // (f16 locked weights leave the ControlNet's products in f32.)
        objective.autocast = device.is_cpu() && settings.locked_dtype(&device) == DType::BF16;
        let feed = Feed::new(source, &settings, condition_channels, &device);
        let state = TrainState::new(&feed, settings.seed);
        Ok(Self {
            sd,
            nets,
            optimizer: AdamW::new(settings.adamw),
            objective,
            feed,
            settings,
            validation,
            state,
            run_dir,
            device,
            last_checkpoint: None,
        })
    }

    /// The settings a checkpoint was trained with (what a resumed run starts from).
    pub fn saved_settings(dir: &Path) -> Result<TrainSettings> {
        let saved: SavedState = serde_json::from_value(files::read_json(dir, CK_STATE)?)
            .map_err(|e| Error::config(dir.join(CK_STATE), e))?;
        Ok(saved.settings)
    }

    /// Continues from a checkpoint folder: weights, optimizer moments and steps, data order and position, both
    /// generators. Settings that change the trajectory must match the checkpoint's.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        resume::verify(dir)?;
        let saved: SavedState = serde_json::from_value(files::read_json(dir, CK_STATE)?)
            .map_err(|e| Error::config(dir.join(CK_STATE), e))?;
        if let Some(e) = self.settings.trajectory_mismatch(&saved.settings) {
            return Err(match e {
                Error::Setting { setting, msg } => Error::setting(setting, format!("{msg} ({})", dir.display())),
                other => other,
            });
        }
        self.check_same_data(&saved, dir)?;
        let cn_file = format!("{CK_CONTROLNET}/{}.safetensors", crate::io::weights::DIFFUSERS_STEM);
        let mut tensors = files::read_tensors(dir, &cn_file)?;
        if self.settings.unlock_decoder {
            for (k, t) in files::read_tensors(dir, CK_UNET_DECODER)? {
                tensors.insert(format!("{UNET_PREFIX}{k}"), t);
            }
        }
        self.nets.params.load(&tensors, dir)?;
        let moments = files::read_tensors(dir, CK_OPTIMIZER)?;
        let moments =
            moments.into_iter().map(|(k, t)| Ok((k, t.to_device(&self.device)?))).collect::<Result<TensorMap>>()?;
        self.optimizer = AdamW::from_state(&moments, &saved.optimizer, dir)?;
        self.optimizer.config = self.settings.adamw;
        TorchGenerator::from_state(&saved.state.data_rng)?;
        TorchGenerator::from_state(&saved.state.noise_rng)?;
        if let (Source::Stream(s), Some(report)) = (&self.feed.source, saved.skipped) {
            s.restore_skipped(report);
        }
        self.state = saved.state;
        self.last_checkpoint = Some(self.state.step);
        Ok(())
    }

    /// A resumed run reads the data the checkpoint was trained on: as many folder examples, or the same shards.
    fn check_same_data(&self, saved: &SavedState, dir: &Path) -> Result<()> {
        let differs = |msg: String| {
            Err(Error::setting(
                "dataset",
                format!("{msg} when {} was saved: a resumed run reads the same data", dir.display()),
            ))
        };
        match (&self.feed.source, &saved.shards, &saved.state.stream) {
            (Source::Folder(d), None, None) if d.len() == saved.dataset_len => Ok(()),
            (Source::Folder(d), None, None) => differs(format!("{} examples now, {}", d.len(), saved.dataset_len)),
            (Source::Stream(s), Some(shards), Some(_)) => {
                let now = s.fingerprint();
                if &now == shards {
                    return Ok(());
                }
                let first = now.iter().zip(shards).find(|(a, b)| a != b);
                let detail = match first {
                    Some(((n, sz), (n0, sz0))) => format!("{n} ({sz} bytes) now, {n0} ({sz0} bytes)"),
                    None => format!("{} shards now, {}", now.len(), shards.len()),
                };
                differs(detail)
            }
            (Source::Folder(_), _, _) => differs("a folder dataset now, sharded data".into()),
            (Source::Stream(_), _, _) => differs("sharded data now, a folder dataset".into()),
        }
    }

    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// The bad samples and shards a streamed dataset skipped so far (`None` for folders, which are checked up
    /// front).
    pub fn skipped(&self) -> Option<super::stream::SkipReport> {
        self.feed.skipped()
    }

    pub fn params(&self) -> &Params {
        &self.nets.params
    }

    /// Encodes every example's target and condition, and every caption, once (`--cache`).
    pub fn fill_cache(&mut self, on_progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        self.feed.fill_cache(&self.sd, on_progress)
    }

    /// One optimizer update (`gradient_accumulation_steps` micro-batches).
    pub fn update(&mut self) -> Result<UpdateReport> {
        let start = Instant::now();
        let mut data_rng = TorchGenerator::from_state(&self.state.data_rng)?;
        let mut noise_rng = TorchGenerator::from_state(&self.state.noise_rng)?;
        let accum = self.settings.gradient_accumulation_steps;
        let scaling = self.sd.vae.config().scaling_factor;
        let mut grads = Grads::default();
        let mut loss_sum = 0f64;
        let mut samples = 0usize;
        for _ in 0..accum {
            let batch = self.feed.next_batch(&mut self.state, &mut data_rng)?;
            let captions = self.feed.captions(&batch, &mut data_rng);
            let (posterior, text, cond) = self.feed.inputs(&self.sd, &batch, &captions)?;
            let draws =
                Draws::draw(&mut noise_rng, posterior.mean.dims(), self.objective.num_train_timesteps(), &self.device)?;
            let added = text.added(self.feed.resolution as usize)?;
            let (cn, unet) = (&self.nets.controlnet, &self.sd.unet);
            let out =
                self.objective.loss(cn, unet, &posterior, scaling, &text.embeds, added.as_ref(), &cond, &draws)?;
            let loss: f32 = out.loss.to_dtype(DType::F32)?.to_scalar()?;
            if !loss.is_finite() {
                return Err(Error::setting(
                    "learning_rate",
                    format!(
                        "the loss is {loss} at update {}: training diverged (try a lower one)",
                        self.state.step + 1
                    ),
                ));
            }
            let store = (out.loss / accum as f64)?.backward()?;
            grads.accumulate(&self.nets.params, &store, 1.0)?;
            loss_sum += f64::from(loss);
            samples += batch.len();
        }
        let grad_norm = grads.clip_norm(self.settings.max_grad_norm)?;
        let lr = warmup_lr(self.settings.adamw.lr, self.settings.lr_warmup_steps, self.state.step as usize);
        self.optimizer.step(&self.nets.params, &grads, lr)?;
        self.state.step += 1;
        self.state.data_rng = data_rng.state();
        self.state.noise_rng = noise_rng.state();
        let report = UpdateReport {
            step: self.state.step,
            loss: (loss_sum / accum as f64) as f32,
            lr,
            grad_norm,
            samples_per_second: samples as f64 / start.elapsed().as_secs_f64().max(1e-9),
        };
        let record = LossRecord { step: report.step, loss: report.loss, lr, grad_norm, epoch: self.state.epoch };
        validation::append_jsonl(&self.run_dir.join(LOSS_LOG), &record)?;
        Ok(report)
    }

    /// Runs until `max_steps` (checkpoints, validation and the loss curve on their schedules) or until `stop`
    /// is set, which saves a checkpoint and returns [`RunEnd::Interrupted`].
    pub fn run(&mut self, stop: &AtomicBool, on_update: &mut dyn FnMut(&UpdateReport)) -> Result<RunEnd> {
        std::fs::create_dir_all(&self.run_dir).map_err(|e| Error::io(&self.run_dir, e))?;
        // Log lines after the restored step belong to the abandoned continuation.
        validation::truncate_log(&self.run_dir.join(LOSS_LOG), self.state.step)?;
        validation::truncate_log(&self.run_dir.join(VALIDATION_LOG), self.state.step)?;
        remove_later_grids(&self.run_dir.join(VALIDATION_DIR), self.state.step)?;
        while self.state.step < self.settings.max_steps {
            if stop.load(Ordering::SeqCst) {
                let checkpoint = self.save_checkpoint()?;
                return Ok(RunEnd::Interrupted { step: self.state.step, checkpoint });
            }
            let report = self.update()?;
            on_update(&report);
            let step = self.state.step;
            let every = self.settings.checkpointing_steps;
            if every > 0 && step.is_multiple_of(every) {
                self.save_checkpoint()?;
                self.write_loss_curve()?;
            }
            if let Some(v) = &self.validation {
                if v.every > 0 && step.is_multiple_of(v.every) {
                    self.validate()?;
                }
            }
        }
        if self.last_checkpoint != Some(self.state.step) {
            self.save_checkpoint()?;
        }
        self.write_loss_curve()?;
        self.save_result()?;
        Ok(RunEnd::Finished)
    }

    /// Writes `checkpoint-<step>` (skipped if it exists from this run already) and applies the retention limit.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let step = self.state.step;
        if self.last_checkpoint == Some(step) {
            let dir = resume::checkpoint_dir(&self.run_dir, step);
            if resume::verify(&dir).is_ok() {
                return Ok(dir);
            }
        }
        let controlnet = self.nets.controlnet_tensors()?;
        let decoder = self.nets.decoder_tensors()?;
        let (moments, steps) = self.optimizer.state();
        let saved = SavedState {
            state: self.state.clone(),
            optimizer: steps,
            settings: self.settings.clone(),
            dataset_len: self.feed.source.len(),
            shards: match &self.feed.source {
                Source::Stream(s) => Some(s.fingerprint()),
                Source::Folder(_) => None,
            },
            skipped: self.feed.skipped(),
        };
        let saved = serde_json::to_value(&saved).map_err(|e| Error::Invalid(e.to_string()))?;
        let cn_file = format!("{CK_CONTROLNET}/{}.safetensors", crate::io::weights::DIFFUSERS_STEM);
        let cn_config_file = format!("{CK_CONTROLNET}/config.json");
        let mut entries = vec![
            Entry::Tensors(&cn_file, &controlnet),
            Entry::Json(&cn_config_file, &self.nets.controlnet_config),
            Entry::Tensors(CK_OPTIMIZER, &moments),
            Entry::Json(CK_STATE, &saved),
        ];
        if self.settings.unlock_decoder {
            entries.push(Entry::Tensors(CK_UNET_DECODER, &decoder));
        }
        let dir = resume::save(&self.run_dir, step, &entries, self.settings.checkpoints_total_limit)?;
        self.last_checkpoint = Some(step);
        Ok(dir)
    }

    /// `RUN_DIR/controlnet` (and `RUN_DIR/unet` with an unlocked decoder): diffusers folders.
    pub fn save_result(&self) -> Result<PathBuf> {
        let out = self.run_dir.join(RESULT_DIR);
        files::write_diffusers_folder(&out, &self.nets.controlnet_config, &self.nets.controlnet_tensors()?)?;
        if let Some(all) = self.nets.unet_tensors()? {
            files::write_diffusers_folder(&self.run_dir.join(RESULT_UNET_DIR), &self.nets.unet_config, &all)?;
        }
        Ok(out)
    }

    /// Redraws `loss.png` from `loss.jsonl`.
    pub fn write_loss_curve(&self) -> Result<()> {
        let records = validation::read_loss_log(&self.run_dir.join(LOSS_LOG))?;
        crate::io::images::save_png(&self.run_dir.join(LOSS_CURVE), &validation::loss_curve(&records), &[])
    }

    /// Generates the validation pairs with the current weights: `validation/step-<N>.png` (one row per pair:
    /// the condition, then the images) and a line per pair in `validation.jsonl`. Returns the grid's path.
    pub fn validate(&mut self) -> Result<Option<PathBuf>> {
        let Some(v) = self.validation.clone() else { return Ok(None) };
        let (net, trained_unet) = self.nets.inference_copies(&self.device)?;
        let training_unet = trained_unet.map(|u| std::mem::replace(&mut self.sd.unet, u));
        let result = self.generate_validation(&v, &net);
        if let Some(u) = training_unet {
            self.sd.unet = u;
        }
        let (rows, records) = result?;
        let dir = self.run_dir.join(VALIDATION_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("step-{}.png", self.state.step));
        crate::io::images::save_png(&path, &validation::image_grid(&rows), &[])?;
        for r in &records {
            validation::append_jsonl(&self.run_dir.join(VALIDATION_LOG), r)?;
        }
        Ok(Some(path))
    }

    fn generate_validation(
        &self,
        v: &ValidationSettings,
        net: &ControlNetModel,
    ) -> Result<(Vec<Vec<image::RgbImage>>, Vec<ValidationRecord>)> {
        let r = self.settings.resolution;
        let mut rows = Vec::new();
        let mut records = Vec::new();
        for (cond_path, prompt) in &v.pairs {
            let cond_img = resize_center_crop(&crate::io::images::load_rgb(cond_path)?, r);
            let image = condition_tensor(&cond_img, self.feed.condition_channels, &self.device)?.unsqueeze(0)?;
            let control = Control::plain(net, image);
            let params = GenerateParams {
                scheduler: Some(SchedulerKind::UniPc.into()),
                num_images: v.num_images,
                ..GenerateParams::plain(
                    prompt.clone(),
                    r as usize,
                    r as usize,
                    v.inference_steps,
                    v.guidance,
                    self.settings.seed,
                )
            };
            let out = generate(&self.sd, &[control], &params, &mut |_, _| {})?;
            let fidelity: Vec<Fidelity> = if v.canny_fidelity {
                out.images.iter().map(|img| validation::canny_fidelity(img, &cond_img)).collect()
            } else {
                Vec::new()
            };
            let mut row = vec![cond_img];
            row.extend(out.images);
            rows.push(row);
            records.push(ValidationRecord {
                step: self.state.step,
                condition: cond_path.clone(),
                prompt: prompt.clone(),
                fidelity,
            });
        }
        Ok((rows, records))
    }
}

/// Removes `step-<N>.png` grids made after `step` (by a continuation that was abandoned for an earlier
/// checkpoint), so the folder and `validation.jsonl` tell the same history.
fn remove_later_grids(dir: &Path, step: u64) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let later = name.strip_prefix("step-").and_then(|n| n.strip_suffix(".png")).and_then(|n| n.parse::<u64>().ok());
        if later.is_some_and(|n| n > step) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;
    use crate::io::weights::read_json;
    use crate::model::unet::UNet2DConditionModel;
    use crate::train::init::{controlnet_from_unet, InitOptions};
    use crate::train::optimizer::AdamWConfig;
    use crate::train::stream::Fields;

    const TINY_SD15: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15");

    /// A small fill50k-style dataset: discs of different colours and places (targets) and their rings
    /// (conditions), 40×32 px so the resize and the crop both act.
    pub(crate) fn synthetic_dataset(dir: &Path, n: usize) -> PathBuf {
        std::fs::create_dir_all(dir.join("source")).unwrap();
        std::fs::create_dir_all(dir.join("target")).unwrap();
        let mut lines = String::new();
        for i in 0..n {
            let (cx, cy, r) = (12.0 + 4.0 * i as f32, 14.0 + 2.0 * (i % 3) as f32, 7.0 + (i % 2) as f32 * 2.0);
            let colour = [[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 200, 30]][i % 4];
            let dist = |x: u32, y: u32| ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            let target = image::RgbImage::from_fn(40, 32, |x, y| {
                image::Rgb(if dist(x, y) < r { colour } else { [235, 235, 235] })
            });
            let source = image::RgbImage::from_fn(40, 32, |x, y| {
                image::Rgb(if (dist(x, y) - r).abs() < 1.0 { [255; 3] } else { [0; 3] })
            });
            target.save(dir.join(format!("target/{i}.png"))).unwrap();
            source.save(dir.join(format!("source/{i}.png"))).unwrap();
            let colour_name = ["red", "green", "blue", "yellow"][i % 4];
            lines += &format!(
                "{{\"source\": \"source/{i}.png\", \"target\": \"target/{i}.png\", \"prompt\": \"a {colour_name} circle\"}}\n"
            );
        }
        std::fs::write(dir.join("prompt.json"), lines).unwrap();
        dir.to_path_buf()
    }

    pub(crate) fn settings() -> TrainSettings {
        TrainSettings {
            resolution: 32,
            batch_size: 2,
            max_steps: 4,
            seed: 3,
            adamw: AdamWConfig { lr: 1e-4, ..Default::default() },
            lr_warmup_steps: 1,
            checkpointing_steps: 0,
            ..Default::default()
        }
    }

    fn trainer(data: &Path, run_dir: &Path, settings: TrainSettings) -> Trainer {
        let sd =
            StableDiffusion::load(Path::new(TINY_SD15), settings.locked_dtype(&Device::Cpu), &Device::Cpu).unwrap();
        let unet_dir = Path::new(TINY_SD15).join("unet");
        let unet_config: Value = read_json(&unet_dir.join("config.json")).unwrap();
        let unet_tensors =
            candle_core::safetensors::load(unet_dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
        let new = controlnet_from_unet(&unet_config, &unet_tensors, &InitOptions::default()).unwrap();
        let unet = settings.unlock_decoder.then_some((unet_config, unet_tensors));
        Trainer::new(RunInputs {
            sd,
            unet,
            controlnet_config: new.config,
            controlnet: new.tensors,
            source: Source::open(data.to_str().unwrap(), Fields::defaults).unwrap(),
            settings,
            validation: None,
            run_dir: run_dir.to_path_buf(),
        })
        .unwrap()
    }

    /// Mixed precision (`dtype: bf16` / `f16`: the locked VAE, text encoder and UNet on half-precision weights):
    /// the losses and updates follow the f32 run's up to the weights' rounding (and, in bf16, the products'),
    /// and what trains (and is saved) stays f32.
    #[test]
    fn mixed_precision_follows_the_f32_run() {
        let tmp = tempfile::tempdir().unwrap();
        let data = synthetic_dataset(&tmp.path().join("data"), 3);
        let start = weights(&trainer(&data, &tmp.path().join("start"), settings()));
        let mut runs = Vec::new();
        for (dtype, locked) in
            [(ComputeDtype::F32, DType::F32), (ComputeDtype::Bf16, DType::BF16), (ComputeDtype::F16, DType::F16)]
        {
            let name = dtype.name();
            let dir = tmp.path().join(name);
            let mut t = trainer(&data, &dir, TrainSettings { dtype, ..settings() });
            assert_eq!(t.sd.unet.weights_dtype(), locked);
            assert_eq!(run(&mut t, None), RunEnd::Finished);
            let losses: Vec<f32> =
                validation::read_loss_log(&dir.join(LOSS_LOG)).unwrap().iter().map(|r| r.loss).collect();
            let saved = dir.join(RESULT_DIR).join(format!("{}.safetensors", crate::io::weights::DIFFUSERS_STEM));
            let saved = candle_core::safetensors::load(saved, &Device::Cpu).unwrap();
            assert!(saved.values().all(|t| t.dtype() == DType::F32), "{name}: the result is not f32");
            runs.push((losses, weights(&t)));
        }
        let (l32, w32) = &runs[0];
        // The update's direction against the f32 run's (weights now less at the start).
        let cosine = |w: &[(String, Vec<f32>)]| {
            let (mut dot, mut n16, mut n32) = (0f64, 0f64, 0f64);
            for (((_, s), (_, a)), (_, b)) in start.iter().zip(w).zip(w32) {
                for ((s, a), b) in s.iter().zip(a).zip(b) {
                    let (d16, d32) = ((a - s) as f64, (b - s) as f64);
                    (dot, n16, n32) = (dot + d16 * d32, n16 + d16 * d16, n32 + d32 * d32);
                }
            }
            assert!(n32 > 0.0, "the f32 run did not update");
            dot / (n16.sqrt() * n32.sqrt())
        };
        // bf16: the losses within 2 %. The updates point the same way, not closely: AdamW's steps are normalised
        // per weight, so weights whose gradients are near zero take full-size steps whose sign bf16's rounding
        // can flip (0.85-0.96 for equally valid kernel choices, e.g. with and without Winograd's convolutions);
        // unrelated updates of this many weights would be near 0.
        // f16: only the locked weights are rounded (11-bit significands, f32 products), so closer on both.
        for ((losses, w), (name, loss_tolerance, min_cosine)) in
            runs[1..].iter().zip([("bf16", 0.02, 0.8), ("f16", 0.002, 0.95)])
        {
            assert_eq!(losses.len(), l32.len());
            assert_ne!(losses, l32, "{name} gave the f32 losses bit for bit: its kernels did not run");
            for (a, b) in losses.iter().zip(l32) {
                assert!((a - b).abs() <= loss_tolerance * b.abs(), "losses {name} {losses:?} vs f32 {l32:?}");
            }
            let cosine = cosine(w);
            assert!(cosine > min_cosine, "{name}: update cosine {cosine}");
        }
    }

    /// An SDXL base trains: the objective gets the pooled text and size/crop ids, and an update changes the net.
    #[test]
    fn an_sdxl_base_trains() {
        let dir = tempfile::tempdir().unwrap();
        let data = synthetic_dataset(&dir.path().join("data"), 2);
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sdxl");
        let sd = StableDiffusion::load(Path::new(base), DType::F32, &Device::Cpu).unwrap();
        let unet_dir = Path::new(base).join("unet");
        let unet_config: Value = read_json(&unet_dir.join("config.json")).unwrap();
        let unet_tensors =
            candle_core::safetensors::load(unet_dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
        let new = controlnet_from_unet(&unet_config, &unet_tensors, &InitOptions::default()).unwrap();
        let mut t = Trainer::new(RunInputs {
            sd,
            unet: None,
            controlnet_config: new.config,
            controlnet: new.tensors,
            source: Source::open(data.to_str().unwrap(), Fields::defaults).unwrap(),
            settings: TrainSettings { lr_warmup_steps: 0, max_steps: 1, ..settings() },
            validation: None,
            run_dir: dir.path().join("run"),
        })
        .unwrap();
        let before = weights(&t);
        let mut losses = Vec::new();
        let end = t.run(&AtomicBool::new(false), &mut |r| losses.push(r.loss)).unwrap();
        assert!(matches!(end, RunEnd::Finished));
        assert_eq!(losses.len(), 1);
        assert!(losses[0].is_finite() && losses[0] > 0.0, "{losses:?}");
        assert_ne!(weights(&t), before, "one update changed nothing");
        assert!(dir.path().join("run/controlnet/config.json").is_file());
    }

    fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
        t.params()
            .snapshot()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect()
    }

    fn run(t: &mut Trainer, stop_after: Option<u64>) -> RunEnd {
        let stop = AtomicBool::new(false);
        t.run(&stop, &mut |r| {
            if Some(r.step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap()
    }

    /// 4 updates in one run equal: 1 update, Ctrl-C (checkpoint), resume, 3 more; and equal: checkpoints every
    /// update up to 3 with the newest one corrupted, resume (falls back to 2), 2 more. Bit for bit: weights and
    /// the logged losses.
    #[test]
    fn resumed_runs_equal_an_uninterrupted_one() {
        let tmp = tempfile::tempdir().unwrap();
        let data = synthetic_dataset(&tmp.path().join("data"), 3);
        let mut a = trainer(&data, &tmp.path().join("a"), settings());
        assert_eq!(run(&mut a, None), RunEnd::Finished);
        let want = weights(&a);
        let want_log = validation::read_loss_log(&tmp.path().join("a").join(LOSS_LOG)).unwrap();
        assert_eq!(want_log.len(), 4);
        // Epochs of 3 examples in batches of 2: the run crossed an epoch boundary.
        assert!(want_log.last().unwrap().epoch >= 1);

        // Interrupted after update 1, then resumed.
        let b_dir = tmp.path().join("b");
        let mut b = trainer(&data, &b_dir, settings());
        let RunEnd::Interrupted { step: 1, checkpoint } = run(&mut b, Some(1)) else { panic!("not interrupted") };
        let mut b = trainer(&data, &b_dir, settings());
        b.restore(&checkpoint).unwrap();
        assert_eq!(run(&mut b, None), RunEnd::Finished);
        assert!(weights(&b) == want, "resumed weights differ");
        assert_eq!(validation::read_loss_log(&b_dir.join(LOSS_LOG)).unwrap(), want_log);

        // Checkpoints every update, the newest corrupted: resume takes the one before.
        let c_dir = tmp.path().join("c");
        let mut c = trainer(&data, &c_dir, TrainSettings { max_steps: 3, checkpointing_steps: 1, ..settings() });
        run(&mut c, None);
        let bad = resume::checkpoint_dir(&c_dir, 3).join(CK_OPTIMIZER);
        let mut bytes = std::fs::read(&bad).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&bad, bytes).unwrap();
        let (found, skipped) = resume::latest_valid(&c_dir).unwrap();
        let (step, dir) = found.unwrap();
        assert_eq!((step, skipped.len()), (2, 1));
        let mut c = trainer(&data, &c_dir, settings());
        c.restore(&dir).unwrap();
        assert_eq!(run(&mut c, None), RunEnd::Finished);
        assert!(weights(&c) == want, "weights after falling back differ");
    }

    /// Streamed runs resumed mid-shard equal uninterrupted ones, bit for bit (weights and logged losses): WebDataset
    /// shards written here (read as files, and from a local HTTP server), and the parquet fixture `datasets` wrote
    /// (with its bad row skipped and reported). The
    /// checkpoint holds the epoch's seed and how many samples of it were taken; the shuffle buffer is replayed.
    #[test]
    fn streamed_runs_resume_mid_shard_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = crate::train::stream::tests::write_shards(&tmp.path().join("shards"), 2, 3);
        let parquet = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/shards/train.parquet");
        let cache = latent_cache(&synthetic_dataset(&tmp.path().join("folder"), 6), &tmp.path().join("cache"), 32);
        let server = crate::train::stream::tests::serve(&tmp.path().join("shards"), &[]);
        let http = format!("{}/train-{{00000..00001}}.tar", server.base);
        let cases =
            [("tar", tar.as_str(), 0), ("parquet", parquet, 1), ("latent cache", &cache, 0), ("http", &http, 0)];
        for (name, data, bad) in cases {
            // 2 shards of 3 (or 6 good rows) in batches of 2: epochs of 3 updates, so 4 cross into the second.
            let s = TrainSettings { shuffle_buffer: 2, data_workers: 2, ..settings() };
            let a_dir = tmp.path().join(format!("{name}-a"));
            let mut a = trainer(Path::new(data), &a_dir, s.clone());
            assert_eq!(run(&mut a, None), RunEnd::Finished);
            let want = weights(&a);
            let want_log = validation::read_loss_log(&a_dir.join(LOSS_LOG)).unwrap();
            assert_eq!(want_log.len(), 4);
            assert!(want_log.last().unwrap().epoch >= 1, "{name}: one epoch only");
            let skipped = a.skipped().unwrap();
            assert!(
                skipped.samples >= bad && (bad > 0 || skipped.samples == 0),
                "{name}: the bad row is skipped when its epoch reaches it: {:?}",
                skipped.lines
            );

            let b_dir = tmp.path().join(format!("{name}-b"));
            let mut b = trainer(Path::new(data), &b_dir, TrainSettings { data_workers: 1, ..s.clone() });
            let RunEnd::Interrupted { step: 1, checkpoint } = run(&mut b, Some(1)) else { panic!("not interrupted") };
            let state = files::read_json(&checkpoint, CK_STATE).unwrap();
            let taken = state["state"]["stream"]["taken"].as_u64().unwrap();
            assert!((2..=3).contains(&taken), "{name}: {taken} samples taken in update 1");
            assert!(state["state"]["stream"]["last"]["key"].is_string(), "{state}");
            let mut b = trainer(Path::new(data), &b_dir, s.clone());
            b.restore(&checkpoint).unwrap();
            assert_eq!(run(&mut b, None), RunEnd::Finished);
            assert!(weights(&b) == want, "{name}: resumed weights differ");
            assert_eq!(validation::read_loss_log(&b_dir.join(LOSS_LOG)).unwrap(), want_log, "{name}");
        }
        // A checkpoint of one dataset does not resume on another.
        let ck = resume::checkpoint_dir(&tmp.path().join("tar-b"), 1);
        let same = TrainSettings { shuffle_buffer: 2, ..settings() };
        let mut other = trainer(Path::new(parquet), &tmp.path().join("other"), same);
        let err = other.restore(&ck).unwrap_err().to_string();
        assert!(err.contains("dataset") && err.contains("train.parquet"), "{err}");
    }

    /// Two shards whose first sample is bad (an image that does not decode), the second cut short in its last
    /// sample: with a shuffle buffer of 1 the first update meets a bad sample. Returns their glob.
    pub(crate) fn shards_with_bad_samples(dir: &Path) -> String {
        use crate::train::stream::tests::{sample_members, write_tar};
        std::fs::create_dir_all(dir).unwrap();
        for s in 0..2 {
            let mut members = Vec::new();
            for j in 0..4 {
                let i = s * 4 + j;
                let mut sample = sample_members(&format!("{i:06}"), i);
                if j == 0 {
                    sample[0].1 = b"not an image".to_vec();
                }
                members.extend(sample);
            }
            let path = dir.join(format!("part-{s}.tar"));
            write_tar(&path, &members);
            if s == 1 {
                let bytes = std::fs::read(&path).unwrap();
                let last = bytes.windows(10).position(|w| w == b"000007.png").unwrap();
                std::fs::write(&path, &bytes[..last + 512 + 50]).unwrap();
            }
        }
        format!("{}/part-*.tar", dir.display())
    }

    /// The count of bad samples and damaged shards carries over a resume: the report after 1 update + Ctrl-C +
    /// resume + 3 equals the uninterrupted run's, which met bad samples before and after the checkpoint.
    #[test]
    fn skipped_samples_count_across_a_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let data = shards_with_bad_samples(&tmp.path().join("shards"));
        let s = TrainSettings { shuffle_buffer: 1, data_workers: 2, ..settings() };
        let mut a = trainer(Path::new(&data), &tmp.path().join("a"), s.clone());
        assert_eq!(run(&mut a, None), RunEnd::Finished);
        let want = a.skipped().unwrap();
        assert!(want.samples >= 3 && want.shards == 1, "{want:?}");

        let b_dir = tmp.path().join("b");
        let mut b = trainer(Path::new(&data), &b_dir, s.clone());
        let RunEnd::Interrupted { step: 1, checkpoint } = run(&mut b, Some(1)) else { panic!("not interrupted") };
        let before = b.skipped().unwrap();
        assert!(before.samples >= 1 && before.samples < want.samples, "{before:?}");
        let mut b = trainer(Path::new(&data), &b_dir, s);
        b.restore(&checkpoint).unwrap();
        assert_eq!(b.skipped().unwrap(), before, "the checkpoint's count is restored");
        assert_eq!(run(&mut b, None), RunEnd::Finished);
        assert_eq!(b.skipped().unwrap(), want);
        assert!(weights(&b) == weights(&a), "resumed weights differ");
    }

    /// `cache-latents` of a folder dataset, at `resolution`; returns the cache folder.
    fn latent_cache(data: &Path, dir: &Path, resolution: u32) -> String {
        let sd = StableDiffusion::load(Path::new(TINY_SD15), DType::F32, &Device::Cpu).unwrap();
        let source = Source::open(data.to_str().unwrap(), Fields::defaults).unwrap();
        let info = crate::train::latent_cache::write_cache(&sd, "tiny-sd15", &source, resolution, dir, 4, &mut |_| {})
            .unwrap();
        assert_eq!((info.shards, info.skipped), (source.len().div_ceil(4), 0));
        dir.to_str().unwrap().to_string()
    }

    /// Training from a latent cache equals training from its images: the same losses and weights (float
    /// tolerance) over 3 updates of a one-example dataset (so both read the same example each time, and every
    /// caption is kept); and a cache made at another resolution is refused.
    #[test]
    fn a_latent_cache_trains_as_its_images_do() {
        let tmp = tempfile::tempdir().unwrap();
        let data = synthetic_dataset(&tmp.path().join("data"), 1);
        let cache = latent_cache(&data, &tmp.path().join("cache"), 32);
        let s = TrainSettings { batch_size: 1, max_steps: 3, proportion_empty_prompts: 0.0, ..settings() };
        let mut from_images = trainer(&data, &tmp.path().join("a"), s.clone());
        let mut from_cache = trainer(Path::new(&cache), &tmp.path().join("b"), s.clone());
        let (mut want, mut got) = (Vec::new(), Vec::new());
        from_images.run(&AtomicBool::new(false), &mut |r| want.push(r.loss)).unwrap();
        from_cache.run(&AtomicBool::new(false), &mut |r| got.push(r.loss)).unwrap();
        assert_eq!(got.len(), 3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "losses {got:?} vs {want:?}");
        }
        for ((k, a), (_, b)) in weights(&from_cache).iter().zip(weights(&from_images).iter()) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5, "{k}: weights differ by {d}");
        }
        let sd = StableDiffusion::load(Path::new(TINY_SD15), DType::F32, &Device::Cpu).unwrap();
        let info = crate::train::latent_cache::LatentsInfo::read(Path::new(&cache)).unwrap();
        let err = info.check_fits(&sd, 64).unwrap_err().to_string();
        assert!(err.starts_with("resolution") && err.contains("made at 32"), "{err}");
    }

    /// A loss on fixed draws and a fixed batch (all examples, their captions) falls after 30 updates.
    #[test]
    fn loss_falls_on_a_small_dataset() {
        let tmp = tempfile::tempdir().unwrap();
        let data = synthetic_dataset(&tmp.path().join("data"), 4);
        let s = TrainSettings {
            max_steps: 30,
            batch_size: 4,
            adamw: AdamWConfig { lr: 2e-3, ..Default::default() },
            proportion_empty_prompts: 0.0,
            cache: true,
            ..settings()
        };
        let mut t = trainer(&data, &tmp.path().join("run"), s);
        t.fill_cache(&mut |_, _| {}).unwrap();
        let eval = |t: &Trainer| -> f32 {
            let idx: Vec<usize> = (0..4).collect();
            let examples = &t.feed.folder().unwrap().examples;
            let captions: Vec<String> = idx.iter().map(|&i| examples[i].captions[0].clone()).collect();
            let (posterior, text, cond) =
                t.feed.inputs(&t.sd, &crate::train::feed::Batch::Indices(idx), &captions).unwrap();
            let mut total = 0.0;
            for seed in 0..4 {
                let mut rng = TorchGenerator::new(100 + seed);
                let draws = Draws::draw(&mut rng, posterior.mean.dims(), 1000, &Device::Cpu).unwrap();
                let scaling = t.sd.vae.config().scaling_factor;
                let out = t
                    .objective
                    .loss(&t.nets.controlnet, &t.sd.unet, &posterior, scaling, &text.embeds, None, &cond, &draws)
                    .unwrap();
                total += out.loss.to_scalar::<f32>().unwrap();
            }
            total / 4.0
        };
        let before = eval(&t);
        run(&mut t, None);
        let after = eval(&t);
        eprintln!("fixed-draw loss: {before} -> {after}");
        assert!(after < 0.9 * before, "loss did not fall: {before} -> {after}");
        // The result is a diffusers ControlNet folder that loads.
        let out = tmp.path().join("run").join(RESULT_DIR);
        ControlNetModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        assert!(tmp.path().join("run").join(LOSS_CURVE).is_file());
    }

    /// `--unlock-decoder` trains the UNet's decoder (and writes it), `--only-mid-control` leaves the down zero
    /// convolutions untouched.
    #[test]
    fn unlocked_decoder_and_only_mid_control_train_what_they_say() {
        let tmp = tempfile::tempdir().unwrap();
        let data = synthetic_dataset(&tmp.path().join("data"), 2);
        let s = TrainSettings { max_steps: 2, unlock_decoder: true, only_mid_control: true, ..settings() };
        let mut t = trainer(&data, &tmp.path().join("run"), s);
        let before = t.params().snapshot().unwrap();
        assert!(before.keys().any(|k| k.starts_with("unet.up_blocks.")));
        assert!(!before.keys().any(|k| k.starts_with("unet.down_blocks.")));
        run(&mut t, None);
        let after = t.params().snapshot().unwrap();
        let changed = |k: &str| {
            let d: f32 = (&after[k] - &before[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            d > 0.0
        };
        assert!(changed("unet.conv_out.weight") && changed("controlnet_mid_block.weight"));
        assert!(!changed("controlnet_down_blocks.0.weight"), "only-mid-control trained a down zero convolution");
        let unet_out = tmp.path().join("run").join(RESULT_UNET_DIR);
        UNet2DConditionModel::load(&unet_out, DType::F32, &Device::Cpu).unwrap();
    }
}
