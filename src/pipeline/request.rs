//! What to generate: [`GenerateRequest`], with the defaults and the checks every front end shares (the CLI, a
//! server, a batch file). Errors name the request's own fields (`steps`, `controls[1].control_end`); each front
//! end shows them in its words.
use crate::model::controlnet_union::parse_control_type;
use std::path::{Path, PathBuf};

use crate::annotate::ResizeMode;
pub use crate::io::lora::LoraWeight;
use crate::io::single_file::PredictionType;
use crate::schedulers::{Sampler, SchedulerKind};
use crate::{Error, Result};

use super::control_mode::ControlMode;
use super::demo;
use super::hires::HiresFix;
use super::inpaint::MaskedContent;
pub use super::text_conditioning::{PromptOptions, PromptSyntax, SdxlConditioning, DEFAULT_CLIP_SKIP};

/// Denoising steps when none are asked for.
pub const DEFAULT_STEPS: usize = 20;
/// Classifier-free guidance scale when none is asked for (diffusers' default).
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// img2img strength when none is asked for (diffusers' img2img default).
pub const DEFAULT_STRENGTH: f64 = 0.8;
/// Inpainting strength when none is asked for (diffusers' inpaint default: repaint the masked area fully).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;
/// The only weight variant the hub download knows.
pub const VARIANTS: &[&str] = &["fp16"];

/// The dtype the models compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// f32 throughout (the reference: images match diffusers' f32 ones).
    #[default]
    F32,
    /// bf16 weights (half the memory). On the CPU the activations, norms and sums stay f32 and the matrix
    /// products run on the CPU's bf16 units (AMX or AVX512-BF16) where it has them; elsewhere bf16 throughout.
    Bf16,
    /// f16 weights (half the memory). On the CPU the activations stay f32 and the products run in f32 on the
    /// weights widened as read (no x86 unit multiplies f16 faster, and f32 keeps f16's precision); elsewhere
    /// f16 throughout.
    F16,
    /// bf16 where the CPU multiplies bf16 natively (AMX or AVX512-BF16), else f32; bf16 on a CUDA GPU (tensor
    /// cores, with f32's exponent range: no fp16 overflow in the VAE).
    Auto,
}

impl ComputeDtype {
    pub const NAMES: &'static [&'static str] = &["f32", "bf16", "f16", "auto"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "auto" => Ok(Self::Auto),
            other => Err(Error::setting("dtype", format!("unknown dtype '{other}' (expected f32, bf16, f16 or auto)"))),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The dtype models are loaded in on `device`.
    pub fn resolve(self, device: &candle_core::Device) -> candle_core::DType {
        use candle_core::DType;
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::Auto if device.is_cuda() => DType::BF16,
            Self::Auto if device.is_cpu() && crate::model::ops::bf16::Kernel::detect().native() => DType::BF16,
            Self::Auto => DType::F32,
        }
    }
}

/// One ControlNet, its condition, and when and how strongly it acts.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    /// A diffusers folder, an original (lllyasviel) `.safetensors`/`.pth` file, or a hub id; `None`: the demo
    /// ControlNet (only with the demo model and a single condition).
    pub controlnet: Option<String>,
    /// The condition: an image, an OpenPose JSON (`preprocess` = `pose`), or a `.safetensors` file holding a
    /// float tensor `control` of shape (1, channels, height, width) used as it is.
    pub control: PathBuf,
    /// Make the condition with this annotator first (`canny`, `lineart`, `pose`, ...).
    pub preprocess: Option<String>,
    /// A diffusers `config.json` for a single-file ControlNet the weights cannot fully describe.
    pub controlnet_config: Option<PathBuf>,
    /// Multiplies every residual of this net (`controlnet_conditioning_scale`).
    pub conditioning_scale: f64,
    /// The fraction of the steps where this net starts / stops acting (`control_guidance_start/end`).
    pub control_start: f64,
    pub control_end: f64,
    /// The UNet gets only this net's middle-block residual, not its down-block ones (the original repo's
    /// `only_mid_control`, for nets trained that way: `train --only-mid-control`).
    pub only_mid_control: bool,
    /// A union net's condition type (`canny`, `depth`, an alias such as `hed`, or an index; see
    /// `model::controlnet_union::CONTROL_TYPES`); required by union nets, refused by the others.
    pub control_type: Option<String>,
    /// Run this condition in the same call as the unit before it, which must be the same union net (diffusers'
    /// single union net with a list of conditions; xinsir's multi-condition use): the conditions' tokens are
    /// mixed in one pass and each scale weighs its own condition. The call's window and control mode are the
    /// first unit's; this unit's own must be left at their defaults or equal them.
    pub union_join: bool,
    // Control modes (A1111's per-unit "Control Mode").
    /// How this net balances itself against the prompt (`--control-mode`).
    pub control_mode: ControlMode,
    // Annotator weights.
    /// Where `preprocess`'s neural annotator finds its weights: a folder holding the upstream file names, a
    /// file or a hub id; `None`: the hub repo `lllyasviel/Annotators`.
    pub annotator_weights: Option<String>,
}

