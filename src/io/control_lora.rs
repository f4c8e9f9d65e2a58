//! Stability's control-LoRAs (`control-lora-{canny,depth,recolor,sketch}-rank{128,256}.safetensors`): a ControlNet
//! stored as low-rank changes to the base UNet's encoder, plus in full what the UNet lacks.
//!
//! Key layout (the one place it is written down; Stability's `ControlLoraSave` writes it, ComfyUI's `ControlLora`
//! reads it). LDM names without a prefix, as a ControlNet's own (`input_blocks.*`, `middle_block.*`,
//! `time_embed.*`, `label_emb.*`, `input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`):
//! - `<module>.up` [out, rank(, 1, 1)] and `<module>.down` [rank, in(, kh, kw)] for a base-UNet weight of two or
//!   more dimensions: the ControlNet's `<module>.weight` = base + up.flatten(1) @ down.flatten(1), reshaped
//!   (no alpha, no scale);
//! - `<name>` in full: the base's 1-D tensors (biases, norms) and everything the UNet has not (hint encoder,
//!   zero convolutions, mid-block output); a full tensor replaces the base's;
//! - `lora_controlnet`: the marker (an empty tensor) that tells the file apart;
//! - a base encoder tensor the file does not name keeps the base's value (ComfyUI copies the base UNet first).
//!
//! The architecture is the base UNet's encoder (ComfyUI builds the ControlNet from the base model's UNet config),
//! so [`build`] needs the loaded base UNet's tensors; the hint encoder's widths come from the file.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::checkpoint::{Checkpoint, TensorInfo, TensorMap};
use super::keymap::{unet_to_diffusers, UnetLayout};
use crate::{Error, Result};

/// The marker tensor a control-LoRA carries (ComfyUI picks its `ControlLora` by it).
pub const CONTROL_LORA_MARKER: &str = "lora_controlnet";

/// Diffusers names of the base UNet's tensors a ControlNet shares (its encoder half).
pub const ENCODER_PREFIXES: [&str; 5] = ["conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block."];

/// What one stored tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// `<module>.up`: the left factor of a low-rank change.
    Up,
    /// `<module>.down`: the right factor.
    Down,
    /// A tensor in full.
    Full,
    /// The `lora_controlnet` marker.
    Marker,
}

/// A stored name → (what it is, the LDM weight name it concerns).
pub fn split_name(name: &str) -> (Stored, String) {
    if name == CONTROL_LORA_MARKER {
        return (Stored::Marker, String::new());
    }
    if let Some(m) = name.strip_suffix(".up") {
        return (Stored::Up, format!("{m}.weight"));
    }
    if let Some(m) = name.strip_suffix(".down") {
        return (Stored::Down, format!("{m}.weight"));
    }
    (Stored::Full, name.to_string())
}

/// Whether these tensors are a control-LoRA's.
pub fn is_control_lora(tensors: &[TensorInfo]) -> bool {
    tensors.iter().any(|t| t.name == CONTROL_LORA_MARKER)
}

/// The block layout of a control-LoRA's LDM names (`.up`/`.down` read as the weights they change).
pub fn layout(tensors: &[TensorInfo]) -> Option<UnetLayout> {
    let names: Vec<String> = tensors.iter().map(|t| split_name(&t.name).1).filter(|n| !n.is_empty()).collect();
    UnetLayout::from_original(names.iter().map(String::as_str))
}

/// The diffusers name of a stored tensor's weight (`None`: a name no map knows; the marker has none either).
pub fn diffusers_name(name: &str, l: &UnetLayout) -> Option<(Stored, String)> {
    let (kind, ldm) = split_name(name);
    match kind {
        Stored::Marker => None,
        _ => unet_to_diffusers(&ldm, l).map(|d| (kind, d)),
    }
}

/// What `inspect` says about a control-LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The largest rank of its low-rank pairs (a pair's rank is at most its weight's smaller side).
    pub rank: usize,
    /// The cross-attention width its attention changes imply (2048: SDXL).
    pub cross_attention_dim: Option<usize>,
    /// Whether it carries SDXL's size/crop embedding (`label_emb`).
    pub sdxl: bool,
}

