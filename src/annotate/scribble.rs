//! Scribble from XDoG (A1111's `scribble_xdog`): a difference of two Gaussians (σ 0.5 and 5) thresholded into
//! white strokes on black.
use image::RgbImage;

use super::cv::{self, Mat};
use super::{Detector, Preprocess};

/// A1111's "XDoG Threshold" slider default.
pub const DEFAULT_THRESHOLD: f64 = 32.0;
/// The fine and the coarse blur.
const SIGMA_FINE: f64 = 0.5;
const SIGMA_COARSE: f64 = 5.0;

pub struct ScribbleXdog {
    pub threshold: f64,
}

impl Detector for ScribbleXdog {
    fn name(&self) -> &str {
        "scribble"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        Ok(scribble_xdog(&Mat::from_rgb(image), self.threshold).to_rgb())
    }
}

/// The one-channel scribble map of an RGB image.
pub fn scribble_xdog(img: &Mat<u8>, threshold: f64) -> Mat<u8> {
    let x = img.map(|v| v as f32);
    let g1 = cv::gaussian_blur_f32(&x, SIGMA_FINE);
    let g2 = cv::gaussian_blur_f32(&x, SIGMA_COARSE);
    let c = img.channels;
    let data = g1
        .data
        .chunks_exact(c)
        .zip(g2.data.chunks_exact(c))
        .map(|(p1, p2)| {
            let dmin = p2.iter().zip(p1).map(|(b, a)| b - a).fold(f32::INFINITY, f32::min);
            // dog = (255 - min(g2 - g1)).clip(0, 255).astype(uint8): truncation
            let dog = (255.0 - dmin).clamp(0.0, 255.0) as u8;
            // A1111 computes 2 * (255 - dog) in uint8, which wraps for strong lines (>= 128 levels);
            // kept, since that is the map its users get
            let strength = (255 - dog).wrapping_mul(2);
            if strength as f64 > threshold {
                255
            } else {
                0
            }
        })
        .collect();
    Mat { width: img.width, height: img.height, channels: 1, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_a1111_scribble_xdog() {
        // binary map: metric is the share of differing pixels, <= 0.5% (mean |diff| <= 1.3 levels); float
        // blurs summed in another order flip pixels sitting exactly on the threshold
        for c in cases("scribble") {
            let ours = ScribbleXdog { threshold: c.f64("threshold") }.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 1.3, 0, 0.995, &c.output);
        }
    }
}
