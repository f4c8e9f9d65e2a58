//! End-to-end tests of `controlnet annotate`: files, folders, errors.
use crate::common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, controlnet, stderr};

/// A file of tests/fixtures/annotators (absolute, so the tests do not depend on the working folder).
fn fixture(name: &str) -> PathBuf {
    common::fixture("annotators").join(name)
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
        "lineart-standard",
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

/// The output file is left as it was (no partial write, no removal).
fn assert_untouched(path: &Path, bytes: &[u8]) {
    assert_eq!(std::fs::read(path).unwrap(), bytes, "{} was modified", path.display());
}

/// Issue 14.1: sizes that cannot be allocated aborted with exit 134; now a clear refusal naming the flag and the
/// size, before anything is allocated, with exit status 1 and the old output kept.
#[test]
fn huge_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edges.png");
    std::fs::write(&out, b"previous").unwrap();
    let input = fixture("input_odd.png");
    for (extra, flag) in [
        (&["--width", "100000", "--height", "100000"][..], "--width: a 100000x100000 image needs about"),
        (&["--resolution", "100000"][..], "--resolution: a "),
    ] {
        let mut args = vec!["annotate", "canny", s(&input), "--output", s(&out)];
        args.extend_from_slice(extra);
        let run = controlnet(&args);
        assert_eq!(run.status.code(), Some(1), "{extra:?}: {}", stderr(&run));
        assert_clean_failure(&run, &[flag, "memory"]);
        assert_untouched(&out, b"previous");
    }
}

/// Issue 14.14: `--width 0` said "got 0x1"; the flag and the value given are named.
#[test]
fn zero_width_names_the_flag_and_value() {
    let run =
        controlnet(&["annotate", "canny", s(&fixture("input_odd.png")), "--output", "/tmp/never.png", "--width", "0"]);
    assert_clean_failure(&run, &["--width: must be at least 1, got 0"]);
    assert!(!stderr(&run).contains("0x1"), "{}", stderr(&run));
}

/// Issue 14.10: one list of kinds, with what each is made from; pose is in it.
#[test]
fn kind_lists_name_every_kind_with_its_input() {
    let run = controlnet(&["annotate", "depth", s(&fixture("input_odd.png")), "--output", "/tmp/never.png"]);
    assert_clean_failure(
        &run,
        &[
            "unknown annotator kind 'depth'",
            "pose (from OpenPose JSON keypoints)",
            "inpaint (from an image and a mask)",
        ],
    );
    let help = controlnet(&["annotate", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("pose (from OpenPose JSON keypoints)"), "{text}");
    assert!(!text.contains("--model"), "annotate --model is gone: {text}");
}

/// Friction: a flag the kind does not take is refused, not ignored.
#[test]
fn flags_of_other_kinds_are_refused() {
    let input = fixture("input_odd.png");
    for (kind, flag, value) in [("canny", "--sigma", "3"), ("blur", "--low", "10"), ("canny", "--seed", "1")] {
        let run = controlnet(&["annotate", kind, s(&input), "--output", "/tmp/never.png", flag, value]);
        assert_clean_failure(&run, &[&format!("{flag}: does not apply to {kind}")]);
    }
    let run = controlnet(&["annotate", "canny", s(&input), "--output", "/tmp/never.png", "--flip"]);
    assert_clean_failure(&run, &["--flip: does not apply to canny (used by pose)"]);
    let run = controlnet(&["annotate", "canny", s(&input), "--output", "/tmp/never.png", "--model", "x"]);
    assert_clean_failure(&run, &["--model"]);
}

/// Output rule: an output that is also an input is refused, the input left as it was.
#[test]
fn output_equal_to_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("photo.png");
    std::fs::copy(fixture("input_odd.png"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let run = controlnet(&["annotate", "invert", s(&input), "--output", s(&input)]);
    assert_clean_failure(&run, &["--output", "is also an input"]);
    assert_untouched(&input, &before);
    // A folder annotated into itself would overwrite photo.png with its own map.
    let run = controlnet(&["annotate", "invert", s(dir.path()), "--output", s(dir.path())]);
    assert_clean_failure(&run, &["--output", "is also an input"]);
    assert_untouched(&input, &before);
}

/// Output rule: missing parent folders are created.
#[test]
fn output_folders_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a/b/edges.png");
    let run = controlnet(&["annotate", "canny", s(&fixture("input_odd.png")), "--output", s(&out)]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(out.is_file());
}

/// Issue 14.11: a JSON list of poses (frames) makes one image per element, each drawn as controlnet_aux draws
/// that frame (it said "read it as a list" with no way to).
#[test]
fn a_pose_list_makes_one_image_per_pose() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("poses");
    let run = controlnet(&["annotate", "pose", s(&common::fixture("pose/list.json")), "--output", s(&out)]);
    assert!(run.status.success(), "{}", stderr(&run));
    for i in 0..2 {
        let ours = image::open(out.join(format!("list_{i}.png"))).unwrap().to_rgb8();
        let reference = image::open(common::fixture(&format!("pose/list_frame{i}.png"))).unwrap().to_rgb8();
        // metric: the render tests' PSNR >= 40 dB against controlnet_aux
        let psnr = common::psnr(&ours, &reference);
        assert!(psnr >= 40.0, "frame {i}: PSNR {psnr:.2} dB");
    }
    // A list cannot go to one image file.
    let file = dir.path().join("one.png");
    std::fs::write(&file, b"previous").unwrap();
    let run = controlnet(&["annotate", "pose", s(&common::fixture("pose/list.json")), "--output", s(&file)]);
    assert_clean_failure(&run, &["--output", "list of 2 poses", "must be a folder"]);
    assert_untouched(&file, b"previous");
}

/// Issue 14.8: error text was doubled ("nope.png: No such file or directory (os error 2): No such file or
/// directory (os error 2)", "stream did not contain valid UTF-8: stream did not contain valid UTF-8"): each
/// cause is told once.
#[test]
fn error_causes_are_told_once() {
    let dir = tempfile::tempdir().unwrap();
    let run = controlnet(&["annotate", "canny", "nope.png", "--output", s(&dir.path().join("o.png"))]);
    assert_clean_failure(&run, &["nope.png: No such file or directory"]);
    assert_eq!(stderr(&run).matches("No such file or directory").count(), 1, "{}", stderr(&run));
    let binary = dir.path().join("binary.json");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let run = controlnet(&["annotate", "pose", s(&binary), "--output", s(&dir.path().join("o.png"))]);
    assert_clean_failure(&run, &["binary.json: stream did not contain valid UTF-8"]);
    assert_eq!(stderr(&run).matches("stream did not contain valid UTF-8").count(), 1, "{}", stderr(&run));
}

/// Friction: logs carry no ANSI colour codes when stderr is not a terminal (a log file, a pipe).
#[test]
fn logs_are_plain_text_off_a_terminal() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(["annotate", "invert", "nope.png", "--output", "/tmp/never.png"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("DEBUG"), "a debug line is logged: {err}");
    assert!(!err.contains('\x1b'), "ANSI escape codes in a non-terminal log: {err:?}");
}
