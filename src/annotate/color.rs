//! Colour palette (ControlNet 1.1's `annotator/color`, the t2i colour adapter's condition): the image shrunk
//! 64× with `INTER_CUBIC`, blown back up with `INTER_NEAREST`, i.e. a grid of flat colour tiles.
use image::RgbImage;

use super::cv::{self, Interpolation, Mat};
use super::{Detector, Preprocess};

/// Side of one colour tile, in pixels.
const TILE: usize = 64;

pub struct Color;

impl Detector for Color {
    fn name(&self) -> &str {
        "color"
    }

    /// The reference resizes the short side with `INTER_AREA` both ways (`cv2_resize_shortest_edge`).
    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizeArea
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        let img = Mat::from_rgb(image);
        // OpenCV would refuse a zero-size grid (images under 64 px); keep one tile instead
        let small = cv::resize_u8(&img, (img.width / TILE).max(1), (img.height / TILE).max(1), Interpolation::Cubic);
        Ok(cv::resize_u8(&small, img.width, img.height, Interpolation::Nearest).to_rgb())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::resize::resize_short_side_area;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_annotator_color() {
        // metric: mean |diff| <= 0.05, >= 99.5% exact (area resize then cubic in fixed point; a one-level
        // difference in a tile repeats over all of its 64x64 pixels)
        for c in cases("color") {
            let img = Mat::from_rgb(&load(&c.input));
            let prepared = resize_short_side_area(&img, c.f64("resolution") as u32).to_rgb();
            let ours = Color.detect(&prepared).unwrap();
            assert_close(&ours, &load(&c.output), 0.05, 0, 0.995, &c.output);
        }
    }
}
