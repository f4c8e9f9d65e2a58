//! `vae`: another VAE in place of the model's, as diffusers' `from_pretrained(..., vae=vae)` and A1111's
//! "SD VAE" setting. A diffusers AutoencoderKL folder (or hub id) brings its own config; a single file
//! (original or diffusers names) takes the model's VAE config with the channel counts its weights show (A1111
//! does the same: a VAE file has no config), so an SDXL model keeps its own scaling factor.
use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;

use super::sd::{check_kind, resolve, LoadOptions};
use crate::io::checkpoint::TensorMap;
use crate::io::detect::ModelKind;
use crate::io::vae_file::load_vae_file;
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::{Error, Result};

const EXPECTED: &str = "a VAE (a diffusers AutoencoderKL folder, or a .safetensors/.pt/.ckpt VAE file)";

/// The VAE `spec` names, checked to work on the latents of `own` (the model's VAE); errors name `setting`.
/// Returns the VAE and the local path it was read from.
pub fn open_vae(
    setting: &str,
    spec: &str,
    own: &AutoencoderKL,
    opts: &LoadOptions,
) -> Result<(AutoencoderKL, PathBuf)> {
    let path = resolve(setting, spec, opts)?;
    check_kind(setting, &path, &[ModelKind::Vae], EXPECTED)?;
    let (dtype, device) = (opts.dtype, &opts.device);
    let vae = if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(Error::setting(
                setting,
                format!("{}: a folder without config.json is not {EXPECTED}", path.display()),
            ));
        }
        AutoencoderKL::load(&path, dtype, device).map_err(|e| Error::setting(setting, e))?
    } else {
        let file = load_vae_file(&path).map_err(|e| Error::setting(setting, e))?;
        let cfg = config_from_weights(&file.tensors, own.config(), &path, setting)?;
        AutoencoderKL::new(cfg, VarBuilder::from_tensors(file.tensors, dtype, device))
            .map_err(|e| Error::setting(setting, format!("{}: {e}", path.display())))?
    };
    let (theirs, ours) = (vae.config().latent_channels, own.config().latent_channels);
    if theirs != ours {
        return Err(Error::setting(
            setting,
            format!(
                "{}: this VAE has {theirs} latent channels but the model works on {ours}: it was made for another \
                 model",
                path.display()
            ),
        ));
    }
    let (theirs, ours) = (vae.config().block_out_channels.len(), own.config().block_out_channels.len());
    if theirs != ours {
        return Err(Error::setting(
            setting,
            format!(
                "{}: this VAE scales images by 2^{} but the model's by 2^{}: the latents would not fit",
                path.display(),
                theirs - 1,
                ours.saturating_sub(1)
            ),
        ));
    }
    Ok((vae, path))
}

/// The model's VAE config with the channels, levels and layers a file's weights (diffusers names) show.
fn config_from_weights(
    t: &TensorMap,
    own: &AutoencoderKLConfig,
    path: &Path,
    setting: &str,
) -> Result<AutoencoderKLConfig> {
    let dim = |name: &str, i: usize| -> Result<usize> {
        let x = t.get(name).ok_or_else(|| Error::setting(setting, format!("{}: no tensor {name}", path.display())))?;
        Ok(x.dims().get(i).copied().unwrap_or(0))
    };
    let count = |prefix: &str| {
        t.keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let levels = count("encoder.down_blocks.");
    let block_out_channels = (0..levels)
        .map(|b| dim(&format!("encoder.down_blocks.{b}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let mut cfg = own.clone();
    cfg.in_channels = dim("encoder.conv_in.weight", 1)?;
    cfg.out_channels = dim("decoder.conv_out.weight", 0)?;
    // The encoder's conv_out gives (mean, logvar): 2 x latent channels.
    cfg.latent_channels = dim("encoder.conv_out.weight", 0)? / 2;
    cfg.layers_per_block = count("encoder.down_blocks.0.resnets.");
    cfg.down_block_types = vec![own.down_block_types[0]; levels];
    cfg.up_block_types = vec![own.up_block_types[0]; levels];
    cfg.block_out_channels = block_out_channels;
    cfg.use_quant_conv = t.contains_key("quant_conv.weight");
    cfg.use_post_quant_conv = t.contains_key("post_quant_conv.weight");
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::pipeline::generate::{generate, GenerateParams};
    use crate::pipeline::sd::StableDiffusion;
    use crate::test_support::{fixture_path, fixture_tensors, max_abs_diff, psnr};

    fn opts() -> LoadOptions {
        LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, prediction_type: None, config_dir: None }
    }

    fn tiny_sd15() -> StableDiffusion {
        StableDiffusion::open(fixture_path("models/tiny-sd15").to_str().unwrap(), &opts()).unwrap()
    }

    /// diffusers' image with `vae=` another tiny VAE (gen_vae_override.py), from the diffusers folder and from the
    /// original-layout single file: same latents, decoded tensor within 2e-3, PNG >= 40 dB.
    #[test]
    fn other_vae_matches_diffusers_from_folder_and_single_file() {
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture_path("vae_override/cases.json")).unwrap()).unwrap();
        let reference = fixture_tensors("vae_override/image.safetensors");
        let png = image::open(fixture_path("vae_override/image.png")).unwrap().to_rgb8();
        for spec in ["vae_override/tiny-vae", "vae_override/tiny-vae-ldm.safetensors"] {
            let mut sd = tiny_sd15();
            sd.replace_vae("vae", fixture_path(spec).to_str().unwrap(), &opts()).unwrap();
            let params = GenerateParams {
                scheduler: Some("ddim".parse().unwrap()),
                ..GenerateParams::plain(
                    case["prompt"].as_str().unwrap(),
                    128,
                    128,
                    case["steps"].as_u64().unwrap() as usize,
                    7.5,
                    case["seed"].as_u64().unwrap(),
                )
            };
            let out = generate(&sd, &[], &params, &mut |_, _| {}).unwrap();
            let latents = max_abs_diff(&out.latents, &reference["latents"]);
            let decoded = max_abs_diff(&out.decoded, &reference["decoded"]);
            assert!(latents < 1e-3 && decoded < 2e-3, "{spec}: latents differ by {latents}, decoded by {decoded}");
            let db = psnr(&out.images[0], &png);
            assert!(db >= 40.0, "{spec}: PSNR {db:.1} dB");
        }
    }

    /// A UNet given as the VAE is refused naming the setting and what the file is; so is a VAE of other latents.
    #[test]
    fn wrong_files_are_refused() {
        let mut sd = tiny_sd15();
        let unet = fixture_path("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors");
        let err = sd.replace_vae("vae", unet.to_str().unwrap(), &opts()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, Error::Setting { setting, .. } if setting == "vae"), "{msg}");
        assert!(msg.contains("UNet") && msg.contains("a VAE"), "{msg}");
        let err = sd.replace_vae("vae", "/no/such/vae.safetensors", &opts()).unwrap_err().to_string();
        assert!(err.starts_with("vae: /no/such/vae.safetensors"), "{err}");
        assert!(sd.vae_override.is_none());
    }
}
