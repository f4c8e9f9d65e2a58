//! End-to-end tests of `controlnet annotate openpose*`: controlnet_aux's map and A1111's JSON through the CLI
//! (the fixture's narrow random-weight nets, tools/fixtures/gen_openpose.py), the JSON read back by
//! `annotate pose`, and the errors of the openpose flags. Parity on found people is tested in
//! src/annotate/neural/openpose/tests.rs.
use crate::common;

use std::path::{Path, PathBuf};

use common::{controlnet, stderr, temp_dir};

fn fixture(name: &str) -> PathBuf {
    common::fixture("openpose").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn full_map_and_json_match_controlnet_aux_and_read_back_as_a_pose() {
    let dir = temp_dir();
    let (out, json) = (dir.path().join("map.png"), dir.path().join("pose.json"));
    let w = fixture("weights");
    let input = fixture("random_input.png");
    let run = controlnet(&[
        "annotate",
        "openpose-full",
        s(&input),
        "-o",
        s(&out),
        "--weights",
        s(&w),
        "--detect-resolution",
        "128",
        "--image-resolution",
        "96",
        "--save-json",
        s(&json),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(fixture("random_full.png")).unwrap().to_rgb8();
    assert_eq!(ours, reference);
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("random_pose.json")).unwrap()).unwrap();
    for key in ["people", "canvas_width", "canvas_height"] {
        assert_eq!(written[key], expected[key], "{key}");
    }
    // what --save-json writes is what `annotate pose` reads
    let redrawn = dir.path().join("redrawn.png");
    let run = controlnet(&["annotate", "pose", s(&json), "-o", s(&redrawn)]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(image::open(&redrawn).unwrap().to_rgb8().dimensions(), (128, 128));
}

#[test]
fn openpose_flags_and_missing_nets_are_named() {
    let dir = temp_dir();
    let out = dir.path().join("map.png");
    let input = fixture("random_input.png");
    let fail = |args: &[&str], mention: &[&str]| {
        let run = controlnet(args);
        let err = stderr(&run);
        assert!(!run.status.success() && !err.contains("panicked"), "{err}");
        for m in mention {
            assert!(err.contains(m), "stderr should mention {m:?}: {err}");
        }
        assert!(!out.exists(), "nothing written");
    };
    fail(&["annotate", "hed", s(&input), "-o", s(&out), "--include-hand"], &["--include-hand", "openpose"]);
    let body_only = dir.path().join("body_only");
    std::fs::create_dir(&body_only).unwrap();
    std::fs::copy(fixture("weights/body_pose_model.pth"), body_only.join("body_pose_model.pth")).unwrap();
    fail(
        &["annotate", "openpose", s(&input), "-o", s(&out), "--include-face", "--weights", s(&body_only)],
        &["--weights", "facenet.pth"],
    );
    // a folder INPUT writes one JSON per image into the --save-json folder: a file there is refused
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::copy(&input, images.join("a.png")).unwrap();
    let json = dir.path().join("p.json");
    std::fs::write(&json, "{}").unwrap();
    fail(
        &["annotate", "openpose", s(&images), "-o", s(&dir.path().join("maps")), "--save-json", s(&json)],
        &["--save-json", "folder"],
    );
    assert_eq!(std::fs::read_to_string(&json).unwrap(), "{}", "the file is left as it was");
}

/// A folder of images with --save-json DIR: one map and one `<stem>.json` per image, each what the one-image
/// run writes.
#[test]
fn a_folder_writes_one_json_per_image() {
    let dir = temp_dir();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::copy(fixture("random_input.png"), images.join("one.png")).unwrap();
    let flipped = image::open(fixture("random_input.png")).unwrap().fliph();
    flipped.save(images.join("two.png")).unwrap();
    let w = fixture("weights");
    let sizes = ["--detect-resolution", "128", "--image-resolution", "96"];
    let (maps, jsons) = (dir.path().join("maps"), dir.path().join("poses"));
    let mut args = vec!["annotate", "openpose-full", s(&images), "-o", s(&maps), "--weights", s(&w)];
    args.extend(sizes);
    args.extend(["--save-json", s(&jsons)]);
    let run = controlnet(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    for stem in ["one", "two"] {
        let (out, json) = (dir.path().join(format!("{stem}.png")), dir.path().join(format!("{stem}.json")));
        let input = images.join(format!("{stem}.png"));
        let mut args = vec!["annotate", "openpose-full", s(&input), "-o", s(&out), "--weights", s(&w)];
        args.extend(sizes);
        args.extend(["--save-json", s(&json)]);
        let run = controlnet(&args);
        assert!(run.status.success(), "{}", stderr(&run));
        let folder_map = image::open(maps.join(format!("{stem}.png"))).unwrap().to_rgb8();
        assert_eq!(folder_map, image::open(&out).unwrap().to_rgb8(), "{stem}: map");
        let folder_json = std::fs::read_to_string(jsons.join(format!("{stem}.json"))).unwrap();
        assert_eq!(folder_json, std::fs::read_to_string(&json).unwrap(), "{stem}: JSON");
    }
}
