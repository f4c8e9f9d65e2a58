//! Part 2b of a from-scratch run: the VAE's decoder alone (Stable Diffusion's fine-tuned-decoder VAEs did the
//! same). The encoder, and so the latents the UNet learns, stay as they are, while the decoder learns to render
//! them in their exact colours; run after the UNet too, it changes nothing the UNet depends on. Its last
//! checkpoint is its record: running a finished stage again rewrites the same decoder.
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::loss::decoder_loss;
use super::vae::encode_all;
use super::{Run, StageReport, VAE_DECODER_SEED_OFFSET, VAE_DECODER_STAGE};
use crate::io::weights::DIFFUSERS_STEM;
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::train::feed::Batch;
use crate::train::files;
use crate::train::params::{on_device, Params};
use crate::{Error, Result};

/// The decoder's tensors (and the 1×1 convolution in front of it): what the decoder stage trains.
pub fn is_decoder(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// A folder dataset's images and their posteriors (mean, log-variance).
type FolderInputs = (Vec<Tensor>, Vec<(Tensor, Tensor)>);

/// Trains the decoder to its step count and rewrites `model/vae/`; false when stopped.
pub(super) fn train(run: &mut Run, report: &mut dyn FnMut(&StageReport)) -> Result<bool> {
    let settings = run.settings;
    let vae_dir = run.model_dir.join("vae");
    let weights = format!("{DIFFUSERS_STEM}.safetensors");
    let config = files::read_json(&vae_dir, "config.json")?;
    let cfg: AutoencoderKLConfig =
        serde_json::from_value(config.clone()).map_err(|e| Error::config(vae_dir.join("config.json"), e))?;
    let (all, params) = Params::split(on_device(files::read_tensors(&vae_dir, &weights)?, run.device)?, is_decoder)?;
    let vae = AutoencoderKL::new(cfg, VarBuilder::from_tensors(all.clone(), DType::F32, run.device))?;
    let stage = run.stage(VAE_DECODER_STAGE, &settings.vae_decoder, VAE_DECODER_SEED_OFFSET);
    let (stop, device, batch) = (run.stop, run.device, settings.vae_decoder.batch_size);
    let mut data = run.batches();
    // A folder's images and their posteriors, loaded at the first step (none when the stage is already done).
    let mut inputs: Option<Option<FolderInputs>> = None;
    let Some(steps) = stage.run(&params, stop, report, &mut data, |rng, data| {
        if inputs.is_none() {
            inputs = Some(match run.targets()? {
                Some(images) => {
                    let posteriors = match &run.posteriors {
                        Some(p) => p.clone(),
                        None => encode_all(&vae, &images)?,
                    };
                    run.posteriors = Some(posteriors.clone());
                    Some((images, posteriors))
                }
                None => None,
            });
        }
        let picked = data.next(batch, rng)?;
        let (images, latents) = match (&picked, inputs.as_ref().and_then(|i| i.as_ref())) {
            (Batch::Indices(indices), Some((images, posteriors))) => (
                indices.iter().map(|&i| images[i].clone()).collect(),
                indices.iter().map(|&i| posteriors[i].clone()).collect(),
            ),
            // Streamed: the batch's latents from the (fixed) encoder.
            _ => {
                let images = picked.targets(None, device)?;
                let latents = encode_all(&vae, &images)?;
                (images, latents)
            }
        };
        decoder_loss(&vae, &latents, &images, settings.vae_crop as usize, rng)
    })?
    else {
        return Ok(false);
    };
    run.steps += steps;
    let mut tensors = all;
    tensors.extend(params.snapshot()?);
    files::write_diffusers_folder(&vae_dir, &config, &tensors)?;
    Ok(true)
}
