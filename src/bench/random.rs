//! Random weights for full-size models without downloading anything: a `VarBuilder` backend that fills every
//! requested tensor from a seeded SplitMix64 stream.
//!
//! Values only need the right scale (so activations stay finite, like a real checkpoint's), not a particular
//! distribution: uniform numbers cost a multiply-add each, a Gaussian per element would dominate building a
//! 1.3-billion-parameter UNet + ControlNet + VAE. The numbers come from [`crate::train::random_weights`], which
//! the from-scratch training draws its starting weights from too (bench uses train, never the other way).
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::train::random_weights::{hash_name, uniform};

/// A `VarBuilder` backend of seeded random weights, scaled like a trained network's: matrices and kernels
/// uniform with variance 1/fan_in (fan_in = all dims but the first), one-dimensional `weight`s (norm scales)
/// 1, other vectors (biases) uniform with variance 1/len.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A `VarBuilder` over these weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    pub fn tensor(&self, shape: &Shape, name: &str) -> Result<Tensor> {
        let dims = shape.dims();
        let n = shape.elem_count();
        let values = match dims {
            [_] if name == "weight" || name.ends_with(".weight") => vec![1f32; n],
            [_] => uniform(self.seed ^ hash_name(name), n, (3.0 / n.max(1) as f32).sqrt()),
            _ => {
                let fan_in: usize = dims[1..].iter().product();
                // Uniform on [-b, b] has variance b²/3.
                uniform(self.seed ^ hash_name(name), n, (3.0 / fan_in.max(1) as f32).sqrt())
            }
        };
        Tensor::from_vec(values, shape.clone(), &Device::Cpu)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.tensor(&s, name)?.to_dtype(dtype)?.to_device(dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name} was asked for without one")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_get_their_scale() {
        let w = RandomWeights::new(1);
        let norm = w.tensor(&Shape::from(8), "norm1.weight").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(norm, vec![1.0; 8]);
        let kernel = w.tensor(&Shape::from((64, 32, 3, 3)), "conv1.weight").unwrap();
        let bound = (3.0f32 / (32.0 * 9.0)).sqrt();
        let max: f32 = kernel.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(max < bound && max > 0.9 * bound, "{max} vs {bound}");
        let other = w.tensor(&Shape::from((64, 32, 3, 3)), "conv2.weight").unwrap();
        assert_ne!(
            kernel.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            other.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
