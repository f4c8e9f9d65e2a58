//! Every scheduler the README lists runs `generate` on every bundled model: the demo base (whose DDIM config
//! has no `skip_prk_steps`, so PNDM takes its Runge-Kutta warm-up; issue 14 item 2) and the tiny SD1.5 and SD2
//! fixture pipelines.
mod common;

use common::*;

/// The `--scheduler` values of the README's generate synopsis.
const SCHEDULERS: [&str; 6] = ["ddim", "pndm", "euler", "euler-a", "dpm++2m", "unipc"];

#[test]
fn every_listed_scheduler_generates_on_every_bundled_model() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains(&format!("[--scheduler {}]", SCHEDULERS.join("|"))), "README lists other schedulers");
    let control = "tests/fixtures/pipeline/control_circle.png";
    let models: [&[&str]; 3] = [
        &[],
        &["--model", "tests/fixtures/models/tiny-sd15", "--controlnet", "tests/fixtures/models/tiny-controlnet-a"],
        &["--model", "tests/fixtures/models/tiny-sd2", "--controlnet", "tests/fixtures/models/tiny-controlnet-sd2"],
    ];
    let dir = temp_dir();
    for model in models {
        for scheduler in SCHEDULERS {
            let out = dir.path().join(format!("{}.png", scheduler.replace('+', "p")));
            let mut args = vec!["generate", "--prompt", "a red circle", "--control", control, "--steps", "4"];
            args.extend_from_slice(model);
            args.extend(["--scheduler", scheduler, "--seed", "1", "--quiet", "--output", out.to_str().unwrap()]);
            let res = controlnet(&args);
            assert!(res.status.success(), "{model:?} --scheduler {scheduler}: {}", stderr(&res));
            assert!(image::open(&out).is_ok(), "{model:?} --scheduler {scheduler}: no image");
        }
    }
}
