//! The generate recipe, step for step as diffusers' `StableDiffusionControlNetPipeline.__call__`
//! (and `StableDiffusionPipeline` when no ControlNet is given), so the same seed gives the same image.
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::control_mode::ControlMode;
use super::inpaint::{self, Inpainting, MaskedContent};
use super::request::control_setting;
use super::sd::StableDiffusion;
use super::text_conditioning::{self, PromptOptions, SdxlConditioning};
use crate::model::controlnet::{ControlNetModel, ControlNetOutput};
use crate::model::controlnet_union::UnionCondition;
use crate::model::vae_tiling::VaeTiling;
use crate::rng::TorchGenerator;
use crate::schedulers::{self, Sampler};
use crate::{Error, Result};

/// One ControlNet with its condition and when/how strongly it acts.
pub struct Control<'a> {
    pub net: &'a ControlNetModel,
    /// The condition, (1, channels, height, width) in [0, 1], already at the output size.
    pub image: Tensor,
    /// Multiplies every residual of this net (`controlnet_conditioning_scale`).
    pub scale: f64,
    /// The fraction of the steps where this net starts / stops acting (`control_guidance_start/end`).
    pub start: f64,
    pub end: f64,
    /// Only the middle-block residual reaches the UNet (the original `only_mid_control`).
    pub only_mid: bool,
    /// A1111's control mode: per-level weights and whether the unconditional half gets the residuals.
    pub mode: ControlMode,
    /// A union net's condition type (an index into `model::controlnet_union::CONTROL_TYPES`).
    pub control_type: Option<usize>,
    /// This union-net condition runs in the call of the control before it (same net; that one's window, mode
    /// and middle-only setting apply).
    pub union_join: bool,
}

impl<'a> Control<'a> {
    /// `net` on `image` at scale 1 through every step, both halves of the guided batch, all residuals: the
    /// plain ControlNet call (diffusers' defaults).
    pub fn plain(net: &'a ControlNetModel, image: Tensor) -> Self {
        Self {
            net,
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            only_mid: false,
            mode: ControlMode::default(),
            control_type: None,
            union_join: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is off at 1.0 or below, as in diffusers.
    pub guidance: f64,
    /// `None`: the model's own scheduler (`scheduler/scheduler_config.json`).
    pub scheduler: Option<Sampler>,
    pub seed: u64,
    pub num_images: usize,
    /// Control on the conditional half only, with per-level scales (works without a prompt).
    pub guess_mode: bool,
    /// Decode in overlapping tiles of the VAE's `sample_size` (diffusers' `enable_vae_tiling`): the decoder's
    /// memory stays that of one tile for large images; seams are cross-faded.
    pub vae_tiling: bool,
    /// SDXL's second prompts and size/crop conditioning (ignored by SD 1.x/2.x).
    pub sdxl: SdxlConditioning,
    /// Prompt syntax (plain / A1111) and clip skip.
    pub prompt_options: PromptOptions,
    /// DDIM's eta (0: deterministic); other schedulers refuse anything else.
    pub eta: f64,
}

impl GenerateParams {
    /// A plain text-to-image of one picture: this prompt, size, step count, guidance and seed; no negative
    /// prompt, the model's own scheduler, no guess mode, tiling, SDXL conditioning, prompt syntax or eta.
    /// Callers that need one of those set it with `..GenerateParams::plain(...)`.
    pub fn plain(
        prompt: impl Into<String>,
        width: usize,
        height: usize,
        steps: usize,
        guidance: f64,
        seed: u64,
    ) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width,
            height,
            steps,
            guidance,
            scheduler: None,
            seed,
            num_images: 1,
            guess_mode: false,
            vae_tiling: false,
            sdxl: Default::default(),
            prompt_options: Default::default(),
            eta: 0.0,
        }
    }
}

