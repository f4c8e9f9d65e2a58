//! SDXL against diffusers (tools/fixtures/gen_sdxl.py): the tiny SDXL pipeline has two text encoders of
//! different widths (32 and 48, projection 40), so a concatenation, pooling or zero-negative mistake shows.
//! Components are compared at the parity metric (1e-4 relative); whole runs through the CLI at 40 dB PSNR.
use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use controlnet::model::controlnet::{AddedConditions, ControlNetModel};
use controlnet::pipeline::text_conditioning::{self, SdxlConditioning};
use controlnet::pipeline::StableDiffusion;

const PROMPT: &str = "a red circle on a light blue background";

fn components() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("sdxl/components.safetensors"), &Device::Cpu).unwrap()
}

fn sdxl() -> StableDiffusion {
    StableDiffusion::load(&fixture("models/tiny-sdxl"), DType::F32, &Device::Cpu).unwrap()
}

/// encode_prompt: both encoders' penultimate states side by side, the second's pooled projection, and the
/// negative side as zeros (no negative prompt, force_zeros_for_empty_prompt) or as the encoded text.
#[test]
fn prompt_encoding_matches_diffusers() {
    let sd = sdxl();
    let fx = components();
    for (tag, negative) in [("zeros", ""), ("text", "blurry, dark")] {
        let text = text_conditioning::encode(
            &sd,
            PROMPT,
            negative,
            &SdxlConditioning::default(),
            (128, 128),
            1,
            true,
            &Default::default(),
        )
        .unwrap();
        let added = text.added.unwrap();
        let pe = &fx[&format!("{tag}.prompt_embeds")];
        let npe = &fx[&format!("{tag}.negative_prompt_embeds")];
        assert_close(&text.embeds, &Tensor::cat(&[npe, pe], 0).unwrap(), &format!("{tag}: prompt embeds"));
        let pooled = Tensor::cat(&[&fx[&format!("{tag}.negative_pooled")], &fx[&format!("{tag}.pooled")]], 0).unwrap();
        assert_close(&added.text_embeds, &pooled, &format!("{tag}: pooled"));
        let ids: Vec<Vec<f32>> = added.time_ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![128.0, 128.0, 0.0, 0.0, 128.0, 128.0]; 2]);
    }
    assert!(max_abs(&fx["text.negative_pooled"]) > 0.1, "the reference's encoded negative is not zero");

    // Micro-conditioning: original 200x150, crop (top 4, left 8), target 120x90 for a 128x96 output, in
    // diffusers' order (its `_get_add_time_ids`).
    let micro = SdxlConditioning {
        original_size: Some((200, 150)),
        crop_top_left: (4, 8),
        target_size: Some((120, 90)),
        ..Default::default()
    };
    let text = text_conditioning::encode(&sd, PROMPT, "", &micro, (128, 96), 1, false, &Default::default()).unwrap();
    assert_close(&text.added.unwrap().time_ids, &fx["micro_time_ids"], "time ids");
}

/// One UNet and one ControlNet forward with pooled text and size/crop ids (different per sample).
#[test]
fn unet_and_controlnet_with_added_conditions_match_diffusers() {
    let sd = sdxl();
    let fx = components();
    let added = AddedConditions { text_embeds: fx["text_embeds"].clone(), time_ids: fx["time_ids"].clone() };
    let (x, t, ctx) = (&fx["sample"], &fx["timesteps"], &fx["context"]);
    let out = sd.unet.forward_with(x, t, ctx, Some(&added), None).unwrap();
    assert_close(&out, &fx["unet_out"], "unet");
    // Without the added conditions an SDXL UNet refuses to run.
    let err = sd.unet.forward(x, t, ctx, None).unwrap_err().to_string();
    assert!(err.contains("SDXL"), "{err}");

    let net = ControlNetModel::load(&fixture("models/tiny-controlnet-sdxl"), DType::F32, &Device::Cpu).unwrap();
    let hint = net.embed_condition(&fx["cond"]).unwrap();
    let res = net.forward_with(x, t, ctx, Some(&added), &hint, 0.8, false).unwrap();
    for (i, d) in res.down_block_res_samples.iter().enumerate() {
        assert_close(d, &fx[&format!("controlnet_down.{i}")], &format!("controlnet down {i}"));
    }
    assert_close(&res.mid_block_res_sample, &fx["controlnet_mid"], "controlnet mid");
}

const MIN_PSNR_DB: f64 = 40.0;

fn run_case(name: &str) {
    run_generate_case("sdxl/cases.json", name, MIN_PSNR_DB);
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_case($name); })*
    };
}

cases! {
    euler_model_default => "sdxl_cn_default",
    no_controlnet_dpm_solver => "sdxl_no_controlnet",
    ddim_with_negative_prompt => "sdxl_cn_ddim_negative",
    euler_ancestral_with_prompt_2 => "sdxl_cn_euler_a_prompt_2",
    unipc_guess_mode => "sdxl_cn_unipc_guess",
    two_nets_with_window => "sdxl_two_nets_window",
    pndm_odd_size_with_micro_conditioning => "sdxl_cn_odd_micro",
    two_images_non_square => "sdxl_cn_two_images",
}

