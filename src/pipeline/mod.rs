//! The generate recipe: a Stable Diffusion pipeline folder, optional ControlNets and their conditions →
//! images, step for step as diffusers' `StableDiffusionControlNetPipeline`.
pub mod demo;
pub mod generate;
pub mod recipe;
pub mod sd;

pub use generate::{generate, Control, GenerateOutput, GenerateParams};
pub use sd::StableDiffusion;
