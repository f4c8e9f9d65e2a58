//! Generating images: a [`GenerateRequest`] (prompt, conditions with their ControlNets, size, steps, seed, ...)
//! → images and the metadata their PNGs carry, step for step as diffusers' `StableDiffusionControlNetPipeline`.
//!
//! - [`request`]: what to generate, the defaults and the checks that need no model;
//! - [`generator`]: [`run`] (load the models a request names and run it) and [`Generator`] (run requests on
//!   models already loaded), with a progress callback and a cancel flag;
//! - [`conditions`]: a condition as given (image, pose, tensor) → the tensor a net takes at the output size;
//! - [`memory_estimate`]: the memory a request needs, checked before anything is allocated;
//! - [`generate`]: the denoising loop on loaded models and prepared conditions (what training's validation
//!   images use too);
//! - [`hires`]: A1111's hires fix (upscale, then img2img at the larger size);
//! - [`inpaint`]: the mask checked and brought to the latents, latent blending and the 9-channel UNet's input;
//! - [`image_metadata`]: what a PNG carries to be made again (A1111's `parameters`, our JSON);
//! - [`extra_networks`]: A1111's `<lora:name:weight>` prompt tags → LoRA files;
//! - [`textual_inversion`]: embeddings named in prompts → tokens and vectors of the text encoders;
//! - [`vae_override`]: another VAE in place of the model's;
//! - [`sd`]: loading a Stable Diffusion model and ControlNets; [`demo`]: the bundled demo model.
pub mod circles_eval;
pub mod conditions;
pub mod control_mode;
pub mod demo;
pub mod extra_networks;
pub mod generate;
pub mod generator;
pub mod hires;
pub mod image_metadata;
pub mod inpaint;
#[cfg(test)]
mod lora_parity;
pub mod mask_crop;
pub mod memory_estimate;
pub mod prompt_chunks;
pub mod prompt_parser;
pub mod request;
pub mod sd;
pub mod text_conditioning;
pub mod textual_inversion;
#[cfg(test)]
mod textual_inversion_parity;
pub mod vae_override;

pub use control_mode::ControlMode;
pub use generate::{generate, generate_from, never_cancelled, Control, GenerateOutput, GenerateParams, InitImage};
pub use generator::{run, Generated, GeneratedImage, Generator, Progress};
pub use image_metadata::ImageMetadata;
pub use request::{ControlRequest, GenerateRequest};
pub use sd::StableDiffusion;
