//! Scaled dot-product attention `softmax(q kᵀ · scale) v` without materialising the score tensor.
//!
//! At 512 px the UNet's first-level self-attention has 4096 tokens: the scores of a guided batch with 8
//! heads are 1 GiB, written by one matrix product, read and rewritten by the softmax and read again by the
//! next product. Here each task takes one head and a block of queries, computes that block's scores into a
//! scratch buffer that stays in the core's cache (the scale folded into the product, the block column-major so
//! that no operand is re-packed per block, see [`BLOCK_ROWS`]), exponentiates each query's scores, multiplies
//! by the values and divides the (block, width) result by the sums; tasks run in parallel over heads and
//! blocks. The backward pass works the same way ([`AttentionGradOp`]): per head, block by block of queries, it
//! recomputes the block's probabilities and forms every gradient from them, so no score tensor is made there
//! either (at 512 px the whole-score version held ~2 GiB of temporaries and took 3x PyTorch's backward).
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::math::Real;
use super::matmul::{matmul_in_task, Mat};
use super::{flat_parts, offsets};

/// Query rows per block (both passes) at most. gemm (0.19, on x86) multiplies an operand where it lies, without
/// packing it first, when: a right operand with contiguous columns, in a product of at most 2048 rows; a right
/// operand laid out otherwise, in a product of at most 32 rows; a left operand with contiguous columns, when at
/// most 48 columns of the result are taken at once. With the score blocks column-major and blocks of 32 query
/// rows every large operand (k, v, the score blocks) meets one of these, so none is packed again at every
/// block (at 64 rows, row-major, packing took a quarter of the backward's product time).
pub(super) const BLOCK_ROWS: usize = 32;

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
    q.apply_op3(&k, &v, AttentionOp { scale, bf16: false })
}

/// [`attention`] with both products on the bf16 dot-product unit where the CPU has one (q, k, v and the
/// probabilities rounded to bf16, f32 sums and softmax: the bf16 mode's attention, as PyTorch's bf16 models
/// run it); elsewhere, and for other dtypes, [`attention`]. Its backward is the f32 attention's.
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let f32_cpu = [q, k, v].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !(f32_cpu && super::bf16::attention::available()) {
        return attention(q, k, v, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, AttentionOp { scale, bf16: true })
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
    /// The products on the bf16 kernels (f32 operands only, [`super::bf16::attention::available`] checked).
    bf16: bool,
}

/// The sizes of one attention call (the f32 and the bf16 kernels).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    /// Width of a query and key.
    pub d: usize,
    /// Width of a value.
    pub dv: usize,
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

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], s: &Dims) -> Result<Vec<T>> {
        let len = s.heads * s.queries * s.dv;
        if len == 0 || s.keys == 0 {
            return Ok(vec![T::zero(); len]);
        }
        // Every block of the output is written in full below.
        let mut out = super::unfilled::<T>(len);
        let rows = BLOCK_ROWS.min(s.queries);
        let scale = T::from_f64(self.scale);
        let scratch = || Scratch::<T>::new(rows, s.keys, s.dv);
        out.par_chunks_mut(s.queries * s.dv).enumerate().try_for_each(|(h, out_h)| {
            let (q_h, k_h, v_h) = (
                &q[h * s.queries * s.d..(h + 1) * s.queries * s.d],
                &k[h * s.keys * s.d..(h + 1) * s.keys * s.d],
                &v[h * s.keys * s.dv..(h + 1) * s.keys * s.dv],
            );
            out_h.par_chunks_mut(rows * s.dv).enumerate().try_for_each_init(scratch, |scratch, (b, out_b)| {
                let n = out_b.len() / s.dv;
                let q_b = &q_h[b * rows * s.d..(b * rows + n) * s.d];
                let (p, out_cols) = (&mut scratch.p[..n * s.keys], &mut scratch.cols[..n * s.dv]);
                // 1. S = q kᵀ · scale, column-major, then softmax's numerators E and each row's 1 / Σ.
                let (q_rows, k_cols) = (Mat::rows(q_b, s.d), Mat::transposed(k_h, s.d));
                matmul_in_task(n, s.keys, s.d, p, (1, n), false, q_rows, k_cols, scale)?;
                T::exp_columns(p, n, &mut scratch.max, &mut scratch.sum);
                // 2. E v, column-major.
                let (p_cols, v_rows) = (Mat::transposed(p, n), Mat::rows(v_h, s.dv));
                matmul_in_task(n, s.dv, s.keys, out_cols, (1, n), false, p_cols, v_rows, T::one())?;
                // 3. out = P v = (E v) / Σ (a pass over the result, not over the keys), into the output's rows.
                for col in out_cols.chunks_exact_mut(n) {
                    for (v, &inv) in col.iter_mut().zip(&scratch.sum) {
                        *v *= inv;
                    }
                }
                rows_from_columns(out_cols, n, out_b);
                Ok::<_, candle_core::Error>(())
            })
        })?;
        Ok(out)
    }
}

