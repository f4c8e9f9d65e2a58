//! End to end: `controlnet batch JOBS.jsonl --output DIR`: good jobs are written (as `generate` would make
//! them), bad lines are named and do not stop the others, the exit status says some failed, and a rerun does
//! nothing new.
use crate::common;

use common::*;

fn jobs_file(dir: &std::path::Path) -> std::path::PathBuf {
    let model = fixture("models/tiny-sd15").display().to_string();
    let net = fixture("models/tiny-controlnet-a").display().to_string();
    std::fs::copy(fixture("pipeline/control_circle.png"), dir.join("circle.png")).unwrap();
    std::fs::create_dir(dir.join("conds")).unwrap();
    std::fs::copy(fixture("pipeline/control_circle.png"), dir.join("conds/a.png")).unwrap();
    std::fs::copy(fixture("pipeline/control_box.png"), dir.join("conds/b.png")).unwrap();
    let job = |extra: &str| {
        format!(
            r#"{{"model": {model:?}, "controlnet": {net:?}, "prompt": "a circle", "steps": 2, "scheduler": "ddim", {extra}}}"#
        )
    };
    let lines = [
        job(r#""control": "circle.png", "seed": 1, "output": "one""#),
        job(r#""control": "circle.png", "seed": 2, "num_images": 2, "output": "two""#),
        job(r#""control": "nope.png", "seed": 3"#),
        job(r#""control": "circle.png", "steps": 0"#).replacen(r#""steps": 2, "#, "", 1),
        r#"{"prompt": "#.to_string(),
        r#"{"prompt": "x", "stepz": 3}"#.to_string(),
        "# a comment".to_string(),
        job(r#""control": "conds", "seed": 4, "output": "folder""#),
    ];
    let path = dir.join("jobs.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn batch(jobs: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    controlnet(&["batch", jobs.to_str().unwrap(), "--output", out.to_str().unwrap(), "--quiet"])
}

#[test]
fn good_jobs_are_written_bad_ones_named_and_a_rerun_does_nothing_new() {
    let dir = temp_dir();
    let jobs = jobs_file(dir.path());
    let out = dir.path().join("out");
    let res = batch(&jobs, &out);
    let (stdout, err) = (String::from_utf8_lossy(&res.stdout).into_owned(), stderr(&res));
    assert!(!res.status.success(), "a failed job makes the exit status 1");
    let written = ["one.png", "two-1.png", "two-2.png", "folder-a.png", "folder-b.png"];
    for f in written {
        assert!(out.join(f).is_file(), "{f} missing: {stdout}\n{err}");
    }
    assert!(stdout.contains("8 jobs: 4 written, 0 already done, 4 failed"), "{stdout}");
    assert!(err.contains("failed: line 3: --control (ControlNet 1)") && err.contains("nope.png"), "{err}");
    assert!(err.contains("failed: line 4: --steps: must be at least 1"), "{err}");
    assert!(err.contains("failed: line 5: not a job"), "{err}");
    assert!(err.contains("failed: line 6: not a job: unknown field `stepz`"), "{err}");

    // The image is what `generate` makes with the same settings.
    let alone = dir.path().join("alone.png");
    let control = dir.path().join("circle.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        control.to_str().unwrap(),
        "--prompt",
        "a circle",
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--seed",
        "1",
        "--output",
        alone.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8();
    assert_eq!(pixels(&alone), pixels(&out.join("one.png")));
    assert_ne!(pixels(&out.join("folder-a.png")), pixels(&out.join("folder-b.png")), "one image per condition");

    // A rerun writes nothing: the finished outputs are skipped, the bad lines fail again.
    let before: Vec<_> = written.iter().map(|f| std::fs::metadata(out.join(f)).unwrap().modified().unwrap()).collect();
    let res = batch(&jobs, &out);
    let stdout = String::from_utf8_lossy(&res.stdout).into_owned();
    assert!(stdout.contains("8 jobs: 0 written, 4 already done, 4 failed"), "{stdout}");
    assert!(!stdout.contains("wrote"), "{stdout}");
    let after: Vec<_> = written.iter().map(|f| std::fs::metadata(out.join(f)).unwrap().modified().unwrap()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_missing_jobs_file_is_named() {
    let dir = temp_dir();
    let res = batch(&dir.path().join("none.jsonl"), &dir.path().join("out"));
    assert!(!res.status.success());
    assert!(stderr(&res).contains("none.jsonl"), "{}", stderr(&res));
}

/// `generate --control FOLDER`: one image per picture (non-pictures ignored), each what `generate` makes with that
/// picture, named `STEM-<picture>.png` beside --output; flags that name one file are refused.
#[test]
fn generate_with_a_control_folder_makes_one_image_per_picture() {
    let dir = temp_dir();
    let conds = dir.path().join("conds");
    std::fs::create_dir(&conds).unwrap();
    std::fs::copy(fixture("pipeline/control_circle.png"), conds.join("a.png")).unwrap();
    std::fs::copy(fixture("pipeline/control_box.png"), conds.join("b.png")).unwrap();
    std::fs::write(conds.join("notes.txt"), "not a picture").unwrap();
    let (model, net) = (fixture("models/tiny-sd15"), fixture("models/tiny-controlnet-a"));
    let run = |control: &std::path::Path, out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--controlnet",
            net.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--prompt",
            "a circle",
            "--steps",
            "2",
            "--seed",
            "5",
            "--output",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend(extra);
        controlnet(&args)
    };
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let res = run(&conds, &out_dir.join("img.png"), &[]);
    assert!(res.status.success(), "{}", stderr(&res));
    let mut written: Vec<String> =
        std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    written.sort();
    assert_eq!(written, ["img-a.png", "img-b.png"]);
    for stem in ["a", "b"] {
        let single = dir.path().join(format!("single-{stem}.png"));
        let res = run(&conds.join(format!("{stem}.png")), &single, &[]);
        assert!(res.status.success(), "{}", stderr(&res));
        let from_folder = image::open(out_dir.join(format!("img-{stem}.png"))).unwrap().to_rgb8();
        assert_eq!(from_folder, image::open(&single).unwrap().to_rgb8(), "{stem}");
    }
    let save = dir.path().join("cond.png");
    let res = run(&conds, &dir.path().join("x.png"), &["--save-control", save.to_str().unwrap()]);
    assert!(!res.status.success() && stderr(&res).contains("--save-control"), "{}", stderr(&res));
    assert!(!dir.path().join("x-a.png").exists());
}

/// LoRAs in batch jobs: `lora` (FILE[:W], one or a list, relative to the jobs file) and `<lora:name:w>` prompt tags
/// with `lora_dir`; jobs with different LoRA sets (or none) each get their own merge, and every image is
/// diffusers' for that set (tests/fixtures/lora, ≥ 40 dB).
#[test]
fn batch_jobs_take_loras_and_prompt_tags() {
    let dir = temp_dir();
    let loras = dir.path().join("loras");
    std::fs::create_dir(&loras).unwrap();
    for f in ["tiny-kohya.safetensors", "tiny-peft.safetensors"] {
        std::fs::copy(fixture("lora").join(f), loras.join(f)).unwrap();
    }
    let model = fixture("models/tiny-sd15").display().to_string();
    let job = |prompt: &str, extra: &str| {
        format!(
            r#"{{"model": {model:?}, "prompt": {prompt:?}, "seed": 31, "steps": 4, "guidance": 7.5, "scheduler": "ddim", {extra}}}"#
        )
    };
    let prompt = "a red circle on a light blue background";
    let lines = [
        job(
            prompt,
            r#""lora": ["loras/tiny-kohya.safetensors:0.6", "loras/tiny-peft.safetensors:0.9"], "output": "both""#,
        ),
        job(prompt, r#""output": "base""#),
        job(&format!("{prompt} <lora:tiny-kohya:0.8>"), r#""lora_dir": "loras", "output": "kohya""#),
    ];
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(&jobs, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let res = controlnet(&["batch", jobs.to_str().unwrap(), "--output", out.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    for name in ["both", "base", "kohya"] {
        let ours = image::open(out.join(format!("{name}.png"))).unwrap().to_rgb8();
        let theirs = image::open(fixture("lora").join(format!("{name}.png"))).unwrap().to_rgb8();
        let db = psnr(&ours, &theirs);
        assert!(db >= 40.0, "{name}: PSNR {db:.1} dB against diffusers");
    }
}
