//! Fused CPU kernels for the layers that dominate a denoising step, each with a backward pass (training
//! reuses the layers) and a fallback to candle's ops on other devices and dtypes.
pub mod conv2d;
