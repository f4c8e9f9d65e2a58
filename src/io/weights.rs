//! Finding and opening weight files and config files of a diffusers component folder.
//!
//! A diffusers component folder (`unet/`, `vae/`, `text_encoder/`, a ControlNet folder) holds a `config.json`
//! and its weights as `{stem}.safetensors`, `{stem}.fp16.safetensors` (the fp16 "variant"), or shards listed in
//! `{stem}.safetensors.index.json`. diffusers models use the stem `diffusion_pytorch_model`, transformers
//! models `model`.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Weight file stem of diffusers models (UNet, VAE, ControlNet).
pub const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";
/// Weight file stem of transformers models (CLIP text encoder).
pub const TRANSFORMERS_STEM: &str = "model";

/// Reads and parses a JSON config file; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e))
}

/// The safetensors file(s) of a component folder, full precision preferred over the fp16 variant.
pub fn find_safetensors(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        if index.is_file() {
            return shards_from_index(&index);
        }
    }
    Err(Error::weights(
        dir,
        format!("no weights found: expected {stem}.safetensors, {stem}.fp16.safetensors or a sharded index"),
    ))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let parsed: ShardIndex = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&String> = parsed.weight_map.values().collect();
    let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::weights(index, format!("lists shard {} which does not exist", missing.display())));
    }
    Ok(paths)
}

/// Opens safetensors files (memory-mapped) as a `VarBuilder` that converts every tensor to `dtype`.
/// The header of each file is checked first, so a truncated or foreign file fails with its own path.
pub fn var_builder(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for p in paths {
        check_safetensors(p)?;
    }
    // SAFETY: the files are memory-mapped read-only; modifying them while loaded is undefined behaviour,
    // as with every mmap-based loader (candle, safetensors).
    unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }
        .map_err(|e| Error::weights(paths.first().cloned().unwrap_or_default(), e))
}

/// Checks that a file is a readable safetensors file whose header lies within the file.
pub fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| Error::weights(path, "not a safetensors file (shorter than its 8-byte header length)"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100_000_000 || 8 + header_len > len {
        return Err(Error::weights(path, "not a safetensors file (header length does not fit the file)"));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| Error::weights(path, format!("not a safetensors file (header is not JSON: {e})")))?;
    let data_len = len - 8 - header_len;
    for (name, info) in &meta {
        if name == "__metadata__" {
            continue;
        }
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|v| v.as_u64());
        match end {
            Some(end) if end <= data_len => {}
            Some(end) => {
                return Err(Error::weights(
                    path,
                    format!("truncated: tensor {name} ends at byte {end} but the data is {data_len} bytes"),
                ))
            }
            None => return Err(Error::weights(path, format!("tensor {name} has no data_offsets"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fp16_variant_when_no_full_precision_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd2/text_encoder");
        let files = find_safetensors(&dir, TRANSFORMERS_STEM).unwrap();
        assert!(files[0].ends_with("model.fp16.safetensors"));
    }

    #[test]
    fn truncated_file_is_named() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/tiny-controlnet-a/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(src).unwrap();
        let tmp = std::env::temp_dir().join(format!("cn-trunc-{}.safetensors", std::process::id()));
        std::fs::write(&tmp, &bytes[..bytes.len() / 2]).unwrap();
        let err = check_safetensors(&tmp).unwrap_err().to_string();
        std::fs::remove_file(&tmp).ok();
        assert!(err.contains("truncated"), "{err}");
        assert!(err.contains("cn-trunc"), "{err}");
    }

    #[test]
    fn missing_weights_error_names_folder() {
        let err = find_safetensors(Path::new("/nonexistent/unet"), DIFFUSERS_STEM).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/unet") && err.contains("diffusion_pytorch_model"), "{err}");
    }
}
