//! End-to-end tests of `controlnet annotate depth-midas` / `normal-midas` and `generate --preprocess depth-midas`:
//! controlnet_aux's sizing through the CLI, the default hub file from the cache, and errors. The weights are the
//! fixture's narrowed DPT-Hybrid (tools/fixtures/gen_midas.py); nothing is downloaded.
use crate::common;
use crate::common::preprocess;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, controlnet, fake_hub_cache, share_off_by_more_than, stderr, temp_dir};

const WEIGHTS_FILE: &str = "dpt_hybrid-midas-501f0c75.pt";

fn fixture(name: &str) -> PathBuf {
    common::fixture("annotators_midas").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn depth_and_normal_maps_reproduce_controlnet_aux() {
    let dir = temp_dir();
    // input b (72x104) at detect 128 (128x192 for the net), output short side 192 (192x256)
    for (kind, reference, tol) in
        [("depth-midas", "midas_b_d128_i192_depth.png", 1), ("normal-midas", "midas_b_d128_i192_normal.png", 1)]
    {
        let out = dir.path().join(format!("{kind}.png"));
        let run = controlnet(&[
            "annotate",
            kind,
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
        let off = share_off_by_more_than(&ours, &image::open(fixture(reference)).unwrap().to_rgb8(), tol);
        assert!(off <= 0.01, "{reference}: {:.2}% off by more than {tol}", off * 100.0);
    }
}

#[test]
fn bg_threshold_flattens_the_far_pixels_of_the_normal_map() {
    let dir = temp_dir();
    let run_with = |bg: &str| {
        let out = dir.path().join(format!("n{bg}.png"));
        let run = controlnet(&[
            "annotate",
            "normal-midas",
            s(&fixture("input_a.png")),
            "-o",
            s(&out),
            "--weights",
            s(&fixture(WEIGHTS_FILE)),
            "--bg-threshold",
            bg,
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        image::open(&out).unwrap().to_rgb8()
    };
    // our sizing keeps the input's size; everything below the threshold faces the viewer: (z, y, x) = (255, 127, 127)
    let (none, all) = (run_with("-1"), run_with("2"));
    assert_eq!(none.dimensions(), (96, 64));
    assert!(all.pixels().all(|p| p.0 == [255, 127, 127]), "a threshold above 1 makes every pixel background");
    let flat = none.pixels().filter(|p| p.0 == [255, 127, 127]).count();
    assert!(flat < none.pixels().count() / 2, "without background the slopes show ({flat} flat pixels)");
}

#[test]
fn bad_settings_and_weights_fail_cleanly() {
    let dir = temp_dir();
    let (input, out) = (fixture("input_a.png"), dir.path().join("map.png"));
    // a folder without the file names it
    let run = controlnet(&["annotate", "depth-midas", s(&input), "-o", s(&out), "--weights", s(dir.path())]);
    assert_clean_failure(&run, &["--weights: ", &format!("the folder has no {WEIGHTS_FILE}")]);
    // the normal map's threshold is not a depth setting
    let run = controlnet(&[
        "annotate",
        "depth-midas",
        s(&input),
        "-o",
        s(&out),
        "--weights",
        s(&fixture("")),
        "--bg-threshold",
        "0.2",
    ]);
    assert_clean_failure(&run, &["--bg-threshold", "does not apply to depth-midas (used by normal, normal-midas)"]);
    // another detector's weights name the missing tensor
    let other = common::fixture("annotators_neural").join("weights").join("netG.pth");
    let run = controlnet(&["annotate", "normal-midas", s(&input), "-o", s(&out), "--weights", s(&other)]);
    assert_clean_failure(&run, &["netG.pth", "pretrained.model.patch_embed.backbone.stem.conv.weight"]);
    assert!(!out.exists(), "nothing written on failure");
}

/// A picture → `generate --preprocess depth-midas` with a tiny ControlNet: the condition it used is the map
/// `annotate` makes at the output size, from the default weights in the cache.
#[test]
fn generate_preprocess_depth_midas_uses_the_annotate_map() {
    let dir = temp_dir();
    let cache = dir.path().join("hub");
    fake_hub_cache(&cache, "lllyasviel/Annotators", &[fixture(WEIGHTS_FILE)]);
    let a = preprocess::condition_equals_annotate_map(&cache, "depth-midas", &fixture("input_b.png"));
    assert!(a.pixels().any(|p| p[0] > 200) && a.pixels().any(|p| p[0] < 50), "a depth map with its full range");
}
