//! What a weights file is, from its tensor names and shapes alone (headers only, nothing is loaded).
//!
//! Kind: ControlNet (`input_hint_block` / `controlnet_cond_embedding`), UNet (`input_blocks` + `output_blocks` /
//! `down_blocks` + `up_blocks`), VAE, text encoder, or a whole SD single-file checkpoint
//! (`model.diffusion_model.` + `first_stage_model.`). Base: the cross-attention width (768 → SD1.5,
//! 1024 → SD2.x, 2048 or an `add_embedding`/`label_emb` → SDXL). Details: hint channels, conv vs linear
//! `proj_in` (SD2.x ControlNets are linear), ControlNet version and shuffle's global pooling (file name only),
//! fp16, EMA.
use std::collections::BTreeSet;

use serde::Serialize;

use super::base::{base_for_width, Base};
use super::checkpoint::TensorInfo;
use super::control_lora;
use super::keymap::{self, OpenClipTarget, UnetLayout};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    #[serde(rename = "controlnet")]
    ControlNet,
    Unet,
    Vae,
    TextEncoder,
    SdCheckpoint,
    Pipeline,
    Unknown,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::ControlNet => "ControlNet",
            ModelKind::Unet => "UNet",
            ModelKind::Vae => "VAE",
            ModelKind::TextEncoder => "text encoder",
            ModelKind::SdCheckpoint => "Stable Diffusion single-file checkpoint",
            ModelKind::Pipeline => "Stable Diffusion pipeline folder",
            ModelKind::Unknown => "unknown",
        })
    }
}

/// Weight naming: diffusers/transformers, or the original research code's (LDM, lllyasviel, OpenCLIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Diffusers,
    Original,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Diffusers => "diffusers",
            Format::Original => "original",
        })
    }
}

/// The transformer blocks' input/output projections: 1x1 convs (SD1.x) or linear layers (SD2.x, SDXL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    Conv,
    Linear,
}

/// Key prefixes of the components inside an original single-file SD checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
pub const CONTROL_PREFIX: &str = "control_model.";
/// SDXL single files: CLIP ViT-L (transformers names) and OpenCLIP bigG (OpenCLIP names), sgm's conditioner.
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// LDM's DDPM wrapper stores its noise schedule; diffusers' scheduler recomputes it.
const DDPM_BUFFERS: [&str; 13] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
];

pub use super::control_lora::CONTROL_LORA_MARKER;
/// Top-level tensors only diffusers' `ControlNetUnionModel` has (xinsir's union nets).
pub const UNION_PARTS: [&str; 4] =
    ["task_embedding", "control_add_embedding.", "spatial_ch_projs.", "transformer_layes."];

/// A ControlNet kind that is recognised but cannot be loaded yet: what it is, for messages.
pub fn unsupported_controlnet(tensors: &[TensorInfo]) -> Option<&'static str> {
    if tensors.iter().any(|t| t.name == CONTROL_LORA_MARKER) {
        Some(
            "a control-LoRA (low-rank changes to a base UNet's encoder, as Stability's control-lora-*.safetensors): \
             it is loaded on the base model's UNet, by generate with an SDXL --model",
        )
    } else {
        None
    }
}

/// Whether these are a union net's tensors (diffusers' `ControlNetUnionModel`, xinsir's union nets).
pub fn is_union_net(tensors: &[TensorInfo]) -> bool {
    UNION_PARTS.iter().any(|p| has_prefix(tensors, p))
}

/// What a file is, and what was learned from its weights.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub kind: ModelKind,
    pub base: Base,
    pub format: Format,
    /// The prefix of the component's keys in the file (`control_model.`, `model.diffusion_model.`, or empty).
    pub prefix: String,
    /// A phrase for messages: "an SD1.5 UNet (original names)".
    pub description: String,
    pub cross_attention_dim: Option<usize>,
    pub conditioning_channels: Option<usize>,
    /// ControlNet hint encoder widths (diffusers' `conditioning_embedding_out_channels`).
    pub hint_channels: Vec<usize>,
    pub projection: Option<Projection>,
    /// ControlNet release, when the file name tells it ("1.0", "1.1").
    pub version: Option<String>,
    /// ControlNet 1.1 shuffle pools its output globally; only its file name says so.
    pub global_pool_conditions: bool,
    pub notes: Vec<String>,
}

