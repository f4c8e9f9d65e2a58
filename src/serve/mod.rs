//! `controlnet serve`: an HTTP server over the pipeline, for clients of AUTOMATIC1111's API, for our own job API
//! and for a web page (docs/serve.md).
//!
//! - [`a1111`]: `/sdapi/v1/txt2img` with the ControlNet extension's units, `/controlnet/*`, progress, interrupt;
//! - [`jobs`]: the job API (submit, status, server-sent progress, result, cancel) and `/openapi.json`;
//! - [`page`]: the page at `/`, bundled in the binary;
//! - [`queue`] and [`worker`]: one worker thread runs the jobs in order on models loaded once ([`models`]),
//!   while the HTTP side (tokio + axum) stays responsive;
//! - [`files`]: pictures in and out; [`error`]: the HTTP errors.
//!
//! Loopback only unless an API key is set; SIGTERM or Ctrl-C stops taking work, cancels what is queued or
//! running and exits once the open requests are answered.
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use candle_core::Device;

use crate::{Error, Result};

pub mod a1111;
pub mod error;
pub mod files;
pub mod jobs;
pub mod models;
pub mod page;
pub mod queue;
pub mod worker;

pub use error::ApiError;
pub use models::{Catalog, ModelSpecs};

/// Default port: A1111's, so its clients find the server without settings.
pub const DEFAULT_PORT: u16 = 7860;
/// Jobs that may wait behind the running one.
pub const DEFAULT_MAX_QUEUE: usize = 16;
/// Request body limit, in MiB.
pub const DEFAULT_MAX_BODY_MB: usize = 32;
/// How long open requests may take to finish once a stop was asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub models: ModelSpecs,
    /// Required (as `Authorization: Bearer KEY`, HTTP basic auth with KEY as the password, or `X-API-Key`) on
    /// every API route when set; binding to a non-loopback address needs one.
    pub api_key: Option<String>,
    pub max_queue: usize,
    pub max_body_mb: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: DEFAULT_PORT,
            models: ModelSpecs::default(),
            api_key: None,
            max_queue: DEFAULT_MAX_QUEUE,
            max_body_mb: DEFAULT_MAX_BODY_MB,
        }
    }
}

/// What every handler shares.
pub struct App {
    pub queue: Arc<queue::Queue>,
    pub catalog: Catalog,
    pub work: Arc<files::WorkDir>,
    pub api_key: Option<String>,
    /// Annotating for `/controlnet/detect` runs one at a time beside the worker.
    pub detect_gate: tokio::sync::Semaphore,
    /// A1111's settings this server honours (`/sdapi/v1/options`).
    pub settings: std::sync::Mutex<a1111::Settings>,
}

impl App {
    /// A copy of the A1111 settings in force.
    pub fn settings(&self) -> a1111::Settings {
        self.settings.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The address to bind, refused when it is not loopback and no API key is set.
pub fn bind_address(options: &ServeOptions) -> Result<SocketAddr> {
    let addr = (options.host.as_str(), options.port)
        .to_socket_addrs()
        .map_err(|e| Error::setting("host", format!("{}: {e}", options.host)))?
        .next()
        .ok_or_else(|| Error::setting("host", format!("{}: no address", options.host)))?;
    if !is_loopback(addr.ip()) && options.api_key.is_none() {
        return Err(Error::setting(
            "api_key",
            format!(
                "serving on {} (not loopback) lets anyone on the network use this machine: set an API key, or \
                 bind to 127.0.0.1",
                options.host
            ),
        ));
    }
    if options.max_queue == 0 {
        return Err(Error::setting("max_queue", "must be at least 1"));
    }
    if options.max_body_mb == 0 {
        return Err(Error::setting("max_body_mb", "must be at least 1"));
    }
    Ok(addr)
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Loads the models, binds, calls `on_ready` with the address served, and serves until SIGTERM or Ctrl-C.
pub fn run(options: &ServeOptions, device: Device, on_ready: impl FnOnce(SocketAddr, &Catalog)) -> Result<()> {
    let addr = bind_address(options)?;
    let work = Arc::new(files::WorkDir::create()?);
    let (queue, rx) = queue::Queue::new(options.max_queue);
    let (catalog, worker) = worker::start(options.models.clone(), device, queue.clone(), rx, work.clone())?;
    let app = Arc::new(App {
        queue: queue.clone(),
        catalog,
        work,
        api_key: options.api_key.clone(),
        detect_gate: tokio::sync::Semaphore::new(1),
        settings: Default::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the HTTP runtime: {e}")))?;
    let max_body = options.max_body_mb * 1024 * 1024;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(addr.to_string(), e))?;
        let local = listener.local_addr().map_err(|e| Error::io(addr.to_string(), e))?;
        on_ready(local, &app.catalog);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopping = {
            let queue = app.queue.clone();
            async move {
                stop_signal().await;
                eprintln!("stopping: no new jobs; cancelling the running and queued ones");
                queue.shut_down();
                let _ = stop_tx.send(true);
            }
        };
        let server = axum::serve(listener, router(app, max_body)).with_graceful_shutdown(stopping);
        let mut grace = stop_rx;
        tokio::select! {
            r = server => r.map_err(|e| Error::io(local.to_string(), e)),
            _ = async { let _ = grace.wait_for(|s| *s).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                eprintln!("stopping: open requests did not finish within {}s", SHUTDOWN_GRACE.as_secs());
                Ok(())
            }
        }
    });
    queue.shut_down();
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = worker.join();
    served
}

/// Every route; the API routes behind the key check when a key is set.
pub fn router(app: Arc<App>, max_body: usize) -> Router {
    let api = Router::new()
        .merge(a1111::routes())
        .merge(jobs::routes())
        .layer(axum::middleware::from_fn_with_state(app.clone(), check_key));
    Router::new()
        .merge(page::routes())
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// Refuses a request without the API key (when one is set) with 401.
async fn check_key(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let given = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let bearer = given(header::AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer ")).map(str::to_string);
    let basic = given(header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(_, password)| password.to_string()));
    let header_key = given("x-api-key").map(str::to_string);
    // EventSource cannot send headers: the page passes the key in the query.
    let query_key =
        request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("key="))).map(percent_decode);
    if [bearer, basic, header_key, query_key].iter().flatten().any(|k| k == key) {
        return next.run(request).await;
    }
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "this server needs its API key").into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"controlnet\""));
    response
}

/// `%XX` escapes and `+` of a query value decoded.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON body, with the body limit's 413 and a 400 for text that is not JSON.
pub fn read_json(body: std::result::Result<Bytes, BytesRejection>) -> std::result::Result<serde_json::Value, ApiError> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_address_needs_a_key() {
        let public = ServeOptions { host: "0.0.0.0".into(), port: 0, ..Default::default() };
        let e = bind_address(&public).unwrap_err().to_string();
        assert!(e.starts_with("api_key: serving on 0.0.0.0"), "{e}");
        assert!(bind_address(&ServeOptions { api_key: Some("k".into()), ..public }).is_ok());
        assert!(bind_address(&ServeOptions { port: 0, ..Default::default() }).is_ok());
        assert!(bind_address(&ServeOptions { host: "localhost".into(), port: 0, ..Default::default() }).is_ok());
        let e = bind_address(&ServeOptions { max_queue: 0, port: 0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().starts_with("max_queue:"), "{e}");
    }

    #[test]
    fn query_keys_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Bb+c%zz%4"), "a+b c%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }
}
