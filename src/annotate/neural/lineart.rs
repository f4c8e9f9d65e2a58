//! Line art from photos: the "informative drawings" generator (Chan et al. 2022; controlnet_aux `lineart/`,
//! weights `sk_model.pth`, the coarse `sk_model2.pth`), the net behind control_v11p_sd15_lineart.
//!
//! A ResNet generator: 7×7 stem, two stride-2 downsamplings, residual blocks, two transposed-convolution
//! upsamplings, a 7×7 head and a sigmoid; instance norms throughout, reflection padding. Widths and the
//! number of residual blocks (3 upstream) are read from the file. The input is RGB in 0…1; the map is the
//! inverted output (black lines on white become white on black).
use candle_core::Tensor;
use image::RgbImage;

use super::nn::{self, Conv, ConvTranspose};
use super::post;
use super::weights::StateDict;
use crate::annotate::{Detector, Preprocess};
use crate::Result;

/// `Generator(3, 1, n_residual_blocks)` of controlnet_aux's lineart.
pub struct LineartNet {
    stem: Conv,
    down: [Conv; 2],
    /// Each residual block's two 3×3 convolutions (`conv_block.1`, `conv_block.5`).
    residual: Vec<[Conv; 2]>,
    up: [ConvTranspose; 2],
    head: Conv,
}

impl LineartNet {
    pub fn load(sd: &StateDict) -> Result<Self> {
        let blocks = sd.count("model2.", ".conv_block.1.weight");
        if blocks == 0 {
            return Err(sd.error("no tensor model2.0.conv_block.1.weight: not lineart (sk_model) weights?"));
        }
        let residual = (0..blocks)
            .map(|i| {
                Ok([
                    Conv::load(sd, &format!("model2.{i}.conv_block.1"), 1, 0)?,
                    Conv::load(sd, &format!("model2.{i}.conv_block.5"), 1, 0)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: Conv::load(sd, "model0.1", 1, 0)?,
            down: [Conv::load(sd, "model1.0", 2, 1)?, Conv::load(sd, "model1.3", 2, 1)?],
            residual,
            up: [ConvTranspose::load(sd, "model3.0", 2, 1, 1)?, ConvTranspose::load(sd, "model3.3", 2, 1, 1)?],
            head: Conv::load(sd, "model4.1", 1, 0)?,
        })
    }

    /// The line probability (1, 1, H, W) of `x` (1, 3, H, W; RGB in 0…1, sides multiples of 4).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let norm_relu = |y: Tensor| nn::relu(&nn::instance_norm(&y)?);
        // 1. stem
        let mut y = norm_relu(self.stem.forward(&nn::reflection_pad(x, 3)?)?)?;
        // 2. down
        for conv in &self.down {
            y = norm_relu(conv.forward(&y)?)?;
        }
        // 3. residual blocks
        for [a, b] in &self.residual {
            let r = norm_relu(a.forward(&nn::reflection_pad(&y, 1)?)?)?;
            let r = nn::instance_norm(&b.forward(&nn::reflection_pad(&r, 1)?)?)?;
            y = (y + r)?;
        }
        // 4. up
        for conv in &self.up {
            y = norm_relu(conv.forward(&y)?)?;
        }
        // 5. head
        nn::sigmoid(&self.head.forward(&nn::reflection_pad(&y, 3)?)?)
    }
}

/// `LineartDetector.__call__` (the net chosen by `coarse` is the one loaded).
pub struct Lineart {
    pub net: LineartNet,
}

impl Detector for Lineart {
    fn name(&self) -> &str {
        "lineart"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let line = nn::first_plane(&self.net.forward(&nn::image_tensor(image, 1.0 / 255.0, 0.0, false)?)?)?;
        let data = line.into_iter().map(|v| post::to_u8(v as f64)).flat_map(|v| [v, v, v]).collect();
        Ok(RgbImage::from_raw(image.width(), image.height(), data).expect("three samples per pixel"))
    }

    /// Inverted after the resize, as upstream: white lines on black.
    fn finish(&self, map: RgbImage) -> Result<RgbImage> {
        Ok(invert(map))
    }
}

/// `255 - map`.
pub fn invert(mut map: RgbImage) -> RgbImage {
    map.iter_mut().for_each(|v| *v = 255 - *v);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::test_support::{
        assert_net_close, assert_upstream_map, cases, load_net_input, net_outputs, variant, weights,
    };

    fn load(path: &std::path::Path) -> Lineart {
        Lineart { net: LineartNet::load(&StateDict::open(path).unwrap()).unwrap() }
    }

    #[test]
    fn net_matches_controlnet_aux() {
        // the fp16 copy of sk_model.pth holds the same (fp16-exact) weights
        for path in [weights("sk_model.pth"), variant("lineart_fp16", "sk_model.pth")] {
            let d = load(&path);
            for c in cases("lineart").iter().filter(|c| c.net.is_some()) {
                let x = nn::image_tensor(&load_net_input(c), 1.0 / 255.0, 0.0, false).unwrap();
                assert_net_close(&d.net.forward(&x).unwrap(), &net_outputs(c)["line"], &c.output);
            }
        }
    }

    #[test]
    fn maps_match_controlnet_aux() {
        let (fine, coarse) = (load(&weights("sk_model.pth")), load(&weights("sk_model2.pth")));
        for c in cases("lineart") {
            assert_upstream_map(if c.flag("coarse") { &coarse } else { &fine }, &c);
        }
    }
}
