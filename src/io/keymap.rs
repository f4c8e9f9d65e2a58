//! Every weight-name translation between the original layouts and diffusers / transformers, in one place.
//!
//! | component | original (what single files hold) | diffusers / transformers |
//! | --- | --- | --- |
//! | UNet | `model.diffusion_model.` + LDM `openaimodel.py` names | `UNet2DConditionModel` |
//! | ControlNet | `control_model.` (or nothing) + `cldm.py` names | `ControlNetModel` |
//! | VAE | `first_stage_model.` + LDM `autoencoder.py` names | `AutoencoderKL` |
//! | SD1 text | `cond_stage_model.transformer.` + HF CLIP names | `CLIPTextModel` (`text_model.`) |
//! | SD2 text | `cond_stage_model.model.` + OpenCLIP names | `CLIPTextModel` (`text_model.`) |
//! | SDXL text | `conditioner.embedders.0.transformer.` + HF CLIP names | `CLIPTextModel` (`text_model.`) |
//! | SDXL text 2 | `conditioner.embedders.1.model.` + OpenCLIP names | `CLIPTextModelWithProjection` |
//!
//! LDM numbers blocks flatly: `input_blocks.{i}` runs over `conv_in` (0), then per level `layers_per_block`
//! (resnet `.0`, attention `.1`) pairs and one downsampler (`.0.op`), except after the last level.
//! `output_blocks.{i}` has `layers_per_block + 1` entries per level with the upsampler appended to the last one
//! (`.1.conv`, or `.2.conv` when the entry also has an attention). `middle_block` is resnet, attention, resnet.
//! ControlNet adds `zero_convs.{i}.0` (one per `input_blocks` entry), `middle_block_out.0`, and the hint encoder
//! `input_hint_block.{2k}` (convs at even indices, SiLUs between them).
//! Inside attention blocks (`SpatialTransformer` ↔ `Transformer2DModel`) the names are identical.
//!
//! The functions here only rename (and say how a tensor must be reshaped); [`super::single_file`] moves
//! the tensors.

/// The index arithmetic of a UNet-like encoder, read from the file's own keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    /// Per diffusers up block (output order): does it have attentions? Decides `.1.conv` vs `.2.conv`.
    pub up_attention: Vec<bool>,
    /// ControlNet hint encoder: number of convs between `conv_in` and `conv_out` (diffusers `blocks`).
    pub hint_blocks: usize,
}

/// ResnetBlock2D leaves: LDM `ResBlock` sequential indices ↔ diffusers names.
const RESNET_LEAVES: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Fixed single-layer renames, original ↔ diffusers (UNet and ControlNet).
const UNET_FIXED: [(&str, &str); 8] = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    // SDXL's size/crop conditioning embedding.
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
    ("middle_block_out.0", "controlnet_mid_block"),
];

fn swap_prefix<'a>(key: &'a str, table: &[(&str, &str)], to_diffusers: bool) -> Option<(String, &'a str)> {
    table.iter().find_map(|(o, d)| {
        let (from, to) = if to_diffusers { (o, d) } else { (d, o) };
        key.strip_prefix(from).and_then(|rest| rest.strip_prefix('.')).map(|rest| (to.to_string(), rest))
    })
}

fn resnet_leaf(rest: &str, to_diffusers: bool) -> Option<String> {
    swap_prefix(rest, &RESNET_LEAVES, to_diffusers).map(|(p, r)| format!("{p}.{r}"))
}

