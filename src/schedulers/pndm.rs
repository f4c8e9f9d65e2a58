//! PNDM's PLMS sampler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"):
//! diffusers' `PNDMScheduler` with `skip_prk_steps = true`, Stable Diffusion 1.5's default scheduler.
//!
//! PLMS is a linear multistep method: it combines the current and up to three earlier model outputs
//! (Adams–Bashforth coefficients) and applies the result with DDIM's transfer formula. Its warm-up evaluates
//! the model twice at the second timestep, so the timestep list has one entry more than the step count.
use candle_core::Tensor;
use serde::Deserialize;

use super::schedule::{div, f32_of, mul, BetaConfig, NoiseSchedule, PredictionType};
use super::timesteps::{check_steps, single_step_timesteps, TimestepSpacing};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `PNDMScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct PndmConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    /// Start with PLMS directly instead of 12 Runge–Kutta (PRK) warm-up evaluations; only `true` is
    /// implemented (every Stable Diffusion config sets it).
    #[serde(default)]
    pub skip_prk_steps: bool,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default = "TimestepSpacing::leading")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub steps_offset: usize,
}

pub struct PndmScheduler {
    config: PndmConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    step_ratio: i64,
    /// Model outputs of earlier steps (at most 4 kept), the "ets" of the paper.
    ets: Vec<Tensor>,
    /// Number of steps taken.
    counter: usize,
    /// The sample of the first step, which the second (warm-up) step restarts from.
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::Pndm;
        let parsed: PndmConfig = config.parse(kind)?;
        if !parsed.skip_prk_steps {
            return Err(crate::Error::config(
                &config.path,
                "PNDMScheduler: skip_prk_steps = false (the Runge-Kutta warm-up) is not supported; \
                 set \"skip_prk_steps\": true to sample with PLMS",
            ));
        }
        if parsed.prediction_type == PredictionType::Sample {
            return Err(config.unsupported(kind, "prediction_type \"sample\""));
        }
        let schedule = NoiseSchedule::new(&parsed.betas, false)?;
        let num_train = schedule.num_train_timesteps();
        check_steps(num_inference_steps, num_train)?;
        // Ascending inference timesteps, then PLMS order: descending with the second-to-last one repeated.
        let mut ascending =
            single_step_timesteps(parsed.timestep_spacing, num_train, num_inference_steps, parsed.steps_offset, true);
        ascending.reverse();
        let n = ascending.len();
        let mut plms: Vec<f64> = ascending[..n - 1].to_vec();
        if n >= 2 {
            plms.push(ascending[n - 2]);
        }
        plms.push(ascending[n - 1]);
        plms.reverse();
        let final_alpha_cumprod = if parsed.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Self {
            step_ratio: (num_train / num_inference_steps) as i64,
            config: parsed,
            schedule,
            final_alpha_cumprod,
            timesteps: plms,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
    }

    pub fn config(&self) -> &PndmConfig {
        &self.config
    }

    /// DDIM-style transfer from timestep `t` to `prev_t` given the (combined) noise prediction
    /// (PNDM paper, eq. 11; diffusers' `_get_prev_sample`).
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, model_output: &Tensor) -> candle_core::Result<Tensor> {
        if t < 0 {
            candle_core::bail!("PNDM timestep {t} is negative");
        }
        let alpha_prod_t = self.schedule.alpha_cumprod(t as usize)?;
        let alpha_prod_t_prev =
            if prev_t >= 0 { self.schedule.alpha_cumprod(prev_t as usize)? } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.config.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            // v → epsilon.
            PredictionType::VPrediction => {
                (mul(model_output, alpha_prod_t.sqrt())? + mul(sample, beta_prod_t.sqrt())?)?
            }
            PredictionType::Sample => {
                candle_core::bail!("PNDM does not support prediction_type sample")
            }
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt() + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let correction = div(&mul(&model_output, alpha_prod_t_prev - alpha_prod_t)?, denom)?;
        mul(sample, sample_coeff)? - correction
    }
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        let dtype = model_output.dtype();
        let (model_output, mut sample) = (f32_of(model_output)?, f32_of(sample)?);
        // 1. Where this step goes. The second step (counter 1) redoes the first transfer with the averaged
        //    output, so it runs from the first step's timestep to its own.
        let mut t = at(&self.timesteps, step_index, "timesteps")? as i64;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }

        // 2. Combine the model outputs (linear multistep, warming up from order 1 to 4).
        let e = &self.ets;
        let k = e.len();
        let combined = match (k, self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.clone());
                model_output
            }
            (1, 1) => {
                sample = self.cur_sample.take().unwrap_or(sample);
                div(&(&model_output + &e[0])?, 2.0)?
            }
            (2, _) => div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?,
            (3, _) => div(&((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?, 12.0)?,
            _ => {
                let sum = (((mul(&e[k - 1], 55.0)? - mul(&e[k - 2], 59.0)?)? + mul(&e[k - 3], 37.0)?)?
                    - mul(&e[k - 4], 9.0)?)?;
                mul(&sum, (1.0f64 / 24.0) as f32)?
            }
        };

        // 3. Transfer.
        let prev_sample = self.prev_sample(&sample, t, prev_t, &combined)?;
        self.counter += 1;
        prev_sample.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let t = at(&self.timesteps, step_index, "timesteps")? as usize;
        self.schedule.add_noise(original, noise, &[t])
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::Pndm);
    }

    /// SD2's DDIM config has no `skip_prk_steps`, so PNDM gets its own default (false): a clear error.
    #[test]
    fn prk_warm_up_is_rejected_clearly() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd2/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap();
        let err = PndmScheduler::new(&cfg, 10).err().unwrap().to_string();
        assert!(err.contains("scheduler_config.json") && err.contains("skip_prk_steps"), "{err}");
        assert!(PndmScheduler::new(&cfg.with("skip_prk_steps", true), 10).is_ok());
    }

    #[test]
    fn plms_repeats_the_second_timestep() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap();
        assert_eq!(PndmScheduler::new(&cfg, 1).unwrap().timesteps(), [1.0]);
        assert_eq!(PndmScheduler::new(&cfg, 2).unwrap().timesteps(), [501.0, 1.0, 1.0]);
    }
}
