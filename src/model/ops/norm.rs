//! Group norm (optionally followed by SiLU) and layer norm as single passes.
//!
//! Built from candle primitives each norm is about ten full passes over the activation with as many new
//! tensors, and SiLU one more. Here each (sample, group) or row is reduced once for its statistics (in f64)
//! and written once, normalised, scaled, shifted and activated. The backward passes are fused the same way
//! (statistics again, then the textbook formulas in one or two passes).
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::math::Real;
use super::{flat_parts, offsets};

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Mean and 1/sqrt(var + eps) of a slice, accumulated in f64 (two passes: the slice is in cache).
fn moments<T: Real>(xs: &[T], eps: f64) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = xs.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `out = act(x * scale + shift)`.
#[inline(always)]
fn affine<T: Real>(out: &mut [T], xs: &[T], scale: T, shift: T, silu: bool) {
    if silu {
        T::silu_affine_row(out, xs, scale, shift);
    } else {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = x * scale + shift;
        }
    }
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    let (a, b) = offsets(l, what)?;
    Ok(&data[a..b])
}

/// The (x, weight, bias) storages as slices of one float type, or an error naming the op.
macro_rules! dispatch3 {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr, |$x:ident, $w:ident, $b:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let ($x, $w, $b) = (contiguous(x, $l1, $name)?, contiguous(w, $l2, $name)?, contiguous(b, $l3, $name)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let ($x, $w, $b) = (contiguous(x, $l1, $name)?, contiguous(w, $l2, $name)?, contiguous(b, $l3, $name)?);
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 operands of one dtype expected", $name),
        }
    };
}

// ---------------------------------------------------------------------------------------------------------
// Group norm

/// `nn.GroupNorm(groups, C, eps)` on `x` (B, C, ...) with per-channel `weight` and `bias`, then SiLU when
/// `silu`. Falls back to candle ops off the CPU or for half precision (statistics in f32 there).
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 || weight.elem_count() != c || bias.elem_count() != c {
        candle_core::bail!(
            "group norm: {c} channels, {groups} groups, weight {:?}, bias {:?}",
            weight.shape(),
            bias.shape()
        )
    }
    if !fast_path(x) {
        let y = group_norm_reference(x, weight, bias, groups, eps)?;
        return if silu { y.silu() } else { Ok(y) };
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, GroupNormOp { groups, eps, silu })
}

/// The composition of candle ops the fused kernel replaces (and the half-precision path).
fn group_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let dtype = x.dtype();
    let internal = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
    let xg = x.to_dtype(internal)?.reshape((dims[0], groups, ()))?;
    let centered = xg.broadcast_sub(&xg.mean_keepdim(2)?)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(dims.as_slice())?;
    let mut per_channel = vec![1; dims.len()];
    per_channel[1] = dims[1];
    normed
        .broadcast_mul(&weight.reshape(per_channel.as_slice())?)?
        .broadcast_add(&bias.reshape(per_channel.as_slice())?)
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// `x` is (batch, channels, spatial...) contiguous: each (sample, group) is one contiguous block of
    /// `channels / groups` planes.
    fn forward<T: Real>(&self, x: &[T], w: &[T], b: &[T], batch: usize, channels: usize) -> Vec<T> {
        let per_group = channels / self.groups;
        let spatial = x.len() / (batch * channels).max(1);
        let block = per_group * spatial;
        if block == 0 || x.is_empty() {
            return vec![T::zero(); x.len()];
        }
        // Every block (one group of one sample) is written below.
        let mut out = super::unfilled::<T>(x.len());
        out.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(i, (o, xs))| {
            let g = i % self.groups;
            let (mean, rstd) = moments(xs, self.eps);
            for ch in 0..per_group {
                let c = g * per_group + ch;
                let scale = w[c].to_f64() * rstd;
                let shift = b[c].to_f64() - mean * scale;
                let plane = ch * spatial..(ch + 1) * spatial;
                affine(&mut o[plane.clone()], &xs[plane], T::from_f64(scale), T::from_f64(shift), self.silu);
            }
        });
        out
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
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
        let dims = l1.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        let out = dispatch3!("group norm", s1, l1, s2, l2, s3, l3, |x, w, b| self.forward(x, w, b, batch, channels));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The forward pass ran, so all are CPU f32 or f64 of one dtype (as the output's gradient): two passes per
        // (sample, group) ([`GroupNormGradOp`]); operands that are not tracked (a locked UNet's norms) get none.
        let wb = Tensor::cat(&[weight.flatten_all()?, bias.flatten_all()?], 0)?;
        let op = GroupNormGradOp { groups: self.groups, eps: self.eps, silu: self.silu };
        let all = x.contiguous()?.apply_op3_no_bwd(&grad.contiguous()?, &wb, &op)?;
        flat_parts(&all, [x, weight, bias])
    }
}

