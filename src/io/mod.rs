//! Reading and writing what users have: weights (diffusers folders, original checkpoints, pickles, the hub),
//! key maps between the namings, and images.
pub mod atomic;
pub mod base;
mod bytes;
pub mod checkpoint;
pub mod control_lora;
pub mod detect;
pub mod embeddings;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod hub;
pub mod images;
pub mod inspect;
pub mod keymap;
pub mod lora;
pub mod pickle;
pub mod single_file;
pub mod torch_file;
pub mod vae_file;
pub mod weights;
