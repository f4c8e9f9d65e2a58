//! An HTTP error: a status, the request field it is about (as that API spells it) and a sentence. The body is
//! JSON, `{"error": "<reason>", "detail": "<field>: <sentence>", "field": "<field>"}` (A1111's `error` and
//! `detail` keys, which its clients print).
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// The request field at fault, in the API's own spelling (`cfg_scale`,
    /// `alwayson_scripts.controlnet.args[0].weight`).
    pub field: Option<String>,
    pub message: String,
    /// Seconds a client should wait before trying again (503 when the queue is full).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, field: None, message: message.into(), retry_after: None }
    }

    /// 400: the body cannot be read at all (not JSON, not base64).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 422: a field that is readable but refused (out of range, unsupported, not an image).
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, message) }
    }

    /// 400 for a field whose text is not what its type needs (bad base64, a string for a number).
    pub fn malformed(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn too_large(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, message) }
    }

    /// A library error, its setting named by `name_of` (each API spells the request fields its own way).
    pub fn from_library(e: Error, name_of: &dyn Fn(&str) -> String) -> Self {
        match e {
            Error::Setting { setting, msg } => Self::field(name_of(&setting), msg),
            Error::Cancelled => Self::new(StatusCode::CONFLICT, "cancelled before it finished"),
            Error::Invalid(msg) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, msg),
            other => Self::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }

    /// The one-line text: `field: message`.
    pub fn detail(&self) -> String {
        match &self.field {
            Some(f) => format!("{f}: {}", self.message),
            None => self.message.clone(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.status.canonical_reason().unwrap_or("error"),
            "detail": self.detail(),
            "field": self.field,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.to_json())).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_setting_is_named_in_the_api_spelling() {
        let e = Error::setting("guidance", "must be >= 0");
        let api = ApiError::from_library(e, &|s| if s == "guidance" { "cfg_scale".into() } else { s.into() });
        assert_eq!(api.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(api.detail(), "cfg_scale: must be >= 0");
        assert_eq!(ApiError::from_library(Error::Cancelled, &|s| s.into()).status, StatusCode::CONFLICT);
    }
}
