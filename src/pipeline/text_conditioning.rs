//! The text side of a generate run: prompt embeddings for the UNet and, for SDXL, the pooled text embedding and
//! the size/crop numbers it is also conditioned on (diffusers' `encode_prompt` and `_get_add_time_ids`).
//!
//! Two ways to read a prompt ([`PromptSyntax`]): `plain` is diffusers' (one pass of at most 75 tokens, the
//! rest cut); `a1111` is AUTOMATIC1111's (`modules/sd_hijack_clip.py`): weights and `BREAK`
//! ([`super::prompt_parser`]), any length in 75-token chunks ([`super::prompt_chunks`]) each encoded alone,
//! scaled by its tokens' weights and brought back to its original mean, the chunks side by side.
//! Clip skip picks an earlier encoder layer (A1111's numbering: 1 = the usual layer).
use candle_core::{DType, Device, Tensor};

use super::prompt_chunks::{chunks_with_embeddings, Chunk};
use super::prompt_parser::parse;
use super::sd::{SdxlParts, StableDiffusion};
use super::textual_inversion::{Embeddings, TextSide};
use crate::model::clip::ClipTextModel;
use crate::model::unet_encoder::{AddedConditions, TIME_IDS};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// SDXL's second prompts and micro-conditioning; ignored by SD 1.x/2.x models. Sizes are (width, height).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SdxlConditioning {
    /// The second text encoder's prompt (`prompt_2`); `None`: the prompt.
    pub prompt_2: Option<String>,
    /// `negative_prompt_2`; `None`: the negative prompt.
    pub negative_prompt_2: Option<String>,
    /// The size the model is told the picture had before cropping (`original_size`); `None`: the output size.
    pub original_size: Option<(usize, usize)>,
    /// The crop's top and left offset in pixels (`crops_coords_top_left`, (top, left)); (0, 0) looks centred.
    pub crop_top_left: (usize, usize),
    /// `target_size`; `None`: the output size.
    pub target_size: Option<(usize, usize)>,
}

/// How a prompt is read: `plain` (diffusers: no syntax, at most 75 tokens) or `a1111` (weights, `BREAK`, any
/// length).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    #[default]
    Plain,
    A1111,
}

impl PromptSyntax {
    pub const NAMES: &'static [&'static str] = &["plain", "a1111"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "plain" => Ok(Self::Plain),
            "a1111" => Ok(Self::A1111),
            _ => Err(Error::setting("prompt_syntax", format!("{name:?}; expected one of {}", Self::NAMES.join(", ")))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::A1111 => "a1111",
        }
    }
}

/// A1111's default clip skip: the usual layer (SD 1.x/2.x: the last; SDXL: the penultimate).
pub const DEFAULT_CLIP_SKIP: usize = 1;

/// How the prompts become text states.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptOptions {
    pub syntax: PromptSyntax,
    /// A1111's "Clip skip": 1 = the usual layer, 2 = one layer earlier, ... (diffusers' `clip_skip` is this
    /// minus 1).
    pub clip_skip: usize,
    /// Textual-inversion embeddings the prompts may name ([`super::textual_inversion`]).
    pub embeddings: Embeddings,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self { syntax: PromptSyntax::Plain, clip_skip: DEFAULT_CLIP_SKIP, embeddings: Embeddings::default() }
    }
}

/// Which of an encoder's outputs conditions the UNet before clip skip moves it earlier.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layer {
    /// SD 1.x/2.x: the last layer's output with the final layer norm; clip skip N takes `hidden_states[-N]`
    /// and applies the norm to it (A1111 and diffusers alike).
    Final,
    /// SDXL: `hidden_states[-2]` without the norm; clip skip N takes `hidden_states[-(N + 1)]` (diffusers'
    /// `clip_skip = N - 1`).
    Penultimate,
}

/// What the UNet is conditioned on, for the whole batch (unconditional rows first when guided) and for the
/// conditional rows alone (guess mode's ControlNets).
pub struct TextConditioning {
    pub embeds: Tensor,
    pub cond_embeds: Tensor,
    pub added: Option<AddedConditions>,
    pub cond_added: Option<AddedConditions>,
}