/// Splits `"name.12.rest"` after `name.` into (12, "rest").
fn index_after<'a>(key: &'a str, name: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(name)?.strip_prefix('.')?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// A UNet or ControlNet key (prefix removed), original → diffusers. `None`: not a name this map knows.
pub fn unet_to_diffusers(key: &str, l: &UnetLayout) -> Option<String> {
    let per_level = l.layers_per_block + 1;
    if let Some((p, rest)) = swap_prefix(key, &UNET_FIXED, true) {
        return Some(format!("{p}.{rest}"));
    }
    if let Some((i, rest)) = index_after(key, "input_blocks") {
        let (b, j) = ((i.checked_sub(1)?) / per_level, (i - 1) % per_level);
        if let Some(leaf) = rest.strip_prefix("0.op.") {
            return (j == l.layers_per_block).then(|| format!("down_blocks.{b}.downsamplers.0.conv.{leaf}"));
        }
        if j == l.layers_per_block {
            return None;
        }
        if let Some(r) = rest.strip_prefix("0.") {
            return Some(format!("down_blocks.{b}.resnets.{j}.{}", resnet_leaf(r, true)?));
        }
        return rest.strip_prefix("1.").map(|r| format!("down_blocks.{b}.attentions.{j}.{r}"));
    }
    if let Some((i, rest)) = index_after(key, "middle_block") {
        return match i {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", i / 2, resnet_leaf(rest, true)?)),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    if let Some((i, rest)) = index_after(key, "output_blocks") {
        let (b, j) = (i / per_level, i % per_level);
        if let Some(leaf) = rest.strip_prefix("1.conv.").or_else(|| rest.strip_prefix("2.conv.")) {
            return Some(format!("up_blocks.{b}.upsamplers.0.conv.{leaf}"));
        }
        if let Some(r) = rest.strip_prefix("0.") {
            return Some(format!("up_blocks.{b}.resnets.{j}.{}", resnet_leaf(r, true)?));
        }
        return rest.strip_prefix("1.").map(|r| format!("up_blocks.{b}.attentions.{j}.{r}"));
    }
    if let Some((i, rest)) = index_after(key, "zero_convs") {
        return rest.strip_prefix("0.").map(|leaf| format!("controlnet_down_blocks.{i}.{leaf}"));
    }
    if let Some((i, leaf)) = index_after(key, "input_hint_block") {
        let last = 2 * (l.hint_blocks + 1);
        return match i {
            0 => Some(format!("controlnet_cond_embedding.conv_in.{leaf}")),
            i if i == last => Some(format!("controlnet_cond_embedding.conv_out.{leaf}")),
            i if i % 2 == 0 && i < last => Some(format!("controlnet_cond_embedding.blocks.{}.{leaf}", i / 2 - 1)),
            _ => None,
        };
    }
    None
}

/// A UNet or ControlNet key, diffusers → original (without prefix). `None`: not a name this map knows.
pub fn unet_to_original(key: &str, l: &UnetLayout) -> Option<String> {
    let per_level = l.layers_per_block + 1;
    if let Some((p, rest)) = swap_prefix(key, &UNET_FIXED, false) {
        return Some(format!("{p}.{rest}"));
    }
    if let Some((b, rest)) = index_after(key, "down_blocks") {
        if let Some(leaf) = rest.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{leaf}", 1 + b * per_level + l.layers_per_block));
        }
        if let Some((j, r)) = index_after(rest, "resnets") {
            return Some(format!("input_blocks.{}.0.{}", 1 + b * per_level + j, resnet_leaf(r, false)?));
        }
        return index_after(rest, "attentions").map(|(j, r)| format!("input_blocks.{}.1.{r}", 1 + b * per_level + j));
    }
    if let Some(rest) = key.strip_prefix("mid_block.") {
        if let Some((j, r)) = index_after(rest, "resnets") {
            return Some(format!("middle_block.{}.{}", 2 * j, resnet_leaf(r, false)?));
        }
        return rest.strip_prefix("attentions.0.").map(|r| format!("middle_block.1.{r}"));
    }
    if let Some((b, rest)) = index_after(key, "up_blocks") {
        if let Some(leaf) = rest.strip_prefix("upsamplers.0.conv.") {
            let slot = if *l.up_attention.get(b)? { 2 } else { 1 };
            return Some(format!("output_blocks.{}.{slot}.conv.{leaf}", b * per_level + l.layers_per_block));
        }
        if let Some((j, r)) = index_after(rest, "resnets") {
            return Some(format!("output_blocks.{}.0.{}", b * per_level + j, resnet_leaf(r, false)?));
        }
        return index_after(rest, "attentions").map(|(j, r)| format!("output_blocks.{}.1.{r}", b * per_level + j));
    }
    if let Some((i, leaf)) = index_after(key, "controlnet_down_blocks") {
        return Some(format!("zero_convs.{i}.0.{leaf}"));
    }
    if let Some(rest) = key.strip_prefix("controlnet_cond_embedding.") {
        let (stem, leaf) = rest.rsplit_once('.')?;
        let i = match stem {
            "conv_in" => 0,
            "conv_out" => 2 * (l.hint_blocks + 1),
            _ => 2 * (stem.strip_prefix("blocks.")?.parse::<usize>().ok()? + 1),
        };
        return Some(format!("input_hint_block.{i}.{leaf}"));
    }
    None
}

