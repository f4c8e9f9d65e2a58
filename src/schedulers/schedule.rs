//! The training noise schedule every scheduler shares: betas → cumulative alphas → sigmas.
//!
//! diffusers builds these tables as float32 torch tensors; they are reproduced here in f32 with the same
//! arithmetic (torch's `linspace` uses a fused multiply-add, `cumprod` accumulates in f64), so the tables match
//! diffusers bit for bit and the step formulas start from the same numbers.
use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// What the model predicts: one type for the schedulers, the loaders and training, defined with the base-model
/// facts (io sits below the schedulers).
pub use crate::io::base::PredictionType;

/// How betas grow over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    /// Linear in sqrt(beta), then squared: Stable Diffusion's schedule.
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal ("Improved DDPM"), betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// The beta fields of `scheduler_config.json`, with the defaults every diffusers scheduler class shares.
#[derive(Debug, Clone, Deserialize)]
pub struct BetaConfig {
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start`/`beta_end`/`beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}

/// The largest beta of the cosine schedule (the "cap" in `squaredcos_cap_v2`).
const COSINE_MAX_BETA: f64 = 0.999;
/// Offset `s` of the cosine schedule: keeps beta small near t = 0 (Improved DDPM, eq. 17).
const COSINE_OFFSET: f64 = 0.008;
/// The cumulative alpha given to the last timestep after zero-terminal-SNR rescaling by the sigma-based
/// schedulers (Euler, DPM-Solver, UniPC): exactly 0 would make its sigma infinite.
pub const ZERO_SNR_LAST_ALPHA_CUMPROD: f32 = 1.0 / 16_777_216.0; // 2^-24

/// Betas and cumulative alphas over the training timesteps, as float32 like diffusers keeps them.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    /// `alphas_cumprod[t]` = prod_{s <= t} (1 - beta_s): the signal fraction (squared) left at timestep t.
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// The schedule of `config`; `rescale_zero_snr` applies "Common Diffusion Noise Schedules and Sample Steps
    /// are Flawed" (Lin et al. 2023), Algorithm 1, so the last timestep is pure noise.
    pub fn new(config: &BetaConfig, rescale_zero_snr: bool) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(Error::Invalid(format!("scheduler num_train_timesteps must be at least 2, found {n}")));
        }
        let mut betas = match &config.trained_betas {
            Some(betas) => {
                if betas.len() != n {
                    return Err(Error::Invalid(format!(
                        "scheduler trained_betas has {} values but num_train_timesteps is {n}",
                        betas.len()
                    )));
                }
                betas.iter().map(|&b| b as f32).collect()
            }
            None => match config.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n),
                BetaSchedule::ScaledLinear => torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .iter()
                    .map(|b| b * b)
                    .collect(),
                BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
            },
        };
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
        Ok(Self { betas, alphas_cumprod })
    }

    /// The schedule as the sigma-based samplers (Euler, DPM-Solver, UniPC) keep it: after zero-terminal-SNR
    /// rescaling the last cumulative alpha is nudged off 0 so its sigma stays finite.
    pub fn for_sigma_samplers(config: &BetaConfig, rescale_zero_snr: bool) -> Result<Self> {
        let mut schedule = Self::new(config, rescale_zero_snr)?;
        if rescale_zero_snr {
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = ZERO_SNR_LAST_ALPHA_CUMPROD;
            }
        }
        Ok(schedule)
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `alphas_cumprod[t]`, or an error naming the timestep if it is outside the training range.
    pub fn alpha_cumprod(&self, t: usize) -> candle_core::Result<f32> {
        match self.alphas_cumprod.get(t) {
            Some(&a) => Ok(a),
            None => candle_core::bail!("timestep {t} is outside the {} training timesteps", self.alphas_cumprod.len()),
        }
    }

    /// The noise-to-signal ratio `sqrt((1 - alpha_cumprod) / alpha_cumprod)` of every training timestep, ascending
    /// in t (float32, as diffusers' `sigmas` before interpolation).
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| sigma_of(a)).collect()
    }

    /// Forward diffusion at training timesteps (one per batch element, or one for all):
    /// `sqrt(a_t) * original + sqrt(1 - a_t) * noise`, as DDPM/DDIM training adds noise.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &[usize]) -> candle_core::Result<Tensor> {
        let (signal, noise_scale) = self.per_sample(original, timesteps, |a| (a.sqrt(), (1.0 - a).sqrt()))?;
        signal.broadcast_mul(original)?.broadcast_add(&noise_scale.broadcast_mul(noise)?)
    }

    /// The v-prediction training target `sqrt(a_t) * noise - sqrt(1 - a_t) * sample`.
    pub fn velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &[usize]) -> candle_core::Result<Tensor> {
        let (noise_scale, sample_scale) = self.per_sample(sample, timesteps, |a| (a.sqrt(), (1.0 - a).sqrt()))?;
        noise_scale.broadcast_mul(noise)?.broadcast_sub(&sample_scale.broadcast_mul(sample)?)
    }

    /// Two per-batch-element coefficient tensors shaped (B, 1, 1, ...) for broadcasting against `like`.
    fn per_sample(
        &self,
        like: &Tensor,
        timesteps: &[usize],
        coefficients: impl Fn(f32) -> (f32, f32),
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let batch = like.dims().first().copied().unwrap_or(1);
        if timesteps.len() != 1 && timesteps.len() != batch {
            candle_core::bail!("add_noise: {} timesteps for a batch of {batch}", timesteps.len());
        }
        let mut first = Vec::with_capacity(timesteps.len());
        let mut second = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let (a, b) = coefficients(self.alpha_cumprod(t)?);
            first.push(a);
            second.push(b);
        }
        let mut shape = vec![timesteps.len()];
        shape.resize(like.rank().max(1), 1);
        let to = |v: Vec<f32>| Tensor::from_vec(v, shape.as_slice(), like.device())?.to_dtype(like.dtype());
        Ok((to(first)?, to(second)?))
    }
}

