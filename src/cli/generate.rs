//! `controlnet generate`: flags → a [`GenerateRequest`] → `pipeline::run` → PNG files carrying their metadata.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{ArgMatches, Args};

use crate::annotate::ResizeMode;
use crate::io::atomic::check_output_is_not_input;
use crate::io::images;
use crate::pipeline::conditions::is_condition_tensor;
use crate::pipeline::hires::{HiresFix, Upscaler};
use crate::pipeline::request::{LoraRequest, SdxlConditioning, DEFAULT_GUIDANCE, DEFAULT_STEPS};
use crate::pipeline::{self, ControlMode, ControlRequest, GenerateRequest, Generated, Progress};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Stable Diffusion 1.x/2.x or SDXL: a diffusers pipeline folder (SDXL: folders only so far), a single-file checkpoint (.safetensors/.ckpt as
    /// A1111 uses), or a hub id (owner/name[@revision]) [default: the bundled demo model, 128 px circles].
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub model: Option<String>,
    /// A ControlNet: diffusers folder, original (lllyasviel) .safetensors/.pth file, or hub id. Repeat for
    /// several; the i-th --control and per-net flags belong to it. [default with the demo model and one
    /// --control: the demo's circle-outline ControlNet].
    #[arg(long = "controlnet", value_name = "DIR_FILE_OR_ID")]
    pub controlnets: Vec<PathBuf>,
    /// For a single-file --model of an unusual size: a diffusers pipeline folder whose config.json files
    /// describe it (as diffusers' from_single_file(config=...)).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// A diffusers UNet folder to use in place of the model's own UNet (e.g. `train --unlock-decoder`'s
    /// RUN/unet/); it must fit the model's latents and text encoder.
    #[arg(long, value_name = "DIR")]
    pub unet: Option<PathBuf>,
    /// A LoRA (kohya/A1111 or diffusers/PEFT .safetensors) merged into the model, with its weight
    /// [default weight: 1], or the text encoders' and the UNet's (`FILE:TE:UNET`, as A1111's
    /// `<lora:name:TE:UNET>`). Repeat for several.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT|:TE:UNET]")]
    pub loras: Vec<String>,
    /// Folder where `<lora:name:weight>` tags in the prompts find `name.safetensors` (subfolders too).
    #[arg(long = "lora-dir", value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// The matching ControlNet conditions only the UNet's middle block (for nets trained with
    /// `train --only-mid-control`, the original repo's only_mid_control).
    #[arg(long = "only-mid-control", action = clap::ArgAction::Count)]
    pub only_mid_control: u8,
    /// For a single-file --controlnet the weights cannot fully describe: its diffusers config.json.
    #[arg(long = "controlnet-config", value_name = "JSON")]
    pub controlnet_configs: Vec<PathBuf>,
    /// Prefer the fp16 weight variant when downloading from the hub (weights are computed in f32 on the CPU).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// What the model predicts: for a single-file checkpoint, when the file cannot tell (SD2 768 models: v); for
    /// a pipeline folder, overrides its scheduler config's prediction_type (as diffusers).
    #[arg(long, value_name = "epsilon|v_prediction")]
    pub prediction_type: Option<String>,
    /// The condition image of the matching --controlnet (edges, depth, pose, ...).
    #[arg(long = "control", value_name = "IMAGE")]
    pub controls: Vec<PathBuf>,
    /// Strength of the matching ControlNet's residuals [default: 1.0].
    #[arg(long = "conditioning-scale", value_name = "F", allow_negative_numbers = true)]
    pub scales: Vec<f64>,
    /// A1111's control mode of the matching ControlNet: balanced, prompt ("My prompt is more important": shallow
    /// residuals weighted down by 0.825 per level) or controlnet ("ControlNet is more important": that, on the
    /// conditional side only) [default: balanced].
    #[arg(long = "control-mode", value_name = "balanced|prompt|controlnet")]
    pub control_modes: Vec<ControlMode>,
    /// Fraction of the steps after which the matching ControlNet starts acting [default: 0.0].
    #[arg(long = "control-start", value_name = "F", allow_negative_numbers = true)]
    pub starts: Vec<f64>,
    /// Fraction of the steps after which the matching ControlNet stops acting [default: 1.0].
    #[arg(long = "control-end", value_name = "F", allow_negative_numbers = true)]
    pub ends: Vec<f64>,
    /// Make the matching --control's condition with this annotator first (canny, lineart, scribble, ...; pose
    /// reads an OpenPose JSON as the --control). See `controlnet annotate --help`.
    #[arg(long = "preprocess", value_name = "KIND")]
    pub preprocess: Vec<String>,
    /// Where the --preprocess annotators find their weights: a folder holding the upstream file names (e.g.
    /// ControlNetHED.pth, body_pose_model.pth), a file or a hub id [default: the hub repo lllyasviel/Annotators;
    /// yzd-v/DWPose for dwpose].
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub annotator_weights: Option<String>,
    /// The condition type for the matching union --controlnet (xinsir's union nets): openpose, depth, softedge,
    /// canny, normal, segment, tile, repaint (or an annotator's name such as hed or lineart, or an index).
    #[arg(long = "control-type", value_name = "TYPE")]
    pub control_types: Vec<String>,
    /// The matching --controlnet's condition runs in the same call as the --controlnet before it, which must be
    /// the same union net (diffusers' one union net with a list of conditions, xinsir's multi-condition use: one
    /// pass of the net for all, each --conditioning-scale weighing its own condition; the window and control mode
    /// are the first unit's).
    #[arg(long = "union-join", action = clap::ArgAction::Count)]
    pub union_join: u8,
    /// Save the condition the matching ControlNet used (after preprocessing and resizing) as a PNG.
    #[arg(long = "save-control", value_name = "PATH")]
    pub save_controls: Vec<PathBuf>,
    /// How a condition whose size differs from the output is fitted: just-resize (as diffusers), crop-and-resize,
    /// resize-and-fill (as A1111).
    #[arg(long, value_enum, default_value_t = ResizeMode::JustResize)]
    pub resize: ResizeMode,
    /// Let the ControlNets recognise the condition's content without a prompt (control on the conditional half only).
    #[arg(long)]
    pub guess_mode: bool,
    /// Decode the image in overlapping 512-px tiles (the VAE's sample_size), blended at the seams, as diffusers'
    /// enable_vae_tiling: the decoder's memory stays that of one tile for large images.
    #[arg(long)]
    pub vae_tiling: bool,
    /// Compute dtype: f32 (the reference), bf16 (half the memory; on CPUs with AMX or AVX512-BF16 several
    /// times faster, f32 activations and sums), f16 (half the memory; f32 activations and products on the CPU,
    /// closer to f32 than bf16), or auto (bf16 where the CPU multiplies bf16 natively, else f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16", "auto"])]
    pub dtype: String,
    /// img2img: start from this picture instead of pure noise (resized to the output size; it gives the default
    /// size). The conditions still come from --control.
    #[arg(long, value_name = "IMAGE")]
    pub init_image: Option<PathBuf>,
    /// Inpainting: repaint where this mask (the size of --init-image) is white, keep where black. It is
    /// binarised at half grey as diffusers does; a mask with many mid-grey pixels is refused.
    #[arg(long, value_name = "IMAGE")]
    pub mask: Option<PathBuf>,
    /// Inpainting: blur --mask by this radius in pixels first (diffusers' mask_processor.blur: PIL's
    /// GaussianBlur); the blurred mask is binarised again, so this rounds the shape [default: 0, none].
    #[arg(long, default_value_t = 0, value_name = "PX")]
    pub mask_blur: u32,
    /// Inpainting: what the masked area starts from before it is noised: original (the picture), latent-noise
    /// (fresh noise from the seed) or latent-nothing (zeros), as A1111's "Masked content".
    #[arg(long, default_value = "original", value_name = "original|latent-noise|latent-nothing")]
    pub masked_content: String,
    /// Inpainting only the masked area (diffusers' padding_mask_crop): the mask's box grown by PX pixels and
    /// widened to the output's aspect ratio is processed at the output size and pasted back over the picture.
    #[arg(long, value_name = "PX")]
    pub padding_mask_crop: Option<u32>,
    /// img2img and inpainting: how much of --init-image is repainted, in (0, 1]: the share of the steps that run
    /// [default: 0.8 for img2img, 1 with --mask, as diffusers].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Hires fix (as A1111): after generating, upscale by this factor (the size rounded down to a multiple of 8)
    /// and run img2img at the larger size with the same prompt, seed and ControlNets.
    #[arg(long, value_name = "F")]
    pub hires_scale: Option<f64>,
    /// Hires fix: steps of the second pass [default: --steps].
    #[arg(long, value_name = "N", requires = "hires_scale")]
    pub hires_steps: Option<usize>,
    /// Hires fix: how much of the upscaled picture the second pass repaints, in (0, 1] [default: 0.7].
    #[arg(long, value_name = "F", allow_negative_numbers = true, requires = "hires_scale")]
    pub hires_strength: Option<f64>,
    /// Hires fix: upscale the latents (bilinear, A1111's "Latent") or the decoded images (Lanczos).
    #[arg(long, value_name = "latent|lanczos", requires = "hires_scale")]
    pub hires_upscaler: Option<String>,
    /// What to draw.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// What to steer away from. With an SDXL model whose config says force_zeros_for_empty_prompt, an empty
    /// negative prompt is zero embeddings, as diffusers does when none is given.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// SDXL: the prompt of the second text encoder [default: --prompt].
    #[arg(long = "prompt-2", value_name = "TEXT")]
    pub prompt_2: Option<String>,
    /// SDXL: the negative prompt of the second text encoder [default: --negative-prompt].
    #[arg(long = "negative-prompt-2", value_name = "TEXT")]
    pub negative_prompt_2: Option<String>,
    /// SDXL: the size the model is told the picture had before cropping (original_size) [default: the output
    /// size]. Small values make SDXL imitate upscaled small pictures.
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL: the crop's top and left offset in pixels (crops_coords_top_left) [default: 0,0, a centred look].
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub crop_top_left: Option<(usize, usize)>,
    /// SDXL: target_size [default: the output size].
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,
    /// Output width [default: the first control image's width rounded down to a multiple of 8, else the model's
    /// native size].
    #[arg(long, value_name = "N")]
    pub width: Option<usize>,
    /// Output height [default: the first control image's height rounded down to a multiple of 8, else the
    /// model's native size].
    #[arg(long, value_name = "N")]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = DEFAULT_STEPS, value_name = "N")]
    pub steps: usize,
    /// Classifier-free guidance scale (off at 1 or below).
    #[arg(long, default_value_t = DEFAULT_GUIDANCE, value_name = "F")]
    pub guidance: f64,
    /// ddim, pndm, euler, euler-a, dpm++2m, unipc, heun, lms, dpm2, dpm2-a, dpm++2m-sde or dpm++sde (+ -karras /
    /// -exponential for euler, dpm++2m, unipc, lms, dpm2, dpm2-a, dpm++2m-sde, dpm++sde), or an A1111 sampler
    /// name such as "DPM++ 2M Karras" or "DPM++ SDE Karras" [default: the model's own scheduler].
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// DDIM's eta in [0, 1]: the share of fresh noise per step (diffusers' eta=; 0 = deterministic). Only with
    /// the ddim scheduler.
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    pub eta: f64,
    /// Random seed (torch.Generator("cpu").manual_seed); printed when not given (once the settings are checked).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Images to make in one batch; files are numbered OUTPUT-1.png, OUTPUT-2.png, ...
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,
    /// Where to write the image: .png, .jpg/.jpeg or .webp (lossless), the recipe inside each (folders are
    /// created; an existing file is only replaced on success).
    #[arg(long, short, value_name = "PATH")]
    pub output: PathBuf,
    /// JPEG quality, 1 to 100 (only for a .jpg/.jpeg --output) [default: 80].
    #[arg(long, value_name = "Q")]
    pub quality: Option<u8>,
    /// No progress display (warnings and the drawn seed are still printed).
    #[arg(long, short)]
    pub quiet: bool,
    // Prompt syntax and clip skip (docs/prompts.md).
    /// How prompts are read: plain (diffusers: no syntax, at most 75 tokens) or a1111 ((word) x1.1,
    /// [word] /1.1, (word:1.3), \( escapes, BREAK, any length in 75-token chunks).
    #[arg(long, default_value = "plain", value_name = "plain|a1111")]
    pub prompt_syntax: String,
    /// A1111's clip skip: 1 = the usual text encoder layer, 2 = the one before (diffusers' clip_skip=1), ...
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub clip_skip: usize,
    // Textual inversion and VAE override (docs/prompts.md, docs/loading.md).
    /// A textual-inversion embedding (A1111 .pt/.safetensors, SDXL clip_l/clip_g .safetensors, diffusers
    /// learned_embeds.bin), used where its name (the file stem) occurs in a prompt. Repeat for several.
    #[arg(long = "embedding", value_name = "FILE")]
    pub embeddings: Vec<PathBuf>,
    /// A1111's embeddings folder: a file there (subfolders too) is used when its name occurs in a prompt.
    #[arg(long = "embeddings-dir", value_name = "DIR")]
    pub embeddings_dir: Option<PathBuf>,
    /// A VAE in place of the model's: a diffusers AutoencoderKL folder or hub id, or one .safetensors/.pt/.ckpt
    /// file (original names, e.g. vae-ft-mse-840000-ema-pruned, or diffusers names).
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub vae: Option<String>,
}

