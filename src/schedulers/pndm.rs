//! PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): diffusers'
//! `PNDMScheduler`, Stable Diffusion 1.5's default scheduler.
//!
//! PLMS is a linear multistep method: it combines the current and up to three earlier model outputs
//! (Adams–Bashforth coefficients) and applies the result with DDIM's transfer formula. It needs earlier outputs,
//! so it warms up one of two ways:
//! - `skip_prk_steps = true` (every SD1.x config): the model is evaluated twice at the second timestep, so the
//!   timestep list has one entry more than the step count;
//! - `skip_prk_steps = false` (the class default, so a DDIM config sampled with PNDM): three pseudo Runge–Kutta
//!   (PRK) steps over the first three intervals, four model evaluations each (at t, twice at the midpoint, at
//!   t − δ; weights 1/6, 1/3, 1/3, 1/6), then PLMS with four outputs already at hand: 12 + (steps − 3) timesteps.
use candle_core::Tensor;
use serde::Deserialize;

use super::schedule::{div, mul, BetaConfig, NoiseSchedule, PredictionType};
use super::timesteps::{check_in_range, check_steps, single_step_timesteps, TimestepSpacing};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `PNDMScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct PndmConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    /// Start with PLMS directly instead of 12 Runge–Kutta (PRK) warm-up evaluations (every Stable Diffusion
    /// config sets it; the class default is the warm-up).
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
    /// The sample that the second PLMS warm-up step, or each stage of a PRK step, restarts from.
    cur_sample: Option<Tensor>,
    /// How many of `timesteps` are PRK warm-up steps (0 with `skip_prk_steps`).
    prk_steps: usize,
    /// Half a step (diffusers' `num_train_timesteps // steps // 2`): a PRK step's midpoint.
    half_step: i64,
    /// The weighted model outputs of the current PRK step so far.
    cur_model_output: Option<Tensor>,
}