/// One task's scratch: a column-major score block, a column-major (rows, width) result and the softmax's
/// per-row values.
struct Scratch<T> {
    p: Vec<T>,
    cols: Vec<T>,
    max: Vec<T>,
    sum: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new(rows: usize, keys: usize, width: usize) -> Self {
        // The products and the softmax write p and cols in full before reading them.
        let (p, cols) = (super::unfilled::<T>(rows * keys), super::unfilled::<T>(rows * width));
        Scratch { p, cols, max: vec![T::zero(); rows], sum: vec![T::zero(); rows] }
    }
}

/// Writes the column-major (n, width) `cols` into the row-major `dst`.
fn rows_from_columns<T: Copy>(cols: &[T], n: usize, dst: &mut [T]) {
    let width = dst.len() / n.max(1);
    for (i, row) in dst.chunks_exact_mut(width).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = cols[c * n + i];
        }
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
        let name = self.name();
        let ((q0, q1), (k0, k1), (v0, v1)) = (offsets(l1, name)?, offsets(l2, name)?, offsets(l3, name)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) if self.bf16 => {
                let scale = self.scale as f32;
                CpuStorage::F32(super::bf16::attention::attention(&q[q0..q1], &k[k0..k1], &v[v0..v1], &s, scale))
            }
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.forward(&q[q0..q1], &k[k0..k1], &v[v0..v1], &s)?)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.forward(&q[q0..q1], &k[k0..k1], &v[v0..v1], &s)?)
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
        // The forward pass ran, so all are CPU f32 or f64 of one dtype (as the output's gradient). Only tracked
        // operands get a gradient: a locked UNet's cross-attention keys and values come from the text embeddings
        // alone.
        let op = AttentionGradOp { scale: self.scale, grad: grad.contiguous()? };
        let all = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        flat_parts(&all, [q, k, v])
    }
}

/// The gradients of [`AttentionOp`] from `q`, `k`, `v` and the output's gradient: one flat tensor
/// `[dq | dk | dv]`. With P = softmax(S), S = q kᵀ · scale, per head and block of query rows:
/// 1. S and P for the block (as the forward pass);
/// 2. dv += Pᵀ g;
/// 3. dP = g vᵀ, then dS = P ⊙ (dP - Σ_row dP ⊙ P) · scale in place;
/// 4. dq = dS k for the block's rows, dk += dSᵀ q.
struct AttentionGradOp {
    scale: f64,
    /// The output's gradient (heads, queries, dv), contiguous.
    grad: Tensor,
}

