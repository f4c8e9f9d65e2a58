//! 2-D convolution on the CPU as im2col + one matrix product per band of output rows, in NCHW throughout,
//! forward and backward.
//!
//! candle 0.11.1's CPU convolution converts the input to NHWC and re-lays out the kernel on one thread at every
//! call, then gathers each tile's patches with scattered writes; in the VAE decoder that gathering took twice
//! as long as the arithmetic (`perf`). Here the patch matrix is built with its rows in the kernel's own
//! (in-channel, ky, kx) order, so the OIHW weights are already the left matrix, the rows of each patch row are
//! contiguous copies of input rows, and the product writes straight into the NCHW output, bias included.
//!
//! The backward pass reuses that layout. candle's autograd formulas would call its CPU `conv_transpose2d` and
//! `conv2d`, which in 0.11.1 are naive loops; training spent most of its time there. Instead, per band:
//! - input gradient: `W^T (C*KH*KW, O) x grad_out (O, pixels)` is the patch matrix's gradient, and col2im adds
//!   each of its entries back onto the input pixel the forward's gather copied it from;
//! - weight gradient: `grad_out (O, pixels) x patches^T`, summed over bands and batch items, with the patches
//!   built by the forward's gather;
//! - bias gradient: `grad_out` summed over batch and pixels.
//!
//! 1x1 stride-1 unpadded convolutions skip the patch matrix in both directions (it is the input itself); 3x3
//! ones with stride 1, padding 1 and enough channels and pixels run on `winograd` instead, forward and input
//! gradient, in f32 (2.25x fewer multiplications). Other devices and dtypes keep candle's formulas.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::bf16::{Kernel, Values};
use super::matmul::{matmul, Mat};
use super::offsets;
use super::winograd;
use super::Weight;

/// Target size of one band's patch matrix (elements): big enough for an efficient matrix product, small
/// enough to stay in the last-level cache instead of materialising a 9x copy of a 512x512 VAE activation.
const BAND_ELEMENTS: usize = 1 << 21;
/// Output pixels per band of the kernel gradient's products at least (their inner dimension).
const MIN_GRAD_WEIGHT_PIXELS: usize = 512;

/// Stride and zero padding of a convolution (dilation 1, one group: what Stable Diffusion uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub padding: usize,
    pub stride: usize,
}

impl Conv2dParams {
    fn out_size(&self, input: usize, kernel: usize) -> Option<usize> {
        (input + 2 * self.padding).checked_sub(kernel).map(|span| span / self.stride + 1)
    }

