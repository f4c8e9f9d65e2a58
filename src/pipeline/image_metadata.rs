//! The metadata an image carries in its PNG: a `parameters` text chunk as AUTOMATIC1111 writes it (so A1111,
//! ComfyUI and image viewers show it) and a `controlnet-rs` JSON chunk with everything needed to make the image
//! again (absolute paths and SHA-256s of the inputs, seed, every setting): [`ImageMetadata::to_request`].
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::control_mode::ControlMode;
use super::hires::{HiresFix, Upscaler};
use super::inpaint::MaskedContent;
use super::request::{parse_resize, ComputeDtype, ControlRequest, GenerateRequest, LoraRequest, LoraWeight};
use super::text_conditioning::{PromptSyntax, SdxlConditioning, DEFAULT_CLIP_SKIP};
use crate::io::images;
use crate::io::weights::{find_safetensors, DIFFUSERS_STEM, TRANSFORMERS_STEM};
use crate::{Error, Result};

/// PNG text key of the JSON metadata.
pub const METADATA_KEY: &str = "controlnet-rs";
/// PNG text key A1111 uses for its human-readable generation parameters.
pub const A1111_KEY: &str = "parameters";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub path: String,
    /// SHA-256 of the weights (for a folder: of the concatenated SHA-256s of its weight files, in path order).
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlMetadata {
    pub controlnet: FileRef,
    /// The annotator that made the condition from the control file (`--preprocess`), if any.
    #[serde(default)]
    pub preprocess: Option<String>,
    /// `--controlnet-config`, when one described a single file.
    #[serde(default)]
    pub config: Option<String>,
    pub control_image: FileRef,
    pub conditioning_scale: f64,
    pub control_start: f64,
    pub control_end: f64,
    /// Only the middle-block residual was used (recorded only when on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_mid_control: bool,
    /// A union net's control type, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_type: Option<String>,
    /// The condition ran in the call of the union net before it (recorded only when on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub union_join: bool,
    // Control modes (A1111's per-unit "Control Mode").
    /// `--control-mode` (recorded only when not balanced; older images have none).
    #[serde(default, skip_serializing_if = "ControlMode::is_balanced")]
    pub control_mode: ControlMode,
    // Annotator weights.
    /// Where the neural annotator's weights came from, when not the default hub repo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotator_weights: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageMetadata {
    /// "controlnet-rs <version>"
    pub software: String,
    pub model: FileRef,
    /// The UNet folder used in place of the model's own (`--unet`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet: Option<FileRef>,
    pub controls: Vec<ControlMetadata>,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// The scheduler that ran (CLI name), also when it was the model's own.
    pub scheduler: String,
    /// How conditions were fitted to the output (`--resize`).
    #[serde(default = "default_resize")]
    pub resize: String,
    /// `--config` and `--prediction-type`, when given for a single-file model.
    #[serde(default)]
    pub model_config: Option<String>,
    #[serde(default)]
    pub prediction_type: Option<String>,
    pub seed: u64,
    pub guess_mode: bool,
    /// Tiled VAE decoding (recorded only when on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vae_tiling: bool,
    /// SDXL's second prompts and size/crop conditioning (recorded only when set).
    #[serde(default, skip_serializing_if = "is_default")]
    pub sdxl: SdxlConditioning,
    /// The dtype the models computed in, when not f32 (`auto` is recorded as what it chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// How many images the run made and which one this is (1-based): images of one run share a noise batch.
    pub num_images: usize,
    pub image_index: usize,
    /// img2img's starting picture, inpainting's mask and their strength (recorded only when used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<FileRef>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub mask_blur: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// The hires fix's second pass (recorded only when used); `width`/`height` are the first pass's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresFix>,
    // Prompt syntax and clip skip (recorded only when not the defaults, plain and 1).
    #[serde(default, skip_serializing_if = "is_default")]
    pub prompt_syntax: PromptSyntax,
    #[serde(default = "default_clip_skip", skip_serializing_if = "is_default_clip_skip")]
    pub clip_skip: usize,
    // LoRA (issue 21): every LoRA merged, the prompt tags' too (the prompt is recorded without its tags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraMetadata>,
    // Textual inversion and VAE override (issue 21): the embeddings used (name, file, SHA-256) and the VAE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<EmbeddingMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<FileRef>,
    // Samplers (issue 21): DDIM's eta (recorded only when not 0).
    #[serde(default, skip_serializing_if = "is_default")]
    pub eta: f64,
    // A1111 img2img fills (issue 19): the masked content (recorded only when not "original").
    #[serde(default, skip_serializing_if = "is_default")]
    pub masked_content: MaskedContent,
    /// Inpainting only the masked area: the padding around the mask (absent: the whole picture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_mask_crop: Option<u32>,
}

