//! The AUTOMATIC1111 API subset, with the ControlNet extension's routes and units, so that A1111 clients
//! (`webuiapi`, scripts) use this engine unchanged.
//!
//! A field is either used (mapped to a [`GenerateRequest`] field), known not to change the picture (saving
//! options, hires-fix settings while hires fix is off), or refused with 422 naming it: a field that would
//! change the picture is never silently ignored, nor is a field this server does not know.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::files::{decode_base64, decode_image, encode_base64, png_bytes};
use super::queue::{Annotation, Job, JobSpec, Namer, Run};
use super::{read_json, App};
use crate::annotate::{self, AnnotateSettings, DetectorOptions, Input, ResizeMode};
use crate::pipeline::request::random_seed;
use crate::pipeline::{ControlRequest, GenerateRequest};
use crate::schedulers::SchedulerKind;

/// The ControlNet extension's API version (`/controlnet/version`).
pub const CONTROLNET_API_VERSION: u32 = 2;
/// A1111's default annotator resolution (`processor_res` -1).
pub const DEFAULT_PROCESSOR_RES: u32 = 512;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/controlnet/version", get(|| async { Json(json!({ "version": CONTROLNET_API_VERSION })) }))
        .route("/controlnet/model_list", get(model_list))
        .route("/controlnet/module_list", get(module_list))
        .route("/controlnet/detect", post(detect))
}

/// A1111's sampler names and ours.
pub const SAMPLERS: &[(&str, SchedulerKind, &[&str])] = &[
    ("Euler a", SchedulerKind::EulerAncestral, &["k_euler_a", "k_euler_ancestral"]),
    ("Euler", SchedulerKind::Euler, &["k_euler"]),
    ("DDIM", SchedulerKind::Ddim, &[]),
    ("DPM++ 2M", SchedulerKind::DpmSolverMultistep, &["k_dpmpp_2m"]),
    ("UniPC", SchedulerKind::UniPc, &[]),
    ("PNDM", SchedulerKind::Pndm, &["PLMS"]),
];

fn sampler(name: &str) -> Option<SchedulerKind> {
    let wanted = name.trim().to_ascii_lowercase();
    SAMPLERS.iter().find_map(|(n, kind, aliases)| {
        let names = std::iter::once(*n).chain(aliases.iter().copied());
        names.into_iter().any(|a| a.to_ascii_lowercase() == wanted).then_some(*kind)
    })
}

fn sampler_name(kind: SchedulerKind) -> &'static str {
    SAMPLERS.iter().find(|(_, k, _)| *k == kind).map(|(n, _, _)| *n).unwrap_or("")
}

/// The extension's module names for our annotators (ours are accepted as they are).
const MODULE_ALIASES: &[(&str, &str)] = &[
    ("lineart_standard", "lineart"),
    ("lineart_standard (from white bg & black line)", "lineart"),
    ("invert (from white bg & black line)", "invert"),
    ("scribble_xdog", "scribble"),
    ("tile_resample", "tile"),
    ("blur_gaussian", "blur"),
    ("t2ia_color_grid", "color"),
];

/// Our annotator kind for a module name (`None` for "none"); only kinds made from a picture.
fn module_kind(field: &str, name: &str) -> Result<Option<&'static str>, ApiError> {
    let wanted = name.trim().to_ascii_lowercase();
    if wanted.is_empty() || wanted == "none" {
        return Ok(None);
    }
    let ours = MODULE_ALIASES.iter().find(|(a, _)| *a == wanted).map(|(_, k)| *k).unwrap_or(wanted.as_str());
    match annotate::KINDS.iter().find(|k| k.name == ours) {
        Some(k) if k.input == Input::Image => Ok(Some(k.name)),
        _ => Err(ApiError::field(
            field,
            format!("{name:?} is not a module this server has; see /controlnet/module_list"),
        )),
    }
}

/// The detector settings a module's two sliders set (the extension's `threshold_a`/`threshold_b`); -1 or
/// absent: the annotator's default.
fn slider_options(kind: &str, a: Option<f64>, b: Option<f64>) -> DetectorOptions {
    let given = |v: Option<f64>| v.filter(|v| *v != -1.0);
    let (a, b) = (given(a), given(b));
    let mut o = DetectorOptions::default();
    match kind {
        "canny" => (o.low, o.high) = (a, b),
        "binary" | "scribble" => o.threshold = a,
        "blur" => o.sigma = a,
        "tile" => o.rate = a,
        "normal" => o.bg_threshold = a,
        _ => {}
    }
    o
}