impl AttentionGradOp {
    fn backward<T: Real>(&self, q: &[T], k: &[T], v: &[T], g: &[T], s: &Dims) -> Result<Vec<T>> {
        let (n_q, n_k) = (s.heads * s.queries * s.d, s.heads * s.keys * s.d);
        let mut out = vec![T::zero(); n_q + n_k + s.heads * s.keys * s.dv];
        if s.heads == 0 || s.queries == 0 || s.keys == 0 {
            return Ok(out);
        }
        let (dq, rest) = out.split_at_mut(n_q);
        let (dk, dv) = rest.split_at_mut(n_k);
        let rows = BLOCK_ROWS.min(s.queries);
        let scale = T::from_f64(self.scale);
        let (qd, kd, kv, qv) = (s.queries * s.d, s.keys * s.d, s.keys * s.dv, s.queries * s.dv);
        dq.par_chunks_mut(qd).zip(dk.par_chunks_mut(kd)).zip(dv.par_chunks_mut(kv)).enumerate().try_for_each(
            |(h, ((dq_h, dk_h), dv_h))| {
                let (q_h, k_h, v_h, g_h) = (
                    &q[h * qd..(h + 1) * qd],
                    &k[h * kd..(h + 1) * kd],
                    &v[h * kv..(h + 1) * kv],
                    &g[h * qv..(h + 1) * qv],
                );
                let mut scratch = Scratch::<T>::new(rows, s.keys, s.d);
                // Written in full by the third product before the softmax's backward reads it.
                let mut dp = super::unfilled::<T>(rows * s.keys);
                for start in (0..s.queries).step_by(rows) {
                    let n = rows.min(s.queries - start);
                    let (q_b, g_b) = (&q_h[start * s.d..(start + n) * s.d], &g_h[start * s.dv..(start + n) * s.dv]);
                    let (p, dp, dq_cols) =
                        (&mut scratch.p[..n * s.keys], &mut dp[..n * s.keys], &mut scratch.cols[..n * s.d]);
                    // P, dP and dS are column-major (n, keys) blocks, dq's block column-major too (see BLOCK_ROWS).
                    let (q_rows, g_rows) = (Mat::rows(q_b, s.d), Mat::rows(g_b, s.dv));
                    // 1. S = q kᵀ · scale, then P column by column.
                    matmul_in_task(n, s.keys, s.d, p, (1, n), false, q_rows, Mat::transposed(k_h, s.d), scale)?;
                    T::softmax_columns(p, n, &mut scratch.max, &mut scratch.sum);
                    // 2. dv += Pᵀ g.
                    matmul_in_task(s.keys, s.dv, n, dv_h, (s.dv, 1), true, Mat::rows(p, n), g_rows, T::one())?;
                    // 3. dP = g vᵀ, then dS in place.
                    matmul_in_task(n, s.keys, s.dv, dp, (1, n), false, g_rows, Mat::transposed(v_h, s.dv), T::one())?;
                    T::softmax_grad_columns(dp, p, n, scale, &mut scratch.max);
                    // 4. dq = dS k (column-major, copied into dq's rows), dk += dSᵀ q.
                    let (ds_cols, k_rows) = (Mat::transposed(dp, n), Mat::rows(k_h, s.d));
                    matmul_in_task(n, s.d, s.keys, dq_cols, (1, n), false, ds_cols, k_rows, T::one())?;
                    matmul_in_task(s.keys, s.d, n, dk_h, (s.d, 1), true, Mat::rows(dp, n), q_rows, T::one())?;
                    rows_from_columns(dq_cols, n, &mut dq_h[start * s.d..(start + n) * s.d]);
                }
                Ok::<_, candle_core::Error>(())
            },
        )?;
        Ok(out)
    }
}

impl CustomOp3 for AttentionGradOp {
    fn name(&self) -> &'static str {
        "attention-grad"
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
        let s = AttentionOp::dims(l1, l2, l3)?;
        if self.grad.dims() != [s.heads, s.queries, s.dv] {
            candle_core::bail!("attention backward: gradient {:?} does not fit the output", self.grad.shape())
        }
        let name = self.name();
        let (g_storage, g_layout) = self.grad.storage_and_layout();
        let ((q0, q1), (k0, k1), (v0, v1), (g0, g1)) =
            (offsets(l1, name)?, offsets(l2, name)?, offsets(l3, name)?, offsets(g_layout, name)?);
        let out = match (s1, s2, s3, &*g_storage) {
            (
                CpuStorage::F32(q),
                CpuStorage::F32(k),
                CpuStorage::F32(v),
                candle_core::Storage::Cpu(CpuStorage::F32(g)),
            ) => CpuStorage::F32(self.backward(&q[q0..q1], &k[k0..k1], &v[v0..v1], &g[g0..g1], &s)?),
            (
                CpuStorage::F64(q),
                CpuStorage::F64(k),
                CpuStorage::F64(v),
                candle_core::Storage::Cpu(CpuStorage::F64(g)),
            ) => CpuStorage::F64(self.backward(&q[q0..q1], &k[k0..k1], &v[v0..v1], &g[g0..g1], &s)?),
            _ => candle_core::bail!("attention backward: f32 or f64 CPU operands of one dtype expected"),
        };
        let len = s.heads * (s.queries * s.d + s.keys * (s.d + s.dv));
        Ok((out, Shape::from(len)))
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

    /// The fused f32 backward over several query blocks (and a partial last one) against candle's autograd of
    /// the composed ops, for self- and cross-attention shapes.
    #[test]
    fn f32_gradients_match_the_composition() {
        let dev = Device::Cpu;
        for (heads, queries, keys, d, dv) in [(3, 40, 77, 8, 8), (2, 600, 1200, 4, 6), (1, 5, 3, 2, 2)] {
            let var = |shape: (usize, usize, usize)| candle_core::Var::randn(0f32, 1., shape, &dev).unwrap();
            let (q, k, v) = (var((heads, queries, d)), var((heads, keys, d)), var((heads, keys, dv)));
            let r = Tensor::randn(0f32, 1., (heads, queries, dv), &dev).unwrap();
            let loss = |y: Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let ours = loss(attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.35).unwrap());
            let want = loss(reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.35).unwrap());
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_rel_diff(ours.get(t).unwrap(), want.get(t).unwrap());
                assert!(diff < 1e-4, "{heads}x{queries}x{keys}: d{name} off by {diff}");
            }
        }
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
