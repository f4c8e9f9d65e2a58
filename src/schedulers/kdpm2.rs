//! DPM-Solver-2 (k-diffusion's `sample_dpm_2`, Karras et al. 2022's second-order sampler with a midpoint in
//! log-sigma): diffusers' `KDPM2DiscreteScheduler`.
//!
//! Each interval sigma → sigma_next takes two model evaluations: an Euler step to the geometric midpoint
//! sigma_mid = sqrt(sigma · sigma_next), then, with the slope measured there, a full step from the interval's
//! start. As in diffusers the timestep list interleaves the midpoints' timesteps (`[t0, t_mid0, t1, t_mid1, …,
//! t_{n-1}]`, 2n − 1 evaluations); the last interval ends at sigma = 0, whose midpoint is 0, so it is a single
//! step onto the x0 prediction.
use candle_core::Tensor;

use super::euler::scale_model_input;
use super::k_schedule::{
    init_noise_sigma, k_schedule, predicted_x0, repeat_after_first, with_sd_beta_defaults, KConfig, RespacedTimesteps,
};
use super::schedule::{div, mul, PredictionType};
use super::timesteps::sigma_to_t;
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

pub struct KDpm2Scheduler {
    config: KConfig,
    /// `[t0, t_mid(s0,s1), t1, …, t_{n-1}]`: 2n − 1 entries.
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, …, 0, 0, 0]` (diffusers' layout, float32).
    sigmas: Vec<f32>,
    /// The midpoints in the same layout: entry 2i + 1 is between sigma_i and sigma_{i+1}.
    sigmas_interpol: Vec<f32>,
    init_noise_sigma: f64,
    /// The sample at the start of the interval, kept between the two evaluations.
    first_order_sample: Option<Tensor>,
}

impl KDpm2Scheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::KDpm2;
        let config = with_sd_beta_defaults(config);
        let parsed: KConfig = config.parse(kind)?;
        refuse_sample_prediction(&config, kind, parsed.prediction_type)?;
        let k = k_schedule(&config, kind, &parsed, num_inference_steps, RespacedTimesteps::RoundKarrasFloat64)?;
        let sigmas: Vec<f32> = k.sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        // Midpoint of each sigma and the one before it (the first entry pairs with the final 0 and is unused).
        let previous: Vec<f32> = (0..sigmas.len()).map(|i| sigmas[(i + sigmas.len() - 1) % sigmas.len()]).collect();
        let interpol: Vec<f32> = sigmas.iter().zip(&previous).map(|(&s, &p)| log_midpoint(s, p)).collect();
        // Timesteps: t0, then each midpoint's timestep before the step's own.
        let mut timesteps = vec![k.timesteps[0]];
        for (&t, &mid) in k.timesteps.iter().zip(&interpol).skip(1) {
            timesteps.push(interpolated_timestep(mid, &k.log_sigmas, &parsed));
            timesteps.push(t);
        }
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.timestep_spacing);
        Ok(Self {
            config: parsed,
            timesteps,
            sigmas: repeat_then_last(&sigmas),
            sigmas_interpol: repeat_then_last(&interpol),
            init_noise_sigma,
            first_order_sample: None,
        })
    }

    pub fn config(&self) -> &KConfig {
        &self.config
    }
}

impl Scheduler for KDpm2Scheduler {
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
            Some(_) => self.sigmas_interpol[step_index],
        };
        scale_model_input(sample, sigma)
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, "timesteps")?;
        match self.first_order_sample.take() {
            // 1. First evaluation: Euler from sigma to the midpoint.
            None => {
                let (sigma, sigma_mid) = (self.sigmas[step_index], self.sigmas_interpol[step_index + 1]);
                let x0 = predicted_x0(self.config.prediction_type, &model_output, &sample, sigma)?;
                let derivative = div(&(&sample - &x0)?, sigma)?;
                let prev_sample = (&sample + mul(&derivative, sigma_mid - sigma)?)?;
                self.first_order_sample = Some(sample);
                Ok(prev_sample)
            }
            // 2. Second evaluation, at the midpoint: its slope carries the interval's start to sigma_next.
            Some(start) => {
                let sigma = self.sigmas[step_index - 1];
                let (sigma_mid, sigma_next) = (self.sigmas_interpol[step_index], self.sigmas[step_index]);
                let x0 = predicted_x0(self.config.prediction_type, &model_output, &sample, sigma_mid)?;
                let derivative = div(&(&sample - &x0)?, sigma_mid)?;
                &start + mul(&derivative, sigma_next - sigma)?
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
        SchedulerKind::KDpm2
    }
}

/// diffusers raises NotImplementedError for `prediction_type = "sample"` in both DPM2 classes.
pub(crate) fn refuse_sample_prediction(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    prediction_type: PredictionType,
) -> crate::Result<()> {
    if prediction_type == PredictionType::Sample {
        return Err(config.unsupported(kind, "prediction_type \"sample\""));
    }
    Ok(())
}

/// `exp(lerp(log a, log b, 0.5))` in float32 as torch computes it (`b − (b − log a… ) · 0.5`): the geometric
/// mean, 0 when either is 0 (`log 0 = −inf`), NaN for the unused pair (sigma_max, 0) of the first entry.
pub(crate) fn log_midpoint(a: f32, b: f32) -> f32 {
    let (start, end) = (a.ln(), b.ln());
    let diff = end - start;
    (end - diff * 0.5).exp()
}

/// `[v0, v1, v1, …, v_n, v_n, v_n]`: diffusers' `cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])`.
pub(crate) fn repeat_then_last(values: &[f32]) -> Vec<f32> {
    let mut out = repeat_after_first(values);
    out.push(values[values.len() - 1]);
    out
}

/// The training timestep of a midpoint sigma, in the dtype diffusers keeps the timesteps in: float64 after
/// Karras / exponential respacing, float32 otherwise.
pub(crate) fn interpolated_timestep(sigma: f32, log_sigmas: &[f32], config: &KConfig) -> f64 {
    let t = sigma_to_t(sigma as f64, log_sigmas);
    if config.use_karras_sigmas || config.use_exponential_sigmas {
        t
    } else {
        t as f32 as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::KDpm2);
    }

    #[test]
    fn midpoints_are_geometric_means() {
        assert!((log_midpoint(4.0, 1.0) - 2.0).abs() < 1e-6);
        assert_eq!(log_midpoint(0.0, 3.0), 0.0);
        assert!(log_midpoint(3.0, 0.0).is_nan());
        let cfg = SchedulerConfig::from_json_str("{}", "k.json").unwrap();
        let s = KDpm2Scheduler::new(&cfg, 3).unwrap();
        assert_eq!(s.timesteps().len(), 5);
        assert_eq!(s.sigmas.len(), 8);
    }

    #[test]
    fn sample_prediction_is_refused() {
        let cfg = SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#, "k.json").unwrap();
        let err = KDpm2Scheduler::new(&cfg, 3).err().unwrap().to_string();
        assert!(err.contains("k.json") && err.contains("sample"), "{err}");
    }
}