/// The names the extension gives the resize modes (and their older spellings), or their index.
fn resize_mode(field: &str, v: &Value) -> Result<ResizeMode, ApiError> {
    let modes = [
        (ResizeMode::JustResize, &["just resize"][..]),
        (ResizeMode::CropAndResize, &["crop and resize", "scale to fit (inner fit)"][..]),
        (ResizeMode::ResizeAndFill, &["resize and fill", "envelope (outer fit)"][..]),
    ];
    if let Some(i) = v.as_u64() {
        return modes
            .get(i as usize)
            .map(|m| m.0)
            .ok_or_else(|| ApiError::field(field, format!("{i}: expected 0, 1 or 2")));
    }
    let name = v.as_str().ok_or_else(|| ApiError::field(field, "expected a resize mode name"))?.to_ascii_lowercase();
    modes.iter().find(|(_, names)| names.contains(&name.as_str())).map(|m| m.0).ok_or_else(|| {
        ApiError::field(
            field,
            format!("{name:?}: expected \"Just Resize\", \"Crop and Resize\" or \"Resize and Fill\""),
        )
    })
}

/// Reads typed values out of a JSON object, naming the field (with its path) in errors.
struct Fields<'a> {
    path: String,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| ApiError::malformed(self.name(key), "expected a string")))
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| ApiError::malformed(self.name(key), "expected a number")))
            .transpose()
    }

    fn i64(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                    .ok_or_else(|| ApiError::malformed(self.name(key), "expected a whole number"))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, ApiError> {
        self.i64(key)?
            .map(|v| usize::try_from(v).map_err(|_| ApiError::field(self.name(key), format!("{v} must be >= 0"))))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::malformed(self.name(key), "expected true or false")))
            .transpose()
    }

    /// Refuses a field that would change the picture unless it has its default (or is absent).
    fn only_default(&self, key: &str, is_default: impl Fn(&Value) -> bool, why: &str) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !is_default(v) => Err(ApiError::field(self.name(key), format!("{v} is not supported: {why}"))),
            _ => Ok(()),
        }
    }

    fn unknown(&self, key: &str) -> ApiError {
        ApiError::field(self.name(key), "not a field this server knows (refused rather than ignored)")
    }
}

fn is_false(v: &Value) -> bool {
    v.as_bool() == Some(false)
}
fn is_num(x: f64) -> impl Fn(&Value) -> bool {
    move |v| v.as_f64() == Some(x)
}
fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// txt2img fields that do not change the picture (saving options; hires-fix settings, which only act with
/// `enable_hr`; the subseed, which only acts with a subseed strength).
const HARMLESS: &[&str] = &[
    "send_images",
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "denoising_strength",
    "firstphase_width",
    "firstphase_height",
    "subseed",
    "script_args",
    "comments",
    "force_task_id",
    "infotext",
    "disable_extra_networks",
    "refiner_switch_at",
];

/// A parsed txt2img body: the job and what the answer echoes.
struct Txt2Img {
    spec: JobSpec,
    sampler: Option<SchedulerKind>,
    seed: u64,
}

