//! `inspect`: what a file or folder is, from headers and configs only (instant on multi-GB files).
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::base::{base_for_width, Base};
use super::checkpoint::{Checkpoint, TensorInfo};
use super::detect::{detect, roles, Format, ModelKind, Projection, Role};
use super::weights::{find_safetensors, read_json, DIFFUSERS_STEM, TRANSFORMERS_STEM};
use crate::{Error, Result};

/// Unrecognised tensor names listed in full up to this many (the count is always given).
const MAX_LISTED: usize = 20;

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub kind: ModelKind,
    pub base: Base,
    pub format: Format,
    /// "safetensors", "torch zip pickle", "torch legacy pickle", "diffusers folder".
    pub container: String,
    pub description: String,
    /// Elements of the tensors the converted model uses (buffers, EMA copies and dropped layers excluded).
    pub parameters: u64,
    /// Most common floating-point dtype ("f16", "f32", "bf16").
    pub dtype: Option<String>,
    pub tensors: usize,
    pub cross_attention_dim: Option<usize>,
    pub conditioning_channels: Option<usize>,
    pub hint_channels: Vec<usize>,
    pub projection: Option<Projection>,
    pub version: Option<String>,
    pub global_pool_conditions: bool,
    /// Stored but unused by the model (buffers, EMA copies, SD2's last text layer).
    pub ignored_tensors: usize,
    pub unrecognised_count: usize,
    pub unrecognised: Vec<String>,
    pub notes: Vec<String>,
}

/// Inspects a weights file (any format) or a diffusers folder (component or pipeline).
pub fn inspect(path: &Path) -> Result<Inspection> {
    if path.is_dir() {
        return inspect_folder(path);
    }
    let ck = Checkpoint::open(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut i = summarize(path, &ck.tensors, &name);
    i.container = ck.format.to_string();
    i.dtype = ck.float_dtype().map(|d| d.as_str().to_string());
    if let Some(step) = ck.scalars.get("global_step") {
        i.notes.push(format!("global_step {step}"));
    }
    // A LoRA: its layout, rank and the family it was made for.
    if i.kind == ModelKind::Unknown && i.description.starts_with("a LoRA") {
        match super::lora::LoraFile::read(path) {
            Ok(lora) => i.description = lora.describe(),
            Err(e) => i.notes.push(e.to_string()),
        }
    }
    Ok(i)
}

/// What a command takes where it asks for a model path; [`expect_kind`] compares it with what the path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// A ControlNet: a diffusers folder or one weights file (either naming).
    ControlNet,
    /// A base model: a diffusers pipeline folder or a single-file SD checkpoint.
    BaseModel,
}

impl Expected {
    /// Whether a path of this kind is what was expected.
    pub fn accepts(self, kind: ModelKind) -> bool {
        match self {
            Expected::ControlNet => kind == ModelKind::ControlNet,
            Expected::BaseModel => matches!(kind, ModelKind::Pipeline | ModelKind::SdCheckpoint),
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expected::ControlNet => "a ControlNet",
            Expected::BaseModel => "a base model (a pipeline folder or a single-file checkpoint)",
        })
    }
}

/// Checks that `path` (a weights file or a diffusers folder) is what a command expects, before loading it, so the
/// wrong kind of model is named ("…: this is an SD1.5 UNet (diffusers names), but a ControlNet was expected")
/// instead of failing later on a missing tensor or config file. Reads headers and configs only. Returns the
/// inspection for callers that want the base or the channels. Errors: the path cannot be inspected (missing, not
/// a model), or it is another kind of model.
pub fn expect_kind(path: &Path, expected: Expected) -> Result<Inspection> {
    let i = inspect(path)?;
    if expected.accepts(i.kind) {
        return Ok(i);
    }
    Err(Error::weights(path, wrong_kind(&i.description, i.kind, expected)))
}

