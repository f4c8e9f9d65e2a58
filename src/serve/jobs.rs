//! The job API: the pipeline's request as JSON (pictures as base64 or as multipart uploads) → a job id; its
//! status, its progress as server-sent events, its images with their recipe, cancel. Described by
//! `/openapi.json` (assets/web/openapi.json).
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::files::{decode_base64, decode_image, encode_base64};
use super::queue::{Job, JobSpec, Namer, Run, Snapshot};
use super::App;
use crate::pipeline::extra_networks::resolve_lora_tags;
use crate::pipeline::request::{parse_resize, PromptSyntax, DEFAULT_GUIDANCE, DEFAULT_STEPS};
use crate::pipeline::{ControlMode, ControlRequest, GenerateRequest};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../../assets/web/openapi.json");

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/jobs", post(submit))
        .route("/jobs/{id}", get(status).delete(cancel))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/events", get(events))
        .route("/jobs/{id}/result", get(result))
        .route("/jobs/{id}/images/{n}", get(image))
        .route("/info", get(info))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
}

/// A job as clients send it: [`GenerateRequest`]'s fields, the model fixed by the server, ControlNets by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    #[serde(default)]
    controls: Vec<JobControl>,
    width: Option<usize>,
    height: Option<usize>,
    #[serde(default = "default_steps")]
    steps: usize,
    #[serde(default = "default_guidance")]
    guidance: f64,
    scheduler: Option<String>,
    seed: Option<u64>,
    #[serde(default = "one")]
    num_images: usize,
    #[serde(default)]
    guess_mode: bool,
    #[serde(default)]
    vae_tiling: bool,
    resize: Option<String>,
    // Prompt features: the syntax (`plain` or `a1111`) and clip skip; `<lora:name:w>` tags use `--lora-dir`.
    #[serde(default)]
    prompt_syntax: PromptSyntax,
    #[serde(default = "one")]
    clip_skip: usize,
    // img2img and inpainting (issue 19, the page's img2img form): the pipeline's own fields, pictures as above.
    /// The picture to start from (base64, a data URL or `@PART`); absent: txt2img.
    init_image: Option<String>,
    /// Inpainting: white is repainted; the init picture's size.
    mask: Option<String>,
    #[serde(default)]
    mask_blur: u32,
    /// In (0, 1]; absent: the pipeline's default (0.8 img2img, 1 inpainting).
    strength: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobControl {
    /// A loaded ControlNet's name (`GET /info`); default: the only one loaded.
    controlnet: Option<String>,
    /// The picture: base64 (or a data URL), or `@PART` naming a multipart upload.
    image: String,
    preprocess: Option<String>,
    #[serde(default = "one_f64")]
    conditioning_scale: f64,
    #[serde(default)]
    control_start: f64,
    #[serde(default = "one_f64")]
    control_end: f64,
    /// A1111's control mode: `balanced` (default), `prompt` or `controlnet` (or the extension's labels).
    #[serde(default)]
    control_mode: ControlMode,
}

fn default_steps() -> usize {
    DEFAULT_STEPS
}
fn default_guidance() -> f64 {
    DEFAULT_GUIDANCE
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}

/// This API's field names are the library's, except the picture (`controls[i].image`).
fn namer() -> Namer {
    Arc::new(|s: &str| match s.strip_suffix("].control") {
        Some(head) => format!("{head}].image"),
        None => s.to_string(),
    })
}

/// The body: JSON, or multipart with a `request` JSON part and picture parts the request names as `@PART`.
async fn read_body(app: &Arc<App>, request: Request) -> Result<(Value, Vec<(String, Bytes)>), ApiError> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        let body = Bytes::from_request(request, app).await;
        return Ok((super::read_json(body)?, Vec::new()));
    }
    let mut multipart =
        Multipart::from_request(request, app).await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut json = None;
    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(|e| ApiError::new(e.status(), e.body_text()))? {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if name == "request" {
            json = Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| ApiError::bad_request(format!("the request part is not JSON: {e}")))?,
            );
        } else {
            parts.push((name, bytes));
        }
    }
    let json = json.ok_or_else(|| ApiError::bad_request("a multipart job needs a `request` part (JSON)"))?;
    Ok((json, parts))
}

