//! Parity harness: replays the rollouts of `tools/fixtures/gen_schedulers.py` against diffusers' numbers.
//!
//! Each case builds a scheduler from a committed config (plus overrides, like `from_config(..., **kwargs)`),
//! checks its timesteps, init_noise_sigma and add_noise, then denoises the saved noise with the fake model
//! `0.5 * scaled_sample + 0.1 * cos(t / 100)` twice:
//! 1. step by step: every step starts from diffusers' sample of the step before, so each step is compared on
//!    its own. Metric: max |ours - diffusers| <= 1e-5 * max(1, max |diffusers output|, max |step input|). The
//!    input term matters where a step cancels a large sample (zero-terminal-SNR starts at sigma = 4096): float32
//!    rounding of the input alone is then ~1e-3 of the output, in diffusers as much as here.
//! 2. free-running, from our own samples, as a pipeline runs, where errors could accumulate: metric
//!    max |ours - diffusers| <= 1e-5 * max(1, largest |sample| of the run so far). Here Euler ancestral draws
//!    its noise through `Scheduler::step` from a `TorchGenerator` seeded like diffusers' generator; in 1. it
//!    gets the noise diffusers drew (`step_with_noise`), so a generator bug and a scheduler bug show apart.
//!
//! Measured worst case over all fixtures: 7e-7 of the scale.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{build, EulerAncestralScheduler, Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchGenerator;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const TOLERANCE: f32 = 1e-5;

#[derive(Deserialize)]
struct Case {
    name: String,
    /// CLI name of the target scheduler; None = the config's own class.
    scheduler: Option<String>,
    /// Source config folder, relative to tests/fixtures.
    config: String,
    overrides: Map<String, Value>,
    steps: usize,
    /// The diffusers class that ran.
    class: String,
    prediction_type: String,
    /// DDIM's eta (the pipeline's `eta=`); 0 elsewhere.
    #[serde(default)]
    eta: f64,
}

impl Case {
    /// The scheduler under test: the requested CLI name (which tells DPM++ 2M SDE from DPM++ 2M, one diffusers
    /// class), or the config's own class.
    fn kind(&self) -> SchedulerKind {
        match &self.scheduler {
            Some(name) => name.parse().unwrap_or_else(|e| panic!("{}: {e}", self.name)),
            None => SchedulerKind::from_class_name(&self.class).unwrap_or_else(|e| panic!("{}: {e}", self.name)),
        }
    }
}

