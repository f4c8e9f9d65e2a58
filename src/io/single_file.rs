//! Loading the files people have into diffusers-named components: original ControlNets
//! (`control_v11p_sd15_canny.pth`), diffusers ControlNet files and folders, and single-file SD checkpoints
//! (A1111 / civitai `.safetensors` / `.ckpt`).
//!
//! A [`Component`] is what the model constructors take: diffusers tensor names and a diffusers `config.json`
//! value; build a model with `VarBuilder::from_tensors(c.tensors, dtype, device)` and
//! `serde_json::from_value(c.config)`. Tensors keep the dtype they were stored in.
//!
//! The config is read from the weights (channels, levels, layers, cross-attention width, linear/conv
//! projections, hint channels); what weights cannot say (attention heads, GroupNorm groups, default size) comes
//! from the base model's row in [`super::base`]. For models that follow no base (tests' tiny models), pass the
//! diffusers config yourself (`config` in the options), as diffusers' `from_single_file(config=...)`.
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};

pub use super::base::PredictionType;
use super::base::{self, facts, Base, BaseFacts};
use super::checkpoint::{Checkpoint, TensorMap};
use super::detect::{
    detect, Detection, Format, CLIP_PREFIX, CONTROL_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX, VAE_PREFIX,
};
use super::inspect::{wrong_kind, Expected};
use super::keymap::{self, OpenClipTarget, UnetLayout};
use super::weights::{find_safetensors, read_json, DIFFUSERS_STEM};
use crate::{Error, Result};

/// CLIP's BPE vocabulary (the same for SD1 and SD2), gzipped into the binary: single-file checkpoints carry no
/// tokenizer. From the open_clip wheel (MIT), as `tests/fixtures/models/tiny-sd2/tokenizer/`.
const CLIP_VOCAB_GZ: &[u8] = include_bytes!("../../assets/clip/vocab.json.gz");
const CLIP_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip/merges.txt.gz");

/// A converted component: diffusers key names, tensors (as stored), and the diffusers config JSON.
#[derive(Debug)]
pub struct Component {
    pub config: Value,
    pub tensors: TensorMap,
}

/// The CLIP tokenizer files a single-file checkpoint lacks.
#[derive(Debug, Clone)]
pub struct BundledTokenizer {
    /// `vocab.json` text.
    pub vocab_json: String,
    /// `merges.txt` text.
    pub merges_txt: String,
    /// OpenAI CLIP (SD1) pads with `<|endoftext|>`, SD2's OpenCLIP tokenizer with `!`.
    pub pad_token: String,
}

/// The parts of a single-file SD checkpoint, each ready for its constructor.
#[derive(Debug)]
pub struct SdComponents {
    pub unet: Component,
    pub vae: Component,
    pub text_encoder: Component,
    pub tokenizer: BundledTokenizer,
    /// SDXL's second text encoder and tokenizer.
    pub sdxl: Option<SdxlComponents>,
    pub base: Base,
    /// `scheduler_config.json` of the base model's diffusers folder.
    pub scheduler_config: Value,
    /// What was guessed and why (printed by the CLI).
    pub notes: Vec<String>,
}

/// What an SDXL single file holds besides: OpenCLIP bigG with its projection (`text_encoder_2`, as
/// transformers' `CLIPTextModelWithProjection`) and the tokenizer that pads with "!".
#[derive(Debug)]
pub struct SdxlComponents {
    pub text_encoder_2: Component,
    pub tokenizer_2: BundledTokenizer,
}

/// Options of [`load_sd_checkpoint_with`].
#[derive(Debug, Clone, Default)]
pub struct SdOptions {
    pub prediction_type: Option<PredictionType>,
    /// A diffusers pipeline folder whose `unet/`, `vae/`, `text_encoder/` (`text_encoder_2/`) and `scheduler/`
    /// configs are used instead of the ones read from the weights.
    pub config_dir: Option<PathBuf>,
}

/// A ControlNet from one file, original or diffusers names, any format; its config read from the weights.
pub fn load_controlnet_file(path: &Path) -> Result<Component> {
    load_controlnet_file_with(path, None)
}

/// As [`load_controlnet_file`], with an explicit diffusers config (a `config.json` or a folder holding one).
pub fn load_controlnet_file_with(path: &Path, config: Option<&Path>) -> Result<Component> {
    let ck = Checkpoint::open(path)?;
    let det = expect_kind(&ck, Expected::ControlNet)?;
    if let Some(what) = super::detect::unsupported_controlnet(&ck.tensors) {
        return Err(Error::weights(path, format!("this is {what}; it cannot be loaded on its own")));
    }
    let tensors = match det.format {
        Format::Original => {
            let l = original_layout(&ck, &det.prefix)?;
            rename(&ck, &det.prefix, |k| keymap::unet_to_diffusers(k, &l))?
        }
        Format::Diffusers => ck.load_where(|_| true)?,
    };
    let config = match config {
        Some(c) => read_given_config(c, "config.json")?,
        None => {
            if det.base == Base::Unknown {
                tracing::warn!(
                    "{}: cross-attention width {:?} matches no known base; attention heads follow SD1.5 (8). \
                     Pass a config if the model differs.",
                    path.display(),
                    det.cross_attention_dim
                );
            }
            controlnet_config(&tensors, &det)
        }
    };
    check_config(path, &config, &tensors)?;
    Ok(Component { config, tensors })
}

