//! The bundled demo model (`assets/demo`, recipe in `docs/demo.md`): for circles it never saw in training, the
//! ControlNet puts the prompted circle where the condition's outline is, in the prompted colours; the same
//! base without the ControlNet places its circle anywhere (about the overlap two random circles have).
mod common;

use candle_core::{DType, Device};
use controlnet::pipeline::{demo, generate, Control, GenerateParams, StableDiffusion};
use controlnet::rng::TorchGenerator;
use controlnet::synthetic::circles::{score, Circle, COLOURS};

/// Conditions scored (the issue asks for at least 20).
const CONDITIONS: usize = 24;
/// The training set was drawn with seed 0; these circles come from another stream.
const EVAL_SEED: u64 = 2026;
const SIZE: u32 = 128;
/// The README's command: `generate`'s defaults.
const STEPS: usize = 20;
const GUIDANCE: f64 = 7.5;

struct Scored {
    iou: f64,
    circle_colour_right: bool,
    background_colour_right: bool,
}

impl Scored {
    fn colours_right(&self) -> bool {
        self.circle_colour_right && self.background_colour_right
    }
}

fn circles() -> Vec<Circle> {
    let mut rng = TorchGenerator::new(EVAL_SEED);
    (0..CONDITIONS).map(|_| Circle::random(&mut rng, SIZE)).collect()
}

fn run(sd: &StableDiffusion, net: Option<&controlnet::model::controlnet::ControlNetModel>) -> Vec<Scored> {
    circles()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let controls: Vec<Control> = net
                .map(|net| Control {
                    net,
                    image: controlnet::io::images::to_tensor01(&c.condition(SIZE), &Device::Cpu).unwrap(),
                    scale: 1.0,
                    start: 0.0,
                    end: 1.0,
                    only_mid: false,
                    control_type: None,
                    union_join: false,
                    mode: Default::default(),
                })
                .into_iter()
                .collect();
            let params = GenerateParams {
                prompt: c.prompt(),
                negative_prompt: String::new(),
                width: SIZE as usize,
                height: SIZE as usize,
                steps: STEPS,
                guidance: GUIDANCE,
                scheduler: None,
                seed: i as u64,
                num_images: 1,
                guess_mode: false,
                vae_tiling: false,
                sdxl: Default::default(),
                prompt_options: Default::default(),
                eta: 0.0,
            };
            let image = &generate(sd, &controls, &params, &mut |_, _| {}).unwrap().images[0];
            let found = score::segment(image, c);
            let outside: Vec<bool> = found.iter().map(|f| !f).collect();
            Scored {
                iou: score::iou(&found, &score::disk(c, SIZE)),
                circle_colour_right: score::mean_colour_name(image, &found) == Some(c.fg),
                background_colour_right: score::mean_colour_name(image, &outside) == Some(c.bg),
            }
        })
        .collect()
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// The IoU a circle placed without looking at the condition gets: two independent circles' disks.
fn chance_iou() -> f64 {
    let mut rng = TorchGenerator::new(EVAL_SEED + 1);
    mean((0..400).map(|_| {
        let (a, b) = (Circle::random(&mut rng, SIZE), Circle::random(&mut rng, SIZE));
        score::iou(&score::disk(&a, SIZE), &score::disk(&b, SIZE))
    }))
}

#[test]
fn controlnet_follows_unseen_conditions_and_the_base_alone_does_not() {
    let sd = StableDiffusion::load(&demo::base().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let net =
        controlnet::model::controlnet::ControlNetModel::load(&demo::controlnet().unwrap(), DType::F32, &Device::Cpu)
            .unwrap();
    let with = run(&sd, Some(&net));
    let without = run(&sd, None);
    let chance = chance_iou();
    let iou_with = mean(with.iter().map(|s| s.iou));
    let iou_without = mean(without.iter().map(|s| s.iou));
    let colours_with = with.iter().filter(|s| s.colours_right()).count();
    let colours_without = without.iter().filter(|s| s.colours_right()).count();
    let count = |v: &[Scored], f: fn(&Scored) -> bool| v.iter().filter(|s| f(s)).count();
    println!(
        "mean IoU with the ControlNet {iou_with:.3}, base alone {iou_without:.3}, chance {chance:.3}; prompted \
         colours right in {colours_with}/{CONDITIONS} with (circle {}, background {}), {colours_without}/{CONDITIONS} \
         without (circle {}, background {})",
        count(&with, |s| s.circle_colour_right),
        count(&with, |s| s.background_colour_right),
        count(&without, |s| s.circle_colour_right),
        count(&without, |s| s.background_colour_right),
    );
    for (i, s) in with.iter().enumerate() {
        println!(
            "  condition {i:2}: IoU {:.3} (base alone {:.3}) circle colour {} background colour {}  ({})",
            s.iou,
            without[i].iou,
            s.circle_colour_right,
            s.background_colour_right,
            circles()[i].prompt()
        );
    }
    assert!(iou_with >= 0.8, "mean IoU with the ControlNet {iou_with:.3} < 0.8");
    // Every image has both prompted colours (a miss would be a colour-word the base never learned).
    assert!(colours_with >= CONDITIONS - 1, "prompted colours right in only {colours_with}/{CONDITIONS}");
    assert!(
        iou_without < chance + 0.15,
        "the base alone reaches IoU {iou_without:.3}, well above chance {chance:.3}: the test would not show control"
    );
    assert!(COLOURS.len() == 16);
}

/// The README's first command: no --model, no --controlnet.
#[test]
fn generate_defaults_to_the_demo_model() {
    let dir = common::temp_dir();
    let out = dir.path().join("circle.png");
    let run = common::controlnet(&[
        "generate",
        "--control",
        "examples/circle.png",
        "--prompt",
        "a yellow circle on a dark blue background",
        "--seed",
        "1",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let image = image::open(&out).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (SIZE, SIZE));
    // Without a --control there is no ControlNet; with two there is no default for both.
    let run = common::controlnet(&[
        "generate",
        "--control",
        "examples/circle.png",
        "--control",
        "examples/circle.png",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(common::stderr(&run).contains("no --controlnet"), "{}", common::stderr(&run));
}

/// Without --model and without the demo folder, generate says where it looked and what to pass.
#[test]
fn a_missing_demo_model_is_named() {
    let dir = common::temp_dir();
    let out = dir.path().join("x.png");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(["generate", "--prompt", "a red circle on a black background", "-o", out.to_str().unwrap()])
        .env(demo::DEMO_DIR_ENV, dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = common::stderr(&run);
    assert!(err.contains("bundled demo model is not at") && err.contains("--model"), "{err}");
    assert!(!out.exists());
}