/// Group norm's (and the fused SiLU's) backward from `x`, the output's gradient and `[weight | bias]`: one flat
/// tensor `[grad_x | grad_weight | grad_bias]`. Per (sample, group): the statistics again (f64), then one pass
/// forming the pre-norm gradient `g` (through SiLU) with its sums and the per-channel sums, and one writing
/// `rstd · (g·w - mean(g·w) - x̂ · mean(g·w·x̂))`. (The candle-op version was about twenty full passes.)
struct GroupNormGradOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormGradOp {
    fn backward<T: Real>(&self, x: &[T], grad: &[T], wb: &[T], batch: usize, channels: usize) -> Vec<T> {
        let (w, b) = wb.split_at(channels);
        let per_group = channels / self.groups;
        let spatial = x.len() / (batch * channels).max(1);
        let block = per_group * spatial;
        let mut out = vec![T::zero(); x.len() + 2 * channels];
        if block == 0 || x.is_empty() {
            return out;
        }
        let (grad_x, _) = out.split_at_mut(x.len());
        // Per (sample, group): each channel's (Σ g·x̂, Σ g) for the weight and bias gradients.
        let partials: Vec<Vec<(f64, f64)>> = grad_x
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(grad.par_chunks(block))
            .enumerate()
            .map(|(i, ((gx, xs), gs))| {
                let g0 = (i % self.groups) * per_group;
                let (mean, rstd) = moments(xs, self.eps);
                let mut channel_sums = vec![(0f64, 0f64); per_group];
                let (mut sum_gw, mut sum_gwx) = (0f64, 0f64);
                let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
                // 1. g (through SiLU) into gx, with the sums.
                for (ch, sums) in channel_sums.iter_mut().enumerate() {
                    let (wc, bc) = (w[g0 + ch], b[g0 + ch]);
                    let plane = ch * spatial..(ch + 1) * spatial;
                    let (o, xs, gs) = (&mut gx[plane.clone()], &xs[plane.clone()], &gs[plane]);
                    pre_norm_grad(o, xs, gs, mean_t, rstd_t, wc, bc, self.silu);
                    *sums = plane_sums(o, xs, mean_t, rstd_t);
                    sum_gw += sums.1 * wc.to_f64();
                    sum_gwx += sums.0 * wc.to_f64();
                }
                // 2. grad_x = rstd · (g·w - mean(g·w) - x̂ · mean(g·w·x̂)).
                let count = block as f64;
                let (mean_gw, mean_gwx) = (T::from_f64(sum_gw / count), T::from_f64(sum_gwx / count));
                for ch in 0..per_group {
                    let wc = w[g0 + ch];
                    let plane = ch * spatial..(ch + 1) * spatial;
                    for (o, &xv) in gx[plane.clone()].iter_mut().zip(&xs[plane]) {
                        let xhat = (xv - mean_t) * rstd_t;
                        *o = rstd_t * (*o * wc - mean_gw - xhat * mean_gwx);
                    }
                }
                channel_sums
            })
            .collect();
        let (_, wb_grad) = out.split_at_mut(x.len());
        for (i, sums) in partials.iter().enumerate() {
            let g0 = (i % self.groups) * per_group;
            for (ch, &(s_gx, s_g)) in sums.iter().enumerate() {
                wb_grad[g0 + ch] = T::from_f64(wb_grad[g0 + ch].to_f64() + s_gx);
                wb_grad[channels + g0 + ch] = T::from_f64(wb_grad[channels + g0 + ch].to_f64() + s_g);
            }
        }
        out
    }
}

