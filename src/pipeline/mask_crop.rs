//! Inpainting "only the masked area" (diffusers' `padding_mask_crop`, A1111's "Inpaint area: Only masked"):
//! the mask's bounding box grown by a padding and widened to the output's aspect ratio is cut out of the picture,
//! the mask and the conditions, processed at the output size, and the result pasted back over the untouched
//! original through the mask. Both front ends compute the region the same way (diffusers copied A1111's
//! `get_crop_region` + `expand_crop_region`).
use image::RgbImage;

use super::inpaint::luma;
use crate::io::images;
use crate::{Error, Result};

/// A region of the picture: `x0..x1` × `y0..y1` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRegion {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl CropRegion {
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }

    /// The region cut out of `img` and resized to `width`×`height` with diffusers' "fill" (aspect kept, edges
    /// stretched into the bars).
    pub fn cut(&self, img: &RgbImage, (width, height): (u32, u32)) -> RgbImage {
        let part = image::imageops::crop_imm(img, self.x0, self.y0, self.width(), self.height()).to_image();
        images::resize_and_fill(&part, width, height)
    }
}

/// `VaeImageProcessor.get_crop_region(mask, width, height, pad)`: the box around every non-black mask pixel,
/// grown by `pad` (clamped to the picture), then grown along one axis to the aspect ratio of `width`×`height`,
/// shifted back inside the picture and clamped. An all-black mask has no region: an error naming
/// `padding_mask_crop`.
pub fn crop_region(mask: &RgbImage, (width, height): (usize, usize), pad: u32) -> Result<CropRegion> {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    // 1. The bounding box of the pixels whose grey (PIL's convert("L")) is not 0.
    let (mut left, mut top, mut right, mut bottom) = (w, h, -1i64, -1i64);
    for (x, y, p) in mask.enumerate_pixels() {
        if luma(p) != 0 {
            let (x, y) = (i64::from(x), i64::from(y));
            (left, top, right, bottom) = (left.min(x), top.min(y), right.max(x), bottom.max(y));
        }
    }
    if right < 0 {
        return Err(Error::setting("padding_mask_crop", "the mask is all black: there is no masked area to crop to"));
    }
    // 2. The padding, clamped to the picture.
    let pad = i64::from(pad);
    let (mut x1, mut y1, mut x2, mut y2) =
        ((left - pad).max(0), (top - pad).max(0), (right + 1 + pad).min(w), (bottom + 1 + pad).min(h));
    // 3. Grown to the processing aspect ratio (integer steps as diffusers: `int(desired - current)`, half on
    //    each side, the odd pixel after), moved back inside the picture.
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio = width as f64 / height as f64;
    if ratio_crop > ratio {
        let diff = ((x2 - x1) as f64 / ratio - (y2 - y1) as f64) as i64;
        (y1, y2) = grow_inside(y1, y2, diff, h);
    } else {
        let diff = ((y2 - y1) as f64 * ratio - (x2 - x1) as f64) as i64;
        (x1, x2) = grow_inside(x1, x2, diff, w);
    }
    Ok(CropRegion { x0: x1 as u32, y0: y1 as u32, x1: x2 as u32, y1: y2 as u32 })
}

/// `[lo, hi)` grown by `diff` (half before, the odd pixel after), then moved back inside `[0, limit)` and clamped.
fn grow_inside(lo: i64, hi: i64, diff: i64, limit: i64) -> (i64, i64) {
    let (mut lo, mut hi) = (lo - diff.div_euclid(2), hi + diff - diff.div_euclid(2));
    if hi >= limit {
        lo -= hi - limit;
        hi = limit;
    }
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    (lo, hi.min(limit))
}

/// `VaeImageProcessor.apply_overlay(mask, original, generated, region)`: the generated picture resized to cover
/// the region (diffusers' "crop"), placed there on black, and the original laid over it with the inverted mask
/// as alpha, in PIL's 8-bit arithmetic (premultiplied paste, un-premultiply, `alpha_composite`): unmasked pixels
/// are the original's exactly, a soft (blurred) mask blends.
pub fn apply_overlay(mask: &RgbImage, original: &RgbImage, generated: &RgbImage, region: CropRegion) -> RgbImage {
    let mut base = RgbImage::new(original.width(), original.height());
    let fitted = images::resize_and_crop(generated, region.width(), region.height());
    images::paste(&mut base, &fitted, i64::from(region.x0), i64::from(region.y0));
    RgbImage::from_fn(original.width(), original.height(), |x, y| {
        let keep = 255 - u32::from(luma(mask.get_pixel(x, y)));
        let under = base.get_pixel(x, y).0;
        if keep == 0 {
            return image::Rgb(under);
        }
        let over = original.get_pixel(x, y).0;
        image::Rgb(std::array::from_fn(|c| {
            // Paste through the mask onto transparent black (RGBa, premultiplied), then convert to RGBA.
            let premultiplied = div255(u32::from(over[c]) * keep);
            let straight = if keep == 255 { premultiplied } else { (255 * premultiplied / keep).min(255) };
            composite(straight, keep, u32::from(under[c]))
        }))
    })
}

