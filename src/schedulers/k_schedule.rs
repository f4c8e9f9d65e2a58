//! The schedule shared by diffusers' k-diffusion ports with a fixed sigma grid (`HeunDiscreteScheduler`,
//! `LMSDiscreteScheduler`, `KDPM2DiscreteScheduler`, `KDPM2AncestralDiscreteScheduler`, `DPMSolverSDEScheduler`): the same `__init__`
//! arguments and the same `set_timesteps` as Euler, without zero-SNR rescaling or `final_sigmas_type` (the last
//! sigma is always 0).
use serde::Deserialize;

use super::schedule::{BetaConfig, NoiseSchedule, PredictionType};
use super::timesteps::{
    check_steps, exponential_sigmas, interp, karras_sigmas, log_sigmas, respacing_flags, sigma_to_t,
    single_step_timesteps, TimestepSpacing,
};
use super::{SchedulerConfig, SchedulerKind};

/// `__init__` arguments the four classes share, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct KConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default = "TimestepSpacing::linspace")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub steps_offset: usize,
}

/// Heun's and the DPM2 classes' beta defaults (`beta_start = 0.00085, beta_end = 0.012`), where LMS keeps the
/// DDPM ones every class in `schedule.rs` assumes. Only a config without the keys sees the difference.
pub(crate) fn with_sd_beta_defaults(config: &SchedulerConfig) -> SchedulerConfig {
    config.clone().with_default("beta_start", 0.00085).with_default("beta_end", 0.012)
}

/// How diffusers stores the timesteps after Karras / exponential respacing (it differs per class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RespacedTimesteps {
    /// Cast to float32 (Heun, LMS; also every linspace/leading/trailing timestep).
    Float32,
    /// Kept in float64, Karras ones rounded to integers (the DPM2 classes).
    RoundKarrasFloat64,
    /// Kept in float64 throughout, the linspace ones too (`DPMSolverSDEScheduler`, whose `np.linspace` has
    /// `dtype=float`; the others space in float32).
    Float64,
}

/// The training schedule, the inference timesteps and their sigmas (f64, without the final 0).
pub(crate) struct KSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    /// log of the training sigmas (float32), to map further sigmas back to timesteps.
    pub log_sigmas: Vec<f32>,
}

/// Parses the shared arguments, refuses what is not implemented, and sets the timesteps as `set_timesteps` does.
pub(crate) fn k_schedule(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    parsed: &KConfig,
    num_inference_steps: usize,
    respaced: RespacedTimesteps,
) -> crate::Result<KSchedule> {
    let flags = [parsed.use_karras_sigmas, parsed.use_exponential_sigmas, parsed.use_beta_sigmas];
    respacing_flags(config, kind, flags)?;
    if parsed.use_beta_sigmas {
        return Err(config.unsupported(kind, "use_beta_sigmas"));
    }
    // 1. Training sigmas (no zero-SNR option in these classes).
    let schedule = NoiseSchedule::new(&parsed.betas, false)?;
    check_steps(num_inference_steps, schedule.num_train_timesteps())?;
    let train_sigmas = schedule.sigmas();
    let (mut timesteps, mut sigmas) = match respaced {
        RespacedTimesteps::Float64 => {
            let timesteps = single_step_timesteps(
                parsed.timestep_spacing,
                train_sigmas.len(),
                num_inference_steps,
                parsed.steps_offset,
                false,
            );
            let sigmas = timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect();
            (timesteps, sigmas)
        }
        _ => super::euler::interpolated_sigmas(
            &train_sigmas,
            parsed.timestep_spacing,
            num_inference_steps,
            parsed.steps_offset,
        ),
    };
    // 2. Karras or exponential respacing between the ends of the interpolated sigmas, timesteps read back.
    let log_sigmas = log_sigmas(&train_sigmas);
    if parsed.use_karras_sigmas || parsed.use_exponential_sigmas {
        let (sigma_min, sigma_max) = (sigmas[sigmas.len() - 1], sigmas[0]);
        let respace = if parsed.use_karras_sigmas { karras_sigmas } else { exponential_sigmas };
        sigmas = respace(sigma_min, sigma_max, num_inference_steps);
        timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                match respaced {
                    RespacedTimesteps::Float32 => t as f32 as f64,
                    RespacedTimesteps::RoundKarrasFloat64 if parsed.use_karras_sigmas => t.round_ties_even(),
                    RespacedTimesteps::RoundKarrasFloat64 | RespacedTimesteps::Float64 => t,
                }
            })
            .collect();
    }
    Ok(KSchedule { timesteps, sigmas, log_sigmas })
}

/// `[x0, x1, x1, x2, x2, …]`: the first value once and every later one twice, as the two-evaluation schedulers
/// lay out their timesteps and sigmas (`torch.cat([v[:1], v[1:].repeat_interleave(2)])`).
pub(crate) fn repeat_after_first<T: Copy>(values: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(2 * values.len());
    for (i, &v) in values.iter().enumerate() {
        out.push(v);
        if i > 0 {
            out.push(v);
        }
    }
    out
}

/// The initial noise scale of these classes: sigma_max, or sqrt(sigma_max² + 1) for "leading" spacing.
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    super::euler::init_noise_sigma(sigmas, spacing)
}

/// x0 from the model output at noise level `sigma` (epsilon, v or the sample itself), in float32 like diffusers.
pub(crate) fn predicted_x0(
    prediction_type: PredictionType,
    model_output: &candle_core::Tensor,
    sample: &candle_core::Tensor,
    sigma: f32,
) -> candle_core::Result<candle_core::Tensor> {
    use super::schedule::mul;
    match prediction_type {
        PredictionType::Epsilon => sample - mul(model_output, sigma)?,
        PredictionType::VPrediction => super::euler::v_prediction_to_x0(model_output, sample, sigma),
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_after_first_doubles_all_but_the_first() {
        assert_eq!(repeat_after_first(&[3, 2, 1]), [3, 2, 2, 1, 1]);
        assert_eq!(repeat_after_first(&[7]), [7]);
    }
}