/// Where img2img starts: a picture noised to the level of the step `strength` of the way back from the end
/// (diffusers' `StableDiffusionControlNetImg2ImgPipeline`).
#[derive(Debug, Clone)]
pub struct InitImage {
    /// The picture at the output size, (1 or num_images, 3, height, width) in [-1, 1] (diffusers'
    /// `VaeImageProcessor`); or latents already, (1 or num_images, latent channels, height/8, width/8), used as
    /// they are (diffusers does so with a 4-channel `image`; the hires fix's latent upscaler).
    pub image: Tensor,
    /// In (0, 1]: the share of the steps that run; 1 starts from (almost) pure noise, small values keep most of
    /// the picture.
    pub strength: f64,
    /// Inpainting: (1, 1, height, width), 1 where the picture is repainted, 0 where it is kept
    /// ([`super::inpaint::mask_tensor`]).
    pub mask: Option<Tensor>,
    /// Inpainting: what the masked area starts from (A1111's masked content), noised to the first step.
    pub masked_content: MaskedContent,
}

pub struct GenerateOutput {
    /// The final latents, (num_images, 4, height/8, width/8), before the VAE.
    pub latents: Tensor,
    /// The raw VAE output in about [-1, 1], (num_images, 3, height, width).
    pub decoded: Tensor,
    pub images: Vec<RgbImage>,
}

/// Checks the settings before any model runs; each error names the setting (`steps`, `controls[0].control_end`).
pub fn validate(sd: &StableDiffusion, controls: &[Control], p: &GenerateParams) -> Result<()> {
    let factor = sd.vae_scale_factor();
    if p.steps == 0 {
        return Err(Error::setting("steps", "must be at least 1"));
    }
    if p.num_images == 0 {
        return Err(Error::setting("num_images", "must be at least 1"));
    }
    check_size(p.width, p.height, factor)?;
    if !p.guidance.is_finite() || p.guidance < 0.0 {
        return Err(Error::setting("guidance", format!("{} must be a finite number >= 0", p.guidance)));
    }
    for (i, c) in controls.iter().enumerate() {
        let setting = |field: &str| control_setting(i, field);
        for (field, v) in [("control_start", c.start), ("control_end", c.end)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::setting(setting(field), format!("{v} must lie in [0, 1]")));
            }
        }
        if c.start > c.end {
            return Err(Error::setting(
                setting("control_start"),
                format!("{} is after the end of the window ({})", c.start, c.end),
            ));
        }
        if !c.scale.is_finite() {
            return Err(Error::setting(setting("conditioning_scale"), format!("{} is not a number", c.scale)));
        }
        let (_, ch, h, w) = c.image.dims4()?;
        let want_ch = c.net.config().conditioning_channels;
        if ch != want_ch || h != p.height || w != p.width {
            return Err(Error::setting(
                setting("control"),
                format!(
                    "the condition is {ch}×{h}×{w} (channels×height×width), expected {want_ch}×{}×{}",
                    p.height, p.width
                ),
            ));
        }
        // A ControlNet reads the latents alone, also beside an inpainting UNet that reads mask and picture too.
        let mut unet = sd.unet.config().clone();
        unet.encoder.in_channels = sd.vae.config().latent_channels;
        c.net.check_compatible(&unet).map_err(|e| Error::setting(setting("controlnet"), e))?;
    }
    Ok(())
}

/// The output size must be a positive multiple of the VAE's scale factor (8 for SD).
pub fn check_size(width: usize, height: usize, factor: usize) -> Result<()> {
    for (setting, v) in [("width", width), ("height", height)] {
        if v == 0 || !v.is_multiple_of(factor) {
            return Err(Error::setting(setting, format!("{v} is not a positive multiple of {factor}")));
        }
        if v > MAX_SIDE {
            return Err(Error::setting(
                setting,
                format!(
                    "{v} px is more than the {MAX_SIDE} px a side takes (as ComfyUI's limit): the attention over \
                     such a latent would run for hours; generate smaller and upscale"
                ),
            ));
        }
    }
    Ok(())
}