    /// A 1x1 convolution that sees every pixel once: its patch matrix is the input itself.
    fn pointwise(&self, d: &Dims) -> bool {
        d.kh == 1 && d.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output rows per band, so that one band's patch matrix holds about `BAND_ELEMENTS` values.
    fn band_rows(d: &Dims) -> usize {
        (BAND_ELEMENTS / (d.patch() * d.ow).max(1)).clamp(1, d.oh.max(1))
    }

    /// The input row that output row `oy` sees through kernel row `ky`, if it is not padding.
    fn input_row(&self, oy: usize, ky: usize, h: usize) -> Option<usize> {
        let y = (oy * self.stride + ky).checked_sub(self.padding)?;
        (y < h).then_some(y)
    }

    /// The output columns `first..end` whose input column `ox * stride + kx - padding` lies inside a row of
    /// width `w` (the others see padding); the first of them sees input column `x0`.
    fn inside_columns(&self, kx: usize, w: usize, ow: usize) -> (usize, usize, usize) {
        let (pad, stride) = (self.padding as isize, self.stride);
        let at_least = |lo: isize| if lo <= 0 { 0 } else { (lo as usize).div_ceil(stride).min(ow) };
        let first = at_least(pad - kx as isize);
        let end = at_least(w as isize + pad - kx as isize).max(first);
        // Only used when first < end, where it is a real column (>= 0).
        let x0 = ((first * stride + kx) as isize - pad).max(0) as usize;
        (first, end, x0)
    }

    /// Fills `cols` (C*KH*KW rows of `rows * ow` values) with the input pixels each output pixel of rows
    /// `row0..row0 + rows` sees, zero where the kernel hangs over the padding.
    fn gather<T: WithDType>(&self, input: &[T], cols: &mut [T], d: &Dims, row0: usize, rows: usize) {
        let stride = self.stride;
        let n = rows * d.ow;
        // One input channel's KH*KW patch rows per task.
        cols.par_chunks_mut(d.kh * d.kw * n).zip(input.par_chunks(d.h * d.w)).for_each(|(block, plane)| {
            for ky in 0..d.kh {
                for kx in 0..d.kw {
                    let (first, end, x0) = self.inside_columns(kx, d.w, d.ow);
                    let dst_row = &mut block[(ky * d.kw + kx) * n..(ky * d.kw + kx + 1) * n];
                    for (r, dst) in dst_row.chunks_mut(d.ow).enumerate() {
                        let Some(y) = self.input_row(row0 + r, ky, d.h) else {
                            dst.fill(T::zero());
                            continue;
                        };
                        let src = &plane[y * d.w..(y + 1) * d.w];
                        dst[..first].fill(T::zero());
                        dst[end..].fill(T::zero());
                        if first == end {
                            // No output column of this kernel column sees the input (x0 may lie past it).
                            continue;
                        }
                        if stride == 1 {
                            dst[first..end].copy_from_slice(&src[x0..x0 + end - first]);
                        } else {
                            for (v, &s) in dst[first..end].iter_mut().zip(src[x0..].iter().step_by(stride)) {
                                *v = s;
                            }
                        }
                    }
                }
            }
        });
    }

    /// [`Self::gather`] for the bf16 kernels: the patches rounded straight into their packed right-operand
    /// layout (`[pixel tile][patch tile][16 pairs of patch rows][16 pixels][2]`, see `ops::bf16`), so no f32
    /// patch matrix is written and read back. For stride 1 and output rows of whole tiles (`ow % 16 == 0`):
    /// each tile's 16 pixels lie in one output row, so each patch row's are one run of an input row, read
    /// under a lane mask where the window hangs over the padding. `packed` holds `packed_len(patch, n)`.
    fn gather_packed(&self, input: &[f32], packed: &mut [u16], d: &Dims, row0: usize, rows: usize) {
        use super::bf16::{avx512, TILE, TILE_K};
        assert!(self.stride == 1 && d.ow.is_multiple_of(TILE) && input.len() >= d.c * d.h * d.w);
        let (n, patch, window) = (rows * d.ow, d.patch(), d.kh * d.kw);
        let k_tiles = patch.div_ceil(TILE_K);
        let (pad, w) = (self.padding as isize, d.w as isize);
        // Per patch row (c, ky, kx): its input offset from the window's top-left pixel, and that pixel's
        // distance from the window's (dy, dx); rows past the patch (the last k tile's padding) never see input.
        let offsets: Vec<(isize, isize, isize)> = (0..k_tiles * TILE_K)
            .map(|pk| {
                if pk >= patch {
                    return (0, isize::MIN / 2, 0);
                }
                let (c, ky, kx) = (pk / window, ((pk % window) / d.kw) as isize, (pk % d.kw) as isize);
                ((c * d.h * d.w) as isize + (ky - pad) * w + kx - pad, ky - pad, kx - pad)
            })
            .collect();
        packed.par_chunks_mut(k_tiles * TILE * TILE_K).enumerate().for_each(|(t, panel)| {
            let first = t * TILE;
            if first >= n {
                panel.fill(0); // a padding tile (even tile counts)
                return;
            }
            let (oy, ox0) = ((row0 + first / d.ow) as isize, (first % d.ow) as isize);
            let corner = oy * w + ox0;
            // Per patch row of a k tile: where its 16 pixels' values start in `input`, and which lanes are real.
            let mut runs = [(input.as_ptr(), 0u16); 2 * TILE];
            for (tile, kt_offsets) in panel.chunks_exact_mut(TILE * TILE_K).zip(offsets.chunks_exact(TILE_K)) {
                for (run, &(offset, dy, dx)) in runs.iter_mut().zip(kt_offsets) {
                    let y = oy + dy;
                    // Lanes l with 0 <= x0 + l < w see the input.
                    let x0 = ox0 + dx;
                    let (lo, hi) = ((-x0).clamp(0, TILE as isize) as u32, (w - x0).clamp(0, TILE as isize) as u32);
                    *run = if y < 0 || y >= d.h as isize || lo >= hi {
                        (input.as_ptr(), 0)
                    } else {
                        let mask = ((1u32 << hi) - 1) & !((1u32 << lo) - 1);
                        (input.as_ptr().wrapping_offset(offset + corner), mask as u16)
                    };
                }
                // SAFETY: AVX512-BF16 is present (the caller checked `avx512_paths`); each run's masked
                // lanes address pixels x0 + l in 0..w of row y in 0..h of channel c < C, inside `input`
                // (asserted above); `tile` is a whole tile.
                unsafe { avx512::round_interleave_masked_tile(&runs, tile) };
            }
        });
    }

    /// The inverse of [`Self::gather`] (col2im): adds each entry of `cols` (laid out as `gather` fills it for
    /// output rows `row0..row0 + rows`) onto the input pixel it was copied from, dropping the padding's.
    fn scatter_add<T: WithDType>(&self, cols: &[T], grad_in: &mut [T], d: &Dims, row0: usize, rows: usize) {
        let stride = self.stride;
        let n = rows * d.ow;
        // Overlapping kernel windows add into the same pixels, but only within one channel's plane: one input
        // channel per task keeps every write to a pixel on one thread.
        grad_in.par_chunks_mut(d.h * d.w).zip(cols.par_chunks(d.kh * d.kw * n)).for_each(|(plane, block)| {
            for ky in 0..d.kh {
                for kx in 0..d.kw {
                    let (first, end, x0) = self.inside_columns(kx, d.w, d.ow);
                    let src_row = &block[(ky * d.kw + kx) * n..(ky * d.kw + kx + 1) * n];
                    for (r, src) in src_row.chunks(d.ow).enumerate() {
                        let Some(y) = self.input_row(row0 + r, ky, d.h).filter(|_| first < end) else { continue };
                        let dst = &mut plane[y * d.w..(y + 1) * d.w];
                        if stride == 1 {
                            for (v, &s) in dst[x0..x0 + end - first].iter_mut().zip(&src[first..end]) {
                                *v += s;
                            }
                        } else {
                            for (v, &s) in dst[x0..].iter_mut().step_by(stride).zip(&src[first..end]) {
                                *v += s;
                            }
                        }
                    }
                }
            }
        });
    }
}

/// `conv2d(x, weight) + bias` as one op: `x` (B, C, H, W), `weight` (O, C, KH, KW), `bias` (O).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, params: Conv2dParams) -> Result<Tensor> {
    if super::bf16::mixed(x, weight) {
        let bias = bias.to_dtype(DType::F32)?;
        if weight.track_op() || bias.track_op() || params.stride == 0 {
            // Training half-precision weights themselves: the f32 op (and its backward) on the widened weights.
            return conv2d(x, &weight.to_dtype(DType::F32)?, &bias, params);
        }
        // Inference, or a locked layer in mixed-precision training (a tracked input: the backward gives it its
        // gradient on the bf16 kernels too).
        let op = Conv2dOp { p: params, autocast: false };
        return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
    }
    let fast = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && params.stride > 0;
    if !fast {
        let y = x.conv2d(weight, params.padding, params.stride, 1, 1)?;
        return y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?);
    }
    // Inside mixed precision's autocast (a trained f32 layer), the products run on the bf16 kernels.
    let op = Conv2dOp { p: params, autocast: super::bf16::autocast::active(x, weight) };
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

struct Conv2dOp {
    p: Conv2dParams,
    /// f32 weights multiplied on the bf16 kernels, forward and backward (mixed precision's autocast).
    autocast: bool,
}

/// Dimensions of one call, checked once.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Dims {
    /// Checks that input (B, C, H, W), kernel (O, C, KH, KW) and output (B, O, OH, OW) sizes fit `p`.
    fn new(p: Conv2dParams, op: &str, x: [usize; 4], k: [usize; 4], out: Option<(usize, usize)>) -> Result<Self> {
        let [b, c, h, w] = x;
        let [o, kc, kh, kw] = k;
        if kc != c {
            candle_core::bail!("{op}: input {x:?} and kernel {k:?} do not fit")
        }
        if [h, w, kh, kw].contains(&0) {
            // The patch loops split planes and kernels into chunks of these sizes.
            candle_core::bail!("{op}: empty input plane {h}x{w} or kernel {kh}x{kw}")
        }
        let (Some(oh), Some(ow)) = (p.out_size(h, kh), p.out_size(w, kw)) else {
            candle_core::bail!("{op}: kernel {kh}x{kw} is larger than the padded input {h}x{w}")
        };
        if let Some(out) = out.filter(|&out| out != (oh, ow)) {
            candle_core::bail!("{op}: a {kh}x{kw} kernel maps {h}x{w} to {oh}x{ow}, not {out:?}")
        }
        Ok(Dims { b, c, h, w, o, kh, kw, oh, ow })
    }

    /// The shape for [`winograd::conv3x3`], where this convolution is a 3x3 one (stride 1, padding 1) that it
    /// runs faster than im2col.
    fn winograd(&self, p: Conv2dParams) -> Option<winograd::Shape> {
        let shape = winograd::Shape { b: self.b, c: self.c, h: self.h, w: self.w, o: self.o };
        let three = (self.kh, self.kw, p.stride, p.padding) == (3, 3, 1, 1);
        (three && winograd::suits(&shape)).then_some(shape)
    }

    /// The convolution that maps the output gradient to the input gradient: channels swapped (for a 3x3
    /// kernel with stride 1 and padding 1, the same sizes otherwise).
    fn transposed(&self) -> Dims {
        Dims { c: self.o, o: self.c, h: self.oh, w: self.ow, oh: self.h, ow: self.w, ..*self }
    }

    /// Rows of the patch matrix (and columns of the flattened kernel).
    fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
}

