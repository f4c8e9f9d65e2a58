//! Bad input to `controlnet generate`: a clear message naming the flag or file, a non-zero exit, no panic,
//! and an existing output file left untouched.
use crate::common;

use common::*;

const MODEL: &str = "tests/fixtures/models/tiny-sd15";
const CN: &str = "tests/fixtures/models/tiny-controlnet-a";
const CONTROL: &str = "tests/fixtures/pipeline/control_circle.png";

/// Runs generate with `extra` args over a pre-existing output file; asserts failure, the message, and that
/// the output file kept its bytes.
fn fails_with(extra: &[&str], expect: &[&str]) {
    let dir = temp_dir();
    let out = dir.path().join("keep.png");
    std::fs::write(&out, b"previous result").unwrap();
    let mut args = vec!["generate", "--output", out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    let res = controlnet(&args);
    let err = stderr(&res);
    assert!(!res.status.success(), "expected failure for {extra:?}");
    assert!(!err.contains("panicked"), "panic for {extra:?}: {err}");
    for e in expect {
        assert!(err.contains(e), "message for {extra:?} lacks {e:?}: {err}");
    }
    assert_eq!(std::fs::read(&out).unwrap(), b"previous result", "output file was modified");
}

#[test]
fn missing_model_folder() {
    fails_with(
        &["--model", "./no/such/model", "--prompt", "x"],
        &["--model: ./no/such/model", "no such local file or folder"],
    );
}

/// A hub id that is not cached, offline: a clear error naming the flag, and no network use.
#[test]
fn hub_id_offline_and_not_cached() {
    let cache = temp_dir();
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(["generate", "--model", "someone/some-model", "--output", out.to_str().unwrap(), "--quiet"])
        .current_dir(repo())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", cache.path())
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let err = stderr(&res);
    assert!(!res.status.success());
    assert!(err.contains("--model: someone/some-model") && err.contains("HF_HUB_OFFLINE"), "{err}");
    // The value might be a mistyped local path: the error says no such local path exists either.
    assert!(err.contains("no local file or folder someone/some-model"), "{err}");
}

#[test]
fn control_image_that_is_not_an_image() {
    fails_with(&["--model", MODEL, "--controlnet", CN, "--control", "Cargo.toml", "--prompt", "x"], &["Cargo.toml"]);
}

#[test]
fn controls_and_controlnets_not_paired() {
    fails_with(&["--model", MODEL, "--controlnet", CN, "--prompt", "x"], &["1 --controlnet but 0 --control"]);
}

#[test]
fn start_after_end() {
    fails_with(
        &["--model", MODEL, "--controlnet", CN, "--control", CONTROL, "--control-start", "0.8", "--control-end", "0.2"],
        &["--control-start (ControlNet 1): 0.8", "end of the window (0.2)"],
    );
}

#[test]
fn unknown_scheduler() {
    fails_with(
        &["--model", MODEL, "--scheduler", "dpm fast", "--prompt", "x"],
        &["--scheduler", "dpm fast", "euler-a"],
    );
}

#[test]
fn zero_steps() {
    fails_with(&["--model", MODEL, "--steps", "0", "--prompt", "x"], &["--steps"]);
}

#[test]
fn size_not_multiple_of_8() {
    fails_with(&["--model", MODEL, "--width", "100", "--prompt", "x"], &["--width: 100", "multiple of 8"]);
}

#[test]
fn bad_number() {
    fails_with(&["--model", MODEL, "--guidance", "lots"], &["--guidance"]);
}

/// Every subcommand's rule: an output's missing folders are created; the output must be a PNG.
#[test]
fn output_not_png_or_folder_missing() {
    let dir = temp_dir();
    let nested = dir.path().join("no/such/dir/x.png");
    let res =
        controlnet(&["generate", "--model", MODEL, "--steps", "1", "--output", nested.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert!(nested.is_file());
    let res = controlnet(&["generate", "--model", MODEL, "--output", "x.gif", "--quiet"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains(".png"), "{}", stderr(&res));
}

#[test]
fn scale_before_any_controlnet() {
    fails_with(
        &[
            "--model",
            MODEL,
            "--conditioning-scale",
            "0.5",
            "--controlnet",
            CN,
            "--controlnet",
            CN,
            "--control",
            CONTROL,
            "--control",
            CONTROL,
        ],
        &["--conditioning-scale 0.5 comes before any --controlnet"],
    );
}

#[test]
fn controlnet_that_does_not_fit_the_base() {
    fails_with(
        &["--model", MODEL, "--controlnet", "tests/fixtures/models/tiny-controlnet-mismatch", "--control", CONTROL],
        &["tiny-controlnet-mismatch", "does not fit the base", "2 in the ControlNet but 3 in the UNet"],
    );
}

#[test]
fn corrupt_controlnet_weights() {
    let dir = temp_dir();
    let cn = dir.path().join("cn");
    std::fs::create_dir(&cn).unwrap();
    std::fs::copy(repo().join(CN).join("config.json"), cn.join("config.json")).unwrap();
    let w = std::fs::read(repo().join(CN).join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(cn.join("diffusion_pytorch_model.safetensors"), &w[..w.len() / 3]).unwrap();
    fails_with(
        &["--model", MODEL, "--controlnet", cn.to_str().unwrap(), "--control", CONTROL],
        &["diffusion_pytorch_model.safetensors", "truncated"],
    );
}

/// Issue 14.10: the kinds offered after an unknown `--preprocess` include pose and say what each is made from;
/// inpaint is refused for what it needs, not with a pointer to a Rust function.
#[test]
fn preprocess_kinds_are_listed_with_what_they_need() {
    let base = ["--model", MODEL, "--controlnet", CN, "--control", CONTROL, "--prompt", "x"];
    let mut args = base.to_vec();
    args.extend(["--preprocess", "depth"]);
    fails_with(&args, &["unknown annotator kind 'depth'", "pose (from OpenPose JSON keypoints)", "canny"]);
    let mut args = base.to_vec();
    args.extend(["--preprocess", "inpaint"]);
    fails_with(&args, &["--preprocess (ControlNet 1): inpaint", "inpaint is made from an image and a mask"]);
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let res = controlnet(&[&args[..], &["--output", out.to_str().unwrap(), "--quiet"]].concat());
    assert!(!stderr(&res).contains("::"), "no Rust paths in messages: {}", stderr(&res));
}

/// Prompt syntax and clip skip: an unknown syntax, a bad A1111 weight and a clip skip beyond the tiny encoder's
/// two layers are refused naming the flag.
#[test]
fn bad_prompt_syntax_settings() {
    fails_with(&["--model", MODEL, "--prompt", "x", "--prompt-syntax", "comfy"], &["--prompt-syntax", "comfy"]);
    fails_with(
        &["--model", MODEL, "--prompt", "a (cat:1.2.3)", "--prompt-syntax", "a1111"],
        &["--prompt", "1.2.3", "not a number"],
    );
    fails_with(&["--model", MODEL, "--prompt", "x", "--clip-skip", "3"], &["--clip-skip", "2 layers"]);
}
