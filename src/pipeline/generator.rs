//! A [`GenerateRequest`] → images and the metadata each PNG carries: the call every front end makes.
//!
//! [`run`] loads the models the request names and runs it; a front end that keeps models loaded (a server)
//! makes a [`Generator`] from them and calls [`Generator::run`] per request. Both report through a progress
//! callback and stop between steps when the cancel flag is raised ([`crate::Error::Cancelled`]).
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use image::RgbImage;

use super::conditions::{ControlSource, FittedCondition};
use super::extra_networks::resolve_lora_tags;
use super::generate::{check_size, generate_from, validate, Control, GenerateParams, InitImage};
use super::hires::{upscale_images, upscale_latents, Upscaler};
use super::image_metadata::{
    file_ref, recorded_path, weights_hash, ControlMetadata, EmbeddingMetadata, FileRef, ImageMetadata, LoraMetadata,
};
use super::inpaint::{self, MaskedContent};
use super::memory_estimate::{estimate, RequestShape};
use super::request::{
    control_setting, random_seed, resize_name, ControlRequest, GenerateRequest, LoraRequest, PromptOptions,
    PromptSyntax,
};
use super::sd::{open_controlnet, LoadOptions, StableDiffusion};
use super::textual_inversion::Embeddings;
use crate::io::images::{self, ResampleFilter};
use crate::io::lora::{LoraFile, LoraWeight};
use crate::model::controlnet::ControlNetModel;
use crate::model::controlnet_union::parse_control_type;
use crate::{Error, Result};

/// What a running request reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Something the user should know that does not stop the run: a setting that does nothing, a prompt that
    /// was cut. Starts with the setting's name (`prompt: ...`).
    Warning(String),
    /// Every check passed; denoising starts with this seed (the one drawn when the request gave none).
    Started { seed: u64 },
    /// `done` of `total` denoising steps are finished.
    Step { done: usize, total: usize },
}

/// One image and the metadata its PNG carries.
pub struct GeneratedImage {
    pub image: RgbImage,
    pub metadata: ImageMetadata,
}

/// The result of a request.
pub struct Generated {
    pub seed: u64,
    pub images: Vec<GeneratedImage>,
    /// The condition each ControlNet used, at the output size (after annotating and fitting); `None` for a
    /// condition given as a tensor.
    pub conditions: Vec<Option<RgbImage>>,
}

/// Loads the models `request` names (the demo's where it names none) on `device` and runs it.
pub fn run(
    request: &GenerateRequest,
    device: &Device,
    progress: &dyn Fn(Progress),
    cancel: &AtomicBool,
) -> Result<Generated> {
    // 1. Checks that need no model, and the conditions as given: a bad file fails before any model loads.
    let request = request.with_demo_defaults()?;
    request.validate()?;
    let request = resolve_lora_tags(&request)?;
    if let (Some(w), Some(h)) = (request.width, request.height) {
        crate::io::images::check_image_size("width", size_u32("width", w)?, size_u32("height", h)?)?;
    }
    let inputs = Inputs::load(&request)?;

    // 2. Models.
    let opts = LoadOptions {
        dtype: request.dtype.resolve(device),
        device: device.clone(),
        variant: request.variant.clone(),
        prediction_type: request.prediction_type,
        config_dir: request.config.clone(),
    };
    let model = request.model.as_deref().unwrap_or_default();
    let loras = read_loras(&request.loras, progress)?;
    let mut sd = StableDiffusion::open_with_loras(model, &opts, &loras)?;
    if let Some(unet) = &request.unet {
        sd.replace_unet("unet", unet)?;
    }
    if let Some(vae) = &request.vae {
        sd.replace_vae("vae", vae, &opts)?;
    }
    //    A net named by several units (a union net's conditions, joined or not) is loaded once.
    let mut nets: Vec<ControlNetModel> = Vec::new();
    let mut net_of_unit = Vec::with_capacity(request.controls.len());
    for (i, c) in request.controls.iter().enumerate() {
        let key = (&c.controlnet, &c.controlnet_config);
        let seen = request.controls[..i].iter().position(|p| (&p.controlnet, &p.controlnet_config) == key);
        match seen {
            Some(first) => net_of_unit.push(net_of_unit[first]),
            None => {
                let spec = c.controlnet.as_deref().unwrap_or_default();
                let setting = control_setting(i, "controlnet");
                nets.push(open_controlnet(&setting, spec, c.controlnet_config.as_deref(), &opts, Some(&sd))?);
                net_of_unit.push(nets.len() - 1);
            }
        }
    }

    // 3. Run.
    Generator::new(&sd, net_of_unit.iter().map(|&k| &nets[k]).collect()).run_checked(&request, inputs, progress, cancel)
}

