//! End to end: `controlnet generate` against diffusers' own runs of the same cases
//! (tools/fixtures/gen_pipeline.py → tests/fixtures/pipeline/cases.json). Images must agree within 40 dB PSNR.
mod common;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    args: Vec<String>,
    images: Vec<String>,
}

fn case(name: &str) -> Case {
    let text = std::fs::read_to_string(fixture("pipeline/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    cases.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"))
}

/// Minimum PSNR (dB) against diffusers' image for the same settings and seed.
const MIN_PSNR_DB: f64 = 40.0;

fn run_case(name: &str) {
    let c = case(name);
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let mut args: Vec<&str> = vec!["generate"];
    args.extend(c.args.iter().map(String::as_str));
    args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{name}: {}", stderr(&res));
    for (i, reference) in c.images.iter().enumerate() {
        let ours = if c.images.len() == 1 { out.clone() } else { dir.path().join(format!("out-{}.png", i + 1)) };
        let ours = image::open(&ours).unwrap().to_rgb8();
        let theirs = image::open(fixture(&format!("pipeline/{reference}"))).unwrap().to_rgb8();
        let db = psnr(&ours, &theirs);
        assert!(db >= MIN_PSNR_DB, "{name} image {}: PSNR {db:.1} dB < {MIN_PSNR_DB} dB", i + 1);
    }
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_case($name); })*
    };
}

cases! {
    model_default_scheduler => "cn_default",
    ddim => "cn_ddim",
    pndm => "cn_pndm",
    euler => "cn_euler",
    euler_ancestral => "cn_euler-a",
    dpm_solver_2m => "cn_dpmpp2m",
    unipc => "cn_unipc",
    two_controlnets => "cn_two_nets",
    guess_mode => "cn_guess_mode",
    control_window => "cn_window",
    conditioning_scale_and_negative_prompt => "cn_scale",
    two_images_one_batch => "cn_two_images",
    default_size_from_odd_control_image => "cn_odd_size",
    control_image_resized_lanczos => "cn_resize",
    no_controlnet => "sd_no_controlnet",
    sd2_v_prediction => "sd2_cn_vpred",
    sd2_v_prediction_unipc_window => "sd2_cn_vpred_unipc",
}

#[test]
fn png_carries_its_recipe() {
    let dir = temp_dir();
    let out = dir.path().join("r.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--prompt",
        "a cat 🐱",
        "--steps",
        "2",
        "--seed",
        "5",
        "--scheduler",
        "euler-a",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.starts_with(
            "a cat 🐱\nNegative prompt: \nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 128x128"
        ),
        "{params}"
    );
    let recipe = controlnet::pipeline::recipe::Recipe::from_text_chunks(&chunks).unwrap();
    assert_eq!(recipe.seed, 5);
    assert_eq!(recipe.scheduler, "euler-a");
    assert_eq!(recipe.controls.len(), 1);
    assert_eq!(recipe.controls[0].control_image.sha256.len(), 64);
    assert_eq!(recipe.model.sha256.len(), 64);
}

#[test]
fn seed_is_printed_when_not_given() {
    let dir = temp_dir();
    let out = dir.path().join("s.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let stdout = String::from_utf8_lossy(&res.stdout);
    let seed: u64 = stdout.lines().find_map(|l| l.strip_prefix("seed: ")).expect("seed line").parse().unwrap();
    let recipe =
        controlnet::pipeline::recipe::Recipe::from_text_chunks(&controlnet::io::images::read_png_text(&out).unwrap())
            .unwrap();
    assert_eq!(recipe.seed, seed);
}

#[test]
fn reproduce_makes_the_same_image_from_its_recipe() {
    let dir = temp_dir();
    let out = dir.path().join("orig.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_odd.png",
        "--prompt",
        "zwei Kreise 🐱",
        "--negative-prompt",
        "blur",
        "--steps",
        "3",
        "--seed",
        "99",
        "--scheduler",
        "euler-a",
        "--num-images",
        "2",
        "--conditioning-scale",
        "0.7",
        "--control-end",
        "0.8",
        "--resize",
        "crop-and-resize",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let second = dir.path().join("orig-2.png");
    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", second.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let a = image::open(&second).unwrap().to_rgb8();
    let b = image::open(&again).unwrap().to_rgb8();
    assert_eq!(a, b, "reproduced image differs");
    let first = image::open(dir.path().join("orig-1.png")).unwrap().to_rgb8();
    assert_ne!(first, b, "batch position was not kept");
    // No leftovers next to the output.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn reproduce_refuses_an_image_without_recipe() {
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let res =
        controlnet(&["reproduce", "tests/fixtures/pipeline/control_circle.png", "--output", out.to_str().unwrap()]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("carries no controlnet-rs recipe"), "{}", stderr(&res));
}
