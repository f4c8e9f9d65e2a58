//! End-to-end tests of `controlnet annotate` with the neural detectors (hed, pidinet, lineart, lineart-anime):
//! controlnet_aux's maps through the CLI, folders through one loaded detector, weights lookup and its errors.
//! The weights are the fixture's reduced-width nets (tools/fixtures/gen_neural_annotators.py); nothing is
//! downloaded.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    assert_clean_failure, controlnet, fake_hub_cache, run_with_cache, share_off_by_more_than, stderr, temp_dir,
};

fn fixture(name: &str) -> PathBuf {
    common::fixture("annotators_neural").join(name)
}

fn weights() -> PathBuf {
    fixture("weights")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn upstream_sizes_reproduce_controlnet_aux() {
    let dir = temp_dir();
    let w = weights();
    for (kind, input, detect, image, flags, reference) in [
        ("hed", "a", "128", "96", &["--safe"][..], "hed_a_detect_resolution128_image_resolution96_safe.png"),
        (
            "pidinet",
            "b",
            "96",
            "128",
            &["--scribble"],
            "pidinet_b_detect_resolution96_image_resolution128_scribble.png",
        ),
        ("lineart", "a", "96", "128", &["--coarse"], "lineart_a_detect_resolution96_image_resolution128_coarse.png"),
        (
            "mlsd",
            "a",
            "128",
            "96",
            &["--score-threshold", "0.2", "--distance-threshold", "4"],
            "mlsd_a_detect_resolution128_image_resolution96_thr_v0.2_thr_d4.0.png",
        ),
    ] {
        let out = dir.path().join(format!("{kind}.png"));
        let input = fixture(&format!("input_{input}.png"));
        let mut args = vec![
            "annotate",
            kind,
            s(&input),
            "--output",
            s(&out),
            "--weights",
            s(&w),
            "--detect-resolution",
            detect,
            "--image-resolution",
            image,
        ];
        args.extend(flags);
        let run = controlnet(&args);
        assert!(run.status.success(), "{kind}: {}", stderr(&run));
        let ours = image::open(&out).unwrap().to_rgb8();
        let theirs = image::open(fixture(reference)).unwrap().to_rgb8();
        assert!(share_off_by_more_than(&ours, &theirs, 2) <= 0.01, "{kind}");
    }
}

/// A folder runs through one loaded detector; the default (no controlnet_aux sizes) keeps each input's size.
#[test]
fn folder_through_one_detector_keeps_the_sizes() {
    let dir = temp_dir();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for name in ["input_a.png", "input_b.png"] {
        std::fs::copy(fixture(name), input.join(name)).unwrap();
    }
    let out = dir.path().join("out");
    let file = weights().join("netG.pth");
    let run = controlnet(&["annotate", "lineart-anime", s(&input), "--output", s(&out), "--weights", s(&file)]);
    assert!(run.status.success(), "{}", stderr(&run));
    for name in ["input_a.png", "input_b.png"] {
        let map = image::open(out.join(name)).unwrap().to_rgb8();
        let src = image::open(fixture(name)).unwrap().to_rgb8();
        assert_eq!(map.dimensions(), src.dimensions(), "{name}");
        let (lo, hi) = map.pixels().fold((255, 0), |(lo, hi), p| (p[0].min(lo), p[0].max(hi)));
        assert!(hi - lo > 50, "{name}: a flat map ({lo}..{hi})");
    }
}

#[test]
fn flags_of_other_kinds_and_mixed_sizes_are_refused() {
    let input = fixture("input_a.png");
    let w = weights();
    let run = controlnet(&["annotate", "lineart", s(&input), "-o", "/tmp/never.png", "--weights", s(&w), "--safe"]);
    assert_clean_failure(&run, &["--safe: does not apply to lineart (used by hed, pidinet)"]);
    let run = controlnet(&[
        "annotate",
        "hed",
        s(&input),
        "-o",
        "/tmp/never.png",
        "--weights",
        s(&w),
        "--detect-resolution",
        "128",
        "--width",
        "64",
    ]);
    assert_clean_failure(&run, &["--detect-resolution: ", "does not combine with the width setting"]);
    let run = controlnet(&["annotate", "canny", s(&input), "-o", "/tmp/never.png", "--weights", s(&w)]);
    assert_clean_failure(&run, &["--weights: does not apply to canny"]);
    let run = controlnet(&[
        "annotate",
        "hed",
        s(&input),
        "-o",
        "/tmp/never.png",
        "--weights",
        s(&w),
        "--image-resolution",
        "4",
    ]);
    assert_clean_failure(&run, &["--image-resolution: 4 makes a"]);
}

#[test]
fn weights_that_are_missing_or_of_another_net_are_named() {
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let input = fixture("input_a.png");
    // a folder without the file
    let run = controlnet(&["annotate", "hed", s(&input), "-o", s(&out), "--weights", s(dir.path())]);
    assert_clean_failure(&run, &["--weights: ", "the folder has no ControlNetHED.pth"]);
    // another net's file
    let other = weights().join("sk_model.pth");
    let run = controlnet(&["annotate", "hed", s(&input), "-o", s(&out), "--weights", s(&other)]);
    assert_clean_failure(&run, &["sk_model.pth", "no tensor norm"]);
    // the default hub repo, offline and not cached
    let run = Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(["annotate", "pidinet", s(&input), "-o", s(&out)])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.path())
        .output()
        .unwrap();
    assert_clean_failure(&run, &["--weights: the default lllyasviel/Annotators/table5_pidinet.pth", "HF_HUB_OFFLINE"]);
    assert!(!out.exists(), "nothing written on failure");
}

