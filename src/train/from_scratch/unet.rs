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
use crate::train::feed::Batch;
use crate::train::feed::Source;
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
    let (settings, device) = (run.settings, run.device);
    // 1. Latents: a folder's posteriors of every target; streamed data's are encoded batch by batch.
    let vae_dir = run.model_dir.join("vae");
    let vae = AutoencoderKL::load(&vae_dir, DType::F32, device)?;
    let scaling_factor = vae.config().scaling_factor;
    let posteriors = match (run.posteriors.take(), run.targets()?) {
        (Some(p), _) => Some(p),
        (None, Some(targets)) => Some(encode_all(&vae, &targets)?),
        (None, None) => None,
    };

    // 2. Text: a folder's token ids per caption; with a frozen encoder, its embeddings too (computed once).
    let tokenizer = ClipTokenizer::from_dir(&run.model_dir.join("tokenizer"))?;
    let text_dir = run.model_dir.join("text_encoder");
    let text_tensors = on_device(files::read_tensors(&text_dir, TEXT_WEIGHTS)?, device)?;
    let (text_all, text_params) = Params::split(text_tensors, |_| settings.train_text_encoder)?;
    let text_config = text_encoder::config(&run.arch.text_encoder)?;
    let text_encoder = ClipTextModel::new(text_config, VarBuilder::from_tensors(text_all, DType::F32, device))?;
    let folder = match run.data {
        Source::Folder(d) => Some(d),
        Source::Stream(_) => None,
    };
    let captions: BTreeSet<&str> = folder
        .iter()
        .flat_map(|d| d.examples.iter().flat_map(|e| e.captions.iter().map(String::as_str)))
        .chain([""])
        .collect();
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
    let Some(steps) = stage.run(&params, run.stop, report, &mut run.batches(), |rng, data| {
        // Batch, caption drops, then diffusers' draws (posterior noise, noise, timesteps).
        let picked = data.next(b, rng)?;
        let drops = rng.rand(picked.len());
        let (means, logvars): (Vec<Tensor>, Vec<Tensor>) = match (&picked, &posteriors) {
            (Batch::Indices(indices), Some(p)) => indices.iter().map(|&i| p[i].clone()).unzip(),
            _ => encode_all(&vae, &picked.targets(None, device)?)?.into_iter().unzip(),
        };
        let captions: Vec<String> = picked
            .captions(|i| folder.map_or("", |d| d.examples[i].captions[0].as_str()))
            .into_iter()
            .zip(&drops)
            .map(|(c, &u)| if (u as f64) < settings.proportion_empty_prompts { String::new() } else { c.to_string() })
            .collect();
        let text = if folder.is_none() {
            // Streamed captions are encoded per batch (no table that grows with the data).
            if settings.train_text_encoder {
                text_encoder.forward(&token_ids(&tokenizer, &captions, device)?)?
            } else {
                encode_prompts(&tokenizer, &text_encoder, &captions, device)?
            }
        } else if settings.train_text_encoder {
            let tokens: Vec<Tensor> = captions.iter().map(|c| ids[c].clone()).collect();
            text_encoder.forward(&Tensor::stack(&tokens, 0)?)?
        } else {
            let texts: Vec<Tensor> = captions.iter().map(|c| embeddings[c].clone()).collect();
            Tensor::stack(&texts, 0)?
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
