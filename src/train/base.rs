//! Training a small Stable Diffusion base from scratch on a fill50k-layout dataset: the bundled demo model.
//!
//! Three parts, each a diffusers folder under `RUN_DIR/model/`, made in order and skipped when already there
//! (so a stopped run picks up where it was):
//! 1. `text_encoder/` + `tokenizer/`: a CLIP text encoder at its seeded random initialisation and the real CLIP
//!    BPE vocabulary. By default the encoder then trains along with the UNet (part 3): left frozen and random,
//!    it gave the UNet the colour words but not which one is the circle's, and the demo base painted colours
//!    regardless of the prompt (docs/demo.md);
//! 2. `vae/`: an autoencoder trained on the targets, reconstruction MSE + a small KL term (the latent-diffusion
//!    recipe, without the perceptual and adversarial terms a flat-colour dataset does not need); its
//!    `scaling_factor` is then set to 1/std of the training latents, as Stable Diffusion's 0.18215 was found;
//! 3. `unet/`: the denoiser, trained with diffusers' text-to-image objective (ε-prediction MSE at a uniform
//!    timestep, latents sampled from the VAE posterior and scaled) on cached latents, with a share of captions
//!    dropped so classifier-free guidance works; the text encoder trains with it (one AdamW over both) unless
//!    frozen, when its embeddings are cached too. A trained encoder is written back to `text_encoder/` (f32).
//!
//! Each training stage keeps checkpoints (`RUN_DIR/<stage>/checkpoint-N`: weights, AdamW moments, step and
//! generator state) and `loss.jsonl`/`loss.png`; a stage that was stopped resumes from its newest valid
//! checkpoint and continues exactly. One torch-compatible generator per stage, seeded from `--seed`, draws
//! everything (batches, crops, caption drops, noise, timesteps).
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::checkpoint::{self, Entry};
use super::dataset::Dataset;
use super::ema::Ema;
use super::objective::{encode_prompts, token_ids, Draws, Objective};
use super::optimizer::{warmup_lr, AdamW, AdamWConfig, AdamWSteps, Grads};
use super::params::{on_device, Params, TensorMap};
use super::scratch;
use super::validation::{self, LossRecord};
use crate::io::single_file::bundled_tokenizer;
use crate::io::weights::DIFFUSERS_STEM;
use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
use crate::rng::{GeneratorState, TorchGenerator};
use crate::schedulers::schedule::PredictionType;
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The finished model folder inside the run folder.
pub const MODEL_DIR: &str = "model";
/// Stage folders (checkpoints and logs) inside the run folder.
pub const VAE_STAGE: &str = "vae";
pub const VAE_DECODER_STAGE: &str = "vae-decoder";
pub const UNET_STAGE: &str = "unet";
/// Seeds of the parts, offset from `--seed` so no two parts share a stream.
const TEXT_SEED_OFFSET: u64 = 1;
const VAE_SEED_OFFSET: u64 = 2;
const UNET_SEED_OFFSET: u64 = 3;
const VAE_DECODER_SEED_OFFSET: u64 = 4;
/// Checkpoint files.
const CK_PARAMS: &str = "params.safetensors";
const CK_OPTIMIZER: &str = "optimizer.safetensors";
const CK_STATE: &str = "state.json";
const CK_EMA: &str = "ema.safetensors";
/// Text encoder weights file (transformers' name).
const TEXT_WEIGHTS: &str = "model.safetensors";
/// The text encoder's tensors in the UNet stage's checkpoints (one optimizer over both networks).
const TEXT_PARAMS_PREFIX: &str = "text_encoder.";
/// Images encoded per VAE call when caching latents.
const ENCODE_BATCH: usize = 16;

/// The networks' `config.json`s and the scheduler's.
#[derive(Debug, Clone)]
pub struct Architecture {
    pub text_encoder: Value,
    pub vae: Value,
    pub unet: Value,
    pub scheduler: Value,
}

impl Architecture {
    /// The demo base: SD1.x's layout shrunk for 128 px images of flat shapes. A VAE with 8x downsampling to
    /// 4 latent channels (16x16 latents at 128 px), a 3-level UNet with cross-attention at the two finer
    /// levels and the middle, and a 2-layer CLIP text encoder 32 wide (its vocabulary table, 49408 x 32, is
    /// the largest tensor of the model).
    ///
    /// The VAE normalises with one group: a group norm subtracts each group's mean over the image, and with
    /// few channels per group a flat-colour picture loses its absolute colour there (a first VAE with 8 groups
    /// of 2 channels reconstructed shapes well but shifted colours: black came back dark green).
    pub fn demo() -> Self {
        let text_encoder = json!({
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
            "projection_dim": 32
        });
        let vae = json!({
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 1,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "act_fn": "silu", "sample_size": 128, "scaling_factor": 1.0, "mid_block_add_attention": true,
            "force_upcast": true
        });
        let unet = json!({
            "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 32, "attention_head_dim": 4,
            "act_fn": "silu", "flip_sin_to_cos": true, "freq_shift": 0
        });
        let scheduler = json!({
            "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1, "timestep_spacing": "leading"
        });
        Self { text_encoder, vae, unet, scheduler }
    }
}

/// One training stage's optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSettings {
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Keep an exponential moving average of the weights with this decay (after warm-up) and write it out
    /// at the end instead of the last step's weights ([`super::ema`]). None: the raw weights.
    #[serde(default)]
    pub ema_decay: Option<f64>,
}