impl Conv2dOp {
    /// The forward pass with `product(n, dst, rhs)` computing `dst (O, n; rows hw apart) += weights (O, patch)
    /// x rhs (patch, n)`: gemm for f32/f64 weights, the bf16 kernels for bf16 ones.
    /// The convolution, band by band: `product(n, dst, rhs)` writes the band's `n` output columns of every
    /// channel, onto the bias already in `dst` when `bias` is given (else it adds the bias itself).
    fn forward<T, P>(&self, x: &[T], bias: Option<&[T]>, d: &Dims, product: P) -> Result<Vec<T>>
    where
        T: WithDType,
        P: Fn(usize, &mut [T], &[T]) -> Result<()>,
    {
        let p = self.p;
        let hw = d.oh * d.ow;
        let patch = d.patch();
        // Every element is set to its bias here, or by the product, which writes every output column once.
        let mut out = super::unfilled::<T>(d.b * d.o * hw);
        if let Some(bias) = bias {
            // Bias first: the product then accumulates onto it (no separate pass over the output).
            for (plane, &bias) in out.chunks_mut(hw).zip(bias.iter().cycle()) {
                plane.fill(bias);
            }
        }
        let pointwise = p.pointwise(d);
        let band_rows = Conv2dParams::band_rows(d);
        // `gather` writes every column entry of a band (padding as zeros) before the product reads it.
        let mut cols = if pointwise { Vec::new() } else { super::unfilled::<T>(patch * band_rows * d.ow) };
        for item in 0..d.b {
            let input = &x[item * d.c * d.h * d.w..(item + 1) * d.c * d.h * d.w];
            let output = &mut out[item * d.o * hw..(item + 1) * d.o * hw];
            if pointwise {
                // A 1x1 convolution is the product itself: (O, C) x (C, H*W).
                product(hw, output, input)?;
                continue;
            }
            for row0 in (0..d.oh).step_by(band_rows) {
                let rows = band_rows.min(d.oh - row0);
                let n = rows * d.ow;
                let cols = &mut cols[..patch * n];
                p.gather(input, cols, d, row0, rows);
                product(n, &mut output[row0 * d.ow..], cols)?;
            }
        }
        Ok(out)
    }

    /// f32/f64 weights: gemm.
    fn forward_gemm<T: WithDType>(&self, x: &[T], k: &[T], bias: &[T], d: &Dims) -> Result<Vec<T>> {
        let (hw, patch) = (d.oh * d.ow, d.patch());
        self.forward(x, Some(bias), d, |n, dst, rhs| {
            matmul(d.o, n, patch, dst, (hw, 1), true, Mat::rows(k, patch), Mat::rows(rhs, n))
        })
    }

    /// f32 products: Winograd's for the 3x3 convolutions it suits (reading half weights widened as its kernel
    /// transform reads them, no widened copy), gemm on the weights widened once otherwise.
    fn forward_f32<K: Weight>(&self, x: &[f32], k: &[K], bias: &[f32], d: &Dims) -> Result<Vec<f32>> {
        match d.winograd(self.p) {
            Some(shape) => winograd::conv3x3(x, k, bias, &shape),
            None => self.forward_gemm(x, &K::widen_all(k), bias, d),
        }
    }

    /// bf16 weights (or f32 ones under autocast) on a bf16 unit: f32 activations rounded to bf16 as the
    /// products read them, f32 sums.
    fn forward_bf16(&self, x: &[f32], k: Values, bias: &[f32], d: &Dims) -> Result<Vec<f32>> {
        use super::bf16::{matmul_row_bias, Operand, Right};
        let whole_tiles = !self.p.pointwise(d) && self.p.stride == 1 && d.ow.is_multiple_of(super::bf16::TILE);
        if whole_tiles && super::bf16::avx512_paths() {
            return self.forward_packed(x, k, bias, d);
        }
        let (hw, patch) = (d.oh * d.ow, d.patch());
        // The bias is added as the sums are stored (no fill of the output and read-back).
        self.forward(x, None, d, |n, dst, rhs| {
            let (lhs, rhs) = (Operand::new(k, patch, 1), Right::Values(Operand::new(Values::F32(rhs), n, 1)));
            matmul_row_bias(d.o, n, patch, lhs, rhs, dst, (hw, 1), bias)
        })
    }

    /// [`Self::forward_bf16`] with the patches gathered straight into the kernels' packed layout
    /// ([`Conv2dParams::gather_packed`]): stride 1, output rows of whole tiles, AVX512-BF16.
    fn forward_packed(&self, x: &[f32], k: Values, bias: &[f32], d: &Dims) -> Result<Vec<f32>> {
        use super::bf16::{matmul_row_bias, packed_len, Operand, Right};
        let (hw, patch) = (d.oh * d.ow, d.patch());
        // The product writes every output element once, bias included.
        let mut out = super::unfilled::<f32>(d.b * d.o * hw);
        let band_rows = Conv2dParams::band_rows(d);
        // `gather_packed` writes every value of a band's packed patches, padding included.
        let mut packed = super::unfilled::<half::bf16>(packed_len(patch, band_rows * d.ow));
        // SAFETY: bf16 is a transparent 16-bit value; the buffer is reinterpreted, not copied.
        let packed: &mut [u16] = unsafe { std::slice::from_raw_parts_mut(packed.as_mut_ptr().cast(), packed.len()) };
        for item in 0..d.b {
            let input = &x[item * d.c * d.h * d.w..(item + 1) * d.c * d.h * d.w];
            let output = &mut out[item * d.o * hw..(item + 1) * d.o * hw];
            for row0 in (0..d.oh).step_by(band_rows) {
                let rows = band_rows.min(d.oh - row0);
                let n = rows * d.ow;
                let band = &mut packed[..packed_len(patch, n)];
                self.p.gather_packed(input, band, d, row0, rows);
                let (lhs, rhs) = (Operand::new(k, patch, 1), Right::Packed(band));
                matmul_row_bias(d.o, n, patch, lhs, rhs, &mut output[row0 * d.ow..], (hw, 1), bias)?;
            }
        }
        Ok(out)
    }
}

