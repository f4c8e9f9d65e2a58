//! What shapes a ControlNet training run, with its defaults (diffusers' `train_controlnet.py`, the original's
//! learning rate and empty-prompt share), range checks, and what a resumed run may change; and the run's
//! validation (which conditions and prompts, how often).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::optimizer::AdamWConfig;
use crate::pipeline::request::ComputeDtype;
use crate::{Error, Result};

/// Everything that shapes the training trajectory, plus bookkeeping. Saved with each checkpoint; a resumed run
/// must agree on the fields [`TrainSettings::trajectory_mismatch`] compares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Images are resized and centre-cropped to this square size (a multiple of 8).
    pub resolution: u32,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Optimizer updates of the whole run.
    pub max_steps: u64,
    pub seed: u64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub lr_warmup_steps: usize,
    /// Share of captions replaced by "" (so the ControlNet learns to read the condition alone).
    pub proportion_empty_prompts: f64,
    pub unlock_decoder: bool,
    pub only_mid_control: bool,
    /// Keep VAE posteriors, conditions and text embeddings in memory.
    pub cache: bool,
    /// Save a checkpoint every this many updates (0: only at the end and on Ctrl-C).
    pub checkpointing_steps: u64,
    /// Keep only the newest checkpoints.
    pub checkpoints_total_limit: Option<usize>,
    /// Streamed (sharded) data: samples the shuffle buffer holds (1: samples in shard order).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Streamed data: decoding threads (0: the cores but one, at most 8). The order does not depend on it.
    #[serde(default)]
    pub data_workers: usize,
    /// Mixed precision (diffusers' `--mixed_precision`): `bf16` keeps the locked models (VAE, text encoder,
    /// UNet) in bf16 weights on the bf16 kernels; the trained ControlNet, its gradients and AdamW's moments stay
    /// f32. `f16` keeps the locked models in f16 weights with f32 activations and products on the CPU: no
    /// gradient is ever held in f16, so there is nothing for a loss scale to guard. `auto`: bf16 where the CPU
    /// multiplies bf16 natively. See [`Self::locked_dtype`].
    #[serde(default)]
    pub dtype: ComputeDtype,
}

fn default_shuffle_buffer() -> usize {
    super::stream::DEFAULT_SHUFFLE_BUFFER
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            resolution: 512,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            max_steps: 1000,
            seed: 0,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            lr_warmup_steps: 0,
            proportion_empty_prompts: 0.5,
            unlock_decoder: false,
            only_mid_control: false,
            cache: false,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            shuffle_buffer: default_shuffle_buffer(),
            data_workers: 0,
            dtype: ComputeDtype::F32,
        }
    }
}

