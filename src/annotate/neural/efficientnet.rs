//! EfficientNet (Tan & Le 2019) as geffnet builds its TensorFlow-ported `tf_efficientnet_*` variants: NormalBAE's
//! encoder (`tf_efficientnet_b5_ap`).
//!
//! A stem (3×3 stride-2 convolution, batch norm, swish), seven stages of blocks, a 1×1 head convolution. Every
//! block is a depthwise 3×3/5×5 convolution with squeeze-excitation between pointwise convolutions: stage 0's
//! depthwise-separable blocks (`conv_dw` → SE → `conv_pw`), the other stages' inverted residuals (`conv_pw`
//! expands, `conv_dw`, SE, `conv_pwl` projects back); a block that keeps its size and width adds its input. The
//! `tf_` variants pad like TensorFlow's "SAME" (one-sided where the stride is 2 and the side even) and use batch
//! norms with eps 1e-3 (folded into the convolutions here). Widths, kernel sizes and the number of blocks per stage
//! come from the weights (so the B5 file and a narrowed one run the same code); the strides are EfficientNet's.
use candle_core::Tensor;

use super::nn::Conv;
use super::weights::StateDict;
use crate::Result;

/// geffnet's `BN_EPS_TF_DEFAULT`.
pub const BN_EPS: f64 = 1e-3;
/// The stride of each stage's first block (EfficientNet's `arch_def`: `ds_r1_k3_s1`, `ir_r2_k3_s2`, …), the one
/// part of the architecture the file does not hold.
pub const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// A convolution with TensorFlow "SAME" padding (geffnet's `Conv2dSame`): `ceil(in / stride)` outputs, the
/// padding split with the extra row/column after. Stride 1 with an odd kernel is plain symmetric padding.
#[derive(Debug, Clone)]
pub struct SameConv {
    pub conv: Conv,
}

impl SameConv {
    /// `{conv}` with the batch norm `{bn}` folded in.
    fn load(sd: &StateDict, conv: &str, bn: &str, stride: usize) -> Result<Self> {
        let mut c = Conv::load_bn_eps(sd, conv, bn, stride, 0, BN_EPS)?;
        let k = c.weight.dim(2)?;
        if stride == 1 && k % 2 == 1 {
            c.padding = k / 2;
        }
        Ok(Self { conv: c })
    }

    fn depthwise(sd: &StateDict, conv: &str, bn: &str, stride: usize) -> Result<Self> {
        let c = Self::load(sd, conv, bn, stride)?;
        let channels = c.conv.out_channels();
        if c.conv.weight.dim(1)? != 1 {
            return Err(sd.error(format!("{conv}.weight: {:?} is not a depthwise kernel", c.conv.weight.dims())));
        }
        Ok(Self { conv: c.conv.with_groups(channels) })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.conv;
        if c.padding > 0 || (c.stride == 1 && c.weight.dim(2)? == 1) {
            return c.forward(x);
        }
        // geffnet's `_calc_same_pad`: max((ceil(i / s) - 1) * s + k - i, 0), the smaller half first
        let pad = |i: usize, k: usize| ((i.div_ceil(c.stride) - 1) * c.stride + k).saturating_sub(i);
        let (_, _, h, w) = x.dims4()?;
        let (ph, pw) = (pad(h, c.weight.dim(2)?), pad(w, c.weight.dim(3)?));
        let x = x.pad_with_zeros(2, ph / 2, ph - ph / 2)?.pad_with_zeros(3, pw / 2, pw - pw / 2)?;
        c.forward(&x)
    }
}

/// Squeeze-and-excitation: the channel means through a bottleneck (swish) gate each channel (sigmoid).
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    pub conv_reduce: Conv,
    pub conv_expand: Conv,
}

impl SqueezeExcite {
    /// `{name}.se`, if the block has one.
    fn load(sd: &StateDict, name: &str, channels: usize) -> Result<Option<Self>> {
        if !sd.has(&format!("{name}.se.conv_reduce.weight")) {
            return Ok(None);
        }
        let se = Self {
            conv_reduce: Conv::load(sd, &format!("{name}.se.conv_reduce"), 1, 0)?,
            conv_expand: Conv::load(sd, &format!("{name}.se.conv_expand"), 1, 0)?,
        };
        if se.conv_reduce.in_channels() != channels || se.conv_expand.out_channels() != channels {
            return Err(sd.error(format!("{name}.se: gates {} channels, the block has {channels}", channels)));
        }
        Ok(Some(se))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let squeezed = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let gate = self.conv_expand.forward(&self.conv_reduce.forward(&squeezed)?.silu()?)?;
        Ok(x.broadcast_mul(&candle_nn::ops::sigmoid(&gate)?)?)
    }
}