/// The largest side accepted, in pixels: ComfyUI's `MAX_RESOLUTION`. Memory is checked separately
/// (`memory_estimate`); this bounds the time, which grows with the square of the latent's pixel count.
pub const MAX_SIDE: usize = 16384;

/// Runs the whole recipe. `on_step(done, total)` is called after every denoising step.
pub fn generate(
    sd: &StableDiffusion,
    controls: &[Control],
    p: &GenerateParams,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<GenerateOutput> {
    generate_cancellable(sd, controls, p, on_step, never_cancelled())
}

/// [`generate`] that stops before the next step (or the decoding) once `cancel` is raised, with
/// [`Error::Cancelled`].
pub fn generate_cancellable(
    sd: &StableDiffusion,
    controls: &[Control],
    p: &GenerateParams,
    on_step: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<GenerateOutput> {
    generate_from(sd, controls, p, None, on_step, cancel)
}

/// The index of the first timestep img2img runs (diffusers' `get_timesteps`): `floor(steps · strength)` steps
/// run, the first `steps − that` are skipped, `order` timesteps each (`timesteps[t_start * order:]`: Heun and
/// DPM2 list their timesteps twice).
pub fn first_step(steps: usize, strength: f64, timesteps: usize, order: usize) -> Result<usize> {
    check_strength(strength)?;
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    if run == 0 {
        return Err(Error::setting(
            "strength",
            format!("{strength} of {steps} steps is less than one step: raise the strength or the steps"),
        ));
    }
    Ok(((steps - run) * order).min(timesteps.saturating_sub(1)))
}

/// img2img's strength lies in (0, 1], as diffusers requires ([0, 1], where 0 would run no step).
pub fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::setting("strength", format!("{strength} must lie in (0, 1]")));
    }
    Ok(())
}

