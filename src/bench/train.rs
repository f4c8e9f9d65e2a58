//! Speed and memory of one ControlNet training update at a full-size config, with random weights: what
//! `controlnet train` does per update once the latents and text embeddings are at hand (`--cache`). The
//! ControlNet trains (every tensor a `Var`), the UNet is locked.
//!
//! One update, as `train::Trainer::update` runs it:
//! 1. forward: hint embedding, ControlNet, then the UNet with its residuals, MSE against a target;
//! 2. backward: gradients of every ControlNet tensor (through the locked UNet);
//! 3. optimizer: `clip_grad_norm_` to 1, then AdamW.
//!
//! `tools/bench_torch.py --train` times diffusers' `train_controlnet.py` update on the same config with the same
//! JSON keys.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::random::RandomWeights;
use super::{
    flops, peak_rss_bytes, process_cpu_seconds, random_input, reset_peak_rss, Preset, RunInfo, Timing, TEXT_TOKENS,
};
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::request::ComputeDtype;
use crate::train::optimizer::{AdamW, AdamWConfig, Grads};
use crate::train::params::trainable_controlnet;
use crate::train::random_weights;
use crate::{Error, Result};

/// `--max-grad-norm`'s default in `controlnet train` and diffusers' script.
const MAX_GRAD_NORM: f64 = 1.0;
/// A mid-schedule timestep for the whole batch (the cost does not depend on it).
const TIMESTEP: f32 = 500.0;

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    pub preset: Preset,
    /// Latent height and width (pixels / 8): 32 for 256 px.
    pub latent: usize,
    /// Training batch.
    pub batch: usize,
    /// Timed updates after one warm-up (the first update also allocates AdamW's moments).
    pub iters: usize,
    pub seed: u64,
    /// Mixed precision as `controlnet train --dtype`: the locked UNet's weights in this dtype (bf16 or auto);
    /// the ControlNet keeps f32 weights and multiplies in bf16 (autocast).
    pub dtype: ComputeDtype,
}

/// Everything `controlnet bench --train --json` prints; the top-level `*_s` fields are medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBenchReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub mode: &'static str,
    /// Seconds to build the locked UNet and the trainable ControlNet.
    pub build_s: f64,
    pub trainable_parameters: usize,
    pub train_step_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// CPU seconds (all threads) of the median update.
    pub train_step_cpu_s: f64,
    /// Training samples per second (batch / median update).
    pub samples_per_s: f64,
    /// Peak resident memory of the run (VmHWM): weights, moments, gradients and the step's activations.
    pub peak_rss_bytes: u64,
    /// FLOPs of the forward pass (UNet + ControlNet + hint embedding, whole batch), in units of 1e9; the
    /// backward is about twice the trainable part's forward plus once the locked UNet's (input gradients only).
    pub forward_gflop: f64,
    /// Whether every update's loss and gradient norm were finite.
    pub finite: bool,
    pub timings: serde_json::Value,
}