impl ControlRequest {
    /// `control` for the given net with the default scale (1) and window (0 to 1).
    pub fn new(controlnet: Option<String>, control: impl Into<PathBuf>) -> Self {
        Self {
            controlnet,
            control: control.into(),
            preprocess: None,
            controlnet_config: None,
            conditioning_scale: 1.0,
            control_start: 0.0,
            control_end: 1.0,
            only_mid_control: false,
            control_type: None,
            union_join: false,
            control_mode: ControlMode::Balanced,
            annotator_weights: None,
        }
    }
}

/// Everything one generate call needs. [`Default`] gives the documented defaults; set `prompt` and what else
/// matters, then hand it to [`super::run`] (or to a [`super::Generator`] holding loaded models).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// A diffusers pipeline folder, a single-file SD checkpoint or a hub id; `None`: the bundled demo model.
    pub model: Option<String>,
    /// For a single-file `model`: a pipeline folder whose `config.json` files describe it.
    pub config: Option<PathBuf>,
    /// A diffusers UNet folder used in place of the model's own (e.g. `train --unlock-decoder`'s `RUN/unet/`).
    pub unet: Option<PathBuf>,
    /// Prefer this weight variant when downloading from the hub (only `fp16`).
    pub variant: Option<String>,
    /// What the model predicts: for a single file, overrides the guess; for a folder, overrides its scheduler
    /// config's `prediction_type` (as diffusers' `from_pretrained(..., prediction_type=...)`).
    pub prediction_type: Option<PredictionType>,
    pub prompt: String,
    pub negative_prompt: String,
    pub controls: Vec<ControlRequest>,
    /// Output size; default: the first condition's size rounded down to a multiple of the VAE's factor (8),
    /// else the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    /// Classifier-free guidance scale; off at 1 or below.
    pub guidance: f64,
    /// `None`: the model's own scheduler. A [`Sampler`] may also force Karras or exponential sigmas.
    pub scheduler: Option<Sampler>,
    /// `None`: a random seed, reported by [`super::Progress::Started`] and in the output.
    pub seed: Option<u64>,
    /// Images made in one batch (they share one noise draw, so image k depends on the batch size).
    pub num_images: usize,
    /// Control on the conditional half only (the nets recognise the condition without a prompt).
    pub guess_mode: bool,
    /// Decode in overlapping tiles of the VAE's `sample_size`: the decoder's memory stays that of one tile.
    pub vae_tiling: bool,
    /// How a condition of another size is fitted to the output.
    pub resize: ResizeMode,
    /// SDXL's second prompts and size/crop conditioning (an SD 1.x/2.x model warns and ignores them).
    pub sdxl: SdxlConditioning,
    /// The dtype the models compute in (f32 by default).
    pub dtype: ComputeDtype,
    /// img2img: start from this picture (resized to the output size; it gives the default size) instead of
    /// pure noise; the conditions still come from `controls`.
    pub init_image: Option<PathBuf>,
    /// Inpainting: a mask of `init_image`'s size; white (grey >= 128) is repainted, black kept. Binarised at half
    /// as diffusers does; a mask with many mid-grey pixels (a picture, not a mask) is refused.
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the mask by this Gaussian radius in pixels first (diffusers' `mask_processor.blur`,
    /// PIL's `GaussianBlur`); 0: none. The blurred mask is still binarised, so this rounds its shape.
    pub mask_blur: u32,
    /// img2img and inpainting: in (0, 1], the share of the steps that run on the noised picture (diffusers'
    /// `strength`; 1 repaints everything). `None`: 0.8 for img2img, 1 for inpainting (diffusers' defaults).
    pub strength: Option<f64>,
    /// A1111's hires fix: a second, img2img pass at a larger size after this one.
    pub hires: Option<HiresFix>,
    // Prompt syntax and clip skip (docs/prompts.md).
    /// `plain` (diffusers: at most 75 tokens, no syntax) or `a1111` (weights, BREAK, 75-token chunks).
    pub prompt_syntax: PromptSyntax,
    /// A1111's clip skip: 1 = the usual text encoder layer, 2 = one earlier, ...
    pub clip_skip: usize,
    // LoRA (issue 21): files merged into the weights at load, and the folder `<lora:name:w>` tags name.
    /// LoRA files with their weights (`--lora FILE[:WEIGHT]`); prompt tags are added by
    /// [`super::extra_networks::resolve_lora_tags`].
    pub loras: Vec<LoraRequest>,
    /// Where `<lora:name:weight>` tags in the prompts are found (`name.safetensors`, subfolders too).
    pub lora_dir: Option<PathBuf>,
    // Textual inversion and VAE override (issue 21): embeddings named in prompts; another VAE.
    /// Embedding files (`.pt`, `.bin`, `.safetensors`), each triggered by its name (the file stem).
    pub embeddings: Vec<PathBuf>,
    /// A1111's embeddings folder: a file there (subfolders too) is used when its name occurs in a prompt.
    pub embeddings_dir: Option<PathBuf>,
    /// A VAE used in place of the model's: a diffusers AutoencoderKL folder or hub id, or one file (original
    /// LDM names as vae-ft-mse-840000 has them, or diffusers names).
    pub vae: Option<String>,
    // Samplers (issue 21): DDIM's eta.
    /// DDIM's eta in [0, 1] (diffusers' `eta=`): the share of fresh noise each step adds, drawn from the seed's
    /// generator; 0 (the default) is deterministic DDIM. Other schedulers refuse a value other than 0.
    pub eta: f64,
    // A1111 img2img fills (issue 19): what the masked area starts from.
    /// Inpainting: `original` (the picture), `latent-noise` or `latent-nothing` (A1111's masked content).
    pub masked_content: MaskedContent,
    /// Inpainting only the masked area (diffusers' `padding_mask_crop`): the mask's box grown by this many
    /// pixels and widened to the output's aspect ratio is processed at the output size and pasted back.
    pub padding_mask_crop: Option<u32>,
}

