//! `generate --preprocess KIND` against `annotate KIND`, for the neural annotator tests.
use std::path::Path;

use crate::common::{run_with_cache, stderr};

/// `annotate KIND INPUT` at 64×64 (just-resize) and `generate --preprocess KIND --save-control` with the tiny SD1.5
/// pipeline and ControlNet at the same size, both offline with `cache` as the hub cache (the detector's default
/// weights): asserts the condition `generate` used is `annotate`'s map and that it wrote its image; the map.
pub fn condition_equals_annotate_map(cache: &Path, kind: &str, input: &Path) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let (annotated, saved, out) = (dir.path().join("a.png"), dir.path().join("cond.png"), dir.path().join("o.png"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (input, annotated_s, saved_s, out_s) = (s(input), s(&annotated), s(&saved), s(&out));
    let size = ["--width", "64", "--height", "64"];
    let mut args = vec!["annotate", kind, &input, "-o", &annotated_s, "--resize", "just-resize"];
    args.extend(size);
    let run = run_with_cache(cache, &args);
    assert!(run.status.success(), "{}", stderr(&run));
    let mut args = vec!["generate", "--model", "tests/fixtures/models/tiny-sd15"];
    args.extend(["--controlnet", "tests/fixtures/models/tiny-controlnet-a", "--control", &input]);
    args.extend(["--preprocess", kind, "--save-control", &saved_s]);
    args.extend(size);
    args.extend(["--steps", "1", "--output", &out_s, "--quiet"]);
    let run = run_with_cache(cache, &args);
    assert!(run.status.success(), "{}", stderr(&run));
    let (a, b) = (image::open(&saved).unwrap().to_rgb8(), image::open(&annotated).unwrap().to_rgb8());
    assert!(a == b, "generate's {kind} condition differs from annotate's map");
    assert!(image::open(&out).is_ok());
    a
}