/// One block; the batch norms are folded into the convolutions before them.
#[derive(Debug, Clone)]
pub enum Block {
    /// geffnet's `DepthwiseSeparableConv`: `conv_dw` (+`bn1`, swish), SE, `conv_pw` (+`bn2`, no activation).
    DepthwiseSeparable { conv_dw: SameConv, se: Option<SqueezeExcite>, conv_pw: Conv, residual: bool },
    /// geffnet's `InvertedResidual`: `conv_pw` (+`bn1`, swish), `conv_dw` (+`bn2`, swish), SE, `conv_pwl` (+`bn3`).
    InvertedResidual { conv_pw: Conv, conv_dw: SameConv, se: Option<SqueezeExcite>, conv_pwl: Conv, residual: bool },
}

impl Block {
    fn load(sd: &StateDict, name: &str, stride: usize) -> Result<Self> {
        let key = |k: &str| format!("{name}.{k}");
        if sd.has(&key("conv_pwl.weight")) {
            let conv_pw = Conv::load_bn_eps(sd, &key("conv_pw"), &key("bn1"), 1, 0, BN_EPS)?;
            let conv_dw = SameConv::depthwise(sd, &key("conv_dw"), &key("bn2"), stride)?;
            let se = SqueezeExcite::load(sd, name, conv_dw.conv.out_channels())?;
            let conv_pwl = Conv::load_bn_eps(sd, &key("conv_pwl"), &key("bn3"), 1, 0, BN_EPS)?;
            check_chain(sd, name, &[conv_pw.out_channels(), conv_dw.conv.out_channels(), conv_pwl.in_channels()])?;
            let residual = stride == 1 && conv_pw.in_channels() == conv_pwl.out_channels();
            Ok(Self::InvertedResidual { conv_pw, conv_dw, se, conv_pwl, residual })
        } else {
            let conv_dw = SameConv::depthwise(sd, &key("conv_dw"), &key("bn1"), stride)?;
            let se = SqueezeExcite::load(sd, name, conv_dw.conv.out_channels())?;
            let conv_pw = Conv::load_bn_eps(sd, &key("conv_pw"), &key("bn2"), 1, 0, BN_EPS)?;
            check_chain(sd, name, &[conv_dw.conv.out_channels(), conv_pw.in_channels()])?;
            let residual = stride == 1 && conv_dw.conv.out_channels() == conv_pw.out_channels();
            Ok(Self::DepthwiseSeparable { conv_dw, se, conv_pw, residual })
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Self::DepthwiseSeparable { conv_dw, .. } => conv_dw.conv.out_channels(),
            Self::InvertedResidual { conv_pw, .. } => conv_pw.in_channels(),
        }
    }