/// The per-net settings of one --controlnet after pairing, and where to save its condition.
struct NetFlags {
    control: ControlRequest,
    save_control: Option<PathBuf>,
}

pub fn run(args: &GenerateArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    // 1. Flags → request (pairing the per-net flags is command-line parsing); outputs checked before any work.
    let nets = if args.model.is_none() && args.controlnets.is_empty() {
        match args.controls.len() {
            0 => Vec::new(),
            1 => demo_net_flags(args)?,
            n => bail!("{n} --control images but no --controlnet: the demo ControlNet takes one"),
        }
    } else {
        pair_net_flags(args, matches)?
    };
    let prediction_type = args.prediction_type.as_deref().map(str::parse).transpose()?;
    let scheduler = args.scheduler.as_deref().map(str::parse).transpose()?;
    let request = GenerateRequest {
        model: args.model.clone(),
        config: args.config.clone(),
        unet: args.unet.clone(),
        variant: args.variant.clone(),
        prediction_type,
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        controls: nets.iter().map(|n| n.control.clone()).collect(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler,
        seed: args.seed,
        num_images: args.num_images,
        guess_mode: args.guess_mode,
        vae_tiling: args.vae_tiling,
        resize: args.resize,
        sdxl: SdxlConditioning {
            prompt_2: args.prompt_2.clone(),
            negative_prompt_2: args.negative_prompt_2.clone(),
            original_size: args.original_size,
            crop_top_left: args.crop_top_left.unwrap_or((0, 0)),
            target_size: args.target_size,
        },
        dtype: crate::pipeline::request::ComputeDtype::parse(&args.dtype)?,
        init_image: args.init_image.clone(),
        mask: args.mask.clone(),
        mask_blur: args.mask_blur,
        strength: args.strength,
        hires: hires_fix(args)?,
        prompt_syntax: crate::pipeline::request::PromptSyntax::parse(&args.prompt_syntax)?,
        clip_skip: args.clip_skip,
        loras: args.loras.iter().map(|s| LoraRequest::parse(s)).collect::<crate::Result<_>>()?,
        lora_dir: args.lora_dir.clone(),
        embeddings: args.embeddings.clone(),
        embeddings_dir: args.embeddings_dir.clone(),
        vae: args.vae.clone(),
        eta: args.eta,
        masked_content: crate::pipeline::inpaint::MaskedContent::parse(&args.masked_content)?,
        padding_mask_crop: args.padding_mask_crop,
    };
    if request.controls.iter().any(|c| c.control.is_dir()) {
        return run_control_folder(request, args, &nets);
    }
    let outputs = output_paths(&args.output, args.num_images)?;
    check_quality(&args.output, args.quality)?;
    let saves: Vec<&Path> = nets.iter().filter_map(|n| n.save_control.as_deref()).collect();
    check_outputs(&request, outputs.iter().map(PathBuf::as_path).chain(saves.iter().copied()))?;

    // 2. Generate.
    let generated = generate(&request, args.quiet)?;

    // 3. Write the conditions asked for, then each image with its metadata.
    for (n, condition) in nets.iter().zip(&generated.conditions) {
        if let (Some(path), Some(image)) = (&n.save_control, condition) {
            images::save_png(path, image, &[])?;
            println!("wrote {}", path.display());
        }
    }
    for (img, path) in generated.images.iter().zip(&outputs) {
        images::save_image(path, &img.image, &img.metadata.text_chunks(), args.quality)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `--control FOLDER`: one image per picture in the folder (the one ControlNet's condition), written beside
/// `--output` as `STEM-<picture stem>.EXT`; the models load once and a picture that fails is reported without
/// stopping the others, as `batch` runs a folder of conditions.
fn run_control_folder(request: GenerateRequest, args: &GenerateArgs, nets: &[NetFlags]) -> anyhow::Result<()> {
    let [control] = request.controls.as_slice() else {
        bail!("--control: a folder of conditions works with one ControlNet ({} given)", request.controls.len());
    };
    let folder = control.control.clone();
    if nets.iter().any(|n| n.save_control.is_some()) {
        bail!("--save-control names one file, but --control {} is a folder: leave it out", folder.display());
    }
    if args.quality.is_some() {
        bail!("--quality applies to one --output image, not to a --control folder's images");
    }
    images::OutputFormat::from_path("output", &args.output)?;
    let mut pictures: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| anyhow::anyhow!("--control {}: {e}", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| super::batch::is_picture(p))
        .collect();
    pictures.sort();
    if pictures.is_empty() {
        bail!("--control: the folder {} holds no images", folder.display());
    }
    let (dir, stem, ext) = output_parts(&args.output);
    let jobs = pictures
        .into_iter()
        .map(|picture| {
            let file = picture.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            let outputs = super::batch::outputs(dir, &format!("{stem}-{file}"), ext, request.num_images);
            let mut one = request.clone();
            one.controls[0].control = picture.clone();
            super::batch::Planned { name: picture.display().to_string(), request: Ok(one), outputs }
        })
        .collect();
    if super::batch::run_planned(jobs, args.quiet)? != std::process::ExitCode::SUCCESS {
        bail!("--control {}: some conditions failed (listed above)", folder.display());
    }
    Ok(())
}

/// Runs a request with the command line's progress display: warnings and the drawn seed on their own lines,
/// the steps as a bar (plain lines when stderr is not a terminal).
pub(crate) fn generate(request: &GenerateRequest, quiet: bool) -> anyhow::Result<Generated> {
    let device = super::device()?;
    let bar = RefCell::new(super::progress::Progress::new(quiet, "step", request.steps as u64));
    let print_seed = request.seed.is_none();
    let on_progress = |p: Progress| match p {
        Progress::Warning(msg) => eprintln!("warning: {}", with_flag(&msg)),
        Progress::Started { seed } if print_seed => println!("seed: {seed}"),
        Progress::Started { .. } => {}
        Progress::Step { done, total } => bar.borrow_mut().set(done as u64, total as u64),
    };
    let cancel = super::stop_on_ctrl_c("; nothing is written");
    let generated = pipeline::run(request, &device, &on_progress, &cancel);
    bar.borrow().finish();
    match generated {
        Err(crate::Error::Cancelled) => {
            eprintln!("stopped by Ctrl-C: nothing was written");
            super::exit_interrupted()
        }
        other => Ok(other?),
    }
}

/// A library message that starts with a setting's name (`prompt: ...`), with the flag instead (`--prompt: ...`).
fn with_flag(msg: &str) -> String {
    let is_setting = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_[].".contains(c));
    match msg.split_once(": ") {
        Some((setting, rest)) if is_setting(setting) => format!("{}: {rest}", super::flag_for(setting)),
        _ => msg.to_string(),
    }
}

/// Refuses an output that is one of the request's inputs (a control image, a model file) before any work.
pub(crate) fn check_outputs<'a>(
    request: &GenerateRequest,
    outputs: impl IntoIterator<Item = &'a Path>,
) -> anyhow::Result<()> {
    let mut inputs: Vec<&Path> = Vec::new();
    inputs.extend(request.model.as_deref().map(Path::new));
    inputs.extend(request.config.as_deref());
    inputs.extend(request.unet.as_deref());
    inputs.extend(request.init_image.as_deref());
    inputs.extend(request.mask.as_deref());
    inputs.extend(request.loras.iter().map(|l| l.path.as_path()));
    inputs.extend(request.embeddings.iter().map(PathBuf::as_path));
    inputs.extend(request.vae.as_deref().map(Path::new));
    for c in &request.controls {
        inputs.push(&c.control);
        inputs.extend(c.controlnet.as_deref().map(Path::new));
        inputs.extend(c.controlnet_config.as_deref());
    }
    for out in outputs {
        check_output_is_not_input("output", out, &inputs)?;
    }
    Ok(())
}

/// The one --control with the demo ControlNet: each per-net flag may be given once.
fn demo_net_flags(args: &GenerateArgs) -> anyhow::Result<Vec<NetFlags>> {
    fn once<T: Clone>(flag: &str, values: &[T]) -> anyhow::Result<Option<T>> {
        match values {
            [] => Ok(None),
            [v] => Ok(Some(v.clone())),
            _ => bail!("{flag} given {} times for the one --control", values.len()),
        }
    }
    if !args.controlnet_configs.is_empty() {
        bail!("--controlnet-config needs a --controlnet");
    }
    let mut control = ControlRequest::new(None, &args.controls[0]);
    control.preprocess = once("--preprocess", &args.preprocess)?;
    control.conditioning_scale = once("--conditioning-scale", &args.scales)?.unwrap_or(1.0);
    control.control_start = once("--control-start", &args.starts)?.unwrap_or(0.0);
    control.control_end = once("--control-end", &args.ends)?.unwrap_or(1.0);
    control.only_mid_control = once("--only-mid-control", &mid_only_flags(args))?.unwrap_or(false);
    control.control_type = once("--control-type", &args.control_types)?;
    if args.union_join > 0 {
        bail!("--union-join joins a union --controlnet to the one before it: the demo has one ControlNet");
    }
    control.control_mode = once("--control-mode", &args.control_modes)?.unwrap_or_default();
    control.annotator_weights = args.annotator_weights.clone();
    let save_control = once("--save-control", &args.save_controls)?;
    check_save_control(&control, save_control.as_deref())?;
    Ok(vec![NetFlags { control, save_control }])
}

/// Pairs the per-net flags with their --controlnet. A flag given once per net pairs by order (the i-th with the
/// i-th); given for only some nets, each belongs to the nearest --controlnet before it on the command line.
fn pair_net_flags(args: &GenerateArgs, m: &ArgMatches) -> anyhow::Result<Vec<NetFlags>> {
    let n = args.controlnets.len();
    if args.controls.len() != n {
        bail!("{} --controlnet but {} --control: give one condition image per ControlNet", n, args.controls.len());
    }
    let net_pos: Vec<usize> = m.indices_of("controlnets").map(|i| i.collect()).unwrap_or_default();
    let scales = per_net(m, &net_pos, args, "scales", "--conditioning-scale", &args.scales)?;
    let starts = per_net(m, &net_pos, args, "starts", "--control-start", &args.starts)?;
    let ends = per_net(m, &net_pos, args, "ends", "--control-end", &args.ends)?;
    let preprocess = per_net(m, &net_pos, args, "preprocess", "--preprocess", &args.preprocess)?;
    let save = per_net(m, &net_pos, args, "save_controls", "--save-control", &args.save_controls)?;
    let configs = per_net(m, &net_pos, args, "controlnet_configs", "--controlnet-config", &args.controlnet_configs)?;
    let mid_only = per_net(m, &net_pos, args, "only_mid_control", "--only-mid-control", &mid_only_flags(args))?;
    let types = per_net(m, &net_pos, args, "control_types", "--control-type", &args.control_types)?;
    let joins = per_net(m, &net_pos, args, "union_join", "--union-join", &vec![true; usize::from(args.union_join)])?;
    let modes = per_net(m, &net_pos, args, "control_modes", "--control-mode", &args.control_modes)?;
    (0..n)
        .map(|i| {
            let control = ControlRequest {
                controlnet: Some(args.controlnets[i].display().to_string()),
                control: args.controls[i].clone(),
                preprocess: preprocess[i].clone(),
                controlnet_config: configs[i].clone(),
                conditioning_scale: scales[i].unwrap_or(1.0),
                control_start: starts[i].unwrap_or(0.0),
                control_end: ends[i].unwrap_or(1.0),
                only_mid_control: mid_only[i].unwrap_or(false),
                control_type: types[i].clone(),
                union_join: joins[i].unwrap_or(false),
                control_mode: modes[i].unwrap_or_default(),
                annotator_weights: args.annotator_weights.clone(),
            };
            check_save_control(&control, save[i].as_deref())?;
            Ok(NetFlags { control, save_control: save[i].clone() })
        })
        .collect()
}

/// The hires fix the --hires-* flags ask for.
fn hires_fix(args: &GenerateArgs) -> anyhow::Result<Option<HiresFix>> {
    let Some(scale) = args.hires_scale else { return Ok(None) };
    let mut hires = HiresFix::new(scale);
    hires.steps = args.hires_steps;
    hires.strength = args.hires_strength.unwrap_or(hires.strength);
    if let Some(name) = &args.hires_upscaler {
        hires.upscaler = Upscaler::parse(name)?;
    }
    Ok(Some(hires))
}

/// `WIDTHxHEIGHT` (`1024x768`).
fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 1024x768"))?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{s:?}: {v:?} is not a whole number"));
    Ok((num(w)?, num(h)?))
}

