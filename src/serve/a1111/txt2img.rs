//! `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img`: the request's fields and the ControlNet extension's units →
//! a job; the answer in A1111's shape. What img2img and the hires fix add is read in [`super::img2img`].
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};

use super::fields::{is_empty, is_false, is_num, Fields};
use super::img2img::{self, HIRES_FIELDS, IMG2IMG_FIELDS};
use super::{control_mode, module_kind, resize_mode, sampler, sampler_names, slider_options, DEFAULT_PROCESSOR_RES};
use crate::annotate::ResizeMode;
use crate::model::controlnet_union::{control_type_for_annotator, CONTROL_TYPES};
use crate::pipeline::extra_networks::resolve_lora_tags;
use crate::pipeline::request::{random_seed, PromptSyntax};
use crate::pipeline::{ControlRequest, GenerateRequest};
use crate::schedulers::{Sampler, SchedulerKind};
use crate::serve::error::ApiError;
use crate::serve::files::{decode_base64, decode_image, encode_base64};
use crate::serve::queue::{Annotation, Job, JobSpec, Namer, Run};
use crate::serve::{read_json, App};

/// Fields that do not change the picture (saving options; the subseed, which only acts with a subseed
/// strength).
const HARMLESS: &[&str] = &[
    "send_images",
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
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

/// The two routes: img2img takes txt2img's fields and an init picture, txt2img the hires fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Txt2Img,
    Img2Img,
}

/// A parsed body: the job and what the answer echoes.
struct Parsed {
    spec: JobSpec,
    sampler: Option<Sampler>,
    seed: u64,
    /// For each control, whether its map is appended to `images` (the extension's detected maps).
    append_maps: Vec<bool>,
}

fn parse_request(app: &App, body: &Value, kind: Kind) -> Result<Parsed, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let f = Fields { path: String::new(), obj };
    // A1111's prompts: its syntax (weights, BREAK, any length) and LoRA tags found in `--lora-dir`.
    let settings = match f.get("override_settings") {
        Some(overrides) => app.settings().with_overrides(&app.catalog, overrides)?,
        None => app.settings(),
    };
    let mut r = GenerateRequest {
        model: Some(app.catalog.model_spec.clone()),
        prompt_syntax: PromptSyntax::A1111,
        clip_skip: settings.clip_skip,
        lora_dir: app.catalog.lora_dir.clone(),
        ..Default::default()
    };
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
            "override_settings" => {}
            k if HARMLESS.contains(&k) => {}
            k if kind == Kind::Img2Img && IMG2IMG_FIELDS.contains(&k) => {}
            k if kind == Kind::Txt2Img && HIRES_FIELDS.contains(&k) => {}
            k => return Err(f.unknown(k)),
        }
    }
    if n_iter == 0 {
        return Err(ApiError::field("n_iter", "must be at least 1"));
    }
    let sampler = match (f.str("sampler_name")?, f.str("sampler_index")?) {
        (Some(name), _) | (None, Some(name)) => Some(sampler(name).ok_or_else(|| {
            let names: Vec<String> = sampler_names().into_iter().map(|(n, _)| n).collect();
            ApiError::field("sampler_name", format!("{name:?}: this server has {}", names.join(", ")))
        })?),
        (None, None) => None,
    };
    r.scheduler = sampler;
    // eta: DDIM takes it (diffusers' `eta=`, 0 by default); A1111's ancestral and SDE samplers use 1, as ours
    // run; other samplers do not read it.
    let eta_default = match sampler.map(|s| s.kind) {
        Some(
            SchedulerKind::EulerAncestral
            | SchedulerKind::KDpm2Ancestral
            | SchedulerKind::DpmSolverMultistepSde
            | SchedulerKind::DpmSolverSde,
        ) => Some(1.0),
        _ => None,
    };
    match (f.f64("eta")?, eta_default) {
        (Some(eta), _) if sampler.map(|s| s.kind) == Some(SchedulerKind::Ddim) => r.eta = eta,
        (Some(eta), Some(want)) if eta != want => {
            return Err(ApiError::field("eta", format!("{eta} is not supported: this sampler runs with eta {want}")));
        }
        _ => {}
    }
    let init = match kind {
        Kind::Txt2Img => {
            r.hires = img2img::hires(&f, &r)?;
            None
        }
        Kind::Img2Img => Some(img2img::init_inputs(app, &f, &mut r)?),
    };
    let Units { controls, nets, annotations, save_maps } = match f.get("alwayson_scripts") {
        Some(scripts) => parse_scripts(app, &mut r, scripts, init.as_deref())?,
        None => Default::default(),
    };
    r.controls = controls;
    let name_of = namer(&nets_arg_index(obj));
    r.validate().map_err(|e| ApiError::from_library(e, &*name_of))?;
    // LoRA tags name files that exist (they are read when the job runs).
    resolve_lora_tags(&r).map_err(|e| ApiError::from_library(e, &*name_of))?;
    let append_maps = save_maps.into_iter().map(|save| save && !settings.no_detectmap).collect();
    let seed = r.seed.unwrap_or_else(random_seed);
    let runs = (0..n_iter)
        .map(|i| Run {
            request: GenerateRequest { seed: Some(seed + (i * r.num_images) as u64), ..r.clone() },
            nets: nets.clone(),
            annotations: annotations.clone(),
        })
        .collect();
    Ok(Parsed { spec: JobSpec { runs, name_of }, sampler, seed, append_maps })
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
                "init_image" => "init_images",
                "strength" | "hires.strength" => "denoising_strength",
                "hires.scale" => "hr_scale",
                "hires.steps" => "hr_second_pass_steps",
                "hires.upscaler" => "hr_upscaler",
                "clip_skip" => "override_settings.CLIP_stop_at_last_layers",
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