/// A textual-inversion embedding the prompts could name: its name, file and SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingMetadata {
    pub name: String,
    pub path: String,
    pub sha256: String,
}

/// A LoRA merged into the model: its file, SHA-256 and weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraMetadata {
    pub path: String,
    pub sha256: String,
    /// The text encoders' multiplier, and the UNet's when `unet_weight` is absent.
    pub weight: f64,
    /// The UNet's multiplier when it differs (A1111's `<lora:name:TE:UNET>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet_weight: Option<f64>,
}

impl LoraMetadata {
    pub fn lora_weight(&self) -> LoraWeight {
        LoraWeight { text_encoder: self.weight, unet: self.unet_weight.unwrap_or(self.weight) }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_clip_skip() -> usize {
    DEFAULT_CLIP_SKIP
}

fn is_default_clip_skip(v: &usize) -> bool {
    *v == DEFAULT_CLIP_SKIP
}

fn default_resize() -> String {
    "just-resize".into()
}

/// A1111's sampler name for one of ours ("dpm++2m-karras" → "DPM++ 2M Karras").
fn a1111_sampler(name: &str) -> String {
    name.parse::<crate::schedulers::Sampler>().map_or_else(|_| name.to_string(), |s| s.a1111_name())
}

/// A short hash as A1111 shows it (first 10 hex digits of the SHA-256).
fn short(hash: &str) -> &str {
    &hash[..hash.len().min(10)]
}

/// A1111 names the VAE by its file name with the extension (`vae-ft-mse-840000-ema-pruned.safetensors`).
fn file_name(path: &str) -> &str {
    let p = std::path::Path::new(path.trim_end_matches('/'));
    p.file_name().and_then(|s| s.to_str()).unwrap_or(path)
}

fn stem(path: &str) -> &str {
    let p = std::path::Path::new(path.trim_end_matches('/'));
    p.file_stem().and_then(|s| s.to_str()).unwrap_or(path)
}

impl ImageMetadata {
    /// The `parameters` text: prompt, negative prompt, then one line of `Key: value` pairs.
    pub fn a1111_parameters(&self) -> String {
        // A1111 keeps `<lora:name:weight>` in the prompt: the tags are written back, after the text.
        let mut s = self.prompt.clone();
        for l in &self.loras {
            s.push_str(&format!(" <lora:{}:{}>", stem(&l.path), l.lora_weight()));
        }
        s.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            self.steps,
            a1111_sampler(&self.scheduler),
            self.guidance,
            self.seed,
            self.width,
            self.height,
            short(&self.model.sha256),
            stem(&self.model.path)
        ));
        for (i, c) in self.controls.iter().enumerate() {
            s.push_str(&format!(
                ", ControlNet {i}: \"Module: {}, Model: {} [{}], Weight: {}, Resize Mode: Just Resize, Guidance Start: {}, Guidance End: {}, Control Mode: {}\"",
                c.preprocess.as_deref().unwrap_or("none"),
                stem(&c.controlnet.path),
                &c.controlnet.sha256[..c.controlnet.sha256.len().min(8)],
                c.conditioning_scale,
                c.control_start,
                c.control_end,
                if self.guess_mode { ControlMode::ControlNet.a1111_name() } else { c.control_mode.a1111_name() }
            ));
        }
        if let Some(strength) = self.strength {
            s.push_str(&format!(", Denoising strength: {strength}"));
        }
        if self.mask.is_some() {
            s.push_str(&format!(", Mask blur: {}", self.mask_blur));
        }
        if self.masked_content != MaskedContent::Original {
            s.push_str(&format!(", Masked content: {}", self.masked_content.a1111_name()));
        }
        if let Some(pad) = self.padding_mask_crop {
            s.push_str(&format!(", Inpaint area: Only masked, Masked area padding: {pad}"));
        }
        if let Some(h) = &self.hires {
            let name = match h.upscaler {
                Upscaler::Latent => "Latent",
                Upscaler::Lanczos => "Lanczos",
            };
            s.push_str(&format!(
                ", Denoising strength: {}, Hires upscale: {}, Hires steps: {}, Hires upscaler: {name}",
                h.strength,
                h.scale,
                h.steps.unwrap_or(0)
            ));
        }
        if self.clip_skip != DEFAULT_CLIP_SKIP {
            s.push_str(&format!(", Clip skip: {}", self.clip_skip));
        }
        if self.eta != 0.0 {
            s.push_str(&format!(", Eta: {}", self.eta));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> = self
                .loras
                .iter()
                .map(|l| format!("{}: {}", stem(&l.path), &l.sha256[..l.sha256.len().min(12)]))
                .collect();
            s.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
        }
        if !self.embeddings.is_empty() {
            // A1111's `TI hashes`: the first 10 hex digits of each embedding file's SHA-256.
            let hashes: Vec<String> =
                self.embeddings.iter().map(|e| format!("{}: {}", e.name, short(&e.sha256))).collect();
            s.push_str(&format!(", TI hashes: \"{}\"", hashes.join(", ")));
        }
        if let Some(vae) = &self.vae {
            s.push_str(&format!(", VAE hash: {}, VAE: {}", short(&vae.sha256), file_name(&vae.path)));
        }
        if self.num_images > 1 {
            s.push_str(&format!(", Batch size: {}, Batch pos: {}", self.num_images, self.image_index - 1));
        }
        s.push_str(&format!(", Version: {}", self.software));
        s
    }

