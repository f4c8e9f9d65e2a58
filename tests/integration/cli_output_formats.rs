//! Outputs as PNG, JPEG or WebP by the extension, each carrying the recipe (JPEG and WebP in EXIF), so that
//! `reproduce` works from any of them.
use crate::common;

use common::{controlnet, stderr, temp_dir};

const GENERATE: [&str; 14] = [
    "generate",
    "--model",
    "tests/fixtures/models/tiny-sd15",
    "--prompt",
    "a cat 🐈",
    "--steps",
    "2",
    "--seed",
    "3",
    "--width",
    "64",
    "--height",
    "64",
    "--quiet",
];

fn generate(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = GENERATE.to_vec();
    args.extend_from_slice(extra);
    args.extend(["--output", out.to_str().unwrap()]);
    controlnet(&args)
}

#[test]
fn jpeg_and_webp_outputs_carry_the_recipe_for_reproduce() {
    let dir = temp_dir();
    let png = dir.path().join("a.png");
    assert!(generate(&png, &[]).status.success());
    let want = image::open(&png).unwrap().to_rgb8();
    for (name, extra) in [("b.jpg", &["--quality", "90"][..]), ("c.webp", &[][..])] {
        let out = dir.path().join(name);
        let res = generate(&out, extra);
        assert!(res.status.success(), "{}", stderr(&res));
        let text = controlnet::io::images::read_image_text(&out).unwrap();
        assert!(text.iter().any(|(k, v)| k == "parameters" && v.starts_with("a cat 🐈\n")), "{text:?}");
        if name.ends_with(".webp") {
            assert_eq!(image::open(&out).unwrap().to_rgb8(), want, "WebP is lossless");
        }
        let again = dir.path().join(format!("again-{name}.png"));
        let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
        assert!(res.status.success(), "{}", stderr(&res));
        assert_eq!(image::open(&again).unwrap().to_rgb8(), want, "{name} reproduced another image");
    }
}

#[test]
fn unknown_extensions_and_misplaced_quality_are_refused() {
    let dir = temp_dir();
    let res = generate(&dir.path().join("out.gif"), &[]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--output") && stderr(&res).contains(".webp"), "{}", stderr(&res));
    let res = generate(&dir.path().join("out.png"), &["--quality", "90"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--quality 90"), "{}", stderr(&res));
    let res = generate(&dir.path().join("out.jpg"), &["--quality", "0"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--quality: 0"), "{}", stderr(&res));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
}
