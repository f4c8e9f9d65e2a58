//! `controlnet batch JOBS.jsonl --output DIR`: many generate jobs, one JSON object per line, with the models
//! loaded once and shared by every job that names them.
//!
//! A line holds `generate` settings as keys (`prompt`, `model`, `controlnet`, `control`, `seed`, `steps`, ...;
//! the per-ControlNet ones take a value or a list) and optionally `output`, the image's name inside DIR (.png, .jpg or .webp: the format) (default
//! `line-N.png`). Paths are relative to the JSONL file. A `control` that is a folder makes one job per image in
//! it. Jobs whose outputs exist are skipped, so a rerun finishes what is left; a failed job is named and the
//! others go on; the exit status is 1 when any failed.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use crate::io::images;
use crate::pipeline::extra_networks::resolve_lora_tags;
use crate::pipeline::generator::read_loras;
use crate::pipeline::hires::{HiresFix, Upscaler};
use crate::pipeline::request::{ComputeDtype, LoraRequest, SdxlConditioning};
use crate::pipeline::sd::{open_controlnet, LoadOptions, StableDiffusion};
use crate::pipeline::{ControlMode, ControlRequest, GenerateRequest, Generator, Progress};

#[derive(Args, Debug)]
pub struct BatchArgs {
    /// The jobs: one JSON object of generate settings per line (blank lines and lines starting with # skipped).
    pub jobs: PathBuf,
    /// The folder the images are written to (created).
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// No step progress (the per-job lines and the summary are still printed).
    #[arg(long, short)]
    pub quiet: bool,
}

/// One value or a list of them (a per-ControlNet setting).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn to_vec(&self) -> Vec<T> {
        match self {
            Self::One(v) => vec![v.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// A line of the jobs file: generate's settings under their flag names (snake or kebab case).
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct Job {
    output: Option<String>,
    model: Option<String>,
    config: Option<String>,
    unet: Option<String>,
    variant: Option<String>,
    prediction_type: Option<String>,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    controlnet: Option<OneOrMany<String>>,
    control: Option<OneOrMany<String>>,
    preprocess: Option<OneOrMany<String>>,
    controlnet_config: Option<OneOrMany<String>>,
    conditioning_scale: Option<OneOrMany<f64>>,
    control_start: Option<OneOrMany<f64>>,
    control_end: Option<OneOrMany<f64>>,
    only_mid_control: Option<OneOrMany<bool>>,
    control_type: Option<OneOrMany<String>>,
    union_join: Option<OneOrMany<bool>>,
    width: Option<usize>,
    height: Option<usize>,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    seed: Option<u64>,
    num_images: Option<usize>,
    #[serde(default)]
    guess_mode: bool,
    #[serde(default)]
    vae_tiling: bool,
    resize: Option<String>,
    dtype: Option<String>,
    prompt_2: Option<String>,
    negative_prompt_2: Option<String>,
    init_image: Option<String>,
    mask: Option<String>,
    #[serde(default)]
    mask_blur: u32,
    masked_content: Option<String>,
    padding_mask_crop: Option<u32>,
    strength: Option<f64>,
    hires_scale: Option<f64>,
    hires_steps: Option<usize>,
    hires_strength: Option<f64>,
    hires_upscaler: Option<String>,
    // Control modes (A1111's per-unit "Control Mode").
    control_mode: Option<OneOrMany<ControlMode>>,
    // Prompt syntax and clip skip (docs/prompts.md).
    prompt_syntax: Option<String>,
    clip_skip: Option<usize>,
    // Annotator weights (generate's --annotator-weights; relative to the jobs file).
    annotator_weights: Option<String>,
    // Textual inversion and VAE override (docs/prompts.md, docs/loading.md).
    embedding: Option<OneOrMany<String>>,
    embeddings_dir: Option<String>,
    vae: Option<String>,
    // LoRAs (generate's --lora FILE[:W], repeatable, and --lora-dir for prompt tags; relative to the jobs file).
    lora: Option<OneOrMany<String>>,
    lora_dir: Option<String>,
}

/// A checked job: its name, request and output files.
type Ready = (String, GenerateRequest, Vec<PathBuf>);

/// A job ready to run (or the reason it cannot).
pub(crate) struct Planned {
    /// "line 3" or "line 3, control cat.png".
    pub name: String,
    pub request: anyhow::Result<GenerateRequest>,
    pub outputs: Vec<PathBuf>,
}

pub fn run(args: &BatchArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.jobs).with_context(|| format!("{}", args.jobs.display()))?;
    let base = args.jobs.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        jobs.extend(plan(i + 1, line, base, &args.output));
    }
    if jobs.is_empty() {
        bail!("{}: no jobs (one JSON object per line)", args.jobs.display());
    }
    run_planned(jobs, args.quiet)
}

