//! Half-precision quality end to end: `controlnet generate --dtype bf16` and `--dtype f16` on every pipeline
//! parity case (tests/fixtures/pipeline/cases.json) against diffusers' f32 image, beside PyTorch's own figures in
//! the same precision for the same case (tests/fixtures/pipeline/half_psnr.json, made by
//! tools/fixtures/gen_half_psnr.py).
//!
//! The bar is 35 dB PSNR. A few cases are chaotic on the tiny random models (5 DDIM steps, strong guidance):
//! there PyTorch's own bf16 modes stay far below it too (27-33 dB), so the bar for a case is the lower of 35 dB
//! and PyTorch's better mode in that precision less 3 dB.
use crate::common;

use std::collections::BTreeMap;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    args: Vec<String>,
    images: Vec<String>,
}

const MIN_PSNR_DB: f64 = 35.0;
/// How far below PyTorch's own bf16 figure a case may fall where that figure is under the bar.
const TORCH_MARGIN_DB: f64 = 3.0;

#[test]
fn bf16_images_stay_near_the_f32_reference() {
    images_stay_near_the_f32_reference("bf16");
}

/// f16 weights keep f32 activations and products on the CPU: only the weights' rounding shows.
#[test]
fn f16_images_stay_near_the_f32_reference() {
    images_stay_near_the_f32_reference("f16");
}

/// Every parity case made with `--dtype dtype`, against the bar and PyTorch's `{dtype}_weights` and
/// `{dtype}_autocast` figures.
fn images_stay_near_the_f32_reference(dtype: &str) {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("pipeline/cases.json")).unwrap()).unwrap();
    let torch: BTreeMap<String, BTreeMap<String, f64>> =
        serde_json::from_str(&std::fs::read_to_string(fixture("pipeline/half_psnr.json")).unwrap()).unwrap();
    let (weights, autocast) = (format!("{dtype}_weights"), format!("{dtype}_autocast"));
    let mut failures = Vec::new();
    for c in &cases {
        let dir = temp_dir();
        let out = dir.path().join("out.png");
        let mut args: Vec<&str> = vec!["generate"];
        args.extend(c.args.iter().map(String::as_str));
        args.extend(["--dtype", dtype, "--output", out.to_str().unwrap(), "--quiet"]);
        let res = controlnet(&args);
        assert!(res.status.success(), "{}: {}", c.name, stderr(&res));
        let worst = c
            .images
            .iter()
            .enumerate()
            .map(|(i, reference)| {
                let ours =
                    if c.images.len() == 1 { out.clone() } else { dir.path().join(format!("out-{}.png", i + 1)) };
                let ours = image::open(&ours).unwrap().to_rgb8();
                let theirs = image::open(fixture(&format!("pipeline/{reference}"))).unwrap().to_rgb8();
                psnr(&ours, &theirs)
            })
            .fold(f64::INFINITY, f64::min);
        let theirs = &torch[&c.name];
        let torch_best = theirs[&weights].max(theirs[&autocast]);
        let bar = MIN_PSNR_DB.min(torch_best - TORCH_MARGIN_DB);
        eprintln!(
            "{}: ours {dtype} {worst:.1} dB, torch {dtype} weights {:.1} dB, autocast {:.1} dB (bar {bar:.1})",
            c.name, theirs[&weights], theirs[&autocast]
        );
        if worst < bar {
            failures.push(format!("{}: {worst:.1} dB < {bar:.1} dB", c.name));
        }
    }
    assert!(failures.is_empty(), "{dtype} images too far from f32: {failures:?}");
}

/// A bf16 image records its dtype, and `reproduce` makes it again in bf16: the same pixels, where an f32 rerun
/// of the same recipe would differ.
#[test]
fn reproduce_keeps_the_dtype() {
    let dir = temp_dir();
    let out = dir.path().join("bf16.png");
    let f32_out = dir.path().join("f32.png");
    let base = [
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_odd.png",
        "--prompt",
        "two circles",
        "--steps",
        "3",
        "--seed",
        "7",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
    ];
    let res = controlnet(&[&base[..], &["--dtype", "bf16", "--output", out.to_str().unwrap()]].concat());
    assert!(res.status.success(), "{}", stderr(&res));
    let res = controlnet(&[&base[..], &["--output", f32_out.to_str().unwrap()]].concat());
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let recipe = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert_eq!(recipe.dtype.as_deref(), Some("bf16"));
    let f32_chunks = controlnet::io::images::read_png_text(&f32_out).unwrap();
    assert_eq!(controlnet::pipeline::ImageMetadata::from_text_chunks(&f32_chunks).unwrap().dtype, None);

    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let bf16 = image::open(&out).unwrap().to_rgb8();
    assert_eq!(bf16, image::open(&again).unwrap().to_rgb8(), "reproduced bf16 image differs");
    assert_ne!(bf16, image::open(&f32_out).unwrap().to_rgb8(), "bf16 and f32 made the same pixels");
}
