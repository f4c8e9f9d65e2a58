//! Typed reads of a JSON object's fields, naming the field (with its path) in every error.
use serde_json::{Map, Value};

use crate::serve::error::ApiError;

/// Reads typed values out of a JSON object, naming the field (with its path) in errors.
pub struct Fields<'a> {
    pub path: String,
    pub obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| ApiError::malformed(self.name(key), "expected a string")))
            .transpose()
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| ApiError::malformed(self.name(key), "expected a number")))
            .transpose()
    }

    pub fn i64(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                    .ok_or_else(|| ApiError::malformed(self.name(key), "expected a whole number"))
            })
            .transpose()
    }

    pub fn usize(&self, key: &str) -> Result<Option<usize>, ApiError> {
        self.i64(key)?
            .map(|v| usize::try_from(v).map_err(|_| ApiError::field(self.name(key), format!("{v} must be >= 0"))))
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::malformed(self.name(key), "expected true or false")))
            .transpose()
    }

    /// Refuses a field that would change the picture unless it has its default (or is absent).
    pub fn only_default(&self, key: &str, is_default: impl Fn(&Value) -> bool, why: &str) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !is_default(v) => Err(ApiError::field(self.name(key), format!("{v} is not supported: {why}"))),
            _ => Ok(()),
        }
    }

    pub fn unknown(&self, key: &str) -> ApiError {
        ApiError::field(self.name(key), "not a field this server knows (refused rather than ignored)")
    }
}

pub fn is_false(v: &Value) -> bool {
    v.as_bool() == Some(false)
}
pub fn is_num(x: f64) -> impl Fn(&Value) -> bool {
    move |v| v.as_f64() == Some(x)
}
pub fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
