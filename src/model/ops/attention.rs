//! Scaled dot-product attention `softmax(q kᵀ · scale) v` without materialising the score tensor.
//!
//! At 512 px the UNet's first-level self-attention has 4096 tokens: the scores of a guided batch with 8
//! heads are 1 GiB, written by one matrix product, read and rewritten by the softmax and read again by the
//! next product. Here each task takes one head and a block of queries, computes that block's scores into a
//! scratch buffer that stays in the core's cache (the scale folded into the product), normalises the rows
//! in place and multiplies by the values straight into the output; tasks run in parallel over heads and
//! blocks. The backward pass recomputes the probabilities with candle ops and applies the textbook formulas.
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::math::{softmax_row, Real};

/// Target size of one task's score block (elements): 1 MiB of f32, within a core's L2 cache.
const BLOCK_SCORES: usize = 1 << 18;
/// Query rows per task at least (short key sequences) and at most.
const MIN_ROWS: usize = 16;
const MAX_ROWS: usize = 256;

/// Score elements one candle-ops attention pass holds at once (1 GiB of f32, 512 MiB of half precision): a
/// guided 512-px SD1.5 batch fits in one pass; larger images run in blocks of query rows, so on a GPU the score
/// tensor stops growing with the image.
const OPS_SCORE_BUDGET: usize = 1 << 28;

/// `softmax(q kᵀ · scale) v` for `q` (batch·heads, queries, d), `k` (batch·heads, keys, d), `v` (batch·heads,
/// keys, dv) → (batch·heads, queries, dv). Off the CPU or for half precision: candle ops, in blocks of query
/// rows of at most [`OPS_SCORE_BUDGET`] scores.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let same_dtype = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    if !(q.device().is_cpu() && same_dtype && matches!(q.dtype(), DType::F32 | DType::F64)) {
        return in_query_blocks(q, k, v, scale, OPS_SCORE_BUDGET);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, AttentionOp { scale })
}

/// The same result from candle ops: the half-precision path and the backward pass's recomputation.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    super::softmax::softmax_last_dim(&q.matmul(&k.t()?)?, scale)?.matmul(v)
}

/// [`reference`] over blocks of query rows whose scores number at most `budget` (one block when all fit).
fn in_query_blocks(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let (heads, queries, _) = q.dims3()?;
    let keys = k.dim(1)?;
    let rows = (budget / (heads * keys).max(1)).max(1);
    if rows >= queries {
        return reference(q, k, v, scale);
    }
    let blocks = (0..queries)
        .step_by(rows)
        .map(|start| reference(&q.narrow(1, start, rows.min(queries - start))?, k, v, scale))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 1)
}

struct AttentionOp {
    scale: f64,
}

struct Dims {
    heads: usize,
    queries: usize,
    keys: usize,
    d: usize,
    dv: usize,
}

