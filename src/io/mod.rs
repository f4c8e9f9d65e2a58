//! Reading and writing what users have: weights, model folders, images.
pub mod base;
pub mod checkpoint;
pub mod detect;
#[cfg(test)]
mod fixtures;
pub mod hub;
pub mod inspect;
pub mod keymap;
pub mod pickle;
pub mod single_file;
pub mod torch_file;
pub mod weights;