/// `sqrt((1 - a) / a)` in float32, the operation order of diffusers.
pub fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// (alpha_t, sigma_t) of the variance-preserving process at sampler sigma: 1/sqrt(sigma² + 1), sigma · alpha_t
/// (the multistep solvers work with these).
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// Half log-SNR: log(alpha_t) - log(sigma_t); +inf at sigma = 0.
pub(crate) fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    alpha_t.ln() - sigma_t.ln()
}

/// `alpha_t · original + sigma_t · noise` at sampler sigma: add_noise of the multistep solvers.
pub(crate) fn add_noise_at_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    mul(original, alpha_t)? + mul(noise, sigma_t)?
}

/// `torch.linspace(start, end, steps, dtype=float32)` exactly: torch's CPU kernel computes each value with a
/// fused multiply-add, from the start for the first half and from the end for the second.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// `torch.cumprod` of a float32 tensor: torch accumulates in f64 and rounds every output to f32.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// Betas of the cosine schedule `alpha_bar(t) = cos²((t + s) / (1 + s) · π/2)`, computed in f64 like diffusers'
/// `betas_for_alpha_bar` and then stored as f32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(COSINE_MAX_BETA) as f32
        })
        .collect()
}

/// Shift and scale sqrt(alpha_cumprod) so the last timestep has zero signal while the first keeps its value,
/// then turn it back into betas (float32, diffusers' `rescale_zero_terminal_snr`).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
    let mut sqrt_ac: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    for s in sqrt_ac.iter_mut() {
        *s -= last;
        *s *= scale;
    }
    let alphas_bar: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
    let mut alphas = Vec::with_capacity(alphas_bar.len());
    alphas.push(alphas_bar[0]);
    alphas.extend(alphas_bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// `tensor * s` for a float32 scalar, computed in the tensor's own dtype (exact like torch's scalar product).
pub(crate) fn mul(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.affine(s as f64, 0.0)
}

/// `tensor / s` as a true division (candle's `Tensor / f64` multiplies by the reciprocal instead).
pub(crate) fn div(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(s, t.device())?.to_dtype(t.dtype())?)
}

