//! The ResNet half of timm's hybrid ViTs (`vit_base_resnet50_384`, the backbone of MiDaS's DPT-Hybrid): a BiT-style
//! ResNet-V2 without pre-activation (timm's `ResNetV2(preact=False, stem_type="same")`), whose convolutions are
//! weight-standardised (`StdConv2dSame`: each filter shifted to mean 0 and scaled to variance 1 before use, with
//! TensorFlow's "SAME" padding: the odd pixel of padding goes after the input) and whose norms are GroupNorm with
//! 32 groups.
//!
//! Stem: 7×7 stride-2 convolution, GroupNorm + ReLU, 3×3 stride-2 max pool ("SAME", padded with -inf). Stages
//! (ResNet-50's first three: 3, 4 and 9 bottlenecks): stage 0 keeps the stride, every later stage halves it in its
//! first block, whose shortcut is a 1×1 convolution + GroupNorm. Widths and block counts are read from the file;
//! the group count and the strides are the architecture's.
//!
//! Keys (under the prefix, `pretrained.model.patch_embed.backbone.` in MiDaS): `stem.conv`, `stem.norm`,
//! `stages.{s}.blocks.{b}.{conv1,norm1,conv2,norm2,conv3,norm3}`, `…blocks.0.downsample.{conv,norm}`.
use candle_core::{DType, Tensor};

use super::nn::{self, Conv};
use super::weights::StateDict;
use crate::model::ops::norm::group_norm;
use crate::Result;

/// timm's `GroupNormAct(num_groups=32)`.
pub const GROUPS: usize = 32;
/// GroupNorm's epsilon (torch's default).
const GN_EPS: f64 = 1e-5;
/// The weight standardisation's epsilon (`partial(StdConv2dSame, eps=1e-8)` in `_resnetv2`).
const WS_EPS: f64 = 1e-8;
/// The stem convolution's kernel and stride, and the stem pool's.
const STEM_KERNEL: usize = 7;
const POOL_KERNEL: usize = 3;

/// TensorFlow "SAME" padding of one side of length `len`: (before, after), the odd pixel after.
fn same_padding(len: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let total = ((len.div_ceil(stride) - 1) * stride + kernel).saturating_sub(len);
    (total / 2, total - total / 2)
}

/// `x` (1, C, H, W) padded "SAME" for `kernel`/`stride` with `value`.
fn pad_same(x: &Tensor, kernel: usize, stride: usize, value: f32) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    if value == 0.0 {
        return Ok(x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?);
    }
    let pad = |x: &Tensor, dim: usize, before: usize, after: usize| -> Result<Tensor> {
        if before + after == 0 {
            return Ok(x.clone());
        }
        let mut parts = Vec::with_capacity(3);
        let mut shape = x.dims().to_vec();
        if before > 0 {
            shape[dim] = before;
            parts.push(Tensor::full(value, shape.as_slice(), x.device())?);
        }
        parts.push(x.clone());
        if after > 0 {
            shape[dim] = after;
            parts.push(Tensor::full(value, shape.as_slice(), x.device())?);
        }
        Ok(Tensor::cat(&parts, dim)?)
    };
    pad(&pad(x, 2, top, bottom)?, 3, left, right)
}

/// `StdConv2dSame`: the standardised filters in an ordinary convolution, "SAME" padding added per input.
struct StdConv {
    conv: Conv,
    kernel: usize,
}

impl StdConv {
    fn load(sd: &StateDict, name: &str, stride: usize) -> Result<Self> {
        let weight = sd.get_rank(&format!("{name}.weight"), 4)?;
        let (out, kernel) = (weight.dim(0)?, weight.dim(2)?);
        // per output filter: (w - mean) / sqrt(var + eps), the biased variance (batch norm over the filter)
        let flat = weight.reshape((out, ()))?.to_dtype(DType::F64)?;
        let mean = flat.mean_keepdim(1)?;
        let centred = flat.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let standard = centred.broadcast_div(&(var + WS_EPS)?.sqrt()?)?;
        let weight = standard.to_dtype(DType::F32)?.reshape(weight.dims())?;
        Ok(Self { conv: Conv::new(sd, name, weight, stride, 0)?, kernel })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = self.conv.stride;
        let (pads_h, pads_w) = (same_padding(h, self.kernel, s), same_padding(w, self.kernel, s));
        // symmetric padding is the convolution's own (no copy of the input)
        if pads_h.0 == pads_h.1 && pads_w.0 == pads_w.1 && pads_h.0 == pads_w.0 {
            return Conv { padding: pads_h.0, ..self.conv.clone() }.forward(x);
        }
        self.conv.forward(&pad_same(x, self.kernel, s, 0.0)?)
    }
}

/// `GroupNormAct`: GroupNorm (32 groups), then ReLU where the block applies one.
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
}

impl GroupNorm {
    fn load(sd: &StateDict, name: &str, channels: usize) -> Result<Self> {
        let weight = sd.get_rank(&format!("{name}.weight"), 1)?;
        if weight.dim(0)? != channels || !channels.is_multiple_of(GROUPS) {
            return Err(sd.error(format!(
                "{name}.weight: {} channels after a {channels}-channel convolution, in {GROUPS} groups",
                weight.dim(0)?
            )));
        }
        Ok(Self { weight, bias: sd.get_rank(&format!("{name}.bias"), 1)? })
    }

    fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let y = group_norm(x, &self.weight, &self.bias, GROUPS, GN_EPS, false)?;
        if relu {
            nn::relu(&y)
        } else {
            Ok(y)
        }
    }
}

