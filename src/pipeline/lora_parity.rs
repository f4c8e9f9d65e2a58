//! LoRA parity with diffusers: `pipe.load_lora_weights(...)` + `set_adapters(names, weights)` on the tiny SD1.5
//! pipeline (tools/fixtures/gen_lora.py) against our merge at load, for a kohya file (linear, 1x1 and 3x3 conv,
//! text-encoder MLP), a PEFT file (UNet and text-encoder attention), both at once, and A1111's separate
//! text-encoder / UNet multipliers (`set_adapters` with `{"unet": .., "text_encoder": ..}`).
use candle_core::{DType, Device};

use super::generate::{generate, GenerateParams};
use super::sd::{LoadOptions, StableDiffusion};
use crate::io::lora::{LoraFile, LoraWeight};
use crate::test_support::{fixture_path, fixture_tensors, max_abs_diff, psnr};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    loras: Vec<CaseLora>,
    prompt: String,
    seed: u64,
    steps: usize,
    guidance: f64,
    scheduler: String,
    png: String,
    tensors: String,
}

/// `[file, weight]` or `[file, te, unet]`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum CaseLora {
    Uniform(String, f64),
    Split(String, f64, f64),
}

impl CaseLora {
    fn file_and_weight(&self) -> (&str, LoraWeight) {
        match self {
            CaseLora::Uniform(f, w) => (f, LoraWeight::uniform(*w)),
            CaseLora::Split(f, te, unet) => (f, LoraWeight { text_encoder: *te, unet: *unet }),
        }
    }
}

#[test]
fn lora_images_match_diffusers() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("lora/cases.json")).unwrap()).unwrap();
    let opts =
        LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, prediction_type: None, config_dir: None };
    let model = fixture_path("models/tiny-sd15");
    let base_decoded = &fixture_tensors("lora/base.safetensors")["decoded"];
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let loras: Vec<(LoraFile, LoraWeight)> = case
            .loras
            .iter()
            .map(CaseLora::file_and_weight)
            .map(|(f, w)| (LoraFile::read(&fixture_path(&format!("lora/{f}"))).unwrap(), w))
            .collect();
        let sd = StableDiffusion::open_with_loras(model.to_str().unwrap(), &opts, &loras).unwrap();
        let params = GenerateParams {
            scheduler: Some(case.scheduler.parse().unwrap()),
            ..GenerateParams::plain(case.prompt.clone(), 128, 128, case.steps, case.guidance, case.seed)
        };
        let out = generate(&sd, &[], &params, &mut |_, _| {}).unwrap();
        let reference = fixture_tensors(&format!("lora/{}", case.tensors));
        let latents = max_abs_diff(&out.latents, &reference["latents"]);
        let decoded = max_abs_diff(&out.decoded, &reference["decoded"]);
        assert!(latents < 1e-3 && decoded < 2e-3, "{}: latents differ by {latents}, decoded by {decoded}", case.name);
        let png = image::open(fixture_path(&format!("lora/{}", case.png))).unwrap().to_rgb8();
        let db = psnr(&out.images[0], &png);
        assert!(db >= 40.0, "{}: PSNR {db:.1} dB", case.name);
        // The LoRA cases differ clearly from the plain model (the reference checked diffusers applied them).
        if !case.loras.is_empty() {
            assert!(max_abs_diff(&out.decoded, base_decoded) > 0.5, "{}: the LoRA changed nothing", case.name);
        }
    }
}

#[test]
fn wrong_family_and_stray_modules_are_refused() {
    let opts =
        LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, prediction_type: None, config_dir: None };
    let model = fixture_path("models/tiny-sd15");
    let kohya = LoraFile::read(&fixture_path("lora/tiny-kohya.safetensors")).unwrap();
    // An SDXL LoRA (it changes a second text encoder) on an SD 1.x model.
    let mut sdxl = kohya.clone();
    let (key, m) = sdxl.modules.iter().next().map(|(k, m)| (k.clone(), m.clone())).unwrap();
    sdxl.modules.insert((crate::io::lora::Part::TextEncoder2, key.1.clone()), m.clone());
    let err = StableDiffusion::open_with_loras(model.to_str().unwrap(), &opts, &[(sdxl, 1.0.into())])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is a LoRA for SDXL") && err.contains("tiny-kohya"), "{err}");
    // A module the model does not have.
    let mut stray = kohya;
    stray.modules.insert((crate::io::lora::Part::Unet, "down_blocks_7_attentions_0_proj_in".into()), m);
    let err = StableDiffusion::open_with_loras(model.to_str().unwrap(), &opts, &[(stray, 1.0.into())])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("match nothing") && err.contains("down_blocks_7_attentions_0_proj_in"), "{err}");
}
