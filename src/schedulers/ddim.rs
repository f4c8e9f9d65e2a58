//! DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models"): diffusers' `DDIMScheduler`, SD2.1's default.
//!
//! Each step predicts x0 and the noise from the model output, then re-noises x0 to the previous timestep's
//! level along the predicted noise direction. With eta > 0 (the pipeline's `eta=`, [`Scheduler::set_eta`]) part
//! of that noise is fresh, drawn from the pipeline's generator after every step: eta = 1 is DDPM-like
//! ancestral sampling, eta = 0 (the default) deterministic.
use candle_core::Tensor;
use serde::Deserialize;

use super::schedule::{div, mul, BetaConfig, NoiseSchedule, PredictionType};
use super::timesteps::{check_in_range, check_steps, single_step_timesteps, TimestepSpacing};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `DDIMScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct DdimConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    /// Clamp the predicted x0 to ±`clip_sample_range` (pixel-space models; SD configs set it false).
    #[serde(default = "yes")]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    /// The cumulative alpha "before" the first timestep: 1 (a clean image) or `alphas_cumprod[0]`.
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (Imagen); not implemented, unsuitable for latent diffusion anyway.
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "TimestepSpacing::leading")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

pub struct DdimScheduler {
    config: DdimConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    /// `num_train_timesteps / num_inference_steps`: how far back each step goes (whatever the spacing).
    step_ratio: usize,
    /// DDIM's eta (eq. 16): the share of fresh noise; 0 = deterministic.
    eta: f32,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::Ddim;
        let parsed: DdimConfig = config.parse(kind)?;
        if parsed.thresholding {
            return Err(config.unsupported(kind, "thresholding"));
        }
        let schedule = NoiseSchedule::new(&parsed.betas, parsed.rescale_betas_zero_snr)?;
        let num_train = schedule.num_train_timesteps();
        check_steps(num_inference_steps, num_train)?;
        let timesteps =
            single_step_timesteps(parsed.timestep_spacing, num_train, num_inference_steps, parsed.steps_offset, true);
        check_in_range(&timesteps, num_train, parsed.steps_offset, &config.path)?;
        let final_alpha_cumprod = if parsed.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Self {
            step_ratio: num_train / num_inference_steps,
            config: parsed,
            schedule,
            final_alpha_cumprod,
            timesteps,
            eta: 0.0,
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// The cumulative alpha at `t`, or the final one for the step past t = 0.
    fn alpha_cumprod_or_final(&self, t: i64) -> candle_core::Result<f32> {
        if t >= 0 {
            self.schedule.alpha_cumprod(t as usize)
        } else {
            Ok(self.final_alpha_cumprod)
        }
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        // 1. The timestep and the previous one (DDIM eq. 12).
        let t = at(&self.timesteps, step_index, "timesteps")? as i64;
        let prev_t = t - self.step_ratio as i64;
        let alpha_prod_t = self.schedule.alpha_cumprod(t as usize)?;
        let alpha_prod_t_prev = self.alpha_cumprod_or_final(prev_t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;

        // 2. Predicted x0 and noise from the model output.
        let (pred_original_sample, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div(&(&sample - mul(&model_output, beta_prod_t.sqrt())?)?, alpha_prod_t.sqrt())?;
                (x0, model_output)
            }
            PredictionType::Sample => {
                let eps = div(&(&sample - mul(&model_output, alpha_prod_t.sqrt())?)?, beta_prod_t.sqrt())?;
                (model_output, eps)
            }
            PredictionType::VPrediction => {
                let x0 = (mul(&sample, alpha_prod_t.sqrt())? - mul(&model_output, beta_prod_t.sqrt())?)?;
                let eps = (mul(&model_output, alpha_prod_t.sqrt())? + mul(&sample, beta_prod_t.sqrt())?)?;
                (x0, eps)
            }
        };

        // 3. Optional clipping of x0 (pixel-space models).
        let pred_original_sample = if self.config.clip_sample {
            let range = self.config.clip_sample_range as f32;
            pred_original_sample.clamp(-range, range)?
        } else {
            pred_original_sample
        };

        // 4. The fresh noise's standard deviation sigma_t(eta) (eq. 16):
        //    eta · sqrt((1 - a_prev) / (1 - a_t) · (1 - a_t / a_prev)).
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();

        // 5. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t²) eps  (+ sigma_t · fresh noise).
        let direction = mul(&pred_epsilon, (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt())?;
        let prev_sample = (mul(&pred_original_sample, alpha_prod_t_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            // diffusers: randn_tensor(model_output.shape, generator, dtype=model_output.dtype).
            let noise = rng.randn_tensor(sample.dims(), sample.device())?;
            return prev_sample + mul(&noise, std_dev_t)?;
        }
        Ok(prev_sample)
    }

    fn set_eta(&mut self, eta: f64) -> crate::Result<()> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(crate::Error::setting("eta", format!("{eta} must lie in [0, 1]")));
        }
        self.eta = eta as f32;
        Ok(())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let t = at(&self.timesteps, step_index, "timesteps")? as usize;
        self.schedule.add_noise(original, noise, &[t])
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::Ddim);
    }

    #[test]
    fn thresholding_is_rejected() {
        let cfg = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#, "t.json").unwrap();
        let err = DdimScheduler::new(&cfg, 4).err().unwrap().to_string();
        assert!(err.contains("t.json") && err.contains("thresholding"), "{err}");
    }

    /// SD's config ("leading", steps_offset 1) cannot take 1000 steps (timestep 1000 is out of range, as in
    /// diffusers): the error is about the step count, not a broken config; 999 steps work.
    #[test]
    fn too_many_steps_for_the_offset_name_the_steps() {
        let cfg =
            SchedulerConfig::from_json_str(r#"{"timestep_spacing": "leading", "steps_offset": 1}"#, "s.json").unwrap();
        let err = DdimScheduler::new(&cfg, 1000).err().unwrap();
        assert!(matches!(&err, crate::Error::Setting { setting, .. } if setting == "steps"), "{err}");
        assert!(err.to_string().contains("timestep 1000"), "{err}");
        assert!(DdimScheduler::new(&cfg, 999).is_ok());
    }
}