/// One LoRA to merge: its `.safetensors` file and weight (1: as trained), the text encoders' and the UNet's.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRequest {
    pub path: PathBuf,
    pub weight: LoraWeight,
}

impl LoraRequest {
    /// `FILE[:WEIGHT]` or `FILE:TE:UNET` (A1111's two multipliers; weight 1 when left out); errors name `lora`.
    /// A path that exists as written is taken whole (a file name may hold `:`).
    pub fn parse(spec: &str) -> Result<Self> {
        if Path::new(spec).is_file() {
            return Ok(Self { path: PathBuf::from(spec), weight: LoraWeight::uniform(1.0) });
        }
        // Up to two numbers after the last colons, the last one first.
        let (mut path, mut numbers, mut not_a_number) = (spec, Vec::new(), false);
        while numbers.len() < 2 {
            let Some((head, tail)) = path.rsplit_once(':').filter(|(head, _)| !head.is_empty()) else { break };
            match tail.trim().parse::<f64>() {
                Ok(w) if w.is_finite() => {
                    numbers.insert(0, w);
                    path = head;
                }
                _ => {
                    not_a_number = numbers.is_empty();
                    break;
                }
            }
        }
        if !Path::new(path).is_file() {
            return Err(match not_a_number {
                true => Error::setting("lora", format!("{spec}: the weight after ':' must be a number")),
                false => Error::setting("lora", format!("{path}: no such file")),
            });
        }
        let weight = match numbers[..] {
            [] => LoraWeight::uniform(1.0),
            [w] => LoraWeight::uniform(w),
            [te, unet, ..] => LoraWeight { text_encoder: te, unet },
        };
        Ok(Self { path: PathBuf::from(path), weight })
    }
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            model: None,
            config: None,
            unet: None,
            variant: None,
            prediction_type: None,
            prompt: String::new(),
            negative_prompt: String::new(),
            controls: Vec::new(),
            width: None,
            height: None,
            steps: DEFAULT_STEPS,
            guidance: DEFAULT_GUIDANCE,
            scheduler: None,
            seed: None,
            num_images: 1,
            guess_mode: false,
            vae_tiling: false,
            resize: ResizeMode::JustResize,
            sdxl: SdxlConditioning::default(),
            dtype: ComputeDtype::F32,
            init_image: None,
            mask: None,
            mask_blur: 0,
            strength: None,
            hires: None,
            prompt_syntax: PromptSyntax::Plain,
            clip_skip: DEFAULT_CLIP_SKIP,
            loras: Vec::new(),
            lora_dir: None,
            embeddings: Vec::new(),
            embeddings_dir: None,
            vae: None,
            eta: 0.0,
            masked_content: MaskedContent::Original,
            padding_mask_crop: None,
        }
    }
}

