//! Normal map from a depth image, the way ControlNet 1.0's MiDaS annotator makes its normal condition:
//! Sobel gradients of the depth as the x/y slopes, a constant z = 2π, flat (0, 0, 1) where the normalised
//! depth is below a background threshold, unit-normalised, mapped to `n * 127.5 + 127.5`, written as
//! (z, y, x) in RGB (the reference reverses the channel order).
//!
//! The reference takes MiDaS's raw (unnormalised) depth; here the depth image's grey levels (0..255) stand
//! in for it, so slopes are on that scale. `normal-midas` (`neural::midas`) gives it the net's raw depth.
use image::RgbImage;

use super::cv::{self, Mat};
use super::{Detector, Preprocess};

/// A1111's `midas_normal` "Normal Background Threshold" default.
pub const DEFAULT_BG_THRESHOLD: f64 = 0.4;
/// The z component before normalisation (`a = np.pi * 2.0` in the reference).
pub const DEFAULT_Z: f64 = std::f64::consts::TAU;

pub struct NormalFromDepth {
    pub bg_threshold: f64,
    pub z: f64,
}

impl Detector for NormalFromDepth {
    fn name(&self) -> &str {
        "normal"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        let depth = cv::rgb_to_gray(&Mat::from_rgb(image));
        Ok(normal_from_depth(&depth, self.z, self.bg_threshold).to_rgb())
    }
}

/// The RGB normal map of a one-channel depth image (near = bright).
pub fn normal_from_depth(depth: &Mat<u8>, z: f64, bg_threshold: f64) -> Mat<u8> {
    normal_from_depth_f32(&depth.map(|v| v as f32), z, bg_threshold)
}

/// The RGB normal map of a float depth (near = large): MiDaS's raw depth, or grey levels.
pub fn normal_from_depth_f32(d: &Mat<f32>, z: f64, bg_threshold: f64) -> Mat<u8> {
    // 1. slopes
    let gx = cv::sobel3_f32(d, true);
    let gy = cv::sobel3_f32(d, false);
    // 2. background: normalised depth below the threshold (a constant depth has no background: the
    //    reference divides 0 by 0 and no NaN compares below)
    let (lo, hi) = d.data.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    let range = hi - lo;
    let z = z as f32;
    let bg = bg_threshold as f32;
    let mut out = Mat::new(d.width, d.height, 3);
    for i in 0..d.data.len() {
        let is_bg = range > 0.0 && (d.data[i] - lo) / range < bg;
        let (x, y) = if is_bg { (0.0, 0.0) } else { (gx.data[i], gy.data[i]) };
        // 3. unit normal in float32, then numpy's astype(uint8) truncation
        let norm = (x * x + y * y + z * z).sqrt();
        let to_u8 = |v: f32| ((v / norm) * 127.5 + 127.5).clamp(0.0, 255.0) as u8;
        out.data[i * 3] = to_u8(z);
        out.data[i * 3 + 1] = to_u8(y);
        out.data[i * 3 + 2] = to_u8(x);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_midas_normal_formula() {
        // metric: mean |diff| <= 0.02, >= 99.9% within 1 level (float32 as the reference; truncation)
        for c in cases("normal") {
            let d = NormalFromDepth { bg_threshold: c.f64("bg_threshold"), z: DEFAULT_Z };
            let ours = d.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.02, 1, 0.999, &c.output);
        }
    }

    #[test]
    fn constant_depth_faces_the_viewer() {
        let flat = Mat { width: 3, height: 2, channels: 1, data: vec![7u8; 6] };
        let n = normal_from_depth(&flat, DEFAULT_Z, 0.4);
        assert!(n.data.chunks_exact(3).all(|p| p == [255, 127, 127]));
    }
}