/// Runs planned jobs as `batch` does (also `generate --control FOLDER`): finished ones skipped, the others grouped
/// by base model so each loads once, failures reported without stopping the rest, then a summary; exit status 1
/// when any failed.
pub(crate) fn run_planned(jobs: Vec<Planned>, quiet: bool) -> anyhow::Result<ExitCode> {
    // 1. Finished jobs are skipped; the others are grouped by base model, so each loads once.
    let total = jobs.len();
    let mut failed: Vec<(String, String)> = Vec::new();
    let (mut written, mut skipped) = (0, 0);
    let mut groups: Vec<(String, Vec<Ready>)> = Vec::new();
    for job in jobs {
        if !job.outputs.is_empty() && job.outputs.iter().all(|p| p.exists()) {
            skipped += 1;
            continue;
        }
        // prompt tags become LoRA files here, so jobs group by the merge their model needs
        let checked = job.request.and_then(|r| Ok(resolve_lora_tags(&r)?)).and_then(|r| {
            super::generate::check_outputs(&r, job.outputs.iter().map(PathBuf::as_path))?;
            Ok(r)
        });
        match checked {
            Err(e) => failed.push((job.name, super::describe(&e))),
            Ok(r) => {
                let key = model_key(&r);
                let item = (job.name, r, job.outputs);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, items)) => items.push(item),
                    None => groups.push((key, vec![item])),
                }
            }
        }
    }
    for (name, err) in &failed {
        eprintln!("failed: {name}: {err}");
    }

    // 2. Each group: its model and ControlNets once, then its jobs.
    let device = super::device()?;
    let cancel = super::stop_on_ctrl_c("; finished images are kept, a rerun does the rest");
    let mut done = skipped + failed.len();
    for (_, items) in groups {
        let first = &items[0].1;
        let opts = load_options(first, &device)?;
        let loras = read_loras(&first.loras, &|p| {
            if let Progress::Warning(msg) = p {
                eprintln!("warning: {msg}");
            }
        });
        let sd = loras.and_then(|loras| {
            StableDiffusion::open_with_loras(first.model.as_deref().unwrap_or_default(), &opts, &loras)
        });
        let sd = sd.and_then(|mut sd| {
            if let Some(unet) = &first.unet {
                sd.replace_unet("unet", unet)?;
            }
            if let Some(vae) = &first.vae {
                sd.replace_vae("vae", vae, &opts)?;
            }
            Ok(sd)
        });
        let sd = match sd {
            Ok(sd) => sd,
            Err(e) => {
                let msg = super::describe(&e.into());
                for (name, _, _) in items {
                    eprintln!("failed: {name}: {msg}");
                    failed.push((name, msg.clone()));
                }
                continue;
            }
        };
        let mut nets = HashMap::new();
        for (_, r, _) in &items {
            for (i, c) in r.controls.iter().enumerate() {
                let key = net_key(c);
                nets.entry(key).or_insert_with(|| {
                    let spec = c.controlnet.as_deref().unwrap_or_default();
                    let setting = crate::pipeline::request::control_setting(i, "controlnet");
                    let net = open_controlnet(&setting, spec, c.controlnet_config.as_deref(), &opts, Some(&sd));
                    net.map_err(|e| super::describe(&e.into()))
                });
            }
        }
        let mut generators: HashMap<Vec<String>, Generator> = HashMap::new();
        for (name, request, outputs) in items {
            done += 1;
            let keys: Vec<String> = request.controls.iter().map(net_key).collect();
            let loaded: Result<Vec<_>, String> = keys.iter().map(|k| nets[k].as_ref().map_err(String::clone)).collect();
            let loaded = match loaded {
                Ok(l) => l,
                Err(msg) => {
                    eprintln!("failed: {name}: {msg}");
                    failed.push((name, msg));
                    continue;
                }
            };
            let generator = generators.entry(keys).or_insert_with(|| Generator::new(&sd, loaded));
            eprintln!("job {done}/{total} ({name})");
            match run_job(generator, &request, &outputs, quiet, &cancel) {
                Ok(()) => written += 1,
                Err(e) if matches!(e.downcast_ref::<crate::Error>(), Some(crate::Error::Cancelled)) => {
                    eprintln!("stopped by Ctrl-C: finished images are kept; run the batch again to do the rest");
                    super::exit_interrupted()
                }
                Err(e) => {
                    let msg = super::describe(&e);
                    eprintln!("failed: {name}: {msg}");
                    failed.push((name, msg));
                }
            }
        }
    }

    // 3. Summary.
    println!("{total} jobs: {written} written, {skipped} already done, {} failed", failed.len());
    for (name, err) in &failed {
        println!("  failed: {name}: {err}");
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn run_job(
    generator: &Generator,
    request: &GenerateRequest,
    outputs: &[PathBuf],
    quiet: bool,
    cancel: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let bar = std::cell::RefCell::new(super::progress::Progress::new(quiet, "step", request.steps as u64));
    let on_progress = |p: Progress| match p {
        Progress::Warning(msg) => eprintln!("warning: {msg}"),
        Progress::Started { .. } => {}
        Progress::Step { done, total } => bar.borrow_mut().set(done as u64, total as u64),
    };
    let generated = generator.run(request, &on_progress, cancel);
    bar.borrow().finish();
    let generated = generated?;
    for (img, path) in generated.images.iter().zip(outputs) {
        images::save_image(path, &img.image, &img.metadata.text_chunks(), None)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The jobs of one line: one, or one per image when `control` is a folder.
fn plan(line: usize, text: &str, base: &Path, out_dir: &Path) -> Vec<Planned> {
    let name = format!("line {line}");
    let job: Job = match serde_json::from_str(text) {
        Ok(job) => job,
        Err(e) => return vec![Planned { name, request: Err(anyhow::anyhow!("not a job: {e}")), outputs: Vec::new() }],
    };
    let (stem, ext) = output_name(job.output.as_deref(), line);
    let folder = match job.control.as_ref().map(OneOrMany::to_vec).as_deref() {
        Some([one]) if base.join(one).is_dir() => Some(base.join(one)),
        _ => None,
    };
    let Some(folder) = folder else {
        let request = to_request(&job, base);
        let outputs = outputs(out_dir, &stem, &ext, request.as_ref().map_or(1, |r| r.num_images));
        return vec![Planned { name, request, outputs }];
    };
    let mut pictures: Vec<PathBuf> = match std::fs::read_dir(&folder) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_picture(p)).collect(),
        Err(e) => {
            return vec![Planned {
                name,
                request: Err(anyhow::anyhow!("control {}: {e}", folder.display())),
                outputs: Vec::new(),
            }]
        }
    };
    pictures.sort();
    if pictures.is_empty() {
        let err = anyhow::anyhow!("--control: the folder {} holds no images", folder.display());
        return vec![Planned { name, request: Err(err), outputs: Vec::new() }];
    }
    pictures
        .into_iter()
        .map(|picture| {
            let file = picture.file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string();
            let one = Job { control: Some(OneOrMany::One(picture.display().to_string())), ..job.clone() };
            let request = to_request(&one, base);
            let outputs =
                outputs(out_dir, &format!("{stem}-{file}"), &ext, request.as_ref().map_or(1, |r| r.num_images));
            Planned { name: format!("{name}, control {}", picture.display()), request, outputs }
        })
        .collect()
}

/// A file a folder of conditions contributes: a picture by its extension.
pub(crate) fn is_picture(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "webp" | "bmp"))
}

