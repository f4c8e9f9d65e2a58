//! `ResnetBlock2D`: the residual block of the UNet, the ControlNet encoder and the VAE.
//! Keys: `norm1`, `conv1`, `time_emb_proj` (UNet only), `norm2`, `conv2`, `conv_shortcut` (when channels change).
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear};

/// Shape and normalisation of one resnet block (from the owning model's config).
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, `None` in the VAE (no time conditioning).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The block's output is divided by this (1.0 in SD).
    pub output_scale_factor: f64,
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    span: tracing::Span,
}

impl ResnetBlock2D {
    pub fn new(cfg: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, o, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        // A 1x1 projection keeps the skip path when the channel count changes.
        let conv_shortcut = if i != o { Some(conv2d(i, o, 1, 1, 0, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: group_norm(cfg.groups, i, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(i, o, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(cfg.groups, o, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(o, o, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
            span: tracing::span!(tracing::Level::TRACE, "resnet"),
        })
    }

    /// `temb` is the (batch, temb_channels) time embedding, `None` for the VAE.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        // 1. norm → SiLU → 3x3 conv
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        // 2. add the projected time embedding as a per-channel bias
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        // 3. norm → SiLU → 3x3 conv
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        // 4. residual
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
