//! Checkpoints a run can resume from, written so that a crash, a full disk or Ctrl-C never leaves one that
//! looks complete but is not.
//!
//! `RUN_DIR/checkpoint-<step>/` holds named files (tensor files and JSON documents) and, written last, a
//! `manifest.json` listing every file with its size and SHA-256. Everything is written into a hidden
//! `.checkpoint-<step>.partial` folder first, flushed to disk, then renamed into place. A checkpoint whose
//! manifest is missing, unreadable, or disagrees with a file is *invalid*: [`latest_valid`] skips it (saying
//! why) and takes the one before. After each save only the newest `keep` checkpoints are kept.
//!
//! The files themselves are written by [`super::files`].
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::{sync_dir, write_synced, Entry};
use crate::io::images::sha256_file;
use crate::{Error, Result};

/// The file that makes a checkpoint valid; written last.
pub const MANIFEST: &str = "manifest.json";
/// Checkpoint folders are `checkpoint-<step>` (as diffusers' `accelerate` checkpoints).
const PREFIX: &str = "checkpoint-";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileRecord {
    size: u64,
    sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    step: u64,
    files: BTreeMap<String, FileRecord>,
}

/// The folder of the checkpoint at `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("{PREFIX}{step}"))
}

/// Writes a checkpoint atomically and keeps only the newest `keep` (all when `None`). Returns its folder.
pub fn save(run_dir: &Path, step: u64, entries: &[Entry], keep: Option<usize>) -> Result<PathBuf> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let final_dir = checkpoint_dir(run_dir, step);
    let tmp = run_dir.join(format!(".{PREFIX}{step}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = (|| -> Result<()> {
        let mut files = BTreeMap::new();
        for entry in entries {
            let path = entry.write(&tmp)?;
            let size = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
            files.insert(entry.rel().to_string(), FileRecord { size, sha256: sha256_file(&path)? });
        }
        let manifest = Manifest { step, files };
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
        write_synced(&tmp.join(MANIFEST), text.as_bytes())?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        sync_dir(run_dir);
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    result?;
    if let Some(keep) = keep {
        let all = list(run_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(final_dir)
}

/// Checks a checkpoint against its manifest; returns its step, or why it is not usable.
pub fn verify(dir: &Path) -> Result<u64> {
    let manifest_path = dir.join(MANIFEST);
    if !manifest_path.is_file() {
        return Err(Error::Invalid(format!("{}: incomplete checkpoint (no {MANIFEST})", dir.display())));
    }
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::config(&manifest_path, e))?;
    for (rel, record) in &manifest.files {
        let path = dir.join(rel);
        let size = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if size != record.size {
            return Err(Error::Invalid(format!(
                "{}: {size} bytes, the manifest says {} (truncated or replaced)",
                path.display(),
                record.size
            )));
        }
        if sha256_file(&path)? != record.sha256 {
            return Err(Error::Invalid(format!("{}: checksum differs from the manifest (corrupt)", path.display())));
        }
    }
    Ok(manifest.step)
}

/// The checkpoints in `run_dir` (complete or not), oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(run_dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint's step and folder.
pub type Found = (u64, PathBuf);

/// The newest valid checkpoint of `run_dir`, and a line for each newer one that was skipped and why.
pub fn latest_valid(run_dir: &Path) -> Result<(Option<Found>, Vec<String>)> {
    let mut skipped = Vec::new();
    for (step, dir) in list(run_dir)?.into_iter().rev() {
        match verify(&dir) {
            Ok(_) => return Ok((Some((step, dir)), skipped)),
            Err(e) => skipped.push(format!("skipping checkpoint {}: {e}", dir.display())),
        }
    }
    Ok((None, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::files::{read_json, read_tensors};
    use crate::train::params::TensorMap;
    use candle_core::{Device, Tensor};

    fn tensors(v: f32) -> TensorMap {
        TensorMap::from([("w".to_string(), Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap())])
    }

    fn save_step(run: &Path, step: u64, keep: Option<usize>) -> PathBuf {
        let t = tensors(step as f32);
        let state = serde_json::json!({ "step": step });
        save(run, step, &[Entry::Tensors("model/w.safetensors", &t), Entry::Json("state.json", &state)], keep).unwrap()
    }

    #[test]
    fn saves_verifies_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 20, 30] {
            save_step(dir.path(), step, Some(2));
        }
        let steps: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [20, 30]);
        let (latest, skipped) = latest_valid(dir.path()).unwrap();
        assert_eq!((latest.unwrap().0, skipped.len()), (30, 0));
        let t = read_tensors(&checkpoint_dir(dir.path(), 30), "model/w.safetensors").unwrap();
        assert_eq!(t["w"].to_vec1::<f32>().unwrap(), [30.0, 31.0]);
        assert_eq!(read_json(&checkpoint_dir(dir.path(), 20), "state.json").unwrap()["step"], 20);
        // No temporary folder is left behind.
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
    }

    /// A flipped byte, a truncated file, or a missing manifest (a save cut short) make a checkpoint invalid;
    /// the previous one is used.
    #[test]
    fn corrupt_or_partial_checkpoints_fall_back_to_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        save_step(dir.path(), 1, None);
        save_step(dir.path(), 2, None);
        let newest = save_step(dir.path(), 3, None);
        let file = newest.join("model/w.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();
        let (latest, skipped) = latest_valid(dir.path()).unwrap();
        assert_eq!(latest.unwrap().0, 2);
        assert!(skipped[0].contains("checksum differs"), "{skipped:?}");

        std::fs::write(&file, &bytes[..10]).unwrap();
        assert!(verify(&newest).unwrap_err().to_string().contains("truncated"));
        std::fs::remove_file(checkpoint_dir(dir.path(), 2).join(MANIFEST)).unwrap();
        let (latest, skipped) = latest_valid(dir.path()).unwrap();
        assert_eq!(latest.unwrap().0, 1);
        assert_eq!(skipped.len(), 2);
        assert!(skipped[1].contains("incomplete checkpoint"), "{skipped:?}");
    }
}
