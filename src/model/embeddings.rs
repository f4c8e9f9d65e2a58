//! The timestep embedding shared by the UNet and the ControlNet: a fixed sinusoidal projection of each sample's
//! timestep (`time_proj`, no weights) followed by a learned two-layer MLP (`time_embedding.linear_1/linear_2`).
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{linear, Activation, Linear};

/// Longest period of the sinusoids (the "10000" of the Transformer's positional encoding).
const MAX_PERIOD: f64 = 10000.0;

/// Sinusoidal features of a timestep, as diffusers' `Timesteps` / `get_timestep_embedding`.
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: usize,
    /// Order `[cos, sin]` instead of `[sin, cos]` (true for every SD checkpoint).
    flip_sin_to_cos: bool,
    /// Shifts the frequency spacing: exponents run over `i / (half - shift)`.
    downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self { num_channels, flip_sin_to_cos, downscale_freq_shift }
    }

    /// The frequencies `exp(-ln(MAX_PERIOD) * i / (half - shift))`. The exponent is formed in f32 as torch forms it
    /// and then exponentiated exactly, so the frequencies equal torch's up to its exp's last bit (all equal for
    /// 32 channels, 3 of 160 differ by one ulp for SD's 320).
    fn frequencies(&self) -> Vec<f32> {
        let half = self.num_channels / 2;
        let denom = (half as f64 - self.downscale_freq_shift) as f32;
        let log_period = -(MAX_PERIOD.ln() as f32);
        (0..half)
            .map(|i| {
                let exponent = (log_period * i as f32) / denom;
                (exponent as f64).exp() as f32
            })
            .collect()
    }

    /// `timesteps`: (batch,) values, possibly fractional → (batch, num_channels) float32.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        if timesteps.rank() != 1 {
            bail!("timesteps must be a (batch,) tensor, got shape {:?}", timesteps.dims())
        }
        let half = self.num_channels / 2;
        let freqs = Tensor::from_vec(self.frequencies(), (1, half), timesteps.device())?;
        // 1. angles t * f_i in float32, as torch computes them
        let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
        let angles = t.broadcast_mul(&freqs)?;
        // 2. sinusoids, in the checkpoint's order
        let (sin, cos) = (angles.sin()?, angles.cos()?);
        let emb = if self.flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
        // 3. an odd width gets one zero column
        if self.num_channels % 2 == 1 {
            emb.pad_with_zeros(1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// The learned MLP on top of the sinusoids: `linear_1 → act → linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_channels: usize, time_embed_dim: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, time_embed_dim, true, vb.pp("linear_1"))?,
            act,
            linear_2: linear(time_embed_dim, time_embed_dim, true, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values from the definition, computed in f64: t=0 gives cos=1, sin=0; the first frequency is 1.
    #[test]
    fn sinusoids_follow_the_definition() {
        let proj = Timesteps::new(8, true, 0.0);
        let t = Tensor::new(&[0f32, 10.5], &Device::Cpu).unwrap();
        let emb: Vec<Vec<f32>> = proj.forward(&t).unwrap().to_vec2().unwrap();
        assert_eq!(emb[0], vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        for i in 0..4 {
            let f = (-(10000f64.ln()) * i as f64 / 4.0).exp();
            let (c, s) = ((10.5 * f).cos(), (10.5 * f).sin());
            assert!((emb[1][i] as f64 - c).abs() < 1e-5, "cos {i}");
            assert!((emb[1][4 + i] as f64 - s).abs() < 1e-5, "sin {i}");
        }
    }

    #[test]
    fn odd_width_is_zero_padded_and_unflipped_order_is_sin_first() {
        let proj = Timesteps::new(5, false, 1.0);
        let t = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let emb: Vec<Vec<f32>> = proj.forward(&t).unwrap().to_vec2().unwrap();
        assert_eq!(emb[0], vec![0., 0., 1., 1., 0.]);
    }
}
