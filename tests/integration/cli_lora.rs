//! `generate --lora FILE[:WEIGHT]` and `FILE:TE:UNET`, `<lora:name:w>` prompt tags with `--lora-dir`, refusals, the recipe and
//! `reproduce`, `inspect` on a LoRA file. The numbers are checked against diffusers in `pipeline::lora_parity`.
use crate::common;

use common::{controlnet, controlnet_owned, fixture, psnr, stderr, temp_dir, tiny_generate_args};

const PROMPT: &str = "a red circle on a light blue background";

fn tiny_args(out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    tiny_generate_args(out, "31", extra)
}

fn reference(name: &str) -> image::RgbImage {
    image::open(fixture(&format!("lora/{name}.png"))).unwrap().to_rgb8()
}

/// `--lora FILE:0.8` gives diffusers' image; a prompt tag with `--lora-dir` is the same LoRA, taken out of the
/// prompt; the recipe records it and `reproduce` makes the same image.
#[test]
fn lora_flag_and_prompt_tag_match_diffusers_and_reproduce() {
    let dir = temp_dir();
    let kohya = fixture("lora/tiny-kohya.safetensors");
    let flag = dir.path().join("flag.png");
    let spec = format!("{}:0.8", kohya.display());
    let res = controlnet_owned(&tiny_args(&flag, &["--prompt", PROMPT, "--lora", &spec]));
    assert!(res.status.success(), "{}", stderr(&res));
    let img = image::open(&flag).unwrap().to_rgb8();
    assert!(psnr(&img, &reference("kohya")) >= 40.0);

    let tagged = dir.path().join("tag.png");
    let prompt = format!("{PROMPT} <lora:tiny-kohya:0.8>");
    let lora_dir = fixture("lora");
    let res = controlnet_owned(&tiny_args(&tagged, &["--prompt", &prompt, "--lora-dir", lora_dir.to_str().unwrap()]));
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(image::open(&tagged).unwrap().to_rgb8(), img);

    let chunks = controlnet::io::images::read_png_text(&tagged).unwrap();
    let meta = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert_eq!(meta.prompt, format!("{PROMPT} "));
    assert_eq!(meta.loras.len(), 1);
    assert!(meta.loras[0].path.ends_with("tiny-kohya.safetensors") && meta.loras[0].weight == 0.8);
    assert_eq!(meta.loras[0].sha256.len(), 64);
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("<lora:tiny-kohya:0.8>") && params.contains("Lora hashes: \"tiny-kohya: "), "{params}");

    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", tagged.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(image::open(&again).unwrap().to_rgb8(), img);
}

/// A1111's separate multipliers on SD 1.5: `--lora FILE:TE:UNET` gives diffusers' `set_adapters` image with
/// `{"text_encoder": 2, "unet": 0.8}`; the recipe keeps both, the A1111 parameters write `<lora:name:2:0.8>`,
/// and `reproduce` makes the same image.
#[test]
fn lora_text_encoder_and_unet_weights_match_diffusers_and_reproduce() {
    let dir = temp_dir();
    let out = dir.path().join("split.png");
    let spec = format!("{}:2:0.8", fixture("lora/tiny-kohya.safetensors").display());
    let res = controlnet_owned(&tiny_args(&out, &["--prompt", PROMPT, "--lora", &spec]));
    assert!(res.status.success(), "{}", stderr(&res));
    let img = image::open(&out).unwrap().to_rgb8();
    assert!(psnr(&img, &reference("kohya_split")) >= 40.0);
    assert!(psnr(&img, &reference("kohya")) < 30.0, "the text-encoder weight made no difference");

    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let meta = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert_eq!((meta.loras[0].weight, meta.loras[0].unet_weight), (2.0, Some(0.8)));
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("<lora:tiny-kohya:2:0.8>"), "{params}");
    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(image::open(&again).unwrap().to_rgb8(), img);
}

#[test]
fn bad_lora_flags_and_tags_are_named() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let kohya = fixture("lora/tiny-kohya.safetensors");
    // A weight that is not a number.
    let res =
        controlnet_owned(&tiny_args(&out, &["--prompt", PROMPT, "--lora", &format!("{}:strong", kohya.display())]));
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--lora") && stderr(&res).contains("must be a number"), "{}", stderr(&res));
    // An unknown tag name names the tag and the folder.
    let lora_dir = fixture("lora");
    let prompt = format!("{PROMPT} <lora:missing:0.5>");
    let res = controlnet_owned(&tiny_args(&out, &["--prompt", &prompt, "--lora-dir", lora_dir.to_str().unwrap()]));
    let err = stderr(&res);
    assert!(!res.status.success());
    assert!(err.contains("<lora:missing:0.5>") && err.contains(lora_dir.to_str().unwrap()), "{err}");
    // A tag without --lora-dir.
    let res = controlnet_owned(&tiny_args(&out, &["--prompt", &prompt]));
    assert!(!res.status.success() && stderr(&res).contains("lora_dir"), "{}", stderr(&res));
    // Not a LoRA (a ControlNet's weights) is named.
    let net = fixture("models/tiny-controlnet-a/diffusion_pytorch_model.safetensors");
    let res = controlnet_owned(&tiny_args(&out, &["--prompt", PROMPT, "--lora", net.to_str().unwrap()]));
    assert!(!res.status.success() && stderr(&res).contains("--lora"), "{}", stderr(&res));
    assert!(!out.exists());
}

/// A LoRA for SDXL (it changes a second text encoder) is refused on an SD 1.x model, naming the family.
#[test]
fn sdxl_lora_on_sd15_is_refused() {
    let dir = temp_dir();
    let file = dir.path().join("xl.safetensors");
    let mut tensors =
        candle_core::safetensors::load(fixture("lora/tiny-kohya.safetensors"), &candle_core::Device::Cpu).unwrap();
    let extra: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("lora_te_"))
        .map(|(k, v)| (k.replacen("lora_te_", "lora_te2_", 1), v.clone()))
        .collect();
    tensors.extend(extra);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let out = dir.path().join("out.png");
    let res = controlnet_owned(&tiny_args(&out, &["--prompt", PROMPT, "--lora", file.to_str().unwrap()]));
    let err = stderr(&res);
    assert!(!res.status.success());
    assert!(err.contains("--lora") && err.contains("is a LoRA for SDXL"), "{err}");
}

#[test]
fn inspect_says_lora() {
    let res = controlnet(&["inspect", fixture("lora/tiny-kohya.safetensors").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{}", stderr(&res));
    assert!(text.contains("a LoRA (kohya format, rank 4"), "{text}");
}
