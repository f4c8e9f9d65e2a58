//! `generate --preprocess KIND --save-control PATH --resize MODE`: the condition a ControlNet sees is exactly
//! what `controlnet annotate` makes for the output size, and it is kept when asked.
use crate::common;

use common::*;

const MODEL: &str = "tests/fixtures/models/tiny-sd15";
const CN: &str = "tests/fixtures/models/tiny-controlnet-a";

fn rgb(path: &std::path::Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// `generate` on the tiny SD1.5 model with ControlNet A conditioned on `control`, seeded, into `out`, quiet,
/// then `extra`.
fn generate(control: &str, seed: &str, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let out = out.to_str().unwrap();
    let shared = ["generate", "--model", MODEL, "--controlnet", CN, "--control", control, "--seed", seed];
    let args: Vec<&str> = shared.into_iter().chain(["--output", out, "--quiet"]).chain(extra.iter().copied()).collect();
    controlnet(&args)
}

#[test]
fn canny_preprocess_equals_annotate_at_output_size() {
    let dir = temp_dir();
    let (saved, out, annotated) = (dir.path().join("cond.png"), dir.path().join("o.png"), dir.path().join("a.png"));
    let input = "tests/fixtures/annotators/input_square.png";
    let save = saved.to_str().unwrap();
    let extra = ["--preprocess", "canny", "--save-control", save, "--width", "64", "--height", "64", "--steps", "1"];
    let res = generate(input, "1", &out, &extra);
    assert!(res.status.success(), "{}", stderr(&res));
    let res = controlnet(&[
        "annotate",
        "canny",
        input,
        "--width",
        "64",
        "--height",
        "64",
        "--resize",
        "just-resize",
        "--output",
        annotated.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let (a, b) = (rgb(&saved), rgb(&annotated));
    assert_eq!(a.dimensions(), (64, 64));
    assert_eq!(a, b, "the condition generate used differs from annotate's map");
    // An edge map: only black and white, and some edges.
    assert!(a.pixels().all(|p| p.0 == [0, 0, 0] || p.0 == [255, 255, 255]));
    assert!(a.pixels().any(|p| p.0 == [255, 255, 255]));
    let recipe =
        controlnet::pipeline::ImageMetadata::from_text_chunks(&controlnet::io::images::read_png_text(&out).unwrap())
            .unwrap();
    assert_eq!(recipe.controls[0].preprocess.as_deref(), Some("canny"));
}

#[test]
fn pose_json_as_condition_renders_at_output_size() {
    let dir = temp_dir();
    let (saved, out, annotated) = (dir.path().join("pose.png"), dir.path().join("o.png"), dir.path().join("a.png"));
    let json = "tests/fixtures/pose/a1111_normalised.json";
    let save = saved.to_str().unwrap();
    let extra = ["--preprocess", "pose", "--save-control", save, "--width", "128", "--height", "96", "--steps", "1"];
    let res = generate(json, "3", &out, &extra);
    assert!(res.status.success(), "{}", stderr(&res));
    let res = controlnet(&[
        "annotate",
        "pose",
        json,
        "--width",
        "128",
        "--height",
        "96",
        "--output",
        annotated.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(rgb(&saved), rgb(&annotated));
    assert_eq!(rgb(&saved).dimensions(), (128, 96));
}

#[test]
fn default_size_follows_the_pose_canvas() {
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let res =
        generate("tests/fixtures/pose/openpose_pixels_odd.json", "2", &out, &["--preprocess", "pose", "--steps", "1"]);
    assert!(res.status.success(), "{}", stderr(&res));
    // The canvas is 333x257: rounded down to multiples of 8.
    assert_eq!(rgb(&out).dimensions(), (328, 256));
}

#[test]
fn crop_and_resize_keeps_the_aspect() {
    let dir = temp_dir();
    let (saved, out) = (dir.path().join("c.png"), dir.path().join("o.png"));
    // 130x97 condition into a 64x64 output: cropped, not squashed.
    let save = saved.to_str().unwrap();
    let extra =
        ["--resize", "crop-and-resize", "--save-control", save, "--width", "64", "--height", "64", "--steps", "1"];
    let res = generate("tests/fixtures/pipeline/control_odd.png", "4", &out, &extra);
    assert!(res.status.success(), "{}", stderr(&res));
    let src = controlnet::io::images::load_rgb(&repo().join("tests/fixtures/pipeline/control_odd.png")).unwrap();
    let want =
        controlnet::annotate::resize::fit_to_output(&src, 64, 64, controlnet::annotate::ResizeMode::CropAndResize);
    assert_eq!(rgb(&saved), want);
}

#[test]
fn unknown_preprocessor_is_named() {
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let res = generate("tests/fixtures/pipeline/control_circle.png", "1", &out, &["--preprocess", "sketchy"]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(
        err.contains("--preprocess (ControlNet 1): ") && err.contains("'sketchy'") && err.contains("canny"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn annotate_pose_matches_controlnet_aux_and_edits_keypoints() {
    let dir = temp_dir();
    let (out, flipped, json) = (dir.path().join("p.png"), dir.path().join("f.png"), dir.path().join("f.json"));
    let input = "tests/fixtures/pose/openpose_pixels_odd.json";
    let res = controlnet(&["annotate", "pose", input, "--output", out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", stderr(&res));
    // controlnet_aux's draw_poses output for the same file (tools/fixtures/gen_pose.py).
    assert_eq!(rgb(&out), rgb(&fixture("pose/openpose_pixels_odd.png")));
    let res = controlnet(&[
        "annotate",
        "pose",
        input,
        "--flip",
        "--save-json",
        json.to_str().unwrap(),
        "--output",
        flipped.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    // Flipping twice gives the original picture back.
    let twice = dir.path().join("t.png");
    let res = controlnet(&["annotate", "pose", json.to_str().unwrap(), "--flip", "--output", twice.to_str().unwrap()]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_ne!(rgb(&flipped), rgb(&out));
    assert_eq!(rgb(&twice), rgb(&out));
}

#[test]
fn annotate_pose_bad_input() {
    let dir = temp_dir();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "").unwrap();
    let out = dir.path().join("p.png");
    let res = controlnet(&["annotate", "pose", empty.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("empty.json") && !err.contains("panicked"), "{err}");
    assert!(!out.exists());
}

/// `annotate inpaint` writes a float condition (-1 at masked pixels); generate uses it as it is.
#[test]
fn inpaint_condition_tensor_feeds_generate() {
    let dir = temp_dir();
    let mask = dir.path().join("mask.png");
    let mut m = image::RgbImage::new(128, 128);
    for y in 40..90 {
        for x in 30..100 {
            m.put_pixel(x, y, image::Rgb([255, 255, 255]));
        }
    }
    m.save(&mask).unwrap();
    let cond = dir.path().join("inpaint.safetensors");
    let image = "tests/fixtures/pipeline/control_circle.png";
    let res = controlnet(&[
        "annotate",
        "inpaint",
        image,
        "--mask",
        mask.to_str().unwrap(),
        "--output",
        cond.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let run = |control: &str, out: &std::path::Path| generate(control, "8", out, &["--steps", "2"]);
    let (with_mask, plain) = (dir.path().join("m.png"), dir.path().join("p.png"));
    let res = run(cond.to_str().unwrap(), &with_mask);
    assert!(res.status.success(), "{}", stderr(&res));
    let res = run(image, &plain);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(rgb(&with_mask).dimensions(), (128, 128));
    assert_ne!(rgb(&with_mask), rgb(&plain), "the masked condition changed nothing");
    // A tensor is not resized: another output size is refused, naming the file.
    let res = generate(cond.to_str().unwrap(), "8", &dir.path().join("x.png"), &["--width", "64", "--height", "64"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("inpaint.safetensors") && stderr(&res).contains("not resized"), "{}", stderr(&res));
}
