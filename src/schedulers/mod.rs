//! Diffusion schedulers, built from `scheduler_config.json` as diffusers' `from_config` does.
//!
//! A scheduler owns the inference timesteps and turns each model output into the next, less noisy sample.
//! Every scheduler here reproduces one diffusers 0.42.1 class (see `docs/schedulers.md`):
//!
//! | kind | diffusers class | steps taken |
//! | --- | --- | --- |
//! | `ddim` | DDIMScheduler | deterministic DDIM (eta = 0) |
//! | `pndm` | PNDMScheduler | PLMS (after a Runge–Kutta warm-up unless `skip_prk_steps`), SD1.5's default |
//! | `euler` | EulerDiscreteScheduler | Euler in sigma space |
//! | `euler-a` | EulerAncestralDiscreteScheduler | Euler + fresh noise each step |
//! | `dpm++2m` | DPMSolverMultistepScheduler | DPM-Solver++ multistep (order 2 by default) |
//! | `unipc` | UniPCMultistepScheduler | UniPC predictor-corrector |
//! | `heun` | HeunDiscreteScheduler | Heun (2 evaluations per step) |
//! | `lms` | LMSDiscreteScheduler | linear multistep, order 4 |
//! | `dpm2` | KDPM2DiscreteScheduler | DPM-Solver-2 (2 evaluations per step) |
//! | `dpm2-a` | KDPM2AncestralDiscreteScheduler | DPM2 + fresh noise each step |
//! | `dpm++2m-sde` | DPMSolverMultistepScheduler (`sde-dpmsolver++`) | DPM++ 2M + fresh noise each step |
//! | `dpm++sde` | DPMSolverSDEScheduler | DPM++ SDE: 2 evaluations per step, Brownian-tree noise |
//!
//! The two-evaluation schedulers list every timestep but the first twice, so a pipeline loop needs nothing
//! special: it runs the model at each of `timesteps()` in turn. Euler, DPM++ 2M, UniPC, LMS, DPM2, DPM2 a,
//! DPM++ 2M SDE and DPM++ SDE also take Karras or exponential sigmas (`use_karras_sigmas` /
//! `use_exponential_sigmas` in the config, or a [`Sampler`] name such as `dpm++2m-karras` or A1111's
//! "DPM++ 2M Karras").
//!
//! The pipeline loop, as in diffusers:
//! ```ignore
//! let mut s = schedulers::build(None, &config, steps)?;
//! let mut latents = (noise * s.init_noise_sigma())?;
//! for i in 0..s.timesteps().len() {
//!     let input = s.scale_model_input(&latents, i)?;
//!     let out = unet(&input, s.timesteps()[i])?;
//!     latents = s.step(&out, i, &latents, &mut rng)?;
//! }
//! ```
use candle_core::Tensor;

mod brownian;
mod config;
pub mod ddim;
pub mod dpm_sde;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
mod k_schedule;
pub mod kdpm2;
pub mod kdpm2_ancestral;
pub mod lms;
pub mod pndm;
mod sampler;
pub mod schedule;
mod seed_sequence;
pub mod timesteps;
pub mod unipc;

#[cfg(test)]
mod parity;

pub use config::{SchedulerConfig, SchedulerKind, SCHEDULER_CONFIG_FILE, SDE_DPMSOLVER_PP};
pub use ddim::DdimScheduler;
pub use dpm_sde::DpmSolverSdeScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use heun::HeunScheduler;
pub use k_schedule::KConfig;
pub use kdpm2::KDpm2Scheduler;
pub use kdpm2_ancestral::KDpm2AncestralScheduler;
pub use lms::LmsScheduler;
pub use pndm::PndmScheduler;
pub use sampler::{Sampler, SigmaSpacing, A1111_SAMPLERS};
pub use schedule::{BetaSchedule, NoiseSchedule, PredictionType};
pub use timesteps::TimestepSpacing;
pub use unipc::UniPcScheduler;

use crate::rng::TorchGenerator;
use schedule::f32_of;