/// A ControlNet from a diffusers folder (config.json + weights) or from any single file.
pub fn load_controlnet(path: &Path) -> Result<Component> {
    if !path.is_dir() {
        return load_controlnet_file(path);
    }
    let config: Value = read_json(&path.join("config.json"))?;
    let class = config.get("_class_name").and_then(Value::as_str).unwrap_or("");
    if class != "ControlNetModel" && class != UNION_CLASS {
        let what = if class.is_empty() { "a folder without a model class" } else { class };
        return Err(Error::weights(path, format!("expected a ControlNet, but this folder holds {what}")));
    }
    let mut tensors = TensorMap::new();
    for file in find_safetensors(path, DIFFUSERS_STEM)? {
        tensors.extend(Checkpoint::open(&file)?.load_where(|_| true)?);
    }
    Ok(Component { config, tensors })
}

/// diffusers' class name of union ControlNets (xinsir's), in their `config.json`.
pub const UNION_CLASS: &str = "ControlNetUnionModel";

/// Whether a ControlNet config is a union net's.
pub fn is_union(config: &Value) -> bool {
    config.get("_class_name").and_then(Value::as_str) == Some(UNION_CLASS)
}

/// Diffusers ControlNet tensors → the original layout (`control_model.` prefix), as lllyasviel's files.
pub fn controlnet_to_original(tensors: &TensorMap) -> Result<TensorMap> {
    let l = UnetLayout::from_diffusers(tensors.keys().map(String::as_str))
        .ok_or_else(|| Error::Invalid("not a diffusers ControlNet: no down_blocks.0.resnets".into()))?;
    tensors
        .iter()
        .map(|(k, t)| {
            let o = keymap::unet_to_original(k, &l)
                .ok_or_else(|| Error::Invalid(format!("ControlNet tensor {k} has no original name")))?;
            Ok((format!("{CONTROL_PREFIX}{o}"), t.clone()))
        })
        .collect()
}

/// A single-file SD1.x / SD2.x / SDXL checkpoint; `prediction_type` overrides the guess for SD2.x files.
pub fn load_sd_checkpoint(path: &Path, prediction_type: Option<PredictionType>) -> Result<SdComponents> {
    load_sd_checkpoint_with(path, &SdOptions { prediction_type, config_dir: None })
}

pub fn load_sd_checkpoint_with(path: &Path, opts: &SdOptions) -> Result<SdComponents> {
    let ck = Checkpoint::open(path)?;
    let det = expect_kind(&ck, Expected::BaseModel)?;
    let mut notes = det.notes.clone();

    // 1. UNet.
    let l = original_layout(&ck, UNET_PREFIX)?;
    let unet = rename(&ck, UNET_PREFIX, |k| keymap::unet_to_diffusers(k, &l))?;

    // 2. VAE: 1x1-conv attention weights become linear.
    let vae = super::vae_file::rename_original_vae(&ck, VAE_PREFIX)?;

    // 3. Text encoder: OpenAI CLIP (SD1, SDXL's first) or OpenCLIP (SD2, fused q/k/v, last layer dropped);
    // SDXL's second is OpenCLIP bigG with every layer and its projection.
    let sdxl = det.base == Base::Sdxl;
    let open_clip = ck.tensors.iter().any(|t| t.name.starts_with(OPEN_CLIP_PREFIX));
    let text = match (sdxl, open_clip) {
        (true, _) => rename_clip(&ck, SDXL_CLIP_PREFIX)?,
        (false, true) => open_clip_tensors(&ck)?,
        (false, false) => rename_clip(&ck, CLIP_PREFIX)?,
    };
    let text_2 = if sdxl { Some(open_clip_g_tensors(&ck)?) } else { None };
    let base = match det.base {
        Base::Unknown if open_clip => Base::Sd21,
        b => b,
    };
    let f = facts(base);

    // 4. Configs: given, or read from the weights.
    let given = |sub: &str, file: &str| -> Result<Option<Value>> {
        opts.config_dir.as_ref().map(|d| read_given_config(&d.join(sub), file)).transpose()
    };
    let unet_config = match given("unet", "config.json")? {
        Some(c) => c,
        None => {
            let mut c = unet_config(&unet, f);
            // SDXL's add_embedding takes the pooled text (the projection's width) and 6 sinusoid embeddings.
            let pooled = text_2.as_ref().and_then(|t| dim(t, "text_projection.weight", 0));
            if let (Some(n), Some(p)) = (c.get("projection_class_embeddings_input_dim").and_then(Value::as_u64), pooled)
            {
                if n > p as u64 && (n - p as u64).is_multiple_of(6) {
                    c["addition_time_embed_dim"] = json!((n - p as u64) / 6);
                }
            }
            c
        }
    };
    check_config(path, &unet_config, &unet)?;
    let vae_config = given("vae", "config.json")?.unwrap_or_else(|| vae_config(&vae, f));
    let text_config = given("text_encoder", "config.json")?.unwrap_or_else(|| text_config(&text, f, open_clip));
    let sdxl_parts = match text_2 {
        Some(t) => {
            let second = f.text_encoder_2.unwrap_or(base::SecondTextEncoder { hidden_act: "gelu", pad_token: "!" });
            let config = match given("text_encoder_2", "config.json")? {
                Some(c) => c,
                None => text_2_config(&t, f, second.hidden_act),
            };
            Some(SdxlComponents {
                text_encoder_2: Component { config, tensors: t },
                tokenizer_2: bundled_tokenizer(second.pad_token)?,
            })
        }
        None => None,
    };

    // 5. Scheduler: SD2.x 768 models predict v, the 512 "base" ones epsilon; diffusers tells them apart by the
    // training step stored in .ckpt files (875000 = 2.x-base). Safetensors files carry no step.
    let prediction = match (opts.prediction_type, base) {
        (Some(p), _) => p,
        (None, Base::Sd21) => {
            let step = ck.scalars.get("global_step").map(String::as_str);
            let p = if step == Some("875000") { PredictionType::Epsilon } else { PredictionType::VPrediction };
            notes.push(format!(
                "SD2.x: assumed {} prediction (global_step {}); set prediction_type (epsilon or v_prediction) if images look wrong",
                p.as_str(),
                step.unwrap_or("absent")
            ));
            p
        }
        (None, _) => PredictionType::Epsilon,
    };
    let scheduler_config = match given("scheduler", "scheduler_config.json")? {
        Some(mut c) => {
            if let (Some(p), Some(o)) = (opts.prediction_type, c.as_object_mut()) {
                o.insert("prediction_type".into(), json!(p.as_str()));
            }
            c
        }
        None => base::scheduler_config(base, prediction.as_str()),
    };
    if det.base == Base::Unknown && opts.config_dir.is_none() {
        notes.push(format!(
            "cross-attention width {:?} matches no known base: attention heads and GroupNorm groups follow SD1.5 \
             conventions; pass a config folder if the model differs",
            det.cross_attention_dim
        ));
    }
    let tokenizer = bundled_tokenizer(f.pad_token)?;
    Ok(SdComponents {
        unet: Component { config: unet_config, tensors: unet },
        vae: Component { config: vae_config, tensors: vae },
        text_encoder: Component { config: text_config, tensors: text },
        tokenizer,
        sdxl: sdxl_parts,
        base,
        scheduler_config,
        notes,
    })
}

