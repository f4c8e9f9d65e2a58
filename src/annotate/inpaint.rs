//! Inpaint condition for ControlNet 1.1's inpaint model (diffusers' `make_inpaint_condition`): the image in
//! [0, 1] with masked pixels set to -1, which the model reads as "to be filled".
//!
//! The result is a float map, so it is a tensor `(1, 3, H, W)` rather than an image.
use candle_core::{Device, Tensor};
use image::RgbImage;

use super::resize::fit_to_output;
use super::AnnotateSettings;
use crate::{Error, Result};

/// PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
fn pil_luma(p: &image::Rgb<u8>) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// The condition tensor: `image / 255`, and -1 in all channels where the mask's grey level is above half
/// (`mask / 255 > 0.5`, i.e. grey >= 128).
pub fn condition(image: &RgbImage, mask: &RgbImage) -> Result<Tensor> {
    if image.dimensions() != mask.dimensions() {
        return Err(Error::setting(
            "mask",
            format!(
                "is {}x{} but the image is {}x{}: they must have the same size",
                mask.width(),
                mask.height(),
                image.width(),
                image.height()
            ),
        ));
    }
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, (p, m)) in image.pixels().zip(mask.pixels()).enumerate() {
        let masked = pil_luma(m) as f32 / 255.0 > 0.5;
        for c in 0..3 {
            data[c * w * h + i] = if masked { -1.0 } else { p[c] as f32 / 255.0 };
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
}

/// The condition at the output size of `settings` (width, height, resize mode; no annotator resolution): image
/// and mask fitted the same way (A1111's resize modes), then [`condition`].
pub fn condition_at_size(image: &RgbImage, mask: &RgbImage, settings: &AnnotateSettings) -> Result<Tensor> {
    if image.dimensions() != mask.dimensions() {
        return condition(image, mask); // the size error, before any resizing
    }
    let (w, h) = settings.output_size(image.width(), image.height())?;
    let image = fit_to_output(image, w, h, settings.resize);
    let mask = fit_to_output(mask, w, h, settings.resize);
    condition(&image, &mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{cases, load, DIR};

    #[test]
    fn matches_make_inpaint_condition() {
        // metric: max |diff| <= 1e-6 (the same float32 division)
        for c in cases("inpaint") {
            let ours = condition(&load(&c.input), &load(c.mask.as_ref().unwrap())).unwrap();
            let refs = candle_core::safetensors::load(format!("{DIR}/{}", c.output), &Device::Cpu).unwrap();
            let r = &refs["control"];
            assert_eq!(ours.dims(), r.dims());
            let max = (ours - r).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let max = max.to_scalar::<f32>().unwrap();
            assert!(max <= 1e-6, "{}: max |diff| {max}", c.output);
        }
    }

    #[test]
    fn size_mismatch_names_the_mask() {
        let err = condition(&RgbImage::new(4, 4), &RgbImage::new(4, 5)).err().unwrap().to_string();
        assert!(err.starts_with("mask: is "), "{err}");
    }

    /// At an output size image and mask are fitted alike: the masked area stays where the mask says.
    #[test]
    fn condition_at_size_fits_image_and_mask_alike() {
        let image = RgbImage::from_pixel(4, 2, image::Rgb([255, 0, 0]));
        let mut mask = RgbImage::new(4, 2);
        for y in 0..2 {
            mask.put_pixel(0, y, image::Rgb([255, 255, 255]));
            mask.put_pixel(1, y, image::Rgb([255, 255, 255]));
        }
        let settings = AnnotateSettings { width: Some(8), height: Some(4), ..Default::default() };
        let c = condition_at_size(&image, &mask, &settings).unwrap();
        assert_eq!(c.dims(), &[1, 3, 4, 8]);
        let red: Vec<f32> = c.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(red, [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]);
        let err = condition_at_size(&image, &RgbImage::new(3, 2), &settings).unwrap_err().to_string();
        assert!(err.starts_with("mask: is 3x2"), "{err}");
    }
}