/// One denoising sampler with its timesteps fixed (diffusers' scheduler after `set_timesteps`).
///
/// Steps are addressed by their index into [`Scheduler::timesteps`]; multistep schedulers keep the model outputs
/// of earlier steps, so `step` must be called once per index, in order.
pub trait Scheduler: Send {
    /// The timesteps to run the model at, in run order. Fractional for Euler with linspace spacing or Karras
    /// sigmas; PNDM repeats one (its PLMS warm-up evaluates the model twice at that timestep).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation to scale the initial Gaussian noise by (1 unless the scheduler works in sigmas).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The model input for step `step_index`: the sample itself, except for Euler-family schedulers, which
    /// divide by `sqrt(sigma² + 1)`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        at(self.timesteps(), step_index, "timesteps")?;
        Ok(sample.clone())
    }

    /// One step: the model's output at `timesteps()[step_index]` for `sample` → the previous (less noisy)
    /// sample. Schedulers that add noise draw it from `rng`, as diffusers does from the pipeline's generator.
    /// Stepped in float32 whatever the model's dtype (diffusers upcasts too); the result comes back in the
    /// model output's dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        let dtype = model_output.dtype();
        let prev_sample = self.step_f32(f32_of(model_output)?, step_index, f32_of(sample)?, rng)?;
        prev_sample.to_dtype(dtype)
    }

    /// [`Scheduler::step`] on float32 tensors: what each scheduler implements.
    fn step_f32(
        &mut self,
        model_output: Tensor,
        step_index: usize,
        sample: Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor>;

    /// Noise `original` to the noise level of step `step_index` (img2img starts there); the same index
    /// diffusers' img2img pipelines pass with `set_begin_index`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor>;

    /// DDIM's eta (the pipeline's `eta=`): the share of fresh noise each step adds. Only DDIM takes it; the
    /// others refuse anything but 0 (diffusers' pipelines silently drop it for them).
    fn set_eta(&mut self, eta: f64) -> crate::Result<()> {
        if eta != 0.0 {
            let msg = format!("{eta} is only used by the ddim scheduler, not {}", self.kind().cli_name());
            return Err(crate::Error::setting("eta", msg));
        }
        Ok(())
    }

    /// What the model predicts (epsilon, v or x0), from the config.
    fn prediction_type(&self) -> PredictionType;

    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;
}

