//! PiDiNet soft edges (Su et al. 2021, "Pixel Difference Networks"; controlnet_aux `pidi/`, weights
//! `table5_pidinet.pth`, the `carv4` net with dilation 24 and spatial attention), the other input of
//! control_v11p_sd15_softedge.
//!
//! Pixel-difference convolutions are plain convolutions of a transformed kernel, so the file's kernels are
//! converted once at load ("cd": centre minus the sum, "ad": minus the clockwise-rotated kernel, "rd": a 5×5
//! ring of differences). Four stages of depthwise+pointwise blocks feed, per stage, a dilated module (CDCM),
//! a spatial attention (CSAM) and a one-channel reduction; the four maps are upsampled, fused by a 1×1
//! classifier and squashed. The input is BGR in 0…1.
use candle_core::{Device, Tensor};
use image::RgbImage;

use super::nn::{self, Conv};
use super::post;
use super::weights::StateDict;
use crate::annotate::{Detector, Preprocess};
use crate::Result;

/// The blocks in order; the pixel-difference type of layer `i` (0 = `init_block`) is `carv4`'s `[cd, ad, rd,
/// cv][i % 4]`.
const BLOCKS: [&str; 15] = [
    "block1_1", "block1_2", "block1_3", "block2_1", "block2_2", "block2_3", "block2_4", "block3_1", "block3_2",
    "block3_3", "block3_4", "block4_1", "block4_2", "block4_3", "block4_4",
];
/// The last block of each stage (whose output feeds the side outputs).
const STAGE_ENDS: [&str; 4] = ["block1_3", "block2_4", "block3_4", "block4_4"];
/// CDCM's dilations (fixed in the code, not in the file).
const CDCM_DILATIONS: [usize; 4] = [5, 7, 9, 11];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pdc {
    Vanilla,
    Central,
    Angular,
    Radial,
}

impl Pdc {
    fn of_layer(i: usize) -> Self {
        [Pdc::Central, Pdc::Angular, Pdc::Radial, Pdc::Vanilla][i % 4]
    }

    /// The plain convolution kernel (and its padding) equal to this pixel-difference convolution with the 3×3
    /// kernel `w` (out, in, 3, 3) at padding 1 (`createConvFunc`).
    fn convert(self, sd: &StateDict, name: &str, w: &Tensor) -> Result<(Tensor, usize)> {
        let dims = w.dims().to_vec();
        if dims.len() != 4 || dims[2] != 3 || dims[3] != 3 {
            return Err(sd.error(format!("{name}: a pixel-difference kernel is 3x3, found {dims:?}")));
        }
        let k = w.flatten_all()?.to_vec1::<f32>()?;
        let kernels = k.chunks(9);
        let (data, size, padding): (Vec<f32>, usize, usize) = match self {
            Pdc::Vanilla => return Ok((w.clone(), 1)),
            // y = conv(x, w) - conv1x1(x, sum(w)): the sum comes off the centre tap
            Pdc::Central => (
                kernels
                    .flat_map(|k| {
                        let s: f32 = k.iter().sum();
                        let mut k = k.to_vec();
                        k[4] -= s;
                        k
                    })
                    .collect(),
                3,
                1,
            ),
            Pdc::Angular => {
                const CLOCKWISE: [usize; 9] = [3, 0, 1, 6, 4, 2, 7, 8, 5];
                (kernels.flat_map(|k| (0..9).map(|i| k[i] - k[CLOCKWISE[i]]).collect::<Vec<_>>()).collect(), 3, 1)
            }
            Pdc::Radial => {
                const OUTER: [usize; 8] = [0, 2, 4, 10, 14, 20, 22, 24];
                const INNER: [usize; 8] = [6, 7, 8, 11, 13, 16, 17, 18];
                (
                    kernels
                        .flat_map(|k| {
                            let mut b = [0f32; 25];
                            for j in 0..8 {
                                b[OUTER[j]] = k[j + 1];
                                b[INNER[j]] = -k[j + 1];
                            }
                            b
                        })
                        .collect(),
                    5,
                    2,
                )
            }
        };
        Ok((Tensor::from_vec(data, (dims[0], dims[1], size, size), &Device::Cpu)?, padding))
    }
}