/// A job's output name as (stem, extension): `output` with its .png/.jpg/.jpeg/.webp extension (the format), any
/// other name with .png added; `line-N.png` when absent.
fn output_name(output: Option<&str>, line: usize) -> (String, String) {
    let Some(name) = output else { return (format!("line-{line}"), "png".to_string()) };
    match name.rsplit_once('.') {
        Some((stem, ext)) if images::OutputFormat::from_path("output", Path::new(name)).is_ok() => {
            (stem.to_string(), ext.to_string())
        }
        _ => (name.to_string(), "png".to_string()),
    }
}

/// `DIR/STEM.EXT`, or `DIR/STEM-1.EXT`, ... for several images (as `generate` numbers them).
pub(crate) fn outputs(dir: &Path, stem: &str, ext: &str, num_images: usize) -> Vec<PathBuf> {
    if num_images <= 1 {
        return vec![dir.join(format!("{stem}.{ext}"))];
    }
    (1..=num_images).map(|i| dir.join(format!("{stem}-{i}.{ext}"))).collect()
}

/// A path from the jobs file: relative to its folder.
fn path(base: &Path, p: &str) -> PathBuf {
    base.join(p)
}

/// A model or ControlNet: a path relative to the jobs file when that exists, else as given (a hub id).
fn model_spec(base: &Path, spec: &str) -> String {
    let local = base.join(spec);
    if local.exists() {
        local.display().to_string()
    } else {
        spec.to_string()
    }
}