/// The enabled ControlNet units as the pipeline takes them.
#[derive(Default)]
struct Units {
    controls: Vec<ControlRequest>,
    /// The catalog index of each control's net.
    nets: Vec<usize>,
    annotations: Option<Vec<Option<Annotation>>>,
    /// Each unit's `save_detected_map` (default true): its map is appended to the answer.
    save_maps: Vec<bool>,
}

/// `alwayson_scripts`: the ControlNet units (script names match case-insensitively, as A1111's); any other
/// script is refused unless it is switched off (`{"args": []}` or `{"args": [false]}`).
fn parse_scripts(app: &App, r: &mut GenerateRequest, scripts: &Value, init: Option<&Path>) -> Result<Units, ApiError> {
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
            units = parse_units(app, r, args, init)?;
        } else if !args.iter().all(|a| is_false(a) || a.is_null()) {
            return Err(ApiError::field(field, "this script is not supported (only ControlNet)"));
        }
    }
    Ok(units)
}

/// Unit fields that do not change the picture.
const UNIT_HARMLESS: &[&str] =
    &["low_vram", "lowvram", "hr_option", "is_ui", "input_mode", "batch_images", "output_dir", "loopback"];

/// The enabled units; a unit without a picture uses img2img's `init` picture, as the extension does.
fn parse_units(app: &App, r: &mut GenerateRequest, args: &[Value], init: Option<&Path>) -> Result<Units, ApiError> {
    let mut controls = Vec::new();
    let mut nets = Vec::new();
    let mut annotations = Vec::new();
    let mut save_maps = Vec::new();
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
                | "threshold_a" | "threshold_b" | "guidance_start" | "guidance_end" | "pixel_perfect" | "enabled"
                | "save_detected_map" | "union_control_type" => {}
                "mask" => f.only_default(k, is_empty, "masks (inpainting) are not supported")?,
                "control_mode" => {}
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
            Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
            // The extension's {"image": ..., "mask": ...} form.
            Some(Value::Object(o)) => {
                if o.get("mask").is_some_and(|m| !m.is_null() && !is_empty(m)) {
                    return Err(ApiError::field(f.name("image.mask"), "masks (inpainting) are not supported"));
                }
                Some(
                    o.get("image")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::malformed(f.name("image.image"), "expected base64"))?,
                )
            }
            _ => None,
        };
        let file: PathBuf = match (picture, init) {
            (Some(picture), _) => {
                let bytes = decode_base64(&f.name(image_field), picture)?;
                decode_image(&f.name(image_field), &bytes)?;
                app.work
                    .save_input(&bytes)
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            }
            (None, Some(init)) => init.to_path_buf(),
            (None, None) => {
                return Err(ApiError::field(
                    f.name("image"),
                    "a ControlNet unit needs a picture (txt2img has no init image)",
                ))
            }
        };
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
        if app.catalog.nets[net].control_types.is_some() {
            control.control_type = Some(union_control_type(&f, kind)?.to_string());
        }
        control.conditioning_scale = f.f64("weight")?.unwrap_or(1.0);
        control.control_start = f.f64("guidance_start")?.unwrap_or(0.0);
        control.control_end = f.f64("guidance_end")?.unwrap_or(1.0);
        if let Some(v) = f.get("control_mode") {
            control.control_mode = control_mode(&f.name("control_mode"), v)?;
        }
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
        save_maps.push(f.bool("save_detected_map")?.unwrap_or(true));
    }
    r.resize = resize.unwrap_or(ResizeMode::JustResize);
    let annotations = annotations.iter().any(Option::is_some).then_some(annotations);
    Ok(Units { controls, nets, annotations, save_maps })
}

