//! Stability-style control-LoRAs on an SDXL base: built on the loaded base UNet, they give what diffusers gives
//! with the ControlNet they stand for (fixtures by tools/fixtures/gen_control_lora.py).
use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use controlnet::model::controlnet::AddedConditions;
use controlnet::pipeline::sd::{open_controlnet, LoadOptions};
use controlnet::pipeline::StableDiffusion;

const LORA: &str = "tests/fixtures/control_lora/tiny-control-lora-sdxl.safetensors";

fn opts() -> LoadOptions {
    LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, prediction_type: None, config_dir: None }
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

/// The rebuilt ControlNet's residuals equal the reference net's on the fixed SDXL inputs (1e-4).
#[test]
fn rebuilt_controlnet_matches_the_reference_forward() {
    let sd = StableDiffusion::load(&fixture("models/tiny-sdxl"), DType::F32, &Device::Cpu).unwrap();
    let net = open_controlnet("controlnet", LORA, None, &opts(), Some(&sd)).unwrap();
    let fx = load("sdxl/components.safetensors");
    let reference = load("control_lora/forward.safetensors");
    let added = AddedConditions { text_embeds: fx["text_embeds"].clone(), time_ids: fx["time_ids"].clone() };
    let hint = net.embed_condition(&fx["cond"]).unwrap();
    let res =
        net.forward_with(&fx["sample"], &fx["timesteps"], &fx["context"], Some(&added), &hint, 0.8, false).unwrap();
    for (i, d) in res.down_block_res_samples.iter().enumerate() {
        assert_close(d, &reference[&format!("controlnet_down.{i}")], &format!("down {i}"));
    }
    assert_close(&res.mid_block_res_sample, &reference["controlnet_mid"], "mid");
    assert!(max_abs(&reference["controlnet_mid"]) > 1e-2, "the reference residual is not trivial");

    // Without a base there is nothing to build it on.
    let err = open_controlnet("controlnet", LORA, None, &opts(), None).unwrap_err().to_string();
    assert!(err.contains("base model's UNet"), "{err}");
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_generate_case("control_lora/cases.json", $name, 40.0); })*
    };
}

cases! {
    generate_matches_diffusers_with_the_reference_net => "control_lora_default",
    generate_ddim_scaled_window_matches_diffusers => "control_lora_ddim_scaled",
}

/// On an SD 1.x base it is refused by name, naming the flag; nothing is written.
#[test]
fn sd15_base_is_refused() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let res = controlnet(&[
        "generate",
        "--model",
        "tests/fixtures/models/tiny-sd15",
        "--controlnet",
        LORA,
        "--control",
        "tests/fixtures/pipeline/control_circle.png",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--controlnet") && err.contains("control-LoRA") && err.contains("SDXL"), "{err}");
    assert!(!out.exists());
}

/// `inspect` names it: an SDXL control-LoRA and its rank; every tensor but the marker is used.
#[test]
fn inspect_names_family_and_rank() {
    let res = controlnet(&["inspect", LORA, "--json"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(v["description"], "an SDXL control-LoRA, rank 4 (original names)", "{v}");
    assert_eq!(v["base"], "sdxl", "{v}");
    assert_eq!(v["cross_attention_dim"], 80, "{v}");
    assert_eq!(v["unrecognised_count"], 0, "{v}");
    assert_eq!(v["ignored_tensors"], 1, "{v}");
}
