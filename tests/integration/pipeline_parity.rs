//! The library's generate recipe against diffusers' final latents and raw VAE output for the same cases as
//! the CLI tests (tests/fixtures/pipeline, made by tools/fixtures/gen_pipeline.py).
//! Metric: max |ours - diffusers| <= TOL * max(1, max |diffusers|).
use crate::common;

use candle_core::{DType, Device, Tensor};
use common::*;
use controlnet::io::images::{self, ResampleFilter};
use controlnet::model::controlnet::ControlNetModel;
use controlnet::pipeline::{generate, Control, GenerateParams, StableDiffusion};

/// f32 against torch f32 after a handful of steps (see shared reference notes: ~4e-5 drift seen after 4 DDIM
/// steps between f32 and f64).
const TOL: f32 = 2e-4;

fn max_rel_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims());
    let a: Vec<f32> = ours.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

struct Net {
    dir: &'static str,
    image: &'static str,
    scale: f64,
    start: f64,
    end: f64,
}

fn check(case: &str, model: &str, nets: &[Net], params: GenerateParams) {
    let dev = Device::Cpu;
    let sd = StableDiffusion::load(&repo().join(model), DType::F32, &dev).unwrap();
    let loaded: Vec<ControlNetModel> =
        nets.iter().map(|n| ControlNetModel::load(&repo().join(n.dir), DType::F32, &dev).unwrap()).collect();
    let controls: Vec<Control> = nets
        .iter()
        .zip(&loaded)
        .map(|(n, net)| {
            let img = images::load_rgb(&fixture(&format!("pipeline/{}", n.image))).unwrap();
            let img = images::resize(&img, params.width as u32, params.height as u32, ResampleFilter::Lanczos);
            Control {
                scale: n.scale,
                start: n.start,
                end: n.end,
                ..Control::plain(net, images::to_tensor01(&img, &dev).unwrap())
            }
        })
        .collect();
    let out = generate(&sd, &controls, &params, &mut |_, _| {}).unwrap();
    let reference = candle_core::safetensors::load(fixture(&format!("pipeline/{case}.safetensors")), &dev).unwrap();
    let d = max_rel_diff(&out.latents, &reference["latents"]);
    assert!(d <= TOL, "{case}: latents differ by {d:e} (relative)");
    let d = max_rel_diff(&out.decoded, &reference["decoded"]);
    assert!(d <= TOL, "{case}: decoded image differs by {d:e} (relative)");
}

fn params(seed: u64, steps: usize, scheduler: Option<&str>) -> GenerateParams {
    GenerateParams {
        scheduler: scheduler.map(|s| s.parse().unwrap()),
        ..GenerateParams::plain("a red circle on a light blue background", 128, 128, steps, 7.5, seed)
    }
}

const CN_A: &str = "tests/fixtures/models/tiny-controlnet-a";
const SD15: &str = "tests/fixtures/models/tiny-sd15";

fn circle(scale: f64, start: f64, end: f64) -> Net {
    Net { dir: CN_A, image: "control_circle.png", scale, start, end }
}

#[test]
fn model_scheduler_pndm() {
    check("cn_default", SD15, &[circle(1.0, 0.0, 1.0)], params(42, 6, None));
}

#[test]
fn each_scheduler() {
    for (name, sched) in [
        ("ddim", "ddim"),
        ("pndm", "pndm"),
        ("euler", "euler"),
        ("euler-a", "euler-a"),
        ("dpmpp2m", "dpm++2m"),
        ("unipc", "unipc"),
    ] {
        check(&format!("cn_{name}"), SD15, &[circle(1.0, 0.0, 1.0)], params(7, 5, Some(sched)));
    }
}

#[test]
fn two_controlnets() {
    let nets = [
        circle(0.8, 0.0, 1.0),
        Net {
            dir: "tests/fixtures/models/tiny-controlnet-b",
            image: "control_box.png",
            scale: 0.5,
            start: 0.0,
            end: 1.0,
        },
    ];
    check("cn_two_nets", SD15, &nets, params(11, 5, Some("ddim")));
}

#[test]
fn guess_mode() {
    let mut p = params(12, 5, Some("ddim"));
    p.guess_mode = true;
    p.guidance = 3.0;
    check("cn_guess_mode", SD15, &[circle(1.0, 0.0, 1.0)], p);
}

#[test]
fn window_and_scale() {
    check("cn_window", SD15, &[circle(1.0, 0.2, 0.6)], params(13, 6, Some("euler")));
    let mut p = params(14, 5, Some("ddim"));
    p.negative_prompt = "blurry, dark".into();
    check("cn_scale", SD15, &[circle(0.5, 0.0, 1.0)], p);
}

#[test]
fn batch_of_two_with_ancestral_noise() {
    let mut p = params(15, 4, Some("euler-a"));
    p.num_images = 2;
    check("cn_two_images", SD15, &[circle(1.0, 0.0, 1.0)], p);
}

#[test]
fn no_controlnet() {
    check("sd_no_controlnet", SD15, &[], params(18, 5, Some("dpm++2m")));
}

#[test]
fn sd2_v_prediction() {
    let mut p = params(19, 5, None);
    p.prompt = "a photo of a cat".into();
    let net = Net {
        dir: "tests/fixtures/models/tiny-controlnet-sd2",
        image: "control_circle.png",
        scale: 1.0,
        start: 0.0,
        end: 1.0,
    };
    check("sd2_cn_vpred", "tests/fixtures/models/tiny-sd2", &[net], p);
}
