//! Binary (black/white) map: ControlNet 1.1's `annotator/binary` as A1111 ships it.
//!
//! Grey (`cv2.COLOR_RGB2GRAY`), then `THRESH_BINARY_INV`: pixels darker than or equal to the threshold turn
//! white, the rest black, so dark strokes on paper become white lines on black. A threshold of 0 (or 255)
//! asks for Otsu's automatic threshold.
use image::RgbImage;

use super::cv::{self, Mat};
use super::{Detector, Preprocess};

/// A1111's slider default: 0, i.e. Otsu.
pub const DEFAULT_THRESHOLD: f64 = 0.0;

pub struct Binary {
    pub threshold: f64,
}

impl Detector for Binary {
    fn name(&self) -> &str {
        "binary"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        Ok(binary(&Mat::from_rgb(image), self.threshold).to_rgb())
    }
}

/// The binary map of an RGB image (one channel: 0 or 255).
pub fn binary(img: &Mat<u8>, threshold: f64) -> Mat<u8> {
    let grey = cv::rgb_to_gray(img);
    // OpenCV floors the threshold of 8-bit images
    let t = if threshold == 0.0 || threshold == 255.0 { cv::otsu_threshold(&grey) as f64 } else { threshold.floor() };
    grey.map(|v| if v as f64 > t { 0 } else { 255 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_cv2_threshold_binary_inv() {
        // exact: integer grey conversion, OpenCV's Otsu scan
        for c in cases("binary") {
            let ours = Binary { threshold: c.f64("threshold") }.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.0, 0, 1.0, &c.output);
        }
    }

    #[test]
    fn grey_matches_cv2_cvtcolor() {
        for c in cases("cv_gray") {
            let ours = cv::rgb_to_gray(&Mat::from_rgb(&load(&c.input))).to_rgb();
            assert_close(&ours, &load(&c.output), 0.0, 0, 1.0, &c.output);
        }
    }
}
