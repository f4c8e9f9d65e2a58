//! A VAE given as one file (`--vae`): the original (LDM) layout as `vae-ft-mse-840000-ema-pruned` ships it
//! (`encoder.down.0.block.0...`, `quant_conv`, `post_quant_conv`; or under a full checkpoint's
//! `first_stage_model.`), or diffusers' names (`encoder.down_blocks.0.resnets.0...`). Both come out with
//! diffusers' names; the original names go through [`keymap::vae_to_diffusers`], the same renaming a full
//! checkpoint's VAE gets.
use std::path::Path;

use super::checkpoint::{Checkpoint, TensorMap};
use super::detect::VAE_PREFIX;
use super::keymap::{self, Reshape};
use crate::{Error, Result};

/// The top-level parts of an AutoencoderKL; other keys of a VAE file (a training loss's `loss.*`, EMA
/// bookkeeping) are not weights of the model.
const VAE_PARTS: &[&str] = &["encoder.", "decoder.", "quant_conv.", "post_quant_conv."];

/// A VAE file's weights with diffusers' names, and whether the file used the original ones.
pub struct VaeFile {
    pub tensors: TensorMap,
    pub original_names: bool,
}

/// Reads a single-file VAE (`.safetensors`, `.pt`, `.ckpt`, `.bin`). Errors name the file.
pub fn load_vae_file(path: &Path) -> Result<VaeFile> {
    let ck = Checkpoint::open(path)?;
    let has = |p: &str| ck.tensors.iter().any(|t| t.name.starts_with(p));
    let prefix = if has(VAE_PREFIX) { VAE_PREFIX } else { "" };
    if has(&format!("{prefix}encoder.down.")) || has(&format!("{prefix}decoder.up.")) {
        return Ok(VaeFile { tensors: rename_original_vae(&ck, prefix)?, original_names: true });
    }
    if has("encoder.down_blocks.") || has("decoder.up_blocks.") {
        let tensors = ck.load_where(|k| VAE_PARTS.iter().any(|p| k.starts_with(p)))?;
        return Ok(VaeFile { tensors, original_names: false });
    }
    Err(Error::weights(
        path,
        "not a VAE: no encoder.down / decoder.up (original) or encoder.down_blocks (diffusers) keys",
    ))
}

/// The VAE under `prefix` of an original-layout file, renamed to diffusers' names; its attention's 1x1-conv
/// weights become linear ones.
pub fn rename_original_vae(ck: &Checkpoint, prefix: &str) -> Result<TensorMap> {
    let levels = ck
        .tensors
        .iter()
        .filter_map(|t| {
            t.name.strip_prefix(&format!("{prefix}encoder.down."))?.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut vae = TensorMap::new();
    for t in ck.tensors.iter() {
        let Some(k) = t.name.strip_prefix(prefix) else { continue };
        if !VAE_PARTS.iter().any(|p| k.starts_with(p)) {
            continue;
        }
        let (name, reshape) = keymap::vae_to_diffusers(k, levels)
            .ok_or_else(|| Error::weights(&ck.path, format!("unrecognised VAE tensor {}", t.name)))?;
        let x = ck.load(&t.name)?;
        let x = match reshape {
            Reshape::None => x,
            Reshape::Conv1x1ToLinear => x.flatten_from(1)?,
        };
        vae.insert(name, x);
    }
    Ok(vae)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fixture_path, max_abs_diff};

    /// The original-layout file (written by gen_vae_override.py and read back by diffusers' from_single_file)
    /// gives the diffusers folder's tensors exactly.
    #[test]
    fn original_layout_file_gives_the_folder_weights() {
        let file = load_vae_file(&fixture_path("vae_override/tiny-vae-ldm.safetensors")).unwrap();
        assert!(file.original_names);
        let folder = candle_core::safetensors::load(
            fixture_path("vae_override/tiny-vae/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(file.tensors.len(), folder.len());
        for (k, v) in &folder {
            let got = file.tensors.get(k).unwrap_or_else(|| panic!("missing {k}"));
            assert_eq!(got.dims(), v.dims(), "{k}");
            assert_eq!(max_abs_diff(got, v), 0.0, "{k}");
        }
        let diffusers =
            load_vae_file(&fixture_path("vae_override/tiny-vae/diffusion_pytorch_model.safetensors")).unwrap();
        assert!(!diffusers.original_names && diffusers.tensors.len() == folder.len());
    }

    #[test]
    fn other_files_are_not_vaes() {
        let err = load_vae_file(&fixture_path("textual_inversion/neonfox.safetensors")).err().unwrap().to_string();
        assert!(err.contains("neonfox.safetensors") && err.contains("not a VAE"), "{err}");
    }
}