fn dims4(l: &Layout) -> Result<[usize; 4]> {
    let (a, b, c, d) = l.shape().dims4()?;
    Ok([a, b, c, d])
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
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
        let name = self.name();
        let d = Dims::new(self.p, name, dims4(l1)?, dims4(l2)?, None)?;
        if l3.shape().elem_count() != d.o {
            candle_core::bail!("{name}: kernel {:?} and bias {:?} do not fit", l2.shape(), l3.shape())
        }
        let ((x0, x1), (k0, k1), (b0, b1)) = (offsets(l1, name)?, offsets(l2, name)?, offsets(l3, name)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(k), CpuStorage::F32(b)) if self.autocast => {
                CpuStorage::F32(self.forward_bf16(&x[x0..x1], Values::F32(&k[k0..k1]), &b[b0..b1], &d)?)
            }
            (CpuStorage::F32(x), CpuStorage::F32(k), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward_f32(&x[x0..x1], &k[k0..k1], &b[b0..b1], &d)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(k), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.forward_gemm(&x[x0..x1], &k[k0..k1], &b[b0..b1], &d)?)
            }
            // bf16 weights on a CPU without a bf16 unit, and f16 weights (see `bf16::mixed`): f32 products on the
            // widened weights.
            (CpuStorage::F32(x), CpuStorage::BF16(k), CpuStorage::F32(b)) if !Kernel::detect().native() => {
                CpuStorage::F32(self.forward_f32(&x[x0..x1], &k[k0..k1], &b[b0..b1], &d)?)
            }
            (CpuStorage::F32(x), CpuStorage::BF16(k), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward_bf16(&x[x0..x1], Values::Bf16(&k[k0..k1]), &b[b0..b1], &d)?)
            }
            (CpuStorage::F32(x), CpuStorage::F16(k), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward_f32(&x[x0..x1], &k[k0..k1], &b[b0..b1], &d)?)
            }
            _ => candle_core::bail!(
                "{name}: f32 or f64 operands of one dtype (or bf16 or f16 weights) expected, got {:?}",
                candle_core::backend::BackendStorage::dtype(s1)
            ),
        };
        Ok((out, Shape::from((d.b, d.o, d.oh, d.ow))))
    }

    /// Only the gradients someone can use: an operand that is neither a variable nor computed from one (the
    /// locked UNet's weights when training a ControlNet, the noisy latents entering the first convolution) gets
    /// none, which skips a product as large as the forward's.
    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = self.p;
        // A locked bf16 or f16 kernel (mixed precision) needs only the input gradient, which the half-precision
        // weight kernels give.
        let locked_half =
            matches!(kernel.dtype(), DType::BF16 | DType::F16) && !kernel.track_op() && grad.dtype() == DType::F32;
        let fast = grad.device().is_cpu()
            && matches!(grad.dtype(), DType::F32 | DType::F64)
            && x.dtype() == grad.dtype()
            && (kernel.dtype() == grad.dtype() || locked_half);
        let (grad_x, grad_k) = if fast {
            let grad = grad.contiguous()?;
            let grad_x = if x.track_op() {
                let (_, _, h, w) = x.dims4()?;
                let op = Conv2dGradInput { p, h, w, autocast: self.autocast };
                Some(grad.apply_op2_no_bwd(&kernel.contiguous()?, &op)?)
            } else {
                None
            };
            let grad_k = if kernel.track_op() {
                let (_, _, kh, kw) = kernel.dims4()?;
                let op = Conv2dGradWeight { p, kh, kw, autocast: self.autocast };
                Some(x.contiguous()?.apply_op2_no_bwd(&grad, &op)?)
            } else {
                None
            };
            (grad_x, grad_k)
        } else {
            let (grad_x, grad_k) = candle_grads(x, kernel, grad, p)?;
            (Some(grad_x), Some(grad_k))
        };
        // Summing the contiguous pixels first takes candle's fast path for trailing dimensions; a sum over
        // (0, 2, 3) at once walks the tensor element by element (as long as the input gradient here).
        let grad_b = if bias.track_op() {
            let (b, o, oh, ow) = grad.dims4()?;
            Some(grad.reshape((b, o, oh * ow))?.sum(2)?.sum(0)?)
        } else {
            None
        };
        Ok((grad_x, grad_k, grad_b))
    }
}

/// The input and kernel gradients as candle's autograd computes them for `Tensor::conv2d` (slow naive loops on
/// the CPU in candle 0.11.1): the fallback for other devices and dtypes, and the tests' reference.
fn candle_grads(x: &Tensor, kernel: &Tensor, grad: &Tensor, p: Conv2dParams) -> Result<(Tensor, Tensor)> {
    let Conv2dParams { padding, stride } = p;
    let (_, _, h, w) = x.dims4()?;
    let (_, _, k_h, k_w) = kernel.dims4()?;
    // The transposed convolution must give back the input's size, which stride 2 leaves ambiguous; its one
    // output padding serves both axes, so take the larger need and cut the other axis back (an extra row or
    // column does not change the others).
    let covered = |input: usize, out: usize, k: usize| input - ((out - 1) * stride + k - 2 * padding);
    let extra = covered(h, grad.dim(2)?, k_h).max(covered(w, grad.dim(3)?, k_w));
    let grad_x = grad.conv_transpose2d(kernel, padding, extra, stride, 1)?.narrow(2, 0, h)?.narrow(3, 0, w)?;
    // Weight gradient: the input's channels correlated with the output gradient's, dilated by the stride.
    let grad_k = x.transpose(0, 1)?.conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?.transpose(0, 1)?;
    let grad_k = grad_k.narrow(2, 0, k_h)?.narrow(3, 0, k_w)?;
    Ok((grad_x, grad_k))
}

/// The input gradient (B, C, H, W) from the output gradient (B, O, OH, OW) and the kernel (O, C, KH, KW).
/// The input's size is part of the op: with stride 2, OH and OW do not determine it.
struct Conv2dGradInput {
    p: Conv2dParams,
    h: usize,
    w: usize,
    /// The products on the bf16 kernels (autocast's f32 kernel, rounded as read).
    autocast: bool,
}

impl Conv2dGradInput {
    /// The input gradient with `product(n, dst, dst_rs, g)` computing `dst (patch, n; rows dst_rs apart) =
    /// weightsᵀ (patch, O) x g (O, n; rows hw apart)` (overwriting): gemm for f32/f64 kernels, the bf16 kernels
    /// for bf16 ones.
    fn compute<T, P>(&self, g: &[T], d: &Dims, product: P) -> Result<Vec<T>>
    where
        T: WithDType,
        P: Fn(usize, &mut [T], usize, &[T]) -> Result<()>,
    {
        let p = self.p;
        let (in_size, hw, patch) = (d.c * d.h * d.w, d.oh * d.ow, d.patch());
        let mut out = vec![T::zero(); d.b * in_size];
        if p.pointwise(d) {
            // The patch matrix is the input: its gradient (C, H*W) = W^T (C, O) x grad (O, H*W) directly.
            for (g, out) in g.chunks(d.o * hw).zip(out.chunks_mut(in_size)) {
                product(hw, out, hw, g)?;
            }
            return Ok(out);
        }
        let band_rows = Conv2dParams::band_rows(d);
        // The product overwrites each band's columns before `scatter_add` reads them.
        let mut cols = super::unfilled::<T>(patch * band_rows * d.ow);
        for (g, out) in g.chunks(d.o * hw).zip(out.chunks_mut(in_size)) {
            for row0 in (0..d.oh).step_by(band_rows) {
                let rows = band_rows.min(d.oh - row0);
                let n = rows * d.ow;
                let cols = &mut cols[..patch * n];
                product(n, cols, n, &g[row0 * d.ow..])?;
                p.scatter_add(cols, out, d, row0, rows);
            }
        }
        Ok(out)
    }

