//! Part 3 of a from-scratch run: the UNet, with diffusers' text-to-image objective on the VAE's cached
//! posteriors ([`super::loss::denoising_loss`]); the text encoder trains with it (one AdamW over both) unless
//! frozen, when its embeddings are computed once.
use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::loss::denoising_loss;
use super::text_encoder::{self, TEXT_WEIGHTS};
use super::vae::encode_all;
use super::{Run, StageReport, UNET_SEED_OFFSET, UNET_STAGE};
use crate::model::clip::ClipTextModel;
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, DiagonalGaussian};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::train::files::{self, Entry};
use crate::train::objective::{encode_prompts, token_ids, Draws, Objective};
use crate::train::params::{on_device, Params};
use crate::train::random_weights;
use crate::{Error, Result};

/// The text encoder's tensors in the UNet stage's checkpoints (one optimizer over both networks).
const TEXT_PARAMS_PREFIX: &str = "text_encoder.";

/// Trains the UNet (and the text encoder) to the step count and writes `model/unet/` (and `model/text_encoder/`);
/// false when stopped.
pub(super) fn train(run: &mut Run, report: &mut dyn FnMut(&StageReport)) -> Result<bool> {
    let (settings, device, dataset) = (run.settings, run.device, run.dataset);
    // 1. Latents: the VAE's posteriors of every target.
    let vae_dir = run.model_dir.join("vae");
    let vae = AutoencoderKL::load(&vae_dir, DType::F32, device)?;
    let scaling_factor = vae.config().scaling_factor;
    let posteriors = match run.posteriors.take() {
        Some(p) => p,
        None => encode_all(&vae, &run.targets()?)?,
    };
    drop(vae);

    // 2. Text: token ids per caption; with a frozen encoder, its embeddings too (computed once).
    let tokenizer = ClipTokenizer::from_dir(&run.model_dir.join("tokenizer"))?;
    let text_dir = run.model_dir.join("text_encoder");
    let text_tensors = on_device(files::read_tensors(&text_dir, TEXT_WEIGHTS)?, device)?;
    let (text_all, text_params) = Params::split(text_tensors, |_| settings.train_text_encoder)?;
    let text_config = text_encoder::config(&run.arch.text_encoder)?;
    let text_encoder = ClipTextModel::new(text_config, VarBuilder::from_tensors(text_all, DType::F32, device))?;
    let captions: BTreeSet<&str> =
        dataset.examples.iter().flat_map(|e| e.captions.iter().map(String::as_str)).chain([""]).collect();
    let mut ids = HashMap::new();
    let mut embeddings = HashMap::new();
    for c in captions {
        let caption = [c.to_string()];
        ids.insert(c.to_string(), token_ids(&tokenizer, &caption, device)?.squeeze(0)?);
        if !settings.train_text_encoder {
            let embedding = encode_prompts(&tokenizer, &text_encoder, &caption, device)?.squeeze(0)?;
            embeddings.insert(c.to_string(), embedding);
        }
    }

    // 3. The UNet at its seeded start, and the objective of the model's scheduler.
    let scheduler = SchedulerConfig::from_file(run.model_dir.join("scheduler"))?;
    let objective = Objective::from_scheduler_config(&scheduler)?;
    let cfg: UNet2DConditionConfig =
        serde_json::from_value(run.arch.unet.clone()).map_err(|e| Error::Invalid(format!("UNet config: {e}")))?;
    let seed = settings.seed.wrapping_add(UNET_SEED_OFFSET);
    let init = random_weights::draw(seed, |vb| UNet2DConditionModel::new(&cfg, vb))?;
    let (all, unet_params) = Params::split(on_device(init, device)?, |_| true)?;
    let unet = UNet2DConditionModel::new(&cfg, VarBuilder::from_tensors(all, DType::F32, device))?;
    let params = unet_params.clone().merged(text_params.clone(), TEXT_PARAMS_PREFIX);

    // 4. The steps.
    let stage = run.stage(UNET_STAGE, &settings.unet, UNET_SEED_OFFSET);
    let b = settings.unet.batch_size;
    let Some(steps) = stage.run(&params, run.stop, report, |rng| {
        // Batch, caption drops, then diffusers' draws (posterior noise, noise, timesteps).
        let picks = rng.randint(0, dataset.len() as i64, b);
        let drops = rng.rand(b);
        let mut means = Vec::with_capacity(b);
        let mut logvars = Vec::with_capacity(b);
        let mut texts = Vec::with_capacity(b);
        let mut tokens = Vec::with_capacity(b);
        for (&i, &u) in picks.iter().zip(&drops) {
            let (mean, logvar) = &posteriors[i as usize];
            means.push(mean.clone());
            logvars.push(logvar.clone());
            let caption = if (u as f64) < settings.proportion_empty_prompts {
                ""
            } else {
                &dataset.examples[i as usize].captions[0]
            };
            match embeddings.get(caption) {
                Some(embedding) => texts.push(embedding.clone()),
                None => tokens.push(ids[caption].clone()),
            }
        }
        let text = if tokens.is_empty() {
            Tensor::stack(&texts, 0)?
        } else {
            text_encoder.forward(&Tensor::stack(&tokens, 0)?)?
        };
        let mean = Tensor::stack(&means, 0)?;
        let logvar = Tensor::stack(&logvars, 0)?;
        let mut draws = Draws::draw(rng, mean.dims(), objective.num_train_timesteps(), device)?;
        if settings.noise_offset > 0.0 {
            let (b, c) = (mean.dim(0)?, mean.dim(1)?);
            let offset = (rng.randn_tensor(&[b, c, 1, 1], device)? * settings.noise_offset)?;
            draws.noise = draws.noise.broadcast_add(&offset)?;
        }
        let latents = (DiagonalGaussian { mean, logvar }.sample_with_noise(&draws.posterior_noise)? * scaling_factor)?;
        denoising_loss(&unet, &objective, &latents, &draws, &text, settings.snr_gamma)
    })?
    else {
        return Ok(false);
    };
    run.steps += steps;

    // 5. The encoder first: the UNet folder marks the stage done.
    if settings.train_text_encoder {
        files::write_folder(
            &text_dir,
            &[
                Entry::Json("config.json", &run.arch.text_encoder),
                Entry::Tensors(TEXT_WEIGHTS, &text_params.snapshot()?),
            ],
        )?;
    }
    files::write_diffusers_folder(&run.model_dir.join("unet"), &run.arch.unet, &unet_params.snapshot()?)?;
    Ok(true)
}