fn parse_txt2img(app: &App, body: &Value) -> Result<Txt2Img, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let f = Fields { path: String::new(), obj };
    let mut r = GenerateRequest { model: Some(app.catalog.model_spec.clone()), ..Default::default() };
    let mut n_iter = 1;
    for key in obj.keys() {
        let k = key.as_str();
        match k {
            "prompt" => r.prompt = f.str(k)?.unwrap_or_default().to_string(),
            "negative_prompt" => r.negative_prompt = f.str(k)?.unwrap_or_default().to_string(),
            "seed" => {
                r.seed = match f.i64(k)? {
                    None | Some(-1) => None,
                    Some(s) => Some(u64::try_from(s).map_err(|_| ApiError::field(k, format!("{s}: -1 or >= 0")))?),
                }
            }
            "steps" => r.steps = f.usize(k)?.unwrap_or(r.steps),
            "cfg_scale" => r.guidance = f.f64(k)?.unwrap_or(r.guidance),
            "width" => r.width = f.usize(k)?,
            "height" => r.height = f.usize(k)?,
            "batch_size" => r.num_images = f.usize(k)?.unwrap_or(1),
            "n_iter" => n_iter = f.usize(k)?.unwrap_or(1),
            "sampler_name" | "sampler_index" | "alwayson_scripts" | "eta" => {}
            "scheduler" => f.only_default(
                k,
                |v| v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("automatic")),
                "only the sampler's own schedule (\"Automatic\")",
            )?,
            "enable_hr" => f.only_default(k, is_false, "hires fix")?,
            "restore_faces" => f.only_default(k, is_false, "face restoration")?,
            "tiling" => f.only_default(k, is_false, "tiling")?,
            "subseed_strength" => f.only_default(k, is_num(0.0), "variation seeds")?,
            "seed_resize_from_h" | "seed_resize_from_w" => {
                f.only_default(k, |v| v.as_f64().is_some_and(|x| x <= 0.0), "resizing the seed")?
            }
            "s_churn" | "s_tmin" | "s_min_uncond" => f.only_default(k, is_num(0.0), "sampler noise settings")?,
            "s_tmax" => f.only_default(
                k,
                |v| v.as_f64().is_some_and(|x| x == 0.0 || x.is_infinite()),
                "sampler noise settings",
            )?,
            "s_noise" => f.only_default(k, is_num(1.0), "sampler noise settings")?,
            "styles" | "script_name" | "refiner_checkpoint" => {
                f.only_default(k, is_empty, "styles, scripts and refiners")?
            }
            "override_settings" => check_overrides(app, &f)?,
            k if HARMLESS.contains(&k) => {}
            k => return Err(f.unknown(k)),
        }
    }
    if n_iter == 0 {
        return Err(ApiError::field("n_iter", "must be at least 1"));
    }
    let sampler = match (f.str("sampler_name")?, f.str("sampler_index")?) {
        (Some(name), _) | (None, Some(name)) => Some(sampler(name).ok_or_else(|| {
            let names: Vec<&str> = SAMPLERS.iter().map(|s| s.0).collect();
            ApiError::field("sampler_name", format!("{name:?}: this server has {}", names.join(", ")))
        })?),
        (None, None) => None,
    };
    r.scheduler = sampler;
    // eta: A1111's ancestral samplers use 1, DDIM 0 (as ours); other samplers do not read it.
    let eta_default = match sampler {
        Some(SchedulerKind::EulerAncestral) => Some(1.0),
        Some(SchedulerKind::Ddim) => Some(0.0),
        _ => None,
    };
    if let (Some(eta), Some(want)) = (f.f64("eta")?, eta_default) {
        if eta != want {
            return Err(ApiError::field("eta", format!("{eta} is not supported: this sampler runs with eta {want}")));
        }
    }
    let (controls, nets, annotations) = match f.get("alwayson_scripts") {
        Some(scripts) => parse_scripts(app, &mut r, scripts)?,
        None => Default::default(),
    };
    r.controls = controls;
    let name_of = namer(&nets_arg_index(obj));
    r.validate().map_err(|e| ApiError::from_library(e, &*name_of))?;
    let seed = r.seed.unwrap_or_else(random_seed);
    let runs = (0..n_iter)
        .map(|i| Run {
            request: GenerateRequest { seed: Some(seed + (i * r.num_images) as u64), ..r.clone() },
            nets: nets.clone(),
            annotations: annotations.clone(),
        })
        .collect();
    Ok(Txt2Img { spec: JobSpec { runs, name_of }, sampler, seed })
}

