//! End-to-end tests of `controlnet annotate dwpose` on the fixture's tiny random-weight ONNX nets
//! (tools/fixtures/gen_dwpose.py): controlnet_aux's map through the CLI, the JSON read back by `annotate pose`,
//! a folder through one loaded detector, `generate --preprocess dwpose`, the default hub repo read from the
//! cache, and bad weights named. Parity of the
//! nets, boxes and keypoints is tested in src/annotate/neural/dwpose/tests.rs.
use crate::common;

use std::path::{Path, PathBuf};

use common::{controlnet, fake_hub_cache, run_with_cache, share_off_by_more_than, stderr, temp_dir};

fn fixture(name: &str) -> PathBuf {
    common::fixture("dwpose").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

#[test]
fn map_and_json_match_controlnet_aux_and_read_back_as_a_pose() {
    let dir = temp_dir();
    let (out, json) = (dir.path().join("map.png"), dir.path().join("pose.json"));
    let w = fixture("weights");
    let run = controlnet(&[
        "annotate",
        "dwpose",
        s(&fixture("two_input.png")),
        "-o",
        s(&out),
        "--weights",
        s(&w),
        "--detect-resolution",
        "320",
        "--image-resolution",
        "384",
        "--save-json",
        s(&json),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let share = share_off_by_more_than(&rgb(&out), &rgb(&fixture("two_map.png")), 2);
    assert!(share <= 0.01, "{:.3}% of samples off by more than 2", share * 100.0);
    let pose: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let people = pose["people"].as_array().unwrap();
    assert_eq!(people.len(), 2);
    for p in people {
        assert_eq!(p["pose_keypoints_2d"].as_array().unwrap().len(), 18 * 3);
        for (key, n) in [("hand_left_keypoints_2d", 21), ("hand_right_keypoints_2d", 21), ("face_keypoints_2d", 68)] {
            if let Some(points) = p[key].as_array() {
                assert_eq!(points.len(), n * 3, "{key}");
            }
        }
    }
    // the detect image of 240x320 at 320: 320x427, sides to multiples of 64: 320x448
    assert_eq!((pose["canvas_width"].as_u64(), pose["canvas_height"].as_u64()), (Some(320), Some(448)));
    // what --save-json writes is what `annotate pose` reads
    let redrawn = dir.path().join("redrawn.png");
    let run = controlnet(&["annotate", "pose", s(&json), "-o", s(&redrawn)]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(rgb(&redrawn).dimensions(), (320, 448));
}

/// A folder runs every image through one loaded detector: each map and JSON is the one-image run's.
#[test]
fn a_folder_gives_each_image_its_map_and_json() {
    let dir = temp_dir();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::copy(fixture("tall_input.png"), images.join("tall.png")).unwrap();
    std::fs::copy(fixture("nobody_input.png"), images.join("nobody.png")).unwrap();
    let w = fixture("weights");
    let sizes = ["--detect-resolution", "384", "--image-resolution", "512"];
    let (maps, jsons) = (dir.path().join("maps"), dir.path().join("poses"));
    let mut args = vec!["annotate", "dwpose", s(&images), "-o", s(&maps), "--weights", s(&w), "--save-json", s(&jsons)];
    args.extend(sizes);
    let run = controlnet(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    for stem in ["tall", "nobody"] {
        let (single, json) = (dir.path().join(format!("{stem}.png")), dir.path().join(format!("{stem}.json")));
        let input = images.join(format!("{stem}.png"));
        let mut args =
            vec!["annotate", "dwpose", s(&input), "-o", s(&single), "--weights", s(&w), "--save-json", s(&json)];
        args.extend(sizes);
        let run = controlnet(&args);
        assert!(run.status.success(), "{}", stderr(&run));
        assert_eq!(rgb(&maps.join(format!("{stem}.png"))), rgb(&single), "{stem}");
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&jsons.join(format!("{stem}.json"))), read(&json), "{stem}");
    }
    // the fixture's one-person case at its sizes
    let share = share_off_by_more_than(&rgb(&maps.join("tall.png")), &rgb(&fixture("tall_map.png")), 2);
    assert!(share <= 0.01, "{:.3}% of samples off by more than 2", share * 100.0);
}

#[test]
fn generate_preprocess_dwpose_equals_annotate() {
    let dir = temp_dir();
    let (saved, out, annotated) = (dir.path().join("cond.png"), dir.path().join("o.png"), dir.path().join("a.png"));
    let input = fixture("wide_input.png");
    let w = fixture("weights");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        s(&input),
        "--preprocess",
        "dwpose",
        "--annotator-weights",
        s(&w),
        "--save-control",
        s(&saved),
        "--width",
        "128",
        "--height",
        "96",
        "--steps",
        "1",
        "--seed",
        "1",
        "--output",
        s(&out),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let res = controlnet(&[
        "annotate",
        "dwpose",
        s(&input),
        "--weights",
        s(&w),
        "--width",
        "128",
        "--height",
        "96",
        "--resize",
        "just-resize",
        "--output",
        s(&annotated),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(rgb(&saved), rgb(&annotated));
    assert!(rgb(&saved).pixels().any(|p| p.0 != [0, 0, 0]), "someone is drawn");
}

#[test]
fn bad_weights_are_named_and_nothing_is_written() {
    let dir = temp_dir();
    let out = dir.path().join("map.png");
    let input = fixture("wide_input.png");
    let fail = |args: &[&str], mention: &[&str]| {
        let run = controlnet(args);
        let err = stderr(&run);
        assert!(!run.status.success() && !err.contains("panicked"), "{err}");
        for m in mention {
            assert!(err.contains(m), "stderr should mention {m:?}: {err}");
        }
        assert!(!out.exists(), "nothing written");
    };
    let half = dir.path().join("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::copy(fixture("weights/yolox_l.onnx"), half.join("yolox_l.onnx")).unwrap();
    fail(
        &["annotate", "dwpose", s(&input), "-o", s(&out), "--weights", s(&half)],
        &["--weights", "dw-ll_ucoco_384.onnx"],
    );
    std::fs::write(half.join("dw-ll_ucoco_384.onnx"), b"not onnx").unwrap();
    fail(&["annotate", "dwpose", s(&input), "-o", s(&out), "--weights", s(&half)], &["dw-ll_ucoco_384.onnx"]);
    fail(&["annotate", "dwpose", s(&input), "-o", s(&out), "--safe"], &["--safe", "dwpose"]);
}

/// Without --weights both files come from the default hub repo `yzd-v/DWPose` (here a cache, offline); the map
/// is the one the same files give from a folder. A cache holding only one of them names the other.
#[test]
fn default_weights_come_from_yzd_v_dwpose() {
    let dir = temp_dir();
    let cache = dir.path().join("hub");
    let files = [fixture("weights/yolox_l.onnx"), fixture("weights/dw-ll_ucoco_384.onnx")];
    fake_hub_cache(&cache, "yzd-v/DWPose", &files);
    let input = fixture("tall_input.png");
    let (from_hub, from_folder) = (dir.path().join("hub.png"), dir.path().join("folder.png"));
    let run = run_with_cache(&cache, &["annotate", "dwpose", s(&input), "-o", s(&from_hub)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let w = fixture("weights");
    let run = controlnet(&["annotate", "dwpose", s(&input), "-o", s(&from_folder), "--weights", s(&w)]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(rgb(&from_hub), rgb(&from_folder));
    let half = dir.path().join("half");
    fake_hub_cache(&half, "yzd-v/DWPose", &files[..1]);
    let run = run_with_cache(&half, &["annotate", "dwpose", s(&input), "-o", s(&dir.path().join("x.png"))]);
    let err = stderr(&run);
    assert!(!run.status.success() && err.contains("yzd-v/DWPose") && err.contains("dw-ll_ucoco_384.onnx"), "{err}");
}
