//! `controlnet generate`: flags → validated settings → the pipeline → PNG files carrying their recipe.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{ArgMatches, Args, ValueEnum};

use crate::annotate::pose::{DrawOptions, PoseFile};
use crate::annotate::{self, AnnotateSettings, DetectorOptions, ResizeMode};
use crate::io::images::{self, ResampleFilter};
use crate::io::weights::{find_safetensors, DIFFUSERS_STEM, TRANSFORMERS_STEM};
use crate::model::controlnet::ControlNetModel;
use crate::pipeline::demo;
use crate::pipeline::recipe::{ControlRecipe, FileRef, Recipe};
use crate::pipeline::sd::{open_controlnet, LoadOptions};
use crate::pipeline::{generate, Control, GenerateParams, StableDiffusion};
use crate::schedulers::SchedulerKind;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Stable Diffusion 1.x/2.x: a diffusers pipeline folder, a single-file checkpoint (.safetensors/.ckpt as
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
    /// For a single-file --controlnet the weights cannot fully describe: its diffusers config.json.
    #[arg(long = "controlnet-config", value_name = "JSON")]
    pub controlnet_configs: Vec<PathBuf>,
    /// Prefer the fp16 weight variant when downloading from the hub (weights are computed in f32 on the CPU).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// What a single-file checkpoint's model predicts, when the file cannot tell (SD2 768 models: v).
    #[arg(long, value_name = "epsilon|v_prediction")]
    pub prediction_type: Option<String>,
    /// The condition image of the matching --controlnet (edges, depth, pose, ...).
    #[arg(long = "control", value_name = "IMAGE")]
    pub controls: Vec<PathBuf>,
    /// Strength of the matching ControlNet's residuals [default: 1.0].
    #[arg(long = "conditioning-scale", value_name = "F", allow_negative_numbers = true)]
    pub scales: Vec<f64>,
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
    /// What to draw.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Output width [default: the first control image's width rounded down to a multiple of 8].
    #[arg(long, value_name = "N")]
    pub width: Option<usize>,
    /// Output height [default: the first control image's height rounded down to a multiple of 8].
    #[arg(long, value_name = "N")]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub steps: usize,
    /// Classifier-free guidance scale (off at 1 or below).
    #[arg(long, default_value_t = 7.5, value_name = "F")]
    pub guidance: f64,
    /// ddim, pndm, euler, euler-a, dpm++2m or unipc [default: the model's own scheduler].
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// Random seed (torch.Generator("cpu").manual_seed); printed when not given.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Images to make in one batch; files are numbered OUTPUT-1.png, OUTPUT-2.png, ...
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,
    /// Where to write the PNG (written atomically: an existing file is only replaced on success).
    #[arg(long, short, value_name = "PATH")]
    pub output: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The per-net settings of one --controlnet after pairing.
struct NetFlags {
    controlnet: PathBuf,
    control: PathBuf,
    preprocess: Option<String>,
    save_control: Option<PathBuf>,
    config: Option<PathBuf>,
    scale: f64,
    start: f64,
    end: f64,
}

pub fn run(args: &GenerateArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    // 1. Settings that need no model: the demo defaults, pairing, scheduler name, output paths.
    let (model, demo_controlnet) = match &args.model {
        Some(m) => (m.clone(), None),
        None => {
            let base = demo::base()?.display().to_string();
            let net = match (args.controlnets.len(), args.controls.len()) {
                (0, 1) => Some(demo::controlnet()?),
                (0, n) if n > 1 => bail!("{n} --control images but no --controlnet: the demo ControlNet takes one"),
                _ => None,
            };
            (base, net)
        }
    };
    let nets = match demo_controlnet {
        Some(net) => demo_net_flags(args, net)?,
        None => pair_net_flags(args, matches)?,
    };
    let scheduler = args
        .scheduler
        .as_deref()
        .map(|s| s.parse::<SchedulerKind>().map_err(|e| anyhow::anyhow!("--scheduler: {e}")))
        .transpose()?;
    let outputs = output_paths(&args.output, args.num_images)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    if args.seed.is_none() {
        println!("seed: {seed}");
    }

    // 2. Conditions as given (before the models, so a bad file fails fast).
    let sources: Vec<ControlSource> = nets.iter().map(ControlSource::load).collect::<anyhow::Result<_>>()?;

    // 3. Models.
    let device = super::device()?;
    let prediction_type = args
        .prediction_type
        .as_deref()
        .map(|p| p.parse().map_err(|e| anyhow::anyhow!("--prediction-type {p}: {e}")))
        .transpose()?;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: device.clone(),
        variant: args.variant.clone(),
        prediction_type,
        config_dir: args.config.clone(),
    };
    let sd = StableDiffusion::open(&model, &opts)?;
    let loaded: Vec<ControlNetModel> = nets
        .iter()
        .map(|n| open_controlnet(&n.controlnet.to_string_lossy(), n.config.as_deref(), &opts))
        .collect::<crate::Result<_>>()?;

    // 4. Size: given, else the first condition's size rounded down to a multiple of 8, else the model's.
    let factor = sd.vae_scale_factor();
    let (default_w, default_h) = match sources.first() {
        Some(src) => {
            let (w, h) = src.size();
            ((w as usize / factor) * factor, (h as usize / factor) * factor)
        }
        None => (sd.default_size(), sd.default_size()),
    };
    let width = args.width.unwrap_or(default_w);
    let height = args.height.unwrap_or(default_h);
    if width == 0 || height == 0 {
        bail!("the output size {width}x{height} is empty: the control image is smaller than {factor} pixels; pass --width/--height");
    }
    crate::pipeline::generate::check_size(width, height, factor)?;

    // 5. Conditions at the output size: annotated when asked, fitted by --resize (just-resize = diffusers:
    //    PIL's Lanczos filter), scaled to [0, 1].
    let mut controls = Vec::new();
    for ((n, net), src) in nets.iter().zip(&loaded).zip(&sources) {
        let image = match src {
            // A float condition (e.g. `annotate inpaint`'s, with -1 at masked pixels) is used as it is.
            ControlSource::Tensor(t) => {
                let (_, _, h, w) = t.dims4()?;
                if (w, h) != (width, height) {
                    bail!("--control {}: the condition tensor is {w}x{h} but the output is {width}x{height}; tensors are not resized", n.control.display());
                }
                if n.save_control.is_some() {
                    bail!("--save-control: the condition {} is already a file", n.control.display());
                }
                t.to_device(&device)?
            }
            _ => {
                let resized = src.condition(n, width as u32, height as u32, args.resize)?;
                if let Some(path) = &n.save_control {
                    images::save_png(path, &resized, &[])?;
                }
                images::to_tensor01(&resized, &device)?
            }
        };
        controls.push(Control { net, image, scale: n.scale, start: n.start, end: n.end });
    }
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler,
        seed,
        num_images: args.num_images,
        guess_mode: args.guess_mode,
        vae_tiling: args.vae_tiling,
    };
    crate::pipeline::generate::validate(&sd, &controls, &params)?;

    // 6. Run, with a progress bar on stderr.
    let bar = progress_bar(args.quiet);
    let out = generate(&sd, &controls, &params, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();

    // 7. Write each image with its recipe.
    let scheduler_name = match scheduler {
        Some(k) => k.cli_name().to_string(),
        None => sd.scheduler_config.own_kind()?.cli_name().to_string(),
    };
    let mut recipe = Recipe {
        software: format!("controlnet-rs {}", env!("CARGO_PKG_VERSION")),
        model: FileRef { path: model.clone(), sha256: weights_hash(&sd.dir, true)? },
        controls: nets
            .iter()
            .zip(&loaded)
            .map(|(n, net)| {
                Ok(ControlRecipe {
                    controlnet: FileRef {
                        path: n.controlnet.display().to_string(),
                        sha256: weights_hash(net.source().unwrap_or(&n.controlnet), false)?,
                    },
                    preprocess: n.preprocess.clone(),
                    config: n.config.as_ref().map(|c| c.display().to_string()),
                    control_image: FileRef {
                        path: n.control.display().to_string(),
                        sha256: images::sha256_file(&n.control)?,
                    },
                    conditioning_scale: n.scale,
                    control_start: n.start,
                    control_end: n.end,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        width,
        height,
        steps: params.steps,
        guidance: params.guidance,
        scheduler: scheduler_name,
        resize: args.resize.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        model_config: args.config.as_ref().map(|c| c.display().to_string()),
        prediction_type: args.prediction_type.clone(),
        seed,
        guess_mode: params.guess_mode,
        vae_tiling: params.vae_tiling,
        num_images: params.num_images,
        image_index: 1,
    };
    for (i, (img, path)) in out.images.iter().zip(&outputs).enumerate() {
        recipe.image_index = i + 1;
        images::save_png(path, img, &recipe.text_chunks())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The one --control with the demo ControlNet: each per-net flag may be given once.
fn demo_net_flags(args: &GenerateArgs, controlnet: PathBuf) -> anyhow::Result<Vec<NetFlags>> {
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
    Ok(vec![NetFlags {
        controlnet,
        control: args.controls[0].clone(),
        preprocess: once("--preprocess", &args.preprocess)?,
        save_control: once("--save-control", &args.save_controls)?,
        config: None,
        scale: once("--conditioning-scale", &args.scales)?.unwrap_or(1.0),
        start: once("--control-start", &args.starts)?.unwrap_or(0.0),
        end: once("--control-end", &args.ends)?.unwrap_or(1.0),
    }])
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
    Ok((0..n)
        .map(|i| NetFlags {
            controlnet: args.controlnets[i].clone(),
            control: args.controls[i].clone(),
            preprocess: preprocess[i].clone(),
            save_control: save[i].clone(),
            config: configs[i].clone(),
            scale: scales[i].unwrap_or(1.0),
            start: starts[i].unwrap_or(0.0),
            end: ends[i].unwrap_or(1.0),
        })
        .collect())
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

/// A condition as the user gave it: an image, or OpenPose keypoints for `--preprocess pose`.
enum ControlSource {
    Image(image::RgbImage),
    Pose(PoseFile),
    /// A `.safetensors` file with a float condition `control` of shape (1, channels, height, width).
    Tensor(candle_core::Tensor),
}

impl ControlSource {
    fn load(n: &NetFlags) -> anyhow::Result<Self> {
        let flag = || format!("--control {}", n.control.display());
        if n.preprocess.as_deref() == Some("pose") {
            let pose = PoseFile::from_json_file(&n.control).with_context(flag)?;
            if pose.canvas_size().is_none() {
                bail!("{}: the pose has no canvas_width/canvas_height", flag());
            }
            return Ok(Self::Pose(pose));
        }
        if n.control.extension().is_some_and(|e| e == "safetensors") {
            let mut tensors = candle_core::safetensors::load(&n.control, &candle_core::Device::Cpu)
                .map_err(|e| anyhow::anyhow!("{}: {e}", flag()))?;
            let t = tensors.remove("control").with_context(|| format!("{}: has no tensor named control", flag()))?;
            if t.rank() != 4 || t.dim(0)? != 1 {
                bail!("{}: control must have shape (1, channels, height, width), found {:?}", flag(), t.dims());
            }
            return Ok(Self::Tensor(t.to_dtype(candle_core::DType::F32)?));
        }
        Ok(Self::Image(images::load_rgb(&n.control).with_context(flag)?))
    }

    /// Width and height as given (a pose's canvas).
    fn size(&self) -> (u32, u32) {
        match self {
            Self::Image(img) => img.dimensions(),
            Self::Pose(p) => p.canvas_size().unwrap_or((0, 0)),
            Self::Tensor(t) => {
                let d = t.dims();
                (d[3] as u32, d[2] as u32)
            }
        }
    }

    /// The condition at the output size: annotated with --preprocess, fitted with --resize.
    fn condition(&self, n: &NetFlags, width: u32, height: u32, mode: ResizeMode) -> anyhow::Result<image::RgbImage> {
        let map = match (self, n.preprocess.as_deref()) {
            (Self::Pose(pose), _) => {
                let (cw, ch) = pose.canvas_size().unwrap_or((width, height));
                // Fit the canvas as --resize says: keypoints scale with it (just-resize stretches them).
                let fitted = match mode {
                    ResizeMode::JustResize => pose.resize_canvas(width, height)?,
                    _ => {
                        let s = match mode {
                            ResizeMode::CropAndResize => (width as f64 / cw as f64).max(height as f64 / ch as f64),
                            _ => (width as f64 / cw as f64).min(height as f64 / ch as f64),
                        };
                        let (dx, dy) = ((width as f64 - cw as f64 * s) / 2.0, (height as f64 - ch as f64 * s) / 2.0);
                        pose.to_pixels()?.scale(s, s)?.translate(dx, dy)?.with_canvas(width, height)?
                    }
                };
                fitted.render_canvas(DrawOptions::default())?
            }
            (Self::Image(img), Some(kind)) => {
                let detector = annotate::detector(kind, &DetectorOptions::default())
                    .with_context(|| format!("--preprocess {kind}"))?;
                let settings =
                    AnnotateSettings { width: Some(width), height: Some(height), resolution: None, resize: mode };
                annotate::annotate(detector.as_ref(), img, &settings)?
            }
            (Self::Tensor(_), _) => bail!("--control {}: a condition tensor is used as it is", n.control.display()),
            (Self::Image(img), None) => match mode {
                ResizeMode::JustResize => img.clone(),
                _ => annotate::resize::fit_to_output(img, width, height, mode),
            },
        };
        // diffusers' own resize (a plain copy when the size already matches).
        Ok(images::resize(&map, width, height, ResampleFilter::Lanczos))
    }
}

/// OUTPUT for one image; OUTPUT-1.png, OUTPUT-2.png, ... for several. The folder must exist.
fn output_paths(output: &Path, num_images: usize) -> anyhow::Result<Vec<PathBuf>> {
    if output.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
        bail!("--output {}: the file name must end in .png", output.display());
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--output {}: folder {} does not exist", output.display(), parent.display());
    }
    if num_images <= 1 {
        return Ok(vec![output.to_path_buf()]);
    }
    let stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    Ok((1..=num_images).map(|i| parent.join(format!("{stem}-{i}.png"))).collect())
}

fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Keep it below 2^53 so it survives JSON tools that read numbers as doubles.
    ((nanos ^ (std::process::id() as u128) << 32) as u64) & ((1 << 53) - 1)
}

fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed} (ETA {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// SHA-256 of a weights file; for a folder, over the SHA-256s of its weight files (a pipeline's: unet, vae and
/// text encoder).
fn weights_hash(path: &Path, pipeline: bool) -> anyhow::Result<String> {
    if !path.is_dir() {
        return Ok(images::sha256_file(path)?);
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

fn combined_hash(files: &[PathBuf]) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    if let [one] = files {
        return Ok(images::sha256_file(one)?);
    }
    let mut h = Sha256::new();
    for f in files {
        h.update(images::sha256_file(f)?.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
