//! The training objective of diffusers' `train_controlnet.py` (and of the original `cldm.py`), one step:
//!
//! 1. latents = VAE posterior sample of the target × `scaling_factor` (`latent_dist.sample()`);
//! 2. noise ~ N(0, 1) of the latents' shape, one timestep per sample uniform in [0, num_train_timesteps);
//! 3. noisy latents = `add_noise(latents, noise, t)` (the training schedule of `scheduler_config.json`);
//! 4. the ControlNet reads (noisy latents, t, text embeddings, condition) and its residuals go into the locked
//!    UNet, whose prediction is compared with the noise (ε-prediction) or with v = √ᾱ·noise − √(1−ᾱ)·x0
//!    (v-prediction) by the mean squared error over every element, in f32.
//!
//! The random draws are made in the script's order from one torch-compatible generator: the posterior sample's
//! noise, the noise, the timesteps ([`Draws::draw`]), so a seed gives diffusers' draws.
use candle_core::{DType, Device, Tensor};

use crate::model::clip::ClipTextModel;
use crate::model::controlnet::{AddedConditions, ControlNetModel};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{AutoencoderKL, DiagonalGaussian};
use crate::pipeline::text_conditioning::{self, SdxlConditioning};
use crate::pipeline::StableDiffusion;
use crate::rng::TorchGenerator;
use crate::schedulers::schedule::{BetaConfig, NoiseSchedule, PredictionType};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// A batch at training resolution.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Targets (B, 3, H, W) in [−1, 1].
    pub pixel_values: Tensor,
    /// Conditions (B, C, H, W) in [0, 1].
    pub condition: Tensor,
    /// Captions after prompt dropping ("" for a dropped one).
    pub prompts: Vec<String>,
}

/// The random numbers of one step.
#[derive(Debug, Clone)]
pub struct Draws {
    /// N(0, 1) of the latents' shape for the posterior sample.
    pub posterior_noise: Tensor,
    /// The noise added to the latents (and, for ε-prediction, the target).
    pub noise: Tensor,
    /// One training timestep per sample.
    pub timesteps: Vec<usize>,
}

impl Draws {
    /// Draws in diffusers' order: `latent_dist.sample()`, `randn_like(latents)`, `randint(0, T, (bsz,))`.
    pub fn draw(
        rng: &mut TorchGenerator,
        latent_shape: &[usize],
        num_train_timesteps: usize,
        device: &Device,
    ) -> Result<Self> {
        let posterior_noise = rng.randn_tensor(latent_shape, device)?;
        let noise = rng.randn_tensor(latent_shape, device)?;
        let timesteps =
            rng.randint(0, num_train_timesteps as i64, latent_shape[0]).into_iter().map(|t| t as usize).collect();
        Ok(Self { posterior_noise, noise, timesteps })
    }
}

/// What one step computed.
pub struct StepOutput {
    /// The scalar loss, attached to the graph (call `backward` on it).
    pub loss: Tensor,
    pub model_pred: Tensor,
}

/// The parts of the objective fixed for a run: the training noise schedule, what the UNet predicts, and
/// whether only the mid residual reaches the UNet.
#[derive(Debug, Clone)]
pub struct Objective {
    pub schedule: NoiseSchedule,
    pub prediction_type: PredictionType,
    /// The original repo's `only_mid_control`: the UNet gets only the mid-block residual (its down residuals
    /// are zero, so the ControlNet's down zero convolutions receive no gradient).
    pub only_mid_control: bool,
    /// Mixed precision: the ControlNet's products (forward and backward) on the bf16 kernels, as PyTorch's autocast
    /// runs the trained model ([`crate::model::ops::bf16::autocast`]).
    pub autocast: bool,
}