/// The CLIP vocabulary bundled in the binary, with the base model's padding token.
pub fn bundled_tokenizer(pad_token: &str) -> Result<BundledTokenizer> {
    let gunzip = |bytes: &[u8], name: &str| -> Result<String> {
        let mut s = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut s)
            .map_err(|e| Error::Invalid(format!("bundled CLIP {name} is corrupt: {e}")))?;
        Ok(s)
    };
    Ok(BundledTokenizer {
        vocab_json: gunzip(CLIP_VOCAB_GZ, "vocab.json")?,
        merges_txt: gunzip(CLIP_MERGES_GZ, "merges.txt")?,
        pad_token: pad_token.to_string(),
    })
}

// ------------------------------------------------------------------------------------------------------------
// Tensor renaming.
// ------------------------------------------------------------------------------------------------------------

/// Fails with what the file IS when it is not what was asked for.
fn expect_kind(ck: &Checkpoint, want: Expected) -> Result<Detection> {
    let name = ck.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let det = detect(&ck.tensors, &name);
    if want.accepts(det.kind) {
        return Ok(det);
    }
    Err(Error::weights(&ck.path, wrong_kind(&det.description, det.kind, want)))
}

fn original_layout(ck: &Checkpoint, prefix: &str) -> Result<UnetLayout> {
    UnetLayout::from_original(ck.tensors.iter().filter_map(|t| t.name.strip_prefix(prefix)))
        .ok_or_else(|| Error::weights(&ck.path, format!("no {prefix}input_blocks: cannot read the block layout")))
}

/// Loads every tensor under `prefix` under its mapped name; unmapped names are an error (listed).
fn rename(ck: &Checkpoint, prefix: &str, map: impl Fn(&str) -> Option<String>) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    let mut unknown = Vec::new();
    for t in ck.tensors.iter().filter(|t| t.name.starts_with(prefix)) {
        match map(&t.name[prefix.len()..]) {
            Some(name) => {
                out.insert(name, ck.load(&t.name)?);
            }
            None => unknown.push(t.name.clone()),
        }
    }
    if !unknown.is_empty() {
        let n = unknown.len();
        unknown.truncate(5);
        return Err(Error::weights(&ck.path, format!("{n} unrecognised tensors, e.g. {}", unknown.join(", "))));
    }
    Ok(out)
}

