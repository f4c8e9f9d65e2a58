//! 2-D convolution on the CPU as im2col + one matrix product per band of output rows, in NCHW throughout.
//!
//! candle 0.11.1's CPU convolution converts the input to NHWC and re-lays out the kernel on one thread at every
//! call, then gathers each tile's patches with scattered writes; in the VAE decoder that gathering took twice
//! as long as the arithmetic (`perf`). Here the patch matrix is built with its rows in the kernel's own
//! (in-channel, ky, kx) order, so the OIHW weights are already the left matrix, the rows of each patch row are
//! contiguous copies of input rows, and the product writes straight into the NCHW output, bias included.
//!
//! The backward pass uses candle's own convolution ops (the same formulas as candle's autograd), so training
//! through these layers is unchanged.
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Target size of one band's patch matrix (elements): big enough for an efficient matrix product, small
/// enough to stay in the last-level cache instead of materialising a 9x copy of a 512x512 VAE activation.
const BAND_ELEMENTS: usize = 1 << 21;

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
}

/// `conv2d(x, weight) + bias` as one op: `x` (B, C, H, W), `weight` (O, C, KH, KW), `bias` (O).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, params: Conv2dParams) -> Result<Tensor> {
    let fast = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && params.stride > 0;
    if !fast {
        let y = x.conv2d(weight, params.padding, params.stride, 1, 1)?;
        return y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?);
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Conv2dOp(params))
}

struct Conv2dOp(Conv2dParams);

/// Dimensions of one call, checked once.
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

impl Conv2dOp {
    fn dims(&self, x: &Layout, k: &Layout, bias: &Layout) -> Result<Dims> {
        let (b, c, h, w) = x.shape().dims4()?;
        let (o, kc, kh, kw) = k.shape().dims4()?;
        if kc != c || bias.shape().elem_count() != o {
            candle_core::bail!(
                "conv2d: input {:?}, kernel {:?} and bias {:?} do not fit",
                x.shape(),
                k.shape(),
                bias.shape()
            )
        }
        let (Some(oh), Some(ow)) = (self.0.out_size(h, kh), self.0.out_size(w, kw)) else {
            candle_core::bail!("conv2d: kernel {kh}x{kw} is larger than the padded input {h}x{w}")
        };
        Ok(Dims { b, c, h, w, o, kh, kw, oh, ow })
    }

    fn forward<T: WithDType>(&self, x: &[T], k: &[T], bias: &[T], d: &Dims) -> Vec<T> {
        let p = self.0;
        let hw = d.oh * d.ow;
        let patch = d.c * d.kh * d.kw;
        let mut out = vec![T::zero(); d.b * d.o * hw];
        // Bias first: the product then accumulates onto it (no separate pass over the output).
        for (plane, &bias) in out.chunks_mut(hw).zip(bias.iter().cycle()) {
            plane.fill(bias);
        }
        let pointwise = d.kh == 1 && d.kw == 1 && p.stride == 1 && p.padding == 0;
        let band_rows = (BAND_ELEMENTS / (patch * d.ow).max(1)).clamp(1, d.oh);
        let mut cols = if pointwise { Vec::new() } else { vec![T::zero(); patch * band_rows * d.ow] };
        for item in 0..d.b {
            let input = &x[item * d.c * d.h * d.w..(item + 1) * d.c * d.h * d.w];
            let output = &mut out[item * d.o * hw..(item + 1) * d.o * hw];
            if pointwise {
                // A 1x1 convolution is the product itself: (O, C) x (C, H*W).
                matmul(d.o, hw, d.c, output, hw, k, input, hw);
                continue;
            }
            for row0 in (0..d.oh).step_by(band_rows) {
                let rows = band_rows.min(d.oh - row0);
                let n = rows * d.ow;
                let cols = &mut cols[..patch * n];
                self.gather(input, cols, d, row0, rows);
                matmul(d.o, n, patch, &mut output[row0 * d.ow..], hw, k, cols, n);
            }
        }
        out
    }