/// For each enabled unit, its index in `alwayson_scripts.controlnet.args` (for error names).
fn nets_arg_index(obj: &Map<String, Value>) -> Vec<usize> {
    let Some(scripts) = obj.get("alwayson_scripts").and_then(Value::as_object) else { return Vec::new() };
    let Some(args) = scripts
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("controlnet"))
        .and_then(|(_, v)| v.get("args"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    args.iter().enumerate().filter(|(_, u)| unit_enabled(u)).map(|(i, _)| i).collect()
}

fn unit_enabled(u: &Value) -> bool {
    u.is_object() && u.get("enabled").and_then(Value::as_bool) != Some(false)
}

/// How this API spells the library's settings: `guidance` → `cfg_scale`, `controls[i].control_end` →
/// `alwayson_scripts.controlnet.args[j].guidance_end`.
fn namer(arg_index: &[usize]) -> Namer {
    let arg_index = arg_index.to_vec();
    Arc::new(move |setting: &str| {
        let top = |s: &str| {
            match s {
                "guidance" => "cfg_scale",
                "num_images" => "batch_size",
                "scheduler" => "sampler_name",
                other => other,
            }
            .to_string()
        };
        let Some(rest) = setting.strip_prefix("controls[") else { return top(setting) };
        let Some((i, field)) = rest.split_once("].") else { return top(setting) };
        let Ok(i) = i.parse::<usize>() else { return top(setting) };
        let field = match field {
            "controlnet" => "model",
            "control" => "image",
            "conditioning_scale" => "weight",
            "control_start" => "guidance_start",
            "control_end" => "guidance_end",
            "preprocess" => "module",
            other => other,
        };
        format!("alwayson_scripts.controlnet.args[{}].{field}", arg_index.get(i).copied().unwrap_or(i))
    })
}

/// `override_settings`: only the loaded model (by name or title) and CLIP skip 1 are accepted.
fn check_overrides(app: &App, f: &Fields) -> Result<(), ApiError> {
    let Some(v) = f.get("override_settings") else { return Ok(()) };
    let obj = v.as_object().ok_or_else(|| ApiError::malformed("override_settings", "expected an object"))?;
    for (key, value) in obj {
        let field = format!("override_settings.{key}");
        let ok = match key.as_str() {
            "sd_model_checkpoint" => value.as_str().is_some_and(|m| {
                m == app.catalog.model_name || m == model_title(&app.catalog) || m == app.catalog.model_spec
            }),
            "CLIP_stop_at_last_layers" => value.as_f64() == Some(1.0),
            _ => false,
        };
        if !ok {
            return Err(ApiError::field(
                field,
                format!("{value} is not supported (this server runs {})", model_title(&app.catalog)),
            ));
        }
    }
    Ok(())
}

type Units = (Vec<ControlRequest>, Vec<usize>, Option<Vec<Option<Annotation>>>);

/// `alwayson_scripts`: the ControlNet units (script names match case-insensitively, as A1111's); any other
/// script is refused unless it is switched off (`{"args": []}` or `{"args": [false]}`).
fn parse_scripts(app: &App, r: &mut GenerateRequest, scripts: &Value) -> Result<Units, ApiError> {
    let obj = scripts.as_object().ok_or_else(|| ApiError::malformed("alwayson_scripts", "expected an object"))?;
    let mut units = Default::default();
    for (name, script) in obj {
        let field = format!("alwayson_scripts.{name}");
        let args = match script.get("args") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ApiError::malformed(format!("{field}.args"), "expected a list")),
        };
        if name.eq_ignore_ascii_case("controlnet") {
            units = parse_units(app, r, args)?;
        } else if !args.iter().all(|a| is_false(a) || a.is_null()) {
            return Err(ApiError::field(field, "this script is not supported (only ControlNet)"));
        }
    }
    Ok(units)
}

/// Unit fields that do not change the picture.
const UNIT_HARMLESS: &[&str] = &[
    "low_vram",
    "lowvram",
    "hr_option",
    "is_ui",
    "input_mode",
    "save_detected_map",
    "batch_images",
    "output_dir",
    "loopback",
];