/// `PDCBlock`: (max pool + 1×1 shortcut when it downsamples), depthwise pixel-difference conv, ReLU, 1×1.
struct Block {
    depthwise: Conv,
    pointwise: Conv,
    shortcut: Option<Conv>,
}

impl Block {
    fn load(sd: &StateDict, name: &str, pdc: Pdc) -> Result<Self> {
        let w = sd.get_rank(&format!("{name}.conv1.weight"), 4)?;
        let (kernel, padding) = pdc.convert(sd, &format!("{name}.conv1.weight"), &w)?;
        let channels = kernel.dim(0)?;
        let depthwise = Conv::new(sd, &format!("{name}.conv1"), kernel, 1, padding)?.with_groups(channels);
        let pointwise = Conv::load(sd, &format!("{name}.conv2"), 1, 0)?;
        let shortcut = if sd.has(&format!("{name}.shortcut.weight")) {
            Some(Conv::load(sd, &format!("{name}.shortcut"), 1, 0)?)
        } else {
            None
        };
        Ok(Self { depthwise, pointwise, shortcut })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.shortcut.is_some() { nn::max_pool2(x)? } else { x.clone() };
        let y = self.pointwise.forward(&nn::relu(&self.depthwise.forward(&x)?)?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(&x)?,
            None => x,
        };
        Ok((y + skip)?)
    }
}

/// `CDCM`: ReLU, 1×1, then the sum of four dilated 3×3 convolutions.
struct Cdcm {
    conv1: Conv,
    dilated: Vec<Conv>,
}