/// Encodes the prompts for `n` images, with the negative prompt's rows first when `guided`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    sd: &StableDiffusion,
    prompt: &str,
    negative_prompt: &str,
    sdxl: &SdxlConditioning,
    (width, height): (usize, usize),
    n: usize,
    guided: bool,
    options: &PromptOptions,
) -> Result<TextConditioning> {
    // The text encoders with the request's embeddings added (borrowed as they are when there are none).
    let side = TextSide::new(&sd.tokenizer, &sd.text_encoder, &options.embeddings, false)?;
    let Some(parts) = &sd.sdxl else {
        // SD 1.x/2.x: the one text encoder's states; with A1111 syntax both sides padded to as many chunks.
        let cond = encode_sd(sd, &side, prompt, "prompt", options)?;
        if !guided {
            let cond = repeat(&cond, n)?;
            return Ok(TextConditioning { embeds: cond.clone(), cond_embeds: cond, added: None, cond_added: None });
        }
        let uncond = encode_sd(sd, &side, negative_prompt, "negative_prompt", options)?;
        let (cond, uncond) = same_length(cond, uncond, || encode_sd(sd, &side, "", "negative_prompt", options))?;
        let cond = repeat(&cond, n)?;
        let embeds = Tensor::cat(&[&repeat(&uncond, n)?, &cond], 0)?;
        return Ok(TextConditioning { embeds, cond_embeds: cond, added: None, cond_added: None });
    };
    // SDXL: 1. both encoders' penultimate states side by side, and the second's pooled projection.
    let prompt_2 = sdxl.prompt_2.as_deref().unwrap_or(prompt);
    let side_2 = TextSide::new(&parts.tokenizer_2, &parts.text_encoder_2, &options.embeddings, true)?;
    let sides = (&side, &side_2);
    let (context, pooled) = encode_sdxl(sd, parts, sides, prompt, prompt_2, "prompt", options)?;
    // 2. the size/crop numbers: original (h, w), crop (top, left), target (h, w).
    let (ow, oh) = sdxl.original_size.unwrap_or((width, height));
    let (tw, th) = sdxl.target_size.unwrap_or((width, height));
    let (top, left) = sdxl.crop_top_left;
    let ids: [f32; TIME_IDS] = [oh, ow, top, left, th, tw].map(|v| v as f32);
    let time_ids = Tensor::from_slice(&ids, (1, TIME_IDS), sd.unet.device())?;
    let cond_added = AddedConditions { text_embeds: repeat(&pooled, n)?, time_ids: repeat(&time_ids, n)? };
    if !guided {
        let cond_embeds = repeat(&context, n)?;
        return Ok(TextConditioning {
            embeds: cond_embeds.clone(),
            cond_embeds,
            added: Some(cond_added.clone()),
            cond_added: Some(cond_added),
        });
    }
    // 3. the negative side: zeros for an empty negative prompt where the model says so (A1111: one chunk of
    //    zeros, padded below like any short side), else its encoding.
    let (neg_context, neg_pooled) = if negative_prompt.is_empty() && parts.force_zeros_for_empty_prompt {
        let zeros = match options.syntax {
            PromptSyntax::Plain => context.zeros_like()?,
            PromptSyntax::A1111 => context.narrow(1, 0, sd.tokenizer.max_length())?.zeros_like()?,
        };
        (zeros, pooled.zeros_like()?)
    } else {
        let negative_2 = sdxl.negative_prompt_2.as_deref().unwrap_or(negative_prompt);
        encode_sdxl(sd, parts, sides, negative_prompt, negative_2, "negative_prompt", options)?
    };
    let (context, neg_context) =
        same_length(context, neg_context, || Ok(encode_sdxl(sd, parts, sides, "", "", "negative_prompt", options)?.0))?;
    let cond_embeds = repeat(&context, n)?;
    let embeds = Tensor::cat(&[&repeat(&neg_context, n)?, &cond_embeds], 0)?;
    let added = AddedConditions {
        text_embeds: Tensor::cat(&[&repeat(&neg_pooled, n)?, &cond_added.text_embeds], 0)?,
        time_ids: repeat(&time_ids, 2 * n)?,
    };
    Ok(TextConditioning { embeds, cond_embeds, added: Some(added), cond_added: Some(cond_added) })
}

