//! Part 2 of a from-scratch run: the VAE, on random crops of the targets (reconstruction + KL,
//! [`super::loss::vae_loss`]); its `scaling_factor` is then set to 1/std of the training latents (of a folder
//! dataset: all of them; of streamed data: the first [`SCALE_SAMPLES`] of an epoch seeded with the run's seed,
//! as Stable Diffusion's 0.18215 was estimated on a batch).
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;

use super::loss::vae_loss;
use super::{Run, StageReport, VAE_SEED_OFFSET, VAE_STAGE};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::rng::TorchGenerator;
use crate::train::dataset::target_tensor;
use crate::train::feed::Source;
use crate::train::files;
use crate::train::params::{on_device, Params};
use crate::train::random_weights;
use crate::train::stream::Decoded;
use crate::{Error, Result};

/// Images encoded per VAE call when computing latents.
const ENCODE_BATCH: usize = 16;
/// Streamed data: the samples whose latents set the scaling factor.
pub const SCALE_SAMPLES: usize = 256;

/// Trains the VAE to its step count and writes `model/vae/`; false when stopped.
pub(super) fn train(run: &mut Run, report: &mut dyn FnMut(&StageReport)) -> Result<bool> {
    let settings = run.settings;
    let images = run.targets()?;
    let cfg: AutoencoderKLConfig =
        serde_json::from_value(run.arch.vae.clone()).map_err(|e| Error::Invalid(format!("VAE config: {e}")))?;
    let seed = settings.seed.wrapping_add(VAE_SEED_OFFSET);
    let init = random_weights::draw(seed, |vb| AutoencoderKL::new(cfg.clone(), vb))?;
    let (all, params) = Params::split(on_device(init, run.device)?, |_| true)?;
    let vae = AutoencoderKL::new(cfg, VarBuilder::from_tensors(all, DType::F32, run.device))?;
    let stage = run.stage(VAE_STAGE, &settings.vae, VAE_SEED_OFFSET);
    let (crop, res) = (settings.vae_crop as usize, settings.resolution as usize);
    let device = run.device;
    let Some(steps) = stage.run(&params, run.stop, report, &mut run.batches(), |rng, data| {
        let batch = data.next(settings.vae.batch_size, rng)?.targets(images.as_deref(), device)?;
        let x = random_crops(&batch, crop, res, rng)?;
        vae_loss(&vae, &x, settings.kl_weight, rng)
    })?
    else {
        return Ok(false);
    };
    run.steps += steps;
    // Stable Diffusion's recipe: scale latents to unit variance for the denoiser. A folder's posteriors are kept
    // for the UNet stage.
    let scale = match &images {
        Some(images) => {
            let encoded = encode_all(&vae, images)?;
            let scale = 1.0 / latent_std(&encoded)?;
            run.posteriors = Some(encoded);
            scale
        }
        None => 1.0 / latent_std(&encode_all(&vae, &scale_samples(run)?)?)?,
    };
    let mut config = run.arch.vae.clone();
    config["scaling_factor"] = json!(scale);
    files::write_diffusers_folder(&run.model_dir.join("vae"), &config, &params.snapshot()?)?;
    Ok(true)
}

/// A random `crop`-sized square of each image (each (3, res, res)).
fn random_crops(images: &[Tensor], crop: usize, res: usize, rng: &mut TorchGenerator) -> Result<Tensor> {
    let offsets = rng.randint(0, (res - crop + 1) as i64, 2 * images.len());
    let crops = images
        .iter()
        .zip(offsets.chunks(2))
        .map(|(image, yx)| image.narrow(1, yx[0] as usize, crop)?.narrow(2, yx[1] as usize, crop))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&crops, 0)?)
}

/// Streamed data: the targets of the first [`SCALE_SAMPLES`] samples of an epoch seeded with the run's seed
/// (fewer when an epoch has fewer).
fn scale_samples(run: &Run) -> Result<Vec<Tensor>> {
    let Source::Stream(source) = run.data else { return Err(Error::Invalid("not streamed data".into())) };
    let source = source.with_own_count();
    let mut stream = source.epoch(run.settings.seed, 0, &super::data::stream_options(run.settings));
    let mut out = Vec::with_capacity(SCALE_SAMPLES);
    while out.len() < SCALE_SAMPLES {
        let Some(outcome) = stream.recv()? else { break };
        if let Ok(Decoded::Images { target, .. }) = outcome.sample {
            out.push(target_tensor(&target, run.device)?);
        }
    }
    if out.is_empty() {
        return Err(Error::setting("dataset", format!("{}: no usable sample to scale the latents by", source.pattern)));
    }
    Ok(out)
}

/// Posterior means and log-variances of every image, (4, h, w) each, off the graph.
pub(super) fn encode_all(vae: &AutoencoderKL, images: &[Tensor]) -> Result<Vec<(Tensor, Tensor)>> {
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(ENCODE_BATCH) {
        let p = vae.encode(&Tensor::stack(chunk, 0)?.detach())?;
        for i in 0..chunk.len() {
            out.push((p.mean.get(i)?.detach(), p.logvar.get(i)?.detach()));
        }
    }
    Ok(out)
}

/// Standard deviation of the posterior means (all elements together).
fn latent_std(posteriors: &[(Tensor, Tensor)]) -> Result<f64> {
    let means: Vec<Tensor> = posteriors.iter().map(|(m, _)| m.clone()).collect();
    let all = Tensor::stack(&means, 0)?.flatten_all()?.to_dtype(DType::F64)?;
    let mean = all.mean_all()?;
    let var: f64 = all.broadcast_sub(&mean)?.sqr()?.mean_all()?.to_scalar()?;
    if !(var.is_finite() && var > 0.0) {
        return Err(Error::setting(
            "vae_learning_rate",
            format!("the trained VAE's latents have variance {var}: training diverged"),
        ));
    }
    Ok(var.sqrt())
}
