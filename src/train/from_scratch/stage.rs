//! One optimisation stage of a from-scratch run: AdamW with warm-up and gradient clipping over the loss a stage
//! computes, checkpoints that resume exactly (weights, moments, generator, weight average), the loss log and
//! curve.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{Batches, StreamCheckpoint};
use super::settings::StageSettings;
use crate::rng::{GeneratorState, TorchGenerator};
use crate::train::ema::Ema;
use crate::train::files::{self, Entry};
use crate::train::optimizer::{warmup_lr, AdamW, AdamWConfig, AdamWSteps, Grads};
use crate::train::params::{Params, TensorMap};
use crate::train::resume;
use crate::train::stream::SkipReport;
use crate::train::trainer::{LOSS_CURVE, LOSS_LOG};
use crate::train::validation::{self, LossRecord};
use crate::{Error, Result};

/// Checkpoint files.
pub(super) const CK_PARAMS: &str = "params.safetensors";
const CK_OPTIMIZER: &str = "optimizer.safetensors";
pub(super) const CK_STATE: &str = "state.json";
pub(super) const CK_EMA: &str = "ema.safetensors";

/// Progress of a stage, after each step.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub stage: &'static str,
    pub step: u64,
    pub steps: u64,
    pub loss: f32,
    pub samples_per_second: f64,
    /// Sharded data: the bad samples and shards the stage skipped so far.
    pub skipped: Option<SkipReport>,
}

/// Where a stage is; saved in its checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StageState {
    pub step: u64,
    pub rng: GeneratorState,
    pub optimizer: AdamWSteps,
    pub settings: StageSettings,
    /// Updates of the weight average so far (None: no average kept).
    #[serde(default)]
    pub ema_updates: Option<u64>,
    /// Sharded data: where the stage is in it.
    #[serde(default)]
    pub stream: Option<StreamCheckpoint>,
}

/// The state of the newest valid checkpoint of the stage folder `dir`, if there is one.
pub(super) fn latest_state(dir: &Path) -> Result<Option<StageState>> {
    let (found, _) = resume::latest_valid(dir)?;
    let Some((_, dir)) = found else { return Ok(None) };
    let state =
        serde_json::from_value(files::read_json(&dir, CK_STATE)?).map_err(|e| Error::config(dir.join(CK_STATE), e))?;
    Ok(Some(state))
}

/// One optimisation stage: AdamW with warm-up and clipping over the loss `step` computes.
pub(super) struct Stage<'a> {
    pub name: &'static str,
    pub dir: PathBuf,
    pub settings: &'a StageSettings,
    pub seed: u64,
    pub checkpointing_steps: u64,
}

/// Global gradient norm clip, as the text-to-image scripts default to.
const MAX_GRAD_NORM: f64 = 1.0;