/// The `-mid`/`-small` SDXL ControlNet layouts (tools/fixtures/gen_sdxl2.py): attention levels with zero
/// transformer blocks; no attention at all with diffusers' plain `UNetMidBlock2D` (one resnet).
macro_rules! layout_cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_generate_case("sdxl/cases_layouts.json", $name, MIN_PSNR_DB); })*
    };
}

layout_cases! {
    mid_controlnet_zero_depth_attention => "sdxl_cn_mid",
    small_controlnet_plain_mid_block_ddim => "sdxl_cn_small_ddim",
    mid_and_small_together_with_window => "sdxl_mid_and_small",
}

/// Their layouts are read from the weights alone as single files: zero-depth attentions and the plain mid
/// block give the folder's image.
#[test]
fn mid_and_small_single_files_give_the_folders_image() {
    let dir = temp_dir();
    for net in ["tiny-controlnet-sdxl-mid", "tiny-controlnet-sdxl-small"] {
        let file = dir.path().join(format!("{net}.safetensors"));
        std::fs::copy(fixture(&format!("models/{net}/diffusion_pytorch_model.safetensors")), &file).unwrap();
        let config = fixture(&format!("models/{net}/config.json"));
        let run = |spec: &str, extra: &[&str], out: &str| {
            let out = dir.path().join(out);
            let mut args = vec![
                "generate",
                "--model",
                "tests/fixtures/models/tiny-sdxl",
                "--controlnet",
                spec,
                "--control",
                "tests/fixtures/pipeline/control_circle.png",
                "--steps",
                "2",
                "--seed",
                "5",
                "-o",
                out.to_str().unwrap(),
                "-q",
            ];
            args.extend(extra);
            let res = controlnet(&args);
            assert!(res.status.success(), "{net}: {}", stderr(&res));
            image::open(&out).unwrap().to_rgb8()
        };
        let folder = run(&format!("tests/fixtures/models/{net}"), &[], "folder.png");
        // The tiny nets' head counts are not SDXL's: the config gives them, the layout comes from the weights
        // (the config is checked against them).
        let single = run(file.to_str().unwrap(), &["--controlnet-config", config.to_str().unwrap()], "file.png");
        assert!(folder == single, "{net}: the single file's image differs from the folder's");
    }
}

/// An SD1.5 ControlNet with the SDXL model (and the reverse) is refused, naming which base each is for.
#[test]
fn controlnets_of_the_other_family_are_refused_plainly() {
    let dir = temp_dir();
    let out = dir.path().join("x.png");
    let run = |model: &str, net: &str| {
        let res = controlnet(&[
            "generate",
            "--model",
            model,
            "--controlnet",
            net,
            "--control",
            "tests/fixtures/pipeline/control_circle.png",
            "--steps",
            "1",
            "-o",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert!(!res.status.success());
        stderr(&res)
    };
    let err = run("tests/fixtures/models/tiny-sdxl", "tests/fixtures/models/tiny-controlnet-a");
    assert!(err.contains("--controlnet") && err.contains("for SD 1.x/2.x base models but the model is SDXL"), "{err}");
    let err = run("tests/fixtures/models/tiny-sd15", "tests/fixtures/models/tiny-controlnet-sdxl");
    assert!(err.contains("for SDXL base models but the model is SD 1.x/2.x"), "{err}");
    assert!(!out.exists());
}

/// An SDXL ControlNet as one `.safetensors` file with diffusers names (as lllyasviel's sd_control_collection
/// ships them): its layout is read from the weights (the tiny net's head counts need its config.json) and it
/// gives the folder's image.
#[test]
fn single_file_sdxl_controlnet_gives_the_folders_image() {
    let dir = temp_dir();
    let file = dir.path().join("controlnet-sdxl.safetensors");
    std::fs::copy(fixture("models/tiny-controlnet-sdxl/diffusion_pytorch_model.safetensors"), &file).unwrap();
    let run = |net: &str, extra: &[&str], out: &str| {
        let out = dir.path().join(out);
        let mut args = vec![
            "generate",
            "--model",
            "tests/fixtures/models/tiny-sdxl",
            "--controlnet",
            net,
            "--control",
            "tests/fixtures/pipeline/control_circle.png",
            "--steps",
            "2",
            "--seed",
            "3",
            "-o",
            out.to_str().unwrap(),
            "-q",
        ];
        args.extend(extra);
        let res = controlnet(&args);
        assert!(res.status.success(), "{}", stderr(&res));
        image::open(&out).unwrap().to_rgb8()
    };
    let folder = run("tests/fixtures/models/tiny-controlnet-sdxl", &[], "folder.png");
    let config = fixture("models/tiny-controlnet-sdxl/config.json");
    let single = run(file.to_str().unwrap(), &["--controlnet-config", config.to_str().unwrap()], "file.png");
    assert_eq!(folder, single);
}