    /// Fills `cols` (C*KH*KW rows of `rows * ow` values) with the input pixels each output pixel of rows
    /// `row0..row0 + rows` sees, zero where the kernel hangs over the padding.
    fn gather<T: WithDType>(&self, input: &[T], cols: &mut [T], d: &Dims, row0: usize, rows: usize) {
        let (pad, stride) = (self.0.padding as isize, self.0.stride);
        let n = rows * d.ow;
        // One input channel's KH*KW patch rows per task.
        cols.par_chunks_mut(d.kh * d.kw * n).enumerate().for_each(|(ch, block)| {
            let plane = &input[ch * d.h * d.w..(ch + 1) * d.h * d.w];
            for ky in 0..d.kh {
                for kx in 0..d.kw {
                    let dst_row = &mut block[(ky * d.kw + kx) * n..(ky * d.kw + kx + 1) * n];
                    for (r, dst) in dst_row.chunks_mut(d.ow).enumerate() {
                        let y = ((row0 + r) * stride) as isize + ky as isize - pad;
                        if y < 0 || y >= d.h as isize {
                            dst.fill(T::zero());
                            continue;
                        }
                        let src = &plane[y as usize * d.w..(y as usize + 1) * d.w];
                        // Output columns whose input column x = ox*stride + kx - pad lies inside the row:
                        // first <= ox < end.
                        let x_of = |ox: usize| (ox * stride) as isize + kx as isize - pad;
                        let at_least = |lo: isize| if lo <= 0 { 0 } else { (lo as usize).div_ceil(stride).min(d.ow) };
                        let first = at_least(pad - kx as isize);
                        let end = at_least(d.w as isize + pad - kx as isize).max(first);
                        dst[..first].fill(T::zero());
                        dst[end..].fill(T::zero());
                        if stride == 1 {
                            let x0 = x_of(first) as usize;
                            dst[first..end].copy_from_slice(&src[x0..x0 + end - first]);
                        } else {
                            for (ox, v) in dst[first..end].iter_mut().enumerate() {
                                *v = src[x_of(first + ox) as usize];
                            }
                        }
                    }
                }
            }
        });
    }
}

/// `dst (m, n; row stride dst_rs) += lhs (m, k; contiguous) x rhs (k, n; row stride rhs_rs)` on all threads.
#[allow(clippy::too_many_arguments)]
fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    lhs: &[T],
    rhs: &[T],
    rhs_rs: usize,
) {
    debug_assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    debug_assert!(lhs.len() >= m * k && (k == 0 || rhs.len() >= (k - 1) * rhs_rs + n));
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the slices cover every element the strides address (checked above in debug builds; the callers
    // derive all sizes from the same checked dims), and dst does not overlap the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
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
        let d = self.dims(l1, l2, l3)?;
        let contiguous = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("conv2d: strided operand".into()))
        };
        let ((x0, x1), (k0, k1), (b0, b1)) = (contiguous(l1)?, contiguous(l2)?, contiguous(l3)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(k), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward(&x[x0..x1], &k[k0..k1], &b[b0..b1], &d))
            }
            (CpuStorage::F64(x), CpuStorage::F64(k), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.forward(&x[x0..x1], &k[k0..k1], &b[b0..b1], &d))
            }
            _ => candle_core::bail!(
                "conv2d: f32 or f64 operands of one dtype expected, got {:?}",
                candle_core::backend::BackendStorage::dtype(s1)
            ),
        };
        Ok((out, Shape::from((d.b, d.o, d.oh, d.ow))))
    }

    /// The gradients as candle's autograd computes them for `Tensor::conv2d`, plus the bias's.
    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Conv2dParams { padding, stride } = self.0;
        let (_, _, k_h, k_w) = kernel.dims4()?;
        // The transposed convolution must give back the input's size, which stride 2 leaves ambiguous.
        let covered = (grad.dim(2)? - 1) * stride + k_h - 2 * padding;
        let grad_x = grad.conv_transpose2d(kernel, padding, x.dim(2)? - covered, stride, 1)?;
        // Weight gradient: the input's channels correlated with the output gradient's, dilated by the stride.
        let grad_k = x.transpose(0, 1)?.conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?.transpose(0, 1)?;
        let grad_k = grad_k.narrow(2, 0, k_h)?.narrow(3, 0, k_w)?;
        let grad_b = grad.sum((0, 2, 3))?;
        Ok((Some(grad_x), Some(grad_k), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn reference(x: &Tensor, k: &Tensor, b: &Tensor, p: Conv2dParams) -> Tensor {
        let y = x.conv2d(k, p.padding, p.stride, 1, 1).unwrap();
        y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Every kernel size, stride and padding SD uses (and odd sizes, and bands that do not divide the rows)
    /// against candle's convolution.
    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        for (c, o, k, stride, padding, h, w) in [
            (3, 5, 3, 1, 1, 7, 9),
            (4, 6, 3, 2, 1, 9, 8),
            (4, 6, 3, 2, 0, 9, 8),
            (6, 4, 1, 1, 0, 5, 7),
            (2, 3, 1, 2, 0, 6, 6),
            (3, 2, 5, 1, 2, 6, 5),
            (64, 8, 3, 1, 1, 40, 33),
        ] {
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let kernel = Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let p = Conv2dParams { padding, stride };
            let ours = conv2d(&x, &kernel, &bias, p).unwrap();
            let want = reference(&x, &kernel, &bias, p);
            assert_eq!(ours.dims(), want.dims());
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let diff = max_diff(&ours, &want);
            assert!(diff <= 1e-5 * scale.max(1.0), "{c}->{o} k{k} s{stride} p{padding} {h}x{w}: {diff}");
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

    /// Gradients of all three operands against central finite differences (f64), for stride 1 and 2.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for (stride, padding, h) in [(1, 1, 5), (2, 1, 5), (2, 0, 6)] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, h, h), &dev).unwrap()).unwrap();
            let k = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 3, 3, 3), &dev).unwrap()).unwrap();
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
}
