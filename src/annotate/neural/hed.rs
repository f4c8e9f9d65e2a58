//! HED soft edges: lllyasviel's `ControlNetHED_Apache2` (controlnet_aux `hed/__init__.py`, weights
//! `ControlNetHED.pth`), the net behind control_v11p_sd15_softedge and control_sd15_hed.
//!
//! Five VGG-like stages of 3×3 convolutions (2, 2, 3, 3, 3 of them; 64…512 channels upstream, read from the
//! file here), each but the first after a 2×2 max pool, each ending in a 1×1 projection to one channel. The
//! projections are resized to the input, averaged and squashed by a sigmoid. The input is RGB in 0…255 minus
//! a learned per-channel `norm`.
use candle_core::Tensor;
use image::RgbImage;

use super::nn::{self, Conv};
use super::post;
use super::weights::StateDict;
use crate::annotate::{Detector, Preprocess};
use crate::Result;

/// One stage: `convs` (3×3, ReLU after each), then the one-channel `projection`.
struct Stage {
    convs: Vec<Conv>,
    projection: Conv,
}

/// The net: `norm` and five stages (`block1` … `block5`).
pub struct HedNet {
    norm: Tensor,
    stages: Vec<Stage>,
}

impl HedNet {
    pub fn load(sd: &StateDict) -> Result<Self> {
        let norm = sd.get_rank("norm", 4)?;
        let mut stages = Vec::new();
        for b in 1..=5 {
            let count = sd.count(&format!("block{b}.convs."), ".weight");
            if count == 0 {
                return Err(sd.error(format!("no tensor block{b}.convs.0.weight: not ControlNetHED weights?")));
            }
            let convs =
                (0..count).map(|i| Conv::load(sd, &format!("block{b}.convs.{i}"), 1, 1)).collect::<Result<Vec<_>>>()?;
            let projection = Conv::load(sd, &format!("block{b}.projection"), 1, 0)?;
            stages.push(Stage { convs, projection });
        }
        Ok(Self { norm, stages })
    }

    /// The five projections of `x` (1, 3, H, W; RGB 0…255), each at its stage's resolution.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.broadcast_sub(&self.norm)?;
        let mut projections = Vec::with_capacity(self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            if i > 0 {
                h = nn::max_pool2(&h)?;
            }
            for conv in &stage.convs {
                h = nn::relu(&conv.forward(&h)?)?;
            }
            projections.push(stage.projection.forward(&h)?);
        }
        Ok(projections)
    }
}

/// `HEDdetector.__call__` with `safe` (edges quantised by `safe_step`) and `scribble` (thinned to strokes).
pub struct Hed {
    pub net: HedNet,
    pub safe: bool,
    pub scribble: bool,
}

impl Detector for Hed {
    fn name(&self) -> &str {
        "hed"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let projections = self.net.forward(&nn::image_tensor(image, 1.0, 0.0, false)?)?;
        // each projection back to the input size (cv2.resize, linear), averaged, then a float64 sigmoid
        let planes = projections
            .iter()
            .map(|p| {
                let (_, _, ph, pw) = p.dims4()?;
                Ok(nn::resize_bilinear(&nn::first_plane(p)?, pw, ph, w, h))
            })
            .collect::<Result<Vec<_>>>()?;
        let data = nn::mean_planes(&planes)
            .into_iter()
            .map(|m| {
                let edge = 1.0 / (1.0 + (-(m as f64)).exp());
                let v = if self.safe { post::safe_step(edge as f32) as f64 } else { edge };
                post::to_u8(v)
            })
            .flat_map(|v| [v, v, v])
            .collect();
        Ok(RgbImage::from_raw(w as u32, h as u32, data).expect("three samples per pixel"))
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

    fn detector(safe: bool, scribble: bool) -> Hed {
        let sd = StateDict::open(&weights("ControlNetHED.pth")).unwrap();
        Hed { net: HedNet::load(&sd).unwrap(), safe, scribble }
    }

    #[test]
    fn net_matches_controlnet_aux() {
        let d = detector(false, false);
        for c in cases("hed").iter().filter(|c| c.net.is_some()) {
            let x = nn::image_tensor(&load_net_input(c), 1.0, 0.0, false).unwrap();
            let ours = d.net.forward(&x).unwrap();
            let reference = net_outputs(c);
            for (i, p) in ours.iter().enumerate() {
                assert_net_close(
                    p,
                    &reference[&format!("projection{}", i + 1)],
                    &format!("{} projection{}", c.output, i + 1),
                );
            }
        }
    }

    #[test]
    fn maps_match_controlnet_aux() {
        for c in cases("hed") {
            let d = detector(c.flag("safe"), c.flag("scribble"));
            assert_upstream_map(&d, &c);
        }
    }
}
