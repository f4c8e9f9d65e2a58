//! An f32 `nn.Linear` on the CPU as one op, forward and backward.
//!
//! `candle_nn::Linear` is a matmul with the transposed weight broadcast over the batch, then a broadcast add of
//! the bias. In training each of those is a graph node, and candle's backward gives every node its own
//! gradient, added into a fresh zero tensor: the weight's gradient is formed transposed, summed over the
//! broadcast, transposed back (a strided add) and added once more, four weight-sized passes per layer; the
//! bias's is a strided reduction over every row. Here the layer is one op on the rows of its input:
//! 1. forward: `y = x Wᵀ` by gemm, then the bias added in place (the rounding of candle's matmul-then-add);
//! 2. backward: the input gradient `g W`, the weight gradient `gᵀ x` written in the weight's own (out, in)
//!    layout, and the bias gradient, the columns of `g` summed.
//!
//! Inference runs it too: the bias added in place saves the broadcast add's second pass over the whole output
//! (at 512 px a feed-forward's is 84 MB) and its fresh tensor.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{matmul, Mat};
use super::offsets;

/// Columns of the gradient one task sums for the bias gradient.
const BIAS_COLUMNS: usize = 64;

/// Whether [`linear`] runs the layer: an f32 input, weight and bias, all on the CPU.
pub fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu)
}

/// `x (..., in) · weightᵀ (in, out) + bias` for f32 CPU tensors ([`applies`]), backward included.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_d, in_d) = weight.dims2()?;
    let mut dims = x.dims().to_vec();
    if dims.last() != Some(&in_d) {
        candle_core::bail!("{}: input {:?} does not end in the weight's {in_d} inputs", LinearOp::NAME, x.shape())
    }
    let rows = x.elem_count() / in_d.max(1);
    let x2 = x.contiguous()?.reshape((rows, in_d))?;
    let weight = weight.contiguous()?;
    let y = match bias {
        Some(b) => x2.apply_op3(&weight, &b.contiguous()?, LinearOp)?,
        None => x2.apply_op2(&weight, LinearOp)?,
    };
    if let Some(last) = dims.last_mut() {
        *last = out_d;
    }
    y.reshape(dims)
}

/// y (rows, out) = x (rows, in) · W (out, in)ᵀ [+ b (out)].
struct LinearOp;

/// The (rows, columns) of a 2-D operand, and its values if f32 and contiguous.
fn matrix<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], (usize, usize))> {
    let dims = l.shape().dims2()?;
    let (a, b) = offsets(l, op)?;
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: f32 operands expected") };
    Ok((&v[a..b], dims))
}

impl LinearOp {
    /// The op's name as both of its forms (with and without a bias) report it, and its errors start.
    const NAME: &'static str = "linear";

