//! Standard lineart (controlnet_aux `LineartStandardDetector`, A1111 `lineart_standard`): a difference of
//! Gaussians. Where a pixel is darker than its σ=6 neighbourhood in every channel, that darkness is a line;
//! it is scaled so the median line strength maps to grey 127.
use image::RgbImage;

use super::cv::{self, Mat};
use super::{Detector, Preprocess};

/// Blur of the "surroundings" the pixel is compared with.
const SIGMA: f64 = 6.0;
/// Darkness (grey levels) above which a pixel counts when taking the median line strength.
const INTENSITY_THRESHOLD: f32 = 8.0;
/// The median is never taken below this, so faint images are not amplified into noise.
const MIN_MEDIAN: f32 = 16.0;
/// Grey level the median line strength is mapped to.
const MEDIAN_GREY: f32 = 127.0;

pub struct LineartStandard;

impl Detector for LineartStandard {
    fn name(&self) -> &str {
        "lineart-standard"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        Ok(lineart_standard(&Mat::from_rgb(image)).to_rgb())
    }
}

/// The one-channel lineart map of an RGB image.
pub fn lineart_standard(img: &Mat<u8>) -> Mat<u8> {
    let x = img.map(|v| v as f32);
    let g = cv::gaussian_blur_f32(&x, SIGMA);
    // 1. darkness relative to the surroundings, the weakest over the channels
    let c = img.channels;
    let intensity: Vec<f32> = g
        .data
        .chunks_exact(c)
        .zip(x.data.chunks_exact(c))
        .map(|(gp, xp)| {
            let m = gp.iter().zip(xp).map(|(a, b)| a - b).fold(f32::INFINITY, f32::min);
            m.clamp(0.0, 255.0)
        })
        .collect();
    // 2. normalise by the median strength of the clear lines (numpy's median: mean of the middle two)
    let mut lines: Vec<f32> = intensity.iter().copied().filter(|&v| v > INTENSITY_THRESHOLD).collect();
    let median = if lines.is_empty() {
        // np.median of nothing is nan, and Python's max(16, nan) is 16
        MIN_MEDIAN
    } else {
        lines.sort_by(f32::total_cmp);
        let n = lines.len();
        let m = if n % 2 == 1 { lines[n / 2] } else { (lines[n / 2 - 1] + lines[n / 2]) / 2.0 };
        m.max(MIN_MEDIAN)
    };
    // 3. to grey, truncated like numpy's astype(uint8)
    Mat {
        width: img.width,
        height: img.height,
        channels: 1,
        data: intensity.iter().map(|&v| ((v / median) * MEDIAN_GREY).clamp(0.0, 255.0) as u8).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_lineart_standard() {
        // metric: mean |diff| <= 0.05 grey levels and >= 99.5% of samples within 1 (float blur summed in
        // another order than OpenCV's SIMD; numpy truncation turns 1e-5 differences into rare 1-level steps)
        for c in cases("lineart") {
            let ours = LineartStandard.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.05, 1, 0.995, &c.output);
        }
    }
}
