//! GEGLU's gate: `a · gelu(g)` for `[a | g]` halves of the last dimension, in one pass.
//!
//! candle's `chunk` gives two strided views, `gelu_erf` copies one and `mul` writes a third tensor; the
//! feed-forward's hidden layer is the widest activation of a transformer block (8x the model width here).
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::math::Real;

/// `h[..., :F] * gelu_erf(h[..., F:])` for `h` (..., 2F).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let two_f = h.dim(D::Minus1)?;
    if two_f % 2 != 0 {
        candle_core::bail!("GEGLU: the last dimension ({two_f}) must be even")
    }
    if !(h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64)) {
        let halves = h.chunk(2, D::Minus1)?;
        return halves[0].mul(&halves[1].gelu_erf()?);
    }
    h.contiguous()?.apply_op1(GegluOp)
}

struct GegluOp;

impl GegluOp {
    fn forward<T: Real>(h: &[T], two_f: usize) -> Vec<T> {
        let f = two_f / 2;
        if f == 0 || h.is_empty() {
            return vec![T::zero(); h.len() / 2];
        }
        // Every row is written below.
        let mut out = super::unfilled::<T>(h.len() / 2);
        out.par_chunks_mut(f).zip(h.par_chunks(two_f)).for_each(|(o, row)| {
            let (a, g) = row.split_at(f);
            T::gate_row(o, a, g);
        });
        out
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.shape().dims().to_vec();
        let two_f = dims.last().copied().unwrap_or(0);
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("GEGLU: input must be contiguous") };
        let out = match s {
            CpuStorage::F32(h) => CpuStorage::F32(Self::forward(&h[a..b], two_f)),
            CpuStorage::F64(h) => CpuStorage::F64(Self::forward(&h[a..b], two_f)),
            _ => candle_core::bail!("GEGLU: f32 or f64 input expected"),
        };
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        Ok((out, Shape::from(dims)))
    }

    /// d(a·gelu(g)) = gelu(g) da + a·(Φ(g) + g·φ(g)) dg.
    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let f = h.dim(D::Minus1)? / 2;
        let (a, g) = (h.narrow(D::Minus1, 0, f)?, h.narrow(D::Minus1, f, f)?);
        let cdf = ((g.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let pdf =
            ((g.sqr()? * -0.5)?.exp()? * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let grad_a = (grad * g.gelu_erf()?)?;
        let grad_g = ((grad * a)? * (cdf + (&g * pdf)?)?)?;
        Ok(Some(Tensor::cat(&[grad_a, grad_g], D::Minus1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_support::{check_gradients, max_rel_diff};
    use candle_core::Device;

    #[test]
    fn matches_chunk_gelu_mul() {
        let h = (Tensor::randn(0f32, 1., (2, 9, 12), &Device::Cpu).unwrap() * 2.0).unwrap();
        let halves = h.chunk(2, D::Minus1).unwrap();
        let want = halves[0].mul(&halves[1].gelu_erf().unwrap()).unwrap();
        // candle's `gelu_erf` takes libm's erf; ours A&S 7.1.26's (absolute error < 1.5e-7, as torch's).
        assert!(max_rel_diff(&geglu(&h).unwrap(), &want) < 3e-7);
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[3, 2, 8]], |t| geglu(&t[0]));
    }
}
