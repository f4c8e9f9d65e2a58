//! Synthetic datasets (made, not downloaded): the demo model's training data.
pub mod circles;
