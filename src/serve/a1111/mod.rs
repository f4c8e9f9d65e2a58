//! The AUTOMATIC1111 API subset, with the ControlNet extension's routes and units, so that A1111 clients
//! (`webuiapi`, scripts) use this engine unchanged.
//!
//! A field is either used (mapped to a [`GenerateRequest`] field), known not to change the picture (saving
//! options, hires-fix settings while hires fix is off), or refused with 422 naming it: a field that would
//! change the picture is never silently ignored, nor is a field this server does not know.
//!
//! - [`txt2img`]: the request's fields and the ControlNet units → a job, and the answer (txt2img and img2img);
//! - [`img2img`]: img2img's init picture and mask, and txt2img's hires-fix fields;
//! - [`detect`]: the control maps of `/controlnet/detect`;
//! - [`fields`]: typed reads of JSON fields that name the field in errors;
//! - here: the routes, the name tables (samplers, modules, resize modes) and the small read-only routes.
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::App;
use crate::annotate::{self, DetectorOptions, Input, ResizeMode};
use crate::pipeline::ControlMode;
use crate::schedulers::{Sampler, SigmaSpacing, A1111_SAMPLERS};

mod detect;
mod fields;
mod img2img;
mod options;
mod txt2img;

pub use options::Settings;

/// The ControlNet extension's API version (`/controlnet/version`).
pub const CONTROLNET_API_VERSION: u32 = 2;
/// A1111's default annotator resolution (`processor_res` -1).
pub const DEFAULT_PROCESSOR_RES: u32 = 512;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img::txt2img))
        .route("/sdapi/v1/img2img", post(txt2img::img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/options", get(options::get_options).post(options::set_options))
        .route("/sdapi/v1/scripts", get(options::scripts))
        .route("/sdapi/v1/script-info", get(options::script_info))
        .route("/controlnet/version", get(|| async { Json(json!({ "version": CONTROLNET_API_VERSION })) }))
        .route("/controlnet/model_list", get(model_list))
        .route("/controlnet/module_list", get(module_list))
        .route("/controlnet/detect", post(detect::detect))
}

/// A1111's sampler name (or ours, or an old `k_…` alias), with " Karras" / " Exponential" where diffusers'
/// class takes them: the library's [`Sampler`] names.
fn sampler(name: &str) -> Option<Sampler> {
    name.parse().ok()
}

/// Every sampler this server runs, as A1111 lists them (`/sdapi/v1/samplers`): (name, aliases).
fn sampler_names() -> Vec<(String, Vec<&'static str>)> {
    let mut names = Vec::new();
    for (name, kind, aliases) in A1111_SAMPLERS {
        names.push((name.to_string(), aliases.to_vec()));
        for spacing in SigmaSpacing::ALL {
            if let Ok(s) = Sampler::new(*kind, Some(spacing)) {
                names.push((s.a1111_name(), Vec::new()));
            }
        }
    }
    names
}

/// The extension's `control_mode`: its index (0, 1, 2) or label ("My prompt is more important"), or ours.
fn control_mode(field: &str, v: &Value) -> Result<ControlMode, ApiError> {
    if let Some(i) = v.as_u64() {
        return ControlMode::from_a1111_index(i)
            .ok_or_else(|| ApiError::field(field, format!("{i}: expected 0, 1 or 2")));
    }
    let name = v.as_str().ok_or_else(|| ApiError::field(field, "expected a control mode name or 0, 1, 2"))?;
    name.parse().map_err(|e: crate::Error| ApiError::field(field, e.to_string()))
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
    ("openpose_hand", "openpose-hand"),
    ("openpose_face", "openpose-face"),
    ("openpose_full", "openpose-full"),
    ("dw_openpose_full", "dwpose"),
    ("softedge_hed", "hed"),
    ("softedge_pidinet", "pidinet"),
    ("lineart_realistic", "lineart"),
    ("lineart_anime", "lineart-anime"),
    ("depth_anything_v2", "depth-anything"),
    ("depth_midas", "depth-midas"),
    ("depth", "depth-midas"),
    ("normal_midas", "normal-midas"),
    ("normal_bae", "normal-bae"),
    // UperNet on ADE20K (the extension's OneFormer modules, seg_ofade20k/seg_ofcoco, are other models)
    ("seg_ufade20k", "seg"),
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
        // the extension's slider starts at 0.4 (controlnet_aux's call, our CLI's default, at 0.1)
        "normal-midas" => o.bg_threshold = a.or(Some(crate::annotate::normal::DEFAULT_BG_THRESHOLD)),
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

/// The model as A1111 titles it: `name [first 10 hex digits of its hash]`.
fn model_title(c: &super::Catalog) -> String {
    format!("{} [{}]", c.model_name, &c.model_sha256[..10.min(c.model_sha256.len())])
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
        sampler_names()
            .into_iter()
            .map(|(name, aliases)| json!({ "name": name, "aliases": aliases, "options": {} }))
            .collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_modules_and_resize_modes_map_to_ours() {
        use crate::schedulers::SchedulerKind;
        assert_eq!(sampler("Euler a"), Some(SchedulerKind::EulerAncestral.into()));
        assert_eq!(sampler("k_euler_a"), Some(SchedulerKind::EulerAncestral.into()));
        assert_eq!(sampler("PLMS"), Some(SchedulerKind::Pndm.into()));
        let karras = Sampler::new(SchedulerKind::DpmSolverMultistep, Some(SigmaSpacing::Karras)).ok();
        assert_eq!(sampler("DPM++ 2M Karras"), karras);
        assert_eq!(sampler("LMS"), Some(SchedulerKind::Lms.into()));
        assert_eq!(
            sampler("DPM2 a Karras"),
            Sampler::new(SchedulerKind::KDpm2Ancestral, Some(SigmaSpacing::Karras)).ok()
        );
        assert_eq!(sampler("DPM++ SDE"), Some(SchedulerKind::DpmSolverSde.into()));
        assert_eq!(
            sampler("DPM++ SDE Karras"),
            Sampler::new(SchedulerKind::DpmSolverSde, Some(SigmaSpacing::Karras)).ok()
        );
        assert_eq!(sampler("DPM fast"), None);
        let listed: Vec<String> = sampler_names().into_iter().map(|(n, _)| n).collect();
        assert!(listed.iter().any(|n| n == "DPM++ SDE Karras"), "{listed:?}");
        for name in &listed {
            assert!(sampler(name).is_some(), "{name} is listed but not accepted");
        }
        assert!(listed.iter().any(|n| n == "DPM++ 2M Karras") && listed.iter().any(|n| n == "UniPC Exponential"));
        assert!(!listed.iter().any(|n| n == "DDIM Karras"), "DDIM has no Karras sigmas in diffusers");
        assert_eq!(control_mode("c", &json!(2)).unwrap(), ControlMode::ControlNet);
        assert_eq!(control_mode("c", &json!("My prompt is more important")).unwrap(), ControlMode::Prompt);
        assert_eq!(control_mode("c", &json!("Balanced")).unwrap(), ControlMode::Balanced);
        assert!(control_mode("c", &json!(3)).unwrap_err().detail().starts_with("c: 3"));
        assert_eq!(module_kind("m", "Canny").unwrap(), Some("canny"));
        assert_eq!(module_kind("m", "scribble_xdog").unwrap(), Some("scribble"));
        assert_eq!(module_kind("m", "none").unwrap(), None);
        assert_eq!(module_kind("m", "openpose_full").unwrap(), Some("openpose-full"));
        assert_eq!(module_kind("m", "dw_openpose_full").unwrap(), Some("dwpose"));
        assert_eq!(module_kind("m", "softedge_hed").unwrap(), Some("hed"));
        assert_eq!(module_kind("m", "depth_anything_v2").unwrap(), Some("depth-anything"));
        assert_eq!(module_kind("m", "depth_midas").unwrap(), Some("depth-midas"));
        assert_eq!(module_kind("m", "depth").unwrap(), Some("depth-midas"));
        assert_eq!(module_kind("m", "normal_midas").unwrap(), Some("normal-midas"));
        assert_eq!(module_kind("m", "normal_bae").unwrap(), Some("normal-bae"));
        assert_eq!(module_kind("m", "seg_ufade20k").unwrap(), Some("seg"));
        assert!(module_kind("m", "seg_ofade20k").is_err(), "OneFormer is not UperNet");
        assert!(module_kind("m", "reference_only").unwrap_err().detail().starts_with("m: \"reference_only\""));
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
        assert_eq!(slider_options("normal-midas", Some(0.2), None).bg_threshold, Some(0.2));
        assert_eq!(slider_options("normal-midas", Some(-1.0), None).bg_threshold, Some(0.4));
    }
}
