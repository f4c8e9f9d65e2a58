//! The VAE's building blocks, as diffusers' `DownEncoderBlock2D`, `UpDecoderBlock2D` and `UNetMidBlock2D`
//! (without time embedding), and the `Encoder` / `Decoder` stacks made of them.
//! Keys: `resnets.N`, `downsamplers.0.conv`, `upsamplers.0.conv`, `attentions.0`.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Attention, AttentionConfig};
use super::layers::{conv2d, group_norm, Conv2d, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig};

/// Epsilon of every group norm in the VAE (diffusers hard-codes it for the encoder and decoder).
pub const VAE_NORM_EPS: f64 = 1e-6;

/// Shape of the blocks shared by one VAE: group count of its norms.
#[derive(Debug, Clone, Copy)]
pub struct VaeBlockConfig {
    pub norm_num_groups: usize,
}

impl VaeBlockConfig {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        }
    }
}

/// The layer after a block's resnets that changes the resolution (keys `{KEY}.0.conv`).
pub trait Resampler: Sized {
    /// The weight-key prefix: `downsamplers` or `upsamplers`.
    const KEY: &'static str;
    fn new(channels: usize, vb: VarBuilder) -> Result<Self>;
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// Halves height and width: zero-pad right and bottom by one, then a 3x3 conv with stride 2 and no padding
/// (diffusers' `Downsample2D` with `padding=0`; the asymmetric pad keeps the original LDM weights valid).
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Resampler for Downsample {
    const KEY: &'static str = "downsamplers";

    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 2, 0, vb.pp("conv"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&padded)
    }
}

/// Doubles height and width: nearest-neighbour upsampling, then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Resampler for Upsample {
    const KEY: &'static str = "upsamplers";

    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, _c, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// `num_layers` resnets in a row, the first taking `in_channels` (keys `resnets.N`): the body that the encoder's
/// down blocks and the decoder's up blocks share; they differ only in the resampler after it.
#[derive(Debug, Clone)]
pub struct ResnetStack {
    resnets: Vec<ResnetBlock2D>,
}

