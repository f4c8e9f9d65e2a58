//! Helpers shared by the integration tests: fixture paths, running the binary, image comparison.
#![allow(dead_code)]
pub mod preprocess;
pub mod server;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// Runs `controlnet ARGS` from the repository root (fixture paths in cases.json are relative to it).
pub fn controlnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("the controlnet binary runs")
}

/// [`controlnet`] on owned arguments (lists built with [`tiny_generate_args`]).
pub fn controlnet_owned(args: &[String]) -> Output {
    controlnet(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `generate` on the tiny SD1.5 fixture with the settings the CLI's feature tests share (4 DDIM steps, guidance
/// 7.5, `seed`, quiet, into `out`), then `extra`.
pub fn tiny_generate_args(out: &Path, seed: &str, extra: &[&str]) -> Vec<String> {
    let (model, out) = (fixture("models/tiny-sd15"), out.display().to_string());
    let model = model.display().to_string();
    let shared = ["generate", "--model", &model, "--steps", "4", "--seed", seed, "--scheduler", "ddim"];
    let rest = ["--guidance", "7.5", "--output", &out, "--quiet"];
    shared.iter().chain(&rest).chain(extra).map(|s| s.to_string()).collect()
}

/// A Hugging Face cache at `root` holding the hub repo `repo_id` (`owner/name`) with `files` (each copied from its
/// path to the file name), in the layout huggingface_hub writes: refs/main → a snapshot folder.
pub fn fake_hub_cache(root: &Path, repo_id: &str, files: &[PathBuf]) {
    let repo = root.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in files {
        std::fs::copy(f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
}

/// [`controlnet`] offline, with `cache` as the Hugging Face cache (see [`fake_hub_cache`]).
pub fn run_with_cache(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_controlnet"))
        .args(args)
        .current_dir(repo())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache)
        .output()
        .expect("the controlnet binary runs")
}

/// The command failed cleanly: a non-zero exit, no panic, and stderr mentions each of `must_mention`.
pub fn assert_clean_failure(out: &Output, must_mention: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for m in must_mention {
        assert!(err.contains(m), "stderr should mention {m:?}: {err}");
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Peak signal-to-noise ratio of two 8-bit RGB images of the same size, in dB (infinite when equal).
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// The share of samples of two 8-bit RGB images of the same size that differ by more than `tol` levels (the
/// annotator maps' metric).
pub fn share_off_by_more_than(a: &image::RgbImage, b: &image::RgbImage, tol: u8) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let off = a.as_raw().iter().zip(b.as_raw()).filter(|(&x, &y)| x.abs_diff(y) > tol).count();
    off as f64 / a.as_raw().len() as f64
}

/// A fresh temporary folder for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Copies the folder `from` (recursively) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// Rewrites a safetensors file, passing each tensor (by name) through `edit`.
pub fn edit_tensors(file: &Path, edit: impl Fn(&str, candle_core::Tensor) -> candle_core::Tensor) {
    let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let edited: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().map(|(name, t)| (name.clone(), edit(&name, t))).collect();
    candle_core::safetensors::save(&edited, file).unwrap();
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// The parity metric for tensors: max |a - b| <= 1e-4 · max(1, max |b|).
pub fn assert_close(a: &candle_core::Tensor, b: &candle_core::Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let diff = max_abs(&(a - b).unwrap());
    let tol = 1e-4 * max_abs(b).max(1.0);
    assert!(diff <= tol, "{what}: max difference {diff:e} > {tol:e}");
}

/// One reference run in a fixture generator's `cases.json`: the CLI arguments and the images diffusers made
/// (beside the file).
#[derive(serde::Deserialize)]
pub struct GenerateCase {
    pub name: String,
    pub args: Vec<String>,
    pub images: Vec<String>,
}

/// Runs the case `name` of `cases_file` (a fixture path) through `generate` and checks each image against the
/// reference beside the file: PSNR at least `min_db`.
pub fn run_generate_case(cases_file: &str, name: &str, min_db: f64) {
    let text = std::fs::read_to_string(fixture(cases_file)).unwrap();
    let cases: Vec<GenerateCase> = serde_json::from_str(&text).unwrap();
    let c = cases.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"));
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let mut args: Vec<&str> = vec!["generate"];
    args.extend(c.args.iter().map(String::as_str));
    args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{name}: {}", stderr(&res));
    let references = fixture(cases_file).parent().unwrap().to_path_buf();
    for (i, reference) in c.images.iter().enumerate() {
        let ours = if c.images.len() == 1 { out.clone() } else { dir.path().join(format!("out-{}.png", i + 1)) };
        let ours = image::open(&ours).unwrap().to_rgb8();
        let theirs = image::open(references.join(reference)).unwrap().to_rgb8();
        let db = psnr(&ours, &theirs);
        assert!(db >= min_db, "{name} image {}: PSNR {db:.1} dB < {min_db} dB", i + 1);
    }
}
