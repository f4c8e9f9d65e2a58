//! SDXL LoRAs against diffusers (tools/fixtures/gen_lora_sdxl.py): StableDiffusionXLControlNetPipeline with
//! `load_lora_weights` + `set_adapters` on the tiny SDXL model and ControlNet, for a kohya file with SDXL's LDM
//! UNet names (`input_blocks_…`, `middle_block_…`, `output_blocks_…`, `time_embed`, `label_emb`, `out`; linear,
//! 1x1 and 3x3 convs, both text encoders), a PEFT file (`unet.`, `text_encoder.`, `text_encoder_2.`), A1111's
//! separate text-encoder / UNet multipliers (`--lora FILE:TE:UNET`, `<lora:name:TE:UNET>`) and both files at
//! once. Images at 40 dB.
use crate::common;

use common::*;

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_generate_case("lora_sdxl/cases.json", $name, 40.0); })*
    };
}

cases! {
    sdxl_without_lora_matches_diffusers => "sdxl_base",
    sdxl_kohya_ldm_names_match_diffusers => "sdxl_kohya",
    sdxl_peft_matches_diffusers => "sdxl_peft",
    sdxl_text_encoder_and_unet_weights_match_diffusers => "sdxl_kohya_split",
    sdxl_uniform_weight_matches_diffusers => "sdxl_kohya_uniform",
    sdxl_two_loras_ddim_match_diffusers => "sdxl_both_ddim",
}

/// The prompt tag `<lora:name:TE:UNET>` with `--lora-dir` (and A1111's `te=`/`unet=` names) gives the
/// `--lora FILE:TE:UNET` image, which differs from the same LoRA at the UNet weight alone.
#[test]
fn sdxl_split_prompt_tag_matches_the_flag() {
    let cases: Vec<GenerateCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("lora_sdxl/cases.json")).unwrap()).unwrap();
    let split = cases.iter().find(|c| c.name == "sdxl_kohya_split").unwrap();
    let reference = image::open(fixture("lora_sdxl/sdxl_kohya_split.png")).unwrap().to_rgb8();
    let uniform = image::open(fixture("lora_sdxl/sdxl_kohya_uniform.png")).unwrap().to_rgb8();
    assert!(psnr(&reference, &uniform) < 30.0, "the text-encoder multiplier makes no visible difference");
    let dir = temp_dir();
    let lora_dir = fixture("lora_sdxl");
    for tag in ["<lora:tiny-sdxl-kohya:1.5:0.5>", "<lora:tiny-sdxl-kohya:unet=0.5:te=1.5>"] {
        // The case's arguments with the --lora flag taken out and the tag put into the prompt.
        let mut args: Vec<String> = vec!["generate".into()];
        let mut it = split.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--lora" => {
                    it.next();
                }
                "--prompt" => {
                    let prompt = it.next().unwrap();
                    args.extend(["--prompt".into(), format!("{prompt} {tag}")]);
                }
                _ => args.push(a.clone()),
            }
        }
        let out = dir.path().join("tag.png");
        args.extend(
            ["--lora-dir", lora_dir.to_str().unwrap(), "--output", out.to_str().unwrap(), "--quiet"].map(String::from),
        );
        let res = controlnet(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(res.status.success(), "{tag}: {}", stderr(&res));
        let db = psnr(&image::open(&out).unwrap().to_rgb8(), &reference);
        assert!(db >= 40.0, "{tag}: PSNR {db:.1} dB");
    }
}