/// The extension's names of the union control types (`ControlNetUnionControlType`), in xinsir's numbering.
const UNION_CONTROL_TYPES: [&str; 8] =
    ["OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint"];

/// A union net's condition type (our name): the unit's `union_control_type`, or when that is absent or
/// "Unknown", the type of the unit's preprocessor's maps. Plain nets ignore the field, as the extension does.
fn union_control_type(f: &Fields, module: Option<&str>) -> Result<&'static str, ApiError> {
    let given = f.str("union_control_type")?.map(str::trim).filter(|t| !t.eq_ignore_ascii_case("unknown"));
    let index = match given {
        Some(t) => UNION_CONTROL_TYPES.iter().position(|n| n.eq_ignore_ascii_case(t)).ok_or_else(|| {
            ApiError::field(
                f.name("union_control_type"),
                format!("{t:?} is not a union control type: one of {}, or Unknown", UNION_CONTROL_TYPES.join(", ")),
            )
        })?,
        None => module.and_then(control_type_for_annotator).ok_or_else(|| {
            ApiError::field(
                f.name("union_control_type"),
                format!(
                    "the model is a union ControlNet: name the condition's type ({}){}",
                    UNION_CONTROL_TYPES.join(", "),
                    if module.is_some() { ", this preprocessor's maps have none" } else { "" }
                ),
            )
        })?,
    };
    Ok(CONTROL_TYPES[index].0)
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

pub async fn txt2img(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    answer(app, body, Kind::Txt2Img).await
}

pub async fn img2img(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    answer(app, body, Kind::Img2Img).await
}

async fn answer(app: Arc<App>, body: Result<Bytes, BytesRejection>, kind: Kind) -> Result<Json<Value>, ApiError> {
    let body = read_json(body)?;
    let parsed = {
        let (app, body) = (app.clone(), body.clone());
        tokio::task::spawn_blocking(move || parse_request(&app, &body, kind))
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
    let mut images: Vec<Value> = output.images.iter().map(|i| Value::String(encode_base64(&i.png))).collect();
    // The extension's detected maps: each unit's condition at the output size, after the images (once per
    // request, as the extension annotates once).
    for (map, append) in output.maps.iter().zip(&parsed.append_maps) {
        if let (Some(png), true) = (map, append) {
            images.push(Value::String(encode_base64(png)));
        }
    }
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
        "sampler_name": parsed.sampler.map(|s| s.a1111_name()),
        "cfg_scale": first.map(|r| r.guidance),
        "steps": first.map(|r| r.steps),
        "batch_size": first.map(|r| r.num_images),
        "restore_faces": false,
        "sd_model_name": app.catalog.model_name,
        "sd_model_hash": &app.catalog.model_sha256[..10.min(app.catalog.model_sha256.len())],
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.and_then(|r| r.strength.or(r.hires.as_ref().map(|h| h.strength))).unwrap_or(0.0),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": metas.iter().map(|m| m.a1111_parameters()).collect::<Vec<_>>(),
        "styles": [],
        "clip_skip": first.map(|r| r.clip_skip),
        "version": format!("controlnet-rs {}", env!("CARGO_PKG_VERSION")),
    });
    Ok(Json(json!({ "images": images, "parameters": body, "info": info.to_string() })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_a1111_field() {
        let n = namer(&[2]);
        assert_eq!(n("guidance"), "cfg_scale");
        assert_eq!(n("num_images"), "batch_size");
        assert_eq!(n("controls[0].control_end"), "alwayson_scripts.controlnet.args[2].guidance_end");
    }
}
