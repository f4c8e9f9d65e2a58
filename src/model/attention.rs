//! Multi-head attention as diffusers' `Attention` module: keys `to_q`, `to_k`, `to_v`, `to_out.0`, and for the
//! VAE's spatial self-attention also `group_norm`.
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{group_norm, linear, softmax_last_dim, GroupNorm, Linear};

/// Attention scores materialised at once (elements): queries are processed in blocks so the scores of the
/// 4096-token self-attention at 512 px (1 GiB for a guided batch of 8 heads) never exist whole. The fused CPU
/// kernel holds less still (one cache-sized block per task). `pipeline::memory_estimate` counts this bound.
pub const MAX_SCORES: usize = 1 << 24;

#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the context for cross-attention (text embeddings); `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Bias on the q/k/v projections (UNet: no, VAE: yes).
    pub qkv_bias: bool,
    /// Compute the attention scores in f32 even for half-precision weights (SD2's `upcast_attention`).
    pub upcast_attention: bool,
}

#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// Only in the VAE's mid-block attention, which normalises its (B, C, H, W) input first.
    group_norm: Option<GroupNorm>,
    heads: usize,
    /// 1/sqrt(dim_head): keeps the dot products' variance independent of the head width.
    scale: f64,
    upcast_attention: bool,
    span: tracing::Span,
}

impl Attention {
    pub fn new(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let context_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        Ok(Self {
            to_q: linear(cfg.query_dim, inner, cfg.qkv_bias, vb.pp("to_q"))?,
            to_k: linear(context_dim, inner, cfg.qkv_bias, vb.pp("to_k"))?,
            to_v: linear(context_dim, inner, cfg.qkv_bias, vb.pp("to_v"))?,
            to_out: linear(inner, cfg.query_dim, true, vb.pp("to_out").pp("0"))?,
            group_norm: None,
            heads: cfg.heads,
            scale: (cfg.dim_head as f64).powf(-0.5),
            upcast_attention: cfg.upcast_attention,
            span: tracing::span!(tracing::Level::TRACE, "attention"),
        })
    }

    /// The VAE's variant: a group norm on the spatial input, applied inside the module.
    pub fn with_group_norm(mut self, groups: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let channels = self.to_out.weight().dim(0)?;
        self.group_norm = Some(group_norm(groups, channels, eps, vb.pp("group_norm"))?);
        Ok(self)
    }

