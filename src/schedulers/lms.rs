//! Linear multistep (k-diffusion's `sample_lms`): diffusers' `LMSDiscreteScheduler`.
//!
//! The ODE derivative d = (x − x0) / sigma of the last (up to) four steps is extrapolated over the next interval
//! with Adams–Bashforth weights: the integral over [sigma_i, sigma_{i+1}] of each point's Lagrange basis
//! polynomial through the recent sigmas. diffusers integrates those with scipy's `quad` (QUADPACK QAGS, which
//! for these polynomials of degree ≤ 3 stops after its first 21-point Gauss–Kronrod rule) on an integrand
//! evaluated in float32 torch arithmetic; [`lms_coefficient`] does exactly that.
use candle_core::Tensor;

use super::euler::scale_model_input;
use super::k_schedule::{init_noise_sigma, k_schedule, predicted_x0, KConfig, RespacedTimesteps};
use super::schedule::{div, mul, PredictionType};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// The order diffusers' pipelines step with (`step(..., order=4)`).
const LMS_ORDER: usize = 4;

pub struct LmsScheduler {
    config: KConfig,
    timesteps: Vec<f64>,
    /// One sigma per step plus the final 0, float32.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    /// ODE derivatives of the last `LMS_ORDER` steps, oldest first.
    derivatives: Vec<Tensor>,
}

impl LmsScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::Lms;
        let parsed: KConfig = config.parse(kind)?;
        let k = k_schedule(config, kind, &parsed, num_inference_steps, RespacedTimesteps::Float32)?;
        let sigmas: Vec<f32> = k.sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, parsed.timestep_spacing);
        Ok(Self { config: parsed, timesteps: k.timesteps, sigmas, init_noise_sigma, derivatives: Vec::new() })
    }

    pub fn config(&self) -> &KConfig {
        &self.config
    }

    /// The sigma of every step plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for LmsScheduler {
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
        // 1. x0 and the ODE derivative, kept for the next steps.
        let x0 = predicted_x0(self.config.prediction_type, &model_output, &sample, sigma)?;
        self.derivatives.push(div(&(&sample - &x0)?, sigma)?);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        // 2. The weights: the order counts the schedule's earlier sigmas (img2img starts past some), while only
        //    the derivatives of steps that ran are used (diffusers zips the two lists).
        let order = (step_index + 1).min(LMS_ORDER);
        let coefficients = (0..order).map(|current| lms_coefficient(&self.sigmas, order, step_index, current));
        // 3. x + sum of weight · derivative, newest derivative first.
        let mut update: Option<Tensor> = None;
        for (coefficient, derivative) in coefficients.zip(self.derivatives.iter().rev()) {
            let term = mul(derivative, coefficient as f32)?;
            update = Some(match update {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        match update {
            Some(update) => sample + update,
            None => Ok(sample),
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
        SchedulerKind::Lms
    }
}

/// The weight of the derivative `current` steps back: the integral over [sigma_t, sigma_{t+1}] of the
/// Lagrange basis polynomial that is 1 at `sigmas[t - current]` and 0 at the other `order − 1` recent sigmas.
/// diffusers' `get_lms_coefficient`: the integrand in float32 (torch scalars), integrated by QUADPACK.
pub fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, current: usize) -> f64 {
    let basis = |tau: f64| -> f64 {
        let tau = tau as f32;
        let mut prod = 1.0f32;
        for k in (0..order).filter(|&k| k != current) {
            prod *= (tau - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k]);
        }
        prod as f64
    };
    gauss_kronrod_21(basis, sigmas[t] as f64, sigmas[t + 1] as f64)
}

/// QUADPACK's 21-point Gauss–Kronrod rule (`dqk21`): abscissae and weights for [-1, 1], positive half; the
/// last abscissa is the centre. Published constants of the rule (Piessens et al., QUADPACK, 1983), kept with
/// their printed digits.
#[allow(clippy::excessive_precision)]
const XGK: [f64; 11] = [
    0.995657163025808080735527280689003,
    0.973906528517171720077964012084452,
    0.930157491355708226001207180059508,
    0.865063366688984510732096688423493,
    0.780817726586416897063717578345042,
    0.679409568299024406234327365114874,
    0.562757134668604683339000099272694,
    0.433395394129247190799265943165784,
    0.294392862701460198131126603103866,
    0.148874338981631210884826001129720,
    0.0,
];
#[allow(clippy::excessive_precision)]
const WGK: [f64; 11] = [
    0.011694638867371874278064396062192,
    0.032558162307964727478818972459390,
    0.054755896574351996031381300244580,
    0.075039674810919952767043140916190,
    0.093125454583697605535065465083366,
    0.109387158802297641899210590325805,
    0.123491976262065851077958109831074,
    0.134709217311473325928054001771707,
    0.142775938577060080797094273138717,
    0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
];

/// The Kronrod estimate of dqk21 over [a, b], summed in QUADPACK's order (centre, then the Gauss abscissae,
/// then the Kronrod-only ones). Exact for polynomials far beyond degree 3; QAGS accepts it at once because
/// its error estimate (the Gauss–Kronrod difference, here float32 rounding) is far below `epsrel = 1e-4`.
fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    // Fortran's jtw = 2, 4, …, 10 and jtwm1 = 1, 3, …, 9 (1-based): the odd, then the even 0-based indices.
    for j in (1..10).step_by(2).chain((0..10).step_by(2)) {
        let absc = hlgth * XGK[j];
        resk += WGK[j] * (f(centr - absc) + f(centr + absc));
    }
    resk * hlgth
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::Lms);
    }

    /// The rule integrates polynomials exactly: the first-order weight is the interval's length, and the weights
    /// of one step sum to it too (the basis polynomials sum to 1).
    #[test]
    fn coefficients_integrate_the_lagrange_basis() {
        let sigmas = [14.6f32, 9.0, 5.5, 3.1, 1.6, 0.0];
        assert!((lms_coefficient(&sigmas, 1, 0, 0) - (9.0 - 14.6f32 as f64)).abs() < 1e-6);
        for t in 1..5 {
            let order = (t + 1).min(LMS_ORDER);
            let sum: f64 = (0..order).map(|c| lms_coefficient(&sigmas, order, t, c)).sum();
            let length = sigmas[t + 1] as f64 - sigmas[t] as f64;
            assert!((sum - length).abs() < 1e-5 * length.abs(), "step {t}: {sum} vs {length}");
        }
    }
}
