//! End-to-end tests of `controlnet annotate`: files, folders, errors.
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{controlnet, stderr};

/// A file of tests/fixtures/annotators (absolute, so the tests do not depend on the working folder).
fn fixture(name: &str) -> PathBuf {
    common::fixture("annotators").join(name)
}

/// Fails if the command crashed instead of reporting an error.
fn assert_clean_failure(out: &Output, must_mention: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for m in must_mention {
        assert!(err.contains(m), "stderr should mention {m:?}: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A PNG whose header says 0 pixels wide (valid chunk CRCs, so only the size is wrong).
fn zero_width_png() -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&0u32.to_be_bytes()); // width 0
    ihdr.extend_from_slice(&5u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn canny_on_a_file_matches_cv2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edges.png");
    let run = controlnet(&["annotate", "canny", s(&fixture("input_odd.png")), "--output", s(&out)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(fixture("canny_odd.png")).unwrap().to_rgb8();
    // the default output is the input's size (pixel perfect, no rescale); the CLI pads to 64 like A1111,
    // which can only touch the last rows/columns: >= 99% of pixels equal cv2.Canny's
    assert_eq!(ours.dimensions(), reference.dimensions());
    let same = ours.pixels().zip(reference.pixels()).filter(|(a, b)| a[0] == b[0]).count();
    assert!(same as f64 >= 0.99 * (ours.width() * ours.height()) as f64, "{same} equal pixels");
    // no temporary file left next to it
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn output_size_and_resize_mode() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lines.jpg");
    let run = controlnet(&[
        "annotate",
        "lineart",
        s(&fixture("input_wide.png")),
        "--output",
        s(&out),
        "--width",
        "96",
        "--height",
        "96",
        "--resize",
        "resize-and-fill",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (96, 96));
}

#[test]
fn folder_with_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(fixture("input_square.png"), input.join("a.png")).unwrap();
    std::fs::copy(fixture("input_odd.png"), input.join("b.png")).unwrap();
    std::fs::write(input.join("notes.png"), b"this is not an image").unwrap();
    let output = dir.path().join("out");
    let run = controlnet(&["annotate", "scribble", s(&input), "--output", s(&output)]);
    // the good files are written, the bad one is listed, and the exit status says something was skipped
    assert_clean_failure(&run, &["notes.png", "skipped 1"]);
    assert_eq!(run.status.code(), Some(1));
    let a = image::open(output.join("a.png")).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (64, 64));
    assert_eq!(image::open(output.join("b.png")).unwrap().to_rgb8().dimensions(), (97, 61));
    assert!(!output.join("notes.png").exists());
    // only the two maps: no temporary files
    assert_eq!(std::fs::read_dir(&output).unwrap().count(), 2);
}

#[test]
fn folder_all_good_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(fixture("input_square.png"), input.join("a.png")).unwrap();
    let output = dir.path().join("out");
    let run = controlnet(&["annotate", "shuffle", s(&input), "--output", s(&output), "--seed", "3"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(output.join("a.png").exists());
}

#[test]
fn not_an_image_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"\xff\xd8 truncated jpeg").unwrap();
    let run = controlnet(&["annotate", "canny", s(&bad), "--output", s(&dir.path().join("o.png"))]);
    assert_clean_failure(&run, &["bad.jpg"]);
    assert!(!dir.path().join("o.png").exists());
}

#[test]
fn zero_size_image_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, zero_width_png()).unwrap();
    let run = controlnet(&["annotate", "invert", s(&empty), "--output", s(&dir.path().join("o.png"))]);
    assert_clean_failure(&run, &["empty.png"]);
}

#[test]
fn missing_input_names_the_file() {
    let run = controlnet(&["annotate", "canny", "/nonexistent/x.png", "--output", "/tmp/never.png"]);
    assert_clean_failure(&run, &["/nonexistent/x.png"]);
}

#[test]
fn unknown_kind_lists_the_valid_ones() {
    let run = controlnet(&["annotate", "hed2", s(&fixture("input_odd.png")), "--output", "/tmp/never.png"]);
    assert_clean_failure(&run, &["hed2", "canny", "lineart", "inpaint"]);
}

#[test]
fn inpaint_without_mask_names_the_flag() {
    let run = controlnet(&["annotate", "inpaint", s(&fixture("input_odd.png")), "--output", "/tmp/x.safetensors"]);
    assert_clean_failure(&run, &["--mask"]);
}

#[test]
fn inpaint_with_a_missing_mask_names_the_file() {
    let run = controlnet(&[
        "annotate",
        "inpaint",
        s(&fixture("input_odd.png")),
        "--mask",
        "/nonexistent/mask.png",
        "--output",
        "/tmp/x.safetensors",
    ]);
    assert_clean_failure(&run, &["/nonexistent/mask.png"]);
}

#[test]
fn inpaint_writes_the_condition_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cond.safetensors");
    let run = controlnet(&[
        "annotate",
        "inpaint",
        s(&fixture("input_odd.png")),
        "--mask",
        s(&fixture("mask_odd.png")),
        "--output",
        s(&out),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(fixture("inpaint_odd.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (&ours["control"], &reference["control"]);
    assert_eq!(a.dims(), &[1, 3, 61, 97]);
    // metric: max |diff| <= 1e-6 against diffusers' make_inpaint_condition
    let diff: f32 = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(diff <= 1e-6, "max |diff| {diff}");
}

#[test]
fn mask_on_another_kind_is_refused() {
    let run = controlnet(&[
        "annotate",
        "canny",
        s(&fixture("input_odd.png")),
        "--mask",
        s(&fixture("mask_odd.png")),
        "--output",
        "/tmp/never.png",
    ]);
    assert_clean_failure(&run, &["--mask"]);
}

#[test]
fn unknown_output_extension_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let run =
        controlnet(&["annotate", "canny", s(&fixture("input_odd.png")), "--output", s(&dir.path().join("edges.xyz"))]);
    assert_clean_failure(&run, &["--output", "edges.xyz"]);
}