/// A per-ControlNet setting's name: `controls[0].control_end`.
pub fn control_setting(index: usize, field: &str) -> String {
    format!("controls[{index}].{field}")
}

impl GenerateRequest {
    /// The request with the bundled demo model and demo ControlNet filled in where none is named: the demo
    /// model when `model` is `None`, and its ControlNet for a single condition without a net.
    pub fn with_demo_defaults(&self) -> Result<Self> {
        let mut r = self.clone();
        if r.model.is_none() {
            r.model = Some(demo::base()?.display().to_string());
            match r.controls.as_mut_slice() {
                [one] if one.controlnet.is_none() => one.controlnet = Some(demo::controlnet()?.display().to_string()),
                [] | [_] => {}
                several => {
                    if let Some(i) = several.iter().position(|c| c.controlnet.is_none()) {
                        return Err(Error::setting(
                            control_setting(i, "controlnet"),
                            format!("{} conditions but no ControlNet: the demo ControlNet takes one", several.len()),
                        ));
                    }
                }
            }
        }
        if let Some(i) = r.controls.iter().position(|c| c.controlnet.is_none()) {
            return Err(Error::setting(control_setting(i, "controlnet"), "no ControlNet given for this condition"));
        }
        Ok(r)
    }

    /// The checks that need no model: counts, ranges, names. Size and conditions are checked against the
    /// model when it runs.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::setting("steps", "must be at least 1"));
        }
        if self.num_images == 0 {
            return Err(Error::setting("num_images", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(Error::setting("eta", format!("{} must lie in [0, 1]", self.eta)));
        }
        // (the model's own scheduler is checked when it is built)
        if let Some(s) = self.scheduler.filter(|s| self.eta != 0.0 && s.kind != SchedulerKind::Ddim) {
            let msg = format!("{} is only used by the ddim scheduler, not {}", self.eta, s.kind.cli_name());
            return Err(Error::setting("eta", msg));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(Error::setting("guidance", format!("{} must be a finite number >= 0", self.guidance)));
        }
        if let Some(v) = &self.variant {
            if !VARIANTS.contains(&v.as_str()) {
                return Err(Error::setting(
                    "variant",
                    format!(
                        "{v:?} is not a weight variant this tool reads; the valid value is {}",
                        VARIANTS.join(", ")
                    ),
                ));
            }
        }
        if let Some(strength) = self.strength {
            super::generate::check_strength(strength)?;
        }
        if self.padding_mask_crop.is_some() && self.mask.is_none() {
            return Err(Error::setting("padding_mask_crop", "crops around the inpainting mask: it needs a mask"));
        }
        if self.masked_content != MaskedContent::Original && self.mask.is_none() {
            let msg = format!("{} fills the masked area: it needs a mask", self.masked_content.name());
            return Err(Error::setting("masked_content", msg));
        }
        if let Some(hires) = &self.hires {
            hires.validate()?;
            if self.init_image.is_some() {
                return Err(Error::setting(
                    "hires.scale",
                    "the hires fix follows a txt2img pass; with init_image, run img2img at the larger size instead",
                ));
            }
        }
        if self.clip_skip == 0 {
            return Err(Error::setting(
                "clip_skip",
                "0: clip skip counts from 1 (the usual layer); 2 is one layer earlier",
            ));
        }
        if self.prompt_syntax == PromptSyntax::A1111 {
            for (setting, text) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
                super::prompt_parser::parse(text, setting)?;
            }
        }
        if self.mask.is_some() && self.init_image.is_none() {
            return Err(Error::setting("mask", "inpainting needs the picture to paint in: set init_image"));
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == Some(0) {
                return Err(Error::setting(name, "0 is not a positive size"));
            }
        }
        for (i, c) in self.controls.iter().enumerate() {
            let setting = |field: &str| control_setting(i, field);
            for (field, v) in [("control_start", c.control_start), ("control_end", c.control_end)] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(Error::setting(setting(field), format!("{v} must lie in [0, 1]")));
                }
            }
            if c.control_start > c.control_end {
                return Err(Error::setting(
                    setting("control_start"),
                    format!("{} is after the end of the window ({})", c.control_start, c.control_end),
                ));
            }
            if !c.conditioning_scale.is_finite() {
                return Err(Error::setting(
                    setting("conditioning_scale"),
                    format!("{} is not a number", c.conditioning_scale),
                ));
            }
            if let Some(kind) = &c.control_type {
                parse_control_type(kind).map_err(|m| Error::setting(setting("control_type"), m))?;
                if self.guess_mode {
                    return Err(Error::setting(
                        "guess_mode",
                        "guess mode is not offered with union nets (diffusers' union pipeline fails on it too)",
                    ));
                }
                if c.control_mode.conditional_only() {
                    return Err(Error::setting(
                        setting("control_mode"),
                        "\"ControlNet is more important\" is not offered with union nets (their token transformer \
                         mixes the guided batch)",
                    ));
                }
            }
            if c.union_join {
                self.check_union_join(i)?;
            }
        }
        Ok(())
    }

    /// A joined unit (see [`ControlRequest::union_join`]) follows a unit of the same union net and shares its
    /// call: the same window, control mode and middle-only setting (its own left at the defaults or equal).
    fn check_union_join(&self, i: usize) -> Result<()> {
        let setting = |field: &str| control_setting(i, field);
        let (c, defaults) = (&self.controls[i], ControlRequest::new(None, ""));
        let Some(head) = i.checked_sub(1).map(|p| &self.controls[p]) else {
            return Err(Error::setting(setting("union_join"), "the first ControlNet has no unit before it to join"));
        };
        if c.controlnet.is_none() || c.controlnet != head.controlnet {
            return Err(Error::setting(
                setting("union_join"),
                format!(
                    "joins the unit before it, so it must name the same union net ({}) but names {}",
                    head.controlnet.as_deref().unwrap_or("the demo net"),
                    c.controlnet.as_deref().unwrap_or("the demo net")
                ),
            ));
        }
        if c.control_type.is_none() {
            return Err(Error::setting(setting("control_type"), "a joined condition needs its control type"));
        }
        let same = |a: f64, b: f64, default: f64| a == b || a == default;
        for (field, mine, theirs, default) in [
            ("control_start", c.control_start, head.control_start, defaults.control_start),
            ("control_end", c.control_end, head.control_end, defaults.control_end),
        ] {
            if !same(mine, theirs, default) {
                return Err(Error::setting(
                    setting(field),
                    format!("{mine}: a joined condition runs in its head's call, whose window has {theirs}"),
                ));
            }
        }
        if c.control_mode != head.control_mode && c.control_mode != defaults.control_mode {
            return Err(Error::setting(setting("control_mode"), "a joined condition takes its head's control mode"));
        }
        if c.only_mid_control != head.only_mid_control && c.only_mid_control {
            return Err(Error::setting(setting("only_mid_control"), "a joined condition takes its head's setting"));
        }
        Ok(())
    }

    /// The strength img2img or inpainting runs with: the one given, else diffusers' default for the kind of run.
    pub fn effective_strength(&self) -> f64 {
        let default = if self.mask.is_some() { DEFAULT_INPAINT_STRENGTH } else { DEFAULT_STRENGTH };
        self.strength.unwrap_or(default)
    }

    /// Notes about settings that do nothing for this request (a front end shows them as warnings).
    pub fn unused_settings(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.guess_mode && self.controls.is_empty() {
            notes.push("guess_mode: no ControlNet is used, so guess mode changes nothing".to_string());
        }
        if self.init_image.is_none() && self.strength.is_some() {
            notes.push("strength: no init_image is given, so the strength changes nothing".to_string());
        }
        if self.mask.is_none() && self.mask_blur > 0 {
            notes.push("mask_blur: no mask is given, so the blur changes nothing".to_string());
        }
        if self.mask.is_some() && self.masked_content != MaskedContent::Original && self.effective_strength() >= 1.0 {
            notes.push(format!(
                "masked_content: at strength 1 the masked area starts from pure noise, so {} changes nothing",
                self.masked_content.name()
            ));
        }
        notes
    }
}