pub fn summary(tensors: &[TensorInfo]) -> Summary {
    let rank = tensors.iter().filter(|t| t.name.ends_with(".down")).filter_map(|t| t.shape.first()).max();
    let cross_attention_dim = tensors
        .iter()
        .find(|t| t.name.ends_with("attn2.to_k.down") || t.name.ends_with("attn2.to_k.weight"))
        .and_then(|t| t.shape.get(1).copied());
    Summary {
        rank: rank.copied().unwrap_or(0),
        cross_attention_dim,
        sdxl: tensors.iter().any(|t| t.name.starts_with("label_emb.")),
    }
}

/// A control-LoRA made whole: diffusers-named ControlNet tensors (f32) and the hint encoder's sizes.
pub struct ControlLoraNet {
    pub tensors: TensorMap,
    /// Channels of the condition image (`input_hint_block.0`'s input).
    pub conditioning_channels: usize,
    /// The hint encoder's widths (diffusers' `conditioning_embedding_out_channels`).
    pub hint_channels: Vec<usize>,
}

/// Builds the ControlNet a control-LoRA file stands for on `base`, the base UNet's tensors (diffusers names, as
/// loaded: LoRAs merged). Errors name the file and the tensor.
pub fn build(path: &Path, base: &TensorMap) -> Result<ControlLoraNet> {
    let ck = Checkpoint::open(path)?;
    if !is_control_lora(&ck.tensors) {
        return Err(Error::weights(path, format!("not a control-LoRA: no {CONTROL_LORA_MARKER} marker")));
    }
    let l = layout(&ck.tensors)
        .ok_or_else(|| Error::weights(path, "no input_blocks: cannot read the control-LoRA's block layout"))?;

    // 1. Sort the stored tensors by the diffusers weight they concern.
    let mut full = TensorMap::new();
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut unknown = Vec::new();
    for t in &ck.tensors {
        if t.name == CONTROL_LORA_MARKER {
            continue;
        }
        let Some((kind, name)) = diffusers_name(&t.name, &l) else {
            unknown.push(t.name.clone());
            continue;
        };
        let x = ck.load(&t.name)?.to_dtype(DType::F32)?;
        match kind {
            Stored::Up => pairs.entry(name).or_default().0 = Some(x),
            Stored::Down => pairs.entry(name).or_default().1 = Some(x),
            _ => {
                full.insert(name, x);
            }
        }
    }
    if !unknown.is_empty() {
        let n = unknown.len();
        unknown.truncate(5);
        return Err(Error::weights(
            path,
            format!("{n} unrecognised control-LoRA tensors, e.g. {}", unknown.join(", ")),
        ));
    }

    // 2. The base UNet's encoder, as ComfyUI starts from it.
    let mut out: TensorMap = base
        .iter()
        .filter(|(k, _)| ENCODER_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    if out.is_empty() {
        return Err(Error::weights(path, "the base UNet has no encoder tensors to apply the control-LoRA to"));
    }

    // 3. Low-rank changes: base + up @ down.
    for (name, pair) in pairs {
        let (Some(up), Some(down)) = pair else {
            return Err(Error::weights(path, format!("{name}: the control-LoRA has only one of its up/down factors")));
        };
        let Some(b) = out.get(&name) else {
            return Err(Error::weights(
                path,
                format!("the control-LoRA changes {name}, which the base UNet does not have: it was made for another base model"),
            ));
        };
        let delta = up.flatten_from(1)?.matmul(&down.flatten_from(1)?)?;
        if delta.elem_count() != b.elem_count() {
            return Err(Error::weights(
                path,
                format!(
                    "{name}: the control-LoRA's change is {:?} but the base UNet's weight is {:?}: it was made for \
                     another base model",
                    delta.dims(),
                    b.dims()
                ),
            ));
        }
        let w = (b + delta.reshape(b.shape())?)?;
        out.insert(name, w);
    }

    // 4. Full tensors replace the base's (same shape) or add what the UNet lacks.
    for (name, x) in full {
        if let Some(b) = out.get(&name) {
            if b.dims() != x.dims() {
                return Err(Error::weights(
                    path,
                    format!(
                        "{name} is {:?} in the control-LoRA but {:?} in the base UNet: it was made for another base \
                         model",
                        x.dims(),
                        b.dims()
                    ),
                ));
            }
        }
        out.insert(name, x);
    }

    // 5. The hint encoder's sizes: conv_in, then every second block widens.
    let dim = |name: &str, i: usize| out.get(name).and_then(|t| t.dims().get(i).copied());
    let conv_in = "controlnet_cond_embedding.conv_in.weight";
    let conditioning_channels = dim(conv_in, 1)
        .ok_or_else(|| Error::weights(path, "no input_hint_block.0.weight: not a complete control-LoRA"))?;
    let mut hint_channels: Vec<usize> = dim(conv_in, 0).into_iter().collect();
    let blocks = out.keys().filter(|k| k.starts_with("controlnet_cond_embedding.blocks.")).count() / 2;
    hint_channels
        .extend((1..blocks).step_by(2).filter_map(|i| dim(&format!("controlnet_cond_embedding.blocks.{i}.weight"), 0)));
    Ok(ControlLoraNet { tensors: out, conditioning_channels, hint_channels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fixtures, max_abs_diff};
    use candle_core::Device;

    fn lora_file() -> std::path::PathBuf {
        fixtures().join("control_lora/tiny-control-lora-sdxl.safetensors")
    }

    fn base() -> TensorMap {
        let unet = fixtures().join("models/tiny-sdxl/unet/diffusion_pytorch_model.safetensors");
        candle_core::safetensors::load(unet, &Device::Cpu).unwrap()
    }

    /// base + up @ down for changed weights, the file's tensor for full ones, the base's for names it leaves out.
    #[test]
    fn weights_are_base_plus_low_rank_or_full_or_base() {
        let base = base();
        let net = build(&lora_file(), &base).unwrap();
        let stored = candle_core::safetensors::load(lora_file(), &Device::Cpu).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // One resnet per level: input_blocks 1 (level 0), 2 (its downsampler), 3 (level 1, with attention).
        let name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
        let ldm = "input_blocks.3.1.transformer_blocks.0.attn2.to_k";
        let (up, down) = (f32(&stored[&format!("{ldm}.up")]), f32(&stored[&format!("{ldm}.down")]));
        let expected = (f32(&base[name]) + up.matmul(&down).unwrap()).unwrap();
        assert!(max_abs_diff(&net.tensors[name], &expected) < 1e-6);
        assert!(max_abs_diff(&net.tensors[name], &f32(&base[name])) > 1e-3, "the change is not trivial");
        let full = "down_blocks.0.resnets.0.norm1.weight";
        assert_eq!(max_abs_diff(&net.tensors[full], &f32(&stored["input_blocks.1.0.in_layers.0.weight"])), 0.0);
        let kept = "time_embedding.linear_1.bias";
        assert_eq!(max_abs_diff(&net.tensors[kept], &f32(&base[kept])), 0.0);
        assert!(net.tensors.contains_key("controlnet_mid_block.weight"));
        assert!(!net.tensors.keys().any(|k| k.starts_with("up_blocks.")), "only the encoder is taken");
        assert_eq!((net.conditioning_channels, net.hint_channels.as_slice()), (3, &[16, 32, 96, 256][..]));
    }

    /// A base without SDXL's size embedding, or with other shapes, is named as the wrong base.
    #[test]
    fn another_base_is_refused_naming_the_tensor() {
        let mut base = base();
        base.retain(|k, _| !k.starts_with("add_embedding."));
        let err = build(&lora_file(), &base).err().unwrap().to_string();
        assert!(err.contains("add_embedding.linear_1") && err.contains("another base model"), "{err}");

        let mut base = self::base();
        let name = "down_blocks.0.resnets.0.conv1.weight";
        base.insert(name.into(), Tensor::zeros((16, 32, 3, 3), DType::F32, &Device::Cpu).unwrap());
        let err = build(&lora_file(), &base).err().unwrap().to_string();
        assert!(err.contains(name) && err.contains("another base model"), "{err}");

        let not_lora = fixtures().join("models/tiny-sdxl/unet/diffusion_pytorch_model.safetensors");
        let err = build(&not_lora, &self::base()).err().unwrap().to_string();
        assert!(err.contains("not a control-LoRA"), "{err}");
    }
}