impl Cdcm {
    fn load(sd: &StateDict, name: &str) -> Result<Self> {
        let conv1 = Conv::load(sd, &format!("{name}.conv1"), 1, 0)?;
        let dilated = CDCM_DILATIONS
            .iter()
            .enumerate()
            .map(|(i, &d)| Ok(Conv::load(sd, &format!("{name}.conv2_{}", i + 1), 1, d)?.with_dilation(d)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { conv1, dilated })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(&nn::relu(x)?)?;
        let mut sum = self.dilated[0].forward(&x)?;
        for conv in &self.dilated[1..] {
            sum = (sum + conv.forward(&x)?)?;
        }
        Ok(sum)
    }
}

/// `CSAM`: a one-channel attention map (ReLU, 1×1 to 4, 3×3 to 1, sigmoid) multiplied onto the input.
struct Csam {
    conv1: Conv,
    conv2: Conv,
}

impl Csam {
    fn load(sd: &StateDict, name: &str) -> Result<Self> {
        Ok(Self {
            conv1: Conv::load(sd, &format!("{name}.conv1"), 1, 0)?,
            conv2: Conv::load(sd, &format!("{name}.conv2"), 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = nn::sigmoid(&self.conv2.forward(&self.conv1.forward(&nn::relu(x)?)?)?)?;
        Ok(x.broadcast_mul(&y)?)
    }
}

/// The PiDiNet of `table5_pidinet.pth` (widths, and whether it has the CDCM and CSAM side modules, read from the
/// file).
pub struct PidiNet {
    init_block: Conv,
    blocks: Vec<Block>,
    dilations: Option<Vec<Cdcm>>,
    attentions: Option<Vec<Csam>>,
    conv_reduces: Vec<Conv>,
    classifier: Conv,
}

impl PidiNet {
    pub fn load(sd: &StateDict) -> Result<Self> {
        let w = sd.get_rank("init_block.weight", 4)?;
        let (kernel, padding) = Pdc::of_layer(0).convert(sd, "init_block.weight", &w)?;
        let init_block = Conv::new(sd, "init_block", kernel, 1, padding)?;
        let blocks = BLOCKS
            .iter()
            .enumerate()
            .map(|(i, name)| Block::load(sd, name, Pdc::of_layer(i + 1)))
            .collect::<Result<Vec<_>>>()?;
        let side = |prefix: &str| sd.has(&format!("{prefix}.0.conv1.weight"));
        let dilations = if side("dilations") {
            Some((0..4).map(|i| Cdcm::load(sd, &format!("dilations.{i}"))).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        let attentions = if side("attentions") {
            Some((0..4).map(|i| Csam::load(sd, &format!("attentions.{i}"))).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        let conv_reduces =
            (0..4).map(|i| Conv::load(sd, &format!("conv_reduces.{i}.conv"), 1, 0)).collect::<Result<Vec<_>>>()?;
        let classifier = Conv::load(sd, "classifier", 1, 0)?;
        Ok(Self { init_block, blocks, dilations, attentions, conv_reduces, classifier })
    }

    /// The fused edge probability (1, 1, H, W) of `x` (1, 3, H, W; BGR in 0…1): the last of upstream's outputs.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        // 1. backbone, keeping each stage's output
        let mut y = self.init_block.forward(x)?;
        let mut stages = Vec::with_capacity(4);
        for (block, name) in self.blocks.iter().zip(BLOCKS) {
            y = block.forward(&y)?;
            if STAGE_ENDS.contains(&name) {
                stages.push(y.clone());
            }
        }
        // 2. side outputs, each reduced to one channel and upsampled to the input
        let mut sides = Vec::with_capacity(4);
        for (i, s) in stages.iter().enumerate() {
            let mut f = s.clone();
            if let Some(d) = &self.dilations {
                f = d[i].forward(&f)?;
            }
            if let Some(a) = &self.attentions {
                f = a[i].forward(&f)?;
            }
            sides.push(nn::interpolate_bilinear(&self.conv_reduces[i].forward(&f)?, h, w)?);
        }
        // 3. fuse
        nn::sigmoid(&self.classifier.forward(&Tensor::cat(&sides, 1)?)?)
    }
}

/// `PidiNetDetector.__call__` with `safe`, `scribble` and `apply_filter` (edges thresholded at 0.5).
pub struct Pidi {
    pub net: PidiNet,
    pub safe: bool,
    pub scribble: bool,
    pub apply_filter: bool,
}

impl Detector for Pidi {
    fn name(&self) -> &str {
        "pidinet"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let edge = nn::first_plane(&self.net.forward(&nn::image_tensor(image, 1.0 / 255.0, 0.0, true)?)?)?;
        let data = edge
            .into_iter()
            .map(|e| {
                let e = if self.apply_filter { f32::from(e > 0.5) } else { e };
                let e = if self.safe { post::safe_step(e) } else { e };
                post::to_u8(e as f64)
            })
            .flat_map(|v| [v, v, v])
            .collect();
        Ok(RgbImage::from_raw(image.width(), image.height(), data).expect("three samples per pixel"))
    }

    fn finish(&self, map: RgbImage) -> Result<RgbImage> {
        Ok(if self.scribble { post::scribble(&map) } else { map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::test_support::{
        assert_net_close, assert_upstream_map, cases, load_net_input, net_outputs, weights,
    };

    fn net() -> PidiNet {
        PidiNet::load(&StateDict::open(&weights("table5_pidinet.pth")).unwrap()).unwrap()
    }

    #[test]
    fn net_matches_controlnet_aux() {
        let net = net();
        for c in cases("pidinet").iter().filter(|c| c.net.is_some()) {
            let x = nn::image_tensor(&load_net_input(c), 1.0 / 255.0, 0.0, true).unwrap();
            assert_net_close(&net.forward(&x).unwrap(), &net_outputs(c)["edge"], &c.output);
        }
    }

    #[test]
    fn maps_match_controlnet_aux() {
        let net = net();
        let mut d = Pidi { net, safe: false, scribble: false, apply_filter: false };
        for c in cases("pidinet") {
            (d.safe, d.scribble, d.apply_filter) = (c.flag("safe"), c.flag("scribble"), c.flag("apply_filter"));
            assert_upstream_map(&d, &c);
        }
    }
}