/// timm's non-pre-activation `Bottleneck`: 1×1 → 3×3 (with the stride) → 1×1, each normalised, ReLU after the
/// shortcut is added.
struct Bottleneck {
    downsample: Option<(StdConv, GroupNorm)>,
    conv1: StdConv,
    norm1: GroupNorm,
    conv2: StdConv,
    norm2: GroupNorm,
    conv3: StdConv,
    norm3: GroupNorm,
}

impl Bottleneck {
    fn load(sd: &StateDict, p: &str, stride: usize) -> Result<Self> {
        let conv = |name: &str, stride: usize| -> Result<(StdConv, GroupNorm)> {
            let c = StdConv::load(sd, &format!("{p}.{name}"), stride)?;
            let norm = name.replace("conv", "norm");
            let n = GroupNorm::load(sd, &format!("{p}.{norm}"), c.conv.out_channels())?;
            Ok((c, n))
        };
        let downsample = if sd.has(&format!("{p}.downsample.conv.weight")) {
            let c = StdConv::load(sd, &format!("{p}.downsample.conv"), stride)?;
            let n = GroupNorm::load(sd, &format!("{p}.downsample.norm"), c.conv.out_channels())?;
            Some((c, n))
        } else {
            None
        };
        let ((conv1, norm1), (conv2, norm2), (conv3, norm3)) =
            (conv("conv1", 1)?, conv("conv2", stride)?, conv("conv3", 1)?);
        Ok(Self { downsample, conv1, norm1, conv2, norm2, conv3, norm3 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?, false)?,
            None => x.clone(),
        };
        let y = self.norm1.forward(&self.conv1.forward(x)?, true)?;
        let y = self.norm2.forward(&self.conv2.forward(&y)?, true)?;
        let y = self.norm3.forward(&self.conv3.forward(&y)?, false)?;
        nn::relu(&(y + shortcut)?)
    }
}

pub struct ResNetV2 {
    stem_conv: StdConv,
    stem_norm: GroupNorm,
    /// Per stage, its bottlenecks.
    stages: Vec<Vec<Bottleneck>>,
}

impl ResNetV2 {
    /// The stem and every stage under `prefix` (e.g. `pretrained.model.patch_embed.backbone.`).
    pub fn load(sd: &StateDict, prefix: &str) -> Result<Self> {
        let stem_conv = StdConv::load(sd, &format!("{prefix}stem.conv"), 2)?;
        if stem_conv.kernel != STEM_KERNEL {
            return Err(sd.error(format!("{prefix}stem.conv.weight: a {0}x{0} stem expected", STEM_KERNEL)));
        }
        let stem_norm = GroupNorm::load(sd, &format!("{prefix}stem.norm"), stem_conv.conv.out_channels())?;
        let count = sd.count(&format!("{prefix}stages."), ".blocks.0.conv1.weight");
        if count == 0 {
            return Err(sd.error(format!("no tensor {prefix}stages.0.blocks.0.conv1.weight: not a hybrid ViT")));
        }
        let stages = (0..count)
            .map(|s| {
                let p = format!("{prefix}stages.{s}.blocks.");
                let blocks = sd.count(&p, ".conv1.weight");
                // output stride 32: the first stage keeps the stem's stride, the others halve it
                (0..blocks)
                    .map(|b| Bottleneck::load(sd, &format!("{p}{b}"), if s > 0 && b == 0 { 2 } else { 1 }))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stem_conv, stem_norm, stages })
    }

    /// The channels of stage `s`'s output.
    pub fn stage_channels(&self, s: usize) -> usize {
        self.stages[s].last().map(|b| b.conv3.conv.out_channels()).unwrap_or(0)
    }

    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Every stage's output for `x` (1, 3, H, W): strides 4, 8, 16, … of the input.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        // 1. stem
        let x = self.stem_norm.forward(&self.stem_conv.forward(x)?, true)?;
        let mut x = pad_same(&x, POOL_KERNEL, 2, f32::NEG_INFINITY)?.max_pool2d_with_stride(POOL_KERNEL, 2)?;
        // 2. stages
        let mut outputs = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            outputs.push(x.clone());
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_padding_puts_the_odd_pixel_after() {
        // 7x7 stride 2 on an even side: 5 pixels, 2 before, 3 after; 3x3 stride 2: 0 before, 1 after
        assert_eq!(same_padding(128, 7, 2), (2, 3));
        assert_eq!(same_padding(64, 3, 2), (0, 1));
        assert_eq!(same_padding(65, 3, 2), (1, 1));
        // stride 1: symmetric; 1x1: none
        assert_eq!(same_padding(32, 3, 1), (1, 1));
        assert_eq!(same_padding(32, 1, 2), (0, 0));
    }

    #[test]
    fn weight_standardisation_gives_each_filter_mean_0_variance_1() {
        let dev = Device::Cpu;
        let w = (Tensor::randn(0f32, 3., (4, 2, 3, 3), &dev).unwrap() + 5.0).unwrap();
        let sd = StateDict::from_tensors("t.pt", [("c.weight", w)]);
        let c = StdConv::load(&sd, "c", 1).unwrap();
        let flat = c.conv.weight.reshape((4, 18)).unwrap();
        for row in flat.to_vec2::<f32>().unwrap() {
            let mean = row.iter().sum::<f32>() / 18.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 18.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean}, var {var}");
        }
    }

    #[test]
    fn max_pool_pads_with_minus_infinity() {
        // an all-negative plane: a zero padding would win the max at the bottom/right edge
        let x = Tensor::full(-3f32, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let y =
            pad_same(&x, POOL_KERNEL, 2, f32::NEG_INFINITY).unwrap().max_pool2d_with_stride(POOL_KERNEL, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![-3.0; 4]);
    }
}