impl ResnetStack {
    pub fn new(
        cfg: VaeBlockConfig,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let i_c = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(cfg.resnet(i_c, out_channels), vb.pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { resnets })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// `num_layers` resnets, then (except in the last block) a resampler: the encoder's down blocks and the
/// decoder's up blocks are this one shape (diffusers' `DownEncoderBlock2D` / `UpDecoderBlock2D`).
#[derive(Debug, Clone)]
pub struct ResnetsThenResample<R> {
    resnets: ResnetStack,
    resampler: Option<R>,
}

/// `num_layers` resnets, then (except in the last block) a downsample.
pub type DownEncoderBlock2D = ResnetsThenResample<Downsample>;
/// `num_layers` resnets, then (except in the last block) an upsample.
pub type UpDecoderBlock2D = ResnetsThenResample<Upsample>;

impl<R: Resampler> ResnetsThenResample<R> {
    pub fn new(
        cfg: VaeBlockConfig,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_resampler: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = ResnetStack::new(cfg, in_channels, out_channels, num_layers, vb.pp("resnets"))?;
        let resampler = if add_resampler { Some(R::new(out_channels, vb.pp(R::KEY).pp("0"))?) } else { None };
        Ok(Self { resnets, resampler })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnets.forward(x)?;
        match &self.resampler {
            Some(r) => r.forward(&h),
            None => Ok(h),
        }
    }
}

/// Resnet, single-head self-attention over all pixels, resnet (the attention can be switched off by config).
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<Attention>,
}

impl VaeMidBlock {
    pub fn new(cfg: VaeBlockConfig, channels: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
        let resnet = |i: usize| ResnetBlock2D::new(cfg.resnet(channels, channels), vb.pp("resnets").pp(i));
        let attention = if add_attention {
            let attn_vb = vb.pp("attentions").pp("0");
            // One head as wide as the block: diffusers sets attention_head_dim = channels here.
            let attn_cfg = AttentionConfig {
                query_dim: channels,
                cross_attention_dim: None,
                heads: 1,
                dim_head: channels,
                qkv_bias: true,
                // diffusers' VAE attention computes its softmax in f32 (upcast_softmax).
                upcast_attention: true,
            };
            Some(Attention::new(attn_cfg, attn_vb.clone())?.with_group_norm(
                cfg.norm_num_groups,
                VAE_NORM_EPS,
                attn_vb,
            )?)
        } else {
            None
        };
        Ok(Self { resnets: [resnet(0)?, resnet(1)?], attention })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnets[0].forward(x, None)?;
        let h = match &self.attention {
            Some(attn) => attn.forward_spatial(&h)?,
            None => h,
        };
        self.resnets[1].forward(&h, None)
    }
}

/// GroupNorm → SiLU → 3x3 conv: the output head of both the encoder and the decoder.
#[derive(Debug, Clone)]
struct OutputHead {
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl OutputHead {
    fn new(cfg: VaeBlockConfig, in_c: usize, out_c: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            conv_norm_out: group_norm(cfg.norm_num_groups, in_c, VAE_NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(in_c, out_c, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.conv_norm_out.forward_silu(x)?)
    }
}

/// Image (batch, in_channels, H, W) → moments (batch, 2*latent_channels, H/f, W/f), f = 2^(levels-1).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: VaeMidBlock,
    head: OutputHead,
    span: tracing::Span,
}

impl Encoder {
    /// `channels` is `block_out_channels`; `out_channels` is twice the latent channels (mean and log-variance).
    pub fn new(
        cfg: VaeBlockConfig,
        in_channels: usize,
        out_channels: usize,
        channels: &[usize],
        layers_per_block: usize,
        mid_block_add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if channels.is_empty() {
            candle_core::bail!("VAE encoder: block_out_channels is empty");
        }
        let conv_in = conv2d(in_channels, channels[0], 3, 1, 1, vb.pp("conv_in"))?;
        let last = channels.len() - 1;
        let down_blocks = (0..channels.len())
            .map(|i| {
                let i_c = if i == 0 { channels[0] } else { channels[i - 1] };
                DownEncoderBlock2D::new(cfg, i_c, channels[i], layers_per_block, i != last, vb.pp("down_blocks").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: VaeMidBlock::new(cfg, channels[last], mid_block_add_attention, vb.pp("mid_block"))?,
            head: OutputHead::new(cfg, channels[last], out_channels, &vb)?,
            span: tracing::span!(tracing::Level::TRACE, "vae-encoder"),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        // 1. stem
        let mut h = self.conv_in.forward(x)?;
        // 2. down: resnets and stride-2 convs
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        // 3. mid: resnet, attention, resnet
        let h = self.mid_block.forward(&h)?;
        // 4. head
        self.head.forward(&h)
    }
}

/// Latents (batch, latent_channels, h, w) → image (batch, out_channels, h*f, w*f).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    head: OutputHead,
    span: tracing::Span,
}

impl Decoder {
    /// `channels` is `block_out_channels` (in encoder order; the decoder walks it backwards). Each up block has
    /// one resnet more than the encoder's blocks.
    pub fn new(
        cfg: VaeBlockConfig,
        in_channels: usize,
        out_channels: usize,
        channels: &[usize],
        layers_per_block: usize,
        mid_block_add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if channels.is_empty() {
            candle_core::bail!("VAE decoder: block_out_channels is empty");
        }
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let conv_in = conv2d(in_channels, reversed[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mid_block = VaeMidBlock::new(cfg, reversed[0], mid_block_add_attention, vb.pp("mid_block"))?;
        let last = reversed.len() - 1;
        let up_blocks = (0..reversed.len())
            .map(|i| {
                let i_c = if i == 0 { reversed[0] } else { reversed[i - 1] };
                UpDecoderBlock2D::new(cfg, i_c, reversed[i], layers_per_block + 1, i != last, vb.pp("up_blocks").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            head: OutputHead::new(cfg, reversed[last], out_channels, &vb)?,
            span: tracing::span!(tracing::Level::TRACE, "vae-decoder"),
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        // 1. stem
        let h = self.conv_in.forward(z)?;
        // 2. mid: resnet, attention, resnet
        let mut h = self.mid_block.forward(&h)?;
        // 3. up: resnets and nearest-neighbour 2x upsampling
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        // 4. head
        self.head.forward(&h)
    }
}