impl TrainSettings {
    /// Checks ranges; errors name the setting (`batch_size`, `learning_rate`).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: &str, m: String| Err(Error::setting(setting, m));
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad("resolution", format!("{} must be a positive multiple of 8", self.resolution));
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.proportion_empty_prompts) {
            return bad("proportion_empty_prompts", format!("{} must lie in [0, 1]", self.proportion_empty_prompts));
        }
        if !(self.adamw.lr.is_finite() && self.adamw.lr >= 0.0) {
            return bad("learning_rate", format!("{} must be a finite number >= 0", self.adamw.lr));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return bad("max_grad_norm", format!("{} must be positive", self.max_grad_norm));
        }
        if self.shuffle_buffer == 0 {
            return bad("shuffle_buffer", "must be at least 1 (1: no sample shuffling)".into());
        }
        if matches!(self.dtype, ComputeDtype::Bf16 | ComputeDtype::F16) && self.unlock_decoder {
            let name = self.dtype.name();
            return bad(
                "dtype",
                format!(
                    "{name} keeps the locked UNet in {name}, but an unlocked decoder trains in f32 inside it: use \
                     f32 with --unlock-decoder"
                ),
            );
        }
        Ok(())
    }

    /// The dtype the locked models are loaded in on `device`: bf16 for mixed precision (`auto`: where the CPU
    /// has bf16 dot products, or on a GPU), f32 otherwise and with an unlocked decoder (whose trained f32
    /// weights sit inside the UNet).
    pub fn locked_dtype(&self, device: &candle_core::Device) -> candle_core::DType {
        match self.dtype {
            ComputeDtype::Auto if self.unlock_decoder => candle_core::DType::F32,
            other => other.resolve(device),
        }
    }

    /// Every setting by its name, as text: what [`Self::changes`] and [`Self::trajectory_mismatch`] compare.
    fn named(&self) -> [(&'static str, String, bool); 21] {
        let a = &self.adamw;
        // (name, value, whether it shapes the trajectory)
        [
            ("resolution", self.resolution.to_string(), true),
            ("batch_size", self.batch_size.to_string(), true),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps.to_string(), true),
            ("seed", self.seed.to_string(), true),
            ("learning_rate", a.lr.to_string(), true),
            ("adam_beta1", a.beta1.to_string(), true),
            ("adam_beta2", a.beta2.to_string(), true),
            ("adam_epsilon", a.eps.to_string(), true),
            ("adam_weight_decay", a.weight_decay.to_string(), true),
            ("max_grad_norm", self.max_grad_norm.to_string(), true),
            ("lr_warmup_steps", self.lr_warmup_steps.to_string(), true),
            ("proportion_empty_prompts", self.proportion_empty_prompts.to_string(), true),
            ("unlock_decoder", self.unlock_decoder.to_string(), true),
            ("only_mid_control", self.only_mid_control.to_string(), true),
            ("shuffle_buffer", self.shuffle_buffer.to_string(), true),
            ("max_steps", self.max_steps.to_string(), false),
            ("cache", self.cache.to_string(), false),
            ("checkpointing_steps", self.checkpointing_steps.to_string(), false),
            ("checkpoints_total_limit", format!("{:?}", self.checkpoints_total_limit), false),
            ("data_workers", self.data_workers.to_string(), false),
            // Rounding only: a run may resume in another precision (as diffusers' may).
            ("dtype", self.dtype.name().to_string(), false),
        ]
    }

    /// The settings that differ from `saved`'s: (name, now, then).
    pub fn changes(&self, saved: &TrainSettings) -> Vec<(&'static str, String, String)> {
        self.named()
            .into_iter()
            .zip(saved.named())
            .filter(|((_, now, _), (_, then, _))| now != then)
            .map(|((name, now, _), (_, then, _))| (name, now, then))
            .collect()
    }

    /// The first setting a resumed run changed that would change the trajectory, as an error naming it.
    pub fn trajectory_mismatch(&self, saved: &TrainSettings) -> Option<Error> {
        let shapes: Vec<&str> = self.named().iter().filter(|(_, _, t)| *t).map(|(n, _, _)| *n).collect();
        self.changes(saved).into_iter().find(|(name, _, _)| shapes.contains(name)).map(|(name, now, then)| {
            Error::setting(
                name,
                format!(
                    "{now} differs from the {then} the checkpoint was trained with; it shapes every update, so a \
                     resumed run keeps it (start a new run to change it)"
                ),
            )
        })
    }
}

/// Validation: (condition image, prompt) pairs generated every `every` updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationSettings {
    pub pairs: Vec<(PathBuf, String)>,
    pub every: u64,
    pub num_images: usize,
    pub inference_steps: usize,
    pub guidance: f64,
    /// Score each image with the canny fidelity (for edge conditions).
    pub canny_fidelity: bool,
}

impl ValidationSettings {
    /// diffusers' pairing of `--validation_image`s and `--validation_prompt`s: as many of each, or one of either
    /// for all of the other. Defaults for the rest: every 100 updates, one image of 20 UniPC steps at guidance
    /// 7.5, no fidelity score.
    pub fn pair(images: &[PathBuf], prompts: &[String]) -> Result<Option<Self>> {
        if images.is_empty() && prompts.is_empty() {
            return Ok(None);
        }
        let pairs: Vec<(PathBuf, String)> = if images.len() == prompts.len() {
            images.iter().cloned().zip(prompts.iter().cloned()).collect()
        } else if images.len() == 1 {
            prompts.iter().map(|p| (images[0].clone(), p.clone())).collect()
        } else if prompts.len() == 1 {
            images.iter().map(|i| (i.clone(), prompts[0].clone())).collect()
        } else {
            return Err(Error::setting(
                if images.is_empty() { "validation_image" } else { "validation_prompt" },
                format!(
                    "{} validation images and {} prompts: give as many of each, or one of either for all of the other",
                    images.len(),
                    prompts.len()
                ),
            ));
        };
        if pairs.is_empty() {
            let missing = if images.is_empty() { "validation_image" } else { "validation_prompt" };
            return Err(Error::setting(missing, "validation needs both images and prompts"));
        }
        Ok(Some(Self { pairs, ..Self::default() }))
    }