/// The gradient before the norm's affine map on one channel plane: the output's, through SiLU when `silu`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pre_norm_grad<T: Real>(o: &mut [T], xs: &[T], gs: &[T], mean: T, rstd: T, w: T, b: T, silu: bool) {
    if !silu {
        o.copy_from_slice(gs);
        return;
    }
    let scale = rstd * w;
    T::silu_affine_grad_row(o, xs, gs, scale, b - mean * scale);
}

/// (Σ g·x̂, Σ g) over one channel plane, in independent lanes (so the loop vectorises), summed in f64.
#[inline(always)]
fn plane_sums<T: Real>(g: &[T], xs: &[T], mean: T, rstd: T) -> (f64, f64) {
    const LANES: usize = 16;
    let (mut gx, mut g1) = ([T::zero(); LANES], [T::zero(); LANES]);
    let (mut gc, mut xc) = (g.chunks_exact(LANES), xs.chunks_exact(LANES));
    for (gs, xs) in (&mut gc).zip(&mut xc) {
        for i in 0..LANES {
            gx[i] += gs[i] * (xs[i] - mean) * rstd;
            g1[i] += gs[i];
        }
    }
    let mut sums = (0f64, 0f64);
    for (&g, &x) in gc.remainder().iter().zip(xc.remainder()) {
        sums.0 += (g * (x - mean) * rstd).to_f64();
        sums.1 += g.to_f64();
    }
    (sums.0 + gx.iter().map(|v| v.to_f64()).sum::<f64>(), sums.1 + g1.iter().map(|v| v.to_f64()).sum::<f64>())
}

impl CustomOp3 for GroupNormGradOp {
    fn name(&self) -> &'static str {
        "group-norm-grad"
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
        let dims = l1.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        if l2.shape().elem_count() != l1.shape().elem_count() || l3.shape().elem_count() != 2 * channels {
            candle_core::bail!(
                "group norm backward: input {:?}, gradient {:?}, [weight | bias] {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let out = dispatch3!("group norm backward", s1, l1, s2, l2, s3, l3, |x, g, wb| self
            .backward(x, g, wb, batch, channels));
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * channels)))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Layer norm

/// `nn.LayerNorm(D, eps)` over the last dimension with `weight` and `bias` of length D. Half precision falls
/// back to candle ops with statistics in f32, as torch does.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !fast_path(x) {
        return layer_norm_reference(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
}

fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn forward<T: Real>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let d = w.len();
        if d == 0 || x.is_empty() {
            return vec![T::zero(); x.len()];
        }
        // Every row is written below.
        let mut out = super::unfilled::<T>(x.len());
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xs)| {
            let (mean, rstd) = moments(xs, self.eps);
            let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
            for (((o, &x), &w), &b) in o.iter_mut().zip(xs).zip(w).zip(b) {
                *o = (x - mean) * rstd * w + b;
            }
        });
        out
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let d = l1.shape().dims().last().copied().unwrap_or(0);
        if l2.shape().elem_count() != d || l3.shape().elem_count() != d {
            candle_core::bail!("layer norm: input {:?}, weight {:?}, bias {:?}", l1.shape(), l2.shape(), l3.shape())
        }
        let out = dispatch3!("layer norm", s1, l1, s2, l2, s3, l3, |x, w, b| self.forward(x, w, b));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The forward pass ran, so all are CPU f32 or f64 of one dtype (as the output's gradient): one pass per row
        // ([`LayerNormGradOp`]); an untracked weight and bias (a locked UNet's) get none.
        let op = LayerNormGradOp { eps: self.eps, weight: weight.contiguous()? };
        let all = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        flat_parts(&all, [x, weight, bias])
    }
}