/// Everything that shapes a base run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseSettings {
    /// Images are resized and centre-cropped to this square size.
    pub resolution: u32,
    pub seed: u64,
    pub vae: StageSettings,
    /// The VAE trains on random square crops of this size (a multiple of 8, at most `resolution`): it is fully
    /// convolutional but for the middle attention, and smaller crops make its steps several times cheaper.
    pub vae_crop: u32,
    /// Weight of the KL term (per latent element) against the reconstruction MSE (per pixel).
    pub kl_weight: f64,
    /// The decoder alone, on the VAE's fixed latents (same crops; 0 steps: skipped).
    #[serde(default = "no_stage")]
    pub vae_decoder: StageSettings,
    pub unet: StageSettings,
    /// Share of captions replaced by "" (the unconditional half of classifier-free guidance).
    pub proportion_empty_prompts: f64,
    /// Checkpoint every this many steps (0: only when stopped).
    pub checkpointing_steps: u64,
    /// Train the text encoder with the UNet (false: it stays at its random initialisation).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Min-SNR loss weighting of the UNet stage (Hang et al. 2023, diffusers' `--snr_gamma`): each sample's
    /// MSE is weighted by min(SNR(t), γ)/SNR(t) (ε-prediction; /(SNR(t)+1) for v). It takes weight off the
    /// nearly clean timesteps, whose ε is hard to predict and dominates an unweighted loss but where the
    /// prompt hardly matters. None: unweighted.
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// Offset noise (diffusers' `--noise_offset`): `offset · N(0, 1)` per sample and channel is added to the
    /// noise. SD's schedule leaves √ᾱ ≈ 0.07 of the image at its noisiest timestep, so the noise's mean shows
    /// the image's mean colour during training; a model trained that way takes the background colour from the
    /// seed's noise rather than from the prompt. The offset hides it. 0: none.
    #[serde(default)]
    pub noise_offset: f64,
}

impl Default for BaseSettings {
    fn default() -> Self {
        Self {
            resolution: 128,
            seed: 0,
            vae: StageSettings { steps: 1500, batch_size: 8, learning_rate: 1e-3, warmup_steps: 50, ema_decay: None },
            vae_crop: 64,
            kl_weight: 1e-4,
            vae_decoder: StageSettings {
                steps: 1000,
                batch_size: 8,
                learning_rate: 1e-3,
                warmup_steps: 50,
                ema_decay: None,
            },
            unet: StageSettings {
                steps: 4000,
                batch_size: 32,
                learning_rate: 5e-4,
                warmup_steps: 100,
                ema_decay: Some(0.999),
            },
            proportion_empty_prompts: 0.1,
            checkpointing_steps: 250,
            train_text_encoder: true,
            snr_gamma: Some(5.0),
            noise_offset: 0.15,
        }
    }
}

/// A stage that does not run (settings saved before the stage existed).
fn no_stage() -> StageSettings {
    StageSettings { steps: 0, batch_size: 1, learning_rate: 1e-3, warmup_steps: 0, ema_decay: None }
}

impl BaseSettings {
    /// Checks ranges; messages name the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad(format!("--resolution {} must be a positive multiple of 8", self.resolution));
        }
        if self.vae_crop == 0 || !self.vae_crop.is_multiple_of(8) || self.vae_crop > self.resolution {
            return bad(format!("--vae-crop {} must be a multiple of 8 in [8, --resolution]", self.vae_crop));
        }
        for (flag, s) in [("vae", &self.vae), ("vae-decoder", &self.vae_decoder), ("unet", &self.unet)] {
            if s.batch_size == 0 {
                return bad(format!("--{flag}-batch-size must be at least 1"));
            }
            if !(s.learning_rate.is_finite() && s.learning_rate > 0.0) {
                return bad(format!("--{flag}-learning-rate {} must be a positive number", s.learning_rate));
            }
            if s.ema_decay.is_some_and(|d| !(d > 0.0 && d < 1.0)) {
                return bad(format!(
                    "--{flag}-ema-decay {:?} must lie in (0, 1) (0 turns the average off)",
                    s.ema_decay
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.proportion_empty_prompts) {
            return bad(format!("--proportion-empty-prompts {} must lie in [0, 1]", self.proportion_empty_prompts));
        }
        if !(self.noise_offset.is_finite() && self.noise_offset >= 0.0) {
            return bad(format!("--noise-offset {} must be a number >= 0", self.noise_offset));
        }
        if self.snr_gamma.is_some_and(|g| !(g.is_finite() && g > 0.0)) {
            return bad(format!(
                "--snr-gamma {:?} must be a positive number (0 turns the weighting off)",
                self.snr_gamma
            ));
        }
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return bad(format!("--kl-weight {} must be a number >= 0", self.kl_weight));
        }
        Ok(())
    }
}

/// Progress of a stage, after each step.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub stage: &'static str,
    pub step: u64,
    pub steps: u64,
    pub loss: f32,
    pub samples_per_second: f64,
}

/// What a call to [`train_base`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseEnd {
    /// The model folder is complete.
    Finished,
    /// Stopped (Ctrl-C) during `stage`, after a checkpoint at `step`.
    Interrupted { stage: &'static str, step: u64 },
}

/// Where a stage is; saved in its checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageState {
    step: u64,
    rng: GeneratorState,
    optimizer: AdamWSteps,
    settings: StageSettings,
    /// Updates of the weight average so far (None: no average kept).
    #[serde(default)]
    ema_updates: Option<u64>,
}

