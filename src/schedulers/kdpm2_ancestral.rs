//! Ancestral DPM-Solver-2 (k-diffusion's `sample_dpm_2_ancestral`): diffusers'
//! `KDPM2AncestralDiscreteScheduler`.
//!
//! Like DPM2 (`kdpm2.rs`), but each interval aims at sigma_down instead of sigma_next and then adds fresh noise
//! of size sigma_up (sigma_down² + sigma_up² = sigma_next², as in Euler ancestral); the midpoint lies between
//! sigma and sigma_down. The noise is drawn from the pipeline's generator after the second evaluation of every
//! interval but the last (which ends at 0 in one evaluation).
use candle_core::Tensor;

use super::euler::scale_model_input;
use super::k_schedule::{
    init_noise_sigma, k_schedule, predicted_x0, with_sd_beta_defaults, KConfig, RespacedTimesteps,
};
use super::kdpm2::{interpolated_timestep, log_midpoint, refuse_sample_prediction, repeat_then_last};
use super::schedule::{div, mul, PredictionType};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

pub struct KDpm2AncestralScheduler {
    config: KConfig,
    /// `[t0, t_mid0, t1, t_mid1, …, t_{n-1}]`: 2n − 1 entries.
    timesteps: Vec<f64>,
    /// sigma, the midpoint, sigma_up and sigma_down per interval, in diffusers' `[v0, v1, v1, …, v_n, v_n]`
    /// layout (float32).
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f64,
    /// The sample at the start of the interval, kept between the two evaluations.
    first_order_sample: Option<Tensor>,
}

impl KDpm2AncestralScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::KDpm2Ancestral;
        let config = with_sd_beta_defaults(config);
        let parsed: KConfig = config.parse(kind)?;
        refuse_sample_prediction(&config, kind, parsed.prediction_type)?;
        let k = k_schedule(&config, kind, &parsed, num_inference_steps, RespacedTimesteps::RoundKarrasFloat64)?;
        let sigmas: Vec<f32> = k.sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        let n = sigmas.len();
        // 1. Split each move to the next sigma into a deterministic part (down) and noise (up).
        let next = |i: usize| if i + 1 < n { sigmas[i + 1] } else { 0.0 };
        let up: Vec<f32> = (0..n)
            .map(|i| (next(i) * next(i) * (sigmas[i] * sigmas[i] - next(i) * next(i)) / (sigmas[i] * sigmas[i])).sqrt())
            .collect();
        let mut down: Vec<f32> = (0..n).map(|i| (next(i) * next(i) - up[i] * up[i]).sqrt()).collect();
        down[n - 1] = 0.0;
        // 2. Midpoints in log-sigma between sigma and sigma_down; the last two are 0 (the final interval is a
        //    single Euler step to 0).
        let mut interpol: Vec<f32> = sigmas.iter().zip(&down).map(|(&s, &d)| log_midpoint(s, d)).collect();
        for v in interpol.iter_mut().skip(n.saturating_sub(2)) {
            *v = 0.0;
        }
        // 3. Timesteps: t0, then each midpoint's timestep before the next step's own.
        let mut timesteps = vec![k.timesteps[0]];
        for i in 1..k.timesteps.len() {
            timesteps.push(interpolated_timestep(interpol[i - 1], &k.log_sigmas, &parsed));
            timesteps.push(k.timesteps[i]);
        }
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.timestep_spacing);
        Ok(Self {
            config: parsed,
            timesteps,
            sigmas: repeat_then_last(&sigmas),
            sigmas_interpol: repeat_then_last(&interpol),
            sigmas_up: repeat_then_last(&up),
            sigmas_down: repeat_then_last(&down),
            init_noise_sigma,
            first_order_sample: None,
        })
    }

    pub fn config(&self) -> &KConfig {
        &self.config
    }
}

impl Scheduler for KDpm2AncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, "timesteps")?;
        let sigma = match self.first_order_sample {
            None => self.sigmas[step_index],
            // (step_index >= 1 here: a second evaluation follows a first)
            Some(_) => self.sigmas_interpol[step_index - 1],
        };
        scale_model_input(sample, sigma)
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, "timesteps")?;
        match self.first_order_sample.take() {
            // 1. First evaluation: Euler from sigma to the midpoint.
            None => {
                let (sigma, sigma_mid) = (self.sigmas[step_index], self.sigmas_interpol[step_index]);
                let x0 = predicted_x0(self.config.prediction_type, &model_output, &sample, sigma)?;
                let derivative = div(&(&sample - &x0)?, sigma)?;
                let prev_sample = (&sample + mul(&derivative, sigma_mid - sigma)?)?;
                self.first_order_sample = Some(sample);
                Ok(prev_sample)
            }
            // 2. At the midpoint: the interval's start carried to sigma_down, then noise of size sigma_up
            //    (diffusers: randn_tensor(model_output.shape, generator)).
            Some(start) => {
                let i = step_index - 1;
                let (sigma, sigma_mid) = (self.sigmas[i], self.sigmas_interpol[i]);
                let (sigma_up, sigma_down) = (self.sigmas_up[i], self.sigmas_down[i]);
                let x0 = predicted_x0(self.config.prediction_type, &model_output, &sample, sigma_mid)?;
                let derivative = div(&(&sample - &x0)?, sigma_mid)?;
                let prev_sample = (&start + mul(&derivative, sigma_down - sigma)?)?;
                let noise = rng.randn_tensor(model_output.dims(), model_output.device())?;
                prev_sample + mul(&noise, sigma_up)?
            }
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        original + mul(noise, sigma)?
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::KDpm2Ancestral
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    /// Noise drawn from a generator seeded like diffusers' (the rollout of `parity.rs`).
    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::KDpm2Ancestral);
    }
}
