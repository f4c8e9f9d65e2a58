//! Training a ControlNet on your own data, as diffusers' `examples/controlnet/train_controlnet.py` and the
//! original `tool_add_control.py` + `train.md` do it: the base model stays locked, a trainable copy of its
//! encoder reads the condition, and zero convolutions make the first step start exactly from the base model.
//!
//! - [`init`]: a new ControlNet from a base UNet (encoder copied, zero convolutions, hint encoder drawn).
//! - [`dataset`]: fill50k-style `prompt.json` or `metadata.jsonl` folders, checked up front, resized and cropped
//!   as diffusers' transforms do.
//! - [`stream`]: WebDataset tar shards (local or at URLs) and Hugging Face parquet files, streamed by worker threads in a seeded
//!   shuffled order that a resumed run replays exactly; bad samples skipped and counted.
//! - [`latent_cache`]: `cache-latents`, VAE posteriors and caption embeddings computed once into shards that
//!   `train` streams instead of images.
//! - [`params`]: which tensors train (Vars) and which stay plain tensors (no gradient is ever computed for them).
//! - [`objective`]: one step's loss (VAE latents, noise, timesteps, ControlNet → locked UNet → MSE).
//! - [`optimizer`]: torch's AdamW and `clip_grad_norm_`, with state that checkpoints round-trip.
//! - [`files`]: model folders and checkpoint files written atomically.
//! - [`resume`]: `checkpoint-<N>` folders with a checksummed manifest; resume continues bit for bit.
//! - [`settings`]: what shapes a ControlNet run (defaults, checks, what a resumed run may change) and its
//!   validation.
//! - [`feed`]: which examples and captions each micro-batch takes, and their latents and conditions.
//! - [`trainable`]: what a run trains (the ControlNet, with `unlock_decoder` the UNet decoder too).
//! - [`trainer`]: the loop (batches, accumulation, warm-up, checkpoints, logs, validation, Ctrl-C).
//! - [`validation`]: sample grids, the loss log and curve, and the canny control-fidelity score.
//! - [`from_scratch`]: a small Stable Diffusion base trained from scratch (VAE, decoder, then UNet with the text
//!   encoder): the demo.
//! - [`ema`]: the moving average of the weights a from-scratch stage writes out.
//! - [`random_weights`]: seeded starting weights for networks trained from scratch (and `bench`'s).
pub mod dataset;
pub mod ema;
pub mod feed;
pub mod files;
pub mod from_scratch;
#[cfg(test)]
mod gradcheck;
pub mod init;
pub mod latent_cache;
pub mod objective;
pub mod optimizer;
pub mod params;
pub mod random_weights;
pub mod resume;
pub mod settings;
pub mod stream;
pub mod trainable;
pub mod trainer;
pub mod validation;
