//! Choosing the inference timesteps and their sigmas, as diffusers does with numpy.
//!
//! diffusers computes these in float64 numpy; the helpers here reproduce numpy's `linspace`, `arange` (with a
//! float step), `round` (half to even) and `interp` exactly, because a timestep that is off by one changes which
//! noise level the model is told it sees.
use serde::Deserialize;

/// How inference timesteps are spread over the training range (`timestep_spacing`; see Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    /// Multiples of `num_train_timesteps / steps` counted up from 0, plus `steps_offset`.
    #[serde(rename = "leading")]
    Leading,
    /// Multiples counted down from the last training timestep (always includes t = 999).
    #[serde(rename = "trailing")]
    Trailing,
    /// Evenly spaced from 0 to the last training timestep.
    #[serde(rename = "linspace")]
    Linspace,
}

impl TimestepSpacing {
    pub(crate) fn leading() -> Self {
        TimestepSpacing::Leading
    }
    pub(crate) fn linspace() -> Self {
        TimestepSpacing::Linspace
    }
}

/// The largest usable timestep count: more steps than training timesteps would repeat timesteps.
pub(crate) fn check_steps(num_inference_steps: usize, num_train_timesteps: usize) -> crate::Result<()> {
    if num_inference_steps == 0 {
        return Err(crate::Error::setting("steps", "must be at least 1, got 0"));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(crate::Error::setting(
            "steps",
            format!("{num_inference_steps} is more than the scheduler's {num_train_timesteps} training timesteps"),
        ));
    }
    Ok(())
}

/// Timesteps past the training range: with "leading" spacing and `steps_offset` 1 (SD's config), 1000 steps
/// reach timestep 1000, where diffusers fails too. It is the step count that is too high for this config, so
/// the error names `steps`.
pub(crate) fn check_in_range(
    timesteps: &[f64],
    num_train: usize,
    steps_offset: usize,
    config_path: &std::path::Path,
) -> crate::Result<()> {
    let Some(t) = timesteps.iter().find(|&&t| t < 0.0 || t >= num_train as f64) else {
        return Ok(());
    };
    Err(crate::Error::setting(
        "steps",
        format!(
            "{} steps reach timestep {t}, outside the {num_train} training timesteps, with this scheduler config \
             (steps_offset {steps_offset}, {}); use fewer steps",
            timesteps.len(),
            config_path.display()
        ),
    ))
}

/// Descending timesteps of the single-step schedulers (DDIM, PNDM, Euler): `n` of them over `num_train`.
/// `round_linspace` is false for Euler, which keeps the fractional linspace values.
pub(crate) fn single_step_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
    round_linspace: bool,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let values = np_linspace(0.0, (num_train - 1) as f64, n);
            let values = values.into_iter().map(|v| if round_linspace { v.round_ties_even() } else { v });
            values.rev().collect()
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange(num_train as f64, 0.0, -ratio).into_iter().map(|v| v.round_ties_even() - 1.0).collect()
        }
    }
}

/// Descending timesteps of the multistep solvers (DPM-Solver, UniPC): they space `n + 1` points and drop the
/// last (t = 0), up to `last_timestep` (below `num_train` when DPM-Solver clips small lambdas).
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let values = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
            values.into_iter().map(f64::round_ties_even).rev().take(n).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            // diffusers divides the full training range here, even when `last_timestep` is clipped.
            let ratio = num_train as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio).into_iter().map(|v| v.round_ties_even() - 1.0).collect()
        }
    }
}

/// `numpy.linspace(start, stop, num)` (endpoint included) with numpy's arithmetic: `i * step + start`, the last
/// value set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `numpy.arange(start, stop, step)` for a float step: `ceil((stop - start) / step)` values, the i-th computed
/// as `start + i * delta` with `delta = (start + step) - start` (numpy's fill loop).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.interp(x, arange(len(table)), table)`: linear interpolation in a table indexed by timestep, clamped at
/// both ends.
pub fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x.is_nan() || x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return table[j] as f64;
    }
    // numpy: slope * (x - xp[j]) + fp[j], the x spacing being 1.
    let slope = table[j + 1] as f64 - table[j] as f64;
    slope * (x - j as f64) + table[j] as f64
}

