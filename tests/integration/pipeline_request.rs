//! The generate recipe as a library call: `pipeline::run` with a `GenerateRequest` gives the same image and the
//! same PNG metadata as `controlnet generate` with the matching flags, reports progress, and stops when cancelled.
use crate::common;

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

fn images(r: &GenerateRequest) -> Vec<image::RgbImage> {
    let generated = pipeline::run(r, &Device::Cpu, &|_| {}, pipeline::never_cancelled()).expect("run");
    generated.images.into_iter().map(|g| g.image).collect()
}

/// `unet`: a UNet folder (as `train --unlock-decoder` writes) replaces the model's own, giving the image of a
/// pipeline folder that holds that UNet; the metadata records it and the request read back names it.
#[test]
fn a_unet_folder_replaces_the_models_unet() {
    let dir = temp_dir();
    let pipe = dir.path().join("pipe");
    copy_dir(&fixture("models/tiny-sd15"), &pipe);
    edit_tensors(&pipe.join("unet/diffusion_pytorch_model.safetensors"), |name, t| {
        if name.starts_with("up_blocks.") && name.ends_with(".weight") {
            (t * 1.1).unwrap()
        } else {
            t
        }
    });
    let unet = dir.path().join("trained-unet");
    copy_dir(&pipe.join("unet"), &unet);

    let base = request();
    let replaced = GenerateRequest { unet: Some(unet.clone()), ..request() };
    let in_pipeline = GenerateRequest { model: Some(pipe.display().to_string()), ..request() };
    let with_unet = images(&replaced);
    assert_eq!(with_unet, images(&in_pipeline), "--unet gives the image of a pipeline holding that UNet");
    assert_ne!(with_unet, images(&base), "the replacement UNet changed nothing");

    let generated = pipeline::run(&replaced, &Device::Cpu, &|_| {}, pipeline::never_cancelled()).unwrap();
    let m = &generated.images[0].metadata;
    let recorded = m.unet.as_ref().expect("the metadata records the UNet");
    assert_eq!(std::path::Path::new(&recorded.path), std::path::absolute(&unet).unwrap());
    assert_eq!(m.to_request(dir.path()).unwrap().unet, Some(std::path::absolute(&unet).unwrap()));
    assert!(!pipeline::run(&base, &Device::Cpu, &|_| {}, pipeline::never_cancelled()).unwrap().images[0]
        .metadata
        .text_chunks()[1]
        .1
        .contains("\"unet\""));

    // A UNet for other text embeddings is refused before its weights load, naming the setting.
    let other = dir.path().join("other-unet");
    copy_dir(&unet, &other);
    let cfg = other.join("config.json");
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48");
    std::fs::write(&cfg, text).unwrap();
    let err = pipeline::run(
        &GenerateRequest { unet: Some(other), ..request() },
        &Device::Cpu,
        &|_| {},
        pipeline::never_cancelled(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.starts_with("unet: ") && err.contains("cross_attention_dim is 48"), "{err}");
}

/// `only_mid_control` gives exactly the image of the same net with its down-block zero convolutions zeroed
/// (their residuals are then zero and only the middle one acts), and differs from the plain net.
#[test]
fn only_mid_control_drops_the_down_residuals() {
    let dir = temp_dir();
    let net = dir.path().join("mid-only-net");
    copy_dir(&fixture("models/tiny-controlnet-a"), &net);
    edit_tensors(&net.join("diffusion_pytorch_model.safetensors"), |name, t| {
        if name.starts_with("controlnet_down_blocks.") {
            t.zeros_like().unwrap()
        } else {
            t
        }
    });
    let mut mid_only = request();
    mid_only.controls[0].only_mid_control = true;
    let mut zeroed = request();
    zeroed.controls[0].controlnet = Some(net.display().to_string());
    let ours = images(&mid_only);
    assert_eq!(ours, images(&zeroed));
    assert_ne!(ours, images(&request()));
}

/// A long-running server keeps one model and a `Generator` per set of ControlNets: a request run after others
/// (txt2img with a net, a plain img2img, an img2img whose net reads the init picture) gives exactly the image it
/// gives on freshly loaded models, so nothing a run leaves behind reaches the next.
#[test]
fn a_reused_generator_gives_a_fresh_ones_image() {
    use controlnet::pipeline::sd::{open_controlnet, LoadOptions};
    use controlnet::pipeline::{Generator, StableDiffusion};
    let opts = LoadOptions {
        dtype: candle_core::DType::F32,
        device: Device::Cpu,
        variant: None,
        prediction_type: None,
        config_dir: None,
    };
    let model = repo().join("tests/fixtures/models/tiny-sd15").display().to_string();
    let net_spec = repo().join("tests/fixtures/models/tiny-controlnet-a").display().to_string();
    let init = repo().join("tests/fixtures/img2img/init.png");
    let plain = GenerateRequest {
        model: Some(model.clone()),
        prompt: "a cat".into(),
        steps: 2,
        seed: Some(5),
        scheduler: Some("euler-a".parse().unwrap()),
        init_image: Some(init.clone()),
        strength: Some(0.5),
        ..GenerateRequest::default()
    };
    let inpaint =
        GenerateRequest { mask: Some(repo().join("tests/fixtures/img2img/mask.png")), mask_blur: 4, ..plain.clone() };
    let with_net =
        GenerateRequest { controls: vec![ControlRequest::new(Some(net_spec.clone()), init.clone())], ..plain.clone() };
    // `request()`: txt2img with tiny-controlnet-a, made smaller.
    let txt2img = GenerateRequest { width: Some(64), height: Some(64), num_images: 1, ..request() };
    let run = |g: &Generator, r: &GenerateRequest| -> Vec<image::RgbImage> {
        let out = g.run(r, &|_| {}, pipeline::never_cancelled()).expect("run");
        out.images.into_iter().map(|i| i.image).collect()
    };

    let fresh = StableDiffusion::open(&model, &opts).unwrap();
    let want = run(&Generator::new(&fresh, vec![]), &inpaint);

    let sd = StableDiffusion::open(&model, &opts).unwrap();
    let net = open_controlnet("controlnet", &net_spec, None, &opts, None).unwrap();
    let (with_nets, without) = (Generator::new(&sd, vec![&net]), Generator::new(&sd, vec![]));
    run(&with_nets, &txt2img);
    run(&without, &plain);
    run(&with_nets, &with_net);
    assert_eq!(run(&without, &inpaint), want, "the inpainting after other jobs differs from a fresh run");
    // The request with a net differs (the net acts), so the comparison above can fail.
    assert_ne!(run(&with_nets, &GenerateRequest { mask: inpaint.mask.clone(), mask_blur: 4, ..with_net }), want);
}