/// Steps needed by the PRK warm-up: it spans the first three intervals, four timesteps.
const PRK_MIN_STEPS: usize = 4;

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::Pndm;
        let parsed: PndmConfig = config.parse(kind)?;
        if parsed.prediction_type == PredictionType::Sample {
            return Err(config.unsupported(kind, "prediction_type \"sample\""));
        }
        let schedule = NoiseSchedule::new(&parsed.betas, false)?;
        let num_train = schedule.num_train_timesteps();
        check_steps(num_inference_steps, num_train)?;
        if !parsed.skip_prk_steps && num_inference_steps < PRK_MIN_STEPS {
            return Err(crate::Error::setting(
                "steps",
                format!(
                    "PNDM's Runge-Kutta warm-up (skip_prk_steps = false in {}) needs at least {PRK_MIN_STEPS} steps, \
                     got {num_inference_steps}",
                    config.path.display()
                ),
            ));
        }
        let half_step = (num_train / num_inference_steps / 2) as i64;
        // Ascending inference timesteps (diffusers' `_timesteps`).
        let mut ascending =
            single_step_timesteps(parsed.timestep_spacing, num_train, num_inference_steps, parsed.steps_offset, true);
        check_in_range(&ascending, num_train, parsed.steps_offset, &config.path)?;
        ascending.reverse();
        let n = ascending.len();
        let (prk, plms) = if parsed.skip_prk_steps {
            // PLMS order: descending with the second-to-last one repeated.
            let mut plms: Vec<f64> = ascending[..n - 1].to_vec();
            if n >= 2 {
                plms.push(ascending[n - 2]);
            }
            plms.push(ascending[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            (
                prk_timesteps(&ascending[n - PRK_MIN_STEPS..], half_step as f64),
                ascending[..n - 3].iter().rev().copied().collect(),
            )
        };
        let final_alpha_cumprod = if parsed.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Self {
            step_ratio: (num_train / num_inference_steps) as i64,
            config: parsed,
            schedule,
            final_alpha_cumprod,
            prk_steps: prk.len(),
            timesteps: [prk, plms].concat(),
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
            half_step,
            cur_model_output: None,
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

    /// One stage of a pseudo Runge–Kutta step (diffusers' `step_prk`). Stages 0–2 move from the step's start
    /// sample with the current output alone (to t − δ/2, t − δ/2, t − δ); stage 3 uses the weighted sum
    /// (1/6, 1/3, 1/3, 1/6) of the four outputs, like classic RK4.
    fn step_prk(&mut self, model_output: Tensor, t: i64, sample: Tensor) -> candle_core::Result<Tensor> {
        let stage = self.counter % 4;
        let prev_t = if self.counter % 2 == 1 { t } else { t - self.half_step };
        let start_t = at(&self.timesteps, self.counter / 4 * 4, "timesteps")? as i64;
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let output = match (stage, self.cur_model_output.take()) {
            (0, _) => {
                self.cur_model_output = Some(mul(&model_output, sixth)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            (1 | 2, Some(sum)) => {
                self.cur_model_output = Some((sum + mul(&model_output, third)?)?);
                model_output
            }
            (3, Some(sum)) => (sum + mul(&model_output, sixth)?)?,
            _ => candle_core::bail!("PNDM Runge-Kutta stage {stage} without the stages before it"),
        };
        let start = self.cur_sample.clone().unwrap_or(sample);
        self.prev_sample(&start, start_t, prev_t, &output)
    }

    /// One linear multistep step (diffusers' `step_plms`).
    fn step_plms(&mut self, model_output: Tensor, t: i64, mut sample: Tensor) -> candle_core::Result<Tensor> {
        // 1. Where this step goes. The second step (counter 1) redoes the first transfer with the averaged
        //    output, so it runs from the first step's timestep to its own.
        let mut t = t;
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
        self.prev_sample(&sample, t, prev_t, &combined)
    }
}

/// The PRK warm-up's timesteps from the last four ascending timesteps [a, b, c, d] (diffusers' `prk_timesteps`):
/// each interval's start, its midpoint twice, and its end: d, c+h, c+h, c, c, b+h, b+h, b, b, a+h, a+h, a.
fn prk_timesteps(last: &[f64], half_step: f64) -> Vec<f64> {
    let mut with_midpoints: Vec<f64> = last.iter().flat_map(|&t| [t, t + half_step]).collect();
    with_midpoints.pop();
    let doubled: Vec<f64> = with_midpoints.iter().flat_map(|&t| [t, t]).collect();
    doubled[1..doubled.len() - 1].iter().rev().copied().collect()
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        let t = at(&self.timesteps, step_index, "timesteps")? as i64;
        let prev_sample = if self.counter < self.prk_steps {
            self.step_prk(model_output, t, sample)?
        } else {
            self.step_plms(model_output, t, sample)?
        };
        self.counter += 1;
        Ok(prev_sample)
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

    /// SD2's DDIM config has no `skip_prk_steps`, so PNDM gets its own default (false): the PRK warm-up, three
    /// Runge–Kutta steps of four evaluations (start, midpoint twice, end), then PLMS.
    #[test]
    fn prk_warm_up_runs_three_runge_kutta_steps_first() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd2/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap();
        // Leading spacing, offset 1: [751, 501, 251, 1] with midpoints 125 below each start.
        let prk = [751.0, 626.0, 626.0, 501.0, 501.0, 376.0, 376.0, 251.0, 251.0, 126.0, 126.0, 1.0];
        let s = PndmScheduler::new(&cfg, 4).unwrap();
        assert_eq!(s.timesteps(), [&prk[..], &[1.0]].concat());
        assert_eq!(PndmScheduler::new(&cfg, 10).unwrap().timesteps().len(), 12 + 7);
        let err = PndmScheduler::new(&cfg, 3).err().unwrap().to_string();
        assert!(err.starts_with("steps:") && err.contains("at least 4") && err.contains("got 3"), "{err}");
        assert_eq!(PndmScheduler::new(&cfg.with("skip_prk_steps", true), 4).unwrap().timesteps().len(), 5);
    }

    #[test]
    fn plms_repeats_the_second_timestep() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap();
        assert_eq!(PndmScheduler::new(&cfg, 1).unwrap().timesteps(), [1.0]);
        assert_eq!(PndmScheduler::new(&cfg, 2).unwrap().timesteps(), [501.0, 1.0, 1.0]);
    }

    /// SD's PNDM config ("leading", steps_offset 1) cannot take 1000 steps either: the error names the steps.
    #[test]
    fn too_many_steps_for_the_offset_name_the_steps() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"timestep_spacing": "leading", "steps_offset": 1, "skip_prk_steps": true}"#,
            "s.json",
        )
        .unwrap();
        let err = PndmScheduler::new(&cfg, 1000).err().unwrap();
        assert!(matches!(&err, crate::Error::Setting { setting, .. } if setting == "steps"), "{err}");
        assert!(err.to_string().contains("timestep 1000"), "{err}");
        assert!(PndmScheduler::new(&cfg, 999).is_ok());
    }
}
