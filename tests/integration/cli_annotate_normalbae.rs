//! End-to-end tests of `controlnet annotate normal-bae` and `generate --preprocess normal-bae`: controlnet_aux's
//! sizing through the CLI, the default hub file from the cache, and errors. The weights are the fixture's narrowed
//! NNET in the published `{'model': {'module.'…}}` layout (tools/fixtures/gen_normalbae.py); nothing is downloaded.
use crate::common;
use crate::common::preprocess;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, controlnet, fake_hub_cache, stderr, temp_dir};

const WEIGHTS_FILE: &str = "scannet.pt";

fn fixture(name: &str) -> PathBuf {
    common::fixture("annotators_normalbae").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn normal_map_reproduces_controlnet_aux() {
    let dir = temp_dir();
    // input b (72x104) at detect 128 (128x192 for the net), output short side 192 (192x256)
    let out = dir.path().join("normal.png");
    let run = controlnet(&[
        "annotate",
        "normal-bae",
        s(&fixture("input_b.png")),
        "-o",
        s(&out),
        "--weights",
        s(&fixture("")),
        "--detect-resolution",
        "128",
        "--image-resolution",
        "192",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(fixture("normalbae_b_d128_i192.png")).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), reference.dimensions());
    let off = ours.as_raw().iter().zip(reference.as_raw()).filter(|(&a, &b)| a.abs_diff(b) > 4).count();
    let share = off as f64 / ours.as_raw().len() as f64;
    assert!(share <= 0.02, "{:.2}% of samples off by more than 4", share * 100.0);
}

#[test]
fn bad_weights_and_settings_fail_cleanly() {
    let dir = temp_dir();
    let (input, out) = (fixture("input_a.png"), dir.path().join("map.png"));
    // a folder without the file names it
    let run = controlnet(&["annotate", "normal-bae", s(&input), "-o", s(&out), "--weights", s(dir.path())]);
    assert_clean_failure(&run, &["--weights: ", &format!("the folder has no {WEIGHTS_FILE}")]);
    // another detector's weights name the tensor they lack
    let other = common::fixture("annotators_neural").join("weights").join("netG.pth");
    let run = controlnet(&["annotate", "normal-bae", s(&input), "-o", s(&out), "--weights", s(&other)]);
    assert_clean_failure(&run, &["netG.pth", "encoder.original_model.conv_stem.weight"]);
    // MiDaS's background threshold is not a NormalBAE setting
    let run = controlnet(&[
        "annotate",
        "normal-bae",
        s(&input),
        "-o",
        s(&out),
        "--weights",
        s(&fixture("")),
        "--bg-threshold",
        "0.2",
    ]);
    assert_clean_failure(&run, &["--bg-threshold", "does not apply to normal-bae"]);
    assert!(!out.exists(), "nothing written on failure");
}

/// A picture → `generate --preprocess normal-bae` with a tiny ControlNet: the condition it used is the map
/// `annotate` makes at the output size, from the default weights in the cache.
#[test]
fn generate_preprocess_normal_bae_uses_the_annotate_map() {
    let dir = temp_dir();
    let cache = dir.path().join("hub");
    fake_hub_cache(&cache, "lllyasviel/Annotators", &[fixture(WEIGHTS_FILE)]);
    let a = preprocess::condition_equals_annotate_map(&cache, "normal-bae", &fixture("input_b.png"));
    let spread = |c: usize| {
        let v: Vec<u8> = a.pixels().map(|p| p[c]).collect();
        v.iter().max().unwrap() - v.iter().min().unwrap()
    };
    assert!((0..3).all(|c| spread(c) > 30), "a map with varying normals");
}
