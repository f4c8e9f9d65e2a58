//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
//! Models"): diffusers' `UniPCMultistepScheduler`, the B(h) variants bh1/bh2 without an external solver.
//!
//! Every step first *corrects* the sample just produced (UniC, using the new model output at no extra model
//! evaluation), then *predicts* the next one (UniP) from the last `order` model outputs. Both solve a small
//! linear system for the weights of the output differences.
use candle_core::Tensor;
use serde::Deserialize;

use super::schedule::{
    add_noise_at_sigma, alpha_sigma, div, lambda, mul, sigma_of, BetaConfig, NoiseSchedule, PredictionType,
};
use super::timesteps::{
    check_steps, exponential_sigmas, interp, karras_sigmas, log_sigmas, multistep_timesteps, respacing_flags,
    sigma_to_t,
};
use super::timesteps::{FinalSigmas, TimestepSpacing};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

/// `UniPCMultistepScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct UniPcConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    /// How many past model outputs the predictor uses (2 for guided sampling, 3 for unconditional).
    #[serde(default = "two")]
    pub solver_order: usize,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub thresholding: bool,
    /// Solve for data (x0) predictions (UniPC-x0) rather than noise.
    #[serde(default = "yes")]
    pub predict_x0: bool,
    /// B(h) = h ("bh1") or e^h - 1 ("bh2", default).
    #[serde(default = "bh2")]
    pub solver_type: String,
    /// Lower the order of the last steps (no effect once fewer outputs are available anyway).
    #[serde(default = "yes")]
    pub lower_order_final: bool,
    /// Step indices after which the corrector is skipped.
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "TimestepSpacing::linspace")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "FinalSigmas::zero")]
    pub final_sigmas_type: FinalSigmas,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Endpoints of the Karras schedule; default: the training schedule's smallest / largest sigma.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
}

fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn bh2() -> String {
    "bh2".into()
}

/// The B(h) scaling of the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Bh1,
    Bh2,
}

pub struct UniPcScheduler {
    config: UniPcConfig,
    solver_type: SolverType,
    timesteps: Vec<f64>,
    /// One sigma per step plus the final one, float32.
    sigmas: Vec<f32>,
    /// Converted model outputs (x0 or noise) of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The sample the last predictor started from, and the order it used: the corrector redoes that step.
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl UniPcScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::UniPc;
        let parsed: UniPcConfig = config.parse(kind)?;
        let solver_type = validate(config, &parsed)?;

        // 1. Training schedule and timesteps.
        let schedule = NoiseSchedule::for_sigma_samplers(&parsed.betas, parsed.rescale_betas_zero_snr)?;
        let num_train = schedule.num_train_timesteps();
        check_steps(num_inference_steps, num_train)?;
        let train_sigmas = schedule.sigmas();
        let mut timesteps = multistep_timesteps(
            parsed.timestep_spacing,
            num_train,
            num_train,
            num_inference_steps,
            parsed.steps_offset,
        );