/// Inputs are stepped in float32 (diffusers upcasts the sample too); the result goes back to `dtype`.
pub(crate) fn f32_of(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedulers/noise_schedules.safetensors");

    fn config(schedule: BetaSchedule, start: f64, end: f64) -> BetaConfig {
        BetaConfig {
            num_train_timesteps: 1000,
            beta_start: start,
            beta_end: end,
            beta_schedule: schedule,
            trained_betas: None,
        }
    }

    /// The tables must equal diffusers' float32 tensors exactly (saved by gen_schedulers.py), except after
    /// zero-SNR rescaling: torch's vectorised float32 sqrt is not correctly rounded (1 ulp off for ~20% of
    /// values), and the rescale amplifies that, so there betas get an absolute and alphas_cumprod a relative
    /// bound of 1e-5.
    #[test]
    fn tables_match_diffusers_bit_for_bit() {
        let reference = candle_core::safetensors::load(FIXTURE, &Device::Cpu).unwrap();
        let cases = [
            ("scaled_linear", config(BetaSchedule::ScaledLinear, 0.00085, 0.012), false),
            ("linear", config(BetaSchedule::Linear, 0.0001, 0.02), false),
            ("squaredcos_cap_v2", config(BetaSchedule::SquaredcosCapV2, 0.0001, 0.02), false),
            ("scaled_linear_zero_snr", config(BetaSchedule::ScaledLinear, 0.00085, 0.012), true),
        ];
        for (name, cfg, zero_snr) in cases {
            let schedule = NoiseSchedule::new(&cfg, zero_snr).unwrap();
            let betas = reference[&format!("{name}.betas")].to_vec1::<f32>().unwrap();
            let alphas_cumprod = reference[&format!("{name}.alphas_cumprod")].to_vec1::<f32>().unwrap();
            if zero_snr {
                let max_rel = |a: &[f32], b: &[f32]| {
                    a.iter().zip(b).map(|(x, y)| ((x - y) / y.abs().max(1e-30)).abs()).fold(0f32, f32::max)
                };
                // The last cumulative alpha is exactly 0 on both sides.
                let n = alphas_cumprod.len() - 1;
                let max_abs = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                // Found: betas 2.9e-6 absolute, alphas_cumprod 3.8e-6 relative (near the end, where the shift
                // to zero cancels most of the value).
                assert!(max_abs(&schedule.betas, &betas) <= 1e-5, "{name}: betas");
                assert!(max_rel(&schedule.alphas_cumprod[..n], &alphas_cumprod[..n]) <= 1e-5, "{name}: alphas_cumprod");
                assert_eq!(schedule.alphas_cumprod[n], alphas_cumprod[n]);
            } else {
                assert_eq!(schedule.betas, betas, "{name}: betas");
                assert_eq!(schedule.alphas_cumprod, alphas_cumprod, "{name}: alphas_cumprod");
            }
        }
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_signal() {
        let schedule = NoiseSchedule::new(&config(BetaSchedule::ScaledLinear, 0.00085, 0.012), true).unwrap();
        assert_eq!(*schedule.alphas_cumprod.last().unwrap(), 0.0);
        assert_eq!(*schedule.betas.last().unwrap(), 1.0);
    }

    #[test]
    fn trained_betas_must_match_the_timestep_count() {
        let mut cfg = config(BetaSchedule::Linear, 0.0001, 0.02);
        cfg.trained_betas = Some(vec![0.01; 10]);
        let err = NoiseSchedule::new(&cfg, false).unwrap_err().to_string();
        assert!(err.contains("10 values") && err.contains("1000"), "{err}");
    }

    #[test]
    fn add_noise_and_velocity_follow_the_forward_process() {
        let schedule = NoiseSchedule::new(&config(BetaSchedule::ScaledLinear, 0.00085, 0.012), false).unwrap();
        let x0 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let noise = Tensor::new(&[[0.5f32, -0.5], [1.0, -1.0]], &Device::Cpu).unwrap();
        let noisy = schedule.add_noise(&x0, &noise, &[10, 500]).unwrap().to_vec2::<f32>().unwrap();
        let v = schedule.velocity(&x0, &noise, &[10, 500]).unwrap().to_vec2::<f32>().unwrap();
        for (row, t) in [(0usize, 10usize), (1, 500)] {
            let a = schedule.alphas_cumprod[t];
            for col in 0..2 {
                let (x, n) = ([[1f32, 2.0], [3.0, 4.0]][row][col], [[0.5f32, -0.5], [1.0, -1.0]][row][col]);
                assert!((noisy[row][col] - (a.sqrt() * x + (1.0 - a).sqrt() * n)).abs() < 1e-6);
                assert!((v[row][col] - (a.sqrt() * n - (1.0 - a).sqrt() * x)).abs() < 1e-6);
            }
        }
        assert!(schedule.add_noise(&x0, &noise, &[1, 2, 3]).is_err());
        assert!(schedule.add_noise(&x0, &noise, &[1000]).is_err());
    }
}