/// "this is <what it is>, but <expected> was expected", with a pointer where the mix-up is a common one.
pub(crate) fn wrong_kind(description: &str, kind: ModelKind, expected: Expected) -> String {
    let hint = match (expected, kind) {
        (Expected::ControlNet, ModelKind::SdCheckpoint | ModelKind::Pipeline) => {
            " (it is a base model: pass it as the model, not as a ControlNet)"
        }
        (Expected::ControlNet, ModelKind::Unet) => " (a base model's UNet, not a ControlNet)",
        (Expected::BaseModel, ModelKind::ControlNet) => " (pass it as a ControlNet, with a base model beside it)",
        (Expected::BaseModel, ModelKind::Unet | ModelKind::Vae | ModelKind::TextEncoder) => {
            " (one part of a model: pass the pipeline folder that holds it)"
        }
        _ => "",
    };
    format!("this is {description}, but {expected} was expected{hint}")
}

fn summarize(path: &Path, tensors: &[TensorInfo], file_name: &str) -> Inspection {
    let d = detect(tensors, file_name);
    let r = roles(&d, tensors);
    let used = tensors.iter().zip(&r).filter(|(_, r)| **r == Role::Used);
    let parameters = used.map(|(t, _)| t.numel() as u64).sum();
    let unrecognised: Vec<String> =
        tensors.iter().zip(&r).filter(|(_, r)| **r == Role::Unrecognised).map(|(t, _)| t.name.clone()).collect();
    Inspection {
        path: path.to_path_buf(),
        kind: d.kind,
        base: d.base,
        format: d.format,
        container: String::new(),
        description: d.description,
        parameters,
        dtype: None,
        tensors: tensors.len(),
        cross_attention_dim: d.cross_attention_dim,
        conditioning_channels: d.conditioning_channels,
        hint_channels: d.hint_channels,
        projection: d.projection,
        version: d.version,
        global_pool_conditions: d.global_pool_conditions,
        ignored_tensors: r.iter().filter(|r| **r == Role::Ignored).count(),
        unrecognised_count: unrecognised.len(),
        unrecognised: unrecognised.into_iter().take(MAX_LISTED).collect(),
        notes: d.notes,
    }
}