/// [`generate_cancellable`] starting from `init` when given (img2img): the picture is encoded by the VAE, noised
/// to the first step the strength leaves, and denoised from there.
pub fn generate_from(
    sd: &StableDiffusion,
    controls: &[Control],
    p: &GenerateParams,
    init: Option<&InitImage>,
    on_step: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<GenerateOutput> {
    validate(sd, controls, p)?;
    validate_init(sd, init, p)?;
    let device = sd.unet.device().clone();
    let dtype = sd.unet.dtype();
    let n = p.num_images;
    let cfg = p.guidance > 1.0;
    // A shuffle-style net (global pooling) only works in guess mode; diffusers decides from the first net.
    let guess_mode = p.guess_mode || controls.first().is_some_and(|c| c.net.config().global_pool_conditions);

    // 1. Encode the prompt (and the negative prompt for classifier-free guidance): [uncond × n, cond × n]; for
    //    SDXL also the pooled text and the size/crop numbers.
    let size = (p.width, p.height);
    let text = text_conditioning::encode(sd, &p.prompt, &p.negative_prompt, &p.sdxl, size, n, cfg, &p.prompt_options)?;
    let (embeds, cond_embeds) = (&text.embeds, &text.cond_embeds);

    // 2. The scheduler and its timesteps.
    //    img2img runs only the last `strength` of them.
    let mut scheduler = schedulers::build_sampler(p.scheduler, &sd.scheduler_config, p.steps)?;
    scheduler.set_eta(p.eta)?;
    let all_timesteps = scheduler.timesteps().to_vec();
    let first = match init {
        Some(init) => first_step(p.steps, init.strength, all_timesteps.len(), scheduler.kind().order())?,
        None => 0,
    };
    let timesteps = &all_timesteps[first..];

    // 3. Initial latents from the torch-compatible generator, in diffusers' order of draws: txt2img: noise
    //    times `init_noise_sigma`; img2img: the VAE posterior's sample, then the noise added at the first step.
    let mut rng = TorchGenerator::new(p.seed);
    //    Inpainting (diffusers' inpaint pipeline) at full strength starts from pure noise, as txt2img; the
    //    picture is still encoded first when a 4-channel UNet blends it back, and the masked picture after.
    let factor = sd.vae_scale_factor();
    let nine_channels = is_inpainting_unet(sd);
    let shape = [n, sd.vae.config().latent_channels, p.height / factor, p.width / factor];
    let mut inpainting = None;
    let mut latents = match init {
        None => (rng.randn_tensor(&shape, &device)?.to_dtype(dtype)? * scheduler.init_noise_sigma())?,
        Some(init) => {
            let pure_noise = init.mask.is_some() && init.strength == 1.0;
            let blends = init.mask.is_some() && !nine_channels;
            let image_latents = if !pure_noise || blends {
                // Latents already (hires fix from latents) are used as they are, as diffusers does with a
                // 4-channel `image`; one picture serves the whole batch.
                let latents =
                    if init.image.dim(1)? == 3 { encode_init(sd, &init.image, &mut rng)? } else { init.image.clone() };
                let copies = n / latents.dim(0)?;
                Some(Tensor::cat(&vec![&latents; copies], 0)?.to_dtype(dtype)?)
            } else {
                None
            };
            let noise = rng.randn_tensor(&shape, &device)?.to_dtype(dtype)?;
            let latents = match (&image_latents, pure_noise) {
                (Some(image_latents), false) => {
                    // A1111's masked content: the masked latents replaced (by fresh noise or zeros) first.
                    let start = match &init.mask {
                        Some(mask) if init.masked_content != MaskedContent::Original => {
                            let latent_mask = inpaint::latent_mask(mask, factor)?;
                            inpaint::fill_masked_latents(image_latents, &latent_mask, init.masked_content, p.seed)?
                        }
                        _ => image_latents.clone(),
                    };
                    scheduler.add_noise(&start, &noise, first)?
                }
                _ => (&noise * scheduler.init_noise_sigma())?,
            };
            if let Some(mask) = &init.mask {
                let unet_batch = if cfg { 2 } else { 1 } * n;
                let mut encode = |image: &Tensor| encode_init(sd, image, &mut rng);
                inpainting = Some(Inpainting::prepare(
                    &init.image,
                    mask,
                    &mut encode,
                    image_latents,
                    noise,
                    nine_channels,
                    unet_batch,
                )?);
            }
            latents
        }
    };

    // 4. The hint embedding of each condition, once: the condition never changes between steps.
    let control_batch = if cfg && !guess_mode { 2 * n } else { n };
    //    A union net also embeds the condition's type, once.
    let hints = controls
        .iter()
        .map(|c| {
            let emb = c.net.embed_condition(&c.image.to_dtype(dtype)?)?;
            let union = match c.control_type {
                Some(kind) => c.net.union_hint(&emb, kind)?,
                None => None,
            };
            let (_, ch, h, w) = emb.dims4()?;
            Ok((emb.broadcast_as((control_batch, ch, h, w))?.contiguous()?, union))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;

    // 5. Denoise.
    let total = timesteps.len();
    let calls = calls(controls);
    for (j, &t) in timesteps.iter().enumerate() {
        // `j` counts the steps that run (the ControlNet window and progress); `i` addresses the scheduler's
        // timesteps, as diffusers' `set_begin_index` makes it.
        let i = first + j;
        check_cancel(cancel)?;
        let latent_input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let latent_input = scheduler.scale_model_input(&latent_input, i)?;
        let t_batch = Tensor::full(t as f32, latent_input.dim(0)?, &device)?.to_dtype(DType::F32)?;

        // 5a. ControlNets inside their window; outside it a net is not run (its residuals would be zero). A call
        //     is a control with the union-net conditions joined to it.
        let mut residuals: Option<ControlNetOutput> = None;
        for call in &calls {
            let c = &controls[call.start];
            let outside = (j as f64) / (total as f64) < c.start || ((j + 1) as f64) / (total as f64) > c.end;
            if outside {
                continue;
            }
            // A1111's soft injection: the net runs at strength 1 and the mode weights each level.
            let soft = c.mode != ControlMode::Balanced;
            let (scale, ramp) = if soft { (1.0, false) } else { (c.scale, guess_mode) };
            let (hint, union) = &hints[call.start];
            let out = if union.is_some() {
                // request validation refuses guess mode and "ControlNet is more important" with union nets
                let conditions = call
                    .clone()
                    .filter_map(|k| {
                        let (hint, union) = &hints[k];
                        let scale = if soft { 1.0 } else { controls[k].scale };
                        union.as_ref().map(|u| UnionCondition { cond_embedding: hint, hint: u, scale })
                    })
                    .collect::<Vec<_>>();
                c.net.forward_union(&latent_input, &t_batch, embeds, text.added.as_ref(), &conditions)?
            } else if (guess_mode || c.mode.conditional_only()) && cfg {
                // Guess mode / "ControlNet is more important": the net sees only the conditional half; the
                // unconditional half gets zeros.
                let control_input = scheduler.scale_model_input(&latents, i)?;
                let t_cond = Tensor::full(t as f32, n, &device)?;
                let added = text.cond_added.as_ref();
                let hint = hint.narrow(0, 0, n)?;
                let out = c.net.forward_with(&control_input, &t_cond, cond_embeds, added, &hint, scale, !soft)?;
                pad_unconditional_half(&out)?
            } else {
                c.net.forward_with(&latent_input, &t_batch, embeds, text.added.as_ref(), hint, scale, ramp)?
            };
            let out = if soft { c.mode.scale(out, c.scale)? } else { out };
            let out = if c.only_mid { out.mid_only()? } else { out };
            residuals = Some(match residuals {
                Some(sum) => sum.add(&out)?,
                None => out,
            });
        }

        // 5b. The UNet's noise (or v) prediction with the residuals added to its skips and middle (an
        //     inpainting UNet also reads the mask and the masked picture).
        let unet_input = match &inpainting {
            Some(inp) => inp.unet_input(&latent_input)?,
            None => latent_input,
        };
        let pred = sd.unet.forward_with(&unet_input, &t_batch, embeds, text.added.as_ref(), residuals.as_ref())?;

        // 5c. Classifier-free guidance: move away from the unconditional prediction.
        let pred = if cfg {
            let uncond = pred.narrow(0, 0, n)?;
            let text = pred.narrow(0, n, n)?;
            (&uncond + ((&text - &uncond)? * p.guidance)?)?
        } else {
            pred
        };

        // 5d. One scheduler step (ancestral schedulers draw their noise from the same generator).
        latents = scheduler.step(&pred, i, &latents, &mut rng)?;
        // 5e. Inpainting with a 4-channel UNet: the kept area goes back to the picture, noised to the next step.
        if let Some(inp) = &inpainting {
            let next = (j + 1 < total).then_some(i + 1);
            latents = inp.blend(&latents, next, &|x, noise, k| scheduler.add_noise(x, noise, k))?;
        }
        on_step(j + 1, total);
    }

    // 6. Decode the latents and turn them into 8-bit images.
    check_cancel(cancel)?;
    let scaling = sd.vae.config().scaling_factor;
    let z = (&latents / scaling)?;
    let decoded =
        if p.vae_tiling { sd.vae.decode_tiled(&z, VaeTiling::for_vae(&sd.vae))? } else { sd.vae.decode(&z)? };
    let pixels = crate::model::vae::latents_to_image(&decoded)?;
    let images = crate::io::images::tensor_to_images(&pixels)?;
    Ok(GenerateOutput { latents, decoded, images })
}

/// Whether the UNet is an inpainting UNet: it reads mask and masked-picture latents beside the latents (9 input
/// channels for SD's 4 latent channels).
pub fn is_inpainting_unet(sd: &StableDiffusion) -> bool {
    sd.unet.config().encoder.in_channels != sd.vae.config().latent_channels
}

/// The init picture and mask must have the output size; an inpainting UNet needs both.
fn validate_init(sd: &StableDiffusion, init: Option<&InitImage>, p: &GenerateParams) -> Result<()> {
    let latent = sd.vae.config().latent_channels;
    let unet_in = sd.unet.config().encoder.in_channels;
    if is_inpainting_unet(sd) && (unet_in != 2 * latent + 1 || init.is_none_or(|i| i.mask.is_none())) {
        return Err(Error::setting(
            "mask",
            format!(
                "the UNet takes {unet_in} input channels: an inpainting UNet ({} = latents, mask, masked picture) \
                 needs init_image and mask",
                2 * latent + 1
            ),
        ));
    }
    let Some(init) = init else { return Ok(()) };
    check_strength(init.strength)?;
    let (b, ch, h, w) = init.image.dims4()?;
    let factor = sd.vae_scale_factor();
    let pixels = (3, p.height, p.width);
    let latents = (latent, p.height / factor, p.width / factor);
    let batch_fits = b == 1 || b == p.num_images;
    if !batch_fits || ((ch, h, w) != pixels && ((ch, h, w) != latents || init.mask.is_some())) {
        return Err(Error::setting(
            "init_image",
            format!(
                "the picture is {b}×{ch}×{h}×{w} (batch×channels×height×width), expected 1 or {}×{}×{}×{} (or \
                 latents of {}×{}×{} without a mask)",
                p.num_images, pixels.0, pixels.1, pixels.2, latents.0, latents.1, latents.2
            ),
        ));
    }
    if let Some(mask) = &init.mask {
        let (_, ch, h, w) = mask.dims4()?;
        if (ch, h, w) != (1, p.height, p.width) {
            return Err(Error::setting(
                "mask",
                format!("the mask is {ch}×{h}×{w} (channels×height×width), expected 1×{}×{}", p.height, p.width),
            ));
        }
    }
    Ok(())
}

/// The picture's latents as diffusers' `retrieve_latents(vae.encode(image), generator)`: a sample of the VAE's
/// posterior (its noise drawn from `rng`) times the VAE's scaling factor.
fn encode_init(sd: &StableDiffusion, image: &Tensor, rng: &mut TorchGenerator) -> Result<Tensor> {
    let dtype = sd.unet.dtype();
    let posterior = sd.vae.encode(&image.to_dtype(dtype)?)?;
    let noise = rng.randn_tensor(posterior.mean.dims(), image.device())?.to_dtype(dtype)?;
    Ok((posterior.sample_with_noise(&noise)? * sd.vae.config().scaling_factor)?)
}

/// A cancel flag that is never raised, for callers without one.
pub fn never_cancelled() -> &'static AtomicBool {
    static NEVER: AtomicBool = AtomicBool::new(false);
    &NEVER
}

/// Whether `cancel` is raised, as the error a cancelled call returns.
fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    Ok(())
}

/// Guess mode with guidance: zeros for the unconditional half, the net's residuals for the conditional half.
fn pad_unconditional_half(out: &ControlNetOutput) -> candle_core::Result<ControlNetOutput> {
    let pad = |t: &Tensor| Tensor::cat(&[&t.zeros_like()?, t], 0);
    Ok(ControlNetOutput {
        down_block_res_samples: out.down_block_res_samples.iter().map(pad).collect::<candle_core::Result<_>>()?,
        mid_block_res_sample: pad(&out.mid_block_res_sample)?,
    })
}

/// The net calls of a step: each control with the union-net conditions joined to it after it, as index ranges.
fn calls(controls: &[Control]) -> Vec<std::ops::Range<usize>> {
    let mut calls: Vec<std::ops::Range<usize>> = Vec::new();
    for (k, c) in controls.iter().enumerate() {
        match calls.last_mut() {
            Some(last) if c.union_join => last.end = k + 1,
            _ => calls.push(k..k + 1),
        }
    }
    calls
}
