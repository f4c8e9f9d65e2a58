//! Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2 without churn):
//! diffusers' `EulerDiscreteScheduler`.
//!
//! Samples live at noise level sigma (x = x0 + sigma · eps, so the initial noise is scaled by sigma_max); the
//! model sees `x / sqrt(sigma² + 1)`, the variance-preserving input it was trained on.
use candle_core::Tensor;
use serde::Deserialize;

use super::schedule::{div, mul, sigma_of, BetaConfig, NoiseSchedule, PredictionType};
use super::timesteps::{
    check_steps, exponential_sigmas, interp, karras_sigmas, log_sigmas, respacing_flags, sigma_to_t,
    single_step_timesteps, FinalSigmas, TimestepSpacing,
};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `EulerDiscreteScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct EulerConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    #[serde(default)]
    pub prediction_type: PredictionType,
    /// How sigmas are read off the training table: "linear" interpolation (the only one implemented).
    #[serde(default = "linear")]
    pub interpolation_type: String,
    /// Respace the sigmas with the Karras et al. schedule (denser at low noise).
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// Endpoints of the Karras schedule; default: the schedule's own smallest / largest sigma.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    #[serde(default = "TimestepSpacing::linspace")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default = "discrete")]
    pub timestep_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "FinalSigmas::zero")]
    pub final_sigmas_type: FinalSigmas,
}

fn linear() -> String {
    "linear".into()
}
fn discrete() -> String {
    "discrete".into()
}

pub struct EulerScheduler {
    config: EulerConfig,
    timesteps: Vec<f64>,
    /// One sigma per step plus the final one (0 or sigma_min), float32 like diffusers.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::Euler;
        let parsed: EulerConfig = config.parse(kind)?;
        if parsed.interpolation_type != "linear" {
            return Err(config.unsupported(kind, format!("interpolation_type {:?}", parsed.interpolation_type)));
        }
        let karras = parsed.use_karras_sigmas == Some(true);
        let exponential = parsed.use_exponential_sigmas == Some(true);
        respacing_flags(config, kind, [karras, exponential, parsed.use_beta_sigmas == Some(true)])?;
        if parsed.use_beta_sigmas == Some(true) {
            return Err(config.unsupported(kind, "use_beta_sigmas"));
        }
        match parsed.timestep_type.as_str() {
            "discrete" => {}
            "continuous" if parsed.prediction_type != PredictionType::VPrediction => {}
            other => return Err(config.unsupported(kind, format!("timestep_type {other:?} with v_prediction"))),
        }

        // 1. Training sigmas, and the inference timesteps with their interpolated sigmas.
        let schedule = NoiseSchedule::for_sigma_samplers(&parsed.betas, parsed.rescale_betas_zero_snr)?;
        check_steps(num_inference_steps, schedule.num_train_timesteps())?;
        let train_sigmas = schedule.sigmas();
        let (mut timesteps, mut sigmas) =
            interpolated_sigmas(&train_sigmas, parsed.timestep_spacing, num_inference_steps, parsed.steps_offset);

        // 2. Karras or exponential respacing: new sigmas between the ends of the interpolated ones, timesteps
        //    read back.
        if karras || exponential {
            let sigma_min = parsed.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = parsed.sigma_max.unwrap_or(sigmas[0]);
            let respace = if karras { karras_sigmas } else { exponential_sigmas };
            sigmas = respace(sigma_min, sigma_max, num_inference_steps);
            let logs = log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs) as f32 as f64).collect();
        }

        // 3. The final sigma.
        let last = match parsed.final_sigmas_type {
            FinalSigmas::SigmaMin => sigma_of(schedule.alphas_cumprod[0]),
            FinalSigmas::Zero => 0.0,
        };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.timestep_spacing);
        Ok(Self { config: parsed, timesteps, sigmas, init_noise_sigma })
    }

    pub fn config(&self) -> &EulerConfig {
        &self.config
    }

    /// The sigma of every step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerScheduler {
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
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        let sigma_next = self.sigmas[step_index + 1];
        // 1. Denoised estimate x0 at this sigma (no churn: sigma_hat = sigma).
        let pred_original_sample = match self.config.prediction_type {
            PredictionType::Epsilon => (&sample - mul(&model_output, sigma)?)?,
            PredictionType::VPrediction => v_prediction_to_x0(&model_output, &sample, sigma)?,
            PredictionType::Sample => model_output,
        };
        // 2. Euler step along dx/dsigma = (x - x0) / sigma.
        let derivative = div(&(&sample - &pred_original_sample)?, sigma)?;
        &sample + mul(&derivative, sigma_next - sigma)?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        original + mul(noise, sigma)?
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }
}

/// Inference timesteps (float32 values, fractional for linspace) and their sigmas, linearly interpolated in
/// the training table (f64, as numpy computes them).
pub(crate) fn interpolated_sigmas(
    train_sigmas: &[f32],
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    steps_offset: usize,
) -> (Vec<f64>, Vec<f64>) {
    let timesteps: Vec<f64> =
        single_step_timesteps(spacing, train_sigmas.len(), num_inference_steps, steps_offset, false)
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
    let sigmas = timesteps.iter().map(|&t| interp(t, train_sigmas)).collect();
    (timesteps, sigmas)
}

/// The initial noise scale: sigma_max, or sqrt(sigma_max² + 1) for "leading" spacing (diffusers' choice: its
/// first timestep is not the last training one).
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// `sample / sqrt(sigma² + 1)`: back to the unit-variance input the model was trained on.
pub(crate) fn scale_model_input(sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    div(sample, (sigma * sigma + 1.0).sqrt())
}

/// x0 from a v-prediction at noise level sigma (in sigma space, c_out = -sigma / sqrt(sigma² + 1)).
pub(crate) fn v_prediction_to_x0(model_output: &Tensor, sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
    mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::Euler);
    }

    #[test]
    fn unsupported_options_are_rejected() {
        for json in [
            r#"{"interpolation_type": "log_linear"}"#,
            r#"{"use_beta_sigmas": true}"#,
            r#"{"timestep_type": "continuous", "prediction_type": "v_prediction"}"#,
        ] {
            let cfg = SchedulerConfig::from_json_str(json, "e.json").unwrap();
            let err = EulerScheduler::new(&cfg, 4).err().unwrap().to_string();
            assert!(err.contains("not supported"), "{json}: {err}");
        }
        // "continuous" changes nothing for epsilon models.
        let cfg = SchedulerConfig::from_json_str(r#"{"timestep_type": "continuous"}"#, "e.json").unwrap();
        assert!(EulerScheduler::new(&cfg, 4).is_ok());
    }
}