/// Trains (or finishes training) the base model of `run_dir` on `dataset`; the result is
/// `run_dir/model`, a diffusers Stable Diffusion folder.
pub fn train_base(
    dataset: &Dataset,
    run_dir: &Path,
    arch: &Architecture,
    settings: &BaseSettings,
    device: &Device,
    stop: &AtomicBool,
    report: &mut dyn FnMut(&StageReport),
) -> Result<BaseEnd> {
    settings.validate()?;
    dataset.check()?;
    let model_dir = run_dir.join(MODEL_DIR);
    std::fs::create_dir_all(&model_dir).map_err(|e| Error::io(&model_dir, e))?;
    let settings_path = run_dir.join("base_config.json");
    let saved = serde_json::to_value(settings).map_err(|e| Error::Invalid(e.to_string()))?;
    write_text(
        &settings_path,
        &(serde_json::to_string_pretty(&saved).map_err(|e| Error::Invalid(e.to_string()))? + "\n"),
    )?;
    write_pipeline_files(&model_dir, arch)?;

    // 1. The frozen text encoder and the tokenizer.
    let text_config: ClipTextConfig =
        serde_json::from_value(arch.text_encoder.clone()).map_err(|e| Error::Invalid(format!("text encoder: {e}")))?;
    if !is_complete(&model_dir.join("text_encoder"), TEXT_WEIGHTS) {
        let tensors = scratch::draw(settings.seed.wrapping_add(TEXT_SEED_OFFSET), |vb| {
            ClipTextModel::new(text_config.clone(), vb)
        })?;
        // Stored in half precision (half the size; the largest file of the demo): the frozen encoder is used
        // with exactly these values, converted to f32 on load.
        let tensors =
            tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F16)?))).collect::<Result<TensorMap>>()?;
        checkpoint::write_folder(
            &model_dir.join("text_encoder"),
            &[Entry::Json("config.json", &arch.text_encoder), Entry::Tensors(TEXT_WEIGHTS, &tensors)],
        )?;
    }
    if !model_dir.join("tokenizer").join("merges.txt").is_file() {
        let bundled = bundled_tokenizer("<|endoftext|>")?;
        let config = json!({ "model_max_length": 77, "pad_token": "<|endoftext|>" });
        checkpoint::write_folder(
            &model_dir.join("tokenizer"),
            &[
                Entry::Text("vocab.json", &bundled.vocab_json),
                Entry::Text("merges.txt", &bundled.merges_txt),
                Entry::Json("tokenizer_config.json", &config),
            ],
        )?;
    }

    // The targets, at training resolution, in memory (the demo's 128 px images are 196 KB each as f32).
    let mut targets = None;
    let load_targets = |targets: &mut Option<Vec<Tensor>>| -> Result<()> {
        if targets.is_none() {
            let mut v = Vec::with_capacity(dataset.len());
            for i in 0..dataset.len() {
                v.push(dataset.load(i, settings.resolution, device)?.pixel_values);
            }
            *targets = Some(v);
        }
        Ok(())
    };

    // 2. The VAE.
    let mut posteriors = None;
    let vae_dir = model_dir.join("vae");
    if !is_complete(&vae_dir, &format!("{DIFFUSERS_STEM}.safetensors")) {
        load_targets(&mut targets)?;
        let cfg: AutoencoderKLConfig =
            serde_json::from_value(arch.vae.clone()).map_err(|e| Error::Invalid(format!("VAE config: {e}")))?;
        let init =
            scratch::draw(settings.seed.wrapping_add(VAE_SEED_OFFSET), |vb| AutoencoderKL::new(cfg.clone(), vb))?;
        let (all, params) = Params::split(on_device(init, device)?, |_| true)?;
        let vae = AutoencoderKL::new(cfg.clone(), VarBuilder::from_tensors(all, DType::F32, device))?;
        let images = targets.as_deref().unwrap_or_default();
        let stage = Stage {
            name: VAE_STAGE,
            dir: run_dir.join(VAE_STAGE),
            settings: &settings.vae,
            seed: settings.seed.wrapping_add(VAE_SEED_OFFSET),
            checkpointing_steps: settings.checkpointing_steps,
        };
        let (crop, res) = (settings.vae_crop as usize, settings.resolution as usize);
        let finished = stage.run(&params, stop, report, |rng| {
            let x = random_crops(images, settings.vae.batch_size, crop, res, rng)?;
            vae_loss(&vae, &x, settings.kl_weight, rng)
        })?;
        if !finished {
            return Ok(interrupted(VAE_STAGE, &run_dir.join(VAE_STAGE)));
        }
        // Stable Diffusion's recipe: scale latents to unit variance for the denoiser. The posteriors are kept
        // for the UNet stage.
        let encoded = encode_all(&vae, images)?;
        let scale = 1.0 / latent_std(&encoded)?;
        posteriors = Some(encoded);
        let mut config = arch.vae.clone();
        config["scaling_factor"] = json!(scale);
        checkpoint::write_diffusers_folder(&vae_dir, &config, &params.snapshot()?)?;
    }

    // 2b. The decoder alone (Stable Diffusion's fine-tuned-decoder VAEs did the same): the encoder, and so the
    //     latents the UNet learns, stay as they are, while the decoder learns to render them in their exact
    //     colours. Run after the UNet too, it changes nothing the UNet depends on. Its last checkpoint is
    //     its record: rerunning the command rewrites the same decoder.
    if settings.vae_decoder.steps > 0 {
        let weights = format!("{DIFFUSERS_STEM}.safetensors");
        let config = checkpoint::read_json(&vae_dir, "config.json")?;
        let cfg: AutoencoderKLConfig =
            serde_json::from_value(config.clone()).map_err(|e| Error::config(vae_dir.join("config.json"), e))?;
        let (all, params) =
            Params::split(on_device(checkpoint::read_tensors(&vae_dir, &weights)?, device)?, is_decoder)?;
        let vae = AutoencoderKL::new(cfg, VarBuilder::from_tensors(all.clone(), DType::F32, device))?;
        let stage = Stage {
            name: VAE_DECODER_STAGE,
            dir: run_dir.join(VAE_DECODER_STAGE),
            settings: &settings.vae_decoder,
            seed: settings.seed.wrapping_add(VAE_DECODER_SEED_OFFSET),
            checkpointing_steps: settings.checkpointing_steps,
        };
        // Images and their posteriors, loaded at the first step (none when the stage is already done).
        let mut encoded = None;
        let finished = stage.run(&params, stop, report, |rng| {
            load_targets(&mut targets)?;
            let images = targets.as_deref().unwrap_or_default();
            if encoded.is_none() && posteriors.is_none() {
                encoded = Some(encode_all(&vae, images)?);
            }
            let latents = encoded.as_deref().or(posteriors.as_deref()).unwrap_or_default();
            decoder_loss(&vae, latents, images, settings.vae_decoder.batch_size, settings.vae_crop as usize, rng)
        })?;
        if !finished {
            return Ok(interrupted(VAE_DECODER_STAGE, &run_dir.join(VAE_DECODER_STAGE)));
        }
        let mut tensors = all;
        tensors.extend(params.snapshot()?);
        checkpoint::write_diffusers_folder(&vae_dir, &config, &tensors)?;
        if posteriors.is_none() {
            posteriors = encoded;
        }
    }

    // 3. The UNet.
    let unet_dir = model_dir.join("unet");
    if !is_complete(&unet_dir, &format!("{DIFFUSERS_STEM}.safetensors")) {
        load_targets(&mut targets)?;
        let images = targets.as_deref().unwrap_or_default();
        let vae = AutoencoderKL::load(&vae_dir, DType::F32, device)?;
        let scaling_factor = vae.config().scaling_factor;
        let posteriors = match posteriors.take() {
            Some(p) => p,
            None => encode_all(&vae, images)?,
        };
        drop(vae);
        let tokenizer = ClipTokenizer::from_dir(&model_dir.join("tokenizer"))?;
        let text_dir = model_dir.join("text_encoder");
        let text_tensors = on_device(checkpoint::read_tensors(&text_dir, TEXT_WEIGHTS)?, device)?;
        let (text_all, text_params) = Params::split(text_tensors, |_| settings.train_text_encoder)?;
        let text_encoder =
            ClipTextModel::new(text_config.clone(), VarBuilder::from_tensors(text_all, DType::F32, device))?;
        let captions: BTreeSet<&str> =
            dataset.examples.iter().flat_map(|e| e.captions.iter().map(String::as_str)).chain([""]).collect();
        // Token ids per caption; with a frozen encoder, its embeddings too (computed once).
        let mut ids = HashMap::new();
        let mut text = HashMap::new();
        for c in captions {
            let caption = [c.to_string()];
            ids.insert(c.to_string(), token_ids(&tokenizer, &caption, device)?.squeeze(0)?);
            if !settings.train_text_encoder {
                text.insert(c.to_string(), encode_prompts(&tokenizer, &text_encoder, &caption, device)?.squeeze(0)?);
            }
        }
        let scheduler = SchedulerConfig::from_file(model_dir.join("scheduler"))?;
        let objective = Objective::from_scheduler_config(&scheduler)?;
        let cfg: UNet2DConditionConfig =
            serde_json::from_value(arch.unet.clone()).map_err(|e| Error::Invalid(format!("UNet config: {e}")))?;
        let init =
            scratch::draw(settings.seed.wrapping_add(UNET_SEED_OFFSET), |vb| UNet2DConditionModel::new(&cfg, vb))?;
        let (all, unet_params) = Params::split(on_device(init, device)?, |_| true)?;
        let unet = UNet2DConditionModel::new(&cfg, VarBuilder::from_tensors(all, DType::F32, device))?;
        let params = unet_params.clone().merged(text_params.clone(), TEXT_PARAMS_PREFIX);
        let stage = Stage {
            name: UNET_STAGE,
            dir: run_dir.join(UNET_STAGE),
            settings: &settings.unet,
            seed: settings.seed.wrapping_add(UNET_SEED_OFFSET),
            checkpointing_steps: settings.checkpointing_steps,
        };
        let b = settings.unet.batch_size;
        let finished = stage.run(&params, stop, report, |rng| {
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
                match text.get(caption) {
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
            let latents =
                (DiagonalGaussian { mean, logvar }.sample_with_noise(&draws.posterior_noise)? * scaling_factor)?;
            let noisy = objective.schedule.add_noise(&latents, &draws.noise, &draws.timesteps)?;
            let t: Vec<f32> = draws.timesteps.iter().map(|&t| t as f32).collect();
            let t = Tensor::from_vec(t, b, device)?;
            let pred = unet.forward(&noisy, &t, &text, None)?;
            let target = match objective.prediction_type {
                PredictionType::VPrediction => objective.schedule.velocity(&latents, &draws.noise, &draws.timesteps)?,
                _ => draws.noise.clone(),
            };
            let squared = (pred - target)?.sqr()?;
            match settings.snr_gamma {
                None => Ok(squared.mean_all()?),
                Some(gamma) => {
                    let weights = min_snr_weights(&objective, &draws.timesteps, gamma, device)?;
                    Ok(squared.flatten_from(1)?.mean(1)?.mul(&weights)?.mean_all()?)
                }
            }
        })?;
        if !finished {
            return Ok(interrupted(UNET_STAGE, &run_dir.join(UNET_STAGE)));
        }
        // The encoder first: the UNet folder marks the stage done.
        if settings.train_text_encoder {
            checkpoint::write_folder(
                &text_dir,
                &[
                    Entry::Json("config.json", &arch.text_encoder),
                    Entry::Tensors(TEXT_WEIGHTS, &text_params.snapshot()?),
                ],
            )?;
        }
        checkpoint::write_diffusers_folder(&unet_dir, &arch.unet, &unet_params.snapshot()?)?;
    }
    Ok(BaseEnd::Finished)
}