    /// (batch, seq, heads*dim) → (batch*heads, seq, dim)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, inner) = x.dims3()?;
        x.reshape((b, n, self.heads, inner / self.heads))?.transpose(1, 2)?.reshape((
            b * self.heads,
            n,
            inner / self.heads,
        ))
    }

    /// (batch*heads, seq, dim) → (batch, seq, heads*dim)
    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (bh, n, d) = x.dims3()?;
        x.reshape((bh / self.heads, self.heads, n, d))?.transpose(1, 2)?.reshape((bh / self.heads, n, self.heads * d))
    }

    /// Attention over a token sequence `x` (batch, seq, query_dim); `context` (batch, ctx_seq, ctx_dim) for
    /// cross-attention, `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let context = context.unwrap_or(x);
        // 1. project and split into heads
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        // 2. scaled dot products, softmax (in f32 when asked) and weighted values
        let out = if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) {
            // The fused kernel never holds more than a cache-sized block of scores. Layers whose products run
            // on the bf16 kernels (bf16 weights, or autocast) multiply here in bf16 too (f16 weights: in f32).
            let weight = self.to_q.weight();
            if super::ops::bf16::bf16_products(x, weight) || super::ops::bf16::autocast::active(x, weight) {
                super::ops::attention::attention_bf16(&q, &k, &v, self.scale)?
            } else {
                super::ops::attention::attention(&q, &k, &v, self.scale)?
            }
        } else {
            self.attend_in_blocks(&q, &k, &v, MAX_SCORES)?
        };
        // 3. merge heads, output projection
        self.to_out.forward(&self.merge_heads(&out)?)
    }

    /// [`Self::attend`] on blocks of queries whose scores have at most `max_scores` elements (one query at
    /// least); each query's result does not depend on the others, so the blocks are simply concatenated.
    fn attend_in_blocks(&self, q: &Tensor, k: &Tensor, v: &Tensor, max_scores: usize) -> Result<Tensor> {
        let (bh, n, _) = q.dims3()?;
        let keys = k.dim(1)?;
        let block = (max_scores / (bh * keys).max(1)).clamp(1, n.max(1));
        if block >= n {
            return self.attend(q, k, v);
        }
        let parts = (0..n)
            .step_by(block)
            .map(|start| self.attend(&q.narrow(1, start, block.min(n - start))?, k, v))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// softmax(q kᵀ · scale) v for (batch*heads, queries, dim) q and (batch*heads, keys, dim) k, v.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dtype = q.dtype();
        let (q, k) = if self.upcast_attention {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q.clone(), k.clone())
        };
        let probs = softmax_last_dim(&q.matmul(&k.t()?)?, self.scale)?.to_dtype(dtype)?;
        probs.matmul(v)
    }

    /// Self-attention over the pixels of a (batch, channels, height, width) map with a residual connection,
    /// as the VAE's mid block uses it.
    pub fn forward_spatial(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = match &self.group_norm {
            Some(gn) => gn.forward(x)?,
            None => x.clone(),
        };
        let tokens = normed.reshape((b, c, h * w))?.transpose(1, 2)?;
        let out = self.forward(&tokens, None)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A batch of two gives each item's own result (guards the contiguous copy in `forward_spatial`).
    #[test]
    fn spatial_batch_equals_items() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = AttentionConfig {
            query_dim: 8,
            cross_attention_dim: None,
            heads: 1,
            dim_head: 8,
            qkv_bias: true,
            upcast_attention: true,
        };
        let attn = Attention::new(cfg, vb.clone()).unwrap().with_group_norm(2, 1e-6, vb).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 8, 3, 5), &dev).unwrap();
        let batch = attn.forward_spatial(&x).unwrap();
        for i in 0..2 {
            let item = attn.forward_spatial(&x.narrow(0, i, 1).unwrap()).unwrap();
            let diff = max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &item);
            assert!(diff < 1e-5, "item {i}: {diff}");
        }
    }

    /// Blocks of queries (5 of 3, 3, 3, 3, 1 rows here) give the result of all queries at once.
    #[test]
    fn query_blocks_equal_one_block() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = AttentionConfig {
            query_dim: 8,
            cross_attention_dim: None,
            heads: 2,
            dim_head: 4,
            qkv_bias: false,
            upcast_attention: false,
        };
        let attn = Attention::new(cfg, vb).unwrap();
        let q = Tensor::randn(0f32, 1., (4, 13, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (4, 6, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (4, 6, 4), &dev).unwrap();
        let whole = attn.attend(&q, &k, &v).unwrap();
        let blocks = attn.attend_in_blocks(&q, &k, &v, 3 * 4 * 6).unwrap();
        let diff = max_abs_diff(&whole, &blocks);
        assert!(diff < 1e-6, "{diff}");
    }

    /// With one head, identical keys and v = identity projections, attention averages the values.
    #[test]
    fn uniform_scores_average_values() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = AttentionConfig {
            query_dim: 2,
            cross_attention_dim: None,
            heads: 1,
            dim_head: 2,
            qkv_bias: false,
            upcast_attention: false,
        };
        let attn = Attention::new(cfg, vb).unwrap();
        let eye = Tensor::eye(2, DType::F32, &dev).unwrap();
        for (name, var) in map.data().lock().unwrap().iter() {
            let value = if name.ends_with("weight") && !name.starts_with("to_k") {
                eye.clone()
            } else {
                var.zeros_like().unwrap()
            };
            var.set(&value).unwrap();
        }
        let x = Tensor::new(&[[[1f32, 2.], [3., 4.], [5., 9.]]], &dev).unwrap();
        let y: Vec<Vec<f32>> = attn.forward(&x, None).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        for row in y {
            assert!((row[0] - 3.0).abs() < 1e-5 && (row[1] - 5.0).abs() < 1e-5, "{row:?}");
        }
    }
}