    fn forward(&self, (s1, l1): (&CpuStorage, &Layout), (s2, l2): (&CpuStorage, &Layout)) -> Result<Vec<f32>> {
        let name = Self::NAME;
        let ((x, (rows, in_d)), (w, (out_d, w_in))) = (matrix(s1, l1, name)?, matrix(s2, l2, name)?);
        if w_in != in_d {
            candle_core::bail!("{name}: input {:?} and weight {:?} do not fit", l1.shape(), l2.shape())
        }
        // The product (accumulate = false) writes every element.
        let mut y = super::unfilled::<f32>(rows * out_d);
        matmul(rows, out_d, in_d, &mut y, (out_d, 1), false, Mat::rows(x, in_d), Mat::transposed(w, in_d))?;
        Ok(y)
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward((s1, l1), (s2, l2))?;
        let shape = Shape::from((l1.dims()[0], l2.dims()[0]));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w, _) = gradients(x, w, None, grad)?;
        Ok((grad_x, grad_w))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        Self::NAME
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
        let mut y = self.forward((s1, l1), (s2, l2))?;
        let out_d = l2.dims()[0];
        let name = Self::NAME;
        let (b0, b1) = offsets(l3, name)?;
        let CpuStorage::F32(b) = s3 else { candle_core::bail!("{name}: an f32 bias expected") };
        let bias = &b[b0..b1];
        if bias.len() != out_d {
            candle_core::bail!("{name}: bias {:?} does not fit {out_d} outputs", l3.shape())
        }
        if out_d > 0 {
            y.par_chunks_mut(out_d).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b));
        }
        Ok((CpuStorage::F32(y), Shape::from((l1.dims()[0], out_d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        gradients(x, w, Some(b), grad)
    }
}

/// The gradients of the tracked operands: input `g W`, weight `gᵀ x`, bias `Σ_rows g`.
fn gradients(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let grad_x = x.track_op().then(|| grad.apply_op2_no_bwd(w, &GradProduct::Input)).transpose()?;
    let grad_w = w.track_op().then(|| grad.apply_op2_no_bwd(x, &GradProduct::Weight)).transpose()?;
    let grad_b = b.filter(|b| b.track_op()).map(|_| column_sums(&grad)).transpose()?;
    Ok((grad_x, grad_w, grad_b))
}

/// The backward's two products with the output's gradient `grad` (rows, out) as first operand: the input
/// gradient `grad · W` (rows, in) with the weight (out, in), or the weight gradient `gradᵀ · x` (out, in), in the
/// weight's layout, with the input (rows, in).
enum GradProduct {
    Input,
    Weight,
}

impl CustomOp2 for GradProduct {
    fn name(&self) -> &'static str {
        match self {
            GradProduct::Input => "linear-grad-input",
            GradProduct::Weight => "linear-grad-weight",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let ((g, (rows, out_d)), (b, (b_rows, in_d))) = (matrix(s1, l1, name)?, matrix(s2, l2, name)?);
        // The weight has a row per output, the input a row per row of the gradient.
        let fits = match self {
            GradProduct::Input => b_rows == out_d,
            GradProduct::Weight => b_rows == rows,
        };
        if !fits {
            candle_core::bail!("{name}: gradient {:?} and {:?} do not fit", l1.shape(), l2.shape())
        }
        let (m, k, lhs) = match self {
            GradProduct::Input => (rows, out_d, Mat::rows(g, out_d)),
            GradProduct::Weight => (out_d, rows, Mat::transposed(g, out_d)),
        };
        // The product (accumulate = false) writes every element: zeros when k is 0 (no rows, or no outputs).
        let mut out = super::unfilled::<f32>(m * in_d);
        matmul(m, in_d, k, &mut out, (in_d, 1), false, lhs, Mat::rows(b, in_d))?;
        Ok((CpuStorage::F32(out), Shape::from((m, in_d))))
    }
}

/// The column sums of a contiguous f32 (rows, columns) CPU tensor, in parallel bands of [`BIAS_COLUMNS`]
/// columns, each summed row by row in order.
fn column_sums(g: &Tensor) -> Result<Tensor> {
    let (rows, cols) = g.dims2()?;
    let (storage, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
        candle_core::bail!("linear backward: an f32 CPU gradient expected")
    };
    let (a, b) = offsets(layout, "linear backward")?;
    let v = &v[a..b];
    let mut sums = vec![0f32; cols];
    sums.par_chunks_mut(BIAS_COLUMNS).enumerate().for_each(|(band, dst)| {
        let c0 = band * BIAS_COLUMNS;
        for r in 0..rows {
            let row = &v[r * cols + c0..r * cols + c0 + dst.len()];
            dst.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
        }
    });
    Tensor::from_vec(sums, cols, g.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_support::max_rel_diff;
    use candle_core::{Device, Module, Var};

    /// (input dims, out): 2-D and 3-D inputs, one row, widths that are not multiples of the bias band.
    const CASES: [(&[usize], usize); 4] = [(&[7, 5], 3), (&[2, 9, 20], 70), (&[1, 1, 8], 130), (&[3, 33, 16], 16)];

    fn rand(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    /// Forward and every gradient against candle's own `Linear` and its autograd, with and without a bias
    /// and with an untracked input (a first layer): the same values to f32 rounding.
    #[test]
    fn matches_candle_linear_and_its_autograd() {
        for (dims, out) in CASES {
            let in_d = *dims.last().unwrap();
            for (with_bias, input_tracked) in [(true, true), (false, true), (true, false)] {
                let case = format!("{dims:?} -> {out}, bias {with_bias}, tracked input {input_tracked}");
                let x = Var::from_tensor(&rand(dims)).unwrap();
                let w = Var::from_tensor(&rand(&[out, in_d])).unwrap();
                let b = Var::from_tensor(&rand(&[out])).unwrap();
                let xt = if input_tracked { x.as_tensor().clone() } else { x.as_tensor().detach() };
                let bias = with_bias.then(|| b.as_tensor());
                assert!(applies(&xt, w.as_tensor(), bias), "{case}");
                let ours = linear(&xt, w.as_tensor(), bias).unwrap();
                let theirs = candle_nn::Linear::new(w.as_tensor().clone(), bias.cloned()).forward(&xt).unwrap();
                assert_eq!(ours.dims(), theirs.dims(), "{case}");
                assert!(max_rel_diff(&ours, &theirs) < 1e-6, "{case}: forward");
                let mut r = dims.to_vec();
                *r.last_mut().unwrap() = out;
                let r = rand(&r);
                let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for (what, var, want) in [("input", &x, input_tracked), ("weight", &w, true), ("bias", &b, with_bias)] {
                    match (g_ours.get(var), g_theirs.get(var)) {
                        (Some(a), Some(e)) if want => {
                            assert!(max_rel_diff(a, e) < 1e-5, "{case}: {what} gradient {}", max_rel_diff(a, e))
                        }
                        (None, None) if !want => {}
                        (a, e) => {
                            panic!("{case}: {what} gradient present: ours {}, candle {}", a.is_some(), e.is_some())
                        }
                    }
                }
            }
        }
    }

    /// f32 CPU layers, trained or not, are this op's; other dtypes keep candle's layer.
    #[test]
    fn applies_to_f32_cpu_layers() {
        let (x, w) = (rand(&[2, 4]), rand(&[3, 4]));
        assert!(applies(&x, &w, None));
        let var = Var::from_tensor(&w).unwrap();
        assert!(applies(&x, var.as_tensor(), None));
        assert!(!applies(&x.to_dtype(DType::F64).unwrap(), var.as_tensor(), None));
        assert!(!applies(&x, &w.to_dtype(DType::BF16).unwrap(), None));
        let bias = Var::from_tensor(&rand(&[3])).unwrap();
        assert!(applies(&x, &w, Some(bias.as_tensor())));
        assert!(!applies(&x, &w, Some(&rand(&[3]).to_dtype(DType::F64).unwrap())));
    }

    /// Untracked (inference): the op's values are candle's layer's, and it adds no graph.
    #[test]
    fn inference_matches_candle_linear() {
        let (x, w, b) = (rand(&[2, 5, 4]), rand(&[3, 4]), rand(&[3]));
        let ours = linear(&x, &w, Some(&b)).unwrap();
        assert!(!ours.track_op());
        let want = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
        assert_eq!(ours.dims(), want.dims());
        assert!(crate::model::ops::test_support::max_rel_diff(&ours, &want) < 1e-6);
    }

    /// An empty batch: the products' inner dimension is 0, and the weight and bias gradients are zeros.
    #[test]
    fn an_empty_batch_has_zero_gradients() {
        let (w, b) = (Var::from_tensor(&rand(&[3, 4])).unwrap(), Var::from_tensor(&rand(&[3])).unwrap());
        let x = Var::from_tensor(&Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap();
        assert_eq!(y.dims(), &[0, 3]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        for (t, dims) in [(&w, &[3usize, 4][..]), (&b, &[3][..])] {
            let g = grads.get(t).unwrap();
            assert_eq!(g.dims(), dims);
            assert!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let w = Var::from_tensor(&rand(&[3, 4])).unwrap();
        let err = linear(&rand(&[2, 5]), w.as_tensor(), None).unwrap_err().to_string();
        assert!(err.contains("does not end in the weight's 4 inputs"), "{err}");
        let err = linear(&rand(&[2, 4]), w.as_tensor(), Some(&rand(&[5]))).unwrap_err().to_string();
        assert!(err.contains("bias"), "{err}");
    }
}
