//! The DPT head (Ranftl et al. 2021, "Vision Transformers for Dense Prediction") of Depth Anything V2 and MiDaS's
//! DPT-Hybrid: four backbone levels reassembled into a feature pyramid ([`Reassemble`]: a 1×1 projection, then
//! ×4, ×2, ×1 or ×½ resizing), each brought to the fusion width, fused coarse to fine by residual units with
//! bilinear (corner-aligned) upsampling, and a small convolutional head that predicts relative inverse depth at
//! the input's resolution ([`DptFusion`]).
//!
//! Depth Anything reassembles all four levels from ViT tokens ([`DptHead`]); MiDaS's hybrid takes its two finest
//! levels straight from the ResNet stem and reassembles only the other two (`super::midas`), then fuses the same
//! way. Widths and the resize layers are read from the file. Original names (`depth_head.projects.{i}`,
//! `scratch.refinenet{4-i}.resConfUnit1.conv1`) and transformers' (`neck.reassemble_stage.layers.{i}.projection`,
//! `neck.fusion_stage.layers.{i}.residual_layer1.convolution1`) are listed in [`HeadKeys`] and [`FusionKeys`].
use candle_core::Tensor;

use super::dinov2::PATCH;
use super::nn::{self, Conv, ConvTranspose};
use super::weights::StateDict;
use crate::Result;

/// Where the head's tensors are in one layout (`{i}`: the pyramid level, 0 = finest).
pub struct HeadKeys {
    pub project: fn(usize) -> String,
    pub resize: fn(usize) -> String,
    pub fusion: FusionKeys,
}

