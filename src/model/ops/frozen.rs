//! A locked layer applied to a tracked input: backward gives the input its gradient and nothing else.
//!
//! Training a ControlNet runs the locked UNet's decoder on activations that depend on the ControlNet's
//! weights. candle 0.11's backward of a matmul forms both operands' gradients, and adds each into a zero
//! tensor the size of the operand, so every locked linear layer there would cost a weight gradient (as many
//! FLOPs as its forward) and two weight-sized buffers per step, all thrown away. (Convolutions skip it in
//! their own backward, `conv2d.rs`.)
//!
//! The layer's output is computed on the detached input (no graph), then re-attached to the input by an
//! identity op whose backward is the layer's input gradient alone.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `f(x)` for a locked linear map `f`, whose backward gives `x` the gradient `input_grad(grad)` (the vector-
/// Jacobian product) and records nothing else. Untracked inputs, and other devices (candle's own backward),
/// just get `f(x)`.
pub fn locked<F, G>(x: &Tensor, f: F, input_grad: G) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
    G: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() || !x.device().is_cpu() {
        return f(x);
    }
    let y = f(&x.detach())?.contiguous()?;
    x.apply_op2(&y, Attach { input_grad: Box::new(input_grad) })
}

/// A locked `nn.Linear`'s weight (out, in) as [`locked`]'s `input_grad`: `grad · W` over the last dimension
/// (on the bf16 kernels for bf16 weights on a CPU with a bf16 unit: mixed-precision training; other half weights
/// reach it widened, see `layers::Linear`).
pub fn linear_input_grad(weight: &Tensor) -> impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static {
    let w = weight.detach();
    move |grad: &Tensor| {
        if super::bf16::native_products(grad, &w) {
            return super::bf16::linear_input_grad(grad, &w);
        }
        let dims = grad.dims().to_vec();
        let out = dims.last().copied().unwrap_or(1);
        let rows = grad.elem_count() / out.max(1);
        let g = grad.contiguous()?.reshape((rows, out))?.matmul(&w)?;
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = w.dim(1)?;
        }
        g.reshape(shape)
    }
}

type InputGrad = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Returns its second operand; backward sends `input_grad(grad)` to the first.
struct Attach {
    input_grad: InputGrad,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "locked-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, y: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("locked layer: output must be contiguous")
        };
        let out = match y {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
            _ => candle_core::bail!("locked layer: float output expected"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.input_grad)(grad)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Against candle's own backward of the same layer: the same output and input gradient.
    #[test]
    fn input_gradient_only() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 5, &dev).unwrap();
        let layer = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let x = Var::randn(0f32, 1., (2, 4, 3), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (2, 4, 5), &dev).unwrap();
        let forward = |x: &Tensor| candle_core::Module::forward(&layer, x);

        let ours = locked(x.as_tensor(), forward, linear_input_grad(&w)).unwrap();
        let theirs = forward(x.as_tensor()).unwrap();
        assert_eq!(ours.to_vec3::<f32>().unwrap(), theirs.to_vec3::<f32>().unwrap());
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let d: f32 = (g_ours.get(&x).unwrap() - g_theirs.get(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "input gradients differ by {d}");
        // (candle keys the weight gradient it forms by the transposed view, so the store cannot show it.)
        assert!(g_ours.get(&w).is_none() && g_ours.get(&b).is_none());

        // Untracked input: the plain result, no graph.
        let plain = locked(&x.as_tensor().detach(), forward, linear_input_grad(&w)).unwrap();
        assert!(!plain.track_op());
        assert_eq!(plain.dtype(), DType::F32);
    }

    /// A locked linear layer with bf16 or f16 weights (mixed-precision training) on a tracked input: the
    /// kernels' output and input gradient equal the f32 layer's on integers (exact in both and in f32 sums).
    #[test]
    fn half_weights_give_the_f32_input_gradient() {
        use crate::model::layers::Linear;
        let dev = Device::Cpu;
        let ints = |shape: (usize, usize, usize)| {
            Tensor::randn(0f32, 2., shape, &dev).unwrap().round().unwrap().clamp(-4f32, 4f32).unwrap()
        };
        let (w, b) = (ints((1, 40, 64)).squeeze(0).unwrap(), ints((1, 1, 40)).flatten_all().unwrap());
        let x = Var::from_tensor(&ints((2, 5, 64))).unwrap();
        let r = ints((2, 5, 40));
        let layer = |w: &Tensor| Linear::from_parts(w.clone(), Some(b.clone()));
        let theirs = layer(&w);
        let y32 = candle_core::Module::forward(&theirs, x.as_tensor()).unwrap();
        let g32 = (&y32 * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g32 = g32.get(&x).unwrap();
        for half in [DType::BF16, DType::F16] {
            let ours = layer(&w.to_dtype(half).unwrap());
            let y16 = candle_core::Module::forward(&ours, x.as_tensor()).unwrap();
            assert_eq!(y16.to_vec3::<f32>().unwrap(), y32.to_vec3::<f32>().unwrap(), "{half:?}");
            let g16 = (y16 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g16 = g16.get(&x).unwrap();
            assert_eq!(g16.to_vec3::<f32>().unwrap(), g32.to_vec3::<f32>().unwrap(), "{half:?}");
        }
    }
}
