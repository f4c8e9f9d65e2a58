//! Annotators: turn inputs into the condition images ControlNet was trained on.
pub mod draw;
pub mod pose;
