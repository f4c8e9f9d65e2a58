//! `POST /controlnet/detect`: control maps made as `controlnet annotate` makes them.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::fields::{is_empty, Fields};
use super::{module_kind, slider_options};
use crate::annotate::{self, AnnotateSettings};
use crate::serve::error::ApiError;
use crate::serve::files::{decode_base64, decode_image, encode_base64, png_bytes, WorkDir};
use crate::serve::{read_json, App};

/// `/controlnet/detect`: the control map of each picture, as `controlnet annotate KIND PICTURE --resolution
/// processor_res [thresholds]` makes it (at the picture's size).
pub async fn detect(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = read_json(body)?;
    let _turn =
        app.detect_gate.acquire().await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let work = app.work.clone();
    let maps = tokio::task::spawn_blocking(move || detect_maps(&work, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!({ "images": maps, "info": "Success" })))
}

fn detect_maps(work: &WorkDir, body: &Value) -> Result<Vec<String>, ApiError> {
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