/// `A,B` (`0,0`).
fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(',').ok_or_else(|| format!("{s:?}: expected two numbers, e.g. 0,0"))?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{s:?}: {v:?} is not a whole number"));
    Ok((num(a)?, num(b)?))
}

/// One `true` per --only-mid-control on the command line (a flag without a value, paired like the others).
fn mid_only_flags(args: &GenerateArgs) -> Vec<bool> {
    vec![true; usize::from(args.only_mid_control)]
}

/// A condition given as a tensor is used as it is: there is no picture to save.
fn check_save_control(control: &ControlRequest, save: Option<&Path>) -> anyhow::Result<()> {
    if save.is_some() && is_condition_tensor(&control.control) {
        bail!("--save-control: the condition {} is already a file", control.control.display());
    }
    Ok(())
}

/// The values of one per-net flag, one slot per --controlnet (`None`: not given for that net).
fn per_net<T: Clone + std::fmt::Debug>(
    m: &ArgMatches,
    net_pos: &[usize],
    args: &GenerateArgs,
    id: &str,
    flag: &str,
    values: &[T],
) -> anyhow::Result<Vec<Option<T>>> {
    let n = net_pos.len();
    if values.len() == n {
        return Ok(values.iter().cloned().map(Some).collect());
    }
    if values.len() > n {
        bail!("{flag} given {} times for {n} --controlnet", values.len());
    }
    let positions: Vec<usize> = m.indices_of(id).map(|i| i.collect()).unwrap_or_default();
    let mut out = vec![None; n];
    for (&pos, v) in positions.iter().zip(values) {
        let Some(owner) = net_pos.iter().rposition(|&p| p < pos) else {
            bail!("{flag} {v:?} comes before any --controlnet: put it after the ControlNet it belongs to");
        };
        if out[owner].replace(v.clone()).is_some() {
            bail!("{flag} given twice for --controlnet {}", args.controlnets[owner].display());
        }
    }
    Ok(out)
}

/// OUTPUT for one image; OUTPUT-1.png, OUTPUT-2.png, ... for several (folders are created when writing).
fn output_paths(output: &Path, num_images: usize) -> anyhow::Result<Vec<PathBuf>> {
    images::OutputFormat::from_path("output", output)?;
    if num_images <= 1 {
        return Ok(vec![output.to_path_buf()]);
    }
    let (parent, stem, ext) = output_parts(output);
    Ok(super::batch::outputs(parent, stem, ext, num_images))
}

/// --output as (folder, stem, extension), what numbered and per-condition names are made from.
fn output_parts(output: &Path) -> (&Path, &str, &str) {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("png");
    (parent, stem, ext)
}

/// --quality: only for a JPEG output, and in 1..=100.
pub(crate) fn check_quality(output: &Path, quality: Option<u8>) -> anyhow::Result<()> {
    let Some(q) = quality else { return Ok(()) };
    if images::OutputFormat::from_path("output", output)? != images::OutputFormat::Jpeg {
        bail!("--quality {q}: only a .jpg/.jpeg --output has a quality (PNG and WebP are lossless)");
    }
    images::check_quality(q)?;
    Ok(())
}