/// Reads the LoRA files of a request; errors name `lora` and the file, keys read but not applied are warned of.
pub fn read_loras(loras: &[LoraRequest], progress: &dyn Fn(Progress)) -> Result<Vec<(LoraFile, LoraWeight)>> {
    loras
        .iter()
        .map(|l| {
            if !l.weight.is_finite() {
                return Err(Error::setting(
                    "lora",
                    format!("{}: the weight {} is not a number", l.path.display(), l.weight),
                ));
            }
            let file = LoraFile::read(&l.path).map_err(|e| Error::setting("lora", e.to_string()))?;
            if let Some(first) = file.ignored.first() {
                progress(Progress::Warning(format!(
                    "lora: {}: {} full-weight difference keys (e.g. {first}) are not applied",
                    l.path.display(),
                    file.ignored.len()
                )));
            }
            Ok((file, l.weight))
        })
        .collect()
}

/// Whether the LoRAs merged into a loaded model are those a request asks for (same files, weights, order).
fn same_loras(merged: &[(std::path::PathBuf, LoraWeight)], asked: &[LoraRequest]) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    merged.len() == asked.len()
        && merged.iter().zip(asked).all(|((p, w), a)| *w == a.weight && canonical(p) == canonical(&a.path))
}

/// Loaded models that run requests: the Stable Diffusion model and one ControlNet per condition of the
/// requests it is given (in order).
pub struct Generator<'a> {
    sd: &'a StableDiffusion,
    controlnets: Vec<&'a ControlNetModel>,
    /// Weight hashes for the metadata, worked out once (multi-GB files).
    model_hash: OnceLock<String>,
    unet_hash: OnceLock<String>,
    vae_hash: OnceLock<String>,
    controlnet_hashes: Vec<OnceLock<String>>,
}

impl<'a> Generator<'a> {
    pub fn new(sd: &'a StableDiffusion, controlnets: Vec<&'a ControlNetModel>) -> Self {
        let controlnet_hashes = controlnets.iter().map(|_| OnceLock::new()).collect();
        Self {
            sd,
            controlnets,
            model_hash: OnceLock::new(),
            unet_hash: OnceLock::new(),
            vae_hash: OnceLock::new(),
            controlnet_hashes,
        }
    }

    /// The same generator with the weight hashes known already (a server hashed the files when it loaded them):
    /// the model's, and each ControlNet's in order.
    pub fn with_known_hashes(self, model: String, controlnets: Vec<String>) -> Self {
        let _ = self.model_hash.set(model);
        for (cell, hash) in self.controlnet_hashes.iter().zip(controlnets) {
            let _ = cell.set(hash);
        }
        self
    }

    /// Runs `request` on these models (its `model` and `controlnet` names are recorded in the metadata; they
    /// should name the files these models came from).
    pub fn run(
        &self,
        request: &GenerateRequest,
        progress: &dyn Fn(Progress),
        cancel: &AtomicBool,
    ) -> Result<Generated> {
        let request = request.with_demo_defaults()?;
        request.validate()?;
        let request = resolve_lora_tags(&request)?;
        let inputs = Inputs::load(&request)?;
        self.run_checked(&request, inputs, progress, cancel)
    }