impl Stage<'_> {
    /// Runs to `settings.steps` (resuming from the newest valid checkpoint, `data` with it); the steps it took,
    /// or None when stopped.
    pub fn run(
        &self,
        params: &Params,
        stop: &AtomicBool,
        report: &mut dyn FnMut(&StageReport),
        data: &mut Batches,
        mut loss_of: impl FnMut(&mut TorchGenerator, &mut Batches) -> Result<Tensor>,
    ) -> Result<Option<u64>> {
        let adamw = AdamWConfig { lr: self.settings.learning_rate, weight_decay: 0.0, ..AdamWConfig::default() };
        let mut optimizer = AdamW::new(adamw);
        let mut rng = TorchGenerator::new(self.seed);
        let mut step = 0u64;
        let mut ema = None;
        let mut saved_at = None;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let log = self.dir.join(LOSS_LOG);
        let (found, skipped) = resume::latest_valid(&self.dir)?;
        for line in skipped {
            tracing::warn!("{line}");
        }
        if let Some((_, dir)) = found {
            let state: StageState = serde_json::from_value(files::read_json(&dir, CK_STATE)?)
                .map_err(|e| Error::config(dir.join(CK_STATE), e))?;
            // The step count may change (to extend or shorten a run), and an average may be started; what
            // shapes each step may not.
            let shape = |s: &StageSettings| StageSettings { steps: 0, ema_decay: None, ..s.clone() };
            if shape(&state.settings) != shape(self.settings) {
                return Err(Error::setting(
                    format!("{}_settings", self.name.replace('-', "_")),
                    format!(
                        "cannot resume the {} stage from {}: it was trained with {:?}, now {:?}",
                        self.name,
                        dir.display(),
                        state.settings,
                        self.settings
                    ),
                ));
            }
            params.load(&files::read_tensors(&dir, CK_PARAMS)?, &dir)?;
            let device = params.iter().next().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
            let moments = files::read_tensors(&dir, CK_OPTIMIZER)?
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&device)?)))
                .collect::<Result<TensorMap>>()?;
            optimizer = AdamW::from_state(&moments, &state.optimizer, &dir)?;
            optimizer.config = adamw;
            rng = TorchGenerator::from_state(&state.rng)?;
            data.restore(state.stream, self.name, &dir)?;
            step = state.step;
            saved_at = Some(step);
            if let (Some(decay), Some(updates)) = (self.settings.ema_decay, state.ema_updates) {
                let shadow = files::read_tensors(&dir, CK_EMA)?;
                ema = Some(Ema::from_state(params, decay, updates, shadow, &dir.join(CK_EMA))?);
            }
            validation::truncate_log(&log, step)?;
        } else if log.exists() {
            validation::truncate_log(&log, 0)?;
        }
        let first = step;
        // A new run, or a resumed one that kept no average, starts the average here.
        if let (None, Some(decay)) = (&ema, self.settings.ema_decay) {
            if step > 0 {
                tracing::info!("the {} stage starts its weight average at step {step}", self.name);
            }
            ema = Some(Ema::new(params, decay)?);
        }
        let save =
            |step: u64, optimizer: &AdamW, rng: &TorchGenerator, ema: Option<&Ema>, data: &Batches| -> Result<()> {
                let (moments, steps) = optimizer.state();
                let state = StageState {
                    step,
                    rng: rng.state(),
                    optimizer: steps,
                    settings: self.settings.clone(),
                    ema_updates: ema.map(Ema::updates),
                    stream: data.checkpoint(),
                };
                let state = serde_json::to_value(state).map_err(|e| Error::Invalid(e.to_string()))?;
                let snapshot = params.snapshot()?;
                let mut entries = vec![
                    Entry::Tensors(CK_PARAMS, &snapshot),
                    Entry::Tensors(CK_OPTIMIZER, &moments),
                    Entry::Json(CK_STATE, &state),
                ];
                if let Some(ema) = ema {
                    entries.push(Entry::Tensors(CK_EMA, ema.shadow()));
                }
                resume::save(&self.dir, step, &entries, Some(2))?;
                Ok(())
            };
        while step < self.settings.steps {
            if stop.load(Ordering::SeqCst) {
                save(step, &optimizer, &rng, ema.as_ref(), data)?;
                return Ok(None);
            }
            let started = Instant::now();
            let loss = loss_of(&mut rng, data)?;
            let value: f32 = loss.to_dtype(DType::F32)?.to_scalar()?;
            if !value.is_finite() {
                let setting = format!("{}_learning_rate", self.name.replace('-', "_"));
                return Err(Error::setting(
                    setting,
                    format!("the {} stage's loss is {value} at step {step}", self.name),
                ));
            }
            let mut grads = Grads::default();
            grads.accumulate(params, &loss.backward()?, 1.0)?;
            let grad_norm = grads.clip_norm(MAX_GRAD_NORM)?;
            let lr = warmup_lr(self.settings.learning_rate, self.settings.warmup_steps, step as usize);
            optimizer.step(params, &grads, lr)?;
            if let Some(ema) = ema.as_mut() {
                ema.update(params)?;
            }
            step += 1;
            validation::append_jsonl(&log, &LossRecord { step, loss: value, lr, grad_norm, epoch: 0 })?;
            let seconds = started.elapsed().as_secs_f64();
            report(&StageReport {
                stage: self.name,
                step,
                steps: self.settings.steps,
                loss: value,
                samples_per_second: self.settings.batch_size as f64 / seconds.max(1e-9),
                skipped: data.skipped(),
            });
            if self.checkpointing_steps > 0 && step.is_multiple_of(self.checkpointing_steps) {
                save(step, &optimizer, &rng, ema.as_ref(), data)?;
                saved_at = Some(step);
            }
        }
        // The last step is always checkpointed: it is the stage's record, and a longer run can go on from it.
        if saved_at != Some(step) {
            save(step, &optimizer, &rng, ema.as_ref(), data)?;
        }
        // What the caller writes out: the average, when one was kept.
        if let Some(ema) = &ema {
            params.load(ema.shadow(), &self.dir)?;
        }
        let records = validation::read_loss_log(&log)?;
        let curve = self.dir.join(LOSS_CURVE);
        crate::io::images::save_png(&curve, &validation::loss_curve(&records), &[])?;
        Ok(Some(step - first))
    }
}