    /// Both text chunks for the PNG.
    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let json = serde_json::to_string(self).unwrap_or_default();
        vec![(A1111_KEY.to_string(), self.a1111_parameters()), (METADATA_KEY.to_string(), json)]
    }

    /// The request that makes this image's batch again. A recorded path that no longer exists is looked up
    /// relative to `png_dir` (the folder of the PNG), so images made with relative paths by older versions
    /// reproduce from anywhere.
    pub fn to_request(&self, png_dir: &Path) -> Result<GenerateRequest> {
        let find = |p: &str| find_recorded(p, png_dir);
        let prediction_type = self.prediction_type.as_deref().map(str::parse).transpose()?;
        let scheduler = self
            .scheduler
            .parse()
            .map_err(|e| Error::setting("scheduler", format!("{:?} in the image metadata: {e}", self.scheduler)))?;
        Ok(GenerateRequest {
            model: Some(find(&self.model.path)),
            config: self.model_config.as_deref().map(|c| PathBuf::from(find(c))),
            unet: self.unet.as_ref().map(|u| PathBuf::from(find(&u.path))),
            variant: None,
            prediction_type,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            controls: self
                .controls
                .iter()
                .map(|c| ControlRequest {
                    controlnet: Some(find(&c.controlnet.path)),
                    control: PathBuf::from(find(&c.control_image.path)),
                    preprocess: c.preprocess.clone(),
                    controlnet_config: c.config.as_deref().map(|p| PathBuf::from(find(p))),
                    conditioning_scale: c.conditioning_scale,
                    control_start: c.control_start,
                    control_end: c.control_end,
                    only_mid_control: c.only_mid_control,
                    control_type: c.control_type.clone(),
                    union_join: c.union_join,
                    control_mode: c.control_mode,
                    annotator_weights: c.annotator_weights.as_deref().map(find),
                })
                .collect(),
            width: Some(self.width),
            height: Some(self.height),
            steps: self.steps,
            guidance: self.guidance,
            scheduler: Some(scheduler),
            seed: Some(self.seed),
            num_images: self.num_images,
            guess_mode: self.guess_mode,
            vae_tiling: self.vae_tiling,
            resize: parse_resize(&self.resize)?,
            sdxl: self.sdxl.clone(),
            dtype: match &self.dtype {
                Some(name) => ComputeDtype::parse(name)?,
                None => ComputeDtype::F32,
            },
            init_image: self.init_image.as_ref().map(|f| PathBuf::from(find(&f.path))),
            mask: self.mask.as_ref().map(|f| PathBuf::from(find(&f.path))),
            mask_blur: self.mask_blur,
            strength: self.strength,
            hires: self.hires.clone(),
            prompt_syntax: self.prompt_syntax,
            clip_skip: self.clip_skip,
            loras: self
                .loras
                .iter()
                .map(|l| LoraRequest { path: PathBuf::from(find(&l.path)), weight: l.lora_weight() })
                .collect(),
            lora_dir: None,
            embeddings: self.embeddings.iter().map(|e| PathBuf::from(find(&e.path))).collect(),
            embeddings_dir: None,
            vae: self.vae.as_ref().map(|v| find(&v.path)),
            eta: self.eta,
            masked_content: self.masked_content,
            padding_mask_crop: self.padding_mask_crop,
        })
    }

    /// Reads the metadata back from a PNG's text chunks.
    pub fn from_text_chunks(chunks: &[(String, String)]) -> Option<ImageMetadata> {
        chunks.iter().find(|(k, _)| k == METADATA_KEY).and_then(|(_, v)| serde_json::from_str(v).ok())
    }
}