fn parse_units(app: &App, r: &mut GenerateRequest, args: &[Value]) -> Result<Units, ApiError> {
    let mut controls = Vec::new();
    let mut nets = Vec::new();
    let mut annotations = Vec::new();
    let mut resize: Option<ResizeMode> = None;
    for (i, unit) in args.iter().enumerate() {
        let path = format!("alwayson_scripts.controlnet.args[{i}]");
        let Some(obj) = unit.as_object() else {
            if unit.is_null() || is_false(unit) {
                continue;
            }
            return Err(ApiError::malformed(path, "expected a ControlNet unit (an object)"));
        };
        let f = Fields { path, obj };
        if f.bool("enabled")? == Some(false) {
            continue;
        }
        for key in obj.keys() {
            let k = key.as_str();
            match k {
                "image" | "input_image" | "module" | "model" | "weight" | "resize_mode" | "processor_res"
                | "threshold_a" | "threshold_b" | "guidance_start" | "guidance_end" | "pixel_perfect" | "enabled" => {}
                "mask" => f.only_default(k, is_empty, "masks (inpainting) are not supported")?,
                "control_mode" => f.only_default(
                    k,
                    |v| v.as_u64() == Some(0) || v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("balanced")),
                    "only \"Balanced\"",
                )?,
                "guessmode" | "guess_mode" => f.only_default(k, is_false, "use control_mode")?,
                k if UNIT_HARMLESS.contains(&k) => {}
                k => return Err(f.unknown(k)),
            }
        }
        let model = f.str("model")?.unwrap_or("None");
        let net = app.catalog.find_net(model).ok_or_else(|| {
            ApiError::field(
                f.name("model"),
                format!("{model:?} is not loaded; this server has {}", app.catalog.net_names()),
            )
        })?;
        let image_field = if f.get("image").is_some() { "image" } else { "input_image" };
        let picture = match f.get(image_field) {
            Some(Value::String(s)) if !s.is_empty() => s.as_str(),
            // The extension's {"image": ..., "mask": ...} form.
            Some(Value::Object(o)) => {
                if o.get("mask").is_some_and(|m| !m.is_null() && !is_empty(m)) {
                    return Err(ApiError::field(f.name("image.mask"), "masks (inpainting) are not supported"));
                }
                o.get("image")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::malformed(f.name("image.image"), "expected base64"))?
            }
            _ => {
                return Err(ApiError::field(
                    f.name("image"),
                    "a ControlNet unit needs a picture (txt2img has no init image)",
                ))
            }
        };
        let bytes = decode_base64(&f.name(image_field), picture)?;
        decode_image(&f.name(image_field), &bytes)?;
        let file =
            app.work.save_input(&bytes).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mode = match f.get("resize_mode") {
            Some(v) => resize_mode(&f.name("resize_mode"), v)?,
            None => ResizeMode::CropAndResize,
        };
        if resize.is_some_and(|m| m != mode) {
            return Err(ApiError::field(f.name("resize_mode"), "every unit must use the same resize mode here"));
        }
        resize = Some(mode);
        let kind = module_kind(&f.name("module"), f.str("module")?.unwrap_or("none"))?;
        let annotation = match kind {
            None => None,
            Some(kind) => {
                let options = slider_options(kind, f.f64("threshold_a")?, f.f64("threshold_b")?);
                let resolution = if f.bool("pixel_perfect")? == Some(true) {
                    None
                } else {
                    Some(match f.i64("processor_res")? {
                        None | Some(-1) => DEFAULT_PROCESSOR_RES,
                        Some(r) => u32::try_from(r)
                            .map_err(|_| ApiError::field(f.name("processor_res"), format!("{r}: -1 or >= 1")))?,
                    })
                };
                Some(Annotation { kind: kind.to_string(), options, resolution })
            }
        };
        let mut control = ControlRequest::new(Some(app.catalog.nets[net].spec.clone()), file);
        control.conditioning_scale = f.f64("weight")?.unwrap_or(1.0);
        control.control_start = f.f64("guidance_start")?.unwrap_or(0.0);
        control.control_end = f.f64("guidance_end")?.unwrap_or(1.0);
        match &annotation {
            // The pipeline's own preprocess: the same run as `generate --preprocess KIND`.
            Some(a) if a.options.given().is_empty() && a.resolution.is_none() => {
                control.preprocess = Some(a.kind.clone());
                annotations.push(None);
            }
            other => annotations.push(other.clone()),
        }
        controls.push(control);
        nets.push(net);
    }
    r.resize = resize.unwrap_or(ResizeMode::JustResize);
    let annotations = annotations.iter().any(Option::is_some).then_some(annotations);
    Ok((controls, nets, annotations))
}

/// The model as A1111 titles it: `name [first 10 hex digits of its hash]`.
fn model_title(c: &super::Catalog) -> String {
    format!("{} [{}]", c.model_name, &c.model_sha256[..10.min(c.model_sha256.len())])
}

/// Cancels a job whose client went away before it finished.
struct CancelOnDrop(Arc<Job>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.0.snapshot().state.is_finished() {
            self.0.request_cancel();
        }
    }
}

