//! `controlnet bench --annotators dwpose` plumbing on the fixture's tiny ONNX nets (tools/fixtures/gen_dwpose.py):
//! the row appears from `--weights` and from the hub cache, and without files the run fails naming the flag
//! and the script that writes full-size nets. Not a timing test: the figures come from full-size nets
//! (tools/bench_dwpose_nets.py) in docs/annotators.md.
use crate::common;

use std::path::PathBuf;

use common::{assert_clean_failure, controlnet, fake_hub_cache, run_with_cache, stderr, temp_dir};

fn weights() -> PathBuf {
    common::fixture("dwpose/weights")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_row_is_timed_from_a_weights_folder() {
    let w = weights();
    let run =
        controlnet(&["bench", "--annotators", "dwpose", "--weights", w.to_str().unwrap(), "--iters", "1", "--json"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report: serde_json::Value = serde_json::from_str(stdout(&run).trim()).expect("one JSON object");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["kind"], "dwpose");
    assert!(rows[0]["seconds"]["median_s"].as_f64().unwrap() > 0.0);
    assert!(rows[0]["people"].is_u64(), "{}", rows[0]);
    assert_eq!(report["size"], 512);
    assert!(report["implementation"].as_str().unwrap().contains("tract"));
}

#[test]
fn the_row_reads_the_hub_cache_by_default() {
    let dir = temp_dir();
    let cache = dir.path().join("cache");
    fake_hub_cache(&cache, "yzd-v/DWPose", &[weights().join("yolox_l.onnx"), weights().join("dw-ll_ucoco_384.onnx")]);
    let run = run_with_cache(&cache, &["bench", "--annotators", "dwpose", "--iters", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let table = stdout(&run);
    let row = table.lines().find(|l| l.starts_with("dwpose ")).unwrap_or_else(|| panic!("no dwpose row: {table}"));
    assert!(row.contains(" found)"), "{row}");
}

#[test]
fn without_files_asking_for_dwpose_fails_naming_the_flag_and_the_script() {
    let dir = temp_dir();
    let run = run_with_cache(dir.path(), &["bench", "--annotators", "dwpose", "--iters", "1"]);
    assert_clean_failure(&run, &["--weights", "tools/bench_dwpose_nets.py", "yolox_l.onnx", "yzd-v/DWPose"]);
    // a folder without the files is named as such
    let run = controlnet(&["bench", "--annotators", "dwpose", "--weights", dir.path().to_str().unwrap()]);
    assert_clean_failure(&run, &["--weights", "yolox_l.onnx"]);
}
