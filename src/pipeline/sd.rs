//! A loaded Stable Diffusion 1.x/2.x pipeline folder (diffusers layout):
//! `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::io::checkpoint::Checkpoint;
use crate::io::control_lora;
use crate::io::detect::ModelKind;
use crate::io::keymap::UnetLayout;
use crate::io::lora::{LoraFamily, LoraFile, LoraWeight, Part};
use crate::io::single_file::{self, PredictionType};
use crate::io::{hub, inspect, weights::read_json};
use crate::model::clip::ClipTextModel;
use crate::model::controlnet::{ControlNetConfig, ControlNetModel};
use crate::model::lora::LoraMerge;
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::model::weight_tap::WeightTap;
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The part of `model_index.json` we read: which pipeline the folder is.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    /// SDXL: an empty negative prompt is zero embeddings, not the encoding of "".
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

/// The SDXL pipeline classes this loader reads (diffusers' `_class_name`); any other `StableDiffusion*` class
/// is read as SD 1.x/2.x.
const SDXL_PIPELINES: &[&str] = &["StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline"];

pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub scheduler_config_path: PathBuf,
    /// What an SDXL model has besides: its second text encoder.
    pub sdxl: Option<SdxlParts>,
    /// The LoRAs merged into the weights (file, weight), in the order given: a request for other LoRAs
    /// needs the model loaded again.
    pub loras: Vec<(PathBuf, LoraWeight)>,
    /// The UNet encoder's tensors as loaded (shared with the UNet): what a control-LoRA is built on.
    pub unet_weights: std::sync::Arc<WeightTap>,
    /// The VAE used in place of the model's own ([`Self::replace_vae`]): the spec as given, and its path.
    pub vae_override: Option<(String, PathBuf)>,
}

/// LoRAs to merge at load, each with its weight (text encoders', UNet's).
pub type LoraSet = [(LoraFile, LoraWeight)];

/// The LoRA merges of the UNet and text encoders, and the check that every LoRA module found its weight.
struct Merges {
    unet: std::sync::Arc<LoraMerge>,
    text_encoder: std::sync::Arc<LoraMerge>,
    text_encoder_2: std::sync::Arc<LoraMerge>,
}

impl Merges {
    fn new(loras: &LoraSet, unet: &UNet2DConditionConfig) -> Self {
        // A1111's separate multipliers: the text encoders take theirs, the UNet its own.
        let set = |part: Part| -> Vec<(&LoraFile, f64)> { loras.iter().map(|(f, w)| (f, w.of(part))).collect() };
        // SDXL kohya files name the UNet as the original checkpoint does; the layout translates.
        let levels = unet.encoder.block_out_channels.len();
        let per_level = unet.encoder.layers_per_block.expand(levels, "layers_per_block").ok();
        let layout = per_level.and_then(|l| l.first().copied()).map(|layers_per_block| UnetLayout {
            layers_per_block,
            up_attention: unet.up_block_types.iter().map(|t| t.contains("CrossAttn")).collect(),
            hint_blocks: 0,
        });
        Self {
            unet: LoraMerge::new(Part::Unet, &set(Part::Unet), layout),
            text_encoder: LoraMerge::new(Part::TextEncoder, &set(Part::TextEncoder), None),
            text_encoder_2: LoraMerge::new(Part::TextEncoder2, &set(Part::TextEncoder2), None),
        }
    }

    /// Refuses LoRA modules that matched no weight of the model, naming a few and their files.
    fn check_all_used(&self, loras: &LoraSet) -> Result<()> {
        const SHOWN: usize = 4;
        for merge in [&self.unet, &self.text_encoder, &self.text_encoder_2] {
            let unused = merge.unused();
            let Some(first) = unused.first() else { continue };
            let key = (merge.part(), first.clone());
            let file = loras.iter().find(|(f, _)| f.modules.contains_key(&key)).map(|(f, _)| f.path.display());
            return Err(Error::setting(
                "lora",
                format!(
                    "{}: {} {} modules match nothing in this model ({}{}): the LoRA was made for another model",
                    file.map(|f| f.to_string()).unwrap_or_default(),
                    unused.len(),
                    merge.part().name(),
                    unused[..unused.len().min(SHOWN)].join(", "),
                    if unused.len() > SHOWN { ", ..." } else { "" }
                ),
            ));
        }
        Ok(())
    }
}