impl UnetLayout {
    /// From original keys (prefix removed): levels = downsamplers + 1, entries per level from `input_blocks`.
    pub fn from_original<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Option<Self> {
        let max_index = |name: &str| keys.clone().filter_map(|k| index_after(k, name).map(|(i, _)| i)).max();
        let downsamplers: std::collections::BTreeSet<usize> = keys
            .clone()
            .filter_map(|k| index_after(k, "input_blocks").filter(|(_, r)| r.starts_with("0.op.")).map(|(i, _)| i))
            .collect();
        let input_entries = max_index("input_blocks")?; // entries after conv_in
        let levels = downsamplers.len() + 1;
        // Every level has L resnets plus a downsampler, except the last: entries = levels * (L + 1) - 1.
        let layers_per_block = ((input_entries + 1) / levels).checked_sub(1)?;
        let per_level = layers_per_block + 1;
        let up_attention = match max_index("output_blocks") {
            Some(n) => (0..=n / per_level)
                .map(|b| keys.clone().any(|k| k.starts_with(&format!("output_blocks.{}.1.", b * per_level))))
                .collect(),
            None => Vec::new(),
        };
        let hint_blocks = max_index("input_hint_block").map_or(0, |last| (last / 2).saturating_sub(1));
        Some(Self { layers_per_block, up_attention, hint_blocks })
    }

    /// From diffusers keys: resnets in the first down block, attentions per up block, hint `blocks`.
    pub fn from_diffusers<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Option<Self> {
        let count = |prefix: &str| {
            keys.clone()
                .filter_map(|k| k.strip_prefix(prefix))
                .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
                .max()
                .map(|m| m + 1)
        };
        let layers_per_block = count("down_blocks.0.resnets.")?;
        let up_blocks = count("up_blocks.").unwrap_or(0);
        let up_attention = (0..up_blocks)
            .map(|b| keys.clone().any(|k| k.starts_with(&format!("up_blocks.{b}.attentions."))))
            .collect();
        let hint_blocks = count("controlnet_cond_embedding.blocks.").unwrap_or(0);
        Some(Self { layers_per_block, up_attention, hint_blocks })
    }
}

/// How a VAE tensor changes shape on the way: LDM's mid-block attention uses 1x1 convolutions where
/// diffusers uses linear layers ([C, C, 1, 1] ↔ [C, C]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reshape {
    None,
    Conv1x1ToLinear,
}

/// VAE resnets: only the shortcut is named differently.
fn vae_resnet_leaf(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(leaf) => format!("conv_shortcut.{leaf}"),
        None => rest.to_string(),
    }
}

/// VAE mid-block attention: LDM `AttnBlock` ↔ diffusers `Attention` (and diffusers' pre-0.14 names).
const VAE_ATTENTION: [(&str, &str); 5] =
    [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];
const VAE_ATTENTION_LEGACY_DIFFUSERS: [(&str, &str); 4] =
    [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];