impl AttentionOp {
    fn dims(l_q: &Layout, l_k: &Layout, l_v: &Layout) -> Result<Dims> {
        let (heads, queries, d) = l_q.shape().dims3()?;
        let (hk, keys, dk) = l_k.shape().dims3()?;
        let (hv, kv, dv) = l_v.shape().dims3()?;
        if hk != heads || hv != heads || dk != d || kv != keys {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit", l_q.shape(), l_k.shape(), l_v.shape())
        }
        Ok(Dims { heads, queries, keys, d, dv })
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], s: &Dims) -> Vec<T> {
        let len = s.heads * s.queries * s.dv;
        if len == 0 || s.keys == 0 {
            return vec![T::zero(); len];
        }
        // Both products below write their whole destination without reading it (`read_dst` false).
        let mut out = super::unfilled::<T>(len);
        let rows = (BLOCK_SCORES / s.keys).clamp(MIN_ROWS, MAX_ROWS).min(s.queries);
        let scale = T::from_f64(self.scale);
        out.par_chunks_mut(s.queries * s.dv).enumerate().for_each(|(h, out_h)| {
            let (q_h, k_h, v_h) = (
                &q[h * s.queries * s.d..(h + 1) * s.queries * s.d],
                &k[h * s.keys * s.d..(h + 1) * s.keys * s.d],
                &v[h * s.keys * s.dv..(h + 1) * s.keys * s.dv],
            );
            out_h.par_chunks_mut(rows * s.dv).enumerate().for_each(|(b, out_b)| {
                let n = out_b.len() / s.dv;
                let q_b = &q_h[b * rows * s.d..(b * rows + n) * s.d];
                let mut scores = super::unfilled::<T>(n * s.keys);
                // SAFETY (both products): every pointer/stride pair addresses only elements of its slice:
                // q_b is n x d, k_h keys x d (read transposed), scores n x keys, v_h keys x dv, out_b n x dv.
                unsafe {
                    gemm::gemm(
                        n,
                        s.keys,
                        s.d,
                        scores.as_mut_ptr(),
                        1,
                        s.keys as isize,
                        false,
                        q_b.as_ptr(),
                        1,
                        s.d as isize,
                        k_h.as_ptr(),
                        s.d as isize,
                        1,
                        T::zero(),
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in scores.chunks_mut(s.keys) {
                    softmax_row(row);
                }
                unsafe {
                    gemm::gemm(
                        n,
                        s.dv,
                        s.keys,
                        out_b.as_mut_ptr(),
                        1,
                        s.dv as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        s.keys as isize,
                        v_h.as_ptr(),
                        1,
                        s.dv as isize,
                        T::zero(),
                        T::one(),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
        out
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = Self::dims(l1, l2, l3)?;
        let slice = |l: &Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("attention: operands must be contiguous".into()))
        };
        let ((q0, q1), (k0, k1), (v0, v1)) = (slice(l1)?, slice(l2)?, slice(l3)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.forward(&q[q0..q1], &k[k0..k1], &v[v0..v1], &s))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.forward(&q[q0..q1], &k[k0..k1], &v[v0..v1], &s))
            }
            _ => candle_core::bail!("attention: f32 or f64 operands of one dtype expected"),
        };
        Ok((out, Shape::from((s.heads, s.queries, s.dv))))
    }

    /// With P = softmax(S), S = q kᵀ · scale: dv = Pᵀ g, dP = g vᵀ, dS = P ⊙ (dP - Σ dP ⊙ P) · scale,
    /// dq = dS k, dk = dSᵀ q.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only tracked operands get a gradient: a locked UNet's cross-attention keys and values come from the
        // text embeddings alone, and their two products would be thrown away.
        let p = super::softmax::softmax_last_dim(&q.matmul(&k.t()?)?, self.scale)?;
        let grad_v = if v.track_op() { Some(p.t()?.matmul(grad)?) } else { None };
        if !q.track_op() && !k.track_op() {
            return Ok((None, None, grad_v));
        }
        let dp = grad.matmul(&v.t()?)?;
        let ds = ((&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)? * self.scale)?;
        let grad_q = if q.track_op() { Some(ds.matmul(k)?) } else { None };
        let grad_k = if k.track_op() { Some(ds.t()?.matmul(q)?) } else { None };
        Ok((grad_q, grad_k, grad_v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_support::{check_gradients, max_rel_diff};
    use candle_core::Device;

    /// Against the composed ops, with several query blocks per head (and a partial last block), cross- and
    /// self-attention shapes.
    #[test]
    fn matches_composed_attention() {
        let dev = Device::Cpu;
        for (heads, queries, keys, d, dv) in [(3, 40, 77, 8, 8), (2, 600, 1200, 4, 6), (1, 5, 3, 2, 2)] {
            let q = Tensor::randn(0f32, 1., (heads, queries, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (heads, keys, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (heads, keys, dv), &dev).unwrap();
            let ours = attention(&q, &k, &v, 0.35).unwrap();
            let want = reference(&q, &k, &v, 0.35).unwrap();
            assert_eq!(ours.dims(), &[heads, queries, dv]);
            let diff = max_rel_diff(&ours, &want);
            assert!(diff < 1e-5, "{heads}x{queries}x{keys}: {diff}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[2, 5, 3], &[2, 4, 3], &[2, 4, 2]], |t| attention(&t[0], &t[1], &t[2], 0.7));
    }

    /// Untracked keys and values (a locked cross-attention on text) get no gradient; the queries' is unchanged.
    #[test]
    fn untracked_operands_get_no_gradient() {
        let dev = Device::Cpu;
        let q = candle_core::Var::randn(0f32, 1., (2, 5, 4), &dev).unwrap();
        let (k, v) =
            (Tensor::randn(0f32, 1., (2, 7, 4), &dev).unwrap(), Tensor::randn(0f32, 1., (2, 7, 3), &dev).unwrap());
        let grads = attention(q.as_tensor(), &k, &v, 0.5).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&k).is_none() && grads.get(&v).is_none());
        let want = reference(q.as_tensor(), &k, &v, 0.5).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_rel_diff(grads.get(&q).unwrap(), want.get(&q).unwrap()) < 1e-5);
    }

    /// The ops path (GPUs, half precision) in query blocks: uneven blocks, one row per block, and a budget that
    /// fits everything all give the whole-score result; gradients flow through the blocks.
    #[test]
    fn query_blocks_match_one_pass() {
        let dev = Device::Cpu;
        let (q, k, v) = (
            Tensor::randn(0f32, 1., (2, 37, 8), &dev).unwrap(),
            Tensor::randn(0f32, 1., (2, 20, 8), &dev).unwrap(),
            Tensor::randn(0f32, 1., (2, 20, 5), &dev).unwrap(),
        );
        let want = reference(&q, &k, &v, 0.4).unwrap();
        for budget in [2 * 20 * 10, 1, 2 * 20 * 37] {
            let ours = in_query_blocks(&q, &k, &v, 0.4, budget).unwrap();
            assert_eq!(ours.dims(), &[2, 37, 5]);
            let diff = max_rel_diff(&ours, &want);
            assert!(diff < 1e-6, "budget {budget}: {diff}");
        }
        check_gradients(&[&[2, 5, 3], &[2, 4, 3], &[2, 4, 2]], |t| in_query_blocks(&t[0], &t[1], &t[2], 0.7, 16));
    }
}