/// Refuses a LoRA made for another model family than the model's (SDXL LoRA on SD 1.x and the like).
fn check_lora_family(loras: &LoraSet, is_sdxl: bool, cross_attention_dim: usize) -> Result<()> {
    let model = match (is_sdxl, cross_attention_dim) {
        (true, _) => LoraFamily::Sdxl,
        (false, 768) => LoraFamily::Sd1,
        (false, 1024) => LoraFamily::Sd2,
        _ => LoraFamily::Unknown,
    };
    for (file, _) in loras {
        let family = file.family();
        let clash = match (family, model) {
            (LoraFamily::Unknown, _) => false,
            (LoraFamily::Sdxl, _) => !is_sdxl,
            (_, LoraFamily::Unknown) => is_sdxl,
            (a, b) => a != b,
        };
        if clash {
            let model_name = if model == LoraFamily::Unknown { "SD 1.x/2.x" } else { model.name() };
            return Err(Error::setting(
                "lora",
                format!("{} is a LoRA for {}, but the model is {model_name}", file.path.display(), family.name()),
            ));
        }
    }
    Ok(())
}

/// SDXL's second tokenizer and text encoder (OpenCLIP bigG with projection), and its empty-prompt rule.
pub struct SdxlParts {
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextModel,
    pub force_zeros_for_empty_prompt: bool,
}

/// How to load what the user named: compute dtype and device, the hub variant, and what a single file
/// cannot tell.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// `Some("fp16")`: prefer `*.fp16.safetensors` when downloading from the hub.
    pub variant: Option<String>,
    /// Overrides the guess for single-file SD checkpoints (SD2 768 models predict v).
    pub prediction_type: Option<PredictionType>,
    /// A diffusers pipeline folder whose `*/config.json` describe a single-file `--model` (as diffusers'
    /// `from_single_file(config=...)`), for models whose attention heads or norms the weights cannot tell.
    pub config_dir: Option<PathBuf>,
}

/// A local path as given, or a hub id (`owner/name[@revision]`) fetched into the Hugging Face cache. Errors name
/// `setting` (`model`, `controls[0].controlnet`).
pub(super) fn resolve(setting: &str, spec: &str, opts: &LoadOptions) -> Result<PathBuf> {
    let path =
        hub::resolve(spec, opts.variant.as_deref()).map_err(|e| Error::setting(setting, format!("{spec}: {e}")))?;
    if !path.exists() {
        return Err(Error::setting(setting, format!("{spec}: {}", hub::missing_path_message(spec))));
    }
    Ok(path)
}

/// Refuses a file or folder that `inspect` recognises as another kind of model than `expected`, saying what it
/// is. Files `inspect` cannot read are left to the loader (its errors name the tensor or file).
pub(super) fn check_kind(setting: &str, path: &Path, accepted: &[ModelKind], expected: &str) -> Result<()> {
    let Ok(found) = inspect::inspect(path) else {
        return Ok(());
    };
    if found.kind == ModelKind::Unknown || accepted.contains(&found.kind) {
        return Ok(());
    }
    Err(Error::setting(setting, format!("{} is {}, but {expected} was expected", path.display(), found.description)))
}