        // 2. Sigmas: Karras-respaced (timesteps read back and rounded), or interpolated at the timesteps.
        let (sigmas, last) = if parsed.use_karras_sigmas {
            let sigma_min = parsed.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = parsed.sigma_max.unwrap_or(train_sigmas[num_train - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            let logs = log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs).round_ties_even()).collect();
            let last = match parsed.final_sigmas_type {
                FinalSigmas::SigmaMin => sigmas[sigmas.len() - 1] as f32,
                FinalSigmas::Zero => 0.0,
            };
            (sigmas, last)
        } else if parsed.use_exponential_sigmas {
            let sigma_min = parsed.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = parsed.sigma_max.unwrap_or(train_sigmas[num_train - 1] as f64);
            let sigmas = exponential_sigmas(sigma_min, sigma_max, num_inference_steps);
            let logs = log_sigmas(&train_sigmas);
            // Not rounded, unlike Karras: diffusers' int64 cast truncates them.
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs).trunc()).collect();
            let last = match parsed.final_sigmas_type {
                FinalSigmas::SigmaMin => sigmas[sigmas.len() - 1] as f32,
                FinalSigmas::Zero => 0.0,
            };
            (sigmas, last)
        } else {
            let sigmas = timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect();
            let last = match parsed.final_sigmas_type {
                FinalSigmas::SigmaMin => sigma_of(schedule.alphas_cumprod[0]),
                FinalSigmas::Zero => 0.0,
            };
            (sigmas, last)
        };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        if last == 0.0 && !parsed.predict_x0 {
            // diffusers computes 0 · inf there and returns NaN; refuse instead of producing a black image.
            return Err(config.unsupported(kind, "predict_x0 = false with final_sigmas_type \"zero\""));
        }
        if last == 0.0 && !parsed.lower_order_final && parsed.solver_order > 1 && num_inference_steps > 1 {
            return Err(config.unsupported(
                kind,
                "lower_order_final = false with final_sigmas_type \"zero\" (diffusers returns inf)",
            ));
        }
        Ok(Self {
            model_outputs: vec![None; parsed.solver_order],
            config: parsed,
            solver_type,
            timesteps,
            sigmas,
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
        })
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// The sigma of every step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The model output as the solver's variable: x0 (predict_x0) or noise.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        match (self.config.predict_x0, self.config.prediction_type) {
            (true, PredictionType::Epsilon) => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t),
            (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => Ok(model_output.clone()),
            (true, PredictionType::VPrediction) => mul(sample, alpha_t)? - mul(model_output, sigma_t)?,
            (false, PredictionType::Sample) => div(&(sample - mul(model_output, alpha_t)?)?, sigma_t),
            (false, PredictionType::VPrediction) => mul(model_output, alpha_t)? + mul(sample, sigma_t)?,
        }
    }

    /// The converted output `back` steps ago (1 = the newest).
    fn history(&self, back: usize) -> candle_core::Result<&Tensor> {
        match self.model_outputs.len().checked_sub(back).and_then(|i| self.model_outputs[i].as_ref()) {
            Some(t) => Ok(t),
            None => candle_core::bail!("UniPC: no model output from {back} steps ago (steps must run in order)"),
        }
    }

    /// The shared part of UniP and UniC: from the sample `x` at sigma index `s0` to sigma index `t`, using the
    /// newest stored output m0 and the `order - 1` before it (at sigma indices s0-1, s0-2, ...).
    /// Returns (the order-1 update x_t_, the scale alpha_t·B(h) or sigma_t·B(h), the output differences D1s with
    /// their ratios rks, and the coefficients b).
    fn common(&self, x: &Tensor, s0: usize, t: usize, order: usize) -> candle_core::Result<Common> {
        let m0 = self.history(1)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;

        // 1. Differences to older outputs, relative to their distance in lambda.
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for i in 1..order {
            let (alpha_si, sigma_si) = alpha_sigma(self.sigmas[s0 - i]);
            let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
            d1s.push(div(&(self.history(i + 1)? - m0)?, rk)?);
            rks.push(rk);
        }
        rks.push(1.0);

        // 2. b_k = h φ_k(h) k! / B(h) for k = 1..order, φ from the exponential integrator.
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1f32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }

        // 3. The first-order part of the update.
        let (x_t_, scale) = if self.config.predict_x0 {
            ((mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * h_phi_1)?)?, alpha_t * b_h)
        } else {
            ((mul(x, alpha_t / alpha_s0)? - mul(m0, sigma_t * h_phi_1)?)?, sigma_t * b_h)
        };
        Ok(Common { x_t_, scale, rks, d1s, b })
    }

    /// UniP: the predictor from step `step`'s sample to the next sigma.
    fn predict(&self, sample: &Tensor, step: usize, order: usize) -> candle_core::Result<Tensor> {
        let c = self.common(sample, step, step + 1, order)?;
        if c.d1s.is_empty() {
            // diffusers subtracts scale · 0 here, which is NaN when B(h) is infinite (bh1 at a zero final sigma).
            return Ok(c.x_t_);
        }
        let rhos = if order == 2 { vec![0.5] } else { solve_vandermonde(&c.rks[..order - 1], &c.b[..order - 1]) };
        let pred_res = weighted_sum(&rhos, &c.d1s)?;
        c.x_t_ - mul(&pred_res, c.scale)?
    }

    /// UniC: corrects `this_sample` (reached from `last_sample` by the previous predictor) with the model output
    /// just computed at it.
    fn correct(
        &self,
        this_model_output: &Tensor,
        last_sample: &Tensor,
        step: usize,
        order: usize,
    ) -> candle_core::Result<Tensor> {
        let c = self.common(last_sample, step - 1, step, order)?;
        let rhos = if order == 1 { vec![0.5] } else { solve_vandermonde(&c.rks, &c.b) };
        let d1_t = (this_model_output - self.history(1)?)?;
        let last_term = mul(&d1_t, rhos[order - 1])?;
        let residual =
            if c.d1s.is_empty() { last_term } else { (weighted_sum(&rhos[..order - 1], &c.d1s)? + last_term)? };
        c.x_t_ - mul(&residual, c.scale)?
    }
}

struct Common {
    x_t_: Tensor,
    scale: f32,
    rks: Vec<f32>,
    d1s: Vec<Tensor>,
    b: Vec<f32>,
}

