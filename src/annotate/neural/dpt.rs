//! The DPT head of Depth Anything V2 (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"): four
//! backbone taps reassembled into a feature pyramid (1×1 projection, then ×4, ×2, ×1 and ×½ resizing), each
//! brought to the fusion width, fused coarse to fine by residual units with bilinear (corner-aligned)
//! upsampling, and a small convolutional head that predicts relative inverse depth at the input's resolution.
//!
//! Widths and the resize layers are read from the file. Original names (`depth_head.projects.{i}`,
//! `scratch.refinenet{4-i}.resConfUnit1.conv1`) and transformers' (`neck.reassemble_stage.layers.{i}.projection`,
//! `neck.fusion_stage.layers.{i}.residual_layer1.convolution1`) are listed in [`HeadKeys`].
use candle_core::Tensor;

use super::dinov2::PATCH;
use super::nn::{self, Conv, ConvTranspose};
use super::weights::StateDict;
use crate::Result;

/// Where the head's tensors are in one layout (`{i}`: the pyramid level, 0 = finest).
pub struct HeadKeys {
    pub project: fn(usize) -> String,
    pub resize: fn(usize) -> String,
    pub layer_rn: fn(usize) -> String,
    /// The fusion block that consumes level `i` (`refinenet{i+1}`, transformers' `layers.{3-i}`).
    pub fusion: fn(usize) -> String,
    /// Within a fusion block: the residual units and the output projection, and the unit's two convolutions.
    pub residual: [&'static str; 2],
    pub conv: [&'static str; 2],
    pub out_conv: &'static str,
    pub head: [&'static str; 3],
}

pub const ORIGINAL: HeadKeys = HeadKeys {
    project: |i| format!("depth_head.projects.{i}"),
    resize: |i| format!("depth_head.resize_layers.{i}"),
    layer_rn: |i| format!("depth_head.scratch.layer{}_rn", i + 1),
    fusion: |i| format!("depth_head.scratch.refinenet{}", i + 1),
    residual: ["resConfUnit1", "resConfUnit2"],
    conv: ["conv1", "conv2"],
    out_conv: "out_conv",
    head: ["depth_head.scratch.output_conv1", "depth_head.scratch.output_conv2.0", "depth_head.scratch.output_conv2.2"],
};

pub const TRANSFORMERS: HeadKeys = HeadKeys {
    project: |i| format!("neck.reassemble_stage.layers.{i}.projection"),
    resize: |i| format!("neck.reassemble_stage.layers.{i}.resize"),
    layer_rn: |i| format!("neck.convs.{i}"),
    fusion: |i| format!("neck.fusion_stage.layers.{}", 3 - i),
    residual: ["residual_layer1", "residual_layer2"],
    conv: ["convolution1", "convolution2"],
    out_conv: "projection",
    head: ["head.conv1", "head.conv2", "head.conv3"],
};

/// How one pyramid level is resized after its projection.
enum Resize {
    Up(ConvTranspose),
    Same,
    Down(Conv),
}

/// `ResidualConvUnit`: `x + conv2(relu(conv1(relu(x))))`.
struct ResidualUnit([Conv; 2]);

impl ResidualUnit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.0[0].forward(&nn::relu(x)?)?;
        let y = self.0[1].forward(&nn::relu(&y)?)?;
        Ok((y + x)?)
    }
}

struct Fusion {
    /// Applied to the level's own features (absent on the coarsest level, which has nothing to add to).
    unit1: Option<ResidualUnit>,
    unit2: ResidualUnit,
    out_conv: Conv,
}

pub struct DptHead {
    projects: Vec<Conv>,
    resizes: Vec<Resize>,
    layer_rn: Vec<Conv>,
    /// Finest level first.
    fusions: Vec<Fusion>,
    head: [Conv; 3],
}

impl DptHead {
    pub fn load(sd: &StateDict, keys: &HeadKeys) -> Result<Self> {
        let mut projects = Vec::new();
        let mut resizes = Vec::new();
        let mut layer_rn = Vec::new();
        let mut fusions = Vec::new();
        for i in 0..4 {
            projects.push(Conv::load(sd, &(keys.project)(i), 1, 0)?);
            let r = (keys.resize)(i);
            let weight = format!("{r}.weight");
            resizes.push(if !sd.has(&weight) {
                Resize::Same
            } else if sd.get_rank(&weight, 4)?.dim(2)? == 3 {
                Resize::Down(Conv::load(sd, &r, 2, 1)?)
            } else {
                // kernel = stride: every input pixel becomes a k×k tile
                let k = sd.get_rank(&weight, 4)?.dim(2)?;
                Resize::Up(ConvTranspose::load(sd, &r, k, 0, 0)?)
            });
            layer_rn.push(Conv::load(sd, &(keys.layer_rn)(i), 1, 1)?);
            let f = (keys.fusion)(i);
            let unit = |which: &str| -> Result<ResidualUnit> {
                let c = |j: usize| Conv::load(sd, &format!("{f}.{which}.{}", keys.conv[j]), 1, 1);
                Ok(ResidualUnit([c(0)?, c(1)?]))
            };
            fusions.push(Fusion {
                unit1: if i < 3 { Some(unit(keys.residual[0])?) } else { None },
                unit2: unit(keys.residual[1])?,
                out_conv: Conv::load(sd, &format!("{f}.{}", keys.out_conv), 1, 0)?,
            });
        }
        let head = [
            Conv::load(sd, keys.head[0], 1, 1)?,
            Conv::load(sd, keys.head[1], 1, 1)?,
            Conv::load(sd, keys.head[2], 1, 0)?,
        ];
        Ok(Self { projects, resizes, layer_rn, fusions, head })
    }

