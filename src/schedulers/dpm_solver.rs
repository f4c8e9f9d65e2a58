//! DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models"): diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`.
//! With `solver_order = 2` (the default) this is the "DPM++ 2M" sampler (Karras sigmas: "DPM++ 2M Karras").
//! `algorithm_type = "sde-dpmsolver++"` is the stochastic variant, "DPM++ 2M SDE": each step also decays the
//! sample by e^{-h} and adds fresh noise of size sigma_t · sqrt(1 − e^{-2h}), drawn from the pipeline's
//! generator at every step, as diffusers draws it.
//!
//! The solver works in log-SNR time lambda = log(alpha_t / sigma_t) on data predictions x0: a first-order step
//! is exact for a constant x0, and higher orders extrapolate x0 from the previous steps' predictions.
use candle_core::Tensor;
use serde::{Deserialize, Deserializer};

use super::schedule::{
    add_noise_at_sigma, alpha_sigma, div, lambda, mul, sigma_of, BetaConfig, BetaSchedule, NoiseSchedule,
    PredictionType,
};
use super::timesteps::{
    check_steps, exponential_sigmas, interp, karras_sigmas, log_sigmas, multistep_timesteps, respacing_flags,
    sigma_to_t,
};
use super::timesteps::{FinalSigmas, TimestepSpacing};
use super::{at, Scheduler, SchedulerConfig, SchedulerKind, SDE_DPMSOLVER_PP};
use crate::rng::TorchGenerator;

/// Below this many steps, `lower_order_final` also lowers the last steps' order (stabilises few-step runs).
const LOWER_ORDER_FINAL_BELOW_STEPS: usize = 15;

/// `DPMSolverMultistepScheduler.__init__` arguments with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct DpmSolverConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    /// 1, 2 or 3: how many past model outputs each step uses (2 for guided sampling).
    #[serde(default = "two")]
    pub solver_order: usize,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub thresholding: bool,
    /// "dpmsolver++" or "sde-dpmsolver++" ("deis" is mapped to the first, as diffusers does).
    #[serde(default = "dpmsolver_pp")]
    pub algorithm_type: String,
    /// Second-order formula: "midpoint" (default) or "heun".
    #[serde(default = "midpoint")]
    pub solver_type: String,
    /// Use first order for the last step (and second order for the one before) below 15 steps.
    #[serde(default = "yes")]
    pub lower_order_final: bool,
    /// Always end with a first-order (Euler) step.
    #[serde(default)]
    pub euler_at_final: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_lu_lambdas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "FinalSigmas::zero")]
    pub final_sigmas_type: FinalSigmas,
    /// Skip timesteps whose lambda is below this (cosine schedules); -inf = keep all.
    #[serde(default = "minus_infinity", deserialize_with = "number_or_infinity")]
    pub lambda_min_clipped: f64,
    /// "learned"/"learned_range" models (6-channel output) are not supported.
    #[serde(default)]
    pub variance_type: Option<String>,
    #[serde(default = "TimestepSpacing::linspace")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn dpmsolver_pp() -> String {
    "dpmsolver++".into()
}
fn midpoint() -> String {
    "midpoint".into()
}
fn minus_infinity() -> f64 {
    f64::NEG_INFINITY
}

/// A float that Python's `json` may have written as `-Infinity` / `Infinity` (quoted by
/// [`SchedulerConfig::from_json_str`]).
fn number_or_infinity<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(f64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Number(v) => Ok(v),
        Raw::Text(t) => match t.as_str() {
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "Infinity" => Ok(f64::INFINITY),
            other => Err(serde::de::Error::custom(format!("expected a number, found {other:?}"))),
        },
    }
}

