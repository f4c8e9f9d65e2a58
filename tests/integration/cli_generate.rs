//! End to end: `controlnet generate` against diffusers' own runs of the same cases
//! (tools/fixtures/gen_pipeline.py → tests/fixtures/pipeline/cases.json). Images must agree within 40 dB PSNR.
use crate::common;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    args: Vec<String>,
    images: Vec<String>,
}

fn case(name: &str) -> Case {
    let text = std::fs::read_to_string(fixture("pipeline/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    cases.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"))
}

/// Minimum PSNR (dB) against diffusers' image for the same settings and seed.
const MIN_PSNR_DB: f64 = 40.0;

fn run_case(name: &str) {
    let c = case(name);
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let mut args: Vec<&str> = vec!["generate"];
    args.extend(c.args.iter().map(String::as_str));
    args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{name}: {}", stderr(&res));
    for (i, reference) in c.images.iter().enumerate() {
        let ours = if c.images.len() == 1 { out.clone() } else { dir.path().join(format!("out-{}.png", i + 1)) };
        let ours = image::open(&ours).unwrap().to_rgb8();
        let theirs = image::open(fixture(&format!("pipeline/{reference}"))).unwrap().to_rgb8();
        let db = psnr(&ours, &theirs);
        assert!(db >= MIN_PSNR_DB, "{name} image {}: PSNR {db:.1} dB < {MIN_PSNR_DB} dB", i + 1);
    }
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_case($name); })*
    };
}

cases! {
    model_default_scheduler => "cn_default",
    ddim => "cn_ddim",
    pndm => "cn_pndm",
    euler => "cn_euler",
    euler_ancestral => "cn_euler-a",
    dpm_solver_2m => "cn_dpmpp2m",
    unipc => "cn_unipc",
    two_controlnets => "cn_two_nets",
    guess_mode => "cn_guess_mode",
    control_window => "cn_window",
    conditioning_scale_and_negative_prompt => "cn_scale",
    two_images_one_batch => "cn_two_images",
    default_size_from_odd_control_image => "cn_odd_size",
    control_image_resized_lanczos => "cn_resize",
    no_controlnet => "sd_no_controlnet",
    sd2_v_prediction => "sd2_cn_vpred",
    sd2_v_prediction_unipc_window => "sd2_cn_vpred_unipc",
}

#[test]
fn png_carries_its_recipe() {
    let dir = temp_dir();
    let out = dir.path().join("r.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--prompt",
        "a cat 🐱",
        "--steps",
        "2",
        "--seed",
        "5",
        "--scheduler",
        "euler-a",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.starts_with(
            "a cat 🐱\nNegative prompt: \nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 128x128"
        ),
        "{params}"
    );
    let recipe = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert_eq!(recipe.seed, 5);
    assert_eq!(recipe.scheduler, "euler-a");
    assert_eq!(recipe.controls.len(), 1);
    assert_eq!(recipe.controls[0].control_image.sha256.len(), 64);
    assert_eq!(recipe.model.sha256.len(), 64);
}

