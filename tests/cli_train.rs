//! End to end: `controlnet init`, `controlnet train` (validation, fidelity, checkpoints, resume) and `generate`
//! with the trained result, on the tiny models and the 2-example fill50k fixture at 32 px.
mod common;

use common::*;

const MODEL: &str = "tests/fixtures/models/tiny-sd15";
const DATA: &str = "tests/fixtures/train/fill50k";
const COND: &str = "tests/fixtures/train/fill50k/source/0.png";

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
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
            "--validation-image",
            COND,
            "--validation-prompt",
            "a circle",
            "--validation-steps",
            "2",
            "--validation-inference-steps",
            "2",
            "--fidelity",
            "canny",
            "--quiet",
        ];
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
    let out = controlnet(&[
        "generate",
        "--model",
        MODEL,
        "--controlnet",
        result.to_str().unwrap(),
        "--control",
        COND,
        "--prompt",
        "a circle",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--seed",
        "1",
        "--output",
        png.to_str().unwrap(),
        "--quiet",
    ]);
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
