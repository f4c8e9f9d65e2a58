//! End-to-end tests of `controlnet annotate seg` and `depth-midas --save-raw`: the fixture UperNet
//! (tools/fixtures/gen_seg.py) through the CLI against transformers' coloured class map, and the MiDaS float depth
//! beside its map. Nothing is downloaded.
mod common;

use common::{controlnet, stderr, temp_dir};

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