    fn compute_gemm<T: WithDType>(&self, g: &[T], k: &[T], d: &Dims) -> Result<Vec<T>> {
        let (hw, patch) = (d.oh * d.ow, d.patch());
        self.compute(g, d, |n, dst, dst_rs, g| {
            matmul(patch, n, d.o, dst, (dst_rs, 1), false, Mat::transposed(k, patch), Mat::rows(g, hw))
        })
    }

    /// f32 products: a 3x3 kernel's input gradient on Winograd (the 3x3 convolution of the output gradient
    /// with the kernel flipped and its channels swapped), else gemm on the kernel widened once.
    fn compute_f32<K: Weight + WithDType>(&self, g: &[f32], k: &[K], d: &Dims) -> Result<Vec<f32>> {
        match d.transposed().winograd(self.p) {
            Some(shape) => winograd::conv3x3(g, &flipped(k, d), &vec![0.0; d.c], &shape),
            None => self.compute_gemm(g, &K::widen_all(k), d),
        }
    }

    /// A bf16 kernel (locked, mixed precision) or autocast's f32 one on a bf16 unit: the operands rounded to
    /// bf16 as the product reads them, f32 sums.
    fn compute_bf16(&self, g: &[f32], k: Values, d: &Dims) -> Result<Vec<f32>> {
        use super::bf16::{matmul as bf16_matmul, Operand};
        let (hw, patch) = (d.oh * d.ow, d.patch());
        // Computed transposed, dstᵀ (n, patch) = gᵀ (n, O) x weights (O, patch): the weights are then packed
        // from their rows (packing their transpose, the larger operand, cost half of a training update's time).
        self.compute(g, d, |n, dst, dst_rs, g| {
            let (lhs, rhs) = (Operand::new(Values::F32(g), 1, hw), Operand::new(k, patch, 1));
            bf16_matmul(n, patch, d.o, lhs, rhs, dst, (1, dst_rs), false)
        })
    }
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "conv2d-im2col-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let [b, o, oh, ow] = dims4(l1)?;
        let [ko, c, kh, kw] = dims4(l2)?;
        if ko != o {
            candle_core::bail!("{name}: gradient {:?} and kernel {:?} do not fit", l1.shape(), l2.shape())
        }
        let d = Dims::new(self.p, name, [b, c, self.h, self.w], [o, c, kh, kw], Some((oh, ow)))?;
        let ((g0, g1), (k0, k1)) = (offsets(l1, name)?, offsets(l2, name)?);
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(k)) if self.autocast => {
                CpuStorage::F32(self.compute_bf16(&g[g0..g1], Values::F32(&k[k0..k1]), &d)?)
            }
            (CpuStorage::F32(g), CpuStorage::F32(k)) => {
                CpuStorage::F32(self.compute_f32(&g[g0..g1], &k[k0..k1], &d)?)
            }
            (CpuStorage::F64(g), CpuStorage::F64(k)) => {
                CpuStorage::F64(self.compute_gemm(&g[g0..g1], &k[k0..k1], &d)?)
            }
            // As in the forward pass: f32 products on widened bf16 (no bf16 unit) and f16 kernels.
            (CpuStorage::F32(g), CpuStorage::BF16(k)) if !Kernel::detect().native() => {
                CpuStorage::F32(self.compute_f32(&g[g0..g1], &k[k0..k1], &d)?)
            }
            (CpuStorage::F32(g), CpuStorage::BF16(k)) => {
                CpuStorage::F32(self.compute_bf16(&g[g0..g1], Values::Bf16(&k[k0..k1]), &d)?)
            }
            (CpuStorage::F32(g), CpuStorage::F16(k)) => {
                CpuStorage::F32(self.compute_f32(&g[g0..g1], &k[k0..k1], &d)?)
            }
            _ => candle_core::bail!(
                "{name}: f32 or f64 operands of one dtype (or a bf16 or f16 kernel) expected, got {:?}",
                candle_core::backend::BackendStorage::dtype(s1)
            ),
        };
        Ok((out, Shape::from((d.b, d.c, d.h, d.w))))
    }
}

/// `kernel` (O, C, KH, KW) as the (C, O, KH, KW) kernel of the transposed convolution: each KHxKW window
/// turned by 180 degrees.
fn flipped<T: WithDType>(kernel: &[T], d: &Dims) -> Vec<T> {
    let window = d.kh * d.kw;
    let mut out = super::unfilled::<T>(kernel.len());
    out.par_chunks_mut(d.o * window).enumerate().for_each(|(c, rows)| {
        for (o, dst) in rows.chunks_mut(window).enumerate() {
            let src = &kernel[(o * d.c + c) * window..(o * d.c + c + 1) * window];
            for (v, &s) in dst.iter_mut().zip(src.iter().rev()) {
                *v = s;
            }
        }
    });
    out
}

/// The kernel gradient (O, C, KH, KW) from the input (B, C, H, W) and the output gradient (B, O, OH, OW).
struct Conv2dGradWeight {
    p: Conv2dParams,
    kh: usize,
    kw: usize,
    /// The products on the bf16 kernels (autocast).
    autocast: bool,
}

