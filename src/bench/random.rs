//! Random weights for full-size models without downloading anything: a `VarBuilder` backend that fills every
//! requested tensor from a seeded SplitMix64 stream.
//!
//! Values only need the right scale (so activations stay finite, like a real checkpoint's), not a particular
//! distribution: uniform numbers cost a multiply-add each, a Gaussian per element would dominate building a
//! 1.3-billion-parameter UNet + ControlNet + VAE.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// Elements generated per work item; each chunk has its own stream, so the values do not depend on the
/// number of threads.
const CHUNK: usize = 1 << 20;

/// SplitMix64 (Steele, Lea, Flood 2014): one add, two multiplies per 64 random bits.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// FNV-1a: a stable per-name seed, so a tensor's values do not depend on the order models ask for them.
pub(crate) fn hash_name(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

/// `n` values uniform in [-bound, bound), two per 64-bit draw, filled in parallel chunks.
pub fn uniform(seed: u64, n: usize, bound: f32) -> Vec<f32> {
    let mut out = vec![0f32; n];
    // 24 random bits per value: the f32 mantissa width, so every value is exactly representable.
    let scale = 2.0 * bound / (1u32 << 24) as f32;
    let fill = |(index, chunk): (usize, &mut [f32])| {
        let mut rng = SplitMix64(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for pair in chunk.chunks_mut(2) {
            let bits = rng.next();
            for (k, v) in pair.iter_mut().enumerate() {
                let r = ((bits >> (32 * k + 8)) & 0xFF_FFFF) as f32;
                *v = r * scale - bound;
            }
        }
    };
    let chunks: Vec<(usize, &mut [f32])> = out.chunks_mut(CHUNK).enumerate().collect();
    let threads = candle_core::utils::get_num_threads().clamp(1, chunks.len().max(1));
    if threads == 1 {
        chunks.into_iter().for_each(fill);
    } else {
        // Deal the chunks round-robin to the threads.
        let mut lanes: Vec<Vec<(usize, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, c) in chunks.into_iter().enumerate() {
            lanes[i % threads].push(c);
        }
        std::thread::scope(|s| {
            for lane in lanes {
                s.spawn(move || lane.into_iter().for_each(fill));
            }
        });
    }
    out
}

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
    fn seeded_scaled_and_independent_of_threads() {
        let a = uniform(7, 3 * CHUNK + 5, 0.5);
        assert_eq!(a, uniform(7, 3 * CHUNK + 5, 0.5), "same seed, same values");
        assert_ne!(a[..100], uniform(8, 100, 0.5)[..], "another seed, other values");
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 1e-3 && (var - 0.25 / 3.0).abs() < 1e-3, "mean {mean}, var {var}");
        // The first chunk does not depend on how long the tensor is (per-chunk streams).
        assert_eq!(a[..10], uniform(7, 10, 0.5)[..]);
    }

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
