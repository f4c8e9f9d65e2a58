//! The bundled demo model (`assets/demo`, recipe in `docs/demo.md`) on the demo's held-out test set
//! (`synthetic::circles::Split::Test`: radius 10–40 px, rings 1–5 px, circles against the borders, every colour as
//! circle and as background, the near pairs in both orders): the ControlNet puts the prompted circle where the
//! outline is, in the prompted colours; the same base without it places its circle anywhere. The full set is
//! `controlnet evaluate circles --split test --base-alone` (docs/demo.md); this test runs the same circles.
use crate::common;

use candle_core::{DType, Device};
use controlnet::model::controlnet::ControlNetModel;
use controlnet::pipeline::circles_eval::{chance_iou, evaluate, Scored};
use controlnet::pipeline::{demo, StableDiffusion};
use controlnet::synthetic::circles::Split;

/// Test circles with the ControlNet: the whole reported set (the issue asks for at least 100).
const CONDITIONS: usize = 128;
/// The base alone, on the set's first circles (it only has to show it does not follow outlines).
const BASE_ALONE: usize = 32;
const SIZE: u32 = 128;

#[test]
fn controlnet_follows_unseen_conditions_and_the_base_alone_does_not() {
    let sd = StableDiffusion::load(&demo::base().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let net = ControlNetModel::load(&demo::controlnet().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let circles = Split::Test.circles(CONDITIONS, SIZE);
    let with = evaluate(&sd, Some(&net), &circles, SIZE, &|_| {}).unwrap();
    let without = evaluate(&sd, None, &circles[..BASE_ALONE], SIZE, &|_| {}).unwrap();
    let chance = chance_iou(&circles[..BASE_ALONE], SIZE);
    println!("with the ControlNet: {}", with.summary());
    println!("base alone: {}; chance IoU {chance:.3}", without.summary());
    for i in with.worst_first().into_iter().take(12) {
        let s = &with.scored[i];
        println!(
            "  worst: condition {i:3}: IoU {:.3} circle colour {} background colour {} radius {:.1} ring {:.0} ({})",
            s.iou,
            s.circle_colour_right,
            s.background_colour_right,
            s.circle.radius,
            s.circle.ring,
            s.circle.prompt()
        );
    }
    let iou = with.mean_iou();
    assert!(iou >= 0.85, "mean IoU with the ControlNet {iou:.3} < 0.85");
    let colours = with.colours_right();
    assert!(colours >= 0.95, "both prompted colours right in only {:.1} %", 100.0 * colours);
    let missing: Vec<usize> = (0..CONDITIONS).filter(|&i| !with.scored[i].visible()).collect();
    assert!(missing.is_empty(), "no visible circle in images {missing:?}");
    let alone = without.mean_iou();
    assert!(
        alone < chance + 0.15,
        "the base alone reaches IoU {alone:.3}, well above chance {chance:.3}: the test would not show control"
    );
    assert!(without.share(Scored::placed) < 0.5, "the base alone draws most circles in place");
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

/// `evaluate circles` scores the demo on a few test circles and writes its grid and report; bad settings are
/// named and nothing is written.
#[test]
fn evaluate_writes_its_figures_and_names_bad_settings() {
    let dir = common::temp_dir();
    let (grid, report) = (dir.path().join("grid.png"), dir.path().join("scores.jsonl"));
    let (g, r) = (grid.to_str().unwrap(), report.to_str().unwrap());
    let run = common::controlnet(&["evaluate", "circles", "--count", "2", "--grid", g, "--report", r, "-q"]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(out.contains("2 images: mean IoU"), "{out}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&report).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["prompt"], Split::Test.circles(2, SIZE)[1].prompt());
    // Two entries (condition and result tiles each) in one row, 4 px apart.
    assert_eq!(image::open(&grid).unwrap().to_rgb8().dimensions(), (4 * SIZE + 4, SIZE));
    for (args, flag) in [
        (&["--count", "0"][..], "--count"),
        (&["--model", "/nowhere/model"][..], "--model"),
        (&["--controlnet", "/nowhere/net"][..], "--controlnet"),
    ] {
        let bad = dir.path().join("bad.png");
        let mut all = vec!["evaluate", "circles", "--grid", bad.to_str().unwrap()];
        all.extend_from_slice(args);
        let run = common::controlnet(&all);
        let err = common::stderr(&run);
        assert!(!run.status.success() && err.contains(flag), "{args:?}: {err}");
        assert!(!bad.exists());
    }
}