    pub fn out_channels(&self) -> usize {
        match self {
            Self::DepthwiseSeparable { conv_pw, .. } => conv_pw.out_channels(),
            Self::InvertedResidual { conv_pwl, .. } => conv_pwl.out_channels(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let excite = |se: &Option<SqueezeExcite>, y: Tensor| match se {
            Some(se) => se.forward(&y),
            None => Ok(y),
        };
        let (y, residual) = match self {
            Self::DepthwiseSeparable { conv_dw, se, conv_pw, residual } => {
                let y = excite(se, conv_dw.forward(x)?.silu()?)?;
                (conv_pw.forward(&y)?, *residual)
            }
            Self::InvertedResidual { conv_pw, conv_dw, se, conv_pwl, residual } => {
                let y = conv_dw.forward(&conv_pw.forward(x)?.silu()?)?.silu()?;
                (conv_pwl.forward(&excite(se, y)?)?, *residual)
            }
        };
        Ok(if residual { (y + x)? } else { y })
    }
}

/// Each convolution of a block takes what the one before makes.
fn check_chain(sd: &StateDict, name: &str, widths: &[usize]) -> Result<()> {
    if widths.windows(2).any(|w| w[0] != w[1]) {
        return Err(sd.error(format!("{name}: the convolutions' widths {widths:?} do not chain")));
    }
    Ok(())
}

/// What the encoder hands on: every stage's output and the head convolution's (before its batch norm, which
/// NormalBAE skips).
pub struct Features {
    pub stages: Vec<Tensor>,
    pub head: Tensor,
}

/// geffnet's `GenEfficientNet` up to `conv_head`.
#[derive(Debug, Clone)]
pub struct EfficientNet {
    /// `conv_stem` + `bn1`.
    pub conv_stem: SameConv,
    /// `blocks.{stage}.{block}`.
    pub blocks: Vec<Vec<Block>>,
    pub conv_head: Conv,
}

impl EfficientNet {
    /// The net under `prefix` (e.g. `encoder.original_model.`): stages and blocks as many as the file has.
    pub fn load(sd: &StateDict, prefix: &str) -> Result<Self> {
        let conv_stem = SameConv::load(sd, &format!("{prefix}conv_stem"), &format!("{prefix}bn1"), 2)?;
        let stages = sd.count(&format!("{prefix}blocks."), ".0.conv_dw.weight");
        if stages == 0 || stages > STAGE_STRIDES.len() {
            return Err(
                sd.error(format!("{prefix}blocks: {stages} stages, an EfficientNet has 1 to {}", STAGE_STRIDES.len()))
            );
        }
        let mut width = conv_stem.conv.out_channels();
        let mut blocks = Vec::with_capacity(stages);
        for (s, stride) in STAGE_STRIDES.iter().enumerate().take(stages) {
            let stage = format!("{prefix}blocks.{s}.");
            let count = sd.count(&stage, ".conv_dw.weight");
            let mut stage_blocks = Vec::with_capacity(count);
            for b in 0..count {
                let name = format!("{stage}{b}");
                let block = Block::load(sd, &name, if b == 0 { *stride } else { 1 })?;
                if block.in_channels() != width {
                    return Err(sd.error(format!("{name} takes {} channels, gets {width}", block.in_channels())));
                }
                width = block.out_channels();
                stage_blocks.push(block);
            }
            blocks.push(stage_blocks);
        }
        let conv_head = Conv::load(sd, &format!("{prefix}conv_head"), 1, 0)?;
        if conv_head.in_channels() != width {
            return Err(sd.error(format!("{prefix}conv_head takes {} channels, gets {width}", conv_head.in_channels())));
        }
        Ok(Self { conv_stem, blocks, conv_head })
    }

    /// The output width of stage `s`.
    pub fn stage_channels(&self, s: usize) -> usize {
        self.blocks[s].last().map(Block::out_channels).unwrap_or(0)
    }

    /// 1. stem, 2. the stages (each output kept), 3. head convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Features> {
        let mut x = self.conv_stem.forward(x)?.silu()?;
        let mut stages = Vec::with_capacity(self.blocks.len());
        for stage in &self.blocks {
            for block in stage {
                x = block.forward(&x)?;
            }
            stages.push(x.clone());
        }
        let head = self.conv_head.forward(&x)?;
        Ok(Features { stages, head })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn same_padding_puts_the_extra_row_after() {
        // a 3x3 stride-2 kernel that reads its top-left tap
        let mut w = vec![0f32; 9];
        w[0] = 1.0;
        let weight = Tensor::from_vec(w, (1, 1, 3, 3), &Device::Cpu).unwrap();
        let bias = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let conv = SameConv { conv: Conv { weight, bias, stride: 2, padding: 0, dilation: 1, groups: 1 } };
        let run = |side: usize| {
            let x = Tensor::arange(0f32, (side * side) as f32, &Device::Cpu).unwrap();
            let x = x.reshape((1, 1, side, side)).unwrap();
            conv.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        // an even side: one padding row/column after only, so output (i, j) reads input (2i, 2j)
        assert_eq!(run(4), vec![0.0, 2.0, 8.0, 10.0]);
        // an odd side: one before and one after (output (0, 0) reads the padding)
        assert_eq!(run(5), vec![0.0, 0.0, 0.0, 0.0, 6.0, 8.0, 0.0, 16.0, 18.0]);
    }
}