fn validate(config: &SchedulerConfig, parsed: &UniPcConfig) -> crate::Result<SolverType> {
    let kind = SchedulerKind::UniPc;
    if parsed.solver_order == 0 {
        return Err(config.unsupported(kind, "solver_order 0"));
    }
    respacing_flags(config, kind, [parsed.use_karras_sigmas, parsed.use_exponential_sigmas, parsed.use_beta_sigmas])?;
    let flags = [
        (parsed.thresholding, "thresholding"),
        (parsed.use_beta_sigmas, "use_beta_sigmas"),
        (parsed.use_flow_sigmas, "use_flow_sigmas"),
        (parsed.use_dynamic_shifting, "use_dynamic_shifting"),
    ];
    if let Some((_, name)) = flags.iter().find(|(on, _)| *on) {
        return Err(config.unsupported(kind, name));
    }
    match parsed.solver_type.as_str() {
        "bh1" => Ok(SolverType::Bh1),
        // DPM-Solver's solver names fall back to bh2 in diffusers.
        "bh2" | "midpoint" | "heun" | "logrho" => Ok(SolverType::Bh2),
        other => Err(config.unsupported(kind, format!("solver_type {other:?}"))),
    }
}

/// sum_k weights[k] · tensors[k].
fn weighted_sum(weights: &[f32], tensors: &[Tensor]) -> candle_core::Result<Tensor> {
    let mut sum = mul(&tensors[0], weights[0])?;
    for (w, t) in weights.iter().zip(tensors).skip(1) {
        sum = (sum + mul(t, *w)?)?;
    }
    Ok(sum)
}

/// Solves R ρ = b with R[i][k] = rks[k]^i (the UniPC order conditions), by Gaussian elimination with partial
/// pivoting in f64.
fn solve_vandermonde(rks: &[f32], b: &[f32]) -> Vec<f32> {
    let n = rks.len();
    let mut m: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = rks.iter().map(|&r| (r as f64).powi(i as i32)).collect();
            row.push(b[i] as f64);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs())).unwrap_or(col);
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for row in m.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (value, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *value -= f * p;
            }
        }
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| m[i][k] * x[k]).sum();
        x[i] = (m[i][n] - s) / m[i][i];
    }
    x.into_iter().map(|v| v as f32).collect()
}

impl Scheduler for UniPcScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        mut sample: Tensor,
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        let n = at(&self.timesteps, step_index, "timesteps").map(|_| self.timesteps.len())?;
        let converted = self.convert_model_output(&model_output, &sample, step_index)?;

        // 1. Correct the sample the previous predictor produced.
        let use_corrector = step_index > 0 && !self.config.disable_corrector.contains(&(step_index - 1));
        if let (true, Some(last_sample)) = (use_corrector, &self.last_sample) {
            sample = self.correct(&converted, last_sample, step_index, self.this_order)?;
        }

        // 2. Record the output.
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));

        // 3. Predict the next sample, warming up the order and lowering it for the last steps.
        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final { order.min(n - step_index) } else { order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev_sample = self.predict(&sample, step_index, self.this_order)?;
        self.last_sample = Some(sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(order);
        Ok(prev_sample)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        add_noise_at_sigma(original, noise, at(&self.sigmas[..self.timesteps.len()], step_index, "steps")?)
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::UniPc
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::UniPc);
    }

    #[test]
    fn vandermonde_solve() {
        // R = [[1, 1], [r, 1]] for rks = [r, 1].
        let rho = solve_vandermonde(&[-0.5, 1.0], &[1.0, 0.25]);
        assert!((rho[0] + rho[1] - 1.0).abs() < 1e-6 && (-0.5 * rho[0] + rho[1] - 0.25).abs() < 1e-6);
    }

    /// Where diffusers gives NaN (bh1 at a zero final sigma) the last step lands on its x0 prediction.
    #[test]
    fn bh1_ends_on_the_data_prediction() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap().with("solver_type", "bh1");
        let mut s = UniPcScheduler::new(&cfg, 3).unwrap();
        let mut rng = TorchGenerator::new(0);
        let mut x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        for i in 0..3 {
            let eps = x.affine(0.5, 0.1).unwrap();
            let x0 = s.convert_model_output(&eps, &x, i).unwrap();
            x = s.step(&eps, i, &x, &mut rng).unwrap();
            let diff = crate::test_support::max_abs_diff(&x, &x0);
            if i == 2 {
                assert!(diff < 1e-6, "last step {diff}");
            }
        }
    }

    #[test]
    fn nan_producing_configs_are_rejected() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap();
        assert!(UniPcScheduler::new(&cfg.clone().with("predict_x0", false), 5).is_err());
        assert!(UniPcScheduler::new(&cfg.clone().with("lower_order_final", false), 5).is_err());
        let ok = cfg.with("predict_x0", false).with("final_sigmas_type", "sigma_min");
        assert!(UniPcScheduler::new(&ok, 5).is_ok());
    }
}
