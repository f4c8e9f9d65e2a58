//! The web page at `/`: one HTML file with its script and style inline (assets/web/index.html), bundled in the
//! binary, no build step. It speaks the job API and `/controlnet/detect`.
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::App;

pub const INDEX_HTML: &str = include_str!("../../assets/web/index.html");

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/", get(index))
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
}