fn parse_job(app: &App, body: Value, parts: &[(String, Bytes)]) -> Result<JobSpec, ApiError> {
    let req: JobRequest = serde_json::from_value(body).map_err(|e| {
        let msg = e.to_string();
        let field = msg.split('`').nth(1).unwrap_or("body").to_string();
        ApiError::field(field, msg)
    })?;
    let name_of = namer();
    let lib = |e: crate::Error| ApiError::from_library(e, &*name_of);
    let scheduler = req
        .scheduler
        .as_deref()
        .map(|s| s.parse().map_err(|e: crate::Error| ApiError::field("scheduler", e.to_string())))
        .transpose()?;
    let resize = req.resize.as_deref().map(parse_resize).transpose().map_err(lib)?.unwrap_or_default();
    let mut controls = Vec::new();
    let mut nets = Vec::new();
    for (i, c) in req.controls.iter().enumerate() {
        let field = |f: &str| format!("controls[{i}].{f}");
        let net = match &c.controlnet {
            Some(name) => app.catalog.find_net(name).ok_or_else(|| {
                ApiError::field(
                    field("controlnet"),
                    format!("{name:?} is not loaded; this server has {}", app.catalog.net_names()),
                )
            })?,
            None if app.catalog.nets.len() == 1 => 0,
            None => {
                return Err(ApiError::field(
                    field("controlnet"),
                    format!("name one of the loaded ControlNets: {}", app.catalog.net_names()),
                ))
            }
        };
        let (file, _) = picture(app, &field("image"), &c.image, parts)?;
        let mut control = ControlRequest::new(Some(app.catalog.nets[net].spec.clone()), file);
        control.preprocess = c.preprocess.clone();
        control.conditioning_scale = c.conditioning_scale;
        control.control_start = c.control_start;
        control.control_end = c.control_end;
        control.control_mode = c.control_mode;
        if let Some(kind) = &c.preprocess {
            let k = crate::annotate::kind(kind).map_err(|e| ApiError::field(field("preprocess"), e.to_string()))?;
            if k.input != crate::annotate::Input::Image {
                return Err(ApiError::field(field("preprocess"), format!("{kind} is not made from a picture")));
            }
        }
        controls.push(control);
        nets.push(net);
    }
    // The init picture and its mask: saved like the conditions; a mask is checked against the picture here so a
    // wrong one is refused before the job is queued.
    let init = req.init_image.as_deref().map(|text| picture(app, "init_image", text, parts)).transpose()?;
    let mask = match (&req.mask, &init) {
        (Some(text), Some((_, init))) => {
            let (file, mask) = picture(app, "mask", text, parts)?;
            crate::pipeline::inpaint::check_mask(&mask, init.dimensions()).map_err(lib)?;
            Some(file)
        }
        (Some(_), None) => {
            return Err(ApiError::field("mask", "inpainting needs the picture to paint in: set init_image"))
        }
        (None, _) => None,
    };
    let request = GenerateRequest {
        model: Some(app.catalog.model_spec.clone()),
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        controls,
        width: req.width,
        height: req.height,
        steps: req.steps,
        guidance: req.guidance,
        scheduler,
        seed: req.seed,
        num_images: req.num_images,
        guess_mode: req.guess_mode,
        vae_tiling: req.vae_tiling,
        resize,
        prompt_syntax: req.prompt_syntax,
        clip_skip: req.clip_skip,
        lora_dir: app.catalog.lora_dir.clone(),
        init_image: init.map(|(file, _)| file),
        mask,
        mask_blur: req.mask_blur,
        strength: req.strength,
        ..Default::default()
    };
    request.validate().map_err(lib)?;
    resolve_lora_tags(&request).map_err(lib)?;
    Ok(JobSpec { runs: vec![Run { request, nets, annotations: None }], name_of })
}

/// A picture the request names in `field`: base64 (or a data URL), or `@PART` naming a multipart upload. Checked,
/// saved as an input (its bytes unchanged); returns the saved file and the decoded picture.
fn picture(
    app: &App,
    field: &str,
    text: &str,
    parts: &[(String, Bytes)],
) -> Result<(std::path::PathBuf, image::RgbImage), ApiError> {
    let bytes = match text.strip_prefix('@') {
        Some(part) => parts
            .iter()
            .find(|(n, _)| n == part)
            .map(|(_, b)| b.to_vec())
            .ok_or_else(|| ApiError::field(field, format!("no upload named {part:?}")))?,
        None => decode_base64(field, text)?,
    };
    let image = decode_image(field, &bytes)?;
    let file = app.work.save_input(&bytes).map_err(|e| ApiError::from_library(e, &*namer()))?;
    Ok((file, image))
}

