//! The settings of a from-scratch run, with their defaults (the demo's recipe) and range checks.
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One training stage's optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSettings {
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Keep an exponential moving average of the weights with this decay (after warm-up) and write it out
    /// at the end instead of the last step's weights ([`super::ema`]). None: the raw weights.
    #[serde(default)]
    pub ema_decay: Option<f64>,
}

/// Everything that shapes a from-scratch run (saved as `RUN_DIR/base_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Images are resized and centre-cropped to this square size.
    pub resolution: u32,
    pub seed: u64,
    pub vae: StageSettings,
    /// The VAE trains on random square crops of this size (a multiple of 8, at most `resolution`): it is fully
    /// convolutional but for the middle attention, and smaller crops make its steps several times cheaper.
    pub vae_crop: u32,
    /// Weight of the KL term (per latent element) against the reconstruction MSE (per pixel).
    pub kl_weight: f64,
    /// The decoder alone, on the VAE's fixed latents (same crops; 0 steps: skipped).
    #[serde(default = "no_stage")]
    pub vae_decoder: StageSettings,
    pub unet: StageSettings,
    /// Share of captions replaced by "" (the unconditional half of classifier-free guidance).
    pub proportion_empty_prompts: f64,
    /// Checkpoint every this many steps (0: only when stopped).
    pub checkpointing_steps: u64,
    /// Train the text encoder with the UNet (false: it stays at its random initialisation).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Min-SNR loss weighting of the UNet stage (Hang et al. 2023, diffusers' `--snr_gamma`): each sample's
    /// MSE is weighted by min(SNR(t), γ)/SNR(t) (ε-prediction; /(SNR(t)+1) for v). It takes weight off the
    /// nearly clean timesteps, whose ε is hard to predict and dominates an unweighted loss but where the
    /// prompt hardly matters. None: unweighted.
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// Offset noise (diffusers' `--noise_offset`): `offset · N(0, 1)` per sample and channel is added to the
    /// noise. SD's schedule leaves √ᾱ ≈ 0.07 of the image at its noisiest timestep, so the noise's mean shows
    /// the image's mean colour during training; a model trained that way takes the background colour from the
    /// seed's noise rather than from the prompt. The offset hides it. 0: none.
    #[serde(default)]
    pub noise_offset: f64,
    /// Sharded data: samples the shuffle buffer holds (it shapes the order, so a started stage keeps it).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Sharded data: decoding threads (0: the cores but one); the order does not depend on it.
    #[serde(default)]
    pub data_workers: usize,
}

fn default_shuffle_buffer() -> usize {
    crate::train::stream::DEFAULT_SHUFFLE_BUFFER
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resolution: 128,
            seed: 0,
            vae: StageSettings { steps: 1500, batch_size: 8, learning_rate: 1e-3, warmup_steps: 50, ema_decay: None },
            vae_crop: 64,
            kl_weight: 1e-4,
            vae_decoder: StageSettings {
                steps: 1000,
                batch_size: 8,
                learning_rate: 1e-3,
                warmup_steps: 50,
                ema_decay: None,
            },
            unet: StageSettings {
                steps: 4000,
                batch_size: 32,
                learning_rate: 5e-4,
                warmup_steps: 100,
                ema_decay: Some(0.999),
            },
            proportion_empty_prompts: 0.1,
            checkpointing_steps: 250,
            train_text_encoder: true,
            snr_gamma: Some(5.0),
            noise_offset: 0.15,
            shuffle_buffer: default_shuffle_buffer(),
            data_workers: 0,
        }
    }
}

/// A stage that does not run (settings saved before the stage existed).
fn no_stage() -> StageSettings {
    StageSettings { steps: 0, batch_size: 1, learning_rate: 1e-3, warmup_steps: 0, ema_decay: None }
}

impl Settings {
    /// Checks ranges; errors name the setting (`vae_crop`, `unet_batch_size`).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: &str, m: String| Err(Error::setting(setting, m));
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad("resolution", format!("{} must be a positive multiple of 8", self.resolution));
        }
        if self.vae_crop == 0 || !self.vae_crop.is_multiple_of(8) || self.vae_crop > self.resolution {
            return bad(
                "vae_crop",
                format!("{} must be a multiple of 8 in [8, resolution {}]", self.vae_crop, self.resolution),
            );
        }
        for (stage, s) in self.stages() {
            if s.batch_size == 0 {
                return bad(&format!("{stage}_batch_size"), "must be at least 1".into());
            }
            if !(s.learning_rate.is_finite() && s.learning_rate > 0.0) {
                return bad(
                    &format!("{stage}_learning_rate"),
                    format!("{} must be a positive number", s.learning_rate),
                );
            }
            if let Some(d) = s.ema_decay.filter(|d| !(*d > 0.0 && *d < 1.0)) {
                return bad(&format!("{stage}_ema_decay"), format!("{d} must lie in (0, 1) (0 turns the average off)"));
            }
        }
        if !(0.0..=1.0).contains(&self.proportion_empty_prompts) {
            return bad("proportion_empty_prompts", format!("{} must lie in [0, 1]", self.proportion_empty_prompts));
        }
        if !(self.noise_offset.is_finite() && self.noise_offset >= 0.0) {
            return bad("noise_offset", format!("{} must be a number >= 0", self.noise_offset));
        }
        if let Some(g) = self.snr_gamma.filter(|g| !(g.is_finite() && *g > 0.0)) {
            return bad("snr_gamma", format!("{g} must be a positive number (0 turns the weighting off)"));
        }
        if self.shuffle_buffer == 0 {
            return bad("shuffle_buffer", "must be at least 1 (1 keeps each shard's order)".into());
        }
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return bad("kl_weight", format!("{} must be a number >= 0", self.kl_weight));
        }
        Ok(())
    }

    /// The three training stages' settings with their setting-name prefixes, in the order they run.
    pub fn stages(&self) -> [(&'static str, &StageSettings); 3] {
        [("vae", &self.vae), ("vae_decoder", &self.vae_decoder), ("unet", &self.unet)]
    }
}
