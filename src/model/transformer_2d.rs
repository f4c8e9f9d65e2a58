//! `Transformer2DModel`: the spatial transformer of the UNet's cross-attention blocks. It turns a feature map into
//! a sequence of pixel tokens, runs `BasicTransformerBlock`s (self-attention, cross-attention on the text,
//! GEGLU feed-forward) and adds the result back onto the map.
//!
//! Keys: `norm`, `proj_in`, `transformer_blocks.{i}.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}`,
//! `proj_out`.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Attention, AttentionConfig};
use super::layers::{conv2d, group_norm, linear, Conv2d, GroupNorm, LayerNorm, Linear};

/// Epsilon of the transformer's input group norm (fixed in diffusers, independent of the UNet's `norm_eps`).
const GROUP_NORM_EPS: f64 = 1e-6;
/// Epsilon of the blocks' layer norms (diffusers' `norm_eps` default; SD never changes it).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Width of the feed-forward's hidden layer relative to the model width.
const FF_MULT: usize = 4;

/// Shape of one `Transformer2DModel`, as the owning UNet block derives it.
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    /// Number of `BasicTransformerBlock`s (`transformer_layers_per_block`).
    pub num_layers: usize,
    /// Width of the text embeddings.
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    /// SD2.x: `proj_in`/`proj_out` are linear layers on tokens; SD1.x: 1x1 convolutions on the map.
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// GEGLU (Shazeer 2020): one projection gives a value half and a gate half; the output is `value * gelu(gate)`.
#[derive(Debug, Clone)]
pub struct GeGlu {
    proj: Linear,
}

impl GeGlu {
    pub fn new(dim_in: usize, dim_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { proj: linear(dim_in, dim_out * 2, true, vb.pp("proj"))? })
    }
}

impl Module for GeGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Exact (erf) GELU, as torch's default `F.gelu`, on the gate half; one fused pass.
        super::ops::geglu::geglu(&self.proj.forward(x)?)
    }
}

/// `FeedForward` with GEGLU: keys `net.0.proj` (GEGLU's projection) and `net.2` (output); `net.1` is dropout.
#[derive(Debug, Clone)]
pub struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * FF_MULT;
        let net = vb.pp("net");
        Ok(Self { geglu: GeGlu::new(dim, inner, net.pp("0"))?, out: linear(inner, dim, true, net.pp("2"))? })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.geglu.forward(x)?)
    }
}

/// Pre-norm transformer block: self-attention, cross-attention on the context, feed-forward, each residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    span: tracing::Span,
}

impl BasicTransformerBlock {
    pub fn new(dim: usize, cfg: &Transformer2DConfig, vb: VarBuilder) -> Result<Self> {
        let attn = |cross: Option<usize>| AttentionConfig {
            query_dim: dim,
            cross_attention_dim: cross,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            qkv_bias: false,
            upcast_attention: cfg.upcast_attention,
        };
        Ok(Self {
            norm1: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(attn(None), vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(attn(Some(cfg.cross_attention_dim)), vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            span: tracing::span!(tracing::Level::TRACE, "transformer-block"),
        })
    }

    /// `x`: (batch, tokens, dim); `context`: (batch, text tokens, cross_attention_dim).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        // 1. self-attention among the pixels
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        // 2. cross-attention: pixels query the text
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        // 3. feed-forward
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// The projection in and out of token space: a 1x1 convolution on the map (SD1.x) or a linear layer on the
/// tokens (SD2.x). Both are the same map; checkpoints store them with different shapes.
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(in_d: usize, out_d: usize, use_linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if use_linear {
            Projection::Linear(linear(in_d, out_d, true, vb)?)
        } else {
            Projection::Conv(conv2d(in_d, out_d, 1, 1, 0, vb)?)
        })
    }
}

/// (batch, channels, h, w) → (batch, h*w, channels)
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
}

/// (batch, h*w, channels) → (batch, channels, h, w)
fn to_map(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
}

#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    span: tracing::Span,
}

impl Transformer2DModel {
    pub fn new(cfg: &Transformer2DConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let c = cfg.in_channels;
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks =
            (0..cfg.num_layers).map(|i| BasicTransformerBlock::new(inner, cfg, blocks.pp(i))).collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(cfg.norm_num_groups, c, GROUP_NORM_EPS, vb.pp("norm"))?,
            proj_in: Projection::new(c, inner, cfg.use_linear_projection, vb.pp("proj_in"))?,
            transformer_blocks,
            proj_out: Projection::new(inner, c, cfg.use_linear_projection, vb.pp("proj_out"))?,
            span: tracing::span!(tracing::Level::TRACE, "transformer-2d"),
        })
    }

    /// `x`: (batch, channels, h, w); `context`: the text embeddings. Returns a map of the same shape.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (_, _, h, w) = x.dims4()?;
        // 1. normalise and project into token space
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        // 2. transformer blocks
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        // 3. back to a map, residual
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens, h, w)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?, h, w)?,
        };
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn tiny(use_linear_projection: bool) -> (VarMap, Transformer2DModel) {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let cfg = Transformer2DConfig {
            in_channels: 4,
            heads: 2,
            dim_head: 2,
            num_layers: 1,
            cross_attention_dim: 3,
            norm_num_groups: 2,
            use_linear_projection,
            upcast_attention: false,
        };
        let model = Transformer2DModel::new(&cfg, vb).unwrap();
        (map, model)
    }

    /// Training reuses these blocks: every weight must receive a gradient (candle's fused LayerNorm and
    /// softmax_last_dim would silently give none).
    #[test]
    fn every_weight_gets_a_gradient() {
        for linear_proj in [false, true] {
            let (map, model) = tiny(linear_proj);
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 1., (1, 4, 2, 3), &dev).unwrap();
            let ctx = Tensor::randn(0f32, 1., (1, 5, 3), &dev).unwrap();
            let loss = model.forward(&x, &ctx).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let data = map.data().lock().unwrap();
            assert_eq!(data.len(), 26, "tensor count");
            for (name, var) in data.iter() {
                let var: &Var = var;
                let g = grads.get(var.as_tensor());
                assert!(g.is_some(), "no gradient for {name}");
            }
        }
    }

    #[test]
    fn geglu_is_value_times_gelu_of_gate() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let g = GeGlu::new(1, 1, vb).unwrap();
        // proj = identity on both halves: weight [[1],[1]], bias [0, 1] → value x, gate x + 1.
        for (name, var) in map.data().lock().unwrap().iter() {
            let t = if name.ends_with("weight") {
                Tensor::new(&[[1f32], [1.]], &Device::Cpu)
            } else {
                Tensor::new(&[0f32, 1.], &Device::Cpu)
            };
            var.set(&t.unwrap()).unwrap();
        }
        let x = Tensor::new(&[[2f32]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = g.forward(&x).unwrap().to_vec2().unwrap();
        // gelu(3) = 3 * Phi(3) = 3 * 0.998650102
        assert!((y[0][0] - 2.0 * 3.0 * 0.998_650_1).abs() < 1e-5, "{y:?}");
    }
}