/// A VAE key (prefix removed), original → diffusers; `levels` = number of encoder down levels.
pub fn vae_to_diffusers(key: &str, levels: usize) -> Option<(String, Reshape)> {
    let (side, rest) = key.split_once('.')?;
    let plain = |k: String| Some((k, Reshape::None));
    if matches!(key.split('.').next(), Some("quant_conv" | "post_quant_conv")) {
        return plain(key.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return plain(key.to_string());
    }
    if let Some(leaf) = rest.strip_prefix("norm_out.") {
        return plain(format!("{side}.conv_norm_out.{leaf}"));
    }
    if let Some((i, r)) = index_after(rest, "down").filter(|_| side == "encoder") {
        if let Some((j, r)) = index_after(r, "block") {
            return plain(format!("encoder.down_blocks.{i}.resnets.{j}.{}", vae_resnet_leaf(r)));
        }
        return r
            .strip_prefix("downsample.conv.")
            .and_then(|leaf| plain(format!("encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}")));
    }
    if let Some((i, r)) = index_after(rest, "up").filter(|_| side == "decoder") {
        // LDM counts decoder levels from the lowest resolution up; diffusers in execution order.
        let b = levels.checked_sub(1 + i)?;
        if let Some((j, r)) = index_after(r, "block") {
            return plain(format!("decoder.up_blocks.{b}.resnets.{j}.{}", vae_resnet_leaf(r)));
        }
        return r
            .strip_prefix("upsample.conv.")
            .and_then(|leaf| plain(format!("decoder.up_blocks.{b}.upsamplers.0.conv.{leaf}")));
    }
    if let Some(r) = rest.strip_prefix("mid.") {
        for (n, j) in [("block_1.", 0), ("block_2.", 1)] {
            if let Some(r) = r.strip_prefix(n) {
                return plain(format!("{side}.mid_block.resnets.{j}.{}", vae_resnet_leaf(r)));
            }
        }
        let (name, leaf) = r.strip_prefix("attn_1.")?.rsplit_once('.')?;
        let (_, to) = VAE_ATTENTION.iter().find(|(o, _)| *o == name)?;
        let reshape = if leaf == "weight" && name != "norm" { Reshape::Conv1x1ToLinear } else { Reshape::None };
        return Some((format!("{side}.mid_block.attentions.0.{to}.{leaf}"), reshape));
    }
    None
}

/// A diffusers VAE key written with the pre-0.14 attention names, renamed to today's.
pub fn vae_legacy_diffusers(key: &str) -> Option<String> {
    let (head, rest) = key.split_once("mid_block.attentions.0.")?;
    let (name, leaf) = rest.rsplit_once('.')?;
    let (_, to) = VAE_ATTENTION_LEGACY_DIFFUSERS.iter().find(|(o, _)| *o == name)?;
    Some(format!("{head}mid_block.attentions.0.{to}.{leaf}"))
}

/// SD1 text encoder: the key after `cond_stage_model.transformer.` → transformers' `CLIPTextModel`
/// (with `text_model.`; very old files lack it). `None` for buffers (`position_ids`).
pub fn clip_to_diffusers(key: &str) -> Option<String> {
    if key.ends_with("position_ids") {
        return None;
    }
    Some(if key.starts_with("text_model.") { key.to_string() } else { format!("text_model.{key}") })
}

/// Where an OpenCLIP text tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenClipTarget {
    One(String),
    /// A fused `in_proj` tensor: rows [0, d), [d, 2d), [2d, 3d) are q, k, v.
    Qkv([String; 3]),
    /// Present in the file, unused by the diffusers model (the reason is the message).
    Dropped(&'static str),
    /// Stored transposed: OpenCLIP's `text_projection` is multiplied from the right (`x @ P`, [width, proj]),
    /// transformers' is a `Linear` weight ([proj, width]).
    Transposed(String),
}

/// OpenCLIP leaves inside `transformer.resblocks.{i}.`, original → transformers.
const OPENCLIP_LEAVES: [(&str, &str); 5] = [
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
];

/// SD2 text encoder (OpenCLIP ViT-H): the key after `cond_stage_model.model.` → `CLIPTextModel`.
/// `layers` = resblocks in the file. SD2 conditions on the penultimate layer's output (then `ln_final`), so
/// diffusers' text encoder has `layers - 1` layers and the last resblock is dropped, as is `text_projection`
/// (only `CLIPTextModelWithProjection`, i.e. SDXL, uses it).
pub fn open_clip_to_diffusers(key: &str, layers: usize) -> Option<OpenClipTarget> {
    match key {
        "text_projection" => Some(OpenClipTarget::Dropped("text projection (used by SDXL only)")),
        _ => match index_after(key, "transformer.resblocks") {
            Some((i, _)) if i + 1 == layers => {
                Some(OpenClipTarget::Dropped("last OpenCLIP layer: SD2 uses the penultimate layer"))
            }
            _ => open_clip_common(key),
        },
    }
}

/// SDXL's second text encoder (OpenCLIP bigG): the key after `conditioner.embedders.1.model.` →
/// `CLIPTextModelWithProjection`. Every layer is kept (SDXL takes the penultimate hidden state from the full
/// model, and the pooled output from the last), and `text_projection` is transposed into a `Linear` weight.
pub fn open_clip_g_to_diffusers(key: &str) -> Option<OpenClipTarget> {
    match key {
        "text_projection" => Some(OpenClipTarget::Transposed("text_projection.weight".into())),
        _ => open_clip_common(key),
    }
}

/// The OpenCLIP names SD2's and SDXL's encoders share.
fn open_clip_common(key: &str) -> Option<OpenClipTarget> {
    let one = |s: String| Some(OpenClipTarget::One(s));
    match key {
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight".into()),
        "ln_final.weight" | "ln_final.bias" => {
            return one(format!("text_model.final_layer_norm.{}", key.rsplit('.').next()?));
        }
        "logit_scale" => return Some(OpenClipTarget::Dropped("CLIP's contrastive temperature")),
        _ => {}
    }
    let (i, rest) = index_after(key, "transformer.resblocks")?;
    let layer = format!("text_model.encoder.layers.{i}");
    if let Some(leaf) = rest.strip_prefix("attn.in_proj_") {
        return Some(OpenClipTarget::Qkv(["q", "k", "v"].map(|p| format!("{layer}.self_attn.{p}_proj.{leaf}"))));
    }
    swap_prefix(rest, &OPENCLIP_LEAVES, true).map(|(p, leaf)| OpenClipTarget::One(format!("{layer}.{p}.{leaf}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD1.5: 2 layers per block, 4 levels, no attention in the first up block.
    fn sd15() -> UnetLayout {
        UnetLayout { layers_per_block: 2, up_attention: vec![false, true, true, true], hint_blocks: 6 }
    }

    #[test]
    fn unet_names_match_diffusers_conversion() {
        // Pairs from diffusers' convert_ldm_unet_checkpoint / convert_controlnet_checkpoint on SD1.5.
        let l = sd15();
        for (o, d) in [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            ("input_blocks.2.1.proj_in.weight", "down_blocks.0.attentions.1.proj_in.weight"),
            ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
            ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("input_blocks.11.0.emb_layers.1.weight", "down_blocks.3.resnets.1.time_emb_proj.weight"),
            ("middle_block.2.out_layers.3.bias", "mid_block.resnets.1.conv2.bias"),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.11.1.norm.weight", "up_blocks.3.attentions.2.norm.weight"),
            ("out.2.weight", "conv_out.weight"),
            ("zero_convs.11.0.weight", "controlnet_down_blocks.11.weight"),
            ("middle_block_out.0.bias", "controlnet_mid_block.bias"),
            ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"),
            ("input_hint_block.4.bias", "controlnet_cond_embedding.blocks.1.bias"),
            ("input_hint_block.14.weight", "controlnet_cond_embedding.conv_out.weight"),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
        ] {
            assert_eq!(unet_to_diffusers(o, &l).as_deref(), Some(d), "{o}");
            assert_eq!(unet_to_original(d, &l).as_deref(), Some(o), "{d}");
        }
        for unknown in ["input_blocks.3.0.in_layers.0.weight", "input_hint_block.1.weight", "foo.bar", "out.1.weight"] {
            assert_eq!(unet_to_diffusers(unknown, &l), None, "{unknown}");
        }
    }

    #[test]
    fn layouts_from_keys() {
        let orig = [
            "input_blocks.11.0.in_layers.0.weight",
            "input_blocks.3.0.op.weight",
            "input_blocks.3.0.op.bias",
            "input_blocks.6.0.op.weight",
            "input_blocks.6.0.op.bias",
            "input_blocks.9.0.op.weight",
            "input_blocks.9.0.op.bias",
            "input_hint_block.14.weight",
            "output_blocks.2.1.conv.weight",
            "output_blocks.3.1.norm.weight",
            "output_blocks.6.1.norm.weight",
            "output_blocks.9.1.norm.weight",
            "output_blocks.11.0.in_layers.0.weight",
        ];
        assert_eq!(UnetLayout::from_original(orig.iter().copied()), Some(sd15()));
        let diff = [
            "down_blocks.0.resnets.1.conv1.weight",
            "up_blocks.0.resnets.2.conv1.weight",
            "up_blocks.1.attentions.0.norm.weight",
            "up_blocks.2.attentions.0.norm.weight",
            "up_blocks.3.attentions.0.norm.weight",
            "controlnet_cond_embedding.blocks.5.weight",
        ];
        assert_eq!(UnetLayout::from_diffusers(diff.iter().copied()), Some(sd15()));
    }

    #[test]
    fn vae_names() {
        for (o, d, r) in [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                Reshape::None,
            ),
            ("encoder.down.0.downsample.conv.bias", "encoder.down_blocks.0.downsamplers.0.conv.bias", Reshape::None),
            ("decoder.up.3.block.2.norm1.weight", "decoder.up_blocks.0.resnets.2.norm1.weight", Reshape::None),
            ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight", Reshape::None),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
                Reshape::Conv1x1ToLinear,
            ),
            ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight", Reshape::None),
            ("encoder.mid.block_2.conv1.bias", "encoder.mid_block.resnets.1.conv1.bias", Reshape::None),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias", Reshape::None),
            ("post_quant_conv.weight", "post_quant_conv.weight", Reshape::None),
        ] {
            assert_eq!(vae_to_diffusers(o, 4), Some((d.to_string(), r)), "{o}");
        }
        assert_eq!(vae_to_diffusers("decoder.up.4.block.0.conv1.weight", 4), None);
        assert_eq!(
            vae_legacy_diffusers("decoder.mid_block.attentions.0.proj_attn.bias").as_deref(),
            Some("decoder.mid_block.attentions.0.to_out.0.bias")
        );
    }

    #[test]
    fn open_clip_names_drop_the_last_layer() {
        let qkv = open_clip_to_diffusers("transformer.resblocks.3.attn.in_proj_weight", 24).unwrap();
        assert_eq!(
            qkv,
            OpenClipTarget::Qkv(
                ["q", "k", "v"].map(|p| format!("text_model.encoder.layers.3.self_attn.{p}_proj.weight"))
            )
        );
        assert_eq!(
            open_clip_to_diffusers("transformer.resblocks.0.mlp.c_proj.bias", 24),
            Some(OpenClipTarget::One("text_model.encoder.layers.0.mlp.fc2.bias".into()))
        );
        assert!(matches!(
            open_clip_to_diffusers("transformer.resblocks.23.ln_1.weight", 24),
            Some(OpenClipTarget::Dropped(_))
        ));
        assert!(matches!(open_clip_to_diffusers("text_projection", 24), Some(OpenClipTarget::Dropped(_))));
        assert_eq!(
            open_clip_to_diffusers("positional_embedding", 24),
            Some(OpenClipTarget::One("text_model.embeddings.position_embedding.weight".into()))
        );
        assert_eq!(clip_to_diffusers("text_model.embeddings.position_ids"), None);
        // SDXL's bigG keeps its last layer and its projection (transposed).
        assert_eq!(
            open_clip_g_to_diffusers("transformer.resblocks.31.ln_1.weight"),
            Some(OpenClipTarget::One("text_model.encoder.layers.31.layer_norm1.weight".into()))
        );
        assert_eq!(
            open_clip_g_to_diffusers("text_projection"),
            Some(OpenClipTarget::Transposed("text_projection.weight".into()))
        );
        assert!(matches!(open_clip_g_to_diffusers("logit_scale"), Some(OpenClipTarget::Dropped(_))));
        assert_eq!(
            clip_to_diffusers("encoder.layers.0.mlp.fc1.bias").as_deref(),
            Some("text_model.encoder.layers.0.mlp.fc1.bias")
        );
    }
}