fn has_prefix(t: &[TensorInfo], p: &str) -> bool {
    t.iter().any(|x| x.name.starts_with(p))
}

fn has_part(t: &[TensorInfo], p: &str) -> bool {
    t.iter().any(|x| x.name.contains(p))
}

/// Reads a file's identity from its tensor headers; `file_name` only adds what weights cannot say.
pub fn detect(tensors: &[TensorInfo], file_name: &str) -> Detection {
    use ModelKind::*;
    let (kind, format, prefix) = if has_part(tensors, "input_hint_block.") {
        let p = if has_prefix(tensors, CONTROL_PREFIX) { CONTROL_PREFIX } else { "" };
        (ControlNet, Format::Original, p)
    } else if has_prefix(tensors, "controlnet_cond_embedding.") {
        (ControlNet, Format::Diffusers, "")
    } else if has_prefix(tensors, UNET_PREFIX) {
        let full = has_prefix(tensors, VAE_PREFIX) || has_prefix(tensors, "cond_stage_model.");
        if full || has_prefix(tensors, "conditioner.") {
            (SdCheckpoint, Format::Original, "")
        } else {
            (Unet, Format::Original, UNET_PREFIX)
        }
    } else if has_prefix(tensors, "input_blocks.") && has_prefix(tensors, "output_blocks.") {
        (Unet, Format::Original, "")
    } else if has_prefix(tensors, "down_blocks.")
        && has_prefix(tensors, "up_blocks.")
        && has_prefix(tensors, "conv_in.")
    {
        (Unet, Format::Diffusers, "")
    } else if has_prefix(tensors, "encoder.down_blocks.") && has_prefix(tensors, "decoder.up_blocks.") {
        (Vae, Format::Diffusers, "")
    } else if has_part(tensors, "encoder.down.") && has_part(tensors, "decoder.up.") {
        (Vae, Format::Original, if has_prefix(tensors, VAE_PREFIX) { VAE_PREFIX } else { "" })
    } else if has_part(tensors, "embeddings.token_embedding.weight") && !has_prefix(tensors, "cond_stage_model.") {
        (TextEncoder, Format::Diffusers, "")
    } else if has_prefix(tensors, CLIP_PREFIX) || has_prefix(tensors, OPEN_CLIP_PREFIX) {
        (TextEncoder, Format::Original, "")
    } else {
        (Unknown, Format::Original, "")
    };

    // Base: the cross-attention width; SDXL also by its size/crop embedding or its two text encoders.
    let width = tensors.iter().find(|t| t.name.ends_with("attn2.to_k.weight")).and_then(|t| t.shape.get(1).copied());
    let sdxl = has_part(tensors, "add_embedding.linear_1")
        || has_part(tensors, "label_emb.0.0")
        || has_prefix(tensors, "conditioner.");
    let text_width =
        tensors.iter().find(|t| t.name.ends_with("token_embedding.weight")).and_then(|t| t.shape.get(1).copied());
    let base = if sdxl {
        Base::Sdxl
    } else if let Some(w) = width.or(text_width) {
        base_for_width(w)
    } else {
        Base::Unknown
    };

    // A control-LoRA stores `proj_in.down` ([rank, in] for a linear projection) in place of the weight.
    let proj =
        tensors.iter().find(|t| t.name.ends_with("proj_in.weight") || t.name.ends_with("proj_in.down")).map(|t| {
            if t.shape.len() == 2 {
                Projection::Linear
            } else {
                Projection::Conv
            }
        });

    let mut d = Detection {
        kind,
        base,
        format,
        prefix: prefix.to_string(),
        description: String::new(),
        cross_attention_dim: width,
        conditioning_channels: None,
        hint_channels: Vec::new(),
        projection: proj,
        version: None,
        global_pool_conditions: false,
        notes: Vec::new(),
    };
    if kind == ControlNet {
        controlnet_details(tensors, file_name, &mut d);
        if control_lora::is_control_lora(tensors) {
            let s = control_lora::summary(tensors);
            d.cross_attention_dim = s.cross_attention_dim;
            if d.base == Base::Unknown {
                d.base = s.cross_attention_dim.map_or(Base::Unknown, base_for_width);
            }
            d.notes.push(format!(
                "a control-LoRA of rank {}: low-rank changes to the base UNet's encoder, the hint encoder and zero \
                 convolutions in full (Stability's control-lora-*); generate builds the ControlNet on the --model's \
                 UNet, which must be SDXL",
                s.rank
            ));
        }
        if is_union_net(tensors) {
            d.notes.push(
                "a ControlNet union net (diffusers' ControlNetUnionModel, several condition types in one net): \
                 generate needs --control-type for it"
                    .into(),
            );
        }
    }
    if kind == SdCheckpoint && has_prefix(tensors, "model_ema.") {
        d.notes.push("holds EMA weights too (not pruned); the non-EMA weights are used".into());
    }
    if kind == Unknown {
        d.description = unknown_description(tensors);
    } else {
        let base = if d.base == Base::Unknown { String::new() } else { format!("{} ", base_label(d.base)) };
        // "an SD1.5 UNet", "a UNet".
        let article = if base.is_empty() { "a" } else { "an" };
        d.description = format!("{article} {base}{kind} ({format} names)");
        if control_lora::is_control_lora(tensors) {
            let rank = control_lora::summary(tensors).rank;
            d.description = format!("{article} {base}control-LoRA, rank {rank} ({format} names)");
        }
    }
    d
}

