//! Tile resample (A1111's `tile_resample`): the image shrunk by a rate with `INTER_AREA`, for the tile
//! model; rates below 1.1 leave it unchanged.
use image::RgbImage;

use super::cv::{self, Interpolation, Mat};
use super::{Detector, Preprocess};

/// A1111's slider default: no down-sampling.
pub const DEFAULT_RATE: f64 = 1.0;

pub struct TileResample {
    pub rate: f64,
}

impl Detector for TileResample {
    fn name(&self) -> &str {
        "tile"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::AsIs
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        // A1111: "if thr_a < 1.1: return img"
        if self.rate < 1.1 {
            return Ok(image.clone());
        }
        let img = Mat::from_rgb(image);
        // int(w / rate): truncation; at least one pixel
        let w = ((img.width as f64 / self.rate) as usize).max(1);
        let h = ((img.height as f64 / self.rate) as usize).max(1);
        Ok(cv::resize_u8(&img, w, h, Interpolation::Area).to_rgb())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_a1111_tile_resample() {
        // metric: mean |diff| <= 0.01, >= 99.9% exact (area weights in float as OpenCV)
        for c in cases("tile") {
            let ours = TileResample { rate: c.f64("rate") }.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.01, 0, 0.999, &c.output);
        }
    }

    #[test]
    fn resize_matches_cv2() {
        // metrics: nearest, area shrinking: exact; cubic: mean |diff| <= 0.01, >= 99.9% exact (ties);
        // area enlarging (a linear variant): mean |diff| <= 0.2, >= 99.9% within 1 (the reference build's
        // linear path is not OpenCV's generic fixed point, see `cv::resize_u8`)
        for kind in ["cv_resize_cubic", "cv_resize_area", "cv_resize_nearest"] {
            for c in cases(kind) {
                let img = Mat::from_rgb(&load(&c.input));
                let (w, h) = (c.f64("width") as usize, c.f64("height") as usize);
                let (interp, mean, tol, within) = match kind {
                    "cv_resize_cubic" => (Interpolation::Cubic, 0.01, 0, 0.999),
                    "cv_resize_area" if w <= img.width && h <= img.height => (Interpolation::Area, 0.0, 0, 1.0),
                    "cv_resize_area" => (Interpolation::Area, 0.2, 1, 0.999),
                    _ => (Interpolation::Nearest, 0.0, 0, 1.0),
                };
                let ours = cv::resize_u8(&img, w, h, interp);
                assert_close(&ours.to_rgb(), &load(&c.output), mean, tol, within, &c.output);
            }
        }
    }
}
