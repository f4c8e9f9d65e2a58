//! The UNet's blocks: one down block per resolution level (resnets, optionally a spatial transformer after each,
//! then a stride-2 convolution), the mid block, and one up block per level (resnets fed with the skip
//! connections, optionally transformers, then nearest-neighbour upsampling and a convolution).
//!
//! diffusers' `DownBlock2D`/`CrossAttnDownBlock2D` (and the up pair) differ only in the transformers, so one
//! type with an optional `attentions` list covers each pair.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{conv2d, Conv2d};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use super::transformer_2d::{Transformer2DConfig, Transformer2DModel};

/// Whether a block has spatial transformers, as named by the config's `*_block_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: a transformer after each resnet.
    CrossAttn,
}

impl BlockKind {
    pub fn from_down_type(name: &str) -> Option<Self> {
        match name {
            "DownBlock2D" => Some(BlockKind::Plain),
            "CrossAttnDownBlock2D" => Some(BlockKind::CrossAttn),
            _ => None,
        }
    }

    pub fn from_up_type(name: &str) -> Option<Self> {
        match name {
            "UpBlock2D" => Some(BlockKind::Plain),
            "CrossAttnUpBlock2D" => Some(BlockKind::CrossAttn),
            _ => None,
        }
    }
}

/// What every resnet and transformer of one block shares (derived from the model config).
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub kind: BlockKind,
    /// Number of resnets (`layers_per_block`, +1 in the up blocks, which also eat the downsampler's skip).
    pub num_layers: usize,
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    /// Transformer shape; its `in_channels` is set per block. Ignored for `BlockKind::Plain`.
    pub heads: usize,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl BlockConfig {
    fn resnet(&self, in_channels: usize, out_channels: usize, output_scale_factor: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        }
    }

    /// diffusers passes the head COUNT and derives the head width from the block's channels.
    fn transformer(&self, channels: usize) -> Transformer2DConfig {
        Transformer2DConfig {
            in_channels: channels,
            heads: self.heads,
            dim_head: channels / self.heads,
            num_layers: self.transformer_layers,
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }

    fn transformers(&self, n: usize, channels: usize, vb: VarBuilder) -> Result<Vec<Transformer2DModel>> {
        match self.kind {
            BlockKind::Plain => Ok(Vec::new()),
            BlockKind::CrossAttn => {
                let vb = vb.pp("attentions");
                (0..n).map(|i| Transformer2DModel::new(&self.transformer(channels), vb.pp(i))).collect()
            }
        }
    }
}

/// Stride-2 3x3 convolution, key `conv`.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// With padding 0 the input is padded on the right and bottom only (as diffusers does).
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?, pad_right_bottom: padding == 0 })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling followed by a 3x3 convolution, key `conv`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))? })
    }

    /// `size`: the (h, w) to reach, i.e. the next skip connection's; twice the input when the input size is a
    /// multiple of the UNet's total downsampling, one less than that when it is not.
    pub fn forward(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.conv.forward(&x.upsample_nearest2d(size.0, size.1)?)
    }
}

/// One level of the encoder. Keys: `resnets.{i}`, `attentions.{i}` (cross-attention blocks), `downsamplers.0`.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsamplers: Option<Downsample2D>,
    span: tracing::Span,
}

impl DownBlock2D {
    pub fn new(
        cfg: &BlockConfig,
        in_channels: usize,
        out_channels: usize,
        downsample_padding: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb_res = vb.pp("resnets");
        let resnets = (0..cfg.num_layers)
            .map(|i| {
                let c_in = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(cfg.resnet(c_in, out_channels, 1.0), vb_res.pp(i))
            })
            .collect::<Result<_>>()?;
        let downsamplers = match downsample_padding {
            Some(p) => Some(Downsample2D::new(out_channels, p, vb.pp("downsamplers").pp(0))?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions: cfg.transformers(cfg.num_layers, out_channels, vb)?,
            downsamplers,
            span: tracing::span!(tracing::Level::TRACE, "down-block"),
        })
    }

    /// Number of skip connections this block hands to the up path.
    pub fn num_outputs(&self) -> usize {
        self.resnets.len() + usize::from(self.downsamplers.is_some())
    }

    /// Returns the block's output and its skip connections (each resnet(+transformer) output, then the
    /// downsampled map).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let _enter = self.span.enter();
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.num_outputs());
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs at the lowest resolution.
/// Keys: `resnets.{0,1}`, `attentions.0`.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    span: tracing::Span,
}

impl UNetMidBlock2DCrossAttn {
    /// `cfg.num_layers` counts the transformer/resnet pairs after the first resnet (1 in SD).
    pub fn new(cfg: &BlockConfig, channels: usize, output_scale_factor: f64, vb: VarBuilder) -> Result<Self> {
        let vb_res = vb.pp("resnets");
        let resnets = (0..=cfg.num_layers)
            .map(|i| ResnetBlock2D::new(cfg.resnet(channels, channels, output_scale_factor), vb_res.pp(i)))
            .collect::<Result<_>>()?;
        let cross = BlockConfig { kind: BlockKind::CrossAttn, ..*cfg };
        Ok(Self {
            resnets,
            attentions: cross.transformers(cfg.num_layers, channels, vb)?,
            span: tracing::span!(tracing::Level::TRACE, "mid-block"),
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// One level of the decoder. Keys: `resnets.{i}`, `attentions.{i}` (cross-attention blocks), `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsamplers: Option<Upsample2D>,
    span: tracing::Span,
}

impl UpBlock2D {
    /// `prev_output_channels`: the incoming map's channels; `in_channels`: the channels of the skip connection
    /// consumed last (the previous level's output); `out_channels`: this level's width.
    pub fn new(
        cfg: &BlockConfig,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb_res = vb.pp("resnets");
        let n = cfg.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 { in_channels } else { out_channels };
                let c_in = if i == 0 { prev_output_channels } else { out_channels };
                ResnetBlock2D::new(cfg.resnet(c_in + skip, out_channels, 1.0), vb_res.pp(i))
            })
            .collect::<Result<_>>()?;
        let upsamplers =
            if add_upsample { Some(Upsample2D::new(out_channels, vb.pp("upsamplers").pp(0))?) } else { None };
        Ok(Self {
            resnets,
            attentions: cfg.transformers(n, out_channels, vb)?,
            upsamplers,
            span: tracing::span!(tracing::Level::TRACE, "up-block"),
        })
    }

    /// Number of skip connections this block consumes.
    pub fn num_inputs(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: this block's skip connections in the order the down path produced them (consumed last first);
    /// `upsample_size`: the (h, w) of the next level, `None` for the last block.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        if skips.len() != self.resnets.len() {
            candle_core::bail!("up block expects {} skip connections, got {}", self.resnets.len(), skips.len())
        }
        let mut h = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = Tensor::cat(&[&h, skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        match (&self.upsamplers, upsample_size) {
            (Some(up), Some(size)) => up.forward(&h, size),
            (Some(_), None) => candle_core::bail!("up block with an upsampler needs a target size"),
            (None, _) => Ok(h),
        }
    }
}
