//! Textual-inversion parity (tools/fixtures/gen_textual_inversion.py): plain syntax against diffusers'
//! `load_textual_inversion` + `encode_prompt` and one image of the tiny SD1.5 pipeline; A1111 syntax against the
//! generator's re-implementation of A1111's embedding lookup. All four file layouts, multi-vector embeddings,
//! SDXL's two encoders.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::generate::{generate, GenerateParams};
use super::sd::StableDiffusion;
use super::text_conditioning::{encode, PromptOptions, PromptSyntax, SdxlConditioning};
use super::textual_inversion::{Embeddings, LoadedEmbedding};
use crate::io::embeddings::EmbeddingFile;
use crate::test_support::{fixture_path, fixture_tensors, max_abs, max_abs_diff};

fn file_of(name: &str) -> &'static str {
    match name {
        "inkstyle" => "inkstyle.pt",
        "neonfox" => "neonfox.safetensors",
        "<cat-toy>" => "cat-toy/learned_embeds.bin",
        _ => "xlstyle.safetensors",
    }
}

fn embeddings(names: &[String]) -> Embeddings {
    Embeddings::new(
        names
            .iter()
            .map(|n| {
                let file = EmbeddingFile::read(&fixture_path(&format!("textual_inversion/{}", file_of(n)))).unwrap();
                assert_eq!(&file.name, n);
                LoadedEmbedding { file, setting: "embeddings" }
            })
            .collect(),
    )
}

fn model(kind: &str) -> StableDiffusion {
    let dir = if kind == "sdxl" { "models/tiny-sdxl" } else { "models/tiny-sd15" };
    StableDiffusion::load(&fixture_path(dir), DType::F32, &Device::Cpu).unwrap()
}

fn close(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let diff = max_abs_diff(actual, expected);
    assert!(diff <= 1e-5 * max_abs(expected).max(1.0), "{what}: max abs diff {diff:e}");
}

fn row(t: &Tensor, i: usize) -> Tensor {
    t.get(i).unwrap().unsqueeze(0).unwrap()
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    model: String,
    syntax: String,
    embeddings: Vec<String>,
    prompt: String,
    negative_prompt: String,
}

#[derive(serde::Deserialize)]
struct ImageCase {
    embeddings: Vec<String>,
    prompt: String,
    negative_prompt: String,
    seed: u64,
    steps: usize,
    width: usize,
    height: usize,
}

#[derive(serde::Deserialize)]
struct Cases {
    conditioning: Vec<Case>,
    image: ImageCase,
}

fn cases() -> Cases {
    serde_json::from_str(&std::fs::read_to_string(fixture_path("textual_inversion/cases.json")).unwrap()).unwrap()
}

/// Conditioning (cond, uncond, SDXL's pooled pair) within 1e-5 of the references, for plain and A1111 syntax.
#[test]
fn conditioning_matches_diffusers_and_a1111() {
    let expected = fixture_tensors("textual_inversion/conditioning.safetensors");
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let cases = cases().conditioning;
    assert_eq!(cases.len(), 6);
    for case in &cases {
        let sd = models.entry(case.model.clone()).or_insert_with(|| model(&case.model));
        let options = PromptOptions {
            syntax: PromptSyntax::parse(&case.syntax).unwrap(),
            embeddings: embeddings(&case.embeddings),
            ..Default::default()
        };
        options.embeddings.check_fits(sd).unwrap();
        let sdxl = SdxlConditioning::default();
        let out = encode(sd, &case.prompt, &case.negative_prompt, &sdxl, (64, 64), 1, true, &options).unwrap();
        let name = &case.name;
        close(&out.cond_embeds, &expected[&format!("{name}.cond")], name);
        close(&row(&out.embeds, 0), &expected[&format!("{name}.uncond")], name);
        if let Some(pooled) = expected.get(&format!("{name}.pooled")) {
            let added = out.added.as_ref().unwrap();
            close(&row(&added.text_embeds, 1), pooled, name);
            close(&row(&added.text_embeds, 0), &expected[&format!("{name}.neg_pooled")], name);
        }
    }
}

/// diffusers' image with all three SD1.5 embeddings (a .pt, an emb_params .safetensors and a learned_embeds.bin;
/// 2, 3 and 1 vectors) in the prompts: latents, decoded tensor and PNG (>= 40 dB).
#[test]
fn image_matches_diffusers() {
    let case = cases().image;
    let sd = model("sd15");
    let params = GenerateParams {
        negative_prompt: case.negative_prompt.clone(),
        scheduler: Some("ddim".parse().unwrap()),
        prompt_options: PromptOptions { embeddings: embeddings(&case.embeddings), ..Default::default() },
        ..GenerateParams::plain(case.prompt.clone(), case.width, case.height, case.steps, 7.5, case.seed)
    };
    let out = generate(&sd, &[], &params, &mut |_, _| {}).unwrap();
    let reference = fixture_tensors("textual_inversion/image.safetensors");
    let latents = max_abs_diff(&out.latents, &reference["latents"]);
    let decoded = max_abs_diff(&out.decoded, &reference["decoded"]);
    assert!(latents < 1e-3 && decoded < 2e-3, "latents differ by {latents}, decoded by {decoded}");
    let png = image::open(fixture_path("textual_inversion/image.png")).unwrap().to_rgb8();
    let db = crate::test_support::psnr(&out.images[0], &png);
    assert!(db >= 40.0, "PSNR {db:.1} dB");
}

/// An SDXL embedding on an SD 1.x model, and an SD one on SDXL, are refused naming the file and the widths.
#[test]
fn embeddings_for_another_model_are_refused() {
    let sd15 = model("sd15");
    let err = embeddings(&["xlstyle".into()]).check_fits(&sd15).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, crate::Error::Setting { setting, .. } if setting == "embeddings"), "{msg}");
    assert!(msg.contains("xlstyle.safetensors") && msg.contains("32 + 48 (SDXL)") && msg.contains("take 32"), "{msg}");
    let sdxl = model("sdxl");
    let msg = embeddings(&["neonfox".into()]).check_fits(&sdxl).unwrap_err().to_string();
    assert!(msg.contains("neonfox.safetensors") && msg.contains("take 32 + 48 (SDXL)"), "{msg}");
}
