//! `controlnet convert IN OUT [--to diffusers|original] [--dtype f16|f32]`: a ControlNet between the original
//! single-file layout (lllyasviel's `control_model.*` names) and a diffusers folder, losslessly.
//!
//! IN: an original `.pth`/`.ckpt`/`.safetensors`, a diffusers `.safetensors`, or a diffusers folder.
//! OUT: a folder (`config.json` + `diffusion_pytorch_model.safetensors`) or one original `.safetensors`;
//! written beside OUT first and moved into place when complete, so a failed run leaves nothing half-written.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, ValueEnum};

use crate::io::checkpoint::{save_safetensors_atomic, Checkpoint};
use crate::io::detect::{detect, Format};
use crate::io::single_file::{cast_floats, controlnet_to_original, load_controlnet, load_controlnet_file_with};
use crate::io::weights::DIFFUSERS_STEM;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Diffusers,
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F16,
    F32,
}

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The ControlNet to convert (file, diffusers folder, or hub id owner/name[@revision][/file]).
    pub input: PathBuf,
    /// Where to write (a folder for --to diffusers, a .safetensors file for --to original).
    pub output: PathBuf,
    /// Target layout [default: the other one].
    #[arg(long, value_enum)]
    pub to: Option<Target>,
    /// Store floating-point weights in this precision [default: as stored].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// A diffusers config.json (or folder) to use instead of the one read from the weights.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    // 1. Read: any layout into diffusers names + config.
    let input = crate::io::hub::resolve(&args.input.to_string_lossy(), None)?;
    let args = &ConvertArgs { input, ..args.clone() };
    let input_format = if args.input.is_dir() {
        Format::Diffusers
    } else {
        let ck = Checkpoint::open(&args.input)?;
        detect(&ck.tensors, "").format
    };
    let mut c = if args.input.is_dir() {
        load_controlnet(&args.input)?
    } else {
        load_controlnet_file_with(&args.input, args.config.as_deref())?
    };
    let target = args.to.unwrap_or(match input_format {
        Format::Original => Target::Diffusers,
        Format::Diffusers => Target::Original,
    });
    // 2. Precision.
    if let Some(d) = args.dtype {
        let dtype = match d {
            DTypeArg::F16 => DType::F16,
            DTypeArg::F32 => DType::F32,
        };
        c.tensors = cast_floats(&c.tensors, dtype)?;
    }
    // 3. Write.
    if args.output.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.output.display());
    }
    match target {
        Target::Diffusers => write_folder(&args.output, &c.config, &c.tensors)?,
        Target::Original => {
            let ext = args.output.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "safetensors" {
                bail!(
                    "{}: original ControlNets are written as .safetensors (pickles are never written)",
                    args.output.display()
                );
            }
            save_safetensors_atomic(&controlnet_to_original(&c.tensors)?, &args.output)?;
        }
    }
    let size: u64 = walk_size(&args.output);
    eprintln!(
        "wrote {} ({} layout, {} tensors, {:.1} MB)",
        args.output.display(),
        if target == Target::Diffusers { "diffusers" } else { "original" },
        c.tensors.len(),
        size as f64 / 1e6
    );
    Ok(())
}

/// config.json + weights into a temporary sibling folder, then renamed to `out`.
fn write_folder(
    out: &Path,
    config: &serde_json::Value,
    tensors: &crate::io::checkpoint::TensorMap,
) -> anyhow::Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "controlnet".into());
    let tmp = parent.join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(config)? + "\n")?;
        save_safetensors_atomic(tensors, &tmp.join(format!("{DIFFUSERS_STEM}.safetensors")))?;
        if out.exists() {
            if out.is_dir() {
                std::fs::remove_dir_all(out)?;
            } else {
                std::fs::remove_file(out)?;
            }
        }
        std::fs::rename(&tmp, out)?;
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    result.with_context(|| format!("writing {}", out.display()))
}

fn walk_size(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p).map(|d| d.flatten().map(|e| walk_size(&e.path())).sum()).unwrap_or(0)
    } else {
        p.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::single_file::load_controlnet_file;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
    }

    fn convert(input: &Path, output: &Path, to: Option<Target>, dtype: Option<DTypeArg>) -> anyhow::Result<()> {
        run(&ConvertArgs { input: input.into(), output: output.into(), to, dtype, config: None, force: false })
    }

    fn same(a: &Path, b: &Path) {
        let (a, b) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
        assert_eq!(a.tensors, b.tensors, "headers");
        for t in &a.tensors {
            let (x, y) = (a.load(&t.name).unwrap(), b.load(&t.name).unwrap());
            let x = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let y = y.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(x == y, "{} differs", t.name);
        }
    }

    #[test]
    fn diffusers_to_original_and_back_is_lossless() {
        let dir = tempfile::tempdir().unwrap();
        let twin = fixture("models/tiny-controlnet-a");
        let orig = dir.path().join("control_tiny.safetensors");
        convert(&twin, &orig, None, None).unwrap();
        let back = dir.path().join("back");
        convert(&orig, &back, None, None).unwrap();
        same(&back.join("diffusion_pytorch_model.safetensors"), &twin.join("diffusion_pytorch_model.safetensors"));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["_class_name"], "ControlNetModel");
        // And original -> diffusers -> original gives the first original file again.
        let orig2 = dir.path().join("again.safetensors");
        convert(&back, &orig2, Some(Target::Original), None).unwrap();
        same(&orig, &orig2);
    }

    #[test]
    fn pth_to_diffusers_and_f16_halves_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("from-pth");
        convert(&fixture("load/control_tiny_sd15_fp16.pth"), &out, None, None).unwrap();
        let c = load_controlnet_file(&out.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(c.tensors.values().all(|t| t.dtype() == DType::F16));

        let f32_dir = dir.path().join("f32");
        let f16_dir = dir.path().join("f16");
        convert(&fixture("models/tiny-controlnet-a"), &f32_dir.join("a.safetensors"), None, None).unwrap();
        convert(&fixture("models/tiny-controlnet-a"), &f16_dir.join("a.safetensors"), None, Some(DTypeArg::F16))
            .unwrap();
        let (big, small) = (walk_size(&f32_dir), walk_size(&f16_dir));
        // Same header, data halved: within the header's size of exactly half.
        assert!(small * 2 > big && small * 2 - big < 40_000, "f32 {big} bytes, f16 {small} bytes");
    }

    #[test]
    fn refuses_to_overwrite_and_pickles_as_output() {
        let dir = tempfile::tempdir().unwrap();
        let twin = fixture("models/tiny-controlnet-a");
        let err = convert(&twin, dir.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("exists") && err.contains("--force"), "{err}");
        let err = convert(&twin, &dir.path().join("x.pth"), None, None).unwrap_err().to_string();
        assert!(err.contains(".safetensors"), "{err}");
        let err =
            convert(&fixture("models/tiny-sd15/unet"), &dir.path().join("y"), None, None).unwrap_err().to_string();
        assert!(err.contains("expected a ControlNet"), "{err}");
    }
}