/// A seed for a request that gave none: from the clock and the process id, below 2^53 so that it survives
/// JSON tools that read numbers as doubles.
pub fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    ((nanos ^ (std::process::id() as u128) << 32) as u64) & ((1 << 53) - 1)
}

/// The name of a resize mode as front ends and the image metadata write it.
pub fn resize_name(mode: ResizeMode) -> &'static str {
    match mode {
        ResizeMode::JustResize => "just-resize",
        ResizeMode::CropAndResize => "crop-and-resize",
        ResizeMode::ResizeAndFill => "resize-and-fill",
    }
}

/// The resize mode called `name` ([`resize_name`]'s inverse).
pub fn parse_resize(name: &str) -> Result<ResizeMode> {
    [ResizeMode::JustResize, ResizeMode::CropAndResize, ResizeMode::ResizeAndFill]
        .into_iter()
        .find(|m| resize_name(*m) == name)
        .ok_or_else(|| {
            Error::setting("resize", format!("{name:?}: expected just-resize, crop-and-resize or resize-and-fill"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_specs_take_one_or_two_weights() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ink.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let f = file.display();
        let weight = |spec: &str| LoraRequest::parse(spec).map(|l| (l.path == file, l.weight));
        assert_eq!(weight(&f.to_string()).unwrap(), (true, LoraWeight::uniform(1.0)));
        assert_eq!(weight(&format!("{f}:0.8")).unwrap(), (true, LoraWeight::uniform(0.8)));
        let split = LoraWeight { text_encoder: 0.4, unet: 1.2 };
        assert_eq!(weight(&format!("{f}:0.4:1.2")).unwrap(), (true, split));
        assert_eq!(split.to_string(), "0.4:1.2");
        let err = weight(&format!("{f}:strong")).unwrap_err().to_string();
        assert!(err.contains("must be a number") && err.contains("lora"), "{err}");
        let err = weight(&format!("{f}:1:2:3")).unwrap_err().to_string();
        assert!(err.contains("no such file"), "{err}");
    }

    #[test]
    fn dtypes_parse_their_names() {
        for &name in ComputeDtype::NAMES {
            assert_eq!(ComputeDtype::parse(name).unwrap().name(), name);
        }
        let err = ComputeDtype::parse("fp8").unwrap_err().to_string();
        assert!(err.contains("dtype") && err.contains("fp8"), "{err}");
        assert_eq!(GenerateRequest::default().dtype, ComputeDtype::F32);
        let cpu = candle_core::Device::Cpu;
        assert_eq!(ComputeDtype::Bf16.resolve(&cpu), candle_core::DType::BF16);
        let native = crate::model::ops::bf16::Kernel::detect().native();
        let auto = if native { candle_core::DType::BF16 } else { candle_core::DType::F32 };
        assert_eq!(ComputeDtype::Auto.resolve(&cpu), auto);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let r = GenerateRequest::default();
        assert_eq!((r.steps, r.guidance, r.num_images), (20, 7.5, 1));
        assert_eq!(r.resize, ResizeMode::JustResize);
        let c = ControlRequest::new(None, "a.png");
        assert_eq!((c.conditioning_scale, c.control_start, c.control_end), (1.0, 0.0, 1.0));
    }

    #[test]
    fn errors_name_the_setting_not_a_flag() {
        let bad = |f: fn(&mut GenerateRequest)| {
            let mut r = GenerateRequest { controls: vec![ControlRequest::new(None, "a.png")], ..Default::default() };
            f(&mut r);
            r.validate().unwrap_err().to_string()
        };
        assert_eq!(bad(|r| r.steps = 0), "steps: must be at least 1");
        assert_eq!(bad(|r| r.num_images = 0), "num_images: must be at least 1");
        assert!(bad(|r| r.controls[0].control_end = 1.5).starts_with("controls[0].control_end: 1.5"));
        assert!(bad(|r| (r.controls[0].control_start, r.controls[0].control_end) = (0.9, 0.5))
            .starts_with("controls[0].control_start: 0.9 is after"));
        for strength in [0.0, -0.5, 1.5, f64::NAN] {
            let r = GenerateRequest { strength: Some(strength), ..Default::default() };
            assert_eq!(r.validate().unwrap_err().to_string(), format!("strength: {strength} must lie in (0, 1]"));
        }
        let variant = bad(|r| r.variant = Some("fp8".into()));
        assert!(variant.starts_with("variant: \"fp8\"") && variant.contains("the valid value is fp16"), "{variant}");
    }

    #[test]
    fn strength_defaults_follow_diffusers() {
        let r = GenerateRequest { init_image: Some("init.png".into()), ..Default::default() };
        assert_eq!(r.effective_strength(), 0.8);
        let r = GenerateRequest { mask: Some("mask.png".into()), ..r };
        assert_eq!(r.effective_strength(), 1.0);
        assert_eq!(GenerateRequest { strength: Some(0.3), ..r.clone() }.effective_strength(), 0.3);
        let no_init = GenerateRequest { init_image: None, ..r };
        assert_eq!(
            no_init.validate().unwrap_err().to_string(),
            "mask: inpainting needs the picture to paint in: set init_image"
        );
    }

    #[test]
    fn guess_mode_without_a_controlnet_is_noted() {
        let r = GenerateRequest { guess_mode: true, ..Default::default() };
        assert_eq!(r.unused_settings().len(), 1);
        let r = GenerateRequest { guess_mode: true, controls: vec![ControlRequest::new(None, "a.png")], ..r };
        assert!(r.unused_settings().is_empty());
        let r = GenerateRequest { strength: Some(0.5), ..r };
        assert_eq!(r.unused_settings(), ["strength: no init_image is given, so the strength changes nothing"]);
        let r = GenerateRequest { init_image: Some("init.png".into()), ..r };
        assert!(r.unused_settings().is_empty());
    }

    #[test]
    fn resize_names_round_trip() {
        for m in [ResizeMode::JustResize, ResizeMode::CropAndResize, ResizeMode::ResizeAndFill] {
            assert_eq!(parse_resize(resize_name(m)).unwrap(), m);
        }
        assert!(parse_resize("stretch").is_err());
    }
}
