//! The generate recipe as a library call: `pipeline::run` with a `GenerateRequest` gives the same image and the
//! same PNG metadata as `controlnet generate` with the matching flags, reports progress, and stops when cancelled.
mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use candle_core::Device;
use common::*;
use controlnet::pipeline::{self, ControlRequest, GenerateRequest, ImageMetadata, Progress};

fn request() -> GenerateRequest {
    let mut control = ControlRequest::new(
        Some(repo().join("tests/fixtures/models/tiny-controlnet-a").display().to_string()),
        repo().join("tests/fixtures/pipeline/control_odd.png"),
    );
    control.conditioning_scale = 0.7;
    control.control_end = 0.8;
    GenerateRequest {
        model: Some(repo().join("tests/fixtures/models/tiny-sd15").display().to_string()),
        prompt: "zwei Kreise".into(),
        negative_prompt: "blur".into(),
        controls: vec![control],
        steps: 3,
        seed: Some(99),
        scheduler: Some("euler-a".parse().unwrap()),
        num_images: 2,
        ..GenerateRequest::default()
    }
}

#[test]
fn library_call_gives_the_cli_image_and_metadata() {
    let steps = Mutex::new(Vec::new());
    let on_progress = |p: Progress| {
        if let Progress::Step { done, total } = p {
            steps.lock().unwrap().push((done, total));
        }
    };
    let generated =
        pipeline::run(&request(), &Device::Cpu, &on_progress, pipeline::never_cancelled()).expect("library run");
    assert_eq!(generated.seed, 99);
    assert_eq!(steps.into_inner().unwrap(), vec![(1, 3), (2, 3), (3, 3)]);
    assert_eq!(generated.images.len(), 2);
    // The default size: the 130×97 condition rounded down to multiples of 8.
    assert_eq!(generated.images[0].image.dimensions(), (128, 96));
    assert_eq!(generated.conditions[0].as_ref().map(|c| c.dimensions()), Some((128, 96)));

    let dir = temp_dir();
    let out = dir.path().join("cli.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        "tests/fixtures/models/tiny-controlnet-a",
        "--control",
        "tests/fixtures/pipeline/control_odd.png",
        "--prompt",
        "zwei Kreise",
        "--negative-prompt",
        "blur",
        "--steps",
        "3",
        "--seed",
        "99",
        "--scheduler",
        "euler-a",
        "--num-images",
        "2",
        "--conditioning-scale",
        "0.7",
        "--control-end",
        "0.8",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    for (i, ours) in generated.images.iter().enumerate() {
        let path = dir.path().join(format!("cli-{}.png", i + 1));
        assert_eq!(image::open(&path).unwrap().to_rgb8(), ours.image, "image {} differs", i + 1);
        let chunks = controlnet::io::images::read_png_text(&path).unwrap();
        assert_eq!(chunks, ours.metadata.text_chunks(), "metadata of image {} differs", i + 1);
        let m = ImageMetadata::from_text_chunks(&chunks).unwrap();
        assert_eq!(m.image_index, i + 1);
        // Inputs are recorded by absolute path (the CLI was given relative ones).
        assert!(
            std::path::Path::new(&m.controls[0].control_image.path).is_absolute(),
            "{}",
            m.controls[0].control_image.path
        );
        assert!(std::path::Path::new(&m.model.path).is_absolute(), "{}", m.model.path);
    }
}

#[test]
fn a_raised_cancel_flag_stops_the_run() {
    let cancel = AtomicBool::new(true);
    let started = Mutex::new(false);
    let on_progress = |p: Progress| {
        if matches!(p, Progress::Started { .. }) {
            *started.lock().unwrap() = true;
        }
    };
    let err = pipeline::run(&request(), &Device::Cpu, &on_progress, &cancel).err().expect("cancelled");
    assert!(matches!(err, controlnet::Error::Cancelled), "{err}");
    assert!(*started.lock().unwrap(), "the checks ran before the first step");
}

#[test]
fn errors_name_request_settings() {
    let mut r = request();
    r.controls[0].control_end = 2.0;
    let err = pipeline::run(&r, &Device::Cpu, &|_| {}, pipeline::never_cancelled()).err().unwrap();
    assert_eq!(err.to_string(), "controls[0].control_end: 2 must lie in [0, 1]");
}