impl Objective {
    /// The DDPM training schedule of `scheduler_config.json` (diffusers builds `DDPMScheduler.from_pretrained`
    /// from the model's scheduler config, whatever its class): betas, `prediction_type`,
    /// `rescale_betas_zero_snr`.
    pub fn from_scheduler_config(config: &SchedulerConfig) -> Result<Self> {
        let mut values = serde_json::Map::new();
        for key in ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"] {
            if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
                values.insert(key.into(), v.clone());
            }
        }
        let betas: BetaConfig = serde_json::from_value(values.into()).map_err(|e| Error::config(&config.path, e))?;
        let prediction_type = match config.get("prediction_type").filter(|v| !v.is_null()) {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| Error::config(&config.path, e))?,
            None => PredictionType::Epsilon,
        };
        if prediction_type == PredictionType::Sample {
            return Err(Error::config(
                &config.path,
                "prediction_type \"sample\" is not trained by train_controlnet.py (epsilon or v_prediction)",
            ));
        }
        let rescale = config.get("rescale_betas_zero_snr").and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Self {
            schedule: NoiseSchedule::new(&betas, rescale)?,
            prediction_type,
            only_mid_control: false,
            autocast: false,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }

    /// The loss of one batch. `posterior`: the VAE posterior of the targets (computed now or cached);
    /// `text`: the caption embeddings (B, 77, D); `added`: SDXL's pooled text and size/crop ids (None for SD
    /// 1.x/2.x); `condition`: (B, C, H, W) in [0, 1].
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        controlnet: &ControlNetModel,
        unet: &UNet2DConditionModel,
        posterior: &DiagonalGaussian,
        scaling_factor: f64,
        text: &Tensor,
        added: Option<&AddedConditions>,
        condition: &Tensor,
        draws: &Draws,
    ) -> Result<StepOutput> {
        // 1. latents
        let latents = (posterior.sample_with_noise(&draws.posterior_noise)? * scaling_factor)?;
        // 2.-3. forward diffusion
        let noisy = self.schedule.add_noise(&latents, &draws.noise, &draws.timesteps)?;
        let t: Vec<f32> = draws.timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, draws.timesteps.len(), latents.device())?;
        // 4. ControlNet → locked UNet
        let mut residuals = crate::model::ops::bf16::autocast::scope(self.autocast, || {
            let hint = controlnet.embed_condition(condition)?;
            controlnet.forward_with(&noisy, &t, text, added, &hint, 1.0, false)
        })?;
        if self.only_mid_control {
            residuals = residuals.mid_only()?;
        }
        let model_pred = unet.forward_with(&noisy, &t, text, added, Some(&residuals))?;
        let target = match self.prediction_type {
            PredictionType::Epsilon => draws.noise.clone(),
            PredictionType::VPrediction => self.schedule.velocity(&latents, &draws.noise, &draws.timesteps)?,
            PredictionType::Sample => unreachable!("refused by from_scheduler_config"),
        };
        let loss = (model_pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?.mean_all()?;
        Ok(StepOutput { loss, model_pred })
    }
}

/// The VAE posterior of targets (B, 3, H, W) in [−1, 1]; no graph is recorded (the VAE is frozen).
pub fn encode_targets(vae: &AutoencoderKL, pixel_values: &Tensor) -> Result<DiagonalGaussian> {
    let p = vae.encode(&pixel_values.detach())?;
    Ok(DiagonalGaussian { mean: p.mean.detach(), logvar: p.logvar.detach() })
}

/// The text side of a batch: the embeddings the UNet attends to and, for SDXL, the pooled text.
#[derive(Debug, Clone)]
pub struct CaptionEmbeddings {
    /// (B, 77, D).
    pub embeds: Tensor,
    /// SDXL: (B, projection width), the second encoder's pooled projection.
    pub pooled: Option<Tensor>,
}

impl CaptionEmbeddings {
    /// Rows of several batches, in order.
    pub fn cat(parts: &[&CaptionEmbeddings]) -> Result<Self> {
        let embeds = Tensor::cat(&parts.iter().map(|p| &p.embeds).collect::<Vec<_>>(), 0)?;
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|p| p.pooled.as_ref()).collect();
        let pooled = pooled.map(|p| Tensor::cat(&p, 0)).transpose()?;
        Ok(Self { embeds, pooled })
    }

    /// SDXL's added conditions as `train_controlnet_sdxl.py` feeds them: the pooled text and, per sample,
    /// `original_size + crops_coords_top_left + target_size` = (r, r, 0, 0, r, r) at resolution r (the script's
    /// defaults: every image is resized and centre-cropped to r × r). `None` for SD 1.x/2.x.
    pub fn added(&self, resolution: usize) -> Result<Option<AddedConditions>> {
        let Some(pooled) = &self.pooled else { return Ok(None) };
        let r = resolution as f32;
        let row = [r, r, 0.0, 0.0, r, r];
        let n = pooled.dim(0)?;
        let ids: Vec<f32> = (0..n).flat_map(|_| row).collect();
        let time_ids = Tensor::from_vec(ids, (n, row.len()), pooled.device())?.to_dtype(pooled.dtype())?;
        Ok(Some(AddedConditions { text_embeds: pooled.clone(), time_ids }))
    }
}