fn to_request(job: &Job, base: &Path) -> anyhow::Result<GenerateRequest> {
    let list = |v: &Option<OneOrMany<String>>| v.as_ref().map(OneOrMany::to_vec).unwrap_or_default();
    let nets = list(&job.controlnet);
    let conds = list(&job.control);
    if nets.len() != conds.len() && !(nets.is_empty() && job.model.is_none() && conds.len() == 1) {
        bail!("{} controlnet but {} control: give one condition per ControlNet", nets.len(), conds.len());
    }
    let per_net = |name: &str, n: usize| -> anyhow::Result<()> {
        if n > conds.len().max(1) {
            bail!("{name}: {n} values for {} ControlNets", conds.len());
        }
        Ok(())
    };
    let pick = |v: &Option<OneOrMany<f64>>, i: usize, default: f64| {
        v.as_ref()
            .map(OneOrMany::to_vec)
            .and_then(|v| if v.len() == 1 { v.first().copied() } else { v.get(i).copied() })
            .unwrap_or(default)
    };
    for (name, v) in [
        ("conditioning_scale", &job.conditioning_scale),
        ("control_start", &job.control_start),
        ("control_end", &job.control_end),
    ] {
        per_net(name, v.as_ref().map_or(0, |v| v.to_vec().len()))?;
    }
    let preprocess = list(&job.preprocess);
    let configs = list(&job.controlnet_config);
    let mid = job.only_mid_control.as_ref().map(OneOrMany::to_vec).unwrap_or_default();
    let types = list(&job.control_type);
    let joins = job.union_join.as_ref().map(OneOrMany::to_vec).unwrap_or_default();
    let modes = job.control_mode.as_ref().map(OneOrMany::to_vec).unwrap_or_default();
    per_net("control_mode", modes.len())?;
    let controls = conds
        .iter()
        .enumerate()
        .map(|(i, c)| ControlRequest {
            controlnet: nets.get(i).map(|n| model_spec(base, n)),
            control: path(base, c),
            preprocess: preprocess.get(i).or(if preprocess.len() == 1 { preprocess.first() } else { None }).cloned(),
            controlnet_config: configs.get(i).map(|p| path(base, p)),
            conditioning_scale: pick(&job.conditioning_scale, i, 1.0),
            control_start: pick(&job.control_start, i, 0.0),
            control_end: pick(&job.control_end, i, 1.0),
            only_mid_control: mid.get(i).copied().unwrap_or(false),
            control_type: types.get(i).or(if types.len() == 1 { types.first() } else { None }).cloned(),
            union_join: joins.get(i).copied().unwrap_or(false),
            control_mode: modes
                .get(i)
                .or(if modes.len() == 1 { modes.first() } else { None })
                .copied()
                .unwrap_or_default(),
            annotator_weights: job.annotator_weights.as_ref().map(|w| model_spec(base, w)),
        })
        .collect();
    let defaults = GenerateRequest::default();
    let hires = match job.hires_scale {
        Some(scale) => {
            let mut h = HiresFix::new(scale);
            h.steps = job.hires_steps;
            h.strength = job.hires_strength.unwrap_or(h.strength);
            if let Some(u) = &job.hires_upscaler {
                h.upscaler = Upscaler::parse(u)?;
            }
            Some(h)
        }
        None => None,
    };
    let request = GenerateRequest {
        model: job.model.as_deref().map(|m| model_spec(base, m)),
        config: job.config.as_deref().map(|p| path(base, p)),
        unet: job.unet.as_deref().map(|p| path(base, p)),
        variant: job.variant.clone(),
        prediction_type: job.prediction_type.as_deref().map(str::parse).transpose()?,
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        controls,
        width: job.width,
        height: job.height,
        steps: job.steps.unwrap_or(defaults.steps),
        guidance: job.guidance.unwrap_or(defaults.guidance),
        scheduler: job
            .scheduler
            .as_deref()
            .map(|s| s.parse().map_err(|e| anyhow::anyhow!("--scheduler: {e}")))
            .transpose()?,
        seed: job.seed,
        num_images: job.num_images.unwrap_or(1),
        guess_mode: job.guess_mode,
        vae_tiling: job.vae_tiling,
        resize: job
            .resize
            .as_deref()
            .map(crate::pipeline::request::parse_resize)
            .transpose()?
            .unwrap_or(defaults.resize),
        sdxl: SdxlConditioning {
            prompt_2: job.prompt_2.clone(),
            negative_prompt_2: job.negative_prompt_2.clone(),
            ..Default::default()
        },
        dtype: job.dtype.as_deref().map(ComputeDtype::parse).transpose()?.unwrap_or_default(),
        init_image: job.init_image.as_deref().map(|p| path(base, p)),
        mask: job.mask.as_deref().map(|p| path(base, p)),
        mask_blur: job.mask_blur,
        strength: job.strength,
        hires,
        prompt_syntax: job
            .prompt_syntax
            .as_deref()
            .map(crate::pipeline::request::PromptSyntax::parse)
            .transpose()?
            .unwrap_or_default(),
        clip_skip: job.clip_skip.unwrap_or(crate::pipeline::request::DEFAULT_CLIP_SKIP),
        loras: job
            .lora
            .as_ref()
            .map(OneOrMany::to_vec)
            .unwrap_or_default()
            .iter()
            // FILE[:W] with FILE relative to the jobs file (an absolute FILE stays as it is)
            .map(|spec| LoraRequest::parse(&base.join(spec).to_string_lossy()))
            .collect::<crate::Result<_>>()?,
        lora_dir: job.lora_dir.as_deref().map(|p| path(base, p)),
        embeddings: job
            .embedding
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default()
            .iter()
            .map(|p| path(base, p))
            .collect(),
        embeddings_dir: job.embeddings_dir.as_deref().map(|p| path(base, p)),
        vae: job.vae.as_deref().map(|v| model_spec(base, v)),
        eta: 0.0,
        masked_content: job
            .masked_content
            .as_deref()
            .map(crate::pipeline::inpaint::MaskedContent::parse)
            .transpose()?
            .unwrap_or_default(),
        padding_mask_crop: job.padding_mask_crop,
    };
    let request = request.with_demo_defaults()?;
    request.validate()?;
    Ok(request)
}

fn load_options(request: &GenerateRequest, device: &candle_core::Device) -> anyhow::Result<LoadOptions> {
    Ok(LoadOptions {
        dtype: request.dtype.resolve(device),
        device: device.clone(),
        variant: request.variant.clone(),
        prediction_type: request.prediction_type,
        config_dir: request.config.clone(),
    })
}

/// What decides the loaded base model: jobs with the same key share it.
fn model_key(r: &GenerateRequest) -> String {
    let loras: Vec<_> = r.loras.iter().map(|l| (&l.path, l.weight)).collect();
    format!("{:?}", (&r.model, &r.config, &r.unet, &r.variant, r.prediction_type, r.dtype, &r.vae, loras))
}

fn net_key(c: &ControlRequest) -> String {
    format!("{:?}", (&c.controlnet, &c.controlnet_config))
}