/// Per-sample min-SNR weights (B,): SNR(t) = ᾱ_t / (1 − ᾱ_t); min(SNR, γ) / SNR for ε-prediction,
/// min(SNR, γ) / (SNR + 1) for v-prediction (diffusers' `compute_snr` and `--snr_gamma`).
fn min_snr_weights(objective: &Objective, timesteps: &[usize], gamma: f64, device: &Device) -> Result<Tensor> {
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

/// `model_index.json` and `scheduler/scheduler_config.json`: what makes the parts one pipeline folder.
fn write_pipeline_files(model_dir: &Path, arch: &Architecture) -> Result<()> {
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", arch.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [null, null],
        "feature_extractor": [null, null],
        "requires_safety_checker": false
    });
    let index_path = model_dir.join("model_index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Invalid(e.to_string()))? + "\n";
    write_text(&index_path, &text)?;
    checkpoint::write_folder(
        &model_dir.join("scheduler"),
        &[Entry::Json(crate::schedulers::SCHEDULER_CONFIG_FILE, &arch.scheduler)],
    )
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::io::atomic::write_atomic(path, |tmp| std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e)))
}

/// A part's folder has its config and weights (folders are written whole, by rename).
fn is_complete(dir: &Path, weights: &str) -> bool {
    dir.join("config.json").is_file() && dir.join(weights).is_file()
}

