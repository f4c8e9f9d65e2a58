//! End to end: `controlnet init`, `controlnet train` (validation, fidelity, checkpoints, resume) and `generate`
//! with the trained result, on the tiny models and the 2-example fill50k fixture at 32 px.
use crate::common;

use common::*;

const MODEL: &str = "tests/fixtures/models/tiny-sd15";
const DATA: &str = "tests/fixtures/train/fill50k";
const COND: &str = "tests/fixtures/train/fill50k/source/0.png";
/// `train`'s validation settings of these tests: a 2-step image of "a circle" from `COND` every 2 updates.
const VALIDATION: [&str; 8] = [
    "--validation-image",
    COND,
    "--validation-prompt",
    "a circle",
    "--validation-steps",
    "2",
    "--validation-inference-steps",
    "2",
];

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `generate` a 2-step 32-px "a circle" from `COND` with `model` and a trained ControlNet `net` into `png`.
fn generate_with(model: &str, net: &std::path::Path, png: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let (cn, out) = (net.to_str().unwrap(), png.to_str().unwrap());
    let mut args = vec!["generate", "--model", model, "--controlnet", cn, "--control", COND, "--prompt", "a circle"];
    args.extend(["--steps", "2", "--width", "32", "--height", "32", "--output", out, "--quiet"]);
    args.extend_from_slice(extra);
    controlnet(&args)
}