impl Conv2dGradWeight {
    /// The kernel gradient with `product(len, dst, g, rhs, rhs_stride, accumulate)` computing `dst (O, patch)
    /// [+]= g (O, len; rows hw apart) x rhsᵀ`, where `rhs` is (patch, len) with rows `rhs_stride` apart: gemm, or
    /// the bf16 kernels under autocast. The first product overwrites `dst`, the others add onto it. `dst` is
    /// column-major when `column_major` (then transposed at the end), else row-major (OIHW).
    fn compute<T, P>(&self, x: &[T], g: &[T], d: &Dims, column_major: bool, product: P) -> Result<Vec<T>>
    where
        T: WithDType,
        P: Fn(usize, &mut [T], &[T], &[T], usize, bool) -> Result<()>,
    {
        let p = self.p;
        let (in_size, hw, patch) = (d.c * d.h * d.w, d.oh * d.ow, d.patch());
        if d.b == 0 || hw == 0 {
            return Ok(vec![T::zero(); patch * d.o]);
        }
        // Every element is written by the first product (which overwrites) before any is read.
        let mut acc = super::unfilled::<T>(patch * d.o);
        let mut accumulate = false;
        if p.pointwise(d) {
            for (x, g) in x.chunks(in_size).zip(g.chunks(d.o * hw)) {
                product(hw, &mut acc, g, x, hw, accumulate)?;
                accumulate = true;
            }
        } else {
            // Each band's product reads and writes the whole kernel-sized gradient: bands of at least
            // MIN_GRAD_WEIGHT_PIXELS keep that traffic small against the product's work.
            let band_rows = Conv2dParams::band_rows(d).max(MIN_GRAD_WEIGHT_PIXELS.div_ceil(d.ow)).min(d.oh);
            let mut cols = super::unfilled::<T>(patch * band_rows * d.ow);
            for (x, g) in x.chunks(in_size).zip(g.chunks(d.o * hw)) {
                for row0 in (0..d.oh).step_by(band_rows) {
                    let rows = band_rows.min(d.oh - row0);
                    let n = rows * d.ow;
                    let cols = &mut cols[..patch * n];
                    p.gather(x, cols, d, row0, rows);
                    product(n, &mut acc, &g[row0 * d.ow..], cols, n, accumulate)?;
                    accumulate = true;
                }
            }
        }
        Ok(if column_major { transpose(&acc, patch, d.o) } else { acc })
    }

    /// gemm accumulates a column-major (O, patch) gradient with the patch matrix as read, then transposes it
    /// into OIHW; written row-major (OIHW) directly, gemm would first re-pack the patch matrix (its left operand
    /// then) into the order it wants. The cheaper of the two: the transpose moves the kernel-sized gradient twice,
    /// the re-packing moves every band's patch matrix once (smaller at the 8x8 and 16x16 levels of 1280 channels,
    /// where the transpose was most of the op's time).
    fn compute_gemm<T: WithDType>(&self, x: &[T], g: &[T], d: &Dims) -> Result<Vec<T>> {
        let (hw, patch) = (d.oh * d.ow, d.patch());
        let column_major = d.b * hw >= 2 * d.o;
        let dst_strides = if column_major { (1, d.o) } else { (patch, 1) };
        self.compute(x, g, d, column_major, |len, dst, g, rhs, rhs_stride, accumulate| {
            let (lhs, rhs) = (Mat::rows(g, hw), Mat::transposed(rhs, rhs_stride));
            matmul(d.o, patch, len, dst, dst_strides, accumulate, lhs, rhs)
        })
    }

    fn compute_bf16(&self, x: &[f32], g: &[f32], d: &Dims) -> Result<Vec<f32>> {
        use super::bf16::{matmul as bf16_matmul, Operand};
        let (hw, patch) = (d.oh * d.ow, d.patch());
        self.compute(x, g, d, false, |len, dst, g, rhs, rhs_stride, accumulate| {
            let (lhs, rhs) = (Operand::new(Values::F32(g), hw, 1), Operand::new(Values::F32(rhs), 1, rhs_stride));
            bf16_matmul(d.o, patch, len, lhs, rhs, dst, (patch, 1), accumulate)
        })
    }
}

