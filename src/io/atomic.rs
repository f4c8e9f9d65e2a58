//! Writing a file so that readers see the old file or the whole new one, never half of it.
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Write through `write` into a temporary file next to `path`, then rename it over `path`; on failure the
/// temporary file is removed and `path` is untouched. The folder is created if missing.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The rule every subcommand follows for its outputs: folders are created (by [`write_atomic`]), an existing
/// file is replaced only once the new one is complete, and an output that is one of the command's inputs is
/// refused before anything runs. `setting` names the output setting for the error (`output`).
pub fn check_output_is_not_input(setting: &str, output: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out) = output.canonicalize() else {
        return Ok(()); // an output that does not exist yet cannot be an input
    };
    for input in inputs {
        if input.canonicalize().is_ok_and(|i| i == out) {
            return Err(Error::setting(
                setting,
                format!("{} is also an input ({}): choose another output path", output.display(), input.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_is_never_an_output() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("photo.png");
        std::fs::write(&input, b"png").unwrap();
        let same = dir.path().join(".").join("photo.png");
        let err = check_output_is_not_input("output", &same, &[&input]).unwrap_err().to_string();
        assert!(err.starts_with("output: ") && err.contains("is also an input"), "{err}");
        assert!(check_output_is_not_input("output", &dir.path().join("edges.png"), &[&input]).is_ok());
    }

    #[test]
    fn atomic_write_leaves_the_old_file_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.png");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomic(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(Error::Invalid("disk full".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // no temporary file is left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