/// SD 1.x/2.x: (1, tokens, width), 77 tokens per chunk.
fn encode_sd(
    sd: &StableDiffusion,
    side: &TextSide,
    prompt: &str,
    setting: &str,
    options: &PromptOptions,
) -> Result<Tensor> {
    check_clip_skip(&sd.text_encoder, options.clip_skip)?;
    let device = sd.unet.device();
    match options.syntax {
        PromptSyntax::Plain => {
            let ids = plain_ids(side, prompt, device)?;
            Ok(states(&side.encoder, &ids, Layer::Final, options.clip_skip)?.0)
        }
        PromptSyntax::A1111 => {
            let chunks = a1111_chunks(&sd.tokenizer, side, prompt, setting)?;
            Ok(encode_chunks(&side.encoder, &chunks, Layer::Final, options.clip_skip, device)?.0)
        }
    }
}

/// Plain syntax: diffusers' multi-vector expansion, then the tokenizer (with the embeddings' tokens).
fn plain_ids(side: &TextSide, prompt: &str, device: &Device) -> Result<Tensor> {
    token_ids(&side.tokenizer, &side.expand_multi_vector(prompt), device)
}

/// A1111 syntax: the prompt parsed and chunked by the model's own tokenizer, embeddings found by their names'
/// tokens.
fn a1111_chunks(base: &ClipTokenizer, side: &TextSide, prompt: &str, setting: &str) -> Result<Vec<Chunk>> {
    Ok(chunks_with_embeddings(base, &parse(prompt, setting)?, &side.names_as_tokens(base)))
}

/// SDXL: (context (1, tokens, width 1 + width 2), pooled (1, projection width)).
fn encode_sdxl(
    sd: &StableDiffusion,
    parts: &SdxlParts,
    (side, side_2): (&TextSide, &TextSide),
    prompt: &str,
    prompt_2: &str,
    setting: &str,
    options: &PromptOptions,
) -> Result<(Tensor, Tensor)> {
    check_clip_skip(&sd.text_encoder, options.clip_skip)?;
    check_clip_skip(&parts.text_encoder_2, options.clip_skip)?;
    let device = sd.unet.device();
    let skip = options.clip_skip;
    let (first, (second, pooled)) = match options.syntax {
        PromptSyntax::Plain => {
            let first = states(&side.encoder, &plain_ids(side, prompt, device)?, Layer::Penultimate, skip)?;
            let ids_2 = plain_ids(side_2, prompt_2, device)?;
            (first.0, states(&side_2.encoder, &ids_2, Layer::Penultimate, skip)?)
        }
        PromptSyntax::A1111 => {
            // Each encoder chunks its own prompt; the pooled embedding is the second's of the first chunk.
            let chunks_1 = a1111_chunks(&sd.tokenizer, side, prompt, setting)?;
            let setting_2 = if setting == "prompt" { "sdxl.prompt_2" } else { "sdxl.negative_prompt_2" };
            let chunks_2 = a1111_chunks(&parts.tokenizer_2, side_2, prompt_2, setting_2)?;
            if chunks_1.len() != chunks_2.len() {
                return Err(Error::setting(
                    setting_2,
                    format!(
                        "with A1111 prompt syntax it must make as many 75-token chunks as {setting} ({} vs {}); \
                         add or remove a BREAK",
                        chunks_2.len(),
                        chunks_1.len()
                    ),
                ));
            }
            let first = encode_chunks(&side.encoder, &chunks_1, Layer::Penultimate, skip, device)?.0;
            (first, encode_chunks(&side_2.encoder, &chunks_2, Layer::Penultimate, skip, device)?)
        }
    };
    let pooled = pooled.ok_or_else(|| Error::Invalid("SDXL's second text encoder has no text_projection".into()))?;
    let context = Tensor::cat(&[&first, &second.to_dtype(first.dtype())?], 2)?;
    Ok((context, pooled))
}

