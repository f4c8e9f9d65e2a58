//! DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`, A1111's "DPM++ SDE"): diffusers' `DPMSolverSDEScheduler`.
//!
//! A second-order stochastic sampler in t = −log(sigma). Each interval sigma → sigma_next takes two model
//! evaluations: an ancestral DPM-Solver++ step to the log-sigma midpoint, then the full step from the interval's
//! start using the x0 predicted at the midpoint. Each half adds fresh noise of size sigma_up (the ancestral
//! split: a deterministic step down to sigma_down, then noise back up to the target). The noise is not drawn
//! step by step: it is the increment of one Brownian motion over [sigma_next, sigma] (`brownian.rs`), so the
//! two halves of an interval see consistent noise, as the SDE requires.
//!
//! diffusers lays out the timesteps as `[t0, t_mid0, t1, t_mid1, …, t_{n-1}]` (2n − 1 evaluations, the
//! midpoints' timesteps read back from their sigmas); the last interval ends at sigma = 0 and is a plain Euler
//! step. The scalar coefficients are float32 torch arithmetic in diffusers' order.
//!
//! The Brownian motion's entropy is the config's `noise_sampler_seed`, or else, as diffusers does,
//! `torch.randint(0, 2**63 - 1, [])` drawn at the first step — here from the pipeline's generator, which is
//! what diffusers draws when the pipeline's generator is torch's global one (`generator=torch.manual_seed(s)`).
use candle_core::Tensor;
use serde::Deserialize;

use super::brownian::BrownianTreeNoise;
use super::euler::scale_model_input;
use super::k_schedule::{
    init_noise_sigma, k_schedule, predicted_x0, repeat_after_first, with_sd_beta_defaults, KConfig, RespacedTimesteps,
};
use super::kdpm2::refuse_sample_prediction;
use super::schedule::{div, mul, PredictionType};
use super::timesteps::sigma_to_t;
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// The midpoint of each interval in t = −log(sigma) (k-diffusion's `r = 1/2`).
const MIDPOINT_RATIO: f32 = 0.5;
/// The entropy diffusers draws when no `noise_sampler_seed` is set: `torch.randint(0, 2**63 - 1, [])`.
const ENTROPY_HIGH: i64 = i64::MAX;

/// `DPMSolverSDEScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct DpmSdeConfig {
    #[serde(flatten)]
    pub base: KConfig,
    /// Entropy of the Brownian tree; None: drawn from the generator at the first step.
    #[serde(default)]
    pub noise_sampler_seed: Option<u64>,
}

/// What the first half of an interval leaves for the second.
struct Midpoint {
    /// The sample at the interval's start.
    sample: Tensor,
    /// The midpoint's sigma, at which the model sees the second evaluation.
    sigma: f32,
}