#[test]
fn seed_is_printed_when_not_given() {
    let dir = temp_dir();
    let out = dir.path().join("s.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let stdout = String::from_utf8_lossy(&res.stdout);
    let seed: u64 = stdout.lines().find_map(|l| l.strip_prefix("seed: ")).expect("seed line").parse().unwrap();
    let recipe =
        controlnet::pipeline::ImageMetadata::from_text_chunks(&controlnet::io::images::read_png_text(&out).unwrap())
            .unwrap();
    assert_eq!(recipe.seed, seed);
}

#[test]
fn reproduce_makes_the_same_image_from_its_recipe() {
    let dir = temp_dir();
    let out = dir.path().join("orig.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_odd.png",
        "--prompt",
        "zwei Kreise 🐱",
        "--negative-prompt",
        "blur",
        "--steps",
        "3",
        "--seed",
        "99",
        "--scheduler",
        "euler-a",
        "--num-images",
        "2",
        "--conditioning-scale",
        "0.7",
        "--control-end",
        "0.8",
        "--resize",
        "crop-and-resize",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let second = dir.path().join("orig-2.png");
    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", second.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let a = image::open(&second).unwrap().to_rgb8();
    let b = image::open(&again).unwrap().to_rgb8();
    assert_eq!(a, b, "reproduced image differs");
    let first = image::open(dir.path().join("orig-1.png")).unwrap().to_rgb8();
    assert_ne!(first, b, "batch position was not kept");
    // No leftovers next to the output.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn reproduce_refuses_an_image_without_recipe() {
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let res =
        controlnet(&["reproduce", "tests/fixtures/pipeline/control_circle.png", "--output", out.to_str().unwrap()]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("carries no controlnet-rs recipe"), "{}", stderr(&res));
}

const SD15: &str = "tests/fixtures/models/tiny-sd15";
const CN_A: &str = "tests/fixtures/models/tiny-controlnet-a";
const CIRCLE: &str = "tests/fixtures/pipeline/control_circle.png";

/// `generate` on the tiny SD1.5 model with the ControlNet `net` conditioned on `control`, into `out`, then `extra`.
fn generate_with_net(net: &str, control: &str, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let shared = ["generate", "--model", SD15, "--controlnet", net, "--control", control, "-o", out.to_str().unwrap()];
    controlnet(&shared.into_iter().chain(extra.iter().copied()).collect::<Vec<_>>())
}

/// Runs the binary, killing it after `limit` (a run that should have been refused at once must not hang the
/// suite); returns the output and how long it took.
fn run_within(args: &[&str], limit: std::time::Duration) -> (std::process::Output, std::time::Duration) {
    use std::process::{Command, Stdio};
    let start = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(args)
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out, start.elapsed())
}

/// Issue 14.1: a size that cannot fit is refused before anything is allocated, with the figures; a side no
/// model can use in reasonable time is refused by name.
#[test]
fn huge_sizes_are_refused_at_once() {
    let dir = temp_dir();
    let out = dir.path().join("huge.png");
    let limit = std::time::Duration::from_secs(30);
    let cases: [(&[&str], &str); 3] = [
        (&["--width", "100000", "--height", "100000"], "--width: a 100000x100000 image needs about"),
        (&["--width", "100000"], "--width: 100000 px is more than the 16384 px"),
        (&["--width", "16384", "--height", "16384", "--num-images", "64"], "--width: a 16384x16384 image"),
    ];
    for (size, expected) in cases {
        let mut args = vec!["generate", "--prompt", "a red circle", "--steps", "2", "--seed", "1", "-o"];
        args.push(out.to_str().unwrap());
        args.extend(size);
        let (res, took) = run_within(&args, limit);
        let err = stderr(&res);
        assert_eq!(res.status.code(), Some(1), "{size:?}: {err}");
        assert!(err.contains(expected), "{size:?}: {err}");
        if expected.contains("image") && !expected.contains("needs") {
            assert!(err.contains("needs about") && err.contains("of memory"), "{err}");
        }
        assert!(took < std::time::Duration::from_secs(5), "{size:?} took {took:?}");
        // Refused before the seed is drawn and printed.
        assert!(!String::from_utf8_lossy(&res.stdout).contains("seed:"));
        assert!(!out.exists());
    }
}

/// Issue 14.13: a prompt longer than CLIP reads is cut as diffusers cuts it, with a warning naming the cut part.
#[test]
fn a_long_prompt_is_cut_with_a_warning() {
    let dir = temp_dir();
    let out = dir.path().join("long.png");
    let prompt = format!("{}a red dog", "cat ".repeat(75));
    let res = controlnet(&[
        "generate",
        "--model",
        SD15,
        "--prompt",
        &prompt,
        "--steps",
        "1",
        "--seed",
        "1",
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let err = stderr(&res);
    assert!(err.contains("warning: --prompt: ") && err.contains("this part was cut: \"a red dog\""), "{err}");
}

/// Friction: the seed is printed only once the request passed its checks; flags that do nothing are warned
/// about; flags that cannot apply are refused.
#[test]
fn flags_that_do_not_apply_are_refused_or_warned() {
    let dir = temp_dir();
    let out = dir.path().join("f.png");
    let o = out.to_str().unwrap();
    let refused = |args: &[&str], expect: &str| {
        let mut all = vec!["generate", "--model", SD15, "-o", o, "-q"];
        all.extend(args);
        let res = controlnet(&all);
        assert_eq!(res.status.code(), Some(1), "{args:?}");
        assert!(stderr(&res).contains(expect), "{args:?}: {}", stderr(&res));
        assert!(!String::from_utf8_lossy(&res.stdout).contains("seed:"), "{args:?}: seed printed before refusing");
        assert!(!out.exists());
    };
    refused(&["--steps", "0"], "--steps: must be at least 1");
    refused(&["--variant", "fp8"], "the valid value is fp16");
    refused(&["--config", SD15], "--config: ");
    refused(&["--prediction-type", "x0"], "epsilon");

    let res = controlnet(&["generate", "--model", SD15, "--guess-mode", "--steps", "1", "-o", o, "-q"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert!(stderr(&res).contains("warning: --guess-mode: no ControlNet"), "{}", stderr(&res));
    assert!(String::from_utf8_lossy(&res.stdout).contains("seed: "));
}

/// Issue 14.15: a mistyped local path is not looked up on the hub.
#[test]
fn a_mistyped_local_model_path_is_not_sent_to_the_hub() {
    let dir = temp_dir();
    let out = dir.path().join("m.png");
    let (res, took) = run_within(
        &["generate", "--model", "tests/fixtures/models/tiny-sd1", "-o", out.to_str().unwrap()],
        std::time::Duration::from_secs(30),
    );
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains("--model: tests/fixtures/models/tiny-sd1: no such local file or folder"), "{err}");
    assert!(err.contains("tests/fixtures/models exists"), "{err}");
    assert!(took < std::time::Duration::from_secs(10));
}

/// Output rule: folders are created, an output that is an input is refused (and left as it was), progress shows
/// as plain lines when stderr is not a terminal.
#[test]
fn outputs_follow_the_common_rule() {
    let dir = temp_dir();
    let control = dir.path().join("control.png");
    std::fs::copy(repo().join(CIRCLE), &control).unwrap();
    let before = std::fs::read(&control).unwrap();
    let res = generate_with_net(CN_A, control.to_str().unwrap(), &control, &["--steps", "1", "--seed", "1"]);
    assert_eq!(res.status.code(), Some(1));
    assert!(stderr(&res).contains("is also an input"), "{}", stderr(&res));
    assert_eq!(std::fs::read(&control).unwrap(), before);

    let nested = dir.path().join("new/folder/out.png");
    let saved = dir.path().join("conds/c.png");
    let res = generate_with_net(
        CN_A,
        CIRCLE,
        &nested,
        &["--save-control", saved.to_str().unwrap(), "--steps", "2", "--seed", "1"],
    );
    assert!(res.status.success(), "{}", stderr(&res));
    assert!(nested.is_file() && saved.is_file());
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains(&format!("wrote {}", nested.display())), "{stdout}");
    assert!(stderr(&res).contains("step 1/"), "no plain progress line: {}", stderr(&res));
}

/// Issue 14.4: reproduce works from any folder, and prints the path it wrote.
#[test]
fn reproduce_works_from_another_folder() {
    let dir = temp_dir();
    let out = dir.path().join("orig.png");
    let res = generate_with_net(CN_A, CIRCLE, &out, &["--steps", "2", "--seed", "3", "-q"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let elsewhere = temp_dir();
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(["reproduce", out.to_str().unwrap(), "--output", "sub/again.png", "-q"])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", stderr(&res));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert_eq!(stdout.trim(), "wrote sub/again.png");
    let again = elsewhere.path().join("sub/again.png");
    assert_eq!(image::open(&again).unwrap().to_rgb8(), image::open(&out).unwrap().to_rgb8());
}

/// Issue 14.12: a picture is converted to the channels a net takes (grey for a 1-channel net).
#[test]
fn a_picture_feeds_a_one_channel_controlnet() {
    use candle_core::{Device, IndexOp};
    let dir = temp_dir();
    let net = dir.path().join("grey-net");
    std::fs::create_dir(&net).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(CN_A).join("config.json")).unwrap()).unwrap();
    config["conditioning_channels"] = 1.into();
    std::fs::write(net.join("config.json"), config.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    let mut tensors = candle_core::safetensors::load(repo().join(CN_A).join(weights), &Device::Cpu).unwrap();
    let key = "controlnet_cond_embedding.conv_in.weight";
    // The first input channel of the hint encoder's first conv: a net that reads one channel.
    let sliced = tensors[key].i((.., 0..1, .., ..)).unwrap().contiguous().unwrap();
    tensors.insert(key.to_string(), sliced);
    candle_core::safetensors::save(&tensors, net.join(weights)).unwrap();

    let out = dir.path().join("grey.png");
    let saved = dir.path().join("cond.png");
    let extra = ["--save-control", saved.to_str().unwrap(), "--steps", "2", "--seed", "1", "-q"];
    let res = generate_with_net(net.to_str().unwrap(), CIRCLE, &out, &extra);
    assert!(res.status.success(), "{}", stderr(&res));
    let cond = image::open(&saved).unwrap().to_rgb8();
    assert!(cond.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]), "the saved condition is not grey");
}

/// `--only-mid-control` belongs to the --controlnet before it (like the other per-net flags) and is recorded;
/// `--unet` takes a UNet folder and is recorded; before any --controlnet the flag is refused.
#[test]
fn only_mid_control_and_unet_flags() {
    let dir = temp_dir();
    let out = dir.path().join("m.png");
    let out_s = out.to_str().unwrap();
    let args = |mid_first: bool| {
        let mut a = vec!["generate", "--model", "tests/fixtures/models/tiny-sd15"];
        if !mid_first {
            a.extend(["--controlnet", "tests/fixtures/models/tiny-controlnet-a", "--only-mid-control"]);
        } else {
            a.extend(["--only-mid-control", "--controlnet", "tests/fixtures/models/tiny-controlnet-a"]);
        }
        a.extend([
            "--control",
            "tests/fixtures/pipeline/control_circle.png",
            "--controlnet",
            "tests/fixtures/models/tiny-controlnet-b",
            "--control",
            "tests/fixtures/pipeline/control_circle.png",
            "--unet",
            "tests/fixtures/models/tiny-sd15/unet",
            "--steps",
            "1",
            "--seed",
            "1",
            "--output",
            out_s,
            "--quiet",
        ]);
        a
    };
    let res = controlnet(&args(false));
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let recipe = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert!(recipe.controls[0].only_mid_control && !recipe.controls[1].only_mid_control);
    assert!(recipe.unet.expect("--unet is recorded").path.ends_with("tiny-sd15/unet"));

    let res = controlnet(&args(true));
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--only-mid-control"), "{}", stderr(&res));

    let res = controlnet(&["generate", "--unet", "tests/fixtures/models/tiny-sd15", "--output", out_s, "-q"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--unet"), "{}", stderr(&res));
}

/// Ctrl-C during generate stops after the current step: status 130, a message, and no output file.
#[test]
fn ctrl_c_stops_generate_without_writing() {
    let dir = temp_dir();
    let out = dir.path().join("never.png");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(["generate", "--control", "examples/circle.png", "--prompt", "a red circle", "--steps", "999"])
        .args(["--num-images", "8"])
        .args(["--seed", "1", "--output", out.to_str().unwrap()])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let res = child.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(130), "{}", stderr(&res));
    assert!(stderr(&res).contains("stopped by Ctrl-C: nothing was written"), "{}", stderr(&res));
    assert!(!out.exists());
}

/// `--control-mode` per net: recorded per net in the recipe and in A1111's infotext, changes the picture, and a
/// bad value names the flag.
#[test]
fn control_modes_are_per_net_and_recorded() {
    let dir = temp_dir();
    let run = |name: &str, modes: [Option<&str>; 2]| {
        let out = dir.path().join(name);
        let mut a: Vec<String> = ["generate", "--model", "tests/fixtures/models/tiny-sd15"].map(String::from).to_vec();
        for (net, mode) in ["a", "b"].into_iter().zip(modes) {
            a.extend(["--controlnet".into(), format!("tests/fixtures/models/tiny-controlnet-{net}")]);
            a.extend(["--control".into(), "tests/fixtures/pipeline/control_circle.png".into()]);
            if let Some(m) = mode {
                a.extend(["--control-mode".into(), m.into()]);
            }
        }
        a.extend(["--steps", "2", "--seed", "1", "--output", out.to_str().unwrap(), "--quiet"].map(String::from));
        let res = controlnet(&a.iter().map(String::as_str).collect::<Vec<_>>());
        (res, out)
    };
    let (res, balanced) = run("b.png", [None, None]);
    assert!(res.status.success(), "{}", stderr(&res));
    let (res, modes) = run("m.png", [Some("controlnet"), Some("My prompt is more important")]);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&modes).unwrap();
    let recipe = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    use controlnet::pipeline::ControlMode;
    assert_eq!(recipe.controls[0].control_mode, ControlMode::ControlNet);
    assert_eq!(recipe.controls[1].control_mode, ControlMode::Prompt);
    let infotext = recipe.a1111_parameters();
    assert!(infotext.contains("Control Mode: ControlNet is more important"), "{infotext}");
    assert!(infotext.contains("Control Mode: My prompt is more important"), "{infotext}");
    let (a, b) = (image::open(&balanced).unwrap().to_rgb8(), image::open(&modes).unwrap().to_rgb8());
    assert!(a.as_raw() != b.as_raw(), "the control modes changed nothing");

    let (res, out) = run("x.png", [Some("strong"), None]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--control-mode"), "{}", stderr(&res));
    assert!(!out.exists());
}