    /// The relative depth (1, 14·ph, 14·pw) from the four taps' patch tokens (1, ph·pw, width).
    pub fn forward(&self, taps: &[Tensor], ph: usize, pw: usize) -> Result<Tensor> {
        // 1. reassemble: tokens to images, projected and resized to strides 4, 8, 16, 32 (in patch units ×4…×½)
        let mut levels = Vec::with_capacity(4);
        for (i, t) in taps.iter().enumerate() {
            let (n, _, width) = t.dims3()?;
            let x = t.transpose(1, 2)?.reshape((n, width, ph, pw))?;
            let x = self.projects[i].forward(&x)?;
            let x = match &self.resizes[i] {
                Resize::Up(up) => up.forward(&x)?,
                Resize::Same => x,
                Resize::Down(down) => down.forward(&x)?,
            };
            levels.push(self.layer_rn[i].forward(&x)?);
        }
        // 2. fuse, coarse to fine: each block upsamples to the next finer level's size (×2 after the finest)
        let mut path: Option<Tensor> = None;
        for i in (0..4).rev() {
            let f = &self.fusions[i];
            let mut x = match (&path, &f.unit1) {
                (None, _) => levels[i].clone(),
                (Some(p), Some(unit)) => {
                    let own = unit.forward(&levels[i])?;
                    // transformers resizes the level when the sizes differ (they do not for multiples of 14)
                    let (h, w) = (p.dim(2)?, p.dim(3)?);
                    (p + nn::interpolate_bilinear(&own, h, w)?)?
                }
                (Some(p), None) => p.clone(),
            };
            x = f.unit2.forward(&x)?;
            let (h, w) = match i {
                0 => (2 * x.dim(2)?, 2 * x.dim(3)?),
                _ => (levels[i - 1].dim(2)?, levels[i - 1].dim(3)?),
            };
            x = nn::interpolate_bilinear_corners(&x, h, w)?;
            path = Some(f.out_conv.forward(&x)?);
        }
        let path = path.expect("four levels");
        // 3. head: halve the width, upsample to the input, predict one channel (relative depth is >= 0)
        let x = self.head[0].forward(&path)?;
        let x = nn::interpolate_bilinear_corners(&x, ph * PATCH, pw * PATCH)?;
        let x = nn::relu(&self.head[1].forward(&x)?)?;
        let x = nn::relu(&self.head[2].forward(&x)?)?;
        Ok(x.squeeze(1)?)
    }
}
