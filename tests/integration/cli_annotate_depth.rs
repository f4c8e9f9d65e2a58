//! End-to-end tests of `controlnet annotate depth-anything` and `generate --preprocess depth-anything`: both
//! weight layouts through the CLI, `--save-raw`, the default hub repo from the cache, and errors. The weights are
//! the fixture's tiny Depth Anything V2 (tools/fixtures/gen_neural_annotators2.py); nothing is downloaded.
use crate::common;
use crate::common::preprocess;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, controlnet, fake_hub_cache, share_off_by_more_than, stderr, temp_dir};

fn fixture(name: &str) -> PathBuf {
    common::fixture("annotators_neural2").join(name)
}

fn weights(name: &str) -> PathBuf {
    fixture("depth_anything").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn both_layouts_reproduce_their_upstream_with_detect_resolution_and_save_raw() {
    let dir = temp_dir();
    for (w, reference) in [
        (weights("depth_anything_v2_vits.pth"), "depth_anything_original_b_size196.png"),
        (weights("hf"), "depth_anything_hf_b_size140.png"),
    ] {
        let size = if reference.contains("196") { "196" } else { "140" };
        let (out, raw) = (dir.path().join("map.png"), dir.path().join("depth.npy"));
        let run = controlnet(&[
            "annotate",
            "depth-anything",
            s(&fixture("input_b.png")),
            "-o",
            s(&out),
            "--weights",
            s(&w),
            "--detect-resolution",
            size,
            "--save-raw",
            s(&raw),
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let ours = image::open(&out).unwrap().to_rgb8();
        let theirs = image::open(fixture(reference)).unwrap().to_rgb8();
        let off = share_off_by_more_than(&ours, &theirs, 4);
        assert!(off <= 0.02, "{reference}: {:.2}% off", off * 100.0);
        // the .npy holds the float depth of the map: (72 x 104), its min-max map is the PNG
        let bytes = std::fs::read(&raw).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert!(std::str::from_utf8(&bytes[10..10 + len]).unwrap().contains("'shape': (104, 72)"));
        let values: Vec<f32> =
            bytes[10 + len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(values.len(), 72 * 104);
        let (lo, hi) = values.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let map: Vec<u8> = values.iter().map(|&v| ((v - lo) / (hi - lo) * 255.0) as u8).collect();
        assert!(map.iter().zip(ours.pixels()).all(|(&m, p)| m == p[0]), "the map is the raw depth normalised");
    }
}

#[test]
fn image_resolution_sets_the_short_side() {
    let dir = temp_dir();
    let out = dir.path().join("map.png");
    let run = controlnet(&[
        "annotate",
        "depth-anything",
        s(&fixture("input_a.png")),
        "-o",
        s(&out),
        "--weights",
        s(&weights("hf")),
        "--detect-resolution",
        "140",
        "--image-resolution",
        "32",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (48, 32));
}

#[test]
fn bad_settings_and_weights_fail_cleanly() {
    let dir = temp_dir();
    let (input, out) = (fixture("input_a.png"), dir.path().join("map.png"));
    // a folder without either layout
    let run = controlnet(&["annotate", "depth-anything", s(&input), "-o", s(&out), "--weights", s(dir.path())]);
    assert_clean_failure(&run, &["--weights: ", "neither model.safetensors"]);
    // --save-raw belongs to depth-anything, and does not combine with our sizing
    let raw = dir.path().join("d.npy");
    let run = controlnet(&["annotate", "canny", s(&input), "-o", s(&out), "--save-raw", s(&raw)]);
    assert_clean_failure(&run, &["--save-raw", "does not apply to canny (used by depth-anything, depth-midas)"]);
    let w = weights("hf");
    let run = controlnet(&[
        "annotate",
        "depth-anything",
        s(&input),
        "-o",
        s(&out),
        "--weights",
        s(&w),
        "--save-raw",
        s(&raw),
        "--width",
        "64",
    ]);
    assert_clean_failure(&run, &["--save-raw", "width"]);
    let run = controlnet(&[
        "annotate",
        "depth-anything",
        s(&input),
        "-o",
        s(&out),
        "--weights",
        s(&w),
        "--detect-resolution",
        "0",
    ]);
    assert_clean_failure(&run, &["--detect-resolution: must be at least 1"]);
    // a bad output extension writes neither file
    let bad = dir.path().join("map.xyz");
    let run = controlnet(&[
        "annotate",
        "depth-anything",
        s(&input),
        "-o",
        s(&bad),
        "--weights",
        s(&w),
        "--save-raw",
        s(&raw),
    ]);
    assert_clean_failure(&run, &["unknown image extension"]);
    assert!(!out.exists() && !raw.exists() && !bad.exists(), "nothing written on failure");
}

/// A picture → `generate --preprocess depth-anything` with a tiny ControlNet: the condition it used is the map
/// `annotate` makes at the output size, from the default weights in the cache.
#[test]
fn generate_preprocess_depth_anything_uses_the_annotate_map() {
    let dir = temp_dir();
    let cache = dir.path().join("hub");
    let hf = ["model.safetensors", "config.json", "preprocessor_config.json"].map(|f| weights("hf").join(f));
    fake_hub_cache(&cache, "depth-anything/Depth-Anything-V2-Small-hf", &hf);
    let a = preprocess::condition_equals_annotate_map(&cache, "depth-anything", &fixture("input_b.png"));
    assert!(a.pixels().any(|p| p[0] > 200) && a.pixels().any(|p| p[0] < 50), "a depth map with its full range");
}

/// A folder INPUT with --save-raw DIR: one map and one `<stem>.npy` per image, byte for byte what the one-image
/// run writes.
#[test]
fn a_folder_writes_one_npy_per_image() {
    let dir = temp_dir();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for name in ["input_a.png", "input_b.png"] {
        std::fs::copy(fixture(name), images.join(name)).unwrap();
    }
    let w = weights("depth_anything_v2_vits.pth");
    let (maps, raws) = (dir.path().join("maps"), dir.path().join("raw"));
    let run = controlnet(&[
        "annotate",
        "depth-anything",
        s(&images),
        "-o",
        s(&maps),
        "--weights",
        s(&w),
        "--detect-resolution",
        "98",
        "--save-raw",
        s(&raws),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    for stem in ["input_a", "input_b"] {
        let (out, raw) = (dir.path().join(format!("{stem}.png")), dir.path().join(format!("{stem}.npy")));
        let input = images.join(format!("{stem}.png"));
        let run = controlnet(&[
            "annotate",
            "depth-anything",
            s(&input),
            "-o",
            s(&out),
            "--weights",
            s(&w),
            "--detect-resolution",
            "98",
            "--save-raw",
            s(&raw),
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let folder_map = image::open(maps.join(format!("{stem}.png"))).unwrap().to_rgb8();
        assert_eq!(folder_map, image::open(&out).unwrap().to_rgb8(), "{stem}: map");
        assert_eq!(std::fs::read(raws.join(format!("{stem}.npy"))).unwrap(), std::fs::read(&raw).unwrap(), "{stem}");
    }
}
