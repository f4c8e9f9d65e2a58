//! controlnet-rs: ControlNet for Stable Diffusion in Rust.
//!
//! Module tree = architecture:
//! - [`model`]: the networks (layers, UNet, ControlNet, VAE, CLIP text encoder), built from `config.json`.
//! - [`tokenizer`]: CLIP's byte-level BPE tokenizer.
//! - [`schedulers`]: the diffusion samplers, built from `scheduler_config.json`.
//! - [`rng`]: a CPU random generator that reproduces `torch.Generator("cpu")`.
//! - [`pipeline`]: the generate recipe (prompt + conditions → image).
//! - [`io`]: weights, model folders, images.
//! - [`memory`]: allocator settings the command line uses (large blocks reused between steps).
//! - [`annotate`]: the annotators that make control maps (canny, shuffle, lineart, ...).
//! - [`synthetic`]: made-up datasets (the demo's circles).
//! - [`train`]: training ControlNets on your own data.
//! - [`bench`]: speed and memory of the full-size networks with random weights.
//! - [`serve`]: the HTTP server (A1111 API, job API, web page) over the pipeline.
//! - [`cli`]: the `controlnet` command.
pub mod annotate;
pub mod bench;
pub mod cli;
pub mod error;
pub mod io;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod serve;
pub mod synthetic;
#[cfg(test)]
pub mod test_support;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
