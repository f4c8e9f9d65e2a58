//! Small layers shared by every network; every one records a backward pass, as training reuses them.
//!
//! candle 0.11's fused `LayerNorm` fast path and `softmax_last_dim` record no gradient (see
//! shared/notes/reference-stack.md). The convolution, norms and softmax here run fused CPU kernels
//! ([`super::ops`]) that carry their own backward passes, and fall back to candle's ops elsewhere.
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::ops::conv2d::{conv2d as conv2d_op, Conv2dParams};
use super::ops::norm;

/// Whether a model loaded through `vb` keeps half-precision weights for f32 activations: bf16 or f16 on the
/// CPU. The matrix products (linear layers, convolutions) then run on the bf16 kernels ([`super::ops::bf16`])
/// with f32 sums (f16 weights: widened, f32 products), and everything else (norms, biases, embeddings,
/// activations) stays f32. Other devices run bf16 or f16 throughout.
pub fn half_weights(vb: &VarBuilder) -> bool {
    matches!(vb.dtype(), DType::BF16 | DType::F16) && vb.device().is_cpu()
}

/// The dtype of a model's activations (and of its small parameters): f32 when its weights are half precision
/// on the CPU ([`half_weights`]), else the dtype it was loaded in.
pub fn activation_dtype(vb: &VarBuilder) -> DType {
    if half_weights(vb) {
        DType::F32
    } else {
        vb.dtype()
    }
}

/// A parameter that is not a matrix-product weight, in the activations' dtype.
pub fn small_param(t: Tensor, vb: &VarBuilder) -> Result<Tensor> {
    t.to_dtype(activation_dtype(vb))
}

/// `nn.Conv2d(in, out, kernel, stride, padding)` with bias, keys `weight` / `bias`.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
    let inner = candle_nn::conv2d(in_c, out_c, kernel, cfg, vb.clone())?;
    let bias = inner.bias().map(|b| small_param(b.clone(), &vb)).transpose()?;
    let inner = candle_nn::Conv2d::new(inner.weight().clone(), bias, cfg);
    Ok(Conv2d { inner, params: Conv2dParams { padding, stride } })
}

/// `nn.Conv2d` with bias, run by [`super::ops::conv2d`] (im2col in NCHW, bias fused) on the CPU.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    params: Conv2dParams,
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.inner.bias() {
            Some(bias) => conv2d_op(x, self.inner.weight(), bias, self.params),
            None if super::ops::bf16::mixed(x, self.inner.weight()) => {
                let zero = Tensor::zeros(self.inner.weight().dim(0)?, DType::F32, x.device())?;
                conv2d_op(x, self.inner.weight(), &zero, self.params)
            }
            None => self.inner.forward(x),
        }
    }
}

/// `nn.Linear(in, out, bias)`.
pub fn linear(in_d: usize, out_d: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let inner = if bias {
        candle_nn::linear(in_d, out_d, vb.clone())?
    } else {
        candle_nn::linear_no_bias(in_d, out_d, vb.clone())?
    };
    let bias = inner.bias().map(|b| small_param(b.clone(), &vb)).transpose()?;
    Ok(Linear::from_parts(inner.weight().clone(), bias))
}

/// `nn.Linear`, with its input made contiguous first: candle 0.11.1's CPU matmul of a transposed batched view
/// with a broadcast right operand returns wrong values (huggingface/candle#3758), which is exactly what
/// `candle_nn::Linear` does with a non-contiguous (batch > 1) input.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// A layer from its weight (out, in) and bias.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { inner: candle_nn::Linear::new(weight, bias) }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The layer on its weights as they are, without the half-precision and locked-layer cases of `forward`: f32
    /// on the CPU as one op (the bias added in place; trained, its backward writes the weight's gradient in the
    /// weight's own layout), anything else as candle's layer.
    fn plain_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias) = (self.inner.weight(), self.inner.bias());
        if super::ops::linear::applies(x, weight, bias) {
            return super::ops::linear::linear(x, weight, bias);
        }
        self.inner.forward(x)
    }
}

impl Module for Linear {
    /// A locked layer on a tracked input (the UNet's decoder when a ControlNet trains) records only the
    /// input's gradient: candle's matmul backward would also form the weight's, and drop it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let weight = self.inner.weight();
        let locked = x.track_op() && !weight.track_op() && !self.inner.bias().is_some_and(|b| b.track_op());
        if super::ops::bf16::native_products(&x, weight) && (!x.track_op() || locked) {
            // Inference, or a locked bf16 layer in mixed-precision training: the bf16 kernels both ways.
            let bias = self.inner.bias();
            return super::ops::frozen::locked(
                &x,
                |x| super::ops::bf16::linear(x, weight, bias),
                super::ops::frozen::linear_input_grad(weight),
            );
        }
        if super::ops::bf16::mixed(&x, weight) {
            // f16 weights, bf16 ones on a CPU without a bf16 unit (see `mixed`), and bf16 weights being trained:
            // the f32 layer on the weight widened at this call (locked, it records only the input's gradient).
            let widened = Linear::from_parts(super::ops::widened(weight)?, self.inner.bias().cloned());
            return widened.forward(&x);
        }
        if super::ops::bf16::autocast::active(&x, weight) {
            // A trained layer inside mixed precision's autocast: the products on the bf16 kernels.
            return super::ops::bf16::autocast_linear(&x, weight, self.inner.bias());
        }
        if locked {
            return super::ops::frozen::locked(
                &x,
                |x| self.plain_forward(x),
                super::ops::frozen::linear_input_grad(weight),
            );
        }
        self.plain_forward(&x)
    }
}

