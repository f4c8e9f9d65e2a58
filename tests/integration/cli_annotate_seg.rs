//! End-to-end tests of `controlnet annotate seg` and `depth-midas --save-raw`: the fixture UperNet
//! (tools/fixtures/gen_seg.py) through the CLI against transformers' coloured class map, a folder through one
//! loaded net, `generate --preprocess seg` from the default hub repo in the cache, and the MiDaS float depth beside
//! its map. Nothing is downloaded.
use crate::common;
use crate::common::preprocess;

use common::{controlnet, fake_hub_cache, stderr, temp_dir};

#[test]
fn annotate_seg_reproduces_the_reference_class_map() {
    let dir = common::fixture("annotators_seg");
    let tmp = temp_dir();
    let out = tmp.path().join("seg.png");
    let run = controlnet(&[
        "annotate",
        "seg",
        dir.join("input_b.png").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--weights",
        dir.join("upernet").to_str().unwrap(),
        "--detect-resolution",
        "96",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(dir.join("seg_b_size96.png")).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), reference.dimensions());
    let same = ours.pixels().zip(reference.pixels()).filter(|(a, b)| a == b).count();
    let share = same as f64 / (ours.width() * ours.height()) as f64;
    assert!(share >= 0.99, "{:.3}% of pixels in the reference colour", share * 100.0);
}

#[test]
fn depth_midas_save_raw_writes_the_depth_beside_the_map() {
    let dir = common::fixture("annotators_midas");
    let tmp = temp_dir();
    let (out, raw) = (tmp.path().join("d.png"), tmp.path().join("d.npy"));
    let input = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("input_"))
        .unwrap();
    let run = controlnet(&[
        "annotate",
        "depth-midas",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--weights",
        dir.to_str().unwrap(),
        "--save-raw",
        raw.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let map = image::open(&out).unwrap().to_rgb8();
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
    assert!(header.contains(&format!("'shape': ({}, {})", map.height(), map.width())), "{header}");
    assert_eq!(bytes.len() - 10 - header_len, 4 * (map.width() * map.height()) as usize);
    // normal-midas makes no depth to save
    let run = controlnet(&[
        "annotate",
        "normal-midas",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--weights",
        dir.to_str().unwrap(),
        "--save-raw",
        raw.to_str().unwrap(),
    ]);
    assert!(!run.status.success() && stderr(&run).contains("save-raw"), "{}", stderr(&run));
}

/// A folder of pictures: every one through the one loaded net, each map as `annotate` makes it alone.
#[test]
fn annotate_seg_runs_a_folder() {
    let dir = common::fixture("annotators_seg");
    let tmp = temp_dir();
    let (inputs, outs) = (tmp.path().join("in"), tmp.path().join("out"));
    std::fs::create_dir_all(&inputs).unwrap();
    for name in ["input_a.png", "input_b.png"] {
        std::fs::copy(dir.join(name), inputs.join(name)).unwrap();
    }
    let weights = dir.join("upernet");
    let run = controlnet(&[
        "annotate",
        "seg",
        inputs.to_str().unwrap(),
        "-o",
        outs.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    for name in ["input_a.png", "input_b.png"] {
        let single = tmp.path().join(format!("single_{name}"));
        let one = controlnet(&[
            "annotate",
            "seg",
            dir.join(name).to_str().unwrap(),
            "-o",
            single.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
        ]);
        assert!(one.status.success(), "{}", stderr(&one));
        let (a, b) = (image::open(outs.join(name)).unwrap().to_rgb8(), image::open(&single).unwrap().to_rgb8());
        assert!(a == b, "{name}: the folder's map differs from the single run's");
    }
}

/// A picture → `generate --preprocess seg` with a tiny ControlNet, the weights from the default hub repo
/// (openmmlab/upernet-convnext-small) in the cache: the condition it used is `annotate seg`'s map at the output
/// size, with several classes in it.
#[test]
fn generate_preprocess_seg_uses_the_annotate_map() {
    let dir = common::fixture("annotators_seg");
    let tmp = temp_dir();
    let cache = tmp.path().join("hub");
    let files: Vec<_> = ["config.json", "model.safetensors", "preprocessor_config.json"]
        .iter()
        .map(|f| dir.join("upernet").join(f))
        .collect();
    fake_hub_cache(&cache, "openmmlab/upernet-convnext-small", &files);
    let a = preprocess::condition_equals_annotate_map(&cache, "seg", &dir.join("input_b.png"));
    let colours: std::collections::HashSet<[u8; 3]> = a.pixels().map(|p| p.0).collect();
    assert!(colours.len() >= 3, "a map with several classes, got {}", colours.len());
}