/// The second-order update formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    solver_type: SolverType,
    /// `algorithm_type = "sde-dpmsolver++"`: noise is added at every step.
    sde: bool,
    timesteps: Vec<f64>,
    /// One sigma per step plus the final one, float32.
    sigmas: Vec<f32>,
    /// x0 predictions of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    /// Steps taken so far, capped at `solver_order` (the warm-up uses lower orders).
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> crate::Result<Self> {
        let kind = SchedulerKind::DpmSolverMultistep;
        let parsed: DpmSolverConfig = config.parse(kind)?;
        let solver_type = validate(config, &parsed)?;
        let parsed_sde = parsed.algorithm_type == SDE_DPMSOLVER_PP;

        // 1. Training schedule.
        let schedule = NoiseSchedule::for_sigma_samplers(&parsed.betas, parsed.rescale_betas_zero_snr)?;
        let num_train = schedule.num_train_timesteps();
        check_steps(num_inference_steps, num_train)?;
        let train_sigmas = schedule.sigmas();

        // 2. Timesteps, stopping before the lambdas clipped by `lambda_min_clipped`.
        let clipped = clipped_timesteps(&schedule, parsed.lambda_min_clipped);
        let mut timesteps = multistep_timesteps(
            parsed.timestep_spacing,
            num_train,
            num_train - clipped,
            num_inference_steps,
            parsed.steps_offset,
        );

        // 3. Sigmas: Karras-respaced over the whole training range, or interpolated at the timesteps.
        let sigmas: Vec<f64> = if parsed.use_karras_sigmas {
            let sigmas = karras_sigmas(train_sigmas[0] as f64, train_sigmas[num_train - 1] as f64, num_inference_steps);
            let logs = log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
            if parsed.betas.beta_schedule != BetaSchedule::SquaredcosCapV2 {
                timesteps.iter_mut().for_each(|t| *t = t.round_ties_even());
            }
            sigmas
        } else if parsed.use_exponential_sigmas {
            // Unlike Karras, diffusers does not round these timesteps (the int64 cast below truncates them).
            let sigmas =
                exponential_sigmas(train_sigmas[0] as f64, train_sigmas[num_train - 1] as f64, num_inference_steps);
            let logs = log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect()
        };
        // diffusers stores the timesteps as int64 (truncating any fraction left by the cosine schedule).
        timesteps.iter_mut().for_each(|t| *t = t.trunc());
        let last = match parsed.final_sigmas_type {
            FinalSigmas::SigmaMin => sigma_of(schedule.alphas_cumprod[0]),
            FinalSigmas::Zero => 0.0,
        };
        let sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        Ok(Self {
            model_outputs: vec![None; parsed.solver_order],
            config: parsed,
            solver_type,
            sde: parsed_sde,
            timesteps,
            sigmas,
            lower_order_nums: 0,
        })
    }

    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    /// The sigma of every step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The model output as a data (x0) prediction (DPM-Solver++ works on x0).
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        match self.config.prediction_type {
            PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t),
            PredictionType::Sample => Ok(model_output.clone()),
            PredictionType::VPrediction => mul(sample, alpha_t)? - mul(model_output, sigma_t)?,
        }
    }

    /// First order (DDIM-like): x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) x0; the SDE variant
    /// x_t = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) x0 + sigma_t sqrt(1 - e^{-2h}) noise.
    fn first_order_update(
        &self,
        x0: &Tensor,
        sample: &Tensor,
        step: usize,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match noise {
            None => mul(sample, sigma_t / sigma_s)? - mul(x0, alpha_t * ((-h).exp() - 1.0))?,
            Some(noise) => {
                let x_t = (mul(sample, sigma_t / sigma_s * (-h).exp())? + mul(x0, alpha_t * sde_decay(h))?)?;
                x_t + sde_noise(noise, sigma_t, h)?
            }
        }
    }

    /// Second order from the last two x0 predictions (DPM-Solver++(2M), Algorithm 2 of the paper; with noise:
    /// SDE-DPM-Solver++(2M)).
    fn second_order_update(&self, sample: &Tensor, step: usize, noise: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (m0, m1) = (self.history(1)?, self.history(2)?);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
        let (lambda_t, lambda_s0, lambda_s1) =
            (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0), lambda(alpha_s1, sigma_s1));
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        if let Some(noise) = noise {
            let decay = alpha_t * sde_decay(h);
            let x_t = (mul(sample, sigma_t / sigma_s0 * (-h).exp())? + mul(m0, decay)?)?;
            let x_t = match self.solver_type {
                SolverType::Midpoint => (x_t + mul(&d1, 0.5 * decay)?)?,
                SolverType::Heun => (x_t + mul(&d1, alpha_t * (sde_decay(h) / (-2.0 * h) + 1.0))?)?,
            };
            return x_t + sde_noise(noise, sigma_t, h)?;
        }
        let exp_term = alpha_t * ((-h).exp() - 1.0);
        let x_t = (mul(sample, sigma_t / sigma_s0)? - mul(m0, exp_term)?)?;
        match self.solver_type {
            SolverType::Midpoint => x_t - mul(&d1, 0.5 * exp_term)?,
            SolverType::Heun => x_t + mul(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?,
        }
    }

    /// Third order from the last three x0 predictions (DPM-Solver++(3M), or its SDE variant with noise).
    fn third_order_update(&self, sample: &Tensor, step: usize, noise: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (m0, m1, m2) = (self.history(1)?, self.history(2)?, self.history(3)?);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[step - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let (lambda_s0, lambda_s1, lambda_s2) =
            (lambda(alpha_s0, sigma_s0), lambda(alpha_s1, sigma_s1), lambda(alpha_s2, sigma_s2));
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let d1 = (&d1_0 + mul(&(&d1_0 - &d1_1)?, r0 / (r0 + r1))?)?;
        let d2 = mul(&(&d1_0 - &d1_1)?, 1.0 / (r0 + r1))?;
        if let Some(noise) = noise {
            let decay = sde_decay(h);
            let x_t = (mul(sample, sigma_t / sigma_s0 * (-h).exp())? + mul(m0, alpha_t * decay)?)?;
            let x_t = (x_t + mul(&d1, alpha_t * (decay / (-2.0 * h) + 1.0))?)?;
            let two_h = 2.0 * h;
            let x_t = (x_t + mul(&d2, alpha_t * ((1.0 - (-2.0 * h).exp() - two_h) / (two_h * two_h) - 0.5))?)?;
            return x_t + sde_noise(noise, sigma_t, h)?;
        }
        let e = (-h).exp() - 1.0;
        let x_t = (mul(sample, sigma_t / sigma_s0)? - mul(m0, alpha_t * e)?)?;
        let x_t = (x_t + mul(&d1, alpha_t * (e / h + 1.0))?)?;
        x_t - mul(&d2, alpha_t * ((e + h) / (h * h) - 0.5))?
    }

    /// The x0 prediction `back` steps ago (1 = this step's).
    fn history(&self, back: usize) -> candle_core::Result<&Tensor> {
        match self.model_outputs.len().checked_sub(back).and_then(|i| self.model_outputs[i].as_ref()) {
            Some(t) => Ok(t),
            None => candle_core::bail!("DPM-Solver: no model output from {back} steps ago (steps must run in order)"),
        }
    }
}