pub struct DpmSolverSdeScheduler {
    config: DpmSdeConfig,
    /// `[t0, t_mid0, t1, …, t_{n-1}]`: 2n − 1 entries.
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, …, s_{n-1}, s_{n-1}, 0]`, float32.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    /// Set between the two evaluations of an interval (diffusers' `self.sample is not None`).
    pending: Option<Midpoint>,
    /// Created at the first step, when the sample's shape is known.
    noise: Option<BrownianTreeNoise>,
}

impl DpmSolverSdeScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::DpmSolverSde;
        let config = with_sd_beta_defaults(config);
        let parsed: DpmSdeConfig = config.parse(kind)?;
        refuse_sample_prediction(&config, kind, parsed.base.prediction_type)?;
        // 1. Timesteps and sigmas as the other k-diffusion ports (float64 timesteps, not rounded).
        let k = k_schedule(&config, kind, &parsed.base, num_inference_steps, RespacedTimesteps::Float64)?;
        // 2. Each interval's midpoint in t = -log(sigma) (float64, as numpy), and its timestep.
        let mut timesteps = vec![k.timesteps[0]];
        for (pair, &t) in k.sigmas.windows(2).zip(&k.timesteps[1..]) {
            let (t0, t1) = (-pair[0].ln(), -pair[1].ln());
            let proposed = t0 + (t1 - t0) * MIDPOINT_RATIO as f64;
            timesteps.push(sigma_to_t((-proposed).exp(), &k.log_sigmas));
            timesteps.push(t);
        }
        let sigmas: Vec<f32> = k.sigmas.iter().map(|&s| s as f32).collect();
        let sigmas: Vec<f32> = repeat_after_first(&sigmas).into_iter().chain([0.0]).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.base.timestep_spacing);
        Ok(Self { config: parsed, timesteps, sigmas, init_noise_sigma, pending: None, noise: None })
    }

    pub fn config(&self) -> &DpmSdeConfig {
        &self.config
    }

    /// The sigma of every evaluation plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The Brownian noise source, made at the first step over [smallest positive sigma, largest sigma].
    fn noise_source(
        &mut self,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<&mut BrownianTreeNoise> {
        if self.noise.is_none() {
            let entropy = match self.config.noise_sampler_seed {
                Some(seed) => seed,
                None => rng.randint(0, ENTROPY_HIGH, 1)[0] as u64,
            };
            let positive = self.sigmas.iter().copied().filter(|&s| s > 0.0);
            let sigma_min = positive.fold(f32::INFINITY, f32::min);
            let sigma_max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let noise = BrownianTreeNoise::new(sigma_min, sigma_max, sample.dims(), entropy, sample.device())?;
            self.noise = Some(noise);
        }
        Ok(self.noise.as_mut().expect("just set"))
    }
}

/// k-diffusion's `sigma_fn`: sigma from t = −log(sigma) (float32 like torch).
fn sigma_fn(t: f32) -> f32 {
    (-t).exp()
}

/// k-diffusion's `t_fn`: t = −log(sigma).
fn t_fn(sigma: f32) -> f32 {
    -sigma.ln()
}

impl Scheduler for DpmSolverSdeScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        scale_model_input(sample, self.pending.as_ref().map_or(sigma, |m| m.sigma))
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, "timesteps")?;
        self.noise_source(&sample, rng)?;
        // 1. The interval: from this evaluation's sigma (first half), or the one before (second half).
        let first_half = self.pending.is_none();
        let (sigma, sigma_next) = if first_half {
            (self.sigmas[step_index], self.sigmas[step_index + 1])
        } else {
            (self.sigmas[step_index - 1], self.sigmas[step_index])
        };
        let (t, t_full) = (t_fn(sigma), t_fn(sigma_next));
        let t_proposed = t + (t_full - t) * MIDPOINT_RATIO;

        // 2. x0 from the model output at the sigma the model saw.
        let sigma_input = if first_half { sigma } else { sigma_fn(t_proposed) };
        let x0 = predicted_x0(self.config.base.prediction_type, &model_output, &sample, sigma_input)?;

        // 3. The last interval ends at sigma = 0: an Euler step onto x0.
        if sigma_next == 0.0 {
            let derivative = div(&(&sample - &x0)?, sigma)?;
            return &sample + mul(&derivative, sigma_next - sigma)?;
        }

        // 4. Ancestral DPM-Solver++(1) step from the interval's start to the midpoint (first half) or to the
        //    interval's end with the midpoint's x0 (second half): down to sigma_down, noise up by sigma_up.
        let (t_next, start) = match self.pending.take() {
            None => (t_proposed, sample),
            Some(midpoint) => (t_full, midpoint.sample),
        };
        let (sigma_from, sigma_to) = (sigma_fn(t), sigma_fn(t_next));
        let up =
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt();
        let sigma_up = if up < sigma_to { up } else { sigma_to };
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let ancestral_t = t_fn(sigma_down);
        let deterministic =
            (mul(&start, sigma_fn(ancestral_t) / sigma_fn(t))? - mul(&x0, (t - ancestral_t).exp_m1())?)?;
        let noise = self.noise.as_mut().expect("made above").sample(sigma_from, sigma_to)?;
        let prev_sample = (deterministic + mul(&noise, sigma_up)?)?;
        if first_half {
            self.pending = Some(Midpoint { sample: start, sigma: sigma_to });
        }
        Ok(prev_sample)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?;
        original + mul(noise, sigma)?
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.base.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverSde
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::DpmSolverSde);
    }

    /// n steps run 2n − 1 model evaluations, each interval's midpoint between its ends.
    #[test]
    fn midpoints_interleave() {
        let cfg = SchedulerConfig::from_json_str(r#"{"beta_schedule": "scaled_linear"}"#, "s.json").unwrap();
        let s = DpmSolverSdeScheduler::new(&cfg, 4).unwrap();
        let t = s.timesteps();
        assert_eq!(t.len(), 7);
        assert_eq!([t[0], t[2], t[4], t[6]], [999.0, 666.0, 333.0, 0.0]);
        assert!(t[0] > t[1] && t[1] > t[2] && t[4] > t[5] && t[5] > t[6], "{t:?}");
        assert_eq!(s.sigmas().len(), 8);
        let cfg = SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#, "s.json").unwrap();
        let err = DpmSolverSdeScheduler::new(&cfg, 4).err().unwrap().to_string();
        assert!(err.contains("sample") && err.contains("DPMSolverSDEScheduler"), "{err}");
    }

    /// Without `noise_sampler_seed` the entropy is diffusers' `torch.randint(0, 2**63 - 1, [])` from the
    /// generator (torch printed 4095051218741643470 after `manual_seed(5)`); with it, the generator is untouched.
    #[test]
    fn entropy_comes_from_the_generator_or_the_config() {
        let mut rng = TorchGenerator::new(5);
        assert_eq!(rng.randint(0, ENTROPY_HIGH, 1)[0], 4095051218741643470);
        let sample = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let cfg = SchedulerConfig::from_json_str(r#"{"noise_sampler_seed": 7}"#, "s.json").unwrap();
        let mut s = DpmSolverSdeScheduler::new(&cfg, 3).unwrap();
        let mut rng = TorchGenerator::new(5);
        s.step(&sample, 0, &sample, &mut rng).unwrap();
        assert_eq!(rng.state(), TorchGenerator::new(5).state());
    }
}