fn count_indices(ck: &Checkpoint, prefix: &str) -> usize {
    ck.tensors
        .iter()
        .filter_map(|t| t.name.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// An OpenAI CLIP text encoder under `prefix` (transformers names inside).
fn rename_clip(ck: &Checkpoint, prefix: &str) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for t in ck.tensors.iter().filter(|t| t.name.starts_with(prefix)) {
        if let Some(name) = keymap::clip_to_diffusers(&t.name[prefix.len()..]) {
            out.insert(name, ck.load(&t.name)?);
        }
    }
    if out.is_empty() {
        return Err(Error::weights(&ck.path, format!("no text encoder ({prefix}*) in this checkpoint")));
    }
    Ok(out)
}

/// SDXL's OpenCLIP bigG (`conditioner.embedders.1.model.*`): q/k/v split, projection transposed.
fn open_clip_g_tensors(ck: &Checkpoint) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for t in ck.tensors.iter().filter(|t| t.name.starts_with(SDXL_OPEN_CLIP_PREFIX)) {
        match keymap::open_clip_g_to_diffusers(&t.name[SDXL_OPEN_CLIP_PREFIX.len()..]) {
            Some(target) => insert_open_clip(ck, &t.name, target, &mut out)?,
            None => return Err(Error::weights(&ck.path, format!("unrecognised OpenCLIP tensor {}", t.name))),
        }
    }
    if !out.contains_key("text_projection.weight") {
        return Err(Error::weights(
            &ck.path,
            format!("SDXL's second text encoder has no {SDXL_OPEN_CLIP_PREFIX}text_projection"),
        ));
    }
    Ok(out)
}

fn insert_open_clip(ck: &Checkpoint, name: &str, target: OpenClipTarget, out: &mut TensorMap) -> Result<()> {
    match target {
        OpenClipTarget::One(to) => {
            out.insert(to, ck.load(name)?);
        }
        OpenClipTarget::Transposed(to) => {
            out.insert(to, ck.load(name)?.t()?.contiguous()?);
        }
        OpenClipTarget::Qkv(names) => {
            let fused = ck.load(name)?;
            let d = fused.dim(0)? / 3;
            for (i, to) in names.into_iter().enumerate() {
                out.insert(to, fused.narrow(0, i * d, d)?.contiguous()?);
            }
        }
        OpenClipTarget::Dropped(_) => {}
    }
    Ok(())
}