/// A ControlNet from a diffusers folder, an original (lllyasviel) `.safetensors`/`.pth` file, a diffusers
/// single file, or a hub id; errors name `setting`.
/// `config`: a diffusers ControlNet `config.json` (or its folder) for a single file the weights cannot fully
/// describe.
/// `base`: the loaded base model, which a control-LoRA is built on (`None` where there is none).
pub fn open_controlnet(
    setting: &str,
    spec: &str,
    config: Option<&Path>,
    opts: &LoadOptions,
    base: Option<&StableDiffusion>,
) -> Result<ControlNetModel> {
    const EXPECTED: &str = "a ControlNet (a diffusers ControlNet folder or an original .safetensors/.pth file)";
    let path = resolve(setting, spec, opts)?;
    check_kind(setting, &path, &[ModelKind::ControlNet], EXPECTED)?;
    if path.is_dir() {
        return ControlNetModel::load(&path, opts.dtype, &opts.device);
    }
    if Checkpoint::open(&path).is_ok_and(|ck| control_lora::is_control_lora(&ck.tensors)) {
        return open_control_lora(setting, &path, opts, base);
    }
    let c = single_file::load_controlnet_file_with(&path, config)?;
    ControlNetModel::from_tensors(c.config, c.tensors, opts.dtype, &opts.device, &path)
}

/// A control-LoRA made whole on `base`'s UNet (see [`crate::io::control_lora`]): the ControlNet has the base
/// UNet's encoder config and the file's hint encoder.
fn open_control_lora(
    setting: &str,
    path: &Path,
    opts: &LoadOptions,
    base: Option<&StableDiffusion>,
) -> Result<ControlNetModel> {
    let Some(sd) = base else {
        return Err(Error::setting(
            setting,
            format!("{}: a control-LoRA is built on the base model's UNet, and none is loaded here", path.display()),
        ));
    };
    let unet = &sd.unet.config().encoder;
    if sd.sdxl.is_none() || unet.text_time_dims().ok().flatten().is_none() {
        return Err(Error::setting(
            setting,
            format!(
                "{} is a control-LoRA, which is made for SDXL (Stability's control-lora-*), but the model {} is \
                 SD 1.x/2.x: give an SDXL --model",
                path.display(),
                sd.dir.display()
            ),
        ));
    }
    let net = control_lora::build(path, &sd.unet_weights.tensors())?;
    let config = ControlNetConfig {
        encoder: unet.clone(),
        conditioning_channels: net.conditioning_channels,
        conditioning_embedding_out_channels: net.hint_channels,
        global_pool_conditions: false,
        controlnet_conditioning_channel_order: Default::default(),
        union: None,
    };
    ControlNetModel::from_config_and_tensors(&config, net.tensors, opts.dtype, &opts.device, path)
}

impl StableDiffusion {
    /// The model named by `--model`: a diffusers pipeline folder, a single-file SD checkpoint
    /// (A1111/civitai `.safetensors`/`.ckpt`), or a hub id.
    ///
    /// `prediction_type` overrides a folder's scheduler config (as diffusers' `from_pretrained(...,
    /// prediction_type=...)` does for the scheduler) and a single file's guess; `config_dir` is for single files
    /// only (a folder has its own configs).
    pub fn open(spec: &str, opts: &LoadOptions) -> Result<Self> {
        Self::open_with_loras(spec, opts, &[])
    }

    /// [`Self::open`] with `loras` merged into the weights (see [`crate::model::lora`]).
    pub fn open_with_loras(spec: &str, opts: &LoadOptions, loras: &LoraSet) -> Result<Self> {
        const EXPECTED: &str =
            "a Stable Diffusion model (a pipeline folder with model_index.json, or a single-file checkpoint)";
        let path = resolve("model", spec, opts)?;
        check_kind("model", &path, &[ModelKind::Pipeline, ModelKind::SdCheckpoint], EXPECTED)?;
        if !path.is_dir() {
            return Self::from_single_file_with_loras(&path, opts, loras);
        }
        if let Some(config) = &opts.config_dir {
            return Err(Error::setting(
                "config",
                format!(
                    "{}: the model {spec} is a pipeline folder with its own config.json files; config describes a \
                     single-file model",
                    config.display()
                ),
            ));
        }
        let mut sd = Self::load_with_loras(&path, opts.dtype, &opts.device, loras)?;
        if let Some(p) = opts.prediction_type {
            sd.scheduler_config = sd.scheduler_config.clone().with("prediction_type", p.as_str());
        }
        Ok(sd)
    }

