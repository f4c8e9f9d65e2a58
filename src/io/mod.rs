//! Reading and writing what users have: weights, model folders, images.
pub mod images;
pub mod weights;