/// Caption embeddings for `sd`'s family: SD 1.x/2.x as [`encode_prompts`]; SDXL as the script's
/// `encode_prompt` (each tokenizer padding to its max length, both encoders' penultimate states side by side,
/// the second's pooled projection; an empty caption is encoded, not zeroed).
pub fn encode_captions(sd: &StableDiffusion, prompts: &[String], device: &Device) -> Result<CaptionEmbeddings> {
    if sd.sdxl.is_none() {
        let embeds = encode_prompts(&sd.tokenizer, &sd.text_encoder, prompts, device)?;
        return Ok(CaptionEmbeddings { embeds, pooled: None });
    }
    let mut rows = Vec::with_capacity(prompts.len());
    for p in prompts {
        // Unguided, plain syntax: the prompt's own rows (the size numbers are set in `added`).
        let t =
            text_conditioning::encode(sd, p, "", &SdxlConditioning::default(), (0, 0), 1, false, &Default::default())?;
        let pooled = t.cond_added.map(|a| a.text_embeds.detach());
        rows.push(CaptionEmbeddings { embeds: t.cond_embeds.detach(), pooled });
    }
    CaptionEmbeddings::cat(&rows.iter().collect::<Vec<_>>())
}

/// Text embeddings (B, 77, D) of captions: `text_encoder(input_ids)[0]` after padding to 77 tokens.
pub fn encode_prompts(
    tokenizer: &ClipTokenizer,
    text_encoder: &ClipTextModel,
    prompts: &[String],
    device: &Device,
) -> Result<Tensor> {
    let ids = token_ids(tokenizer, prompts, device)?;
    Ok(text_encoder.forward(&ids)?.detach())
}

