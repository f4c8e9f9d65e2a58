//! A1111's settings routes: `/sdapi/v1/options` (GET and POST of the few settings this server honours, the
//! same keys a request's `override_settings` takes for one call), `/sdapi/v1/scripts` and `/sdapi/v1/script-info`
//! (ControlNet, the one always-on script here).
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::model_title;
use crate::pipeline::request::DEFAULT_CLIP_SKIP;
use crate::serve::error::ApiError;
use crate::serve::{read_json, App, Catalog};

/// The largest clip skip A1111's settings slider offers.
pub const MAX_CLIP_SKIP: usize = 12;
/// The always-on script's name as A1111 lists it (a script's title, lower-cased).
const CONTROLNET_SCRIPT: &str = "controlnet";

/// The A1111 settings this server honours; `POST /sdapi/v1/options` changes them for every later request,
/// `override_settings` for one.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `CLIP_stop_at_last_layers`: clip skip (1: the text encoder's usual layer).
    pub clip_skip: usize,
    /// `control_net_no_detectmap`: the ControlNet maps are not appended to the answer's `images`.
    pub no_detectmap: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { clip_skip: DEFAULT_CLIP_SKIP, no_detectmap: false }
    }
}

impl Settings {
    /// Sets `key` to `value` (the field named `field` in errors); another key, or a model other than the loaded
    /// one, is refused.
    pub fn set(&mut self, catalog: &Catalog, field: &str, key: &str, value: &Value) -> Result<(), ApiError> {
        match key {
            "sd_model_checkpoint" => {
                let c = catalog;
                let loaded =
                    value.as_str().is_some_and(|m| m == c.model_name || m == model_title(c) || m == c.model_spec);
                if !loaded {
                    return Err(ApiError::field(
                        field,
                        format!("{value} is not loaded (this server runs {})", model_title(c)),
                    ));
                }
            }
            "CLIP_stop_at_last_layers" => {
                let skip = value.as_u64().filter(|v| (1..=MAX_CLIP_SKIP as u64).contains(v)).ok_or_else(|| {
                    ApiError::field(field, format!("{value}: expected a whole number from 1 to {MAX_CLIP_SKIP}"))
                })?;
                self.clip_skip = skip as usize;
            }
            // A1111's "SD VAE": only its "use the model's own" values (another VAE needs the model reloaded).
            "sd_vae" => {
                if !matches!(value.as_str(), Some("Automatic" | "None")) {
                    return Err(ApiError::field(
                        field,
                        format!("{value}: only \"Automatic\" or \"None\" (the model's own VAE) on this server"),
                    ));
                }
            }
            "control_net_no_detectmap" => {
                self.no_detectmap = value
                    .as_bool()
                    .ok_or_else(|| ApiError::field(field, format!("{value}: expected true or false")))?;
            }
            _ => {
                return Err(ApiError::field(
                    field,
                    "not a setting this server honours (sd_model_checkpoint, CLIP_stop_at_last_layers, sd_vae, \
                     control_net_no_detectmap)",
                ))
            }
        }
        Ok(())
    }

    /// These settings with `overrides` (a request's `override_settings`) applied.
    pub fn with_overrides(&self, catalog: &Catalog, overrides: &Value) -> Result<Self, ApiError> {
        let obj =
            overrides.as_object().ok_or_else(|| ApiError::malformed("override_settings", "expected an object"))?;
        let mut s = self.clone();
        for (key, value) in obj {
            s.set(catalog, &format!("override_settings.{key}"), key, value)?;
        }
        Ok(s)
    }
}

pub async fn get_options(State(app): State<Arc<App>>) -> Json<Value> {
    let s = app.settings.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(json!({
        "sd_model_checkpoint": model_title(&app.catalog),
        "CLIP_stop_at_last_layers": s.clip_skip,
        "control_net_no_detectmap": s.no_detectmap,
        "samples_format": "png",
    }))
}

/// Sets every key or none: a refused key leaves the settings as they were.
pub async fn set_options(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = read_json(body)?;
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let mut settings = app.settings.lock().unwrap_or_else(|e| e.into_inner());
    let mut changed = settings.clone();
    for (key, value) in obj {
        changed.set(&app.catalog, key, key, value)?;
    }
    *settings = changed;
    Ok(Json(Value::Null))
}

pub async fn scripts() -> Json<Value> {
    Json(json!({ "txt2img": [CONTROLNET_SCRIPT], "img2img": [CONTROLNET_SCRIPT] }))
}

pub async fn script_info() -> Json<Value> {
    let info =
        |img2img: bool| json!({ "name": CONTROLNET_SCRIPT, "is_alwayson": true, "is_img2img": img2img, "args": [] });
    Json(json!([info(false), info(true)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_known_keys_only() {
        let app = Catalog {
            model_name: "tiny".into(),
            model_spec: "/m/tiny".into(),
            model_sha256: "0123456789abcdef".into(),
            nets: Vec::new(),
            vae_factor: 8,
            default_size: 512,
            lora_dir: None,
        };
        let mut s = Settings::default();
        s.set(&app, "CLIP_stop_at_last_layers", "CLIP_stop_at_last_layers", &json!(2)).unwrap();
        assert_eq!(s.clip_skip, 2);
        let e = s.set(&app, "c", "CLIP_stop_at_last_layers", &json!(0)).unwrap_err().detail();
        assert!(e.starts_with("c: 0: expected a whole number from 1 to 12"), "{e}");
        let o = s.with_overrides(&app, &json!({ "control_net_no_detectmap": true })).unwrap();
        assert!(o.no_detectmap && o.clip_skip == 2);
        let e = s.with_overrides(&app, &json!({ "eta_noise_seed_delta": 31337 })).unwrap_err().detail();
        assert!(e.starts_with("override_settings.eta_noise_seed_delta: not a setting"), "{e}");
        let e = s.with_overrides(&app, &json!({ "sd_model_checkpoint": "other" })).unwrap_err().detail();
        assert!(e.starts_with("override_settings.sd_model_checkpoint: \"other\" is not loaded"), "{e}");
        // the model's own VAE only
        assert!(s.with_overrides(&app, &json!({ "sd_vae": "Automatic" })).is_ok());
        let e = s.with_overrides(&app, &json!({ "sd_vae": "vae-ft-mse.safetensors" })).unwrap_err().detail();
        assert!(e.starts_with("override_settings.sd_vae: \"vae-ft-mse.safetensors\": only"), "{e}");
    }
}