fn base_label(b: Base) -> &'static str {
    match b {
        Base::Sd15 => "SD1.5",
        Base::Sd21 => "SD2.x",
        Base::Sdxl => "SDXL",
        Base::Unknown => "",
    }
}

fn controlnet_details(tensors: &[TensorInfo], file_name: &str, d: &mut Detection) {
    let find = |suffix: &str| {
        tensors.iter().find(|t| t.name.strip_prefix(d.prefix.as_str()).is_some_and(|n| n == suffix)).map(|t| &t.shape)
    };
    // Hint encoder convs: conv_in, then pairs (same width, next width with stride 2), conv_out.
    let hint_out = |i: usize| match d.format {
        Format::Original => find(&format!("input_hint_block.{i}.weight")),
        Format::Diffusers => match i {
            0 => find("controlnet_cond_embedding.conv_in.weight"),
            _ => find(&format!("controlnet_cond_embedding.blocks.{}.weight", i / 2 - 1)),
        },
    };
    d.conditioning_channels = hint_out(0).and_then(|s| s.get(1).copied());
    let mut channels: Vec<usize> = hint_out(0).and_then(|s| s.first().copied()).into_iter().collect();
    // blocks.{2k+1} (original index 2(2k+2)) widen to the next level.
    let mut k = 1;
    while let Some(s) = hint_out(2 * (2 * k)) {
        channels.extend(s.first().copied());
        k += 1;
    }
    d.hint_channels = channels;

    let name = file_name.to_ascii_lowercase();
    if name.contains("control_v11") {
        d.version = Some("1.1".into());
    } else if name.contains("control_sd15_") || name.contains("control_sd15-") {
        d.version = Some("1.0".into());
    }
    if d.prefix == CONTROL_PREFIX && has_prefix(tensors, UNET_PREFIX) {
        d.version.get_or_insert_with(|| "1.0".into());
        d.notes.push("a ControlNet 1.0 file that bundles a whole SD checkpoint; only control_model.* is used".into());
    }
    if name.contains("shuffle") {
        d.global_pool_conditions = true;
        d.notes.push(
            "the file name says shuffle: ControlNet 1.1 shuffle pools its residuals globally \
             (global_pool_conditions = true); the weights cannot tell this"
                .into(),
        );
    }
}