/// Headers of all weight files of a diffusers component folder, and their main dtype.
fn folder_headers(dir: &Path) -> Result<(Vec<TensorInfo>, Option<String>)> {
    let files = find_safetensors(dir, DIFFUSERS_STEM).or_else(|_| find_safetensors(dir, TRANSFORMERS_STEM))?;
    let mut all = Vec::new();
    let mut dtype = None;
    for f in files {
        let ck = Checkpoint::open(&f)?;
        dtype = dtype.or(ck.float_dtype().map(|d| d.as_str().to_string()));
        all.extend(ck.tensors);
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((all, dtype))
}

fn inspect_folder(dir: &Path) -> Result<Inspection> {
    if dir.join("model_index.json").is_file() {
        let index: Value = read_json(&dir.join("model_index.json"))?;
        let mut parameters = 0;
        let mut dtype = None;
        let mut tensors = 0;
        let mut notes = Vec::new();
        for sub in ["unet", "vae", "text_encoder", "controlnet"] {
            if index.get(sub).is_none() || !dir.join(sub).is_dir() {
                continue;
            }
            let i = inspect_folder(&dir.join(sub))?;
            parameters += i.parameters;
            dtype = dtype.or(i.dtype);
            tensors += i.tensors;
            notes.push(format!("{sub}: {} parameters", i.parameters));
        }
        let unet_cfg: Option<Value> = read_json(&dir.join("unet/config.json")).ok();
        let width = unet_cfg.as_ref().and_then(|c| c.get("cross_attention_dim")).and_then(Value::as_u64);
        let sdxl = unet_cfg.as_ref().and_then(|c| c.get("addition_embed_type")).is_some_and(|v| v == "text_time");
        let base = if sdxl { Base::Sdxl } else { width.map_or(Base::Unknown, |w| base_for_width(w as usize)) };
        return Ok(Inspection {
            path: dir.to_path_buf(),
            kind: ModelKind::Pipeline,
            base,
            format: Format::Diffusers,
            container: "diffusers folder".into(),
            description: format!(
                "a Stable Diffusion pipeline folder ({})",
                index["_class_name"].as_str().unwrap_or("?")
            ),
            parameters,
            dtype,
            tensors,
            cross_attention_dim: width.map(|w| w as usize),
            conditioning_channels: None,
            hint_channels: Vec::new(),
            projection: None,
            version: None,
            global_pool_conditions: false,
            ignored_tensors: 0,
            unrecognised_count: 0,
            unrecognised: Vec::new(),
            notes,
        });
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::weights(
            dir,
            "neither a diffusers model folder (config.json) nor a pipeline (model_index.json)",
        ));
    }
    // A config that is there but broken is reported as such, not as a missing one.
    let config: Value = read_json(&config_path)?;
    let (headers, dtype) = folder_headers(dir)?;
    let mut i = summarize(dir, &headers, "");
    i.container = "diffusers folder".into();
    i.dtype = dtype;
    if let Some(true) = config.get("global_pool_conditions").and_then(Value::as_bool) {
        i.global_pool_conditions = true;
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{fixtures, original, sparse_file, write};
    use super::*;

    #[test]
    fn full_size_layouts() {
        let dir = tempfile::tempdir().unwrap();
        use Base::*;
        use ModelKind::*;
        // (layout, file name, kind, base, format, parameters as diffusers counts them, dtype)
        let cases = [
            (
                "controlnet_sd15_diffusers",
                "diffusion_pytorch_model.safetensors",
                ControlNet,
                Sd15,
                Format::Diffusers,
                361_279_120,
                "f32",
            ),
            (
                "controlnet_sd15_original",
                "control_v11p_sd15_canny.safetensors",
                ControlNet,
                Sd15,
                Format::Original,
                361_279_120,
                "f16",
            ),
            (
                "controlnet_sd21_original",
                "controlnet-sd21-canny.safetensors",
                ControlNet,
                Sd21,
                Format::Original,
                364_228_240,
                "f16",
            ),
            (
                "controlnet_sdxl_diffusers",
                "diffusion_pytorch_model.fp16.safetensors",
                ControlNet,
                Sdxl,
                Format::Diffusers,
                1_251_014_160,
                "f16",
            ),
            // (-mid/-small: the configs ComfyUI's detection tables describe; see gen_layouts_sdxl_nets.py)
            (
                "controlnet_sdxl_mid_diffusers",
                "diffusion_pytorch_model.fp16.safetensors",
                ControlNet,
                Sdxl,
                Format::Diffusers,
                272_586_000,
                "f16",
            ),
            (
                "controlnet_sdxl_small_diffusers",
                "diffusion_pytorch_model.fp16.safetensors",
                ControlNet,
                Sdxl,
                Format::Diffusers,
                168_318_480,
                "f16",
            ),
            (
                "controlnet_sdxl_union_diffusers",
                "diffusion_pytorch_model.safetensors",
                ControlNet,
                Sdxl,
                Format::Diffusers,
                1_255_958_800,
                "f16",
            ),
            (
                "unet_sd15_diffusers",
                "diffusion_pytorch_model.safetensors",
                Unet,
                Sd15,
                Format::Diffusers,
                859_520_964,
                "f32",
            ),
            (
                "sd15_single_file",
                "v1-5-pruned-emaonly-fp16.safetensors",
                SdCheckpoint,
                Sd15,
                Format::Original,
                1_066_235_307,
                "f16",
            ),
            (
                "sdxl_single_file",
                "sd_xl_base_1.0.safetensors",
                SdCheckpoint,
                Sdxl,
                Format::Original,
                3_468_837_867,
                "f16",
            ),
            (
                "control_lora_rank128",
                "control-lora-canny-rank128.safetensors",
                ControlNet,
                Sdxl,
                Format::Original,
                197_779_104,
                "f16",
            ),
        ];
        for (layout, file, kind, base, format, params, dtype) in cases {
            let sub = dir.path().join(layout);
            std::fs::create_dir_all(&sub).unwrap();
            let (p, python_count) = sparse_file(&sub, layout, file);
            assert_eq!(python_count, params, "{layout}: the generator's count");
            let i = inspect(&p).unwrap();
            assert_eq!((i.kind, i.base, i.format), (kind, base, format), "{layout}");
            assert_eq!(i.parameters, params, "{layout}");
            assert_eq!(i.dtype.as_deref(), Some(dtype), "{layout}");
            assert_eq!(i.unrecognised_count, 0, "{layout}: {:?}", i.unrecognised);
            if kind == ControlNet {
                assert_eq!(i.conditioning_channels, Some(3), "{layout}");
                assert_eq!(i.hint_channels, vec![16, 32, 96, 256], "{layout}");
                let linear = base != Sd15;
                assert_eq!(i.projection, Some(if linear { Projection::Linear } else { Projection::Conv }), "{layout}");
            }
            let union_note = i.notes.iter().any(|n| n.contains("union net"));
            assert_eq!(union_note, layout.contains("union"), "{layout}: {:?}", i.notes);
            if layout.starts_with("control_lora") {
                assert_eq!(i.description, "an SDXL control-LoRA, rank 128 (original names)");
                assert_eq!((i.cross_attention_dim, i.ignored_tensors), (Some(2048), 1), "{layout}");
            }
        }
    }

    #[test]
    fn version_and_ignored_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = sparse_file(dir.path(), "controlnet_sd15_original", "control_v11p_sd15_canny.safetensors");
        assert_eq!(inspect(&p).unwrap().version.as_deref(), Some("1.1"));
        let (p, _) = sparse_file(dir.path(), "sd15_single_file", "model.safetensors");
        let i = inspect(&p).unwrap();
        assert_eq!(i.ignored_tensors, 13, "12 DDPM buffers + position_ids");
        let (p, _) = sparse_file(dir.path(), "sdxl_single_file", "sd_xl_base_1.0.safetensors");
        let i = inspect(&p).unwrap();
        assert_eq!(i.ignored_tensors, 2, "position_ids + logit_scale");
        assert!(i.notes.is_empty(), "{:?}", i.notes);
    }

    #[test]
    fn folders_and_pickles() {
        let cn = inspect(&fixtures().join("models/tiny-controlnet-sd2")).unwrap();
        assert_eq!(
            (cn.kind, cn.format, cn.projection),
            (ModelKind::ControlNet, Format::Diffusers, Some(Projection::Linear))
        );
        let pipe = inspect(&fixtures().join("models/tiny-sd15")).unwrap();
        assert_eq!(pipe.kind, ModelKind::Pipeline);
        let pth = inspect(&fixtures().join("load/control_tiny_sd15_fp16.pth")).unwrap();
        assert_eq!(
            (pth.kind, pth.format, pth.container.as_str()),
            (ModelKind::ControlNet, Format::Original, "torch zip pickle")
        );
        // Same parameters as the diffusers twin.
        assert_eq!(pth.parameters, inspect(&fixtures().join("models/tiny-controlnet-a")).unwrap().parameters);
    }

    #[test]
    fn unrecognised_keys_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = original("controlnet_sd15", None);
        let x = t["control_model.zero_convs.0.0.bias"].clone();
        t.insert("control_model.extra_head.weight".into(), x);
        let i = inspect(&write(dir.path(), "cn.safetensors", &t)).unwrap();
        assert_eq!(i.unrecognised, vec!["control_model.extra_head.weight".to_string()]);
    }

    #[test]
    fn expect_kind_names_what_the_path_is_and_what_was_wanted() {
        let models = fixtures().join("models");
        let pth = fixtures().join("load/control_tiny_sd15_fp16.pth");
        for ok in [models.join("tiny-controlnet-a"), pth.clone()] {
            assert_eq!(expect_kind(&ok, Expected::ControlNet).unwrap().kind, ModelKind::ControlNet);
        }
        expect_kind(&models.join("tiny-sd15"), Expected::BaseModel).unwrap();
        let cases = [
            (
                models.join("tiny-sd15/unet"),
                Expected::ControlNet,
                "UNet (diffusers names), but a ControlNet was expected",
            ),
            (
                models.join("tiny-sd15"),
                Expected::ControlNet,
                "pipeline folder (StableDiffusionPipeline), but a ControlNet",
            ),
            (pth, Expected::BaseModel, "this is a ControlNet (original names), but a base model"),
        ];
        for (path, expected, want) in cases {
            let err = expect_kind(&path, expected).unwrap_err().to_string();
            assert!(err.starts_with(&path.display().to_string()) && err.contains(want), "{err}");
        }
        let missing = expect_kind(&models.join("no-such-model"), Expected::ControlNet).unwrap_err().to_string();
        assert!(missing.contains("no-such-model"), "{missing}");
    }

    #[test]
    fn a_broken_config_is_reported_as_broken_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{bad").unwrap();
        let err = inspect(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json: invalid config"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = inspect(empty.path()).unwrap_err().to_string();
        assert!(err.contains("neither a diffusers model folder"), "{err}");
    }
}
