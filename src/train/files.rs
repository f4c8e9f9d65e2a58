//! Files and folders a training run writes so that readers see the old version or the whole new one: model
//! folders (`config.json` + `diffusion_pytorch_model.safetensors`, for `controlnet init` and a run's result) are
//! written into a hidden sibling, flushed, then renamed into place; checkpoints ([`super::resume`]) are made of
//! the same [`Entry`]s.
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value;

use super::params::TensorMap;
use crate::io::atomic::write_atomic;
use crate::io::weights::DIFFUSERS_STEM;
use crate::{Error, Result};

/// One file of a folder or checkpoint: a tensor file or a JSON document, at a path relative to the checkpoint folder.
pub enum Entry<'a> {
    Tensors(&'a str, &'a TensorMap),
    Json(&'a str, &'a Value),
    /// A text file written as is (a tokenizer's `vocab.json`, `merges.txt`).
    Text(&'a str, &'a str),
}

impl Entry<'_> {
    pub fn rel(&self) -> &str {
        match self {
            Entry::Tensors(rel, _) | Entry::Json(rel, _) | Entry::Text(rel, _) => rel,
        }
    }

    /// Writes the file under `root` (folders created, contents flushed); returns its path.
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let path = prepare(root, self.rel())?;
        match self {
            Entry::Tensors(_, tensors) => save_tensors(tensors, &path)?,
            Entry::Json(_, value) => {
                let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))? + "\n";
                write_synced(&path, text.as_bytes())?;
            }
            Entry::Text(_, text) => write_synced(&path, text.as_bytes())?,
        }
        Ok(path)
    }
}

/// A tensor file of a folder or checkpoint.
pub fn read_tensors(dir: &Path, rel: &str) -> Result<TensorMap> {
    let path = dir.join(rel);
    candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::weights(&path, e))
}

/// A JSON document of a folder or checkpoint.
pub fn read_json(dir: &Path, rel: &str) -> Result<Value> {
    crate::io::weights::read_json(&dir.join(rel))
}

/// Writes `config.json` + `diffusion_pytorch_model.safetensors` into a temporary sibling of `out`, then
/// renames it to `out` (replacing an existing folder only once the new one is complete).
pub fn write_diffusers_folder(out: &Path, config: &Value, tensors: &TensorMap) -> Result<()> {
    let weights = format!("{DIFFUSERS_STEM}.safetensors");
    write_folder(out, &[Entry::Json("config.json", config), Entry::Tensors(&weights, tensors)])
}

/// Writes a folder of files into a temporary sibling of `out`, then renames it to `out` (replacing an existing
/// folder only once the new one is complete).
pub fn write_folder(out: &Path, entries: &[Entry]) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for entry in entries {
            entry.write(&tmp)?;
        }
        if out.is_dir() {
            std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        } else if out.exists() {
            std::fs::remove_file(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        sync_dir(parent);
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    result
}

/// Creates the folders of `rel` under `root`; returns the file's path.
fn prepare(root: &Path, rel: &str) -> Result<PathBuf> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    Ok(path)
}

/// Safetensors on disk, flushed (tensors are moved to the CPU first). Through [`write_atomic`], which gives the
/// file the mode a plain `File::create` would (the safetensors writer's own temporary file is private, 0600).
fn save_tensors(tensors: &TensorMap, path: &Path) -> Result<()> {
    let cpu: TensorMap =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    write_atomic(path, |tmp| {
        candle_core::safetensors::save(&cpu, tmp).map_err(|e| Error::weights(path, format!("writing: {e}")))?;
        std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(tmp, e))
    })
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Flushes a folder's entries (the rename) where the platform allows it.
pub(super) fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    fn tensors(v: f32) -> TensorMap {
        TensorMap::from([("w".to_string(), Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap())])
    }

    #[test]
    fn diffusers_folder_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cn");
        let config = serde_json::json!({"_class_name": "ControlNetModel"});
        write_diffusers_folder(&out, &config, &tensors(1.0)).unwrap();
        write_diffusers_folder(&out, &config, &tensors(2.0)).unwrap();
        let t = read_tensors(&out, "diffusion_pytorch_model.safetensors").unwrap();
        assert_eq!(t["w"].to_vec1::<f32>().unwrap(), [2.0, 3.0]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