    fn run_checked(
        &self,
        request: &GenerateRequest,
        inputs: Inputs,
        progress: &dyn Fn(Progress),
        cancel: &AtomicBool,
    ) -> Result<Generated> {
        let sd = self.sd;
        if self.controlnets.len() != request.controls.len() {
            return Err(Error::setting(
                "controls",
                format!("{} conditions for {} loaded ControlNets", request.controls.len(), self.controlnets.len()),
            ));
        }
        for (i, (c, net)) in request.controls.iter().zip(&self.controlnets).enumerate() {
            check_control_type(i, c, net)?;
        }
        // LoRAs are merged into the loaded weights: other LoRAs need the model loaded again with them.
        if !same_loras(&sd.loras, &request.loras) {
            let names = |l: Vec<String>| if l.is_empty() { "none".to_string() } else { l.join(", ") };
            return Err(Error::setting(
                "lora",
                format!(
                    "the loaded model has the LoRAs {} merged, the request asks for {}: load the model with them",
                    names(sd.loras.iter().map(|(p, w)| format!("{}:{w}", p.display())).collect()),
                    names(request.loras.iter().map(|l| format!("{}:{}", l.path.display(), l.weight)).collect()),
                ),
            ));
        }
        // Likewise the VAE: a request for another one needs it loaded.
        let loaded_vae = sd.vae_override.as_ref().map(|(spec, _)| spec.as_str());
        if request.vae.as_deref() != loaded_vae {
            return Err(Error::setting(
                "vae",
                format!(
                    "the loaded model uses {}, the request asks for {}: load the model with it",
                    loaded_vae.unwrap_or("its own VAE"),
                    request.vae.as_deref().unwrap_or("the model's own VAE")
                ),
            ));
        }
        for note in request.unused_settings() {
            progress(Progress::Warning(note));
        }
        if sd.sdxl.is_none() && request.sdxl != Default::default() {
            progress(Progress::Warning(
                "sdxl: prompt_2, negative_prompt_2, original_size, crop_top_left and target_size are SDXL's; this \
                 SD 1.x/2.x model ignores them"
                    .into(),
            ));
        }

        // 1. Size: given, else the init picture's (as diffusers' img2img) or the first condition's, rounded down
        //    to a multiple of the VAE's factor, else the model's native size.
        let Inputs { sources, init, mask } = inputs;
        let factor = sd.vae_scale_factor();
        let given = init.as_ref().map(RgbImage::dimensions).or_else(|| sources.first().map(ControlSource::size));
        let (default_w, default_h) = match given {
            Some((w, h)) => ((w as usize / factor) * factor, (h as usize / factor) * factor),
            None => (sd.default_size(), sd.default_size()),
        };
        let width = request.width.unwrap_or(default_w);
        let height = request.height.unwrap_or(default_h);
        if width == 0 || height == 0 {
            return Err(Error::setting(
                if width == 0 { "width" } else { "height" },
                format!(
                    "the output size {width}x{height} is empty: the condition is smaller than {factor} pixels; set \
                     width and height"
                ),
            ));
        }
        check_size(width, height, factor)?;

        // 2. Refuse what cannot fit before allocating any of it (the hires pass's size too).
        let size_setting = if request.width.is_none() && request.height.is_some() { "height" } else { "width" };
        self.check_memory(request, (width, height), size_setting, request.init_image.is_some())?;
        let hires_size = match &request.hires {
            Some(hires) => {
                let (w, h) = hires.size((width, height), factor);
                check_size(w, h, factor).map_err(|e| Error::setting("hires.scale", e))?;
                let encodes = hires.upscaler == super::hires::Upscaler::Lanczos;
                self.check_memory(request, (w, h), "hires.scale", encodes)?;
                Some((w, h))
            }
            None => None,
        };

        // 3. Prompts longer than the text encoder reads are cut (as diffusers does): say which part.
        //    With A1111 syntax nothing is cut: a long prompt is read in 75-token chunks.
        for (setting, text) in [("prompt", &request.prompt), ("negative_prompt", &request.negative_prompt)] {
            if request.prompt_syntax != PromptSyntax::Plain {
                break;
            }
            if let Some(cut) = sd.tokenizer.truncated_part(text) {
                progress(Progress::Warning(format!(
                    "{setting}: the text encoder reads at most {} tokens ({} of text); this part was cut: {cut:?}",
                    sd.tokenizer.max_length(),
                    sd.tokenizer.max_length() - 2
                )));
            }
        }

        // 3b. Textual-inversion embeddings the prompts may name, checked against the text encoders.
        let embeddings = Embeddings::for_request(request)?;
        embeddings.check_fits(sd)?;

        // 3c. Only the masked area (padding_mask_crop): picture, mask and conditions cut to the region around the
        //     mask at the output size; the originals are kept to paste the result back.
        let (w32, h32) = (width as u32, height as u32);
        let (init, mask, sources, crop) = match (request.padding_mask_crop, init, mask) {
            (Some(pad), Some(init), Some(mask)) => {
                let region = super::mask_crop::crop_region(&mask, (width, height), pad)?;
                let cut = |img: &RgbImage| region.cut(img, (w32, h32));
                let sources = sources
                    .into_iter()
                    .enumerate()
                    .map(|(i, src)| match src {
                        // A condition of another size is first stretched over the picture, then cut the same way.
                        ControlSource::Image(img) => Ok(ControlSource::Image(cut(&images::resize(
                            &img,
                            init.width(),
                            init.height(),
                            ResampleFilter::Lanczos,
                        )))),
                        _ => Err(Error::setting(
                            control_setting(i, "control"),
                            "padding_mask_crop cuts pictures: give this condition as an image",
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (ci, cm) = (cut(&init), cut(&mask));
                (Some(ci), Some(cm), sources, Some((region, init, mask)))
            }
            (_, init, mask) => (init, mask, sources, None),
        };

        // 4. Conditions at the output size, in the channels each net takes.
        let fitted = self.fit_conditions(request, &sources, mask.as_ref(), (width, height))?;
        let controls = self.controls(request, &fitted);
        let seed = request.seed.unwrap_or_else(random_seed);
        let params = GenerateParams {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            width,
            height,
            steps: request.steps,
            guidance: request.guidance,
            scheduler: request.scheduler,
            seed,
            num_images: request.num_images,
            guess_mode: request.guess_mode,
            vae_tiling: request.vae_tiling,
            sdxl: request.sdxl.clone(),
            prompt_options: PromptOptions { syntax: request.prompt_syntax, clip_skip: request.clip_skip, embeddings },
            eta: request.eta,
        };
        validate(sd, &controls, &params)?;
        // img2img: the picture at the output size (Lanczos, as diffusers' `VaeImageProcessor`), in [-1, 1];
        // inpainting: the mask too, binarised.
        let device = sd.unet.device();
        let init = match &init {
            Some(img) => {
                let img = images::resize(img, w32, h32, ResampleFilter::Lanczos);
                let image = ((images::to_tensor01(&img, device)? * 2.0)? - 1.0)?;
                let mask = mask.as_ref().map(|m| inpaint::mask_tensor(&inpaint::fit_mask(m, w32, h32), device));
                Some(InitImage {
                    image,
                    strength: request.effective_strength(),
                    mask: mask.transpose()?,
                    masked_content: request.masked_content,
                })
            }
            None => None,
        };

        // 5. Denoise and decode; the hires fix's second pass counts in the same progress.
        progress(Progress::Started { seed });
        let second_steps = match (&request.hires, hires_size) {
            (Some(h), Some(_)) => {
                let steps = h.steps.unwrap_or(request.steps);
                let run = ((steps as f64 * h.strength).floor() as usize).min(steps);
                // Heun and DPM2 evaluate twice per step but once in the first interval they run.
                let kind = request.scheduler.map(|s| s.kind).or_else(|| sd.scheduler_config.own_kind().ok());
                let order = kind.map_or(1, |k| k.order());
                (run * order).saturating_sub(order - 1)
            }
            _ => 0,
        };
        let mut first_total = 0;
        let mut out = generate_from(
            sd,
            &controls,
            &params,
            init.as_ref(),
            &mut |done, total| {
                first_total = total;
                progress(Progress::Step { done, total: total + second_steps })
            },
            cancel,
        )?;
        let mut fitted = fitted;
        if let (Some(hires), Some(size)) = (&request.hires, hires_size) {
            // 5b. Hires fix: the same request as img2img from the upscaled first pass, conditions fitted anew.
            fitted = self.fit_conditions(request, &sources, None, size)?;
            let controls = self.controls(request, &fitted);
            let image = match hires.upscaler {
                Upscaler::Latent => upscale_latents(&out.latents, (size.1 / factor, size.0 / factor))?,
                Upscaler::Lanczos => upscale_images(&out.images, size, device)?,
            };
            let init =
                InitImage { image, strength: hires.strength, mask: None, masked_content: MaskedContent::Original };
            let second = GenerateParams {
                width: size.0,
                height: size.1,
                steps: hires.steps.unwrap_or(request.steps),
                ..params.clone()
            };
            out = generate_from(
                sd,
                &controls,
                &second,
                Some(&init),
                &mut |done, total| progress(Progress::Step { done: first_total + done, total: first_total + total }),
                cancel,
            )?;
        }

        // 6. Only the masked area: each result pasted back over the original through the mask.
        if let Some((region, original, mask)) = &crop {
            out.images =
                out.images.iter().map(|g| super::mask_crop::apply_overlay(mask, original, g, *region)).collect();
        }

        // 7. The metadata of each image.
        let base = self.metadata(request, &params)?;
        let images = out
            .images
            .into_iter()
            .enumerate()
            .map(|(i, image)| GeneratedImage { image, metadata: ImageMetadata { image_index: i + 1, ..base.clone() } })
            .collect();
        Ok(Generated { seed, images, conditions: fitted.into_iter().map(|f| f.image).collect() })
    }

    /// Refuses a size whose run cannot fit in the memory available, naming `setting`.
    /// `encodes_picture`: the VAE encoder runs at this size (an init picture, or a Lanczos hires pass).
    fn check_memory(
        &self,
        request: &GenerateRequest,
        (width, height): (usize, usize),
        setting: &str,
        encodes_picture: bool,
    ) -> Result<()> {
        let sd = self.sd;
        let levels = sd.unet.config().encoder.levels().map_err(|m| Error::config(&sd.dir, m))?;
        let shape = RequestShape {
            width,
            height,
            num_images: request.num_images,
            guided: request.guidance > 1.0,
            controlnets: request.controls.len(),
            vae_tiling: request.vae_tiling,
            encodes_picture,
        };
        estimate(&levels, sd.unet.config().encoder.in_channels, sd.vae.config(), shape).check(
            setting,
            width,
            height,
            crate::memory::available_bytes(),
        )
    }

    /// Each condition at `size`, in the channels its net takes.
    fn fit_conditions(
        &self,
        request: &GenerateRequest,
        sources: &[ControlSource],
        mask: Option<&RgbImage>,
        (width, height): (usize, usize),
    ) -> Result<Vec<FittedCondition>> {
        let device = self.sd.unet.device();
        request
            .controls
            .iter()
            .zip(sources)
            .zip(&self.controlnets)
            .enumerate()
            .map(|(i, ((c, src), net))| {
                let channels = net.config().conditioning_channels;
                src.fit(i, c, (width, height), request.resize, channels, mask, device)
            })
            .collect()
    }

    /// The nets with their fitted conditions and settings, as the denoising loop takes them.
    fn controls<'c>(&'c self, request: &GenerateRequest, fitted: &[FittedCondition]) -> Vec<Control<'c>> {
        request
            .controls
            .iter()
            .zip(&self.controlnets)
            .zip(fitted)
            .map(|((c, net), f)| Control {
                net,
                image: f.tensor.clone(),
                scale: c.conditioning_scale,
                start: c.control_start,
                end: c.control_end,
                only_mid: c.only_mid_control,
                // checked against the net by `check_control_type`
                control_type: c.control_type.as_deref().and_then(|k| parse_control_type(k).ok()),
                union_join: c.union_join,
                mode: c.control_mode,
            })
            .collect()
    }

    /// The metadata shared by the images of one run (`image_index` 1).
    fn metadata(&self, request: &GenerateRequest, params: &GenerateParams) -> Result<ImageMetadata> {
        let sd = self.sd;
        let model = request.model.as_deref().unwrap_or_default();
        let model_hash = get_or_try(&self.model_hash, || weights_hash(&sd.dir, true))?;
        let controls = request
            .controls
            .iter()
            .zip(&self.controlnets)
            .zip(&self.controlnet_hashes)
            .map(|((c, net), hash)| {
                let spec = c.controlnet.as_deref().unwrap_or_default();
                let weights = net.source().unwrap_or(Path::new(spec));
                Ok(ControlMetadata {
                    controlnet: FileRef {
                        path: recorded_path(spec),
                        sha256: get_or_try(hash, || weights_hash(weights, false))?,
                    },
                    preprocess: c.preprocess.clone(),
                    config: c.controlnet_config.as_ref().map(|p| recorded_path(&p.display().to_string())),
                    control_image: file_ref(&c.control)?,
                    conditioning_scale: c.conditioning_scale,
                    control_start: c.control_start,
                    control_end: c.control_end,
                    only_mid_control: c.only_mid_control,
                    control_type: c.control_type.clone(),
                    union_join: c.union_join,
                    control_mode: c.control_mode,
                    annotator_weights: c.annotator_weights.as_deref().map(recorded_path),
                })
            })
            .collect::<Result<_>>()?;
        let unet = match &request.unet {
            Some(dir) => Some(FileRef {
                path: recorded_path(&dir.display().to_string()),
                sha256: get_or_try(&self.unet_hash, || weights_hash(dir, false))?,
            }),
            None => None,
        };
        let scheduler = match params.scheduler {
            Some(k) => k,
            None => sd.scheduler_config.own_kind()?.into(),
        };
        Ok(ImageMetadata {
            software: format!("controlnet-rs {}", env!("CARGO_PKG_VERSION")),
            model: FileRef { path: recorded_path(model), sha256: model_hash },
            unet,
            controls,
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            width: params.width,
            height: params.height,
            steps: params.steps,
            guidance: params.guidance,
            scheduler: scheduler.cli_name().to_string(),
            resize: resize_name(request.resize).to_string(),
            model_config: request.config.as_ref().map(|c| recorded_path(&c.display().to_string())),
            prediction_type: request.prediction_type.map(|p| p.as_str().to_string()),
            seed: params.seed,
            guess_mode: params.guess_mode,
            vae_tiling: params.vae_tiling,
            sdxl: params.sdxl.clone(),
            dtype: match sd.unet.weights_dtype() {
                DType::F32 => None,
                dtype => Some(dtype.as_str().to_string()),
            },
            num_images: params.num_images,
            image_index: 1,
            init_image: request.init_image.as_deref().map(file_ref).transpose()?,
            mask: request.mask.as_deref().map(file_ref).transpose()?,
            mask_blur: request.mask_blur,
            strength: request.init_image.as_ref().map(|_| request.effective_strength()),
            hires: request.hires.clone(),
            prompt_syntax: request.prompt_syntax,
            clip_skip: request.clip_skip,
            loras: request
                .loras
                .iter()
                .map(|l| {
                    let file = file_ref(&l.path)?;
                    let unet_weight = (l.weight.unet != l.weight.text_encoder).then_some(l.weight.unet);
                    Ok(LoraMetadata {
                        path: file.path,
                        sha256: file.sha256,
                        weight: l.weight.text_encoder,
                        unet_weight,
                    })
                })
                .collect::<Result<_>>()?,
            embeddings: params
                .prompt_options
                .embeddings
                .iter()
                .map(|e| {
                    let file = file_ref(&e.file.path)?;
                    Ok(EmbeddingMetadata { name: e.file.name.clone(), path: file.path, sha256: file.sha256 })
                })
                .collect::<Result<_>>()?,
            vae: match &sd.vae_override {
                Some((spec, path)) => Some(FileRef {
                    path: recorded_path(spec),
                    sha256: get_or_try(&self.vae_hash, || weights_hash(path, false))?,
                }),
                None => None,
            },
            eta: params.eta,
            masked_content: request.masked_content,
            padding_mask_crop: request.padding_mask_crop,
        })
    }
}

/// The pictures a request names, read before any model loads so that a bad file fails at once.
struct Inputs {
    /// The conditions as given.
    sources: Vec<ControlSource>,
    /// img2img's starting picture.
    init: Option<RgbImage>,
    /// Inpainting's mask, checked against the picture.
    mask: Option<RgbImage>,
}

impl Inputs {
    fn load(request: &GenerateRequest) -> Result<Self> {
        let sources: Result<Vec<_>> =
            request.controls.iter().enumerate().map(|(i, c)| ControlSource::load(i, c)).collect();
        let init = match &request.init_image {
            Some(path) => Some(images::load_rgb(path).map_err(|e| Error::setting("init_image", e))?),
            None => None,
        };
        let mask = match (&request.mask, &init) {
            (Some(path), Some(init)) => {
                let mask = images::load_rgb(path).map_err(|e| Error::setting("mask", e))?;
                inpaint::check_mask(&mask, init.dimensions())?;
                Some(inpaint::gaussian_blur(&mask, request.mask_blur as f32))
            }
            (Some(_), None) => return Err(Error::setting("mask", "inpainting needs init_image")),
            (None, _) => None,
        };
        Ok(Self { sources: sources?, init, mask })
    }
}

fn size_u32(setting: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::setting(setting, format!("{v} is larger than any image can be")))
}

/// `cell`'s value, computed by `f` the first time (an error is returned and nothing is stored).
fn get_or_try(cell: &OnceLock<String>, f: impl FnOnce() -> Result<String>) -> Result<String> {
    if let Some(v) = cell.get() {
        return Ok(v.clone());
    }
    let v = f()?;
    Ok(cell.get_or_init(|| v).clone())
}

/// A union net needs a control type it knows; a plain ControlNet takes none.
fn check_control_type(i: usize, c: &ControlRequest, net: &ControlNetModel) -> Result<()> {
    let setting = control_setting(i, "control_type");
    match (net.num_control_type(), &c.control_type) {
        (Some(n), None) => Err(Error::setting(
            setting,
            format!("this ControlNet is a union net ({n} condition types): say which type the condition is"),
        )),
        (Some(n), Some(kind)) => {
            let index = parse_control_type(kind).map_err(|m| Error::setting(&setting, m))?;
            if index >= n {
                return Err(Error::setting(
                    setting,
                    format!("{kind}: type {index} is out of range, this union net knows {n} types (0-{})", n - 1),
                ));
            }
            Ok(())
        }
        (None, Some(_)) => Err(Error::setting(setting, "this ControlNet is not a union net: it takes no control type")),
        (None, None) => Ok(()),
    }
}
