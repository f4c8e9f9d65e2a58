//! The losses of the three stages: the VAE's (reconstruction + KL), the decoder's (reconstruction of fixed
//! latents) and the UNet's (diffusers' text-to-image objective with min-SNR weighting).
use candle_core::{Device, Tensor};

use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{AutoencoderKL, DiagonalGaussian};
use crate::rng::TorchGenerator;
use crate::schedulers::schedule::PredictionType;
use crate::train::objective::{Draws, Objective};
use crate::Result;

/// Reconstruction MSE of a posterior sample's decoding + `kl_weight` × the KL divergence from N(0, 1), both
/// means over elements.
pub(super) fn vae_loss(vae: &AutoencoderKL, x: &Tensor, kl_weight: f64, rng: &mut TorchGenerator) -> Result<Tensor> {
    let posterior = vae.encode(x)?;
    let noise = rng.randn_tensor(posterior.mean.dims(), x.device())?;
    let recon = vae.decode(&posterior.sample_with_noise(&noise)?)?;
    let reconstruction = (recon - x)?.sqr()?.mean_all()?;
    // KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²) per element.
    let kl = ((posterior.mean.sqr()? + posterior.logvar.exp()?)? - (&posterior.logvar + 1.0)?)?.mean_all()?;
    Ok((reconstruction + (kl * (0.5 * kl_weight))?)?)
}

/// Reconstruction MSE of the decoder alone: a random `crop`-px square of each image against the decoding of the
/// matching latent square, sampled from the image's (fixed) posterior.
pub(super) fn decoder_loss(
    vae: &AutoencoderKL,
    posteriors: &[(Tensor, Tensor)],
    images: &[Tensor],
    crop: usize,
    rng: &mut TorchGenerator,
) -> Result<Tensor> {
    let factor = images[0].dim(1)? / posteriors[0].0.dim(1)?;
    let (latent_crop, latent_res) = (crop / factor, posteriors[0].0.dim(1)?);
    let offsets = rng.randint(0, (latent_res - latent_crop + 1) as i64, 2 * images.len());
    let mut means = Vec::with_capacity(images.len());
    let mut logvars = Vec::with_capacity(images.len());
    let mut targets = Vec::with_capacity(images.len());
    for (((mean, logvar), image), yx) in posteriors.iter().zip(images).zip(offsets.chunks(2)) {
        let (y, x) = (yx[0] as usize, yx[1] as usize);
        means.push(mean.narrow(1, y, latent_crop)?.narrow(2, x, latent_crop)?);
        logvars.push(logvar.narrow(1, y, latent_crop)?.narrow(2, x, latent_crop)?);
        targets.push(image.narrow(1, y * factor, crop)?.narrow(2, x * factor, crop)?);
    }
    let posterior = DiagonalGaussian { mean: Tensor::stack(&means, 0)?, logvar: Tensor::stack(&logvars, 0)? };
    let noise = rng.randn_tensor(posterior.mean.dims(), posterior.mean.device())?;
    let recon = vae.decode(&posterior.sample_with_noise(&noise)?)?;
    Ok((recon - Tensor::stack(&targets, 0)?)?.sqr()?.mean_all()?)
}

/// The UNet's loss on one batch: the prediction at the noisy latents against ε (or v), squared, averaged per
/// sample, weighted by min-SNR when `snr_gamma` is set, averaged over the batch.
pub(super) fn denoising_loss(
    unet: &UNet2DConditionModel,
    objective: &Objective,
    latents: &Tensor,
    draws: &Draws,
    text: &Tensor,
    snr_gamma: Option<f64>,
) -> Result<Tensor> {
    let device = latents.device();
    let noisy = objective.schedule.add_noise(latents, &draws.noise, &draws.timesteps)?;
    let t: Vec<f32> = draws.timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, draws.timesteps.len(), device)?;
    let pred = unet.forward(&noisy, &t, text, None)?;
    let target = match objective.prediction_type {
        PredictionType::VPrediction => objective.schedule.velocity(latents, &draws.noise, &draws.timesteps)?,
        _ => draws.noise.clone(),
    };
    let squared = (pred - target)?.sqr()?;
    match snr_gamma {
        None => Ok(squared.mean_all()?),
        Some(gamma) => {
            let weights = min_snr_weights(objective, &draws.timesteps, gamma, device)?;
            Ok(squared.flatten_from(1)?.mean(1)?.mul(&weights)?.mean_all()?)
        }
    }
}

/// Per-sample min-SNR weights (B,): SNR(t) = ᾱ_t / (1 − ᾱ_t); min(SNR, γ) / SNR for ε-prediction,
/// min(SNR, γ) / (SNR + 1) for v-prediction (diffusers' `compute_snr` and `--snr_gamma`).
pub(super) fn min_snr_weights(
    objective: &Objective,
    timesteps: &[usize],
    gamma: f64,
    device: &Device,
) -> Result<Tensor> {
    let weights = timesteps
        .iter()
        .map(|&t| {
            let a = f64::from(objective.schedule.alpha_cumprod(t)?);
            let snr = a / (1.0 - a);
            let denominator = match objective.prediction_type {
                PredictionType::VPrediction => snr + 1.0,
                _ => snr,
            };
            Ok(snr.min(gamma) / denominator)
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(Tensor::from_vec(weights.into_iter().map(|w| w as f32).collect::<Vec<f32>>(), timesteps.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// min(SNR, 5)/SNR: 1 where the SNR is below γ (noisy timesteps), γ/SNR above it; the scaled-linear
    /// schedule's SNR crosses 5 early (ᾱ = 5/6).
    #[test]
    fn min_snr_weights_follow_the_formula() {
        let cfg = serde_json::from_value(json!({
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"
        }))
        .unwrap();
        let objective = Objective {
            schedule: crate::schedulers::schedule::NoiseSchedule::new(&cfg, false).unwrap(),
            prediction_type: PredictionType::Epsilon,
            only_mid_control: false,
            autocast: false,
        };
        let w: Vec<f32> = min_snr_weights(&objective, &[0, 999], 5.0, &Device::Cpu).unwrap().to_vec1().unwrap();
        let a0 = f64::from(objective.schedule.alpha_cumprod(0).unwrap());
        let snr0 = a0 / (1.0 - a0);
        assert!((f64::from(w[0]) - 5.0 / snr0).abs() < 1e-6 && w[0] < 0.01, "{w:?}");
        assert_eq!(w[1], 1.0);
        let v = Objective { prediction_type: PredictionType::VPrediction, ..objective };
        let wv: Vec<f32> = min_snr_weights(&v, &[999], 5.0, &Device::Cpu).unwrap().to_vec1().unwrap();
        let a = f64::from(v.schedule.alpha_cumprod(999).unwrap());
        assert!((f64::from(wv[0]) - (a / (1.0 - a)) / (a / (1.0 - a) + 1.0)).abs() < 1e-6);
    }
}