    /// Splits a single-file checkpoint into its UNet, VAE and text encoder (`io::single_file` renames the
    /// keys); the tokenizer is the CLIP vocabulary bundled with the binary.
    pub fn from_single_file(path: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::from_single_file_with_loras(path, opts, &[])
    }

    fn from_single_file_with_loras(path: &Path, opts: &LoadOptions, loras: &LoraSet) -> Result<Self> {
        let sd_opts =
            single_file::SdOptions { prediction_type: opts.prediction_type, config_dir: opts.config_dir.clone() };
        let c = single_file::load_sd_checkpoint_with(path, &sd_opts)?;
        for note in &c.notes {
            tracing::warn!("{}: {note}", path.display());
        }
        let (dtype, dev) = (opts.dtype, &opts.device);
        let cfg_err = |what: &str, e: serde_json::Error| Error::config(path, format!("{what}: {e}"));
        let unet_cfg: UNet2DConditionConfig = serde_json::from_value(c.unet.config).map_err(|e| cfg_err("unet", e))?;
        check_lora_family(loras, c.sdxl.is_some(), unet_cfg.encoder.cross_attention_dim)?;
        let merges = Merges::new(loras, &unet_cfg);
        let unet_weights = WeightTap::new(&control_lora::ENCODER_PREFIXES);
        let unet = UNet2DConditionModel::new(
            &unet_cfg,
            unet_weights.wrap(merges.unet.wrap(VarBuilder::from_tensors(c.unet.tensors, dtype, dev))),
        )
        .map_err(|e| Error::weights(path, format!("unet: {e}")))?;
        let vae_cfg = serde_json::from_value(c.vae.config).map_err(|e| cfg_err("vae", e))?;
        let vae = AutoencoderKL::new(vae_cfg, VarBuilder::from_tensors(c.vae.tensors, dtype, dev))
            .map_err(|e| Error::weights(path, format!("vae: {e}")))?;
        let te_cfg = serde_json::from_value(c.text_encoder.config).map_err(|e| cfg_err("text encoder", e))?;
        let te_vb = merges.text_encoder.wrap(VarBuilder::from_tensors(c.text_encoder.tensors, dtype, dev));
        let text_encoder =
            ClipTextModel::new(te_cfg, te_vb).map_err(|e| Error::weights(path, format!("text encoder: {e}")))?;
        let tokenizer = ClipTokenizer::from_vocab_and_merges(
            &c.tokenizer.vocab_json,
            &c.tokenizer.merges_txt,
            &c.tokenizer.pad_token,
        )?;
        // SDXL: the second encoder and tokenizer; empty negatives are zeros, as SDXL base's model_index.json says.
        let sdxl = match c.sdxl {
            Some(x) => {
                let cfg = serde_json::from_value(x.text_encoder_2.config).map_err(|e| cfg_err("text encoder 2", e))?;
                let text_encoder_2 = ClipTextModel::new(
                    cfg,
                    merges.text_encoder_2.wrap(VarBuilder::from_tensors(x.text_encoder_2.tensors, dtype, dev)),
                )
                .map_err(|e| Error::weights(path, format!("text encoder 2: {e}")))?;
                let t = &x.tokenizer_2;
                Some(SdxlParts {
                    tokenizer_2: ClipTokenizer::from_vocab_and_merges(&t.vocab_json, &t.merges_txt, &t.pad_token)?,
                    text_encoder_2,
                    force_zeros_for_empty_prompt: true,
                })
            }
            None => None,
        };
        let scheduler_config = SchedulerConfig::from_json_str(&c.scheduler_config.to_string(), path)?;
        merges.check_all_used(loras)?;
        Ok(Self {
            loras: loras.iter().map(|(f, w)| (f.path.clone(), *w)).collect(),
            dir: path.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            scheduler_config_path: path.to_path_buf(),
            sdxl,
            unet_weights,
            vae_override: None,
        })
    }

    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_loras(dir, dtype, device, &[])
    }

    fn load_with_loras(dir: &Path, dtype: DType, device: &Device, loras: &LoraSet) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::setting("model", format!("{}: not a folder", dir.display())));
        }
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        let name = index.class_name.as_str();
        let is_sdxl = name.contains("XL");
        if is_sdxl && !SDXL_PIPELINES.contains(&name) {
            return Err(Error::config(
                &index_path,
                format!("{name} is not supported; the SDXL pipelines read are {}", SDXL_PIPELINES.join(", ")),
            ));
        }
        if !name.starts_with("StableDiffusion") {
            return Err(Error::config(&index_path, format!("{name} is not a Stable Diffusion pipeline")));
        }
        let scheduler_config_path = dir.join("scheduler").join("scheduler_config.json");
        let unet_cfg: UNet2DConditionConfig = read_json(&dir.join("unet").join("config.json"))?;
        check_lora_family(loras, is_sdxl, unet_cfg.encoder.cross_attention_dim)?;
        let merges = Merges::new(loras, &unet_cfg);
        let wrap = |m: &std::sync::Arc<LoraMerge>| {
            let m = m.clone();
            move |vb: VarBuilder<'static>| m.wrap(vb)
        };
        let sdxl = match is_sdxl {
            true => Some(SdxlParts {
                tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
                text_encoder_2: ClipTextModel::load_with(
                    &dir.join("text_encoder_2"),
                    dtype,
                    device,
                    &wrap(&merges.text_encoder_2),
                )?,
                force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
            }),
            false => None,
        };
        if let Some(parts) = &sdxl {
            if !parts.text_encoder_2.has_projection() {
                return Err(Error::config(
                    dir.join("text_encoder_2"),
                    "SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_projection weight)",
                ));
            }
        }
        let text_encoder =
            ClipTextModel::load_with(&dir.join("text_encoder"), dtype, device, &wrap(&merges.text_encoder))?;
        let unet_weights = WeightTap::new(&control_lora::ENCODER_PREFIXES);
        let merge_unet = wrap(&merges.unet);
        let unet =
            UNet2DConditionModel::load_with(&dir.join("unet"), dtype, device, &|vb| unet_weights.wrap(merge_unet(vb)))?;
        merges.check_all_used(loras)?;
        Ok(Self {
            sdxl,
            dir: dir.to_path_buf(),
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder,
            unet,
            vae: AutoencoderKL::load(&dir.join("vae"), dtype, device)?,
            scheduler_config: SchedulerConfig::from_file(&scheduler_config_path)?,
            scheduler_config_path,
            loras: loras.iter().map(|(f, w)| (f.path.clone(), *w)).collect(),
            unet_weights,
            vae_override: None,
        })
    }

    /// Uses the VAE `spec` names (a diffusers folder or hub id, or one file) in place of the model's own;
    /// `setting` names it in errors. See [`super::vae_override`].
    pub fn replace_vae(&mut self, setting: &str, spec: &str, opts: &LoadOptions) -> Result<()> {
        let (vae, path) = super::vae_override::open_vae(setting, spec, &self.vae, opts)?;
        self.vae = vae;
        self.vae_override = Some((spec.to_string(), path));
        Ok(())
    }

    /// Uses the diffusers UNet folder `dir` in place of this model's UNet (`setting` names it in errors). It
    /// must take and give the same latents and text embeddings as the UNet it replaces.
    pub fn replace_unet(&mut self, setting: &str, dir: &Path) -> Result<()> {
        if !dir.join("config.json").is_file() {
            return Err(Error::setting(
                setting,
                format!("{}: expected a diffusers UNet folder (config.json and weights)", dir.display()),
            ));
        }
        let new: UNet2DConditionConfig = read_json(&dir.join("config.json"))?;
        let old = self.unet.config();
        let checks = [
            ("in_channels", new.encoder.in_channels, old.encoder.in_channels),
            ("out_channels", new.out_channels, old.out_channels),
            ("cross_attention_dim", new.encoder.cross_attention_dim, old.encoder.cross_attention_dim),
        ];
        for (field, theirs, ours) in checks {
            if theirs != ours {
                return Err(Error::setting(
                    setting,
                    format!(
                        "{}: {field} is {theirs} but the model's own UNet has {ours}: this UNet was made for another \
                         base model",
                        dir.display()
                    ),
                ));
            }
        }
        let unet_weights = WeightTap::new(&control_lora::ENCODER_PREFIXES);
        self.unet =
            UNet2DConditionModel::load_with(dir, self.unet.dtype(), self.unet.device(), &|vb| unet_weights.wrap(vb))?;
        self.unet_weights = unet_weights;
        Ok(())
    }

    /// How much the VAE shrinks an image per side: 2^(number of VAE levels - 1), 8 for SD.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config().block_out_channels.len().saturating_sub(1))
    }

    /// The size diffusers uses when none is given and no condition image sets it: the UNet's sample size × 8.
    pub fn default_size(&self) -> usize {
        self.unet.config().sample_size.unwrap_or(64) * self.vae_scale_factor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::fixtures;
    use crate::pipeline::{generate, GenerateParams};

    /// A single-file SD1 checkpoint (original LDM names, built from the tiny pipeline by the recipe checked
    /// against diffusers' conversion) gives diffusers' latents for the tiny pipeline's `sd_no_controlnet` case.
    #[test]
    fn single_file_checkpoint_matches_its_diffusers_twin() {
        let dir = tempfile::tempdir().unwrap();
        let file = fixtures::write(dir.path(), "tiny-sd15.safetensors", &fixtures::original("sd15_single_file", None));
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            prediction_type: None,
            config_dir: Some(fixtures::fixtures().join("models/tiny-sd15")),
        };
        let sd = StableDiffusion::open(file.to_str().unwrap(), &opts).unwrap();
        assert_no_controlnet_case(&sd, 5, 7.5, 18, "pipeline/sd_no_controlnet.safetensors");
    }

    /// A single-file 9-channel inpainting checkpoint (the sd-v1-5-inpainting layout, built from
    /// tiny-sd15-inpaint by the recipe checked against diffusers' `from_single_file`) inpaints as its diffusers
    /// twin: diffusers' image of the `inp_nine_channels` case (tests/fixtures/img2img) within 40 dB.
    #[test]
    fn single_file_inpainting_checkpoint_inpaints_as_diffusers() {
        use crate::pipeline::{request::ControlRequest, run, GenerateRequest};
        let dir = tempfile::tempdir().unwrap();
        let original = fixtures::original("sd15_inpaint_single_file", None);
        let file = fixtures::write(dir.path(), "tiny-sd15-inpainting.safetensors", &original);
        let f = |p: &str| fixtures::fixtures().join(p);
        let request = GenerateRequest {
            model: Some(file.display().to_string()),
            config: Some(f("models/tiny-sd15-inpaint")),
            prompt: "a red circle on a light blue background".into(),
            controls: vec![ControlRequest::new(
                Some(f("models/tiny-controlnet-a").display().to_string()),
                f("pipeline/control_circle.png"),
            )],
            steps: 5,
            scheduler: Some("ddim".parse().unwrap()),
            seed: Some(34),
            init_image: Some(f("img2img/init.png")),
            mask: Some(f("img2img/mask.png")),
            strength: Some(1.0),
            ..GenerateRequest::default()
        };
        let out = run(&request, &Device::Cpu, &|_| {}, crate::pipeline::generate::never_cancelled()).unwrap();
        let reference = image::open(f("img2img/inp_nine_channels.png")).unwrap().to_rgb8();
        let db = crate::test_support::psnr(&out.images[0].image, &reference);
        assert!(db >= 40.0, "PSNR {db:.1} dB against diffusers' 9-channel inpainting");
    }

    /// A DPM++ 2M run without a ControlNet (128 px, the circle prompt) gives the latents of diffusers' `reference`
    /// run within 2e-4.
    fn assert_no_controlnet_case(sd: &StableDiffusion, steps: usize, guidance: f64, seed: u64, reference: &str) {
        let params = GenerateParams {
            scheduler: Some("dpm++2m".parse().unwrap()),
            ..GenerateParams::plain("a red circle on a light blue background", 128, 128, steps, guidance, seed)
        };
        let out = generate(sd, &[], &params, &mut |_, _| {}).unwrap();
        let reference = candle_core::safetensors::load(fixtures::fixtures().join(reference), &Device::Cpu).unwrap();
        let diff: f32 =
            (&out.latents - &reference["latents"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 2e-4, "latents differ by {diff}");
    }

    /// A single-file SDXL checkpoint (A1111 layout, built from tiny-sdxl by the recipe checked against diffusers'
    /// `from_single_file`) gives diffusers' latents for the SDXL folder's `sdxl_no_controlnet` case.
    #[test]
    fn sdxl_single_file_matches_diffusers() {
        let dir = tempfile::tempdir().unwrap();
        let file = fixtures::write(dir.path(), "tiny-sdxl.safetensors", &fixtures::original("sdxl_single_file", None));
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            prediction_type: None,
            config_dir: Some(fixtures::fixtures().join("models/tiny-sdxl")),
        };
        let sd = StableDiffusion::open(file.to_str().unwrap(), &opts).unwrap();
        assert!(sd.sdxl.as_ref().is_some_and(|x| x.force_zeros_for_empty_prompt));
        assert_no_controlnet_case(&sd, 4, 5.0, 22, "sdxl/sdxl_no_controlnet.safetensors");
    }

    /// Issue 14.3: `prediction_type` on a pipeline folder overrides its scheduler config, as diffusers does.
    #[test]
    fn prediction_type_applies_to_a_folder_model() {
        let folder = fixtures::fixtures().join("models/tiny-sd15");
        let open = |prediction_type| {
            let opts = LoadOptions {
                dtype: DType::F32,
                device: Device::Cpu,
                variant: None,
                prediction_type,
                config_dir: None,
            };
            StableDiffusion::open(folder.to_str().unwrap(), &opts).unwrap()
        };
        let (eps, v) = (open(None), open(Some(PredictionType::VPrediction)));
        assert_eq!(v.scheduler_config.get("prediction_type"), Some(&serde_json::json!("v_prediction")));
        let params = GenerateParams::plain("a red circle", 64, 64, 2, 7.5, 3);
        let a = generate(&eps, &[], &params, &mut |_, _| {}).unwrap();
        let b = generate(&v, &[], &params, &mut |_, _| {}).unwrap();
        let diff: f32 = (&a.latents - &b.latents).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff > 1e-3, "v_prediction changed nothing (latents differ by {diff})");
        assert_ne!(a.images[0], b.images[0]);
    }

    #[test]
    fn other_sdxl_pipelines_are_refused_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let index = r#"{"_class_name": "StableDiffusionXLImg2ImgPipeline"}"#;
        std::fs::write(dir.path().join("model_index.json"), index).unwrap();
        let err = StableDiffusion::load(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("StableDiffusionXLImg2ImgPipeline is not supported"), "{err}");
        assert!(err.contains("StableDiffusionXLControlNetPipeline"), "{err}");
    }
}
