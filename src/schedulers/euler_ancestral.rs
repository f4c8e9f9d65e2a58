//! Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`): diffusers'
//! `EulerAncestralDiscreteScheduler`.
//!
//! Each step splits the move from sigma to sigma_next into a deterministic Euler step down to sigma_down and
//! fresh Gaussian noise of size sigma_up, with sigma_down² + sigma_up² = sigma_next². The noise comes from the
//! pipeline's generator, drawn at every step (also the last, where sigma_up = 0), as diffusers draws it.
use candle_core::Tensor;
use serde::Deserialize;

use super::euler::{init_noise_sigma, interpolated_sigmas, scale_model_input, v_prediction_to_x0};
use super::schedule::{div, f32_of, mul, BetaConfig, NoiseSchedule, PredictionType};
use super::timesteps::{check_steps, TimestepSpacing};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `EulerAncestralDiscreteScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct EulerAncestralConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default = "TimestepSpacing::linspace")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

pub struct EulerAncestralScheduler {
    config: EulerAncestralConfig,
    timesteps: Vec<f64>,
    /// One sigma per step plus a final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::EulerAncestral;
        let parsed: EulerAncestralConfig = config.parse(kind)?;
        if parsed.prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError at the first step.
            return Err(config.unsupported(kind, "prediction_type \"sample\""));
        }
        let schedule = NoiseSchedule::for_sigma_samplers(&parsed.betas, parsed.rescale_betas_zero_snr)?;
        check_steps(num_inference_steps, schedule.num_train_timesteps())?;
        let (timesteps, sigmas) =
            interpolated_sigmas(&schedule.sigmas(), parsed.timestep_spacing, num_inference_steps, parsed.steps_offset);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.timestep_spacing);
        Ok(Self { config: parsed, timesteps, sigmas, init_noise_sigma })
    }

    pub fn config(&self) -> &EulerAncestralConfig {
        &self.config
    }

    /// One step with the ancestral noise given explicitly (what [`Scheduler::step`] draws from the generator).
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = model_output.dtype();
        let (model_output, sample, noise) = (f32_of(model_output)?, f32_of(sample)?, f32_of(noise)?);
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        // 1. Denoised estimate x0.
        let pred_original_sample = match self.config.prediction_type {
            PredictionType::Epsilon => (&sample - mul(&model_output, sigma)?)?,
            PredictionType::VPrediction => v_prediction_to_x0(&model_output, &sample, sigma)?,
            PredictionType::Sample => {
                candle_core::bail!("euler-a does not support prediction_type sample")
            }
        };
        // 2. Split the move to sigma_next into a deterministic part (to sigma_down) and noise (sigma_up).
        let (sigma_from, sigma_to) = (sigma, self.sigmas[step_index + 1]);
        let sigma_up =
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        // 3. Euler step to sigma_down, then add the noise.
        let derivative = div(&(&sample - &pred_original_sample)?, sigma)?;
        let prev_sample = (&sample + mul(&derivative, sigma_down - sigma)?)?;
        (prev_sample + mul(&noise, sigma_up)?)?.to_dtype(dtype)
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        scale_model_input(sample, at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?)
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, "timesteps")?;
        // diffusers: randn_tensor(model_output.shape, generator) — torch's CPU randn, float32.
        let noise = rng.randn_tensor(model_output.dims(), model_output.device())?;
        self.step_with_noise(&model_output, step_index, &sample, &noise)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        original + mul(noise, sigma)?
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    /// Stepped with the noise diffusers drew (saved per step), see `step_with_noise`.
    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::EulerAncestral);
    }
}