/// Runs every fixture case of scheduler `kind`.
pub(super) fn run_cases(kind: SchedulerKind) {
    let manifest = std::fs::read_to_string(format!("{FIXTURES}/schedulers/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&manifest).unwrap();
    let mine: Vec<&Case> = cases.iter().filter(|c| c.kind() == kind).collect();
    assert!(!mine.is_empty(), "no fixture cases for {kind}");
    for case in mine {
        run_case(case, kind);
    }
}

/// Euler ancestral as its concrete type (stepped with the noise diffusers drew), or any scheduler as a trait object.
enum UnderTest {
    Boxed(Box<dyn Scheduler>),
    Ancestral(EulerAncestralScheduler),
}

impl UnderTest {
    fn scheduler(&self) -> &dyn Scheduler {
        match self {
            UnderTest::Boxed(s) => s.as_ref(),
            UnderTest::Ancestral(s) => s,
        }
    }
}

fn run_case(case: &Case, kind: SchedulerKind) {
    let name = &case.name;
    let reference =
        candle_core::safetensors::load(format!("{FIXTURES}/schedulers/{name}.safetensors"), &Device::Cpu).unwrap();

    // 1. Schedule.
    let under_test = build_case(case, kind, true);
    let s = under_test.scheduler();
    assert_eq!(s.kind(), kind, "{name}");
    assert_eq!(s.prediction_type().to_string(), case.prediction_type, "{name}");
    let expected_timesteps = timesteps_of(&reference["timesteps"]);
    assert_eq!(s.timesteps().len(), expected_timesteps.len(), "{name}: timestep count");
    for (i, (&ours, &theirs)) in s.timesteps().iter().zip(&expected_timesteps).enumerate() {
        assert!((ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0), "{name}: timestep {i}: {ours} vs {theirs}");
    }
    let init_noise_sigma = reference["init_noise_sigma"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (s.init_noise_sigma() - init_noise_sigma).abs() <= 1e-6 * init_noise_sigma.max(1.0),
        "{name}: init_noise_sigma {} vs {init_noise_sigma}",
        s.init_noise_sigma()
    );

    // 2. add_noise at the middle step.
    let add_index = reference["add_noise_index"].to_vec1::<i64>().unwrap()[0] as usize;
    let noised = s.add_noise(&reference["add_noise_x0"], &reference["noise"], add_index).unwrap();
    assert_close(&noised, &reference["add_noise_out"], 1.0, TOLERANCE, &format!("{name}: add_noise"));

    let expected = unstack(&reference["samples"]);
    let scaled = reference.get("scaled").map(unstack);
    let step_noise = reference.get("step_noise").map(unstack);
    let initial = reference["noise"].affine(s.init_noise_sigma(), 0.0).unwrap();
    let step_seed = reference.get("step_seed").map(|t| t.to_vec1::<i64>().unwrap()[0] as u64).unwrap_or(0);

    // 3. Step by step from diffusers' samples.
    let mut under_test = under_test;
    let mut input = initial.clone();
    let mut unused_rng = TorchGenerator::new(step_seed);
    for i in 0..expected.len() {
        let input_scale = max_abs(&input);
        let (model_input, out) = one_step(&mut under_test, i, &input, step_noise.as_deref(), &mut unused_rng, name);
        if let Some(scaled) = &scaled {
            let what = format!("{name}: scale_model_input at step {i}");
            assert_close(&model_input, &scaled[i], input_scale, TOLERANCE, &what);
        }
        let t = under_test.scheduler().timesteps()[i];
        assert_close(&out, &expected[i], input_scale, TOLERANCE, &format!("{name}: step {i} (t = {t})"));
        input = expected[i].clone();
    }

    // 4. Free-running rollout, all steps drawing from one generator.
    let mut under_test = build_case(case, kind, false);
    let mut rng = TorchGenerator::new(step_seed);
    let mut sample = initial;
    let mut run_scale = max_abs(&sample);
    for (i, expected) in expected.iter().enumerate() {
        sample = one_step(&mut under_test, i, &sample, None, &mut rng, name).1;
        run_scale = run_scale.max(max_abs(expected));
        assert_close(&sample, expected, run_scale, TOLERANCE, &format!("{name}: rollout step {i}"));
    }
}

/// The scheduler of a case: its config file plus overrides, the requested class (or the config's own).
/// `explicit_noise`: Euler ancestral as its concrete type, to be given diffusers' noise.
fn build_case(case: &Case, kind: SchedulerKind, explicit_noise: bool) -> UnderTest {
    let mut config = SchedulerConfig::from_file(format!("{FIXTURES}/{}", case.config)).unwrap();
    for (key, value) in &case.overrides {
        config = config.with(key, value.clone());
    }
    let requested = case.scheduler.as_ref().map(|s| s.parse::<SchedulerKind>().unwrap());
    if kind == SchedulerKind::EulerAncestral && explicit_noise {
        UnderTest::Ancestral(EulerAncestralScheduler::new(&config, case.steps).unwrap())
    } else {
        let mut s = build(requested, &config, case.steps).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        s.set_eta(case.eta).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        UnderTest::Boxed(s)
    }
}

/// scale_model_input, the fake model and one step: (model input, next sample).
fn one_step(
    under_test: &mut UnderTest,
    i: usize,
    sample: &Tensor,
    step_noise: Option<&[Tensor]>,
    rng: &mut TorchGenerator,
    name: &str,
) -> (Tensor, Tensor) {
    let s = under_test.scheduler();
    let t = s.timesteps()[i];
    let model_input = s.scale_model_input(sample, i).unwrap();
    let model_output = fake_model(&model_input, t);
    let next = match under_test {
        UnderTest::Boxed(s) => s.step(&model_output, i, sample, rng),
        UnderTest::Ancestral(s) => {
            let noise = &step_noise.expect("euler-a fixture has step_noise")[i];
            s.step_with_noise(&model_output, i, sample, noise)
        }
    }
    .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
    (model_input, next)
}

/// The fake denoiser of gen_schedulers.py: `0.5 * x + 0.1 * cos(t / 100)` (float32 like torch).
fn fake_model(x: &Tensor, t: f64) -> Tensor {
    x.affine(0.5, 0.1 * (t / 100.0).cos()).unwrap()
}

fn timesteps_of(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::I64 => t.to_vec1::<i64>().unwrap().into_iter().map(|v| v as f64).collect(),
        _ => t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
    }
}

fn unstack(t: &Tensor) -> Vec<Tensor> {
    (0..t.dim(0).unwrap()).map(|i| t.get(i).unwrap()).collect()
}

/// max |t| as the f32 the tolerances are written in.
fn max_abs(t: &Tensor) -> f32 {
    crate::test_support::max_abs(t) as f32
}

fn assert_close(ours: &Tensor, theirs: &Tensor, input_scale: f32, tolerance: f32, what: &str) {
    assert_eq!(ours.dims(), theirs.dims(), "{what}: shape");
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = theirs.iter().fold(input_scale.max(1.0), |m, v| m.max(v.abs()));
    let max_diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max_diff <= tolerance * scale,
        "{what}: max |diff| {max_diff:e} > {tolerance:e} * {scale} (non-finite: {})",
        ours.iter().any(|v| !v.is_finite())
    );
}

/// Every case in the manifest is run by one scheduler's test.
#[test]
fn every_case_belongs_to_a_scheduler() {
    let manifest = std::fs::read_to_string(format!("{FIXTURES}/schedulers/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&manifest).unwrap();
    let mut per_kind: HashMap<SchedulerKind, usize> = HashMap::new();
    for case in &cases {
        assert_eq!(case.kind().class_name(), case.class, "{}", case.name);
        *per_kind.entry(case.kind()).or_default() += 1;
    }
    assert_eq!(per_kind.len(), SchedulerKind::ALL.len(), "{per_kind:?}");
}