fn interrupted(stage: &'static str, dir: &Path) -> BaseEnd {
    let step = checkpoint::list(dir).ok().and_then(|l| l.last().map(|(s, _)| *s)).unwrap_or(0);
    BaseEnd::Interrupted { stage, step }
}

/// `batch` random `crop`-sized squares of random images (each (3, res, res)).
fn random_crops(images: &[Tensor], batch: usize, crop: usize, res: usize, rng: &mut TorchGenerator) -> Result<Tensor> {
    let picks = rng.randint(0, images.len() as i64, batch);
    let offsets = rng.randint(0, (res - crop + 1) as i64, 2 * batch);
    let crops = picks
        .iter()
        .zip(offsets.chunks(2))
        .map(|(&i, yx)| images[i as usize].narrow(1, yx[0] as usize, crop)?.narrow(2, yx[1] as usize, crop))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&crops, 0)?)
}

/// Reconstruction MSE of a posterior sample's decoding + `kl_weight` × the KL divergence from N(0, 1), both
/// means over elements.
fn vae_loss(vae: &AutoencoderKL, x: &Tensor, kl_weight: f64, rng: &mut TorchGenerator) -> Result<Tensor> {
    let posterior = vae.encode(x)?;
    let noise = rng.randn_tensor(posterior.mean.dims(), x.device())?;
    let recon = vae.decode(&posterior.sample_with_noise(&noise)?)?;
    let reconstruction = (recon - x)?.sqr()?.mean_all()?;
    // KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²) per element.
    let kl = ((posterior.mean.sqr()? + posterior.logvar.exp()?)? - (&posterior.logvar + 1.0)?)?.mean_all()?;
    Ok((reconstruction + (kl * (0.5 * kl_weight))?)?)
}

/// The decoder's tensors (and the 1×1 convolution in front of it): what the decoder stage trains.
fn is_decoder(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// Reconstruction MSE of the decoder alone: `batch` random `crop`-px squares of random images against the
/// decoding of the matching latent squares, sampled from the (fixed) posteriors.
fn decoder_loss(
    vae: &AutoencoderKL,
    posteriors: &[(Tensor, Tensor)],
    images: &[Tensor],
    batch: usize,
    crop: usize,
    rng: &mut TorchGenerator,
) -> Result<Tensor> {
    let factor = images[0].dim(1)? / posteriors[0].0.dim(1)?;
    let (latent_crop, latent_res) = (crop / factor, posteriors[0].0.dim(1)?);
    let picks = rng.randint(0, images.len() as i64, batch);
    let offsets = rng.randint(0, (latent_res - latent_crop + 1) as i64, 2 * batch);
    let mut means = Vec::with_capacity(batch);
    let mut logvars = Vec::with_capacity(batch);
    let mut targets = Vec::with_capacity(batch);
    for (&i, yx) in picks.iter().zip(offsets.chunks(2)) {
        let (y, x) = (yx[0] as usize, yx[1] as usize);
        let (mean, logvar) = &posteriors[i as usize];
        means.push(mean.narrow(1, y, latent_crop)?.narrow(2, x, latent_crop)?);
        logvars.push(logvar.narrow(1, y, latent_crop)?.narrow(2, x, latent_crop)?);
        targets.push(images[i as usize].narrow(1, y * factor, crop)?.narrow(2, x * factor, crop)?);
    }
    let posterior = DiagonalGaussian { mean: Tensor::stack(&means, 0)?, logvar: Tensor::stack(&logvars, 0)? };
    let noise = rng.randn_tensor(posterior.mean.dims(), posterior.mean.device())?;
    let recon = vae.decode(&posterior.sample_with_noise(&noise)?)?;
    Ok((recon - Tensor::stack(&targets, 0)?)?.sqr()?.mean_all()?)
}

/// Posterior means and log-variances of every image, (4, h, w) each, off the graph.
fn encode_all(vae: &AutoencoderKL, images: &[Tensor]) -> Result<Vec<(Tensor, Tensor)>> {
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
        return Err(Error::Invalid(format!("the trained VAE's latents have variance {var}: training diverged")));
    }
    Ok(var.sqrt())
}

/// One optimisation stage: AdamW with warm-up and clipping over the loss `step` computes.
struct Stage<'a> {
    name: &'static str,
    dir: PathBuf,
    settings: &'a StageSettings,
    seed: u64,
    checkpointing_steps: u64,
}