/// PIL's rounded `x / 255` for `x` ≤ 255²: `(x + 128 + ((x + 128) >> 8)) >> 8`.
fn div255(x: u32) -> u32 {
    let t = x + 128;
    (t + (t >> 8)) >> 8
}

/// PIL's `alpha_composite` of a source value with alpha `alpha` over an opaque destination value.
fn composite(src: u32, alpha: u32, dst: u32) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let blend = 255 * (255 - alpha);
    let out_a255 = alpha * 255 + blend;
    let coef1 = alpha * 255 * 255 * (1 << PRECISION_BITS) / out_a255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let t = src * coef1 + dst * coef2 + (0x80 << PRECISION_BITS);
    (((t >> 8) + t) >> 8 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_with(w: u32, h: u32, white: (u32, u32, u32, u32)) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let inside = (white.0..white.2).contains(&x) && (white.1..white.3).contains(&y);
            image::Rgb([if inside { 255 } else { 0 }; 3])
        })
    }

    /// diffusers 0.42 `VaeImageProcessor.get_crop_region` on the same masks.
    #[test]
    fn crop_regions_are_diffusers() {
        let region = |m: &RgbImage, size, pad| {
            let r = crop_region(m, size, pad).unwrap();
            (r.x0, r.y0, r.x1, r.y1)
        };
        let m = mask_with(128, 128, (90, 10, 110, 40));
        assert_eq!(region(&m, (128, 128), 8), (77, 2, 123, 48));
        assert_eq!(region(&m, (128, 96), 0), (80, 10, 120, 40));
        assert_eq!(region(&m, (64, 128), 30), (60, 0, 128, 128));
        let m = mask_with(130, 97, (0, 50, 130, 60));
        assert_eq!(region(&m, (128, 96), 4), (0, 0, 130, 97));
        let err = crop_region(&mask_with(8, 8, (0, 0, 0, 0)), (8, 8), 2).unwrap_err().to_string();
        assert!(err.starts_with("padding_mask_crop: the mask is all black"), "{err}");
    }

    /// diffusers 0.42 `apply_overlay(mask, original, generated, (1, 1, 5, 6))` with a 7×6 original and a 4×4
    /// generated picture of numpy's `default_rng(0).integers(0, 256)` and a grey ramp `(40 x + 13 y) % 256` as
    /// the mask, checksummed as Σ (i + 1) · byte_i.
    #[test]
    fn overlay_is_diffusers() {
        let original: Vec<u8> = vec![
            95, 130, 194, 217, 207, 235, 15, 163, 33, 215, 217, 130, 248, 189, 16, 69, 184, 232, 205, 78, 169, 61, 125,
            10, 29, 240, 66, 19, 182, 39, 59, 4, 59, 81, 222, 44, 120, 122, 50, 208, 78, 28, 64, 166, 121, 89, 170,
            233, 127, 178, 237, 128, 113, 123, 76, 155, 69, 154, 130, 248, 95, 73, 192, 186, 191, 127, 220, 161, 231,
            1, 43, 139, 237, 191, 86, 143, 7, 232, 96, 239, 76, 55, 0, 71, 77, 199, 219, 208, 176, 144, 190, 171, 104,
            120, 179, 0, 240, 245, 230, 100, 191, 216, 126, 219, 31, 149, 231, 141, 115, 16, 153, 8, 121, 211, 207,
            195, 7, 179, 202, 186, 166, 39, 185, 216, 73, 196,
        ];
        let generated: Vec<u8> = vec![
            14, 127, 219, 22, 58, 75, 249, 220, 46, 121, 168, 5, 217, 51, 157, 138, 56, 18, 149, 20, 32, 235, 185, 76,
            241, 214, 38, 123, 207, 58, 53, 108, 12, 163, 58, 103, 61, 245, 63, 7, 104, 202, 94, 1, 96, 7, 209, 31,
        ];
        let original = RgbImage::from_raw(7, 6, original).unwrap();
        let generated = RgbImage::from_raw(4, 4, generated).unwrap();
        let mask = RgbImage::from_fn(7, 6, |x, y| image::Rgb([((x * 40 + y * 13) % 256) as u8; 3]));
        let region = CropRegion { x0: 1, y0: 1, x1: 5, y1: 6 };
        let out = apply_overlay(&mask, &original, &generated, region);
        let sum: u64 = out.as_raw().iter().enumerate().map(|(i, &v)| (i as u64 + 1) * u64::from(v)).sum();
        assert_eq!(sum, 790026);
    }
}
