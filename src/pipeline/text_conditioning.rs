//! The text side of a generate run: prompt embeddings for the UNet and, for SDXL, the pooled text embedding and
//! the size/crop numbers it is also conditioned on (diffusers' `encode_prompt` and `_get_add_time_ids`).
use candle_core::Tensor;

use super::sd::{SdxlParts, StableDiffusion};
use crate::model::unet_encoder::{AddedConditions, TIME_IDS};
use crate::Result;

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
) -> Result<TextConditioning> {
    let Some(parts) = &sd.sdxl else {
        // SD 1.x/2.x: the final states of the one text encoder.
        let cond = repeat(&encode_sd(sd, prompt)?, n)?;
        let embeds = if guided {
            Tensor::cat(&[&repeat(&encode_sd(sd, negative_prompt)?, n)?, &cond], 0)?
        } else {
            cond.clone()
        };
        return Ok(TextConditioning { embeds, cond_embeds: cond, added: None, cond_added: None });
    };
    // SDXL: 1. both encoders' penultimate states side by side, and the second's pooled projection.
    let (context, pooled) = encode_sdxl(sd, parts, prompt, sdxl.prompt_2.as_deref().unwrap_or(prompt))?;
    // 2. the size/crop numbers: original (h, w), crop (top, left), target (h, w).
    let (ow, oh) = sdxl.original_size.unwrap_or((width, height));
    let (tw, th) = sdxl.target_size.unwrap_or((width, height));
    let (top, left) = sdxl.crop_top_left;
    let ids: [f32; TIME_IDS] = [oh, ow, top, left, th, tw].map(|v| v as f32);
    let time_ids = Tensor::from_slice(&ids, (1, TIME_IDS), sd.unet.device())?;
    let cond_added = AddedConditions { text_embeds: repeat(&pooled, n)?, time_ids: repeat(&time_ids, n)? };
    let cond_embeds = repeat(&context, n)?;
    if !guided {
        return Ok(TextConditioning {
            embeds: cond_embeds.clone(),
            cond_embeds,
            added: Some(cond_added.clone()),
            cond_added: Some(cond_added),
        });
    }
    // 3. the negative side: zeros for an empty negative prompt where the model says so, else its encoding.
    let (neg_context, neg_pooled) = if negative_prompt.is_empty() && parts.force_zeros_for_empty_prompt {
        (context.zeros_like()?, pooled.zeros_like()?)
    } else {
        encode_sdxl(sd, parts, negative_prompt, sdxl.negative_prompt_2.as_deref().unwrap_or(negative_prompt))?
    };
    let embeds = Tensor::cat(&[&repeat(&neg_context, n)?, &cond_embeds], 0)?;
    let added = AddedConditions {
        text_embeds: Tensor::cat(&[&repeat(&neg_pooled, n)?, &cond_added.text_embeds], 0)?,
        time_ids: repeat(&time_ids, 2 * n)?,
    };
    Ok(TextConditioning { embeds, cond_embeds, added: Some(added), cond_added: Some(cond_added) })
}

/// SD 1.x/2.x: `last_hidden_state` of the padded prompt, (1, tokens, width).
fn encode_sd(sd: &StableDiffusion, prompt: &str) -> Result<Tensor> {
    let ids = token_ids(&sd.tokenizer, prompt, sd)?;
    Ok(sd.text_encoder.forward(&ids)?)
}

/// SDXL: (context (1, tokens, width 1 + width 2), pooled (1, projection width)).
fn encode_sdxl(sd: &StableDiffusion, parts: &SdxlParts, prompt: &str, prompt_2: &str) -> Result<(Tensor, Tensor)> {
    let first = sd.text_encoder.encode(&token_ids(&sd.tokenizer, prompt, sd)?)?;
    let second = parts.text_encoder_2.encode(&token_ids(&parts.tokenizer_2, prompt_2, sd)?)?;
    let pooled = second
        .text_embeds
        .ok_or_else(|| crate::Error::Invalid("SDXL's second text encoder has no text_projection".into()))?;
    let context = Tensor::cat(&[&first.penultimate, &second.penultimate.to_dtype(first.penultimate.dtype())?], 2)?;
    Ok((context, pooled))
}

fn token_ids(tokenizer: &crate::tokenizer::ClipTokenizer, prompt: &str, sd: &StableDiffusion) -> Result<Tensor> {
    let ids = tokenizer.encode(prompt)?;
    let len = ids.len();
    Ok(Tensor::from_vec(ids, (1, len), sd.unet.device())?)
}

/// `t` (1, ...) repeated to `n` rows.
fn repeat(t: &Tensor, n: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    dims[0] = n;
    Ok(t.broadcast_as(dims)?.contiguous()?)
}
