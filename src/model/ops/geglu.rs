//! GEGLU's gate: `a · gelu(g)` for `[a | g]` halves of the last dimension, in one pass.
//!
//! candle's `chunk` gives two strided views, `gelu_erf` copies one and `mul` writes a third tensor; the
//! feed-forward's hidden layer is the widest activation of a transformer block (8x the model width here).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
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
    /// `[da | dg]` in one parallel pass (it was nine candle ops, each a full pass with a new tensor).
    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&grad.contiguous()?, &GegluGradOp)?))
    }
}

/// The gradient of [`GegluOp`]'s input from the input `h` (..., 2F) and the output's gradient (..., F).
struct GegluGradOp;

impl GegluGradOp {
    fn backward<T: Real>(h: &[T], grad: &[T], two_f: usize) -> Vec<T> {
        let f = two_f / 2;
        if f == 0 || h.is_empty() {
            return vec![T::zero(); h.len()];
        }
        // Every row's both halves are written below.
        let mut out = super::unfilled::<T>(h.len());
        out.par_chunks_mut(two_f).zip(h.par_chunks(two_f)).zip(grad.par_chunks(f)).for_each(|((d, row), grad)| {
            let ((da, dg), (a, g)) = (d.split_at_mut(f), row.split_at(f));
            T::gate_grad_row(da, dg, a, g, grad);
        });
        out
    }
}

impl CustomOp2 for GegluGradOp {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let two_f = l1.shape().dims().last().copied().unwrap_or(0);
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("GEGLU backward: operands must be contiguous")
        };
        if l2.shape().elem_count() * 2 != l1.shape().elem_count() {
            candle_core::bail!("GEGLU backward: input {:?} and gradient {:?} do not fit", l1.shape(), l2.shape())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(g)) => CpuStorage::F32(Self::backward(&h[a..b], &g[c..d], two_f)),
            (CpuStorage::F64(h), CpuStorage::F64(g)) => CpuStorage::F64(Self::backward(&h[a..b], &g[c..d], two_f)),
            _ => candle_core::bail!("GEGLU backward: f32 or f64 operands of one dtype expected"),
        };
        Ok((out, l1.shape().clone()))
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

    /// The fused f32 backward (vectorised erf and exp) against candle's autograd of `chunk · gelu_erf` (libm).
    #[test]
    fn f32_gradient_matches_candle() {
        let dev = Device::Cpu;
        let h = candle_core::Var::from_tensor(&(Tensor::randn(0f32, 1., (2, 5, 38), &dev).unwrap() * 2.0).unwrap())
            .unwrap();
        let r = Tensor::randn(0f32, 1., (2, 5, 19), &dev).unwrap();
        let ours = (geglu(h.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let halves = h.as_tensor().chunk(2, D::Minus1).unwrap();
        let want = halves[0].mul(&halves[1].gelu_erf().unwrap()).unwrap();
        let want = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = max_rel_diff(ours.get(&h).unwrap(), want.get(&h).unwrap());
        assert!(diff < 1e-6, "{diff}");
    }
}
