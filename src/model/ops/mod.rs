//! Fused CPU kernels for the layers that dominate a denoising step, each with a backward pass (training
//! reuses the layers, a finite-difference test checks each) and a fallback to candle's ops on other devices
//! and for half precision.
pub mod attention;
pub mod bf16;
pub mod conv2d;
pub mod frozen;
pub mod geglu;
pub mod linear;
mod math;
mod matmul;
pub mod norm;
pub mod softmax;
pub mod winograd;

/// A vector of `len` elements as the allocator hands them out, not cleared, for an output or scratch buffer
/// whose every element the kernel writes before anything reads it. `vec![0.0; len]` clears it first (a
/// `memset`, or fresh zero pages): ~5 % of a bf16 step, for memory written over at once. The same pattern as
/// candle's own `alloc_uninit` (Copy types that every bit pattern is a value of).
#[allow(clippy::uninit_vec)]
pub(crate) fn unfilled<T: candle_core::WithDType>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: T is a plain number type (f32, f64, bf16, ...: Copy, no Drop, every bit pattern valid), and the
    // callers write every element before reading any.
    unsafe { v.set_len(len) };
    v
}

/// A weight value type the f32 products read: f32, or bf16 / f16 weights widened to f32 (exactly) as read.
pub(crate) trait Weight: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// All of `values` as f32: f32 ones borrowed, half ones converted on all threads (the slice conversion
    /// uses F16C's `vcvtph2ps` for f16 where the CPU has it).
    fn widen_all(values: &[Self]) -> std::borrow::Cow<'_, [f32]>;
}

impl Weight for f32 {
    fn widen(self) -> f32 {
        self
    }

    fn widen_all(values: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(values)
    }
}

/// Values one task widens.
const WIDEN_CHUNK: usize = 1 << 14;

macro_rules! half_weight {
    ($t:ty) => {
        impl Weight for $t {
            fn widen(self) -> f32 {
                self.to_f32()
            }

            fn widen_all(values: &[$t]) -> std::borrow::Cow<'_, [f32]> {
                use half::slice::HalfFloatSliceExt;
                use rayon::prelude::*;
                // Every element is written by the conversion below.
                let mut out = unfilled::<f32>(values.len());
                out.par_chunks_mut(WIDEN_CHUNK)
                    .zip(values.par_chunks(WIDEN_CHUNK))
                    .for_each(|(o, h)| h.convert_to_f32_slice(o));
                std::borrow::Cow::Owned(out)
            }
        }
    };
}
half_weight!(half::bf16);
half_weight!(half::f16);

/// A bf16 or f16 tensor on the CPU as f32, converted on all threads (candle's `to_dtype` converts on one): the
/// weights of a layer whose products run in f32. A tracked tensor (trained half weights) goes through
/// `to_dtype`, which records the conversion for the backward; other dtypes and devices too.
pub fn widened(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{CpuStorage, Storage};
    if t.track_op() || !t.device().is_cpu() {
        return t.to_dtype(candle_core::DType::F32);
    }
    let t = t.contiguous()?;
    let values = {
        let (storage, layout) = t.storage_and_layout();
        let (a, b) = offsets(layout, "widen")?;
        match &*storage {
            Storage::Cpu(CpuStorage::BF16(v)) => Some(Weight::widen_all(&v[a..b]).into_owned()),
            Storage::Cpu(CpuStorage::F16(v)) => Some(Weight::widen_all(&v[a..b]).into_owned()),
            _ => None,
        }
    };
    match values {
        Some(values) => candle_core::Tensor::from_vec(values, t.shape(), t.device()),
        None => t.to_dtype(candle_core::DType::F32),
    }
}

/// The storage range of a contiguous operand (the kernels' entry points pass contiguous tensors), or an error
/// naming the op.
pub(crate) fn offsets(l: &candle_core::Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: operands must be contiguous")))
}

/// The gradients of a fused backward's three operands out of its flat result `[grad_a | grad_b | grad_c]`, each
/// shaped like its operand; none for an operand that is not tracked (nothing is copied for it).
pub(crate) fn flat_parts(
    all: &candle_core::Tensor,
    operands: [&candle_core::Tensor; 3],
) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
    let mut start = 0;
    let [a, b, c] = operands.map(|like| {
        let (at, len) = (start, like.elem_count());
        start += len;
        like.track_op().then(|| all.narrow(0, at, len)?.reshape(like.shape())).transpose()
    });
    Ok((a?, b?, c?))
}

#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{Device, Result, Tensor, Var};

    pub use crate::test_support::max_rel_diff;

    /// candle's own convolution plus the bias: the reference of the convolution kernels' tests.
    pub fn candle_conv2d(x: &Tensor, k: &Tensor, b: &Tensor, p: super::conv2d::Conv2dParams) -> Tensor {
        let y = x.conv2d(k, p.padding, p.stride, 1, 1).unwrap();
        y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap()).unwrap()
    }

    /// Checks the gradients `f`'s backward pass gives its inputs (random f64 tensors of `shapes`) against
    /// central finite differences of `sum(f(inputs) · r)` for a random `r`, at every input element.
    pub fn check_gradients(shapes: &[&[usize]], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = shapes.iter().map(|s| Var::randn(0f64, 1., s.to_vec(), &dev).unwrap()).collect();
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&inputs).unwrap();
        let r = Tensor::randn(0f64, 1., out.shape(), &dev).unwrap();
        let loss = |ts: &[Tensor]| -> f64 { (f(ts).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar().unwrap() };
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-6;
        for (i, var) in vars.iter().enumerate() {
            let g: Vec<f64> =
                grads.get(var).expect("a gradient for every input").flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for j in 0..base.len() {
                let nudged = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    let mut ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
                    ts[i] = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                    loss(&ts)
                };
                let numeric = (nudged(eps) - nudged(-eps)) / (2.0 * eps);
                let tol = 1e-6 * numeric.abs().max(1.0);
                assert!(
                    (numeric - g[j]).abs() < tol,
                    "input {i}[{j}]: finite difference {numeric} vs backward {}",
                    g[j]
                );
            }
        }
    }
}