/// Token ids (B, max_length), as the script's `tokenizer(..., padding="max_length", truncation=True)`.
pub fn token_ids(tokenizer: &ClipTokenizer, prompts: &[String], device: &Device) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(prompts.len() * tokenizer.max_length());
    for p in prompts {
        ids.extend(tokenizer.encode(p)?);
    }
    Ok(Tensor::from_vec(ids, (prompts.len(), tokenizer.max_length()), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::weights::read_json;
    use crate::pipeline::StableDiffusion;
    use crate::test_support::{max_abs, repo_path as repo};
    use crate::train::optimizer::{AdamW, AdamWConfig, Grads};
    use crate::train::params::{trainable_controlnet, unet_with_decoder, Params, TensorMap};

    fn load(rel: &str) -> TensorMap {
        candle_core::safetensors::load(repo(rel), &Device::Cpu).unwrap()
    }

    /// Every k-th element (k = ceil(n / 4096)) of the flattened tensor, as the fixture samples large ones.
    fn sampled(t: &Tensor) -> Tensor {
        let flat = t.flatten_all().unwrap();
        let n = flat.elem_count();
        let k = n.div_ceil(4096);
        let idx: Vec<u32> = (0..n).step_by(k).map(|i| i as u32).collect();
        flat.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0).unwrap()
    }

    struct Setup {
        sd: StableDiffusion,
        objective: Objective,
        posterior: DiagonalGaussian,
        text: Tensor,
        draws: Draws,
        fx: TensorMap,
        meta: serde_json::Value,
    }

    /// The fixture's batch through our tokenizer, text encoder and VAE, and our draws for its seed (checked equal
    /// to torch's).
    fn setup() -> Setup {
        let fx = load("tests/fixtures/train/step.safetensors");
        let meta: serde_json::Value = read_json(&repo("tests/fixtures/train/step.json")).unwrap();
        let sd = StableDiffusion::load(&repo("tests/fixtures/models/tiny-sd15"), DType::F32, &Device::Cpu).unwrap();
        let objective = Objective::from_scheduler_config(&sd.scheduler_config).unwrap();
        let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
        let ids = token_ids(&sd.tokenizer, &prompts, &Device::Cpu).unwrap();
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let want: Vec<Vec<i64>> = fx["input_ids"].to_vec2().unwrap();
        assert_eq!(ids, want.iter().map(|r| r.iter().map(|&v| v as u32).collect::<Vec<_>>()).collect::<Vec<_>>());
        let text = encode_prompts(&sd.tokenizer, &sd.text_encoder, &prompts, &Device::Cpu).unwrap();
        assert!(max_abs(&(&text - &fx["encoder_hidden_states"]).unwrap()) < 1e-4);
        let posterior = encode_targets(&sd.vae, &fx["pixel_values"]).unwrap();
        let seed = meta["seed"].as_u64().unwrap();
        let mut rng = TorchGenerator::new(seed);
        let draws = Draws::draw(&mut rng, &[2, 4, 8, 8], objective.num_train_timesteps(), &Device::Cpu).unwrap();
        for key in ["posterior_noise", "noise"] {
            let t = if key == "noise" { &draws.noise } else { &draws.posterior_noise };
            assert_eq!(max_abs(&(t - &fx[key]).unwrap()), 0.0, "{key}: our draws differ from torch's");
        }
        let t: Vec<i64> = fx["timesteps"].to_vec1().unwrap();
        assert_eq!(draws.timesteps, t.iter().map(|&v| v as usize).collect::<Vec<_>>());
        Setup { sd, objective, posterior, text, draws, fx, meta }
    }

    fn tiny_controlnet() -> (ControlNetModel, Params) {
        let dir = repo("tests/fixtures/models/tiny-controlnet-a");
        let config = read_json(&dir.join("config.json")).unwrap();
        let tensors = load("tests/fixtures/models/tiny-controlnet-a/diffusion_pytorch_model.safetensors");
        trainable_controlnet(&config, tensors, &Device::Cpu).unwrap()
    }

    /// One training step against diffusers' (tools/fixtures/gen_train.py: tiny-sd15 + tiny-controlnet-a, batch 2
    /// at 64 px, seed 1234, the second caption dropped):
    /// - the draws equal torch's for the same seed, bit for bit;
    /// - loss within 1e-5 relative;
    /// - EVERY ControlNet tensor has a finite gradient, and each gradient is within 1e-3 · max |torch's gradient
    ///   of that tensor| of torch's, element by element (f32 backprop through ControlNet + UNet; observed ~1e-5);
    /// - after clip_grad_norm_(1.0) and AdamW (diffusers' defaults, lr 1e-5) the change of every sampled weight is
    ///   within 5e-2 · lr + 2 ulp(w) of torch's change, and 99.9% of them within 1e-3 · lr + 2 ulp(w). (Adam's
    ///   first step is lr · g / (|g| + ε): for the few elements whose gradient is a few ε from zero it depends
    ///   on the gradient's last digits; observed worst 0.018 · lr. `optimizer.rs` checks AdamW itself to 1e-6.)
    #[test]
    fn one_step_matches_diffusers() {
        let s = setup();
        let (cn, params) = tiny_controlnet();
        let before = params.snapshot().unwrap();
        let scaling = s.sd.vae.config().scaling_factor;
        let out =
            s.objective.loss(&cn, &s.sd.unet, &s.posterior, scaling, &s.text, None, &s.fx["cond"], &s.draws).unwrap();
        let loss: f32 = out.loss.to_scalar().unwrap();
        let want = s.meta["loss"].as_f64().unwrap() as f32;
        assert!((loss - want).abs() <= 1e-5 * want.abs(), "loss {loss} vs {want}");
        let pred_diff = max_abs(&(&out.model_pred - &s.fx["model_pred"]).unwrap());
        assert!(pred_diff < 1e-4, "model_pred differs by {pred_diff}");

        let store = out.loss.backward().unwrap();
        let mut grads = Grads::default();
        grads.accumulate(&params, &store, 1.0).unwrap();
        assert_eq!(grads.len(), params.len());
        assert_eq!(params.len(), 170);
        let mut worst = (0f64, String::new());
        for name in params.names() {
            let g = grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
            let reference = &s.fx[&format!("grad.{name}")];
            let scale = max_abs(reference);
            assert!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()), "{name}");
            let rel = max_abs(&(g - reference).unwrap()) / scale.max(1e-30);
            assert!(rel <= 1e-3, "gradient of {name}: max difference {rel} of its largest value {scale}");
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        eprintln!("worst relative gradient difference: {} ({})", worst.0, worst.1);

        let norm = grads.clip_norm(1.0).unwrap();
        let want_norm = s.meta["grad_norm"].as_f64().unwrap();
        assert!((norm - want_norm).abs() <= 1e-4 * want_norm, "grad norm {norm} vs {want_norm}");
        let lr = s.meta["lr"].as_f64().unwrap();
        assert_update_matches(&params, &before, &grads, &s.fx, lr);
    }

    /// AdamW (diffusers' defaults) on clipped `grads` moves every sampled weight of `params` within 5e-2 · lr +
    /// 2 ulp(w) of torch's move (`fx`'s `updated.<name>`), and 99.9% of them within 1e-3 · lr + 2 ulp(w).
    fn assert_update_matches(params: &Params, before: &TensorMap, grads: &Grads, fx: &TensorMap, lr: f64) {
        AdamW::new(AdamWConfig { lr, ..Default::default() }).step(params, grads, lr).unwrap();
        let (mut total, mut loose) = (0usize, 0usize);
        for (name, var) in params.iter() {
            let old = sampled(&before[name]);
            let ours = (sampled(var.as_tensor()) - &old).unwrap().to_vec1::<f32>().unwrap();
            let theirs = (&fx[&format!("updated.{name}")] - &old).unwrap().to_vec1::<f32>().unwrap();
            let old = old.to_vec1::<f32>().unwrap();
            for ((a, b), w) in ours.iter().zip(&theirs).zip(&old) {
                // Two roundings of the new weight, plus a share of the LR.
                let ulps = 2.0 * f32::EPSILON * w.abs();
                let d = (a - b).abs();
                assert!(d <= 5e-2 * lr as f32 + ulps, "update of {name} differs by {} lr", d / lr as f32);
                loose += usize::from(d > 1e-3 * lr as f32 + ulps);
                total += 1;
            }
        }
        eprintln!("{loose} of {total} sampled updates differ by more than 1e-3 lr + 2 ulp");
        assert!(loose * 1000 <= total, "{loose} of {total} updates differ by more than 1e-3 lr");
    }

    /// Same step with the UNet's decoder trainable (`--unlock-decoder`) and with `--only-mid-control`: losses
    /// and the (sampled) gradient of every trainable tensor, same metric; under only-mid-control the down zero
    /// convolutions get no gradient, as in torch.
    #[test]
    fn unlocked_decoder_and_only_mid_control_match_diffusers() {
        let s = setup();
        let unet_dir = repo("tests/fixtures/models/tiny-sd15/unet");
        let unet_config = read_json(&unet_dir.join("config.json")).unwrap();
        for (case, unlock, mid_only) in [("unlocked", true, false), ("midonly", false, true)] {
            let fx = load(&format!("tests/fixtures/train/step_{case}.safetensors"));
            let unet_tensors = load("tests/fixtures/models/tiny-sd15/unet/diffusion_pytorch_model.safetensors");
            let (unet, unet_params) = unet_with_decoder(&unet_config, unet_tensors, unlock, &Device::Cpu).unwrap();
            let (cn, cn_params) = tiny_controlnet();
            let params = cn_params.merged(unet_params, "unet.");
            assert_eq!(params.len() as u64, s.meta[&format!("{case}.trainable")].as_u64().unwrap());
            let objective = Objective { only_mid_control: mid_only, ..s.objective.clone() };
            let scaling = s.sd.vae.config().scaling_factor;
            let out =
                objective.loss(&cn, &unet, &s.posterior, scaling, &s.text, None, &s.fx["cond"], &s.draws).unwrap();
            let loss: f32 = out.loss.to_scalar().unwrap();
            let want = s.meta[&format!("{case}.loss")].as_f64().unwrap() as f32;
            assert!((loss - want).abs() <= 1e-5 * want.abs(), "{case}: loss {loss} vs {want}");
            let mut grads = Grads::default();
            grads.accumulate(&params, &out.loss.backward().unwrap(), 1.0).unwrap();
            let no_grad: Vec<String> = serde_json::from_value(s.meta[&format!("{case}.no_grad")].clone()).unwrap();
            for name in params.names() {
                match (grads.get(name), fx.get(&format!("grad.{name}"))) {
                    (Some(g), Some(reference)) => {
                        let scale = max_abs(reference);
                        let rel = max_abs(&(sampled(g) - reference).unwrap()) / scale.max(1e-30);
                        assert!(rel <= 1e-3, "{case}: gradient of {name}: {rel}");
                    }
                    (None, None) => assert!(no_grad.contains(name), "{case}: {name}"),
                    // A zero-only gradient where torch has none would still be equal in effect only if it is
                    // zero; candle records none when the tensor does not reach the loss.
                    (g, r) => panic!("{case}: {name}: ours {:?}, torch's {:?}", g.is_some(), r.is_some()),
                }
            }
        }
    }

    /// One SDXL step against `train_controlnet_sdxl.py`'s (tools/fixtures/gen_train_sdxl.py: tiny-sdxl +
    /// tiny-controlnet-sdxl, gen_train.py's batch and seed): both encoders' caption states and the pooled text
    /// within 1e-4, the time ids (64, 64, 0, 0, 64, 64) exactly, the loss within 1e-5 relative, the prediction
    /// within 1e-4, every ControlNet gradient within 1e-3 · max |torch's gradient of that tensor|, and the AdamW
    /// update as in `one_step_matches_diffusers`.
    #[test]
    fn one_sdxl_step_matches_diffusers() {
        let fx = load("tests/fixtures/train/step_sdxl.safetensors");
        let batch = load("tests/fixtures/train/step.safetensors");
        let meta: serde_json::Value = read_json(&repo("tests/fixtures/train/step.json")).unwrap();
        let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
        let sd = StableDiffusion::load(&repo("tests/fixtures/models/tiny-sdxl"), DType::F32, &Device::Cpu).unwrap();
        let objective = Objective::from_scheduler_config(&sd.scheduler_config).unwrap();

        let text = encode_captions(&sd, &prompts, &Device::Cpu).unwrap();
        assert!(max_abs(&(&text.embeds - &fx["prompt_embeds"]).unwrap()) < 1e-4, "prompt embeds");
        let pooled = text.pooled.as_ref().expect("SDXL has pooled text");
        assert!(max_abs(&(pooled - &fx["pooled"]).unwrap()) < 1e-4, "pooled");
        let added = text.added(64).unwrap().unwrap();
        assert_eq!(max_abs(&(&added.time_ids - &fx["time_ids"]).unwrap()), 0.0, "time ids");

        let posterior = encode_targets(&sd.vae, &batch["pixel_values"]).unwrap();
        let mut rng = TorchGenerator::new(meta["seed"].as_u64().unwrap());
        let draws = Draws::draw(&mut rng, &[2, 4, 8, 8], objective.num_train_timesteps(), &Device::Cpu).unwrap();
        assert_eq!(max_abs(&(&draws.noise - &fx["noise"]).unwrap()), 0.0);

        let dir = repo("tests/fixtures/models/tiny-controlnet-sdxl");
        let config = read_json(&dir.join("config.json")).unwrap();
        let tensors = load("tests/fixtures/models/tiny-controlnet-sdxl/diffusion_pytorch_model.safetensors");
        let (cn, params) = trainable_controlnet(&config, tensors, &Device::Cpu).unwrap();
        let before = params.snapshot().unwrap();
        let scaling = sd.vae.config().scaling_factor;
        let out = objective
            .loss(&cn, &sd.unet, &posterior, scaling, &text.embeds, Some(&added), &batch["cond"], &draws)
            .unwrap();
        let loss: f32 = out.loss.to_scalar().unwrap();
        let want: f32 = fx["loss"].to_vec1::<f32>().unwrap()[0];
        assert!((loss - want).abs() <= 1e-5 * want.abs(), "loss {loss} vs {want}");
        assert!(max_abs(&(&out.model_pred - &fx["model_pred"]).unwrap()) < 1e-4, "model_pred");

        let store = out.loss.backward().unwrap();
        let mut grads = Grads::default();
        grads.accumulate(&params, &store, 1.0).unwrap();
        assert_eq!(grads.len(), params.len());
        for name in params.names() {
            let g = sampled(grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}")));
            let reference = &fx[&format!("grad.{name}")];
            let rel = max_abs(&(&g - reference).unwrap()) / max_abs(reference).max(1e-30);
            assert!(rel <= 1e-3, "gradient of {name}: max difference {rel} of its largest value");
        }
        // The pooled text and ids reach the ControlNet: its add_embedding gets a gradient.
        assert!(max_abs(grads.get("add_embedding.linear_1.weight").unwrap()) > 0.0);

        // The update: clip_grad_norm_(1.0) and AdamW, as the script.
        let norm = grads.clip_norm(1.0).unwrap();
        let want_norm = fx["grad_norm"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((norm - want_norm).abs() <= 1e-4 * want_norm, "grad norm {norm} vs {want_norm}");
        let lr = fx["lr"].to_vec1::<f32>().unwrap()[0] as f64;
        assert_update_matches(&params, &before, &grads, &fx, lr);
    }
}
