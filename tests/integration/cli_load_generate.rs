//! `generate` with the files people have: an original (lllyasviel-layout) ControlNet file gives the same image
//! as its diffusers twin; single-file SD checkpoints are covered in `src/pipeline/sd.rs`'s tests.
use crate::common;

use common::*;

#[test]
fn original_controlnet_file_gives_the_diffusers_image() {
    let dir = temp_dir();
    let original = dir.path().join("control_tiny.safetensors");
    // convert's output is checked against diffusers' own conversion in src/io (tests/fixtures/load/recipes.json).
    let res = controlnet(&[
        "convert",
        "tests/fixtures/models/tiny-controlnet-a",
        original.to_str().unwrap(),
        "--to",
        "original",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let out = dir.path().join("o.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        original.to_str().unwrap(),
        "--controlnet-config",
        "tests/fixtures/models/tiny-controlnet-a/config.json",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--prompt",
        "a red circle on a light blue background",
        "--seed",
        "7",
        "--steps",
        "5",
        "--scheduler",
        "ddim",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let ours = image::open(&out).unwrap().to_rgb8();
    let theirs = image::open(fixture("pipeline/cn_ddim.png")).unwrap().to_rgb8();
    let db = psnr(&ours, &theirs);
    assert!(db >= 40.0, "PSNR {db:.1} dB against diffusers with the diffusers twin");
}

#[test]
fn unet_given_as_controlnet_says_what_it_is() {
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-sd15/unet/diffusion_pytorch_model.safetensors",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("UNet") && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

/// Issue 14.7: the wrong kind of model says what it is and what was expected.
#[test]
fn wrong_kinds_of_model_say_what_they_are() {
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let o = out.to_str().unwrap();
    let circle = "tests/fixtures/pipeline/control_circle.png";
    let cases: [(&[&str], &str, &str); 3] = [
        (
            &[
                "--model",
                "tests/fixtures/models/tiny-sd15",
                "--controlnet",
                "tests/fixtures/models/tiny-sd15/unet",
                "--control",
                circle,
            ],
            "--controlnet (ControlNet 1): tests/fixtures/models/tiny-sd15/unet is ",
            "UNet",
        ),
        (
            &[
                "--model",
                "tests/fixtures/models/tiny-sd15",
                "--controlnet",
                "tests/fixtures/models/tiny-sd15",
                "--control",
                circle,
            ],
            "--controlnet (ControlNet 1): tests/fixtures/models/tiny-sd15 is ",
            "pipeline",
        ),
        (
            &["--model", "tests/fixtures/models/tiny-controlnet-a"],
            "--model: tests/fixtures/models/tiny-controlnet-a is ",
            "ControlNet",
        ),
    ];
    for (args, starts, kind) in cases {
        let mut all = vec!["generate", "-o", o, "-q"];
        all.extend(args);
        let res = controlnet(&all);
        assert!(!res.status.success());
        let err = stderr(&res);
        assert!(err.contains(starts) && err.contains(kind) && err.contains("was expected"), "{args:?}: {err}");
        assert!(!out.exists());
    }
}