async fn txt2img(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = read_json(body)?;
    let parsed = {
        let (app, body) = (app.clone(), body.clone());
        tokio::task::spawn_blocking(move || parse_txt2img(&app, &body))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    let job = app.queue.submit(parsed.spec.clone())?;
    let guard = CancelOnDrop(job.clone());
    let output = match job.finished().await {
        Err(e) if e.status == StatusCode::CONFLICT => {
            return Err(ApiError::new(StatusCode::CONFLICT, "interrupted (/sdapi/v1/interrupt) before it finished"))
        }
        other => other?,
    };
    drop(guard);
    let images: Vec<Value> = output.images.iter().map(|i| Value::String(encode_base64(&i.png))).collect();
    let first = parsed.spec.runs.first().map(|r| &r.request);
    let metas: Vec<_> = output.images.iter().map(|i| &i.metadata).collect();
    let info = json!({
        "prompt": first.map(|r| r.prompt.clone()),
        "all_prompts": metas.iter().map(|m| m.prompt.clone()).collect::<Vec<_>>(),
        "negative_prompt": first.map(|r| r.negative_prompt.clone()),
        "all_negative_prompts": metas.iter().map(|m| m.negative_prompt.clone()).collect::<Vec<_>>(),
        "seed": parsed.seed,
        "all_seeds": metas.iter().map(|m| m.seed).collect::<Vec<_>>(),
        "subseed": -1,
        "all_subseeds": metas.iter().map(|_| -1).collect::<Vec<_>>(),
        "subseed_strength": 0,
        "width": metas.first().map(|m| m.width),
        "height": metas.first().map(|m| m.height),
        "sampler_name": parsed.sampler.map(sampler_name),
        "cfg_scale": first.map(|r| r.guidance),
        "steps": first.map(|r| r.steps),
        "batch_size": first.map(|r| r.num_images),
        "restore_faces": false,
        "sd_model_name": app.catalog.model_name,
        "sd_model_hash": &app.catalog.model_sha256[..10.min(app.catalog.model_sha256.len())],
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": 0,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": metas.iter().map(|m| m.a1111_parameters()).collect::<Vec<_>>(),
        "styles": [],
        "clip_skip": 1,
        "version": format!("controlnet-rs {}", env!("CARGO_PKG_VERSION")),
    });
    Ok(Json(json!({ "images": images, "parameters": body, "info": info.to_string() })))
}

async fn progress(State(app): State<Arc<App>>) -> Json<Value> {
    let job = app.queue.current();
    let snap = job.as_ref().map(|j| j.snapshot());
    let (step, total) = snap.as_ref().map(|s| (s.step, s.total)).unwrap_or((0, 0));
    let fraction = if total > 0 { step as f64 / total as f64 } else { 0.0 };
    let eta = match job.as_ref().and_then(|j| j.running_for()) {
        Some(t) if fraction > 0.0 => t / fraction - t,
        _ => 0.0,
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": job.as_ref().is_some_and(|j| j.cancel.load(std::sync::atomic::Ordering::SeqCst)),
            "job": snap.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            "job_count": app.queue.waiting() + usize::from(job.is_some()),
            "job_timestamp": "",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": null,
        "textinfo": null,
    }))
}

async fn interrupt(State(app): State<Arc<App>>) -> Json<Value> {
    let interrupted = app.queue.interrupt();
    Json(json!({ "interrupted": interrupted }))
}

async fn sd_models(State(app): State<Arc<App>>) -> Json<Value> {
    let c = &app.catalog;
    Json(json!([{
        "title": model_title(c),
        "model_name": c.model_name,
        "hash": &c.model_sha256[..10.min(c.model_sha256.len())],
        "sha256": c.model_sha256,
        "filename": c.model_spec,
        "config": null,
    }]))
}

async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SAMPLERS.iter().map(|(name, _, aliases)| json!({ "name": name, "aliases": aliases, "options": {} })).collect(),
    ))
}

async fn model_list(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({ "model_list": app.catalog.nets.iter().map(|n| n.title.clone()).collect::<Vec<_>>() }))
}

async fn module_list() -> Json<Value> {
    let mut modules = vec!["none"];
    modules.extend(annotate::KINDS.iter().filter(|k| k.input == Input::Image).map(|k| k.name));
    let detail: Map<String, Value> = annotate::KINDS
        .iter()
        .filter(|k| k.input == Input::Image)
        .map(|k| (k.name.to_string(), json!({ "summary": k.summary, "settings": k.settings })))
        .collect();
    Json(json!({ "module_list": modules, "module_detail": detail }))
}

/// `/controlnet/detect`: the control map of each picture, as `controlnet annotate KIND PICTURE --resolution
/// processor_res [thresholds]` makes it (at the picture's size).
async fn detect(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = read_json(body)?;
    let _turn =
        app.detect_gate.acquire().await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let work = app.work.clone();
    let maps = tokio::task::spawn_blocking(move || detect_maps(&work, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!({ "images": maps, "info": "Success" })))
}