/// A recorded path as it is when it exists, else relative to `png_dir` when that exists, else as recorded (a hub
/// id, or a file that is gone: loading names it).
fn find_recorded(recorded: &str, png_dir: &Path) -> String {
    if Path::new(recorded).exists() {
        return recorded.to_string();
    }
    let beside = png_dir.join(recorded);
    if beside.exists() {
        return beside.display().to_string();
    }
    recorded.to_string()
}

/// How a local input is recorded: its absolute path (so the image can be made again from any folder); a hub
/// id as it is.
pub fn recorded_path(spec: &str) -> String {
    let path = Path::new(spec);
    if !path.exists() {
        return spec.to_string();
    }
    std::path::absolute(path).map_or_else(|_| spec.to_string(), |p| p.display().to_string())
}

/// A local input's [`FileRef`]: absolute path and SHA-256.
pub fn file_ref(path: &Path) -> Result<FileRef> {
    Ok(FileRef { path: recorded_path(&path.display().to_string()), sha256: images::sha256_file(path)? })
}

/// SHA-256 of a weights file; for a folder, over the SHA-256s of its weight files (a pipeline's: unet, vae and
/// text encoder).
pub fn weights_hash(path: &Path, pipeline: bool) -> Result<String> {
    if !path.is_dir() {
        return images::sha256_file(path);
    }
    let mut files = Vec::new();
    if pipeline {
        for (sub, stem) in [("unet", DIFFUSERS_STEM), ("vae", DIFFUSERS_STEM), ("text_encoder", TRANSFORMERS_STEM)] {
            files.extend(find_safetensors(&path.join(sub), stem)?);
        }
    } else {
        files = find_safetensors(path, DIFFUSERS_STEM)?;
    }
    combined_hash(&files)
}

