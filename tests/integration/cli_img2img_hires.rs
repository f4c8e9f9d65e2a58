//! End to end: `generate --hires-scale` (A1111's hires fix): the second pass is an img2img run on the upscaled
//! first image, it is recorded and reproduced, and bad settings are refused naming their flags.
use crate::common;

use std::path::Path;

use common::*;

fn base_args() -> Vec<String> {
    [
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--prompt",
        "a red circle on a light blue background",
        "--seed",
        "41",
        "--steps",
        "4",
        "--scheduler",
        "ddim",
    ]
    .map(String::from)
    .to_vec()
}

fn generate(extra: &[&str], out: &Path) -> std::process::Output {
    let mut args = vec!["generate".to_string()];
    args.extend(base_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--output".into(), out.display().to_string(), "--quiet".into()]);
    controlnet(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn pixels(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

const HIRES: [&str; 6] = ["--hires-scale", "1.5", "--hires-steps", "3", "--hires-strength", "0.7"];

#[test]
fn the_second_pass_is_img2img_on_the_upscaled_first_image() {
    let dir = temp_dir();
    let (hires, first, explicit) =
        (dir.path().join("hires.png"), dir.path().join("first.png"), dir.path().join("x.png"));
    let res = generate(&[&HIRES[..], &["--hires-upscaler", "lanczos"]].concat(), &hires);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(pixels(&hires).dimensions(), (192, 192));
    let res = generate(&[], &first);
    assert!(res.status.success(), "{}", stderr(&res));
    let first_arg = first.display().to_string();
    let img2img = ["--init-image", &first_arg, "--width", "192", "--height", "192", "--strength", "0.7"];
    let mut args = img2img.to_vec();
    // The second pass's steps replace the first's.
    let mut all = base_args();
    let i = all.iter().position(|a| a == "--steps").unwrap();
    all[i + 1] = "3".into();
    args.extend(["--output", explicit.to_str().unwrap(), "--quiet"]);
    let mut cmd = vec!["generate".to_string()];
    cmd.extend(all);
    cmd.extend(args.iter().map(|s| s.to_string()));
    let res = controlnet(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(pixels(&hires), pixels(&explicit));
}

#[test]
fn latent_hires_is_recorded_and_reproduced() {
    let dir = temp_dir();
    let (out, lanczos, again) = (dir.path().join("out.png"), dir.path().join("l.png"), dir.path().join("again.png"));
    let res = generate(&HIRES, &out);
    assert!(res.status.success(), "{}", stderr(&res));
    let res = generate(&[&HIRES[..], &["--hires-upscaler", "lanczos"]].concat(), &lanczos);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(pixels(&out).dimensions(), (192, 192));
    assert_ne!(pixels(&out), pixels(&lanczos), "the latent upscaler is the default and differs from lanczos");
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let meta = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    let hires = meta.hires.as_ref().unwrap();
    assert_eq!((hires.scale, hires.steps, hires.strength), (1.5, Some(3), 0.7));
    assert_eq!((meta.width, meta.height), (128, 128), "the first pass's size is recorded");
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent"), "{params}");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(pixels(&out), pixels(&again));
}

#[test]
fn bad_hires_settings_are_refused_naming_the_flag() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let cases: [(&[&str], &str); 4] = [
        (&["--hires-scale", "1"], "--hires-scale: 1 must be a number above 1"),
        (&["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength: 0 must lie in (0, 1]"),
        (
            &["--hires-scale", "2", "--hires-upscaler", "esrgan"],
            "--hires-upscaler: \"esrgan\": expected latent or lanczos",
        ),
        (
            &["--hires-scale", "2", "--init-image", "tests/fixtures/img2img/init.png"],
            "--hires-scale: the hires fix follows a txt2img pass",
        ),
    ];
    for (extra, want) in cases {
        let res = generate(extra, &out);
        assert!(!res.status.success(), "{extra:?}");
        assert!(stderr(&res).contains(want), "{extra:?}: {}", stderr(&res));
    }
    assert!(!out.exists());
}
