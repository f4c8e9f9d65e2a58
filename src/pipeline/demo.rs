//! The bundled demo model: a small Stable Diffusion base and a circle-outline ControlNet trained by this
//! project on its synthetic circles (see `docs/demo.md`), used by `generate` when no `--model` is given.
//!
//! They live in the source tree (`assets/demo/`); `CONTROLNET_DEMO_DIR` points elsewhere (an installed
//! binary, a packaged copy).
use std::path::PathBuf;

use crate::{Error, Result};

/// Environment variable naming the demo folder.
pub const DEMO_DIR_ENV: &str = "CONTROLNET_DEMO_DIR";
/// The base pipeline folder inside the demo folder.
pub const BASE: &str = "base";
/// The ControlNet folder inside the demo folder.
pub const CONTROLNET: &str = "circles-controlnet";

/// The demo folder: `$CONTROLNET_DEMO_DIR`, else `assets/demo` of the source tree this binary was built from.
pub fn dir() -> PathBuf {
    match std::env::var_os(DEMO_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets").join("demo"),
    }
}

/// The demo base model folder, checked to exist.
pub fn base() -> Result<PathBuf> {
    existing("model", dir().join(BASE), "model_index.json")
}

/// The demo ControlNet folder, checked to exist.
pub fn controlnet() -> Result<PathBuf> {
    existing("controls[0].controlnet", dir().join(CONTROLNET), "config.json")
}

/// `path` when it holds `marker`; else an error naming `setting` (the one to set instead of using the demo).
fn existing(setting: &str, path: PathBuf, marker: &str) -> Result<PathBuf> {
    if path.join(marker).is_file() {
        return Ok(path);
    }
    Err(Error::setting(
        setting,
        format!(
            "the bundled demo model is not at {} (set {DEMO_DIR_ENV} to the folder holding {BASE}/ and \
             {CONTROLNET}/, or name a model and a ControlNet)",
            path.display()
        ),
    ))
}
