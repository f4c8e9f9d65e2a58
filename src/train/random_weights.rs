//! Seeded starting weights for a network trained from scratch (the demo base's VAE, UNet and text encoder;
//! `bench`'s trainable ControlNet), drawn from the model's own constructor: the network is built once over a backend that makes up
//! each tensor it asks for, and the tensors are kept.
//!
//! Every tensor's values come from its own stream (seed ⊕ a hash of its name), so they do not depend on the
//! order the constructor asks for them. The scales are LeCun's (variance 1/fan_in, which keeps activations
//! at unit scale through a stack of layers), with the conventional exceptions:
//! - biases start at zero;
//! - one-dimensional `weight`s are normalisation scales and start at one;
//! - embedding tables (`*embedding.weight`, rows looked up rather than multiplied) get variance 1/width, as
//!   each row is one input vector.
//!
//! The numbers are [`uniform`]'s: SplitMix64 streams, one per name ([`hash_name`]) and chunk, so they are fast
//! to make for full-size models and do not depend on the thread count (`bench::random` builds on them too).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::params::TensorMap;
use crate::{Error, Result};

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
pub fn hash_name(name: &str) -> u64 {
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

/// Makes up tensors as a constructor asks for them and remembers them.
#[derive(Clone)]
struct Drawing {
    seed: u64,
    drawn: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl Drawing {
    fn values(&self, dims: &[usize], name: &str) -> Vec<f32> {
        let n: usize = dims.iter().product();
        // Uniform on [-b, b] has variance b²/3: b = √(3 · variance).
        let bound = |variance: f64| (3.0 * variance).sqrt() as f32;
        let seed = self.seed ^ hash_name(name);
        match dims {
            [_] if name.ends_with(".weight") => vec![1.0; n],
            [_] => vec![0.0; n],
            [_, width] if name.ends_with("embedding.weight") => uniform(seed, n, bound(1.0 / *width as f64)),
            [_, rest @ ..] => uniform(seed, n, bound(1.0 / rest.iter().product::<usize>().max(1) as f64)),
            [] => vec![0.0; n],
        }
    }
}

impl SimpleBackend for Drawing {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = Tensor::from_vec(self.values(s.dims(), name), s, &Device::Cpu)?;
        let mut drawn = self.drawn.lock().map_err(|_| candle_core::Error::Msg("init: poisoned lock".into()))?;
        if drawn.insert(name.to_string(), t.clone()).is_some() {
            candle_core::bail!("init: {name} was asked for twice");
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("init: {name} was asked for without a shape")
    }

    /// Nothing exists yet: constructors that probe for optional or legacy names take their default path.
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// The starting tensors of the network `build` constructs (f32, on the CPU), seeded.
pub fn draw<M>(seed: u64, build: impl FnOnce(VarBuilder) -> candle_core::Result<M>) -> Result<TensorMap> {
    let drawing = Drawing { seed, drawn: Arc::default() };
    let vb = VarBuilder::from_backend(Box::new(drawing.clone()), DType::F32, Device::Cpu);
    build(vb).map_err(|e| Error::Invalid(format!("building a fresh model: {e}")))?;
    let drawn = drawing.drawn.lock().map_err(|_| Error::Invalid("init: poisoned lock".into()))?;
    Ok(drawn.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
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
    use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};

    fn tiny_vae() -> AutoencoderKLConfig {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd15/vae/config.json"),
        )
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn seeded_scaled_and_complete() {
        let build = |vb: VarBuilder| AutoencoderKL::new(tiny_vae(), vb);
        let a = draw(3, build).unwrap();
        let b = draw(3, build).unwrap();
        let c = draw(4, build).unwrap();
        // The model builds from exactly these tensors.
        AutoencoderKL::new(tiny_vae(), VarBuilder::from_tensors(a.clone(), DType::F32, &Device::Cpu)).unwrap();
        let v = |m: &TensorMap, k: &str| m[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let conv = "encoder.conv_in.weight";
        assert_eq!(v(&a, conv), v(&b, conv), "same seed, same weights");
        assert_ne!(v(&a, conv), v(&c, conv), "another seed, other weights");
        assert!(v(&a, "encoder.conv_in.bias").iter().all(|&x| x == 0.0), "biases start at zero");
        assert!(v(&a, "encoder.conv_norm_out.weight").iter().all(|&x| x == 1.0), "norm scales start at one");
        // conv_in: 3 input channels x 3x3 → fan_in 27, variance 1/27.
        let w = v(&a, conv);
        let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!((var * 27.0 - 1.0).abs() < 0.3, "variance x fan_in = {}", var * 27.0);
        // Legacy attention names are not probed into existence.
        assert!(a.keys().any(|k| k.contains("mid_block.attentions.0.to_q")));
    }
}