fn combined_hash(files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    if let [one] = files {
        return images::sha256_file(one);
    }
    let mut h = Sha256::new();
    for f in files {
        h.update(images::sha256_file(f)?.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sample_metadata() -> ImageMetadata {
        sample()
    }

    fn sample() -> ImageMetadata {
        ImageMetadata {
            software: "controlnet-rs 0.1.0".into(),
            model: FileRef { path: "models/sd15".into(), sha256: "0123456789abcdef".into() },
            unet: None,
            controls: vec![ControlMetadata {
                controlnet: FileRef { path: "cn/canny".into(), sha256: "fedcba9876543210".into() },
                preprocess: None,
                config: None,
                control_image: FileRef { path: "edges.png".into(), sha256: "aa".into() },
                conditioning_scale: 0.8,
                control_start: 0.0,
                control_end: 0.5,
                only_mid_control: false,
                control_type: None,
                union_join: false,
                control_mode: ControlMode::Prompt,
                annotator_weights: None,
            }],
            prompt: "a cat".into(),
            negative_prompt: "".into(),
            width: 512,
            height: 512,
            steps: 20,
            guidance: 7.5,
            scheduler: "euler-a".into(),
            resize: "just-resize".into(),
            model_config: None,
            prediction_type: None,
            seed: 42,
            guess_mode: false,
            vae_tiling: false,
            sdxl: SdxlConditioning::default(),
            dtype: None,
            num_images: 1,
            image_index: 1,
            init_image: None,
            mask: None,
            mask_blur: 0,
            strength: None,
            hires: None,
            prompt_syntax: PromptSyntax::Plain,
            clip_skip: DEFAULT_CLIP_SKIP,
            loras: Vec::new(),
            embeddings: Vec::new(),
            vae: None,
            eta: 0.0,
            masked_content: MaskedContent::Original,
            padding_mask_crop: None,
        }
    }

    /// Embeddings and the VAE are recorded only when used, restored as files, and A1111's `parameters` get
    /// `TI hashes` and `VAE hash`/`VAE` as A1111 writes them (short hashes: 10 hex digits).
    #[test]
    fn embeddings_and_vae_round_trip() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("embeddings") && !json.contains("\"vae\""), "{json}");
        let old: ImageMetadata = serde_json::from_str(&json).unwrap();
        assert!(old.embeddings.is_empty() && old.vae.is_none());
        let m = ImageMetadata {
            embeddings: vec![EmbeddingMetadata {
                name: "inkstyle".into(),
                path: "/e/inkstyle.pt".into(),
                sha256: "abcdef0123456789".into(),
            }],
            vae: Some(FileRef { path: "/v/vae-ft-mse.safetensors".into(), sha256: "9876543210fedcba".into() }),
            ..sample()
        };
        let back = ImageMetadata::from_text_chunks(&m.text_chunks()).unwrap();
        assert_eq!(back, m);
        let r = back.to_request(Path::new(".")).unwrap();
        assert_eq!(r.embeddings, vec![PathBuf::from("/e/inkstyle.pt")]);
        assert_eq!(r.vae.as_deref(), Some("/v/vae-ft-mse.safetensors"));
        let p = m.a1111_parameters();
        assert!(p.contains(", TI hashes: \"inkstyle: abcdef0123\""), "{p}");
        assert!(p.contains(", VAE hash: 9876543210, VAE: vae-ft-mse.safetensors"), "{p}");
    }

    /// Prompt syntax and clip skip are recorded only when not the defaults, restored, and an old PNG without
    /// them reads as plain, 1.
    #[test]
    fn prompt_syntax_and_clip_skip_round_trip() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("clip_skip") && !json.contains("prompt_syntax"), "{json}");
        let old: ImageMetadata = serde_json::from_str(&json).unwrap();
        assert_eq!((old.prompt_syntax, old.clip_skip), (PromptSyntax::Plain, 1));
        let m = ImageMetadata { prompt_syntax: PromptSyntax::A1111, clip_skip: 2, ..sample() };
        let back: ImageMetadata = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        let r = back.to_request(Path::new(".")).unwrap();
        assert_eq!((r.prompt_syntax, r.clip_skip), (PromptSyntax::A1111, 2));
        assert!(m.a1111_parameters().contains(", Clip skip: 2"), "{}", m.a1111_parameters());
    }

    /// The masked content is recorded only when not "original", restored, and an old PNG reads as "original".
    #[test]
    fn masked_content_round_trips() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("masked_content"), "{json}");
        let old: ImageMetadata = serde_json::from_str(&json).unwrap();
        assert_eq!(old.masked_content, MaskedContent::Original);
        let m = ImageMetadata { masked_content: MaskedContent::LatentNoise, ..sample() };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"masked_content\":\"latent-noise\""), "{json}");
        let back: ImageMetadata = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_request(Path::new(".")).unwrap().masked_content, MaskedContent::LatentNoise);
        assert!(m.a1111_parameters().contains(", Masked content: latent noise"), "{}", m.a1111_parameters());
    }

    /// An image made in bf16 says so and is reproduced in bf16; an f32 one's metadata has no dtype key.
    #[test]
    fn dtype_is_recorded_when_not_f32() {
        let f32_json = serde_json::to_string(&sample()).unwrap();
        assert!(!f32_json.contains("dtype"), "{f32_json}");
        assert_eq!(sample().to_request(Path::new(".")).unwrap().dtype, ComputeDtype::F32);
        let bf16 = ImageMetadata { dtype: Some("bf16".into()), ..sample() };
        let back: ImageMetadata = serde_json::from_str(&serde_json::to_string(&bf16).unwrap()).unwrap();
        assert_eq!(back.to_request(Path::new(".")).unwrap().dtype, ComputeDtype::Bf16);
        let bad = ImageMetadata { dtype: Some("fp8".into()), ..sample() };
        assert!(bad.to_request(Path::new(".")).unwrap_err().to_string().contains("fp8"));
    }

    #[test]
    fn a1111_parameters_layout() {
        let p = sample().a1111_parameters();
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "a cat");
        assert_eq!(lines[1], "Negative prompt: ");
        assert!(lines[2].starts_with("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: sd15"), "{}", lines[2]);
        assert!(
            lines[2].contains("ControlNet 0: \"Module: none, Model: canny [fedcba98], Weight: 0.8"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("Guidance End: 0.5"));
    }

    #[test]
    fn json_round_trip() {
        let r = sample();
        let back = ImageMetadata::from_text_chunks(&r.text_chunks()).unwrap();
        assert_eq!(back, r);
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;

    /// Paths recorded relative to where the image was made are found beside the PNG.
    #[test]
    fn missing_relative_paths_are_found_beside_the_png() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("edges.png"), b"png").unwrap();
        let mut m = super::tests::sample_metadata();
        m.controls[0].control_image.path = "edges.png".into();
        let r = m.to_request(dir.path()).unwrap();
        assert_eq!(r.controls[0].control, dir.path().join("edges.png"));
        // A path that exists nowhere (or a hub id) stays as recorded.
        assert_eq!(r.controls[0].controlnet.as_deref(), Some("cn/canny"));
        assert_eq!(r.seed, Some(42));
        assert_eq!(r.scheduler, Some("euler-a".parse().unwrap()));
    }

    #[test]
    fn local_inputs_are_recorded_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.png");
        std::fs::write(&file, b"png").unwrap();
        assert!(Path::new(&recorded_path(file.to_str().unwrap())).is_absolute());
        assert_eq!(recorded_path("owner/name"), "owner/name");
    }
}