/// Global gradient norm clip, as the text-to-image scripts default to.
const MAX_GRAD_NORM: f64 = 1.0;

impl Stage<'_> {
    /// Runs to `settings.steps` (resuming from the newest valid checkpoint); false when stopped.
    fn run(
        &self,
        params: &Params,
        stop: &AtomicBool,
        report: &mut dyn FnMut(&StageReport),
        mut loss_of: impl FnMut(&mut TorchGenerator) -> Result<Tensor>,
    ) -> Result<bool> {
        let adamw = AdamWConfig { lr: self.settings.learning_rate, weight_decay: 0.0, ..AdamWConfig::default() };
        let mut optimizer = AdamW::new(adamw);
        let mut rng = TorchGenerator::new(self.seed);
        let mut step = 0u64;
        let mut ema = None;
        let mut saved_at = None;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let log = self.dir.join(super::trainer::LOSS_LOG);
        let (found, skipped) = checkpoint::latest_valid(&self.dir)?;
        for line in skipped {
            tracing::warn!("{line}");
        }
        if let Some((_, dir)) = found {
            let state: StageState = serde_json::from_value(checkpoint::read_json(&dir, CK_STATE)?)
                .map_err(|e| Error::config(dir.join(CK_STATE), e))?;
            // The step count may change (to extend or shorten a run), and an average may be started; what
            // shapes each step may not.
            let shape = |s: &StageSettings| StageSettings { steps: 0, ema_decay: None, ..s.clone() };
            if shape(&state.settings) != shape(self.settings) {
                return Err(Error::Invalid(format!(
                    "cannot resume the {} stage from {}: it was trained with {:?}, now {:?}",
                    self.name,
                    dir.display(),
                    state.settings,
                    self.settings
                )));
            }
            params.load(&checkpoint::read_tensors(&dir, CK_PARAMS)?, &dir)?;
            let device = params.iter().next().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
            let moments = checkpoint::read_tensors(&dir, CK_OPTIMIZER)?
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&device)?)))
                .collect::<Result<TensorMap>>()?;
            optimizer = AdamW::from_state(&moments, &state.optimizer, &dir)?;
            optimizer.config = adamw;
            rng = TorchGenerator::from_state(&state.rng)?;
            step = state.step;
            saved_at = Some(step);
            if let (Some(decay), Some(updates)) = (self.settings.ema_decay, state.ema_updates) {
                let shadow = checkpoint::read_tensors(&dir, CK_EMA)?;
                ema = Some(Ema::from_state(params, decay, updates, shadow, &dir.join(CK_EMA))?);
            }
            validation::truncate_log(&log, step)?;
        } else if log.exists() {
            validation::truncate_log(&log, 0)?;
        }
        // A new run, or a resumed one that kept no average, starts the average here.
        if let (None, Some(decay)) = (&ema, self.settings.ema_decay) {
            if step > 0 {
                tracing::info!("the {} stage starts its weight average at step {step}", self.name);
            }
            ema = Some(Ema::new(params, decay)?);
        }
        let save = |step: u64, optimizer: &AdamW, rng: &TorchGenerator, ema: Option<&Ema>| -> Result<()> {
            let (moments, steps) = optimizer.state();
            let state = StageState {
                step,
                rng: rng.state(),
                optimizer: steps,
                settings: self.settings.clone(),
                ema_updates: ema.map(Ema::updates),
            };
            let state = serde_json::to_value(state).map_err(|e| Error::Invalid(e.to_string()))?;
            let snapshot = params.snapshot()?;
            let mut entries = vec![
                Entry::Tensors(CK_PARAMS, &snapshot),
                Entry::Tensors(CK_OPTIMIZER, &moments),
                Entry::Json(CK_STATE, &state),
            ];
            if let Some(ema) = ema {
                entries.push(Entry::Tensors(CK_EMA, ema.shadow()));
            }
            checkpoint::save(&self.dir, step, &entries, Some(2))?;
            Ok(())
        };
        while step < self.settings.steps {
            if stop.load(Ordering::SeqCst) {
                save(step, &optimizer, &rng, ema.as_ref())?;
                return Ok(false);
            }
            let started = Instant::now();
            let loss = loss_of(&mut rng)?;
            let value: f32 = loss.to_dtype(DType::F32)?.to_scalar()?;
            if !value.is_finite() {
                return Err(Error::Invalid(format!("the {} stage's loss is {value} at step {step}", self.name)));
            }
            let mut grads = Grads::default();
            grads.accumulate(params, &loss.backward()?, 1.0)?;
            let grad_norm = grads.clip_norm(MAX_GRAD_NORM)?;
            let lr = warmup_lr(self.settings.learning_rate, self.settings.warmup_steps, step as usize);
            optimizer.step(params, &grads, lr)?;
            if let Some(ema) = ema.as_mut() {
                ema.update(params)?;
            }
            step += 1;
            validation::append_jsonl(&log, &LossRecord { step, loss: value, lr, grad_norm, epoch: 0 })?;
            let seconds = started.elapsed().as_secs_f64();
            report(&StageReport {
                stage: self.name,
                step,
                steps: self.settings.steps,
                loss: value,
                samples_per_second: self.settings.batch_size as f64 / seconds.max(1e-9),
            });
            if self.checkpointing_steps > 0 && step.is_multiple_of(self.checkpointing_steps) {
                save(step, &optimizer, &rng, ema.as_ref())?;
                saved_at = Some(step);
            }
        }
        // The last step is always checkpointed: it is the stage's record, and a longer run can go on from it.
        if saved_at != Some(step) {
            save(step, &optimizer, &rng, ema.as_ref())?;
        }
        // What the caller writes out: the average, when one was kept.
        if let Some(ema) = &ema {
            params.load(ema.shadow(), &self.dir)?;
        }
        let records = validation::read_loss_log(&log)?;
        let curve = self.dir.join(super::trainer::LOSS_CURVE);
        crate::io::images::save_png(&curve, &validation::loss_curve(&records), &[])?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::circles;

    /// A base small enough to train in a test: the demo's layout with fewer channels.
    fn tiny() -> (Architecture, BaseSettings) {
        let mut arch = Architecture::demo();
        arch.vae["block_out_channels"] = json!([8, 8, 16, 16]);
        arch.vae["norm_num_groups"] = json!(4);
        arch.unet["block_out_channels"] = json!([16, 16, 32]);
        arch.unet["norm_num_groups"] = json!(8);
        let stage =
            |steps, ema_decay| StageSettings { steps, batch_size: 2, learning_rate: 1e-3, warmup_steps: 0, ema_decay };
        let settings = BaseSettings {
            resolution: 32,
            vae: stage(3, None),
            vae_decoder: stage(2, None),
            vae_crop: 16,
            unet: stage(4, Some(0.9)),
            checkpointing_steps: 2,
            ..BaseSettings::default()
        };
        (arch, settings)
    }

    /// A temporary folder with a 3-sample, 32-px circles dataset in it.
    fn three_circles() -> (tempfile::TempDir, Dataset) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        circles::write_dataset(&data, 3, 32, 0, &mut || {}).unwrap();
        let dataset = Dataset::open(&data).unwrap();
        (tmp, dataset)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for part in ["vae", "unet", "text_encoder"] {
            for entry in std::fs::read_dir(dir.join(part)).unwrap() {
                let p = entry.unwrap().path();
                out.push((format!("{part}/{}", p.file_name().unwrap().to_string_lossy()), std::fs::read(p).unwrap()));
            }
        }
        out.sort();
        out
    }

    /// The model folder loads as a pipeline; a run stopped midway and resumed gives the same bytes as one
    /// uninterrupted run.
    #[test]
    fn trains_loads_and_resumes_exactly() {
        let (tmp, dataset) = three_circles();
        let (arch, settings) = tiny();
        let dev = Device::Cpu;

        let a = tmp.path().join("a");
        let never = AtomicBool::new(false);
        let end = train_base(&dataset, &a, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
        assert_eq!(end, BaseEnd::Finished);
        let sd = crate::pipeline::StableDiffusion::load(&a.join(MODEL_DIR), DType::F32, &dev).unwrap();
        assert_eq!(sd.vae_scale_factor(), 8);
        let sf = sd.vae.config().scaling_factor;
        assert!(sf.is_finite() && sf > 0.0 && sf != 1.0, "scaling factor {sf}");
        let log = validation::read_loss_log(&a.join(UNET_STAGE).join(super::super::trainer::LOSS_LOG)).unwrap();
        assert_eq!(log.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3, 4]);

        // Stopped at the UNet's step 3 (the flag is raised from the progress callback), then resumed.
        let b = tmp.path().join("b");
        let stop = AtomicBool::new(false);
        let end = train_base(&dataset, &b, &arch, &settings, &dev, &stop, &mut |r| {
            if r.stage == UNET_STAGE && r.step == 3 {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
        assert_eq!(end, BaseEnd::Interrupted { stage: UNET_STAGE, step: 3 });
        assert!(!b.join(MODEL_DIR).join("unet").exists());
        let end = train_base(&dataset, &b, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
        assert_eq!(end, BaseEnd::Finished);
        assert!(files(&a.join(MODEL_DIR)) == files(&b.join(MODEL_DIR)), "resumed run differs");
    }

    /// The decoder stage trains the decoder alone: the encoder (so the latents the UNet learned) and the
    /// scaling factor are the VAE stage's; running the finished command again writes the same decoder.
    #[test]
    fn the_decoder_stage_keeps_the_encoder() {
        let (tmp, dataset) = three_circles();
        let (arch, settings) = tiny();
        let (dev, never) = (Device::Cpu, AtomicBool::new(false));
        let run = tmp.path().join("run");
        train_base(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
        let weights = format!("{DIFFUSERS_STEM}.safetensors");
        let vae_dir = run.join(MODEL_DIR).join("vae");
        let written = checkpoint::read_tensors(&vae_dir, &weights).unwrap();
        let vae_stage = checkpoint::checkpoint_dir(&run.join(VAE_STAGE), settings.vae.steps);
        let before = checkpoint::read_tensors(&vae_stage, CK_PARAMS).unwrap();
        let decoder_stage = checkpoint::checkpoint_dir(&run.join(VAE_DECODER_STAGE), settings.vae_decoder.steps);
        let after = checkpoint::read_tensors(&decoder_stage, CK_PARAMS).unwrap();
        assert!(!after.is_empty() && after.keys().all(|k| is_decoder(k)), "{:?}", after.keys());
        let same = |a: &Tensor, b: &Tensor| max_diff(a, b) == 0.0;
        let mut moved = 0;
        for (name, w) in &written {
            if is_decoder(name) {
                assert!(same(w, &after[name]), "{name} is not the decoder stage's");
                moved += usize::from(!same(w, &before[name]));
            } else {
                assert!(same(w, &before[name]), "{name} changed");
            }
        }
        assert!(moved > after.len() / 2, "only {moved} of {} decoder tensors trained", after.len());
        let log =
            validation::read_loss_log(&run.join(VAE_DECODER_STAGE).join(super::super::trainer::LOSS_LOG)).unwrap();
        assert_eq!(log.len(), settings.vae_decoder.steps as usize);

        let config = std::fs::read(vae_dir.join("config.json")).unwrap();
        let bytes = std::fs::read(vae_dir.join(&weights)).unwrap();
        train_base(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
        assert!(std::fs::read(vae_dir.join(&weights)).unwrap() == bytes);
        assert!(std::fs::read(vae_dir.join("config.json")).unwrap() == config);
    }

    /// With an average kept, the model folder holds the average (as the last checkpoint has it), not the last
    /// step's weights; without one, the last step's weights.
    #[test]
    fn the_weight_average_is_what_is_written() {
        let (tmp, dataset) = three_circles();
        let (arch, settings) = tiny();
        let (dev, never) = (Device::Cpu, AtomicBool::new(false));
        let run = tmp.path().join("run");
        train_base(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
        let last = checkpoint::checkpoint_dir(&run.join(UNET_STAGE), settings.unet.steps);
        let state: StageState = serde_json::from_value(checkpoint::read_json(&last, CK_STATE).unwrap()).unwrap();
        assert_eq!(state.ema_updates, Some(settings.unet.steps));
        let (average, raw) =
            (checkpoint::read_tensors(&last, CK_EMA).unwrap(), checkpoint::read_tensors(&last, CK_PARAMS).unwrap());
        let written =
            checkpoint::read_tensors(&run.join(MODEL_DIR).join("unet"), &format!("{DIFFUSERS_STEM}.safetensors"))
                .unwrap();
        let mut moved = 0;
        for (name, w) in &written {
            assert_eq!(max_diff(w, &average[name]), 0.0, "{name} is not the average");
            if max_diff(w, &raw[name]) > 0.0 {
                moved += 1;
            }
        }
        assert!(moved > written.len() / 2, "only {moved} of {} tensors differ from the raw weights", written.len());

        let plain = tmp.path().join("plain");
        let no_average = BaseSettings { unet: StageSettings { ema_decay: None, ..settings.unet.clone() }, ..settings };
        train_base(&dataset, &plain, &arch, &no_average, &dev, &never, &mut |_| {}).unwrap();
        let last = checkpoint::checkpoint_dir(&plain.join(UNET_STAGE), no_average.unet.steps);
        assert!(!last.join(CK_EMA).exists());
        let raw = checkpoint::read_tensors(&last, CK_PARAMS).unwrap();
        let written =
            checkpoint::read_tensors(&plain.join(MODEL_DIR).join("unet"), &format!("{DIFFUSERS_STEM}.safetensors"))
                .unwrap();
        for (name, w) in &written {
            assert_eq!(max_diff(w, &raw[name]), 0.0, "{name}");
        }

        // A finished run without an average, extended with one: the average starts where it resumes.
        std::fs::remove_dir_all(plain.join(MODEL_DIR).join("unet")).unwrap();
        let longer = BaseSettings { unet: StageSettings { steps: 6, ..settings.unet.clone() }, ..no_average };
        train_base(&dataset, &plain, &arch, &longer, &dev, &never, &mut |_| {}).unwrap();
        let last = checkpoint::checkpoint_dir(&plain.join(UNET_STAGE), 6);
        let state: StageState = serde_json::from_value(checkpoint::read_json(&last, CK_STATE).unwrap()).unwrap();
        assert_eq!(state.ema_updates, Some(2));
    }

    /// By default the text encoder trains with the UNet and is written back in f32; frozen, it stays the seeded
    /// f16 initialisation.
    #[test]
    fn the_text_encoder_trains_unless_frozen() {
        let (tmp, dataset) = three_circles();
        let (arch, settings) = tiny();
        let (dev, never) = (Device::Cpu, AtomicBool::new(false));
        let text =
            |run: &Path| checkpoint::read_tensors(&run.join(MODEL_DIR).join("text_encoder"), TEXT_WEIGHTS).unwrap();
        let frozen = tmp.path().join("frozen");
        let settings_frozen = BaseSettings { train_text_encoder: false, ..settings.clone() };
        train_base(&dataset, &frozen, &arch, &settings_frozen, &dev, &never, &mut |_| {}).unwrap();
        let trained = tmp.path().join("trained");
        train_base(&dataset, &trained, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
        let (before, after) = (text(&frozen), text(&trained));
        assert_eq!(before.len(), after.len());
        let mut unchanged = Vec::new();
        for (name, init) in &before {
            assert_eq!(init.dtype(), DType::F16, "{name}");
            assert_eq!(after[name].dtype(), DType::F32, "{name}");
            if max_diff(&init.to_dtype(DType::F32).unwrap(), &after[name]) == 0.0 {
                unchanged.push(name.clone());
            }
        }
        // Every tensor got a gradient and moved (a silently untrained tensor is the known trap).
        assert!(unchanged.is_empty(), "not trained: {unchanged:?}");
        // The trained pipeline loads.
        crate::pipeline::StableDiffusion::load(&trained.join(MODEL_DIR), DType::F32, &dev).unwrap();
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let (_, settings) = tiny();
        let err = BaseSettings { vae_crop: 12, ..settings.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("--vae-crop"), "{err}");
        let err =
            BaseSettings { proportion_empty_prompts: 2.0, ..settings.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("--proportion-empty-prompts"), "{err}");
        let err = BaseSettings { snr_gamma: Some(-1.0), ..settings.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("--snr-gamma"), "{err}");
        let unet = StageSettings { ema_decay: Some(1.0), ..settings.unet.clone() };
        let err = BaseSettings { unet, ..settings.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("--unet-ema-decay"), "{err}");
        let err = BaseSettings { noise_offset: f64::NAN, ..settings }.validate().unwrap_err().to_string();
        assert!(err.contains("--noise-offset"), "{err}");
    }

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
