//! Gaussian blur (A1111's `blur_gaussian`, a condition for the tile model): `cv2.GaussianBlur(img, (0, 0),
//! sigma)` on the 8-bit image, kernel ±3σ, reflect-101 border, OpenCV's bit-exact fixed point.
use image::RgbImage;

use super::cv::{self, Mat};
use super::{Detector, Preprocess};

/// A1111's slider default.
pub const DEFAULT_SIGMA: f64 = 9.0;

pub struct BlurGaussian {
    pub sigma: f64,
}

impl Detector for BlurGaussian {
    fn name(&self) -> &str {
        "blur"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::Resize
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        Ok(cv::gaussian_blur_u8(&Mat::from_rgb(image), self.sigma).to_rgb())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_cv2_gaussian_blur_u8() {
        // metric: mean |diff| <= 0.01 and >= 99.9% exact (OpenCV's 8-bit blur is integer arithmetic; only
        // its softfloat exp() may differ from libm in the last bit)
        for c in cases("blur") {
            let ours = BlurGaussian { sigma: c.f64("sigma") }.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.01, 0, 0.999, &c.output);
        }
    }
}
