//! `controlnet inspect` / `controlnet convert` end to end: the binary on fixtures and on bad files.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

fn controlnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_controlnet")).args(args).current_dir(repo()).output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn inspect_json() {
    let out = controlnet(&["inspect", "tests/fixtures/load/control_tiny_sd15_fp16.pth", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["format"].as_str(), v["dtype"].as_str()),
        (Some("controlnet"), Some("original"), Some("f16"))
    );
    assert_eq!(v["hint_channels"], serde_json::json!([16, 32, 96, 256]));
}

#[test]
fn bad_files_fail_clearly_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let st = std::fs::read(fixture("models/tiny-controlnet-a/diffusion_pytorch_model.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &st[..st.len() / 3]).unwrap();
    let out_dir = dir.path().join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["inspect".into(), truncated.display().to_string()], "truncated"),
        (vec!["inspect".into(), fixture("load/recipes.json").display().to_string()], "not a weights file"),
        (
            vec!["inspect".into(), fixture("load/pickles/evil_os_system.pt").display().to_string()],
            "refusing global `os.system`",
        ),
        (
            vec![
                "convert".into(),
                fixture("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors").display().to_string(),
                out_dir.display().to_string(),
            ],
            "this is a UNet (diffusers names), but a ControlNet was expected",
        ),
        (vec!["inspect".into(), "/nonexistent/file.safetensors".into()], "/nonexistent/file.safetensors"),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = controlnet(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!out_dir.exists(), "nothing written on failure");
}

#[test]
fn convert_pth_to_diffusers_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cn");
    let o = controlnet(&[
        "convert",
        "tests/fixtures/load/control_tiny_sd15_fp16.pth",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("config.json").is_file() && out.join("diffusion_pytorch_model.safetensors").is_file());
    let o = controlnet(&["inspect", out.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["format"].as_str(), v["dtype"].as_str()), (Some("diffusers"), Some("f32")));
}
