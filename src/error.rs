//! The library's error type: every variant names the file, flag or tensor it is about.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file that is missing a field, has a bad value or is not JSON.
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weights file that cannot be read or does not fit the model built from its config.
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// An image that cannot be read or written.
    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },
    /// A user-facing setting that is out of range or inconsistent (message names the flag).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), msg: msg.to_string() }
    }
    pub fn weights(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Weights { path: path.into(), msg: msg.to_string() }
    }
}