/// Clip skip N needs an encoder of at least N layers.
fn check_clip_skip(encoder: &ClipTextModel, clip_skip: usize) -> Result<()> {
    let layers = encoder.config().num_hidden_layers;
    if clip_skip == 0 || clip_skip > layers {
        return Err(Error::setting(
            "clip_skip",
            format!("{clip_skip}: the text encoder has {layers} layers, so 1 (the usual layer) to {layers}"),
        ));
    }
    Ok(())
}

/// One pass of `encoder` over `ids` (1, 77): the conditioning layer moved `clip_skip - 1` layers earlier, and
/// the pooled projection (always of the full model, as diffusers and A1111 take it).
fn states(encoder: &ClipTextModel, ids: &Tensor, layer: Layer, clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
    let out = encoder.encode(ids)?;
    let last = out.hidden_states.len() - 1;
    let z = match layer {
        Layer::Final if clip_skip == DEFAULT_CLIP_SKIP => out.last_hidden_state,
        Layer::Final => encoder.final_layer_norm(&out.hidden_states[last + 1 - clip_skip])?,
        Layer::Penultimate => out.hidden_states[last - clip_skip].clone(),
    };
    Ok((z, out.text_embeds))
}

/// A1111's chunked encoding: each chunk alone, its states scaled by the token weights and rescaled to the
/// chunk's original mean ("Original" emphasis), the chunks side by side; pooled from the first chunk.
fn encode_chunks(
    encoder: &ClipTextModel,
    chunks: &[Chunk],
    layer: Layer,
    clip_skip: usize,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut states_per_chunk = Vec::with_capacity(chunks.len());
    let mut pooled = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let len = chunk.ids.len();
        let ids = Tensor::from_slice(&chunk.ids, (1, len), device)?;
        let (z, projected) = states(encoder, &ids, layer, clip_skip)?;
        if i == 0 {
            pooled = projected;
        }
        // Emphasis: z * weights, then * (mean before / mean after), so weights shift the tokens' balance
        // without changing the chunk's overall scale.
        let weights = Tensor::from_slice(&chunk.weights, (1, len, 1), device)?.to_dtype(z.dtype())?;
        let weighted = z.broadcast_mul(&weights)?;
        let ratio = mean(&z)? / mean(&weighted)?;
        states_per_chunk.push(weighted.affine(f64::from(ratio), 0.0)?);
    }
    Ok((Tensor::cat(&states_per_chunk, 1)?, pooled))
}

fn mean(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?)
}

/// A1111's `pad_cond_uncond`: the side with fewer chunks gets the empty prompt's chunk appended until both
/// have as many (cross-attention over the batch needs one length). Plain prompts always match.
fn same_length(cond: Tensor, uncond: Tensor, empty: impl FnOnce() -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
    let (a, b) = (cond.dim(1)?, uncond.dim(1)?);
    if a == b {
        return Ok((cond, uncond));
    }
    let empty = empty()?;
    let pad = |t: Tensor, missing: usize| -> Result<Tensor> {
        let repeats = missing / empty.dim(1)?;
        let mut parts = vec![t];
        parts.extend(std::iter::repeat_n(empty.clone(), repeats));
        Ok(Tensor::cat(&parts, 1)?)
    };
    if a > b {
        Ok((cond, pad(uncond, a - b)?))
    } else {
        Ok((pad(cond, b - a)?, uncond))
    }
}

fn token_ids(tokenizer: &ClipTokenizer, prompt: &str, device: &Device) -> Result<Tensor> {
    let ids = tokenizer.encode(prompt)?;
    let len = ids.len();
    Ok(Tensor::from_vec(ids, (1, len), device)?)
}

