//! Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn): diffusers'
//! `HeunDiscreteScheduler`.
//!
//! Each interval sigma → sigma_next takes two model evaluations: an Euler predictor at sigma, then a corrector
//! at sigma_next that averages the two slopes. diffusers lays this out as a timestep list with every timestep
//! but the first repeated (`[t0, t1, t1, t2, t2, …]`, 2n − 1 evaluations for n steps); the step at the first
//! copy is the predictor, the one at the second copy the corrector. The last interval ends at sigma = 0, where
//! no corrector runs (it would divide by 0), so it is a plain Euler step.
use candle_core::Tensor;
use serde::Deserialize;

use super::euler::scale_model_input;
use super::k_schedule::{
    init_noise_sigma, k_schedule, predicted_x0, repeat_after_first, with_sd_beta_defaults, KConfig, RespacedTimesteps,
};
use super::schedule::{div, mul, PredictionType};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `HeunDiscreteScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HeunConfig {
    #[serde(flatten)]
    pub base: KConfig,
    /// Clamp the predicted x0 to ±`clip_sample_range`.
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
}

fn one() -> f64 {
    1.0
}

/// What the predictor leaves for the corrector.
struct Predictor {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

pub struct HeunScheduler {
    config: HeunConfig,
    /// `[t0, t1, t1, …]`: 2n − 1 entries.
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, …, s_{n-1}, s_{n-1}, 0]`: one per timestep plus the final 0, float32.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    /// Set between a predictor and its corrector (diffusers' `dt is not None`).
    pending: Option<Predictor>,
}

impl HeunScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::Heun;
        let config = with_sd_beta_defaults(config);
        let parsed: HeunConfig = config.parse(kind)?;
        let k = k_schedule(&config, kind, &parsed.base, num_inference_steps, RespacedTimesteps::Float32)?;
        let sigmas: Vec<f32> = k.sigmas.iter().map(|&s| s as f32).collect();
        let sigmas: Vec<f32> = repeat_after_first(&sigmas).into_iter().chain([0.0]).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.base.timestep_spacing);
        Ok(Self {
            timesteps: repeat_after_first(&k.timesteps),
            config: parsed,
            sigmas,
            init_noise_sigma,
            pending: None,
        })
    }

    pub fn config(&self) -> &HeunConfig {
        &self.config
    }
}

impl Scheduler for HeunScheduler {
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
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, "timesteps")?;
        // 1. Predictor (first order) from sigma to sigma_next, or the corrector evaluated at sigma_next.
        let predictor = self.pending.is_none();
        let (sigma, sigma_next) = if predictor {
            (self.sigmas[step_index], self.sigmas[step_index + 1])
        } else {
            (self.sigmas[step_index - 1], self.sigmas[step_index])
        };
        // 2. x0 at the sigma the model saw (no churn: sigma_hat = sigma).
        let sigma_input = if predictor { sigma } else { sigma_next };
        let x0 = predicted_x0(self.config.base.prediction_type, &model_output, &sample, sigma_input)?;
        let x0 = if self.config.clip_sample {
            let range = self.config.clip_sample_range as f32;
            x0.clamp(-range, range)?
        } else {
            x0
        };
        // 3. Euler predictor; the corrector averages its slope with the predictor's and restarts from the
        //    predictor's sample.
        let derivative = div(&(&sample - &x0)?, sigma_input)?;
        match self.pending.take() {
            None => {
                let dt = sigma_next - sigma;
                let prev_sample = (&sample + mul(&derivative, dt)?)?;
                self.pending = Some(Predictor { derivative, dt, sample });
                Ok(prev_sample)
            }
            Some(p) => {
                let derivative = div(&(&p.derivative + &derivative)?, 2.0)?;
                &p.sample + mul(&derivative, p.dt)?
            }
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        original + mul(noise, sigma)?
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.base.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Heun
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::Heun);
    }

    /// n steps run 2n − 1 model evaluations: every timestep but the first twice.
    #[test]
    fn every_timestep_but_the_first_runs_twice() {
        let cfg =
            SchedulerConfig::from_json_str(r#"{"timestep_spacing": "leading", "steps_offset": 1}"#, "h.json").unwrap();
        let s = HeunScheduler::new(&cfg, 4).unwrap();
        assert_eq!(s.timesteps(), [751.0, 501.0, 501.0, 251.0, 251.0, 1.0, 1.0]);
        assert_eq!(s.sigmas.len(), 8);
        assert_eq!(s.sigmas[7], 0.0);
    }
}