fn detect_maps(work: &super::files::WorkDir, body: &Value) -> Result<Vec<String>, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let f = Fields { path: String::new(), obj };
    for key in obj.keys() {
        match key.as_str() {
            "controlnet_module"
            | "controlnet_input_images"
            | "controlnet_images"
            | "controlnet_processor_res"
            | "controlnet_threshold_a"
            | "controlnet_threshold_b"
            | "low_vram" => {}
            "controlnet_masks" => f.only_default(key, is_empty, "masks are not supported")?,
            k => return Err(f.unknown(k)),
        }
    }
    // The extension reads `controlnet_input_images`; webuiapi 0.9.17 sends `controlnet_images`.
    let field =
        if f.get("controlnet_input_images").is_some() { "controlnet_input_images" } else { "controlnet_images" };
    let pictures = f
        .get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::field("controlnet_input_images", "a list of base64 pictures is needed"))?;
    let kind = module_kind("controlnet_module", f.str("controlnet_module")?.unwrap_or("none"))?;
    let resolution = match f.i64("controlnet_processor_res")? {
        None | Some(-1) => None,
        Some(r) => Some(
            u32::try_from(r)
                .ok()
                .filter(|r| *r > 0)
                .ok_or_else(|| ApiError::field("controlnet_processor_res", format!("{r}: -1 or >= 1")))?,
        ),
    };
    let (a, b) = (f.f64("controlnet_threshold_a")?, f.f64("controlnet_threshold_b")?);
    let options = kind.map(|k| slider_options(k, a, b)).unwrap_or_default();
    let lib = |e: crate::Error| {
        ApiError::from_library(e, &|s: &str| match s {
            "low" | "threshold" | "sigma" | "rate" | "bg_threshold" => "controlnet_threshold_a".into(),
            "high" => "controlnet_threshold_b".into(),
            "resolution" => "controlnet_processor_res".into(),
            other => other.into(),
        })
    };
    let detector = kind.map(|k| annotate::detector(k, &options)).transpose().map_err(lib)?;
    pictures
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = format!("{field}[{i}]");
            let text = p.as_str().ok_or_else(|| ApiError::malformed(&name, "expected base64"))?;
            let picture = decode_image(&name, &decode_base64(&name, text)?)?;
            let map = match &detector {
                Some(d) => {
                    let settings = AnnotateSettings { resolution, ..Default::default() };
                    annotate::annotate(d.as_ref(), &picture, &settings).map_err(lib)?
                }
                None => picture,
            };
            let png = png_bytes(work, &map, &[]).map_err(lib)?;
            Ok(encode_base64(&png))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_modules_and_resize_modes_map_to_ours() {
        assert_eq!(sampler("Euler a"), Some(SchedulerKind::EulerAncestral));
        assert_eq!(sampler("k_euler_a"), Some(SchedulerKind::EulerAncestral));
        assert_eq!(sampler("PLMS"), Some(SchedulerKind::Pndm));
        assert_eq!(sampler("LMS"), None);
        assert_eq!(module_kind("m", "Canny").unwrap(), Some("canny"));
        assert_eq!(module_kind("m", "scribble_xdog").unwrap(), Some("scribble"));
        assert_eq!(module_kind("m", "none").unwrap(), None);
        assert!(module_kind("m", "depth_midas").unwrap_err().detail().starts_with("m: \"depth_midas\""));
        assert!(module_kind("m", "pose").is_err(), "pose is drawn from keypoints, not detected");
        assert_eq!(resize_mode("r", &json!("Crop and Resize")).unwrap(), ResizeMode::CropAndResize);
        assert_eq!(resize_mode("r", &json!(2)).unwrap(), ResizeMode::ResizeAndFill);
        assert!(resize_mode("r", &json!("Stretch")).is_err());
    }

    #[test]
    fn sliders_set_the_module_settings() {
        let o = slider_options("canny", Some(64.0), Some(-1.0));
        assert_eq!((o.low, o.high), (Some(64.0), None));
        assert!(slider_options("lineart", Some(64.0), Some(64.0)).given().is_empty());
        assert_eq!(slider_options("blur", Some(3.0), None).sigma, Some(3.0));
    }

    #[test]
    fn errors_name_the_a1111_field() {
        let n = namer(&[2]);
        assert_eq!(n("guidance"), "cfg_scale");
        assert_eq!(n("num_images"), "batch_size");
        assert_eq!(n("controls[0].control_end"), "alwayson_scripts.controlnet.args[2].guidance_end");
    }
}