/// `t` (1, ...) repeated to `n` rows.
fn repeat(t: &Tensor, n: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    dims[0] = n;
    Ok(t.broadcast_as(dims)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fixture_path, fixture_tensors, max_abs, max_abs_diff};

    fn model(name: &str) -> StableDiffusion {
        let dir = match name {
            "sd15" => "models/tiny-sd15",
            "sd2" => "models/tiny-sd2",
            _ => "models/tiny-sdxl",
        };
        StableDiffusion::load(&fixture_path(dir), DType::F32, &Device::Cpu).unwrap()
    }

    fn close(actual: &Tensor, expected: &Tensor, what: &str) {
        assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
        let diff = max_abs_diff(actual, expected);
        assert!(diff <= 1e-5 * max_abs(expected).max(1.0), "{what}: max abs diff {diff:e}");
    }

    /// A1111 syntax against the fixture generator's re-implementation of A1111's parser, chunking and emphasis
    /// (tools/fixtures/gen_prompt_syntax.py): weights, nesting, escapes, a >77-token prompt, BREAK, cond/uncond
    /// padded to the same chunks, clip skip, SD1, SD2 and SDXL (both encoders and the pooled embedding).
    #[test]
    fn a1111_conditioning_matches_reference() {
        let expected = fixture_tensors("prompt_syntax/conditioning.safetensors");
        let text = std::fs::read_to_string(fixture_path("prompt_syntax/cases.json")).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let mut models = std::collections::HashMap::new();
        let mut checked = 0;
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let kind = case["model"].as_str().unwrap();
            let sd = models.entry(kind.to_string()).or_insert_with(|| model(kind));
            let plain = case["plain"].as_bool().unwrap_or(false);
            let options = PromptOptions {
                syntax: if plain { PromptSyntax::Plain } else { PromptSyntax::A1111 },
                clip_skip: case["clip_skip"].as_u64().unwrap() as usize,
                ..Default::default()
            };
            let prompt = case["prompt"].as_str().unwrap();
            let negative = case["negative_prompt"].as_str().unwrap_or("");
            let sdxl = SdxlConditioning::default();
            let guided = !plain;
            let out = encode(sd, prompt, negative, &sdxl, (64, 64), 1, guided, &options).unwrap();
            close(&out.cond_embeds, &expected[&format!("{name}.cond")], name);
            if guided {
                close(&out.embeds.get(0).unwrap().unsqueeze(0).unwrap(), &expected[&format!("{name}.uncond")], name);
            }
            if let Some(pooled) = expected.get(&format!("{name}.pooled")) {
                let added = out.added.as_ref().unwrap();
                close(&added.text_embeds.get(1).unwrap().unsqueeze(0).unwrap(), pooled, name);
                let neg = &expected[&format!("{name}.neg_pooled")];
                close(&added.text_embeds.get(0).unwrap().unsqueeze(0).unwrap(), neg, name);
            }
            checked += 1;
        }
        assert_eq!(checked, 8);
    }

    #[test]
    fn clip_skip_out_of_range_names_the_setting() {
        let sd = model("sd15");
        let options = PromptOptions { syntax: PromptSyntax::Plain, clip_skip: 5, ..Default::default() };
        let err = encode(&sd, "a", "", &SdxlConditioning::default(), (64, 64), 1, false, &options).err().unwrap();
        assert!(matches!(&err, Error::Setting { setting, .. } if setting == "clip_skip"), "{err}");
        assert!(err.to_string().contains("2 layers"), "{err}");
    }

    /// Plain syntax is unchanged: no chunks, the long prompt cut at 77 tokens.
    #[test]
    fn plain_syntax_reads_one_chunk() {
        let sd = model("sd15");
        let long = ["cat"; 100].join(" ");
        let out =
            encode(&sd, &long, "", &SdxlConditioning::default(), (64, 64), 2, true, &PromptOptions::default()).unwrap();
        assert_eq!(out.embeds.dims(), &[4, 77, 32]);
    }
}