/// `nn.GroupNorm(groups, channels, eps)` with affine weights, keys `weight` / `bias`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = small_param(vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?, &vb)?;
    let bias = small_param(vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?, &vb)?;
    Ok(GroupNorm { weight, bias, groups, eps })
}

/// `nn.GroupNorm`. [`GroupNorm::forward_silu`] fuses the SiLU that follows every group norm of a resnet.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `silu(group_norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }

    /// The norm followed by `act` (fused for SiLU).
    pub fn forward_then(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::Silu => self.forward_silu(x),
            other => other.apply(&self.forward(x)?),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }
}

/// `nn.LayerNorm(dim, eps)` over the last dimension (statistics in f32 for half-precision inputs, as torch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = (small_param(vb.get(dim, "weight")?, &vb)?, small_param(vb.get(dim, "bias")?, &vb)?);
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        norm::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `softmax(scale · x)` over the last dimension, differentiable (candle's `softmax_last_dim` is not).
pub fn softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    super::ops::softmax::softmax_last_dim(x, scale)
}

/// The activations the checkpoints' configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP's approximation (SD1 text encoders).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU, as `torch.nn.functional.gelu` (SD2's OpenCLIP, GEGLU feed-forwards).
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            // 1.702 is the constant of CLIP's sigmoid approximation of GELU.
            Activation::QuickGelu => x.broadcast_mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Activation::Gelu => x.gelu_erf(),
            Activation::Silu => x.silu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn layer_norm_matches_definition_and_has_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f32, 2., 4., 8., -1., 0., 1., 5.], (2, 4), &dev).unwrap();
        let w = Var::from_vec(vec![1f32, 0.5, 2., 1.], 4, &dev).unwrap();
        let b = Var::from_vec(vec![0f32, 0.1, 0.2, 0.3], 4, &dev).unwrap();
        let ln = LayerNorm { weight: w.as_tensor().clone(), bias: b.as_tensor().clone(), eps: 1e-5 };
        let y = ln.forward(x.as_tensor()).unwrap();
        // Row 0: mean 3.75, var 7.1875.
        let row0: Vec<f32> = y.get(0).unwrap().to_vec1().unwrap();
        let sd = (7.1875f32 + 1e-5).sqrt();
        let want =
            [(1. - 3.75) / sd, 0.5 * (2. - 3.75) / sd + 0.1, 2. * (4. - 3.75) / sd + 0.2, (8. - 3.75) / sd + 0.3];
        for (a, b) in row0.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            assert!(grads.get(v.as_tensor()).is_some(), "missing gradient");
        }
    }

    /// A linear layer with f16 weights multiplies in f32: its output is the f64 product of the f16 weights with
    /// the activations as they are, where rounding the activations to bf16 (as the bf16 kernels do) would be
    /// far off.
    #[test]
    fn f16_linear_weights_multiply_in_f32() {
        let dev = Device::Cpu;
        let w16 = (Tensor::randn(0f32, 0.2, (24, 40), &dev).unwrap()).to_dtype(DType::F16).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 40), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 24, &dev).unwrap();
        let ours = Linear::from_parts(w16.clone(), Some(b.clone())).forward(&x).unwrap();
        let product = |x: &Tensor| {
            let w = w16.to_dtype(DType::F64).unwrap();
            let y = x.to_dtype(DType::F64).unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
            y.broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap()
        };
        let gap = |a: &Tensor, b: &Tensor| -> f64 {
            let d = (a.to_dtype(DType::F64).unwrap() - b).unwrap().abs().unwrap();
            d.max_all().unwrap().to_scalar().unwrap()
        };
        let want = product(&x);
        let rounded = product(&x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap());
        assert!(gap(&rounded, &want) > 1e-3, "the test values do not tell f32 from bf16 products");
        assert_eq!(ours.dtype(), DType::F32);
        assert!(gap(&ours, &want) < 1e-5, "f16 layer off the f32 product by {}", gap(&ours, &want));
    }

    /// Guards the candle#3758 workaround: a transposed batch-2 input must give the same result as its copy.
    #[test]
    fn linear_on_transposed_batched_input() {
        let dev = Device::Cpu;
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let lin = linear(3, 4, true, vb).unwrap();
        let x = Tensor::arange(0f32, 30., &dev).unwrap().reshape((2, 3, 5)).unwrap().sin().unwrap();
        let xt = x.transpose(1, 2).unwrap();
        let a = lin.forward(&xt).unwrap();
        let b = lin.forward(&xt.contiguous().unwrap()).unwrap();
        let diff = crate::test_support::max_abs_diff(&a, &b);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn quick_gelu_value() {
        let x = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let y: Vec<f32> = Activation::QuickGelu.apply(&x).unwrap().to_vec1().unwrap();
        assert!((y[0] - 1.0 / (1.0 + (-1.702f32).exp())).abs() < 1e-6);
    }
}