/// `log` of the training sigmas as diffusers keeps them: float32.
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, by linear interpolation in log-sigma between the two
/// neighbouring training timesteps (diffusers' `_sigma_to_t`).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last training timestep whose log-sigma is <= log_sigma (0 if none), kept below the final one.
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The exponent of the Karras et al. (2022) noise schedule ("Elucidating the Design Space…", eq. 5).
const KARRAS_RHO: f64 = 7.0;

/// `n` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in sigma^(1/rho): denser near low noise.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let min_inv_rho = sigma_min.powf(1.0 / KARRAS_RHO);
    let max_inv_rho = sigma_max.powf(1.0 / KARRAS_RHO);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
        .collect()
}

/// `n` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in log-sigma (diffusers'
/// `_convert_to_exponential`: `exp(linspace(log max, log min, n))` in f64).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
}

/// Which of diffusers' respacing flags (`use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`) are on;
/// diffusers refuses more than one.
pub(crate) fn respacing_flags(
    config: &super::SchedulerConfig,
    kind: super::SchedulerKind,
    flags: [bool; 3],
) -> crate::Result<()> {
    if flags.iter().filter(|&&on| on).count() > 1 {
        return Err(crate::Error::config(
            &config.path,
            format!(
                "{}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set",
                kind.class_name()
            ),
        ));
    }
    Ok(())
}

/// What the last sigma of the schedule is (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FinalSigmas {
    /// Denoise all the way: the last step lands on sigma = 0.
    #[serde(rename = "zero")]
    Zero,
    /// Stop at the smallest training sigma.
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

impl FinalSigmas {
    pub(crate) fn zero() -> Self {
        FinalSigmas::Zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers_examples() {
        use TimestepSpacing::*;
        // Values printed by diffusers 0.42.1 for 1000 training timesteps.
        assert_eq!(single_step_timesteps(Leading, 1000, 4, 1, true), [751.0, 501.0, 251.0, 1.0]);
        assert_eq!(single_step_timesteps(Trailing, 1000, 7, 0, true), [999., 856., 713., 570., 428., 285., 142.]);
        assert_eq!(single_step_timesteps(Linspace, 1000, 7, 0, false), [999., 832.5, 666., 499.5, 333., 166.5, 0.]);
        assert_eq!(single_step_timesteps(Linspace, 1000, 7, 0, true), [999., 832., 666., 500., 333., 166., 0.]);
        assert_eq!(multistep_timesteps(Leading, 1000, 1000, 7, 1), [876., 751., 626., 501., 376., 251., 126.]);
        assert_eq!(multistep_timesteps(Linspace, 1000, 1000, 7, 0), [999., 856., 714., 571., 428., 285., 143.]);
        assert_eq!(multistep_timesteps(Trailing, 1000, 1000, 9, 0)[..3], [999., 888., 777.]);
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), [0.0]);
        assert_eq!(np_arange(1000.0, 0.0, -250.0), [1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_arange(0.0, 1.0, -1.0), Vec::<f64>::new());
        assert_eq!(interp(1.5, &[1.0, 2.0, 4.0]), 3.0);
        assert_eq!(interp(-1.0, &[1.0, 2.0]), 1.0);
        assert_eq!(interp(7.0, &[1.0, 2.0]), 2.0);
        // Ties round to even, like numpy.
        assert_eq!(937.5f64.round_ties_even(), 938.0);
        assert_eq!(812.5f64.round_ties_even(), 812.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas: Vec<f32> = (1..=10).map(|i| i as f32 * 0.5).collect();
        let logs = log_sigmas(&sigmas);
        assert!((sigma_to_t(sigmas[3] as f64, &logs) - 3.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
    }

    #[test]
    fn karras_spans_min_to_max() {
        let s = karras_sigmas(0.03, 14.6, 5);
        assert!((s[0] - 14.6).abs() < 1e-9 && (s[4] - 0.03).abs() < 1e-9);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn exponential_is_even_in_log_sigma() {
        let s = exponential_sigmas(0.03, 14.6, 5);
        assert!((s[0] - 14.6).abs() < 1e-9 && (s[4] - 0.03).abs() < 1e-9);
        let ratios: Vec<f64> = s.windows(2).map(|w| w[0] / w[1]).collect();
        assert!(ratios.iter().all(|r| (r - ratios[0]).abs() < 1e-9), "{ratios:?}");
    }

    #[test]
    fn step_count_limits() {
        assert!(check_steps(0, 1000).unwrap_err().to_string().contains("at least 1"));
        assert!(check_steps(1001, 1000).is_err());
        assert!(check_steps(1000, 1000).is_ok());
    }
}