#[test]
fn init_train_resume_generate() {
    let dir = temp_dir();
    let cn = dir.path().join("cn");
    let run = dir.path().join("run");
    let (cn_s, run_s) = (cn.to_str().unwrap(), run.to_str().unwrap());

    // 1. A new ControlNet, with the new tensors listed.
    let out = controlnet(&["init", "--model", MODEL, "--output", cn_s, "--seed", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("controlnet_mid_block.weight") && text.contains("controlnet_cond_embedding.conv_in.weight"));
    assert!(text.contains("copied from the UNet's encoder"), "{text}");

    // A smaller hint encoder: its channels land in the config (diffusers' conditioning_embedding_out_channels).
    let small = dir.path().join("cn-small");
    let out =
        controlnet(&["init", "--model", MODEL, "--output", small.to_str().unwrap(), "--hint-channels", "8,8,16,16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(small.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["conditioning_embedding_out_channels"], serde_json::json!([8, 8, 16, 16]));

    // 2. Two updates with checkpoints, cache, validation and the fidelity score.
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            MODEL,
            "--dataset",
            DATA,
            "--output",
            run_s,
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--checkpointing-steps",
            "1",
            "--checkpoints-total-limit",
            "1",
            "--learning-rate",
            "1e-4",
            "--cache",
            "--fidelity",
            "canny",
            "--quiet",
        ];
        args.extend(VALIDATION);
        args.extend(extra);
        controlnet(&args)
    };
    let out = train(&["--controlnet", cn_s, "--max-steps", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in
        ["controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors", "loss.png", "train_config.json"]
    {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let checkpoints: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints, ["checkpoint-2"], "the limit keeps only the newest");
    let grid = image::open(run.join("validation/step-2.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (64, 32), "condition + one image");
    let log = std::fs::read_to_string(run.join("validation.jsonl")).unwrap();
    let record: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let f1 = record["fidelity"][0]["f1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f1), "{record}");
    assert_eq!(std::fs::read_to_string(run.join("loss.jsonl")).unwrap().lines().count(), 2);

    // 3. The run folder is not overwritten by accident; --resume continues it.
    let out = train(&["--controlnet", cn_s, "--max-steps", "3"]);
    assert!(!out.status.success() && stderr(&out).contains("--resume"), "{}", stderr(&out));
    let out = train(&["--resume", "--max-steps", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming from") && run.join("checkpoint-3").is_dir());
    assert_eq!(std::fs::read_to_string(run.join("loss.jsonl")).unwrap().lines().count(), 3);

    // 4. The result is a ControlNet `generate` loads.
    let png = dir.path().join("out.png");
    let result = run.join("controlnet");
    let out = generate_with(MODEL, &result, &png, &["--seed", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(png.is_file());
}

#[test]
fn missing_images_are_listed_together() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("prompt.json"),
        "{\"source\": \"s/0.png\", \"target\": \"t/0.png\", \"prompt\": \"a\"}\n\
         {\"source\": \"s/1.png\", \"target\": \"t/1.png\", \"prompt\": \"b\"}\n",
    )
    .unwrap();
    let out = controlnet(&[
        "train",
        "--model",
        MODEL,
        "--init",
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        dir.path().join("run").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success());
    for f in ["s/0.png", "t/0.png", "s/1.png", "t/1.png"] {
        assert!(err.contains(f), "{f} not listed: {err}");
    }
    assert!(err.contains("2 of 2 examples"), "{err}");
}

/// Runs `controlnet ARGS` in the background, its output piped.
fn spawn(args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(args)
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the controlnet binary starts")
}

/// Waits (at most `secs`) until `path` holds a line: the run has taken a step.
fn wait_for_a_line(child: &mut std::process::Child, path: &std::path::Path, secs: u64) {
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|t| t.lines().count() > 0) {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = std::io::Read::read_to_string(e, &mut err);
            }
            panic!("exited early ({status}): {err}");
        }
        if start.elapsed().as_secs() > secs {
            let _ = child.kill();
            panic!("no step within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Sends Ctrl-C's signal and waits (at most `secs`) for the process to end; its status and output.
fn interrupt(mut child: std::process::Child, secs: u64) -> (Option<i32>, String, String) {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success(), "kill -INT failed");
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed().as_secs() > secs {
            let _ = child.kill();
            panic!("still running {secs} s after SIGINT");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), stdout(&out), stderr(&out))
}

/// Ctrl-C during `train` saves a checkpoint, exits 130 (as an interrupted process) and prints the command that
/// continues; that command needs no model, data or settings flags: the run folder has them.
#[test]
fn ctrl_c_stops_train_with_130_and_the_resume_command_continues() {
    let dir = temp_dir();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let args = [
        "train",
        "--model",
        MODEL,
        "--init",
        "--dataset",
        DATA,
        "--output",
        run_s,
        "--resolution",
        "32",
        "--batch-size",
        "1",
        "--max-steps",
        "100000",
        "--checkpointing-steps",
        "0",
        "--learning-rate",
        "1e-4",
        "--quiet",
    ];
    let mut child = spawn(&args);
    wait_for_a_line(&mut child, &run.join("loss.jsonl"), 300);
    let (code, out, err) = interrupt(child, 300);
    assert_eq!(code, Some(130), "stdout: {out}\nstderr: {err}");
    assert!(!run.join("controlnet").exists());
    let step: u64 = out
        .split("interrupted at update ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no step in {out}"));
    assert!(run.join(format!("checkpoint-{step}")).is_dir(), "{out}");
    let command = out.lines().find(|l| l.contains("--resume")).unwrap_or_else(|| panic!("no command in {out}"));
    let mut words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[..2], ["controlnet", "train"], "{command}");
    assert!(!words.contains(&"--model") && words.contains(&run_s), "{command}");
    // The printed command, one update further.
    let more = (step + 1).to_string();
    words.extend(["--max-steps", &more]);
    let out = controlnet(&words[1..]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("resuming with --max-steps") && err.contains("resuming from"), "{err}");
    assert!(run.join("controlnet").is_dir());
    // A resumed run keeps what shapes the trajectory.
    let out = controlnet(&["train", "--output", run_s, "--resume", "--max-steps", "9", "--batch-size", "2"]);
    assert!(!out.status.success() && stderr(&out).contains("--batch-size"), "{}", stderr(&out));
}

/// Ctrl-C during `train-base`: a checkpoint, status 130, and how to continue.
#[test]
fn ctrl_c_stops_train_base_with_130() {
    let dir = temp_dir();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let out = controlnet(&["dataset", "circles", "--count", "2", "--size", "32", "-o", data.to_str().unwrap(), "-q"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut child = spawn(&[
        "train-base",
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--resolution",
        "32",
        "--vae-crop",
        "16",
        "--vae-batch-size",
        "1",
        "--vae-steps",
        "100000",
        "--checkpointing-steps",
        "0",
        "-q",
    ]);
    wait_for_a_line(&mut child, &run.join("vae").join("loss.jsonl"), 300);
    let (code, out, err) = interrupt(child, 300);
    assert_eq!(code, Some(130), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("run the same command again") && out.contains("train-base"), "{out}");
    assert!(std::fs::read_dir(run.join("vae"))
        .unwrap()
        .any(|e| { e.unwrap().file_name().to_string_lossy().starts_with("checkpoint-") }));
}

/// `init` refuses a hint encoder that does not reach the latent size and a model that is not a base model,
/// naming the flag and what was expected; its weights are written 0644 under umask 022, as other outputs.
#[test]
fn init_checks_its_inputs_and_writes_ordinary_files() {
    let dir = temp_dir();
    let out_dir = dir.path().join("cn");
    let out =
        controlnet(&["init", "--model", MODEL, "--output", out_dir.to_str().unwrap(), "--hint-channels", "16,32"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("--hint-channels") && err.contains("4 entries"), "{err}");
    assert!(!out_dir.exists());
    let cn = "tests/fixtures/models/tiny-controlnet-a";
    let out = controlnet(&["init", "--model", cn, "--output", out_dir.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("--model") && err.contains("is a ControlNet"), "{err}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let bin = env!("CARGO_BIN_EXE_controlnet");
        let script = format!("umask 022; exec '{bin}' init --model {MODEL} --output '{}'", out_dir.display());
        let out = std::process::Command::new("sh").args(["-c", &script]).current_dir(repo()).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            let mode = std::fs::metadata(out_dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{f}");
        }
    }
}

/// A ControlNet made for 1-channel conditions trains: the dataset's condition images are read as grey.
#[test]
fn a_one_channel_controlnet_trains_on_grey_conditions() {
    let dir = temp_dir();
    let run = dir.path().join("run");
    let out = controlnet(&[
        "train",
        "--model",
        MODEL,
        "--init",
        "--conditioning-channels",
        "1",
        "--dataset",
        DATA,
        "--output",
        run.to_str().unwrap(),
        "--resolution",
        "32",
        "--batch-size",
        "1",
        "--max-steps",
        "1",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("controlnet/config.json")).unwrap()).unwrap();
    assert_eq!(config["conditioning_channels"], 1);
}

/// `--dtype bf16` (mixed precision) trains with validation and says so, the result is an f32 ControlNet that
/// `generate` loads, and the run records its precision; so does `--dtype f16`; either with an unlocked decoder
/// is refused naming --dtype, before anything is written.
#[test]
fn mixed_precision_training() {
    let dir = temp_dir();
    let run = dir.path().join("run");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--model",
            MODEL,
            "--init",
            "--dataset",
            DATA,
            "--output",
            run.to_str().unwrap(),
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--quiet",
        ];
        a.extend(VALIDATION);
        a.extend_from_slice(extra);
        controlnet(&a)
    };
    for dtype in ["bf16", "f16"] {
        let out = args(&["--dtype", dtype, "--unlock-decoder"]);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains("--dtype") && err.contains("decoder"), "{err}");
        assert!(!run.exists(), "a refused run wrote {}", run.display());
    }
    let out = args(&["--dtype", "bf16"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("precision: bf16 locked models"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(config["settings"]["dtype"], "bf16");
    assert!(run.join("validation/step-2.png").is_file());
    let image = dir.path().join("out.png");
    let cn = run.join("controlnet");
    let out = generate_with(MODEL, &cn, &image, &[]);
    assert!(out.status.success() && image.is_file(), "{}", stderr(&out));
    std::fs::remove_dir_all(&run).unwrap();
    let out = args(&["--dtype", "f16"]);
    let err = stderr(&out);
    assert!(out.status.success() && err.contains("precision: f16 locked models"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(config["settings"]["dtype"], "f16");
}

/// An SDXL base trains from the command line (pooled text and size/crop ids), and a run stopped after one update
/// and resumed ends where an uninterrupted run ends, bit for bit; `generate` loads the result on the SDXL base.
#[test]
fn sdxl_train_resumes_exactly_and_generates() {
    const SDXL: &str = "tests/fixtures/models/tiny-sdxl";
    let dir = temp_dir();
    let train = |run: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            SDXL,
            "--dataset",
            DATA,
            "--output",
            run.to_str().unwrap(),
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--checkpointing-steps",
            "1",
            "--learning-rate",
            "1e-3",
            "--quiet",
        ];
        args.extend(extra);
        let out = controlnet(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    // A union net is refused by name, before anything is written.
    let union = dir.path().join("union");
    let out = controlnet(&[
        "train",
        "--model",
        SDXL,
        "--dataset",
        DATA,
        "--output",
        union.to_str().unwrap(),
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-sdxl-union",
        "--quiet",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a union ControlNet (ControlNetUnionModel) cannot be trained yet"),
        "{}",
        stderr(&out)
    );
    assert!(!union.exists());
    train(&whole, &["--init", "--max-steps", "3"]);
    train(&split, &["--init", "--max-steps", "1"]);
    train(&split, &["--resume", "--max-steps", "3"]);
    let weights = |run: &std::path::Path| {
        let file = run.join("controlnet/diffusion_pytorch_model.safetensors");
        candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap()
    };
    let (a, b) = (weights(&whole), weights(&split));
    assert!(a.contains_key("add_embedding.linear_1.weight"), "an SDXL ControlNet");
    for (name, t) in &a {
        assert_eq!(max_abs(&(t - &b[name]).unwrap()), 0.0, "{name} differs after resuming");
    }
    let losses = |run: &std::path::Path| std::fs::read_to_string(run.join("loss.jsonl")).unwrap();
    let loss_values = |text: String| -> Vec<f64> {
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    let (la, lb) = (loss_values(losses(&whole)), loss_values(losses(&split)));
    assert_eq!(la.len(), 3);
    assert_eq!(la, lb);

    let png = dir.path().join("out.png");
    let result = whole.join("controlnet");
    let out = generate_with(SDXL, &result, &png, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(png.is_file());
}

/// Sharded data: the parquet file `datasets` wrote (its bad row skipped and reported), resumed from the run's own
/// record of the dataset; a WebDataset brace pattern; a pattern naming a missing shard.
#[test]
fn train_from_shards() {
    let dir = temp_dir();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let train = |data: &str, output: &str, steps: &str| {
        controlnet(&[
            "train",
            "--model",
            MODEL,
            "--init",
            "--dataset",
            data,
            "--output",
            output,
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--checkpointing-steps",
            "2",
            "--shuffle-buffer",
            "3",
            "--max-steps",
            steps,
            "--quiet",
        ])
    };
    let out = train("tests/fixtures/shards/train.parquet", run_s, "2");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("data: 1 parquet shards"), "{}", stderr(&out));
    let out = controlnet(&["train", "--output", run_s, "--resume", "--max-steps", "4", "--quiet"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from") && err.contains("bad samples") && err.contains("train.parquet"), "{err}");
    assert!(run.join("controlnet/diffusion_pytorch_model.safetensors").is_file());

    // The latent cache of the parquet data trains in place of it.
    let cache = dir.path().join("cache");
    let out = controlnet(&[
        "cache-latents",
        "--model",
        MODEL,
        "--dataset",
        "tests/fixtures/shards/train.parquet",
        "--output",
        cache.to_str().unwrap(),
        "--resolution",
        "32",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cached 6 examples in 1 shards"), "{}", stdout(&out));
    assert!(stderr(&out).contains("left out 1 bad samples"), "{}", stderr(&out));
    let out = train(cache.to_str().unwrap(), dir.path().join("from-cache").to_str().unwrap(), "2");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 latent-cache shards"), "{}", stderr(&out));

    let wds = dir.path().join("wds");
    let out = train("tests/fixtures/shards/wds-{000000..000000}.tar", wds.to_str().unwrap(), "1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 WebDataset shards"), "{}", stderr(&out));

    let out = train("tests/fixtures/shards/wds-{000000..000001}.tar", dir.path().join("x").to_str().unwrap(), "1");
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("--dataset") && err.contains("wds-000001.tar: no such file"), "{err}");
}

/// `train-base` takes shards as `train` does: the parquet fixture trains (its bad row reported at the end, the
/// image standing in for the condition), and a `pipe:` dataset and a missing shard are refused by flag.
#[test]
fn train_base_from_shards() {
    let dir = temp_dir();
    let run = dir.path().join("run");
    let train_base = |data: &str, output: &str| {
        controlnet(&[
            "train-base",
            "--dataset",
            data,
            "--output",
            output,
            "--resolution",
            "32",
            "--vae-crop",
            "16",
            "--vae-batch-size",
            "3",
            "--vae-steps",
            "3",
            "--vae-decoder-steps",
            "1",
            "--unet-steps",
            "2",
            "--unet-batch-size",
            "3",
            "--checkpointing-steps",
            "0",
            "--shuffle-buffer",
            "3",
            "-q",
        ])
    };
    let out = train_base("tests/fixtures/shards/train.parquet", run.to_str().unwrap());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("data: 1 parquet shards"), "{err}");
    assert!(err.contains("stage skipped 1 bad samples") && err.contains("train.parquet: row 4"), "{err}");
    assert!(run.join("model/unet/diffusion_pytorch_model.safetensors").is_file());

    let other = dir.path().join("x");
    let out = train_base("pipe:cat shards.tar", other.to_str().unwrap());
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("--dataset") && err.contains("pipe:"), "{err}");
    let out = train_base("tests/fixtures/shards/wds-{000000..000001}.tar", other.to_str().unwrap());
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("wds-000001.tar: no such file"), "{err}");
    assert!(!other.exists(), "nothing written");
}