    /// Checks ranges and that every condition image reads.
    pub fn validate(&self) -> Result<()> {
        if self.num_images == 0 {
            return Err(Error::setting("num_validation_images", "must be at least 1"));
        }
        if self.inference_steps == 0 {
            return Err(Error::setting("validation_inference_steps", "must be at least 1"));
        }
        for (image, _) in &self.pairs {
            crate::io::images::load_rgb(image).map_err(|e| Error::setting("validation_image", e))?;
        }
        Ok(())
    }
}

impl Default for ValidationSettings {
    fn default() -> Self {
        Self { pairs: Vec::new(), every: 100, num_images: 1, inference_steps: 20, guidance: 7.5, canny_fidelity: false }
    }
}

/// A score of validation images against their condition, by name (`canny`: edge F1 of the re-annotated image).
pub fn fidelity_by_name(name: &str) -> Result<bool> {
    match name {
        "canny" => Ok(true),
        other => Err(Error::setting("fidelity", format!("{other}: only canny is implemented"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_what_shapes_the_trajectory() {
        let saved = TrainSettings::default();
        let longer = TrainSettings { max_steps: 2000, cache: true, ..saved.clone() };
        assert!(longer.trajectory_mismatch(&saved).is_none());
        let names: Vec<&str> = longer.changes(&saved).iter().map(|(n, _, _)| *n).collect();
        assert_eq!(names, ["max_steps", "cache"]);
        let other = TrainSettings { adamw: AdamWConfig { beta2: 0.99, ..saved.adamw }, ..saved.clone() };
        match other.trajectory_mismatch(&saved) {
            Some(Error::Setting { setting, msg }) => assert!(setting == "adam_beta2" && msg.contains("0.999"), "{msg}"),
            e => panic!("{e:?}"),
        }
    }

    /// Mixed precision: bf16 and f16 load the locked models in their dtype; either with an unlocked decoder is
    /// refused naming the setting; `auto` never refuses; a checkpoint saved before the setting existed reads as
    /// f32.
    #[test]
    fn mixed_precision_settings() {
        let cpu = candle_core::Device::Cpu;
        let bf16 = TrainSettings { dtype: ComputeDtype::Bf16, ..TrainSettings::default() };
        assert!(bf16.validate().is_ok());
        assert_eq!(bf16.locked_dtype(&cpu), candle_core::DType::BF16);
        assert_eq!(TrainSettings::default().locked_dtype(&cpu), candle_core::DType::F32);
        let f16 = TrainSettings { dtype: ComputeDtype::F16, ..TrainSettings::default() };
        assert!(f16.validate().is_ok());
        assert_eq!(f16.locked_dtype(&cpu), candle_core::DType::F16);
        let unlocked = TrainSettings { unlock_decoder: true, ..bf16.clone() };
        for bad in [unlocked.clone(), TrainSettings { unlock_decoder: true, ..f16 }] {
            match bad.validate() {
                Err(Error::Setting { setting, msg }) => assert!(setting == "dtype" && msg.contains("decoder"), "{msg}"),
                other => panic!("{other:?}"),
            }
        }
        let auto = TrainSettings { dtype: ComputeDtype::Auto, ..unlocked };
        assert!(auto.validate().is_ok());
        assert_eq!(auto.locked_dtype(&cpu), candle_core::DType::F32);
        // A resumed run may change the precision (it only rounds differently).
        assert!(bf16.trajectory_mismatch(&TrainSettings::default()).is_none());
        let mut old = serde_json::to_value(TrainSettings::default()).unwrap();
        old.as_object_mut().unwrap().remove("dtype");
        let read: TrainSettings = serde_json::from_value(old).unwrap();
        assert_eq!(read.dtype, ComputeDtype::F32);
        assert_eq!(serde_json::to_value(&bf16).unwrap()["dtype"], "bf16");
    }

    #[test]
    fn validation_pairs_as_diffusers_does() {
        let (a, b) = (PathBuf::from("a.png"), PathBuf::from("b.png"));
        let p = |s: &str| s.to_string();
        let v = ValidationSettings::pair(std::slice::from_ref(&a), &[p("x"), p("y")]).unwrap().unwrap();
        assert_eq!(v.pairs, [(a.clone(), p("x")), (a.clone(), p("y"))]);
        assert!(ValidationSettings::pair(&[], &[]).unwrap().is_none());
        let err = ValidationSettings::pair(&[a.clone(), b], &[p("x"), p("y"), p("z")]).unwrap_err();
        assert!(matches!(err, Error::Setting { .. }), "{err}");
        let err = ValidationSettings::pair(&[a], &[]).unwrap_err().to_string();
        assert!(err.starts_with("validation_prompt"), "{err}");
    }
}