/// Where the fusion's tensors are in one layout.
pub struct FusionKeys {
    pub layer_rn: fn(usize) -> String,
    /// The fusion block that consumes level `i` (`refinenet{i+1}`, transformers' `layers.{3-i}`).
    pub fusion: fn(usize) -> String,
    /// Within a fusion block: the residual units and the output projection, and the unit's two convolutions.
    pub residual: [&'static str; 2],
    pub conv: [&'static str; 2],
    pub out_conv: &'static str,
    /// The head's convolutions: to half the fusion width (3×3), to 32 channels (3×3), to the depth (1×1).
    pub head: [&'static str; 3],
}

pub const ORIGINAL: HeadKeys = HeadKeys {
    project: |i| format!("depth_head.projects.{i}"),
    resize: |i| format!("depth_head.resize_layers.{i}"),
    fusion: FusionKeys {
        layer_rn: |i| format!("depth_head.scratch.layer{}_rn", i + 1),
        fusion: |i| format!("depth_head.scratch.refinenet{}", i + 1),
        residual: ["resConfUnit1", "resConfUnit2"],
        conv: ["conv1", "conv2"],
        out_conv: "out_conv",
        head: [
            "depth_head.scratch.output_conv1",
            "depth_head.scratch.output_conv2.0",
            "depth_head.scratch.output_conv2.2",
        ],
    },
};

pub const TRANSFORMERS: HeadKeys = HeadKeys {
    project: |i| format!("neck.reassemble_stage.layers.{i}.projection"),
    resize: |i| format!("neck.reassemble_stage.layers.{i}.resize"),
    fusion: FusionKeys {
        layer_rn: |i| format!("neck.convs.{i}"),
        fusion: |i| format!("neck.fusion_stage.layers.{}", 3 - i),
        residual: ["residual_layer1", "residual_layer2"],
        conv: ["convolution1", "convolution2"],
        out_conv: "projection",
        head: ["head.conv1", "head.conv2", "head.conv3"],
    },
};

/// How one pyramid level is resized after its projection.
enum Resize {
    Up(ConvTranspose),
    Same,
    Down(Conv),
}

/// One level's reassembly: a 1×1 projection of the token image, then its resize layer (a transposed convolution
/// with kernel = stride, nothing, or a 3×3 stride-2 convolution), told apart by the file.
pub struct Reassemble {
    project: Conv,
    resize: Resize,
}

impl Reassemble {
    /// `{project}` and, if the file has it, `{resize}`.
    pub fn load(sd: &StateDict, project: &str, resize: &str) -> Result<Self> {
        let weight = format!("{resize}.weight");
        let resize = if !sd.has(&weight) {
            Resize::Same
        } else if sd.get_rank(&weight, 4)?.dim(2)? == 3 {
            Resize::Down(Conv::load(sd, resize, 2, 1)?)
        } else {
            // kernel = stride: every input pixel becomes a k×k tile
            let k = sd.get_rank(&weight, 4)?.dim(2)?;
            Resize::Up(ConvTranspose::load(sd, resize, k, 0, 0)?)
        };
        Ok(Self { project: Conv::load(sd, project, 1, 0)?, resize })
    }

    /// The level's features from a token image (1, width, ph, pw).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.project.forward(x)?;
        match &self.resize {
            Resize::Up(up) => up.forward(&x),
            Resize::Same => Ok(x),
            Resize::Down(down) => down.forward(&x),
        }
    }

    /// The channels it takes and makes.
    pub fn in_channels(&self) -> usize {
        self.project.in_channels()
    }

    pub fn out_channels(&self) -> usize {
        self.project.out_channels()
    }
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

/// The pyramid brought to the fusion width (`layer{i}_rn`), fused coarse to fine, and the depth head.
pub struct DptFusion {
    layer_rn: Vec<Conv>,
    /// Finest level first.
    fusions: Vec<Fusion>,
    head: [Conv; 3],
}

impl DptFusion {
    pub fn load(sd: &StateDict, keys: &FusionKeys) -> Result<Self> {
        let mut layer_rn = Vec::new();
        let mut fusions = Vec::new();
        for i in 0..4 {
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
        Ok(Self { layer_rn, fusions, head })
    }

    /// The input channels of level `i`'s `layer_rn` (what the backbone must give it).
    pub fn level_channels(&self, i: usize) -> usize {
        self.layer_rn[i].in_channels()
    }

    /// The relative depth (1, out_h, out_w) from the four levels (strides 4, 8, 16, 32 of the input, finest first).
    pub fn forward(&self, levels: &[Tensor], out: (usize, usize)) -> Result<Tensor> {
        // 1. every level to the fusion width
        let levels = levels.iter().zip(&self.layer_rn).map(|(x, rn)| rn.forward(x)).collect::<Result<Vec<_>>>()?;
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
        // 3. head: halve the width, upsample to the output, predict one channel (relative depth is >= 0)
        let x = self.head[0].forward(&path)?;
        let x = nn::interpolate_bilinear_corners(&x, out.0, out.1)?;
        let x = nn::relu(&self.head[1].forward(&x)?)?;
        let x = nn::relu(&self.head[2].forward(&x)?)?;
        Ok(x.squeeze(1)?)
    }
}

/// Depth Anything's head: all four levels reassembled from the backbone's tokens, then fused.
pub struct DptHead {
    reassemble: Vec<Reassemble>,
    fusion: DptFusion,
}

impl DptHead {
    pub fn load(sd: &StateDict, keys: &HeadKeys) -> Result<Self> {
        let reassemble =
            (0..4).map(|i| Reassemble::load(sd, &(keys.project)(i), &(keys.resize)(i))).collect::<Result<_>>()?;
        Ok(Self { reassemble, fusion: DptFusion::load(sd, &keys.fusion)? })
    }

    /// The relative depth (1, 14·ph, 14·pw) from the four taps' patch tokens (1, ph·pw, width).
    pub fn forward(&self, taps: &[Tensor], ph: usize, pw: usize) -> Result<Tensor> {
        // reassemble: tokens to images, projected and resized to strides 4, 8, 16, 32 (in patch units ×4…×½)
        let mut levels = Vec::with_capacity(4);
        for (t, r) in taps.iter().zip(&self.reassemble) {
            let (n, _, width) = t.dims3()?;
            levels.push(r.forward(&t.transpose(1, 2)?.reshape((n, width, ph, pw))?)?);
        }
        self.fusion.forward(&levels, (ph * PATCH, pw * PATCH))
    }
}