/// A phrase for files that are none of the supported kinds, so errors can say what they ARE.
fn unknown_description(tensors: &[TensorInfo]) -> String {
    let any = |p: &str| has_part(tensors, p);
    if any("lora_") || any(".lora_down.") || any("lora_A") || any(".alpha") && any("lora") {
        "a LoRA (low-rank weight deltas), not a full model".into()
    } else if any("string_to_param") || any("emb_params") || (tensors.len() <= 2 && any("clip_")) {
        "a textual-inversion embedding".into()
    } else if any("adapter.") || any("body.0.resnets") {
        "a T2I-Adapter".into()
    } else if tensors.is_empty() {
        "a file without tensors".into()
    } else {
        let heads: BTreeSet<&str> = tensors.iter().filter_map(|t| t.name.split('.').next()).take(200).collect();
        let list: Vec<&str> = heads.into_iter().take(4).collect();
        format!("an unrecognised model (keys start with {})", list.join(", "))
    }
}

/// What one tensor of a detected file becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A weight of the converted model.
    Used,
    /// Stored, but not needed (buffers, EMA copies, SD2's dropped last text layer).
    Ignored,
    /// A name no map knows.
    Unrecognised,
}

/// Classifies every tensor; parameters = elements of the `Used` ones.
pub fn roles(d: &Detection, tensors: &[TensorInfo]) -> Vec<Role> {
    let names = || tensors.iter().map(|t| t.name.as_str());
    let strip = |n: &'_ str, p: &str| n.strip_prefix(p).map(str::to_string);
    let unet_orig =
        |p: &str| UnetLayout::from_original(names().filter_map(move |n| n.strip_prefix(p))).unwrap_or(UNKNOWN_LAYOUT);
    let vae_levels = |p: &str| {
        names()
            .filter_map(|n| n.strip_prefix(p)?.strip_prefix("encoder.down.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let open_clip_layers = names()
        .filter_map(|n| {
            n.strip_prefix(OPEN_CLIP_PREFIX)?
                .strip_prefix("transformer.resblocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let known = |o: Option<String>| if o.is_some() { Role::Used } else { Role::Unrecognised };
    match (d.kind, d.format) {
        (ModelKind::ControlNet, Format::Original) if control_lora::is_control_lora(tensors) => {
            let l = control_lora::layout(tensors).unwrap_or(UNKNOWN_LAYOUT);
            tensors
                .iter()
                .map(|t| match control_lora::split_name(&t.name).0 {
                    control_lora::Stored::Marker => Role::Ignored,
                    _ => known(control_lora::diffusers_name(&t.name, &l).map(|x| x.1)),
                })
                .collect()
        }
        (ModelKind::ControlNet | ModelKind::Unet, Format::Original) => {
            let l = unet_orig(&d.prefix);
            tensors
                .iter()
                .map(|t| match strip(&t.name, &d.prefix) {
                    Some(k) => known(keymap::unet_to_diffusers(&k, &l)),
                    None => Role::Ignored,
                })
                .collect()
        }
        (ModelKind::ControlNet | ModelKind::Unet, Format::Diffusers) => {
            let l = UnetLayout::from_diffusers(names()).unwrap_or(UNKNOWN_LAYOUT);
            tensors
                .iter()
                .map(|t| match UNION_PARTS.iter().any(|p| t.name.starts_with(p)) {
                    true => Role::Used,
                    false => known(keymap::unet_to_original(&t.name, &l)),
                })
                .collect()
        }
        (ModelKind::Vae, Format::Original) => {
            let n = vae_levels(&d.prefix);
            tensors
                .iter()
                .map(|t| known(strip(&t.name, &d.prefix).and_then(|k| keymap::vae_to_diffusers(&k, n).map(|x| x.0))))
                .collect()
        }
        (ModelKind::Vae, Format::Diffusers) => tensors
            .iter()
            .map(|t| {
                let ok =
                    ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."].iter().any(|p| t.name.starts_with(p));
                if ok {
                    Role::Used
                } else {
                    Role::Unrecognised
                }
            })
            .collect(),
        (ModelKind::TextEncoder, Format::Diffusers) => {
            tensors.iter().map(|t| if t.name.ends_with("position_ids") { Role::Ignored } else { Role::Used }).collect()
        }
        (ModelKind::SdCheckpoint | ModelKind::TextEncoder, _) => {
            let unet = unet_orig(UNET_PREFIX);
            let levels = vae_levels(VAE_PREFIX);
            tensors
                .iter()
                .map(|t| {
                    let n = t.name.as_str();
                    if let Some(k) = n.strip_prefix(UNET_PREFIX) {
                        known(keymap::unet_to_diffusers(k, &unet))
                    } else if let Some(k) = n.strip_prefix(VAE_PREFIX) {
                        known(keymap::vae_to_diffusers(k, levels).map(|x| x.0))
                    } else if let Some(k) = n.strip_prefix(CLIP_PREFIX).or_else(|| n.strip_prefix(SDXL_CLIP_PREFIX)) {
                        if n.ends_with("position_ids") {
                            Role::Ignored
                        } else {
                            known(keymap::clip_to_diffusers(k))
                        }
                    } else if let Some(k) = n.strip_prefix(OPEN_CLIP_PREFIX) {
                        match keymap::open_clip_to_diffusers(k, open_clip_layers) {
                            Some(OpenClipTarget::Dropped(_)) => Role::Ignored,
                            Some(_) => Role::Used,
                            None => Role::Unrecognised,
                        }
                    } else if let Some(k) = n.strip_prefix(SDXL_OPEN_CLIP_PREFIX) {
                        match keymap::open_clip_g_to_diffusers(k) {
                            Some(OpenClipTarget::Dropped(_)) => Role::Ignored,
                            Some(_) => Role::Used,
                            None => Role::Unrecognised,
                        }
                    } else if n.starts_with("model_ema.") || DDPM_BUFFERS.contains(&n) {
                        Role::Ignored
                    } else {
                        Role::Unrecognised
                    }
                })
                .collect()
        }
        _ => tensors.iter().map(|_| Role::Unrecognised).collect(),
    }
}

const UNKNOWN_LAYOUT: UnetLayout = UnetLayout { layers_per_block: 0, up_attention: Vec::new(), hint_blocks: 0 };

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> TensorInfo {
        TensorInfo { name: name.into(), dtype: candle_core::DType::F16, shape: shape.to_vec() }
    }

    #[test]
    fn names_what_a_file_is_not() {
        let lora = [t("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", &[4, 320])];
        let d = detect(&lora, "x.safetensors");
        assert_eq!(d.kind, ModelKind::Unknown);
        assert!(d.description.contains("LoRA"), "{}", d.description);
        let ti = [t("emb_params", &[2, 768])];
        assert!(detect(&ti, "x.pt").description.contains("textual-inversion"));
    }

    #[test]
    fn union_nets_and_control_loras_are_named() {
        let hint = t("controlnet_cond_embedding.conv_in.weight", &[16, 3, 3, 3]);
        let union = [hint.clone(), t("task_embedding", &[8, 320]), t("add_embedding.linear_1.weight", &[1280, 2816])];
        let d = detect(&union, "diffusion_pytorch_model.safetensors");
        assert_eq!((d.kind, d.base), (ModelKind::ControlNet, Base::Sdxl));
        assert!(d.notes.iter().any(|n| n.contains("union net") && n.contains("--control-type")), "{:?}", d.notes);
        assert!(is_union_net(&union) && !is_union_net(std::slice::from_ref(&hint)));
        let lora = [t("input_hint_block.0.weight", &[16, 3, 3, 3]), t("lora_controlnet", &[])];
        assert!(unsupported_controlnet(&lora).unwrap().contains("control-LoRA"));
        assert_eq!(unsupported_controlnet(&[hint]), None);
    }

    #[test]
    fn shuffle_pooling_comes_from_the_file_name() {
        let cn = [t("control_model.input_hint_block.0.weight", &[16, 3, 3, 3])];
        let d = detect(&cn, "control_v11e_sd15_shuffle.pth");
        assert!(d.global_pool_conditions && d.version.as_deref() == Some("1.1"));
        assert!(d.notes.iter().any(|n| n.contains("cannot tell")));
        assert!(!detect(&cn, "control_v11p_sd15_canny.pth").global_pool_conditions);
    }
}