/// `1 - e^{-2h}`: how much of x0 an SDE step takes in (float32, diffusers' order).
fn sde_decay(h: f32) -> f32 {
    1.0 - (-2.0 * h).exp()
}

/// The SDE step's fresh noise: `sigma_t · sqrt(1 - e^{-2h}) · noise`.
fn sde_noise(noise: &Tensor, sigma_t: f32, h: f32) -> candle_core::Result<Tensor> {
    mul(noise, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())
}

/// Rejects the options diffusers has that this port does not implement; returns the second-order formula.
fn validate(config: &SchedulerConfig, parsed: &DpmSolverConfig) -> crate::Result<SolverType> {
    let kind = SchedulerKind::DpmSolverMultistep;
    // "deis" is diffusers' alias for dpmsolver++ in this class.
    if !["dpmsolver++", "deis", SDE_DPMSOLVER_PP].contains(&parsed.algorithm_type.as_str()) {
        let what =
            format!("algorithm_type {:?} (only \"dpmsolver++\" and \"{SDE_DPMSOLVER_PP}\")", parsed.algorithm_type);
        return Err(config.unsupported(kind, what));
    }
    if !(1..=3).contains(&parsed.solver_order) {
        return Err(config.unsupported(kind, format!("solver_order {}", parsed.solver_order)));
    }
    respacing_flags(config, kind, [parsed.use_karras_sigmas, parsed.use_exponential_sigmas, parsed.use_beta_sigmas])?;
    let flags = [
        (parsed.thresholding, "thresholding"),
        (parsed.use_beta_sigmas, "use_beta_sigmas"),
        (parsed.use_lu_lambdas, "use_lu_lambdas"),
        (parsed.use_flow_sigmas, "use_flow_sigmas"),
        (parsed.use_dynamic_shifting, "use_dynamic_shifting"),
        (parsed.variance_type.is_some(), "variance_type"),
    ];
    if let Some((_, name)) = flags.iter().find(|(on, _)| *on) {
        return Err(config.unsupported(kind, name));
    }
    match parsed.solver_type.as_str() {
        // UniPC's and DEIS's solver names fall back to midpoint in diffusers.
        "midpoint" | "bh1" | "bh2" | "logrho" => Ok(SolverType::Midpoint),
        "heun" => Ok(SolverType::Heun),
        other => Err(config.unsupported(kind, format!("solver_type {other:?}"))),
    }
}