/// Builds the preset's UNet (locked) and ControlNet (trainable) with random weights and times training updates.
pub fn run(opts: &TrainBenchOptions, mut progress: impl FnMut(&str)) -> Result<TrainBenchReport> {
    let zero =
        [("latent", opts.latent), ("batch", opts.batch), ("iters", opts.iters)].into_iter().find(|(_, v)| *v == 0);
    if let Some((setting, _)) = zero {
        return Err(Error::setting(setting, "must be at least 1"));
    }
    if opts.preset == Preset::Sdxl {
        return Err(Error::setting("preset", "the training bench builds sd15 or sd21 (no SDXL training bench yet)"));
    }
    let dev = Device::Cpu;
    // The same rule as a training run's (`TrainSettings::locked_dtype`, no unlocked decoder here).
    let settings = crate::train::settings::TrainSettings { dtype: opts.dtype, ..Default::default() };
    settings.validate()?;
    let locked_dtype = settings.locked_dtype(&dev);
    let mut run = RunInfo::start(opts.preset, opts.latent, opts.batch, opts.iters).with_dtype(locked_dtype);
    if locked_dtype != DType::F32 {
        run.kernels = format!("{} (the ControlNet's products too: autocast)", run.kernels);
    }
    let (s, b) = (opts.latent, opts.batch);
    let (unet_cfg, cn_cfg) = (opts.preset.unet_config(), opts.preset.controlnet_config());
    let per_image = |f: std::result::Result<f64, String>| f.map_err(|m| Error::Invalid(format!("FLOP count: {m}")));
    let forward_gflop = b as f64
        * (per_image(flops::unet(&unet_cfg, (s, s), TEXT_TOKENS))?
            + per_image(flops::controlnet(&cn_cfg, (s, s), TEXT_TOKENS))?
            + flops::controlnet_embedding(&cn_cfg, (8 * s, 8 * s)))
        / 1e9;

    // 1. models: the locked UNet straight from the random backend, the ControlNet as trainable Vars
    progress("building the locked UNet and the trainable ControlNet with random weights");
    reset_peak_rss();
    let start = Instant::now();
    let unet = UNet2DConditionModel::new(&unet_cfg, RandomWeights::new(opts.seed).var_builder(locked_dtype, &dev))?;
    let tensors = random_weights::draw(opts.seed, |vb| crate::model::controlnet::ControlNetModel::new(&cn_cfg, vb))?;
    let (controlnet, params) = trainable_controlnet(&cn_cfg, tensors, &dev)?;
    let build_s = start.elapsed().as_secs_f64();
    let mut optimizer = AdamW::new(AdamWConfig::default());

    // 2. inputs: noisy latents, one timestep for all, text embeddings, conditions, the target
    let width = unet_cfg.encoder.cross_attention_dim;
    let noisy = random_input(opts.seed, &[b, unet_cfg.encoder.in_channels, s, s], "sample")?;
    let t = Tensor::new(vec![TIMESTEP; b], &dev)?;
    let text = random_input(opts.seed, &[b, TEXT_TOKENS, width], "text")?;
    let cond = ((random_input(opts.seed, &[b, cn_cfg.conditioning_channels, 8 * s, 8 * s], "cond")? + 1.0)? * 0.5)?;
    let target = random_input(opts.seed, &[b, unet_cfg.encoder.in_channels, s, s], "target")?;

    // 3. updates
    let (mut forward, mut backward, mut optim, mut total, mut cpu) = (vec![], vec![], vec![], vec![], vec![]);
    let mut finite = true;
    for i in 0..=opts.iters {
        progress(&if i == 0 { "training update (warm-up)".to_string() } else { format!("update {i}/{}", opts.iters) });
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        // Mixed precision: the ControlNet under autocast, as `train::objective::Objective::loss` runs it.
        let residuals = crate::model::ops::bf16::autocast::scope(locked_dtype == DType::BF16, || {
            let hint = controlnet.embed_condition(&cond)?;
            controlnet.forward(&noisy, &t, &text, &hint, 1.0, false)
        })?;
        let pred = unet.forward(&noisy, &t, &text, Some(&residuals))?;
        let loss = (pred - &target)?.sqr()?.mean_all()?;
        let loss_value: f32 = loss.to_scalar()?;
        let forward_done = Instant::now();
        let store = loss.backward()?;
        let mut grads = Grads::default();
        grads.accumulate(&params, &store, 1.0)?;
        drop(store);
        let backward_done = Instant::now();
        let norm = grads.clip_norm(MAX_GRAD_NORM)?;
        optimizer.step(&params, &grads, AdamWConfig::default().lr)?;
        let done = Instant::now();
        finite &= loss_value.is_finite() && norm.is_finite() && grads.len() == params.len();
        if i > 0 {
            forward.push((forward_done - start).as_secs_f64());
            backward.push((backward_done - forward_done).as_secs_f64());
            optim.push((done - backward_done).as_secs_f64());
            total.push((done - start).as_secs_f64());
            cpu.push(process_cpu_seconds() - cpu_start);
        }
    }
    let (forward, backward, optim, total) =
        (Timing::new(forward), Timing::new(backward), Timing::new(optim), Timing::new(total));
    let timings = serde_json::json!({
        "train_step": total, "forward": forward, "backward": backward, "optimizer": optim,
    });
    Ok(TrainBenchReport {
        run: run.finish(),
        mode: "train",
        build_s,
        trainable_parameters: params.num_elements(),
        train_step_s: total.median_s,
        forward_s: forward.median_s,
        backward_s: backward.median_s,
        optimizer_s: optim.median_s,
        train_step_cpu_s: Timing::new(cpu).median_s,
        samples_per_s: b as f64 / total.median_s,
        peak_rss_bytes: peak_rss_bytes(),
        forward_gflop,
        finite,
        timings,
    })
}
