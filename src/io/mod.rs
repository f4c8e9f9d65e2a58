//! Reading and writing what users have: weights, model folders, images.
pub mod checkpoint;
pub mod keymap;
pub mod pickle;
pub mod weights;