/// Layer norm's backward from `x` and the output's gradient (the weight held by the op): one flat tensor
/// `[grad_x | grad_weight | grad_bias]`. Per row: the statistics again (f64), then
/// `rstd · (g·w - mean(g·w) - x̂ · mean(g·w·x̂))`; the weight and bias gradients (Σ g·x̂, Σ g over rows) are summed
/// per block of rows, then over blocks.
struct LayerNormGradOp {
    eps: f64,
    /// The norm's weight (D), contiguous.
    weight: Tensor,
}

/// Rows per parallel task of the layer-norm backward (each task sums its own weight and bias gradients).
const LAYER_NORM_ROWS: usize = 64;

impl LayerNormGradOp {
    fn backward<T: Real>(&self, x: &[T], grad: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = vec![T::zero(); x.len() + 2 * d];
        if d == 0 || x.is_empty() {
            return out;
        }
        let (grad_x, _) = out.split_at_mut(x.len());
        let inv_d = T::from_f64(1.0 / d as f64);
        let partials: Vec<(Vec<T>, Vec<T>)> = grad_x
            .par_chunks_mut(LAYER_NORM_ROWS * d)
            .zip(x.par_chunks(LAYER_NORM_ROWS * d))
            .zip(grad.par_chunks(LAYER_NORM_ROWS * d))
            .map(|((gx, xs), gs)| {
                let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
                for ((o, xs), gs) in gx.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    let (mean, rstd) = moments(xs, self.eps);
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    let (mut s_gw, mut s_gwx) = (T::zero(), T::zero());
                    for (((&x, &g), &wv), (dw, db)) in xs.iter().zip(gs).zip(w).zip(dw.iter_mut().zip(db.iter_mut())) {
                        let xhat = (x - mean) * rstd;
                        *dw += g * xhat;
                        *db += g;
                        s_gw += g * wv;
                        s_gwx += g * wv * xhat;
                    }
                    let (mean_gw, mean_gwx) = (s_gw * inv_d, s_gwx * inv_d);
                    for (((o, &x), &g), &wv) in o.iter_mut().zip(xs).zip(gs).zip(w) {
                        let xhat = (x - mean) * rstd;
                        *o = rstd * (g * wv - mean_gw - xhat * mean_gwx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (_, wb) = out.split_at_mut(x.len());
        let (gw, gb) = wb.split_at_mut(d);
        for (dw, db) in &partials {
            gw.iter_mut().zip(dw).for_each(|(a, &b)| *a += b);
            gb.iter_mut().zip(db).for_each(|(a, &b)| *a += b);
        }
        out
    }
}

impl candle_core::CustomOp2 for LayerNormGradOp {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.weight.elem_count();
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != n || l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("layer norm backward: input {:?} and gradient {:?} do not fit", l1.shape(), l2.shape())
        }
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let out = match (s1, s2, &*w_storage) {
            (CpuStorage::F32(x), CpuStorage::F32(g), candle_core::Storage::Cpu(CpuStorage::F32(w))) => {
                let (x, g, w) = (
                    contiguous(x, l1, "layer norm backward")?,
                    contiguous(g, l2, "layer norm backward")?,
                    contiguous(w, w_layout, "layer norm backward")?,
                );
                CpuStorage::F32(self.backward(x, g, w))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), candle_core::Storage::Cpu(CpuStorage::F64(w))) => {
                let (x, g, w) = (
                    contiguous(x, l1, "layer norm backward")?,
                    contiguous(g, l2, "layer norm backward")?,
                    contiguous(w, w_layout, "layer norm backward")?,
                );
                CpuStorage::F64(self.backward(x, g, w))
            }
            _ => candle_core::bail!("layer norm backward: f32 or f64 CPU operands of one dtype expected"),
        };
        Ok((out, Shape::from(n + 2 * d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_support::{check_gradients, max_rel_diff};
    use candle_core::Device;

    #[test]
    fn group_norm_matches_composition() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 8, 5, 3), &dev).unwrap().affine(3.0, 1.0).unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        for silu in [false, true] {
            let ours = group_norm(&x, &w, &b, 4, 1e-5, silu).unwrap();
            let mut want = group_norm_reference(&x, &w, &b, 4, 1e-5).unwrap();
            if silu {
                want = want.silu().unwrap();
            }
            assert!(max_rel_diff(&ours, &want) < 1e-5, "silu {silu}");
        }
        // Rank 3 (batch, channels, tokens) as well.
        let x3 = x.reshape((2, 8, 15)).unwrap();
        let ours = group_norm(&x3, &w, &b, 2, 1e-6, false).unwrap();
        assert!(max_rel_diff(&ours, &group_norm_reference(&x3, &w, &b, 2, 1e-6).unwrap()) < 1e-5);
    }

    /// The fused f32 backward against candle's autograd of the composition, with and without SiLU; a locked
    /// (untracked) weight and bias get no gradient.
    #[test]
    fn group_norm_f32_gradients_match_the_composition() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], scale: f64| {
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap().affine(scale, 0.3).unwrap())
                .unwrap()
        };
        let (x, w, b) = (var(&[2, 8, 9, 7], 2.0), var(&[8], 1.0), var(&[8], 1.0));
        let r = Tensor::randn(0f32, 1., (2, 8, 9, 7), &dev).unwrap();
        for silu in [false, true] {
            let (x, w, b) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let ours = (group_norm(x, w, b, 4, 1e-5, silu).unwrap() * &r).unwrap().sum_all().unwrap();
            let ours = ours.backward().unwrap();
            let mut want = group_norm_reference(x, w, b, 4, 1e-5).unwrap();
            if silu {
                want = want.silu().unwrap();
            }
            let want = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t) in [("x", x), ("weight", w), ("bias", b)] {
                let diff = max_rel_diff(ours.get(t).unwrap(), want.get(t).unwrap());
                assert!(diff < 1e-4, "silu {silu}: {name} gradient off by {diff}");
            }
            let locked = (w.detach(), b.detach());
            let y = group_norm(x, &locked.0, &locked.1, 4, 1e-5, silu).unwrap();
            let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(grads.get(x).is_some() && grads.get(&locked.0).is_none() && grads.get(&locked.1).is_none());
        }
    }

    #[test]
    fn group_norm_gradients_match_finite_differences() {
        for silu in [false, true] {
            check_gradients(&[&[2, 6, 3, 2], &[6], &[6]], |t| group_norm(&t[0], &t[1], &t[2], 3, 1e-5, silu));
        }
    }

    #[test]
    fn layer_norm_matches_composition_and_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 7, 16), &dev).unwrap().affine(2.0, -0.5).unwrap();
        let w = Tensor::randn(0f32, 1., 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 16, &dev).unwrap();
        let ours = layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert!(max_rel_diff(&ours, &layer_norm_reference(&x, &w, &b, 1e-5).unwrap()) < 1e-5);
        check_gradients(&[&[2, 3, 5], &[5], &[5]], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
    }

    /// The fused f32 backward over several row blocks against candle's autograd of the composition; a locked
    /// (untracked) weight and bias get no gradient.
    #[test]
    fn layer_norm_f32_gradients_match_the_composition() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], scale: f64| {
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap().affine(scale, 0.2).unwrap())
                .unwrap()
        };
        let (x, w, b) = (var(&[3, 50, 24], 2.0), var(&[24], 1.0), var(&[24], 1.0));
        let r = Tensor::randn(0f32, 1., (3, 50, 24), &dev).unwrap();
        let (x, w, b) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let ours = (layer_norm(x, w, b, 1e-5).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let want = (layer_norm_reference(x, w, b, 1e-5).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, t) in [("x", x), ("weight", w), ("bias", b)] {
            let diff = max_rel_diff(ours.get(t).unwrap(), want.get(t).unwrap());
            assert!(diff < 1e-4, "{name} gradient off by {diff}");
        }
        let (w0, b0) = (w.detach(), b.detach());
        let grads = (layer_norm(x, &w0, &b0, 1e-5).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x).is_some() && grads.get(&w0).is_none() && grads.get(&b0).is_none());
    }
}
