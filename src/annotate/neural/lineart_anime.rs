//! Anime line art: a pix2pix U-Net generator (controlnet_aux `lineart_anime/`, weights `netG.pth`), the net
//! behind control_v11p_sd15s2_lineart_anime.
//!
//! Eight 4×4 stride-2 downsamplings and transposed upsamplings with skip connections, instance norms without
//! parameters, LeakyReLU(0.2) going down and ReLU going up, tanh at the end. The depth and widths are read from
//! the file. The input is RGB in -1…1 resized (cubic) to multiples of 256; the output is resized back.
//!
//! pix2pix's in-place LeakyReLU also rewrites the block's input, so each skip connection carries
//! `leaky_relu(x)`, not `x`; reproduced here.
use candle_core::Tensor;
use image::RgbImage;

use super::lineart::invert;
use super::nn::{self, Conv, ConvTranspose};
use super::weights::StateDict;
use crate::annotate::cv::{self, Interpolation, Mat};
use crate::annotate::{Detector, Preprocess};
use crate::Result;

/// One `UnetSkipConnectionBlock`: down, the inner block (none for the innermost), up.
struct UnetBlock {
    down: Conv,
    inner: Option<Box<UnetBlock>>,
    up: ConvTranspose,
}

impl UnetBlock {
    /// The block under `prefix` (`model` for the outermost; its submodule is `{prefix}.model.{1 or 3}`).
    fn load(sd: &StateDict, prefix: &str, outermost: bool) -> Result<Self> {
        let m = |i: usize| format!("{prefix}.model.{i}");
        let (down, inner, up) = if outermost {
            (0, Some(1), 3)
        } else if sd.has(&format!("{}.weight", m(5))) {
            (1, Some(3), 5)
        } else {
            (1, None, 3)
        };
        let inner = match inner {
            Some(i) => Some(Box::new(Self::load(sd, &m(i), false)?)),
            None => None,
        };
        Ok(Self { down: Conv::load(sd, &m(down), 2, 1)?, inner, up: ConvTranspose::load(sd, &m(up), 2, 1, 0)? })
    }

    /// A non-outermost block: `cat(leaky(x), up(relu(inner(norm(down(leaky(x)))))))`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = nn::leaky_relu(x, 0.2)?;
        let mut y = self.down.forward(&x)?;
        if let Some(inner) = &self.inner {
            y = inner.forward(&nn::instance_norm(&y)?)?;
        }
        let y = nn::instance_norm(&self.up.forward(&nn::relu(&y)?)?)?;
        Ok(Tensor::cat(&[&x, &y], 1)?)
    }
}

/// `UnetGenerator(3, 1, num_downs, ngf)` with instance norms.
pub struct AnimeNet {
    outer: UnetBlock,
}

impl AnimeNet {
    pub fn load(sd: &StateDict) -> Result<Self> {
        if !sd.has("model.model.0.weight") {
            return Err(sd.error("no tensor model.model.0.weight: not anime lineart (netG) weights?"));
        }
        Ok(Self { outer: UnetBlock::load(sd, "model", true)? })
    }

    /// The raw output (1, 1, H, W; tanh, -1…1) of `x` (1, 3, H, W; RGB in -1…1, sides multiples of 256).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = &self.outer;
        let mut y = o.down.forward(x)?;
        if let Some(inner) = &o.inner {
            y = inner.forward(&y)?;
        }
        Ok(o.up.forward(&nn::relu(&y)?)?.tanh()?)
    }
}

/// `LineartAnimeDetector.__call__`.
pub struct LineartAnime {
    pub net: AnimeNet,
}

impl Detector for LineartAnime {
    fn name(&self) -> &str {
        "lineart-anime"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        // 1. the net sees the image resized (cubic) to multiples of 256
        let (wn, hn) = (w.div_ceil(256) * 256, h.div_ceil(256) * 256);
        let feed = cv::resize_u8(&Mat::from_rgb(image), wn, hn, Interpolation::Cubic).to_rgb();
        // 2. net, back to 0…255
        let line = self.net.forward(&nn::image_tensor(&feed, 1.0 / 127.5, 127.5, false)?)?;
        let line = nn::first_plane(&line)?;
        let line =
            Mat { width: wn, height: hn, channels: 1, data: line.iter().map(|&v| v as f64 * 127.5 + 127.5).collect() };
        // 3. back to the input size (cubic, float), clipped and truncated
        let back = cv::resize_f64(&line, w, h, Interpolation::Cubic);
        let data = back.data.iter().map(|&v| v.clamp(0.0, 255.0) as u8).flat_map(|v| [v, v, v]).collect();
        Ok(RgbImage::from_raw(w as u32, h as u32, data).expect("three samples per pixel"))
    }

    /// Inverted after the resize, as upstream: white lines on black.
    fn finish(&self, map: RgbImage) -> Result<RgbImage> {
        Ok(invert(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::test_support::{
        assert_net_close, assert_upstream_map, cases, load_net_input, net_outputs, variant, weights,
    };

    #[test]
    fn net_matches_controlnet_aux() {
        // the 'module.'-prefixed copy of netG.pth loads to the same net
        for path in [weights("netG.pth"), variant("lineart_anime_prefixed", "netG.pth")] {
            let net = AnimeNet::load(&StateDict::open(&path).unwrap()).unwrap();
            for c in cases("lineart_anime").iter().filter(|c| c.net.is_some()) {
                let x = nn::image_tensor(&load_net_input(c), 1.0 / 127.5, 127.5, false).unwrap();
                assert_net_close(&net.forward(&x).unwrap(), &net_outputs(c)["line"], &c.output);
            }
        }
    }

    #[test]
    fn maps_match_controlnet_aux() {
        let d = LineartAnime { net: AnimeNet::load(&StateDict::open(&weights("netG.pth")).unwrap()).unwrap() };
        for c in cases("lineart_anime") {
            assert_upstream_map(&d, &c);
        }
    }
}