async fn submit(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    let (body, parts) = read_body(&app, request).await?;
    let spec = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || parse_job(&app, body, &parts))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    let job = app.queue.submit(spec)?;
    let id = &job.id;
    let body = json!({
        "id": id,
        "status": format!("/jobs/{id}"),
        "events": format!("/jobs/{id}/events"),
        "result": format!("/jobs/{id}/result"),
    });
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/jobs/{id}"))], Json(body)).into_response())
}

fn find(app: &App, id: &str) -> Result<Arc<Job>, ApiError> {
    app.queue.get(id).ok_or_else(|| ApiError::not_found(format!("no job {id} (finished jobs are kept for a while)")))
}

async fn status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(find(&app, &id)?.snapshot()))
}

async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Snapshot>, ApiError> {
    let job = find(&app, &id)?;
    job.request_cancel();
    Ok(Json(job.snapshot()))
}

/// Server-sent events: a `status` event with the job's [`Snapshot`] at each change, until it has finished.
async fn events(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let rx = find(&app, &id)?.watch();
    let stream = futures_util::stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        let snap = rx.borrow_and_update().clone();
        let finished = snap.state.is_finished();
        let event = Event::default().event("status").json_data(&snap).unwrap_or_default();
        if !finished && rx.changed().await.is_err() {
            return Some((Ok::<_, Infallible>(event), (rx, true)));
        }
        Some((Ok(event), (rx, finished)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The images of a finished job (PNG base64, with the recipe each carries); 409 while it runs, the job's
/// error when it failed.
async fn result(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = find(&app, &id)?;
    let output = match job.outcome() {
        None => return Err(ApiError::new(StatusCode::CONFLICT, format!("job {id} has not finished"))),
        Some(outcome) => outcome?,
    };
    let images: Vec<Value> = output
        .images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            json!({
                "url": format!("/jobs/{id}/images/{}", i + 1),
                "png": encode_base64(&img.png),
                "seed": img.metadata.seed,
                "metadata": img.metadata,
            })
        })
        .collect();
    Ok(Json(json!({ "id": id, "images": images })))
}

/// One image of a finished job as a PNG file (1-based).
async fn image(State(app): State<Arc<App>>, Path((id, n)): Path<(String, String)>) -> Result<Response, ApiError> {
    let job = find(&app, &id)?;
    let output = match job.outcome() {
        None => return Err(ApiError::new(StatusCode::CONFLICT, format!("job {id} has not finished"))),
        Some(outcome) => outcome?,
    };
    let n: usize = n.trim_end_matches(".png").parse().map_err(|_| ApiError::not_found("no such image"))?;
    let img =
        n.checked_sub(1).and_then(|i| output.images.get(i)).ok_or_else(|| ApiError::not_found("no such image"))?;
    let disposition = format!("inline; filename=\"controlnet-{id}-{n}.png\"");
    Ok((
        [(header::CONTENT_TYPE, "image/png".to_string()), (header::CONTENT_DISPOSITION, disposition)],
        Body::from(img.png.clone()),
    )
        .into_response())
}

/// What the server has loaded and offers: the page builds its choices from this.
async fn info(State(app): State<Arc<App>>) -> Json<Value> {
    let c = &app.catalog;
    let annotators: Vec<Value> = crate::annotate::KINDS
        .iter()
        .filter(|k| k.input == crate::annotate::Input::Image)
        .map(|k| json!({ "name": k.name, "summary": k.summary }))
        .collect();
    let schedulers: Vec<&str> = crate::schedulers::SchedulerKind::ALL.iter().map(|k| k.cli_name()).collect();
    Json(json!({
        "model": { "name": c.model_name, "sha256": c.model_sha256 },
        "controlnets": c.nets,
        "annotators": annotators,
        "schedulers": schedulers,
        "default_size": c.default_size,
        "size_multiple": c.vae_factor,
        "queue": { "waiting": app.queue.waiting(), "running": app.queue.current().is_some() },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_job_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/jobs",
            "/jobs/{id}",
            "/jobs/{id}/cancel",
            "/jobs/{id}/events",
            "/jobs/{id}/result",
            "/jobs/{id}/images/{n}",
            "/info",
        ] {
            assert!(paths.contains_key(p), "{p} missing from openapi.json");
        }
    }

    #[test]
    fn the_picture_is_named_image() {
        assert_eq!(namer()("controls[1].control"), "controls[1].image");
        assert_eq!(namer()("controls[1].control_end"), "controls[1].control_end");
        assert_eq!(namer()("steps"), "steps");
    }
}
