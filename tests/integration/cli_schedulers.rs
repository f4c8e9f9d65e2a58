//! Every scheduler the README lists runs `generate` on every bundled model: the demo base (whose DDIM config
//! has no `skip_prk_steps`, so PNDM takes its Runge-Kutta warm-up; issue 14 item 2) and the tiny SD1.5 and SD2
//! fixture pipelines.
use crate::common;

use common::*;

/// The `--scheduler` values of the README's generate synopsis.
const SCHEDULERS: [&str; 12] = [
    "ddim",
    "pndm",
    "euler",
    "euler-a",
    "dpm++2m",
    "unipc",
    "heun",
    "lms",
    "dpm2",
    "dpm2-a",
    "dpm++2m-sde",
    "dpm++sde",
];

#[test]
fn every_listed_scheduler_generates_on_every_bundled_model() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains(&format!("[--scheduler {}]", SCHEDULERS.join("|"))), "README lists other schedulers");
    let control = "tests/fixtures/pipeline/control_circle.png";
    let models: [&[&str]; 3] = [
        &[],
        &["--model", "tests/fixtures/models/tiny-sd15", "--controlnet", "tests/fixtures/models/tiny-controlnet-a"],
        &["--model", "tests/fixtures/models/tiny-sd2", "--controlnet", "tests/fixtures/models/tiny-controlnet-sd2"],
    ];
    let dir = temp_dir();
    for model in models {
        for scheduler in SCHEDULERS {
            let out = dir.path().join(format!("{}.png", scheduler.replace('+', "p")));
            let mut args = vec!["generate", "--prompt", "a red circle", "--control", control, "--steps", "4"];
            args.extend_from_slice(model);
            args.extend(["--scheduler", scheduler, "--seed", "1", "--quiet", "--output", out.to_str().unwrap()]);
            let res = controlnet(&args);
            assert!(res.status.success(), "{model:?} --scheduler {scheduler}: {}", stderr(&res));
            assert!(image::open(&out).is_ok(), "{model:?} --scheduler {scheduler}: no image");
        }
    }
}

/// A1111 sampler names with Karras / exponential sigmas and the further samplers of issue 21 (Heun, LMS, DPM2,
/// DPM2 a, DPM++ 2M SDE, DPM++ SDE (plain, Karras, img2img), DDIM with --eta, Heun and DPM2 a in img2img) against diffusers' image for the same
/// settings and seed (tools/fixtures/gen_schedulers_pipeline.py → tests/fixtures/schedulers_pipeline/).
#[test]
fn sampler_names_match_diffusers_images() {
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        args: Vec<String>,
        image: String,
    }
    const MIN_PSNR_DB: f64 = 40.0;
    let text = std::fs::read_to_string(fixture("schedulers_pipeline/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(!cases.is_empty());
    let dir = temp_dir();
    for c in cases {
        let out = dir.path().join(format!("{}.png", c.name));
        let mut args: Vec<&str> = vec!["generate"];
        args.extend(c.args.iter().map(String::as_str));
        args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
        let res = controlnet(&args);
        assert!(res.status.success(), "{}: {}", c.name, stderr(&res));
        let ours = image::open(&out).unwrap().to_rgb8();
        let theirs = image::open(fixture(&format!("schedulers_pipeline/{}", c.image))).unwrap().to_rgb8();
        let db = psnr(&ours, &theirs);
        assert!(db >= MIN_PSNR_DB, "{}: PSNR {db:.1} dB < {MIN_PSNR_DB} dB", c.name);
    }
}

/// The sampler is recorded so the image reproduces: ours in the JSON, A1111's name in `parameters`.
#[test]
fn karras_sampler_is_recorded_in_the_metadata() {
    let dir = temp_dir();
    let out = dir.path().join("k.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--seed",
        "5",
        "--scheduler",
        "dpm++ 2m karras",
        "--quiet",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let text = |key: &str| chunks.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(text("parameters").contains("Sampler: DPM++ 2M Karras"), "{chunks:?}");
    assert!(text("controlnet-rs").contains(r#""scheduler":"dpm++2m-karras""#), "{chunks:?}");
}

/// An unknown name fails before any model loads, listing our names and A1111's.
#[test]
fn unknown_scheduler_lists_both_spellings() {
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let res = controlnet(&["generate", "--prompt", "x", "--scheduler", "DPM fast", "--output", out.to_str().unwrap()]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--scheduler") && err.contains("DPM fast"), "{err}");
    assert!(err.contains("dpm++2m") && err.contains("DPM++ 2M") && err.contains("Euler a"), "{err}");
    assert!(!out.exists());
    let res =
        controlnet(&["generate", "--prompt", "x", "--scheduler", "Euler a Karras", "--output", out.to_str().unwrap()]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("no Karras sigmas"), "{}", stderr(&res));
}

/// --eta is refused outside DDIM (DPM++ SDE included: its noise is fixed by the Brownian tree) and out of
/// [0, 1], naming the flag, before any model loads and without writing the output.
#[test]
fn misused_eta_is_refused() {
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let out_arg = out.to_str().unwrap();
    let res = controlnet(&[
        "generate",
        "--prompt",
        "x",
        "--scheduler",
        "DPM++ SDE Karras",
        "--eta",
        "0.5",
        "--output",
        out_arg,
    ]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--eta") && err.contains("dpm++sde"), "{err}");
    let res = controlnet(&["generate", "--prompt", "x", "--scheduler", "ddim", "--eta", "1.5", "--output", out_arg]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--eta: 1.5"), "{}", stderr(&res));
    let res = controlnet(&[
        "generate",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--scheduler",
        "euler",
        "--eta",
        "0.3",
        "--output",
        out_arg,
    ]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--eta") && err.contains("only used by the ddim scheduler"), "{err}");
    assert!(!out.exists());
}

/// The tiny pipeline with `seed` and `extra` flags, then `reproduce` of its PNG: asserts the second picture is the
/// first; the PNG's A1111 `parameters` text and its `controlnet-rs` recipe.
fn generate_then_reproduce(seed: &str, extra: &[&str]) -> (String, String) {
    let dir = temp_dir();
    let (first, again) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let mut args = vec![
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--seed",
        seed,
        "--quiet",
        "--output",
        first.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let res = controlnet(&args);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&first).unwrap();
    let text = |key: &str| chunks.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default();
    let res = controlnet(&["reproduce", first.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let (a, b) = (image::open(&first).unwrap().to_rgb8(), image::open(&again).unwrap().to_rgb8());
    assert_eq!(a.as_raw(), b.as_raw());
    (text("parameters"), text("controlnet-rs"))
}

/// `--eta` is recorded and `reproduce` makes the same picture again (the variance noise comes from the seed).
#[test]
fn ddim_eta_is_recorded_and_reproduced() {
    let (parameters, recipe) = generate_then_reproduce("4", &["--scheduler", "ddim", "--eta", "0.5"]);
    assert!(parameters.contains("Eta: 0.5"), "{parameters}");
    assert!(recipe.contains(r#""eta":0.5"#), "{recipe}");
}

/// DPM++ SDE Karras is recorded under both names and `reproduce` makes the same picture again: the Brownian
/// tree's entropy comes from the seed's generator.
#[test]
fn dpmpp_sde_is_recorded_and_reproduced() {
    let (parameters, recipe) = generate_then_reproduce("6", &["--scheduler", "DPM++ SDE Karras"]);
    assert!(parameters.contains("Sampler: DPM++ SDE Karras"), "{parameters}");
    assert!(recipe.contains("dpm++sde-karras"), "{recipe}");
}
