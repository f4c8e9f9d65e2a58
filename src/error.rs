//! The library's error type: every variant names the file, setting or tensor it is about (settings by their
//! library name; the CLI shows its flag, see `cli::describe`).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error's text is part of this one's (not a `source()`), so `{:#}` prints it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A config file that is missing a field, has a bad value or is not JSON.
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weights file that cannot be read or does not fit the model built from its config.
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// An image that cannot be read or written.
    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },
    /// A problem told in a sentence that names what it is about (a kind, a file, a combination); a single
    /// out-of-range setting is [`Error::Setting`] instead, so front ends can name it their way.
    #[error("{0}")]
    Invalid(String),
    /// One setting of a request that is out of range or inconsistent with another. `setting` is the library's
    /// name for it: the request field in snake_case (`width`, `num_images`), prefixed `controls[i].` for a
    /// per-ControlNet one (`controls[1].control_end`). Each front end shows it in its own words: the CLI as its
    /// flag (`cli::flag_for`), the server as the JSON key.
    #[error("{setting}: {msg}")]
    Setting { setting: String, msg: String },
    /// The caller raised the cancel flag of a long call (generate); nothing was written.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }
    pub fn setting(setting: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Setting { setting: setting.into(), msg: msg.to_string() }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), msg: msg.to_string() }
    }
    pub fn weights(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Weights { path: path.into(), msg: msg.to_string() }
    }
}
