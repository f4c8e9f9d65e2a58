//! Invert: `255 - image` (A1111's "invert (from white bg & black line)"), for line drawings made on paper.
use image::RgbImage;

use super::{Detector, Preprocess};

pub struct Invert;

impl Detector for Invert {
    fn name(&self) -> &str {
        "invert"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::AsIs
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        let mut out = image.clone();
        out.iter_mut().for_each(|v| *v = 255 - *v);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn matches_numpy_255_minus() {
        for c in cases("invert") {
            let ours = Invert.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.0, 0, 1.0, &c.output);
        }
    }
}