/// The (cols, rows) transpose of a row-major (rows, cols) matrix, in parallel bands of output rows walked in
/// square blocks (an element-by-element strided walk over a 1280x11520 kernel gradient took 7% of a training
/// update).
fn transpose<T: WithDType>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const BLOCK: usize = 32;
    let mut out = vec![T::zero(); rows * cols];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(band, dst)| {
        let c0 = band * BLOCK;
        let band_cols = dst.len() / rows;
        for r0 in (0..rows).step_by(BLOCK) {
            for c in 0..band_cols {
                for r in r0..(r0 + BLOCK).min(rows) {
                    dst[c * rows + r] = src[r * cols + c0 + c];
                }
            }
        }
    });
    out
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "conv2d-im2col-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let [b, c, h, w] = dims4(l1)?;
        let [gb, o, oh, ow] = dims4(l2)?;
        if gb != b {
            candle_core::bail!("{name}: input {:?} and gradient {:?} do not fit", l1.shape(), l2.shape())
        }
        let d = Dims::new(self.p, name, [b, c, h, w], [o, c, self.kh, self.kw], Some((oh, ow)))?;
        let ((x0, x1), (g0, g1)) = (offsets(l1, name)?, offsets(l2, name)?);
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) if self.autocast => {
                CpuStorage::F32(self.compute_bf16(&x[x0..x1], &g[g0..g1], &d)?)
            }
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.compute_gemm(&x[x0..x1], &g[g0..g1], &d)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.compute_gemm(&x[x0..x1], &g[g0..g1], &d)?)
            }
            _ => candle_core::bail!(
                "{name}: f32 or f64 operands of one dtype expected, got {:?}",
                candle_core::backend::BackendStorage::dtype(s1)
            ),
        };
        Ok((out, Shape::from((d.o, d.c, d.kh, d.kw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_support::{candle_conv2d as reference, max_rel_diff};
    use candle_core::{Device, Var};

    use crate::test_support::max_abs_diff as max_diff;

    /// (in channels, out channels, kernel, stride, padding, height, width): every kernel size, stride and
    /// padding SD uses, odd sizes, and bands that do not divide the rows.
    /// Under autocast a trained f32 convolution multiplies on the bf16 kernels forward and backward: on integers
    /// (exact in bf16) every output and gradient equals the f32 op's; on random values the results are the f32
    /// ones to bf16's rounding, and not bit for bit.
    #[test]
    fn autocast_runs_on_the_bf16_kernels() {
        use crate::model::ops::bf16::autocast;
        let dev = Device::Cpu;
        let ints = |shape: &[usize]| {
            Tensor::randn(0f32, 2., shape, &dev).unwrap().round().unwrap().clamp(-4f32, 4f32).unwrap()
        };
        let rand = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &dev).unwrap();
        for (c, o, k, stride, padding, h, w) in SHAPES.into_iter().chain(PACKED_SHAPES.into_iter().take(4)) {
            let p = Conv2dParams { padding, stride };
            let case = format!("{c}->{o} k{k} s{stride} p{padding} {h}x{w}");
            for exact in [true, false] {
                let make = |shape: &[usize]| if exact { ints(shape) } else { rand(shape) };
                let (x, kernel, bias) = (make(&[2, c, h, w]), make(&[o, c, k, k]), make(&[o]));
                let r = make(&[2, o, p.out_size(h, k).unwrap(), p.out_size(w, k).unwrap()]);
                let run = |on: bool| {
                    let (x, kernel, bias) = (
                        Var::from_tensor(&x).unwrap(),
                        Var::from_tensor(&kernel).unwrap(),
                        Var::from_tensor(&bias).unwrap(),
                    );
                    let y =
                        autocast::scope(on, || conv2d(x.as_tensor(), kernel.as_tensor(), bias.as_tensor(), p)).unwrap();
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    [y, g.get(&x).unwrap().clone(), g.get(&kernel).unwrap().clone(), g.get(&bias).unwrap().clone()]
                };
                let (ours, f32s) = (run(true), run(false));
                for (which, a, b) in ["output", "input grad", "kernel grad", "bias grad"]
                    .iter()
                    .zip(&ours)
                    .zip(&f32s)
                    .map(|((w, a), b)| (w, a, b))
                {
                    let diff = max_rel_diff(a, b);
                    if exact {
                        assert_eq!(max_diff(a, b), 0.0, "{case}: {which}");
                    } else if *which != "bias grad" {
                        assert!(diff > 0.0 && diff < 0.05, "{case}: {which} off by {diff}");
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_of_odd_shapes() {
        for (rows, cols) in [(1, 1), (3, 70), (70, 3), (33, 65), (64, 32)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], src[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }

    const SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 8] = [
        (3, 5, 3, 1, 1, 7, 9),
        (4, 6, 3, 2, 1, 9, 8),
        (4, 6, 3, 2, 0, 9, 8),
        (6, 4, 1, 1, 0, 5, 7),
        (2, 3, 1, 2, 0, 6, 6),
        (3, 2, 5, 1, 2, 6, 5),
        (64, 8, 3, 1, 1, 40, 33),
        // Enough channels and tiles for Winograd (forward and input gradient), with half tiles at the edges.
        (32, 40, 3, 1, 1, 19, 23),
    ];

    /// [`SHAPES`] against candle's convolution.
    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        for (c, o, k, stride, padding, h, w) in SHAPES {
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let kernel = Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let p = Conv2dParams { padding, stride };
            let ours = conv2d(&x, &kernel, &bias, p).unwrap();
            let want = reference(&x, &kernel, &bias, p);
            assert_eq!(ours.dims(), want.dims());
            let scale = crate::test_support::max_abs(&want);
            let diff = max_diff(&ours, &want);
            assert!(diff <= 1e-5 * scale.max(1.0), "{c}->{o} k{k} s{stride} p{padding} {h}x{w}: {diff}");
        }
    }

    /// bf16 weights with f32 activations (the bf16 kernels), and f16 ones (f32 products): exactly the f32
    /// convolution of the same values when they are small integers (exact in bf16 and f16, exact sums), over
    /// [`SHAPES`] and a 32-channel 3x3 one (whole tiles: bf16 weights are read in place); a tracked input takes
    /// the f32 path and its backward.
    #[test]
    fn half_weights_match_f32() {
        let dev = Device::Cpu;
        let ints = |shape: &[usize]| {
            let t = Tensor::randn(0f32, 2., shape, &dev).unwrap().round().unwrap();
            t.clamp(-4f32, 4f32).unwrap()
        };
        let shapes = || SHAPES.into_iter().chain([(32, 64, 3, 1, 1, 9, 7)]);
        for half in [DType::BF16, DType::F16] {
            for (c, o, k, stride, padding, h, w) in shapes().chain(PACKED_SHAPES) {
                let (x, kernel, bias) = (ints(&[2, c, h, w]), ints(&[o, c, k, k]), ints(&[o]));
                let p = Conv2dParams { padding, stride };
                let ours = conv2d(&x, &kernel.to_dtype(half).unwrap(), &bias, p).unwrap();
                assert_eq!(ours.dtype(), DType::F32);
                let diff = max_diff(&ours, &conv2d(&x, &kernel, &bias, p).unwrap());
                assert_eq!(diff, 0.0, "{half:?} {c}->{o} k{k} s{stride} p{padding} {h}x{w}");
            }
            // A locked half-precision kernel on a tracked input (mixed-precision training): the input gradient
            // from its kernels equals the f32 one on integers, and the kernel gets none.
            for (c, o, k, stride, padding, h, w) in shapes() {
                let p = Conv2dParams { padding, stride };
                let x = Var::from_tensor(&ints(&[2, c, h, w])).unwrap();
                let (kernel, bias) = (ints(&[o, c, k, k]), ints(&[o]));
                let kernel16 = kernel.to_dtype(half).unwrap();
                let y = conv2d(x.as_tensor(), &kernel16, &bias, p).unwrap();
                let r = ints(y.dims());
                let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let want = (conv2d(x.as_tensor(), &kernel, &bias, p).unwrap() * &r).unwrap().sum_all().unwrap();
                let want = want.backward().unwrap();
                let diff = max_diff(grads.get(x.as_tensor()).unwrap(), want.get(x.as_tensor()).unwrap());
                assert_eq!(diff, 0.0, "{half:?} input gradient {c}->{o} k{k} s{stride} p{padding} {h}x{w}");
                assert!(grads.get(&kernel16).is_none());
            }
        }
    }

    /// f16 weights keep what f16 holds: on random values (not exact in bf16) the convolution is the f32 one on
    /// the f16-rounded weights up to f32 summation, and Winograd's shape takes it too. bf16 weights on a CPU
    /// without a bf16 unit likewise: the f32 convolution of the bf16 values.
    #[test]
    fn f16_weights_are_not_rounded_to_bf16() {
        let dev = Device::Cpu;
        for (c, o, k, stride, padding, h, w) in [(32, 40, 3, 1, 1, 19, 23), (3, 5, 3, 2, 1, 9, 8)] {
            let p = Conv2dParams { padding, stride };
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let kernel = Tensor::randn(0f32, 0.2, (o, c, k, k), &dev).unwrap().to_dtype(DType::F16).unwrap();
            let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let ours = conv2d(&x, &kernel, &bias, p).unwrap();
            let want = reference(
                &x.to_dtype(DType::F64).unwrap(),
                &kernel.to_dtype(DType::F64).unwrap(),
                &bias.to_dtype(DType::F64).unwrap(),
                p,
            );
            let rel = max_rel_diff(&ours.to_dtype(DType::F64).unwrap(), &want);
            assert!(rel < 1e-5, "{c}->{o} k{k} s{stride}: {rel}");
            let kernel_bf16 = kernel.to_dtype(DType::BF16).unwrap();
            let bf16 = conv2d(&x, &kernel_bf16, &bias, p).unwrap();
            let rel16 = max_rel_diff(&bf16.to_dtype(DType::F64).unwrap(), &want);
            assert!(rel16 > 10.0 * rel, "bf16 {rel16} vs f16 {rel}: the test does not tell them apart");
            if !Kernel::detect().native() {
                // Without a bf16 unit the bf16 weights are widened and the activations not rounded: the f32
                // convolution of the bf16 values.
                let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let widened = reference(&f64(&x), &f64(&kernel_bf16), &f64(&bias), p);
                let rel_widened = max_rel_diff(&f64(&bf16), &widened);
                assert!(rel_widened < 1e-5, "bf16 weights, {c}->{o} k{k} s{stride}: {rel_widened}");
            }
        }
    }

    /// Shapes whose bf16 patches are gathered straight into the packed layout (stride 1, output rows of whole
    /// tiles): padding 1 and 0, a 5x5 window, patches shorter than one k tile, and several bands.
    const PACKED_SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 5] = [
        (32, 64, 3, 1, 1, 9, 16),
        (3, 5, 3, 1, 1, 7, 32),
        (5, 4, 3, 1, 0, 6, 18),
        (3, 2, 5, 1, 2, 6, 16),
        (256, 8, 3, 1, 1, 70, 64),
    ];

    /// The packed gather gives the bits `pack_b` makes of the f32 gather's patch matrix, on random values (so
    /// the rounding is exercised), for every band of [`PACKED_SHAPES`].
    #[test]
    fn packed_gather_is_the_packed_patch_matrix() {
        use crate::model::ops::bf16::{avx512_paths, pack_b, packed_len, Operand};
        if !avx512_paths() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        for (c, o, k, stride, padding, h, w) in PACKED_SHAPES {
            let p = Conv2dParams { padding, stride };
            let (oh, ow) = (p.out_size(h, k).unwrap(), p.out_size(w, k).unwrap());
            let d = Dims { b: 1, c, h, w, o, kh: k, kw: k, oh, ow };
            let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0137).collect();
            let band_rows = Conv2dParams::band_rows(&d);
            assert!(band_rows < oh || (c, h) != (256, 70), "the large shape must span several bands");
            for row0 in (0..oh).step_by(band_rows) {
                let rows = band_rows.min(oh - row0);
                let (n, patch) = (rows * ow, d.patch());
                let mut cols = vec![0f32; patch * n];
                p.gather(&x, &mut cols, &d, row0, rows);
                let want = pack_b(Operand::new(Values::F32(&cols), n, 1), patch, n, true);
                let mut ours = vec![7u16; packed_len(patch, n)];
                p.gather_packed(&x, &mut ours, &d, row0, rows);
                assert!(ours == want, "{c}->{o} k{k} p{padding} {h}x{w}, rows {row0}+{rows}");
            }
        }
    }

    /// Band boundaries: a tall input whose patch matrix needs several bands.
    #[test]
    fn several_bands_match() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 256, 70, 64), &dev).unwrap();
        let kernel = Tensor::randn(0f32, 1., (3, 256, 3, 3), &dev).unwrap();
        let bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let p = Conv2dParams { padding: 1, stride: 1 };
        const { assert!(BAND_ELEMENTS / (256 * 9 * 64) < 70, "the test must span several bands") };
        let diff = max_diff(&conv2d(&x, &kernel, &bias, p).unwrap(), &reference(&x, &kernel, &bias, p));
        assert!(diff < 1e-3, "{diff}");
    }

    /// The gradient ops against candle's formulas (what the backward used before them) in f32, over [`SHAPES`],
    /// two inputs whose patch matrices span several bands (stride 1 and 2: col2im adds across band edges), and
    /// two with more output channels than pixels, whose kernel gradient gemm writes row-major (3x3 and 1x1).
    #[test]
    fn gradients_match_candle_formulas() {
        let dev = Device::Cpu;
        let banded = [(256, 3, 3, 1, 1, 70, 64), (256, 3, 3, 2, 1, 70, 64)];
        const { assert!(BAND_ELEMENTS / (256 * 9 * 64) < 70 && BAND_ELEMENTS / (256 * 9 * 32) < 35, "several bands") };
        // Batch 2: 2 * pixels < 2 * out channels.
        let row_major = [(8, 48, 3, 1, 1, 4, 5), (6, 40, 1, 1, 0, 3, 4)];
        for (c, o, k, stride, padding, h, w) in SHAPES.into_iter().chain(banded).chain(row_major) {
            let p = Conv2dParams { padding, stride };
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let kernel = Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap();
            let (oh, ow) = (p.out_size(h, k).unwrap(), p.out_size(w, k).unwrap());
            let grad = Tensor::randn(0f32, 1., (2, o, oh, ow), &dev).unwrap();
            let (want_x, want_k) = candle_grads(&x, &kernel, &grad, p).unwrap();
            let got_x = grad.apply_op2_no_bwd(&kernel, &Conv2dGradInput { p, h, w, autocast: false }).unwrap();
            let got_k = x.apply_op2_no_bwd(&grad, &Conv2dGradWeight { p, kh: k, kw: k, autocast: false }).unwrap();
            let case = format!("{c}->{o} k{k} s{stride} p{padding} {h}x{w}");
            assert_eq!(got_x.dims(), want_x.dims(), "{case}");
            assert_eq!(got_k.dims(), want_k.dims(), "{case}");
            for (which, got, want) in [("input", got_x, want_x), ("kernel", got_k, want_k)] {
                let diff = max_rel_diff(&got, &want);
                assert!(diff <= 1e-4, "{case}: {which} gradient off by {diff}");
            }
        }
    }

    /// Gradients of all three operands against central finite differences (f64), for stride 1 and 2 and the
    /// 1x1 shortcut.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for (kernel, stride, padding, h) in [(3, 1, 1, 5), (3, 2, 1, 5), (3, 2, 0, 6), (1, 1, 0, 4)] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, h, h), &dev).unwrap()).unwrap();
            let k = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 3, kernel, kernel), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f64, 1., 4, &dev).unwrap()).unwrap();
            let p = Conv2dParams { padding, stride };
            let out_shape = conv2d(&x, &k, &b, p).unwrap().shape().clone();
            // A random linear functional of the output, so every output element matters.
            let r = Tensor::randn(0f64, 1., out_shape, &dev).unwrap();
            let loss = |x: &Tensor, k: &Tensor, b: &Tensor| -> f64 {
                (conv2d(x, k, b, p).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let grads = (conv2d(&x, &k, &b, p).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let eps = 1e-6;
            for (which, var) in [("x", &x), ("kernel", &k), ("bias", &b)] {
                let g: Vec<f64> = grads.get(var).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
                for i in (0..base.len()).step_by(7) {
                    let nudge = |delta: f64| {
                        let mut v = base.clone();
                        v[i] += delta;
                        let t = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                        match which {
                            "x" => loss(&t, &k, &b),
                            "kernel" => loss(&x, &t, &b),
                            _ => loss(&x, &k, &t),
                        }
                    };
                    let numeric = (nudge(eps) - nudge(-eps)) / (2.0 * eps);
                    assert!(
                        (numeric - g[i]).abs() < 1e-6 * numeric.abs().max(1.0),
                        "{which}[{i}] s{stride}: {numeric} vs {}",
                        g[i]
                    );
                }
            }
        }
    }

    /// Operands that are neither variables nor computed from one get no gradient (nothing could use it), the
    /// others still get theirs.
    #[test]
    fn untracked_operands_get_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (1, 2, 5, 5), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (3, 2, 3, 3), &dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let p = Conv2dParams { padding: 1, stride: 1 };
        let grads = conv2d(&x, &k, &b, p).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&k).is_none() && grads.get(&b).is_none());
    }
}