/// Without --weights the default repo's file comes from the cache (offline once cached), for `annotate` and for
/// `generate --preprocess`, which makes the same map at the output size.
#[test]
fn default_weights_come_from_the_hub_cache_for_annotate_and_generate() {
    let dir = temp_dir();
    let cache = dir.path().join("hub");
    fake_hub_cache(&cache, "lllyasviel/Annotators", &[weights().join("ControlNetHED.pth")]);
    let input = fixture("input_a.png");
    let annotated = dir.path().join("a.png");
    let run = run_with_cache(
        &cache,
        &[
            "annotate",
            "hed",
            s(&input),
            "-o",
            s(&annotated),
            "--width",
            "64",
            "--height",
            "64",
            "--resize",
            "just-resize",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let (saved, out) = (dir.path().join("cond.png"), dir.path().join("o.png"));
    let run = run_with_cache(
        &cache,
        &[
            "generate",
            "--model",
            "tests/fixtures/models/tiny-sd15",
            "--controlnet",
            "tests/fixtures/models/tiny-controlnet-a",
            "--control",
            s(&input),
            "--preprocess",
            "hed",
            "--save-control",
            s(&saved),
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--output",
            s(&out),
            "--quiet",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let (a, b) = (image::open(&saved).unwrap().to_rgb8(), image::open(&annotated).unwrap().to_rgb8());
    assert_eq!(a, b, "generate's HED condition differs from annotate's map");
}

/// `generate --annotator-weights DIR`: the --preprocess annotator reads its weights from there (the same map as
/// `annotate --weights DIR`), the recipe records the folder, and a folder that does not exist is refused naming
/// the flag, with no image written.
#[test]
fn generate_reads_annotator_weights_from_the_given_folder() {
    let dir = temp_dir();
    let weights = fixture("weights");
    let input = fixture("input_a.png");
    let annotated = dir.path().join("a.png");
    let size = ["--width", "64", "--height", "64"];
    let mut args = vec!["annotate", "lineart", s(&input), "-o", s(&annotated), "--weights", s(&weights)];
    args.extend(size);
    args.extend(["--resize", "just-resize"]);
    let run = controlnet(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let (saved, out) = (dir.path().join("cond.png"), dir.path().join("o.png"));
    let generate = |weights: &str, out: &std::path::Path| {
        let mut args = vec![
            "generate",
            "--model",
            "tests/fixtures/models/tiny-sd15",
            "--controlnet",
            "tests/fixtures/models/tiny-controlnet-a",
            "--control",
            s(&input),
            "--preprocess",
            "lineart",
            "--annotator-weights",
            weights,
            "--save-control",
            s(&saved),
            "--steps",
            "1",
            "--output",
            s(out),
            "--quiet",
        ];
        args.extend(size);
        controlnet(&args)
    };
    let run = generate(s(&weights), &out);
    assert!(run.status.success(), "{}", stderr(&run));
    let (a, b) = (image::open(&saved).unwrap().to_rgb8(), image::open(&annotated).unwrap().to_rgb8());
    assert_eq!(a, b, "generate's lineart condition differs from annotate's map with the same weights");
    let recipe =
        controlnet::pipeline::ImageMetadata::from_text_chunks(&controlnet::io::images::read_png_text(&out).unwrap())
            .unwrap();
    let recorded = recipe.controls[0].annotator_weights.as_deref().expect("the weights folder is recorded");
    assert!(recorded.ends_with("annotators_neural/weights"), "{recorded}");

    let missing = dir.path().join("missing.png");
    let run = generate("./no/such/annotators", &missing);
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(err.contains("--annotator-weights") && err.contains("./no/such/annotators"), "{err}");
    assert!(!missing.exists(), "no image is written when the annotator cannot load");
}