fn open_clip_tensors(ck: &Checkpoint) -> Result<TensorMap> {
    let layers = count_indices(ck, &format!("{OPEN_CLIP_PREFIX}transformer.resblocks."));
    let mut out = TensorMap::new();
    for t in ck.tensors.iter().filter(|t| t.name.starts_with(OPEN_CLIP_PREFIX)) {
        match keymap::open_clip_to_diffusers(&t.name[OPEN_CLIP_PREFIX.len()..], layers) {
            Some(target) => insert_open_clip(ck, &t.name, target, &mut out)?,
            None => return Err(Error::weights(&ck.path, format!("unrecognised OpenCLIP tensor {}", t.name))),
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------------------
// Configs read from weights (diffusers names).
// ------------------------------------------------------------------------------------------------------------

fn dim(t: &TensorMap, name: &str, i: usize) -> Option<usize> {
    t.get(name).and_then(|x| x.dims().get(i).copied())
}

fn count(t: &TensorMap, prefix: &str) -> usize {
    t.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
}

/// The encoder half shared by UNet and ControlNet configs.
fn encoder_config(t: &TensorMap, f: &BaseFacts) -> Map<String, Value> {
    let levels = count(t, "down_blocks.");
    let channels: Vec<usize> =
        (0..levels).filter_map(|b| dim(t, &format!("down_blocks.{b}.resnets.0.conv1.weight"), 0)).collect();
    let has_attn = |b: usize| t.keys().any(|k| k.starts_with(&format!("down_blocks.{b}.attentions.")));
    let down: Vec<&str> =
        (0..levels).map(|b| if has_attn(b) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    // A level with attentions but no transformer blocks has depth 0 (the -mid SDXL ControlNets).
    let depth: Vec<usize> = (0..levels)
        .map(|b| match has_attn(b) {
            true => count(t, &format!("down_blocks.{b}.attentions.0.transformer_blocks.")),
            false => 1,
        })
        .collect();
    let depth = if depth.iter().all(|&d| d == depth[0]) { json!(depth[0]) } else { json!(depth) };
    let cross = t.iter().find(|(k, _)| k.ends_with("attn2.to_k.weight")).and_then(|(_, x)| x.dims().get(1).copied());
    let linear = t.iter().find(|(k, _)| k.ends_with("proj_in.weight")).is_some_and(|(_, x)| x.rank() == 2);
    let mut c = Map::new();
    c.insert("in_channels".into(), json!(dim(t, "conv_in.weight", 1)));
    c.insert("block_out_channels".into(), json!(channels));
    c.insert("layers_per_block".into(), json!(count(t, "down_blocks.0.resnets.")));
    c.insert("down_block_types".into(), json!(down));
    c.insert("cross_attention_dim".into(), json!(cross.unwrap_or(f.cross_attention_dim)));
    c.insert("attention_head_dim".into(), base::attention_head_dim(f.heads, &channels));
    c.insert("use_linear_projection".into(), json!(linear));
    c.insert("upcast_attention".into(), json!(f.upcast_attention));
    c.insert("transformer_layers_per_block".into(), depth);
    c.insert("norm_num_groups".into(), json!(f.norm_num_groups));
    if !t.keys().any(|k| k.starts_with("mid_block.attentions.")) {
        c.insert("mid_block_type".into(), json!("UNetMidBlock2D"));
    }
    if let Some(n) = dim(t, "add_embedding.linear_1.weight", 1) {
        c.insert("addition_embed_type".into(), json!("text_time"));
        c.insert("addition_time_embed_dim".into(), json!(f.addition_time_embed_dim.unwrap_or(256)));
        c.insert("projection_class_embeddings_input_dim".into(), json!(n));
    }
    c
}

fn controlnet_config(t: &TensorMap, det: &Detection) -> Value {
    let mut c = encoder_config(t, facts(det.base));
    c.insert("_class_name".into(), json!("ControlNetModel"));
    c.insert("conditioning_channels".into(), json!(dim(t, "controlnet_cond_embedding.conv_in.weight", 1)));
    let blocks = count(t, "controlnet_cond_embedding.blocks.");
    let mut hint: Vec<usize> = dim(t, "controlnet_cond_embedding.conv_in.weight", 0).into_iter().collect();
    hint.extend(
        (1..blocks).step_by(2).filter_map(|i| dim(t, &format!("controlnet_cond_embedding.blocks.{i}.weight"), 0)),
    );
    c.insert("conditioning_embedding_out_channels".into(), json!(hint));
    c.insert("global_pool_conditions".into(), json!(det.global_pool_conditions));
    if let Some([types, width]) = t.get("task_embedding").map(|e| e.dims()).and_then(|d| <[usize; 2]>::try_from(d).ok())
    {
        // A union net: its extra sizes from the weights; the attention heads cannot be read from them and are
        // xinsir's (diffusers' default) 8.
        c.insert("_class_name".into(), json!("ControlNetUnionModel"));
        c.insert("num_control_type".into(), json!(types));
        c.insert("num_trans_channel".into(), json!(width));
        c.insert("num_trans_layer".into(), json!(count(t, "transformer_layes.")));
        c.insert("num_proj_channel".into(), json!(dim(t, "spatial_ch_projs.weight", 0)));
        c.insert("num_trans_head".into(), json!(UNION_TRANS_HEADS));
        // The type embedding's input is the sinusoids of each type's 0/1: it tells the time width exactly.
        if let Some(input) = dim(t, "control_add_embedding.linear_1.weight", 1).filter(|_| types > 0) {
            c.insert("addition_time_embed_dim".into(), json!(input / types));
        }
    }
    Value::Object(c)
}

/// The attention heads of a union net's token transformer (xinsir's nets; diffusers' default).
const UNION_TRANS_HEADS: usize = 8;

fn unet_config(t: &TensorMap, f: &BaseFacts) -> Value {
    let mut c = encoder_config(t, f);
    let down: Vec<String> = c["down_block_types"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let up: Vec<String> = down.iter().rev().map(|d| d.replace("Down", "Up")).collect();
    c.insert("_class_name".into(), json!("UNet2DConditionModel"));
    c.insert("out_channels".into(), json!(dim(t, "conv_out.weight", 0)));
    c.insert("up_block_types".into(), json!(up));
    c.insert("sample_size".into(), json!(f.image_size / 8));
    Value::Object(c)
}

fn vae_config(t: &TensorMap, f: &BaseFacts) -> Value {
    let levels = count(t, "encoder.down_blocks.");
    let channels: Vec<usize> =
        (0..levels).filter_map(|b| dim(t, &format!("encoder.down_blocks.{b}.resnets.0.conv1.weight"), 0)).collect();
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(t, "encoder.conv_in.weight", 1),
        "out_channels": dim(t, "decoder.conv_out.weight", 0),
        // quant_conv maps the encoder's (mean, logvar) pair: 2 x latent channels.
        "latent_channels": dim(t, "quant_conv.weight", 0).map(|n| n / 2),
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": count(t, "encoder.down_blocks.0.resnets."),
        "norm_num_groups": f.norm_num_groups,
        "sample_size": f.image_size,
        "scaling_factor": f.vae_scaling_factor,
    })
}

fn text_config(t: &TensorMap, f: &BaseFacts, open_clip: bool) -> Value {
    let hidden = dim(t, "text_model.embeddings.token_embedding.weight", 1).unwrap_or(f.cross_attention_dim);
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_act": if open_clip { "gelu" } else { f.text_hidden_act },
        "hidden_size": hidden,
        "intermediate_size": dim(t, "text_model.encoder.layers.0.mlp.fc1.weight", 0),
        "num_attention_heads": (hidden / f.text_head_dim).max(1),
        "num_hidden_layers": count(t, "text_model.encoder.layers."),
        "max_position_embeddings": dim(t, "text_model.embeddings.position_embedding.weight", 0),
        "vocab_size": dim(t, "text_model.embeddings.token_embedding.weight", 0),
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    })
}

/// SDXL's second encoder: transformers' `CLIPTextModelWithProjection` config.
fn text_2_config(t: &TensorMap, f: &BaseFacts, hidden_act: &str) -> Value {
    let mut c = text_config(t, f, true);
    c["architectures"] = json!(["CLIPTextModelWithProjection"]);
    c["hidden_act"] = json!(hidden_act);
    c["projection_dim"] = json!(dim(t, "text_projection.weight", 0));
    c
}

fn read_given_config(path: &Path, file: &str) -> Result<Value> {
    let p = if path.is_dir() { path.join(file) } else { path.to_path_buf() };
    read_json(&p)
}

/// A given config must fit the weights: the fields weights determine are compared.
fn check_config(path: &Path, config: &Value, t: &TensorMap) -> Result<()> {
    let derived = encoder_config(t, facts(Base::Unknown));
    // Without transformer blocks (the small SDXL ControlNets) the weights say nothing of the text width or
    // the projections.
    let attends = t.keys().any(|k| k.ends_with("attn2.to_k.weight"));
    for key in ["block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection", "in_channels"]
    {
        if !attends && matches!(key, "cross_attention_dim" | "use_linear_projection") {
            continue;
        }
        let (Some(want), Some(have)) = (derived.get(key), config.get(key)) else { continue };
        if want != have {
            return Err(Error::weights(path, format!("the config says {key} = {have}, the weights say {want}")));
        }
    }
    Ok(())
}

/// Casts every floating-point tensor to `dtype` (integer buffers are left alone).
pub fn cast_floats(tensors: &TensorMap, dtype: DType) -> Result<TensorMap> {
    tensors
        .iter()
        .map(|(k, t)| {
            let t: Tensor = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t.clone() };
            Ok((k.clone(), t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{assert_same, fixtures, original, twin, write};
    use super::*;

    fn twin_config(dir: &str) -> Value {
        read_json(&fixtures().join("models").join(dir).join("config.json")).unwrap()
    }

    /// The config fields that weights determine must equal the ones diffusers wrote for the twin.
    fn assert_derivable_fields(got: &Value, want: &Value, extra: &[&str]) {
        let common = [
            "in_channels",
            "block_out_channels",
            "layers_per_block",
            "down_block_types",
            "cross_attention_dim",
            "use_linear_projection",
            "transformer_layers_per_block",
        ];
        for k in common.iter().chain(extra) {
            assert_eq!(got.get(*k), want.get(*k), "config field {k}");
        }
    }

    fn strip_text_model(t: &TensorMap, prefix: &str) -> TensorMap {
        t.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix).map(|k| (k.strip_prefix("text_model.").unwrap_or(k).to_string(), v.clone()))
            })
            .collect()
    }

    #[test]
    fn original_controlnet_safetensors_equals_its_diffusers_twin() {
        let dir = tempfile::tempdir().unwrap();
        for (recipe, twin_dir) in [("controlnet_sd15", "tiny-controlnet-a"), ("controlnet_sd2", "tiny-controlnet-sd2")]
        {
            let orig = original(recipe, None);
            let with_prefix = write(dir.path(), &format!("{recipe}.safetensors"), &orig);
            let bare: TensorMap =
                orig.iter().map(|(k, v)| (k.strip_prefix(CONTROL_PREFIX).unwrap().to_string(), v.clone())).collect();
            let without_prefix = write(dir.path(), &format!("{recipe}-bare.safetensors"), &bare);
            for path in [with_prefix, without_prefix] {
                let c = load_controlnet_file(&path).unwrap();
                assert_same(&c.tensors, &twin(recipe), recipe);
                let want = twin_config(twin_dir);
                assert_derivable_fields(
                    &c.config,
                    &want,
                    &["conditioning_channels", "conditioning_embedding_out_channels"],
                );
                let given = fixtures().join("models").join(twin_dir);
                assert_eq!(load_controlnet_file_with(&path, Some(&given)).unwrap().config, want);
            }
        }
    }

    #[test]
    fn fp16_pth_equals_twin_in_f16() {
        let c = load_controlnet_file(&fixtures().join("load/control_tiny_sd15_fp16.pth")).unwrap();
        let want = cast_floats(&twin("controlnet_sd15"), DType::F16).unwrap();
        assert_same(&c.tensors, &want, "fp16 .pth");
        let dir = tempfile::tempdir().unwrap();
        let st = write(dir.path(), "fp16.safetensors", &original("controlnet_sd15", Some(DType::F16)));
        assert_same(&load_controlnet_file(&st).unwrap().tensors, &want, "fp16 safetensors");
    }

    #[test]
    fn controlnet_round_trips_through_the_original_layout() {
        let orig = original("controlnet_sd15", None);
        let dir = tempfile::tempdir().unwrap();
        let c = load_controlnet_file(&write(dir.path(), "cn.safetensors", &orig)).unwrap();
        assert_same(&controlnet_to_original(&c.tensors).unwrap(), &orig, "diffusers -> original");
    }

    #[test]
    fn sd15_single_file_equals_its_diffusers_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "tiny-sd15.safetensors", &original("sd15_single_file", None));
        let config_dir = fixtures().join("models/tiny-sd15");
        let sd =
            load_sd_checkpoint_with(&path, &SdOptions { config_dir: Some(config_dir.clone()), ..Default::default() })
                .unwrap();
        let t = twin("sd15_single_file");
        let part =
            |p: &str| t.iter().filter_map(|(k, v)| k.strip_prefix(p).map(|k| (k.to_string(), v.clone()))).collect();
        assert_same(&sd.unet.tensors, &part("unet/"), "unet");
        assert_same(&sd.vae.tensors, &part("vae/"), "vae");
        assert_same(
            &strip_text_model(&sd.text_encoder.tensors, ""),
            &strip_text_model(&t, "text_encoder/"),
            "text encoder",
        );
        assert_eq!(sd.scheduler_config["prediction_type"], "epsilon");
        assert_eq!(sd.tokenizer.pad_token, "<|endoftext|>");
        assert!(sd.tokenizer.vocab_json.len() > 900_000 && sd.tokenizer.merges_txt.starts_with("#version"));

        // Without the folder: configs read from the weights.
        let guessed = load_sd_checkpoint(&path, None).unwrap();
        let unet_cfg: Value = read_json(&config_dir.join("unet/config.json")).unwrap();
        assert_derivable_fields(&guessed.unet.config, &unet_cfg, &["out_channels", "up_block_types"]);
        let vae_cfg: Value = read_json(&config_dir.join("vae/config.json")).unwrap();
        for k in ["block_out_channels", "latent_channels", "layers_per_block", "in_channels", "out_channels"] {
            assert_eq!(guessed.vae.config[k], vae_cfg[k], "vae {k}");
        }
        let te_cfg: Value = read_json(&config_dir.join("text_encoder/config.json")).unwrap();
        for k in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "max_position_embeddings",
            "vocab_size",
            "hidden_act",
        ] {
            assert_eq!(guessed.text_encoder.config[k], te_cfg[k], "text encoder {k}");
        }
        assert!(guessed.notes.iter().any(|n| n.contains("matches no known base")));
    }

    #[test]
    fn sd2_single_file_splits_qkv_and_drops_the_last_openclip_layer() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "tiny-sd2.safetensors", &original("sd2_single_file", None));
        let sd = load_sd_checkpoint(&path, None).unwrap();
        let t = twin("sd2_single_file");
        assert_same(
            &strip_text_model(&sd.text_encoder.tensors, ""),
            &strip_text_model(&t, "text_encoder/"),
            "text encoder",
        );
        let unet: TensorMap =
            t.iter().filter_map(|(k, v)| k.strip_prefix("unet/").map(|k| (k.to_string(), v.clone()))).collect();
        assert_same(&sd.unet.tensors, &unet, "unet");
        assert_eq!(sd.base, Base::Sd21);
        assert_eq!(sd.text_encoder.config["num_hidden_layers"], 2);
        assert_eq!(sd.text_encoder.config["hidden_act"], "gelu");
        assert_eq!(sd.unet.config["use_linear_projection"], true);
        assert_eq!(sd.scheduler_config["prediction_type"], "v_prediction");
        assert_eq!(sd.tokenizer.pad_token, "!");
        let eps = load_sd_checkpoint(&path, Some(PredictionType::Epsilon)).unwrap();
        assert_eq!(eps.scheduler_config["prediction_type"], "epsilon");
    }

    /// SDXL (A1111 layout): CLIP ViT-L under `conditioner.embedders.0`, OpenCLIP bigG under
    /// `conditioner.embedders.1` with fused q/k/v, a transposed projection and every layer kept.
    #[test]
    fn sdxl_single_file_equals_its_diffusers_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "tiny-sdxl.safetensors", &original("sdxl_single_file", None));
        let config_dir = fixtures().join("models/tiny-sdxl");
        let sd =
            load_sd_checkpoint_with(&path, &SdOptions { config_dir: Some(config_dir.clone()), ..Default::default() })
                .unwrap();
        let t = twin("sdxl_single_file");
        let part =
            |p: &str| t.iter().filter_map(|(k, v)| k.strip_prefix(p).map(|k| (k.to_string(), v.clone()))).collect();
        assert_eq!(sd.base, Base::Sdxl);
        assert_same(&sd.unet.tensors, &part("unet/"), "unet");
        assert_same(&sd.vae.tensors, &part("vae/"), "vae");
        assert_same(
            &strip_text_model(&sd.text_encoder.tensors, ""),
            &strip_text_model(&t, "text_encoder/"),
            "text encoder",
        );
        let x = sd.sdxl.as_ref().expect("SDXL parts");
        assert_same(
            &strip_text_model(&x.text_encoder_2.tensors, ""),
            &strip_text_model(&t, "text_encoder_2/"),
            "text encoder 2",
        );
        assert_eq!((sd.tokenizer.pad_token.as_str(), x.tokenizer_2.pad_token.as_str()), ("<|endoftext|>", "!"));
        assert_eq!(sd.scheduler_config["_class_name"], "EulerDiscreteScheduler");

        // Without the folder: what the weights say, and SDXL's facts for the rest.
        let guessed = load_sd_checkpoint(&path, None).unwrap();
        let unet_cfg: Value = read_json(&config_dir.join("unet/config.json")).unwrap();
        assert_derivable_fields(
            &guessed.unet.config,
            &unet_cfg,
            &["out_channels", "up_block_types", "addition_embed_type", "projection_class_embeddings_input_dim"],
        );
        let te2_cfg: Value = read_json(&config_dir.join("text_encoder_2/config.json")).unwrap();
        let te2 = &guessed.sdxl.as_ref().unwrap().text_encoder_2.config;
        for k in ["hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim", "hidden_act"] {
            assert_eq!(te2[k], te2_cfg[k], "text encoder 2 {k}");
        }
        assert_eq!(guessed.text_encoder.config["hidden_act"], "quick_gelu");
        assert_eq!(guessed.unet.config["addition_time_embed_dim"], unet_cfg["addition_time_embed_dim"]);
        assert_eq!(guessed.scheduler_config, base::scheduler_config(Base::Sdxl, "epsilon"));

        // A file without the projection cannot be SDXL's second encoder.
        let mut broken = original("sdxl_single_file", None);
        broken.remove("conditioner.embedders.1.model.text_projection");
        let err = load_sd_checkpoint(&write(dir.path(), "broken.safetensors", &broken), None).unwrap_err().to_string();
        assert!(err.contains("conditioner.embedders.1.model.text_projection"), "{err}");
    }

    /// The -mid/-small SDXL ControlNet layouts from their weights alone: attention levels without transformer
    /// blocks have depth 0; without any mid-block attention the mid block is diffusers' plain `UNetMidBlock2D`.
    #[test]
    fn sdxl_mid_and_small_layouts_from_the_weights() {
        for (net, depth, mid) in [
            ("tiny-controlnet-sdxl-mid", Some(json!([1, 0])), None),
            ("tiny-controlnet-sdxl-small", None, Some("UNetMidBlock2D")),
        ] {
            let file = fixtures().join("models").join(net).join("diffusion_pytorch_model.safetensors");
            let c = load_controlnet_file(&file).unwrap();
            let want = twin_config(net);
            assert_eq!(c.config["down_block_types"], want["down_block_types"], "{net}");
            assert_eq!(c.config.get("mid_block_type").and_then(Value::as_str), mid, "{net}");
            if let Some(d) = depth {
                assert_eq!(c.config["transformer_layers_per_block"], d, "{net}");
                assert_eq!(want["transformer_layers_per_block"], d, "{net}");
            }
        }
    }

    /// A union net's single file (xinsir ships `diffusion_pytorch_model_promax.safetensors`) gets the union
    /// fields of its folder's config from the weights, as its folder has them; control-LoRAs are named, not loaded half-way (or mistaken for plain ControlNets).
    #[test]
    fn union_nets_load_from_a_single_file_and_control_loras_are_refused_by_name() {
        let net = fixtures().join("models/tiny-controlnet-sdxl-union");
        let c = load_controlnet_file(&net.join("diffusion_pytorch_model.safetensors")).unwrap();
        let want: Value = read_json(&net.join("config.json")).unwrap();
        for key in ["_class_name", "num_control_type", "num_trans_channel", "num_trans_layer", "num_proj_channel"] {
            assert_eq!(c.config[key], want[key], "{key}");
        }
        assert_eq!(c.config["num_trans_head"], json!(UNION_TRANS_HEADS));
        let folder = load_controlnet(&net).unwrap();
        assert!(is_union(&folder.config) && is_union(&c.config));
        assert_eq!(folder.tensors.len(), c.tensors.len());
        let dir = tempfile::tempdir().unwrap();
        let mut lora = original("controlnet_sd15", None);
        lora.insert("lora_controlnet".into(), Tensor::zeros((), DType::F32, &candle_core::Device::Cpu).unwrap());
        let err = load_controlnet_file(&write(dir.path(), "control-lora.safetensors", &lora)).unwrap_err().to_string();
        assert!(err.contains("control-LoRA"), "{err}");
    }

    #[test]
    fn wrong_kind_says_what_the_file_is() {
        let dir = tempfile::tempdir().unwrap();
        let sd = original("sd15_single_file", None);
        let full = write(dir.path(), "model.safetensors", &sd);
        let err = load_controlnet_file(&full).unwrap_err().to_string();
        assert!(
            err.contains("but a ControlNet was expected") && err.contains("Stable Diffusion single-file checkpoint"),
            "{err}"
        );
        let unet: TensorMap = sd.into_iter().filter(|(k, _)| k.starts_with(UNET_PREFIX)).collect();
        let err = load_controlnet_file(&write(dir.path(), "unet.safetensors", &unet)).unwrap_err().to_string();
        assert!(err.contains("is a UNet (original names)") && err.contains("unet.safetensors"), "{err}");
        let cn = fixtures().join("load/control_tiny_sd15_fp16.pth");
        let err = load_sd_checkpoint(&cn, None).unwrap_err().to_string();
        assert!(err.contains("this is a ControlNet (original names), but a base model"), "{err}");
    }

    #[test]
    fn a_config_that_does_not_fit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "cn.safetensors", &original("controlnet_sd15", None));
        let wrong = fixtures().join("models/tiny-sd15/unet/config.json");
        let mut cfg: Value = read_json(&wrong).unwrap();
        cfg["block_out_channels"] = json!([32, 64, 64]);
        let p = dir.path().join("config.json");
        std::fs::write(&p, cfg.to_string()).unwrap();
        let err = load_controlnet_file_with(&path, Some(&p)).unwrap_err().to_string();
        assert!(err.contains("block_out_channels") && err.contains("[32,64,64]"), "{err}");
    }
}
