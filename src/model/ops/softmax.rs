//! `softmax(scale · x)` over the last dimension in one pass per row.
//!
//! The attention scores of the 4096-token self-attention at 512 px are (2·8, 4096, 4096): 1 GiB. Scaling
//! them and candle's composed softmax (max, subtract, exp, sum, divide) made six such tensors per layer; here
//! the scores are read once and the probabilities written once, with a vectorisable `exp`.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::math::{softmax_row, Real};

/// `softmax(scale · x)` over the last dimension (`scale > 0`; attention passes 1/sqrt(head width)).
pub fn softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    if scale.is_nan() || scale <= 0.0 {
        candle_core::bail!("softmax: scale must be positive, got {scale}")
    }
    if !(x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)) {
        let scaled = if scale == 1.0 { x.clone() } else { (x * scale)? };
        return candle_nn::ops::softmax(&scaled, D::Minus1);
    }
    x.contiguous()?.apply_op1(SoftmaxOp { scale })
}

struct SoftmaxOp {
    scale: f64,
}

impl SoftmaxOp {
    fn forward<T: Real>(&self, x: &[T], d: usize) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        if d == 0 || x.is_empty() {
            return vec![T::zero(); x.len()];
        }
        // Every row is written below.
        let mut out = super::unfilled::<T>(x.len());
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xs)| {
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = v * scale;
            }
            // The largest is subtracted first, so every exponent is <= 0 (no overflow).
            softmax_row(o);
        });
        out
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("softmax: input must be contiguous") };
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.forward(&x[a..b], d)),
            CpuStorage::F64(x) => CpuStorage::F64(self.forward(&x[a..b], d)),
            _ => candle_core::bail!("softmax: f32 or f64 input expected"),
        };
        Ok((out, l.shape().clone()))
    }

    /// d softmax: y · (g - Σ g·y), times the scale.
    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(((grad.broadcast_sub(&dot)? * y)? * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_support::{check_gradients, max_rel_diff};
    use candle_core::Device;

    #[test]
    fn matches_candle_softmax_of_scaled_input() {
        let x = (Tensor::randn(0f32, 1., (3, 5, 77), &Device::Cpu).unwrap() * 4.0).unwrap();
        for scale in [1.0, 0.125] {
            let ours = softmax_last_dim(&x, scale).unwrap();
            let want = candle_nn::ops::softmax(&(&x * scale).unwrap(), D::Minus1).unwrap();
            assert!(max_rel_diff(&ours, &want) < 1e-6, "scale {scale}");
        }
        // Huge logits stay finite (the max is subtracted first).
        let big = Tensor::new(&[[1000f32, 999., -1e30]], &Device::Cpu).unwrap();
        let p: Vec<f32> = softmax_last_dim(&big, 1.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!((p[0] - 0.731_058_6).abs() < 1e-6 && (p[1] - 0.268_941_4).abs() < 1e-6 && p[2] < 1e-30, "{p:?}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for scale in [1.0, 0.3] {
            check_gradients(&[&[2, 3, 6]], |t| softmax_last_dim(&t[0], scale));
        }
    }
}
