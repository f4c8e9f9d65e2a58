//! Writing a file so that readers see the old file or the whole new one, never half of it.
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Write through `write` into a temporary file next to `path`, then rename it over `path`; on failure the
/// temporary file is removed and `path` is untouched. The folder is created if missing. The file gets the
/// permissions `File::create` gives (0666 less the umask), also when `write` made it some other way: the
/// safetensors writer renames its own private (0600) temporary file into place.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // Created here first, so its permissions are File::create's whatever `write` does.
    let permissions =
        std::fs::File::create(&tmp).and_then(|f| f.metadata()).map(|m| m.permissions()).map_err(|e| Error::io(&tmp, e));
    let result = permissions
        .and_then(|permissions| write(&tmp).map(|()| permissions))
        .and_then(|permissions| std::fs::set_permissions(&tmp, permissions).map_err(|e| Error::io(&tmp, e)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
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

    /// A writer that makes a private file (as the safetensors writer's temporary file is) still gives a file
    /// with File::create's permissions.
    #[cfg(unix)]
    #[test]
    fn atomic_write_gives_the_usual_permissions() {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let usual = dir.path().join("usual");
        std::fs::File::create(&usual).unwrap();
        let want = std::fs::metadata(&usual).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("w.safetensors");
        write_atomic(&path, |tmp| {
            let private = dir.path().join("private");
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&private).unwrap();
            std::fs::rename(&private, tmp).map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, want);
        assert_ne!(want, 0o600, "the test needs a umask that File::create does not turn into 0600");
    }
}