/// How many of the smallest timesteps `lambda_min_clipped` removes: `searchsorted` of the clip value in the
/// ascending (flipped) lambda table, in float32 like diffusers.
fn clipped_timesteps(schedule: &NoiseSchedule, lambda_min_clipped: f64) -> usize {
    let clip = lambda_min_clipped as f32;
    schedule
        .alphas_cumprod
        .iter()
        .rev()
        .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
        .take_while(|&l| l < clip)
        .count()
}

impl Scheduler for DpmSolverMultistepScheduler {
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
        let n = self.timesteps.len();
        at(&self.timesteps, step_index, "timesteps")?;
        // 1. Which order this step may use.
        let few_steps = self.config.lower_order_final && n < LOWER_ORDER_FINAL_BELOW_STEPS;
        let lower_order_final = step_index == n - 1
            && (self.config.euler_at_final || few_steps || self.config.final_sigmas_type == FinalSigmas::Zero);
        let lower_order_second = n >= 2 && step_index == n - 2 && few_steps;

        // 2. Record this step's x0 prediction.
        let x0 = self.convert_model_output(&model_output, &sample, step_index)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.clone()));
        // 3. The SDE variant's noise, drawn at every step (diffusers: randn_tensor(shape, generator), float32).
        let noise = match self.sde {
            true => Some(rng.randn_tensor(model_output.dims(), model_output.device())?),
            false => None,
        };
        let noise = noise.as_ref();

        // 4. Update.
        let order = self.config.solver_order;
        let prev_sample = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&x0, &sample, step_index, noise)?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(&sample, step_index, noise)?
        } else {
            self.third_order_update(&sample, step_index, noise)?
        };
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
        if self.sde {
            SchedulerKind::DpmSolverMultistepSde
        } else {
            SchedulerKind::DpmSolverMultistep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parity::run_cases;
    use super::*;

    #[test]
    fn matches_diffusers_rollouts() {
        run_cases(SchedulerKind::DpmSolverMultistep);
    }

    /// "DPM++ 2M SDE": the noise drawn from a generator seeded like diffusers'.
    #[test]
    fn sde_matches_diffusers_rollouts() {
        run_cases(SchedulerKind::DpmSolverMultistepSde);
    }

    /// Python's json writes -inf as `-Infinity`; configs saved by diffusers contain it.
    #[test]
    fn reads_python_infinity() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "algorithm_type": "dpmsolver++", "note": "-Infinity in a string stays"}"#;
        let cfg = SchedulerConfig::from_json_str(text, "dpm.json").unwrap();
        assert_eq!(cfg.get("note").unwrap(), "-Infinity in a string stays");
        let s = DpmSolverMultistepScheduler::new(&cfg, 5).unwrap();
        assert_eq!(s.config().lambda_min_clipped, f64::NEG_INFINITY);
    }

    #[test]
    fn unsupported_options_are_rejected() {
        for json in [
            r#"{"algorithm_type": "sde-dpmsolver"}"#,
            r#"{"solver_order": 4}"#,
            r#"{"use_lu_lambdas": true}"#,
            r#"{"variance_type": "learned_range"}"#,
            r#"{"thresholding": true}"#,
        ] {
            let cfg = SchedulerConfig::from_json_str(json, "d.json").unwrap();
            let err = DpmSolverMultistepScheduler::new(&cfg, 4).err().unwrap().to_string();
            assert!(err.contains("not supported") && err.contains("d.json"), "{json}: {err}");
        }
    }
}