/// Builds the scheduler `kind` (None: the config's own `_class_name`) from `config`, with its timesteps set for
/// `num_inference_steps` steps.
pub fn build(
    kind: Option<SchedulerKind>,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> crate::Result<Box<dyn Scheduler>> {
    let kind = match kind {
        Some(kind) => kind,
        None => config.own_kind()?,
    };
    if num_inference_steps == 0 {
        return Err(crate::Error::setting("steps", "must be at least 1, got 0"));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(EulerScheduler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::new(config, num_inference_steps)?),
        SchedulerKind::DpmSolverMultistep | SchedulerKind::DpmSolverMultistepSde => {
            // One class, two samplers: the kind asked for decides `algorithm_type` (a file's "deis" stays).
            let sde = kind == SchedulerKind::DpmSolverMultistepSde;
            let file_sde = config.get("algorithm_type") == Some(&SDE_DPMSOLVER_PP.into());
            let config = match (sde, file_sde) {
                (true, _) => config.clone().with("algorithm_type", SDE_DPMSOLVER_PP),
                (false, true) => config.clone().with("algorithm_type", "dpmsolver++"),
                (false, false) => config.clone(),
            };
            Box::new(DpmSolverMultistepScheduler::new(&config, num_inference_steps)?)
        }
        SchedulerKind::UniPc => Box::new(UniPcScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Heun => Box::new(HeunScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Lms => Box::new(LmsScheduler::new(config, num_inference_steps)?),
        SchedulerKind::KDpm2 => Box::new(KDpm2Scheduler::new(config, num_inference_steps)?),
        SchedulerKind::KDpm2Ancestral => Box::new(KDpm2AncestralScheduler::new(config, num_inference_steps)?),
        SchedulerKind::DpmSolverSde => Box::new(DpmSolverSdeScheduler::new(config, num_inference_steps)?),
    })
}

/// [`build`] for a [`Sampler`] (None: the config's own class): its sigma spacing, if it forces one, is set in
/// the config first, as `Class.from_config(config, use_karras_sigmas=True)` does.
pub fn build_sampler(
    sampler: Option<Sampler>,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> crate::Result<Box<dyn Scheduler>> {
    match sampler {
        None => build(None, config, num_inference_steps),
        Some(s) => {
            let s = Sampler::new(s.kind, s.sigmas)?;
            build(Some(s.kind), &s.apply(config), num_inference_steps)
        }
    }
}

/// `values[step_index]`, or an error naming the step if the index is past the end.
fn at<T: Copy>(values: &[T], step_index: usize, what: &str) -> candle_core::Result<T> {
    match values.get(step_index) {
        Some(&v) => Ok(v),
        None => candle_core::bail!("step index {step_index} is past the {} {what}", values.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/scheduler");
    const SD2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd2/scheduler");
    const LEGACY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedulers/configs/sd15-legacy");

    #[test]
    fn own_class_is_the_default() {
        let sd15 = SchedulerConfig::from_file(SD15).unwrap();
        let s = build(None, &sd15, 4).unwrap();
        assert_eq!(s.kind(), SchedulerKind::Pndm);
        let sd2 = SchedulerConfig::from_file(SD2).unwrap();
        let s = build(None, &sd2, 4).unwrap();
        assert_eq!(s.kind(), SchedulerKind::Ddim);
        assert_eq!(s.prediction_type(), PredictionType::VPrediction);
    }

    /// The brief's example: Euler built from SD1.5's PNDM config inherits leading spacing and steps_offset 1.
    #[test]
    fn euler_inherits_the_sd15_spacing() {
        let sd15 = SchedulerConfig::from_file(SD15).unwrap();
        let s = build(Some(SchedulerKind::Euler), &sd15, 4).unwrap();
        assert_eq!(s.timesteps(), [751.0, 501.0, 251.0, 1.0]);
    }

    /// Keys missing from the file get the TARGET class's defaults, not the source class's: the original SD1.5
    /// file lacks `timestep_spacing`, so Euler uses its own "linspace" (PNDM's default would be "leading").
    #[test]
    fn missing_keys_take_the_target_defaults() {
        let legacy = SchedulerConfig::from_file(LEGACY).unwrap();
        let euler = build(Some(SchedulerKind::Euler), &legacy, 4).unwrap();
        assert_eq!(euler.timesteps(), [999.0, 666.0, 333.0, 0.0]);
        let pndm = build(None, &legacy, 4).unwrap();
        assert_eq!(pndm.timesteps(), [751.0, 501.0, 501.0, 251.0, 1.0]);
        // DDIM takes `clip_sample: false` from the file although PNDM (its own class) ignores the key.
        let ddim = DdimScheduler::new(&legacy, 4).unwrap();
        assert!(!ddim.config().clip_sample);
        let ddim = DdimScheduler::new(&SchedulerConfig::from_file(SD15).unwrap(), 4).unwrap();
        assert!(ddim.config().clip_sample, "DDIM's own default is clip_sample = true");
    }

    /// A Karras sampler name changes the sigmas of a config that has none, and an invalid pair is refused.
    #[test]
    fn sampler_spacing_reaches_the_scheduler() {
        let sd15 = SchedulerConfig::from_file(SD15).unwrap();
        let plain = build_sampler(Some(SchedulerKind::Euler.into()), &sd15, 10).unwrap();
        let karras: Sampler = "Euler Karras".parse().unwrap();
        let karras = build_sampler(Some(karras), &sd15, 10).unwrap();
        let reference = build(Some(SchedulerKind::Euler), &sd15.clone().with("use_karras_sigmas", true), 10).unwrap();
        assert_ne!(plain.timesteps(), karras.timesteps());
        assert_eq!(karras.timesteps(), reference.timesteps());
        let bad = Sampler { kind: SchedulerKind::EulerAncestral, sigmas: Some(SigmaSpacing::Karras) };
        let err = build_sampler(Some(bad), &sd15, 10).err().unwrap().to_string();
        assert!(err.contains("euler-a") && err.contains("Karras"), "{err}");
        assert_eq!(build_sampler(None, &sd15, 4).unwrap().kind(), SchedulerKind::Pndm);
    }

    #[test]
    fn zero_steps_is_an_error() {
        let sd15 = SchedulerConfig::from_file(SD15).unwrap();
        for kind in SchedulerKind::ALL {
            let err = build(Some(kind), &sd15, 0).err().unwrap().to_string();
            assert!(err.contains("at least 1"), "{kind}: {err}");
        }
        let err = build(Some(SchedulerKind::Ddim), &sd15, 1001).err().unwrap().to_string();
        assert!(err.contains("1001"), "{err}");
    }

    #[test]
    fn bad_values_name_the_file_and_class() {
        let cfg = SchedulerConfig::from_json_str(r#"{"beta_schedule": "cosine"}"#, "my/scheduler_config.json").unwrap();
        let err = build(Some(SchedulerKind::Euler), &cfg, 4).err().unwrap().to_string();
        assert!(err.contains("my/scheduler_config.json"), "{err}");
        assert!(err.contains("EulerDiscreteScheduler") && err.contains("cosine"), "{err}");
    }

    #[test]
    fn every_kind_builds_from_both_tiny_configs() {
        for dir in [SD15, SD2] {
            let cfg = SchedulerConfig::from_file(dir).unwrap();
            for kind in SchedulerKind::ALL {
                let s = build(Some(kind), &cfg, 10).unwrap();
                assert_eq!(s.kind(), kind);
                assert!(!s.timesteps().is_empty());
            }
        }
    }

    #[test]
    fn step_index_past_the_end_is_an_error() {
        let sd15 = SchedulerConfig::from_file(SD15).unwrap();
        let sample = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut rng = TorchGenerator::new(0);
        for kind in SchedulerKind::ALL {
            let mut s = build(Some(kind), &sd15, 3).unwrap();
            let past = s.timesteps().len();
            assert!(s.step(&sample, past, &sample, &mut rng).is_err(), "{kind}");
            assert!(s.scale_model_input(&sample, past).is_err(), "{kind}");
            assert!(s.add_noise(&sample, &sample, past).is_err(), "{kind}");
        }
    }

    /// Every scheduler the README lists runs on every bundled model's scheduler config (the demo base and the
    /// tiny fixtures), for the default step count and a short run: timesteps set, every step taken, the result
    /// finite. (PNDM on a config without `skip_prk_steps` takes the Runge–Kutta warm-up.)
    #[test]
    fn every_kind_runs_on_every_bundled_model() {
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/base/scheduler");
        let sample = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        for dir in [demo, SD15, SD2] {
            let cfg = SchedulerConfig::from_file(dir).unwrap();
            for kind in SchedulerKind::ALL {
                for steps in [4, 20] {
                    let mut s = build(Some(kind), &cfg, steps).unwrap_or_else(|e| panic!("{dir} {kind}: {e}"));
                    let mut rng = TorchGenerator::new(0);
                    let mut x = (&sample * s.init_noise_sigma()).unwrap();
                    for i in 0..s.timesteps().len() {
                        let out = (s.scale_model_input(&x, i).unwrap() * 0.5).unwrap();
                        x = s.step(&out, i, &x, &mut rng).unwrap_or_else(|e| panic!("{dir} {kind} step {i}: {e}"));
                    }
                    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert!(v.iter().all(|x| x.is_finite()), "{dir} {kind} {steps}: {v:?}");
                }
            }
        }
    }
}
