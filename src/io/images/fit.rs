//! diffusers' `VaeImageProcessor` resize modes that keep the aspect ratio (`resize_mode="fill"` and `"crop"`),
//! byte for byte as they run on PIL images: a Lanczos resize that fits (or covers) the target, pasted centred on
//! a black canvas; "fill" then stretches the picture's edge into the bars left at the sides.
use image::RgbImage;

use super::resample::{resize, resize_box, ResampleFilter};

/// The filter of diffusers' image processors (`VaeImageProcessor(resample="lanczos")`).
const FILTER: ResampleFilter = ResampleFilter::Lanczos;
/// The bars of "fill" are resized without naming a filter: PIL's default for `resize`.
const BAR_FILTER: ResampleFilter = ResampleFilter::Bicubic;

/// `VaeImageProcessor._resize_and_fill`: `img` resized to fit inside `width`×`height` keeping its aspect ratio,
/// centred; the bars on either side are filled with the picture's nearest edge, stretched (PIL's bicubic resize
/// of an empty box: each bar is the filter's window at the edge, the same on every row or column of the bar).
pub fn resize_and_fill(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = (u64::from(img.width()), u64::from(img.height()));
    let (w, h) = (u64::from(width), u64::from(height));
    // 1. The fitted size, compared as diffusers does: target ratio against source ratio (floats).
    let ratio = width as f64 / height as f64;
    let src_ratio = iw as f64 / ih as f64;
    let src_w = if ratio < src_ratio { w } else { iw * h / ih } as u32;
    let src_h = if ratio >= src_ratio { h } else { ih * w / iw } as u32;
    let resized = resize(img, src_w, src_h, FILTER);
    // 2. Centred on black.
    let mut out = RgbImage::new(width, height);
    let (left, top) = (width as i64 / 2 - src_w as i64 / 2, height as i64 / 2 - src_h as i64 / 2);
    paste(&mut out, &resized, left, top);
    // 3. The bars: the top and bottom edge rows (a wider picture) or the left and right columns (a taller one).
    let (rw, rh) = (resized.width() as f32, resized.height() as f32);
    if ratio < src_ratio {
        let fill = height / 2 - src_h / 2;
        if fill > 0 {
            paste(&mut out, &resize_box(&resized, width, fill, BAR_FILTER, [0.0, 0.0, width as f32, 0.0]), 0, 0);
            let bottom = resize_box(&resized, width, fill, BAR_FILTER, [0.0, rh, width as f32, rh]);
            paste(&mut out, &bottom, 0, i64::from(fill + src_h));
        }
    } else if ratio > src_ratio {
        let fill = width / 2 - src_w / 2;
        if fill > 0 {
            paste(&mut out, &resize_box(&resized, fill, height, BAR_FILTER, [0.0, 0.0, 0.0, height as f32]), 0, 0);
            let right = resize_box(&resized, fill, height, BAR_FILTER, [rw, 0.0, rw, height as f32]);
            paste(&mut out, &right, i64::from(fill + src_w), 0);
        }
    }
    out
}

/// `VaeImageProcessor._resize_and_crop`: `img` resized to cover `width`×`height` keeping its aspect ratio,
/// centred, the excess cut off.
pub fn resize_and_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = (u64::from(img.width()), u64::from(img.height()));
    let (w, h) = (u64::from(width), u64::from(height));
    let ratio = width as f64 / height as f64;
    let src_ratio = iw as f64 / ih as f64;
    let src_w = if ratio > src_ratio { w } else { iw * h / ih } as u32;
    let src_h = if ratio <= src_ratio { h } else { ih * w / iw } as u32;
    let resized = resize(img, src_w, src_h, FILTER);
    let mut out = RgbImage::new(width, height);
    paste(&mut out, &resized, width as i64 / 2 - src_w as i64 / 2, height as i64 / 2 - src_h as i64 / 2);
    out
}

/// PIL's `Image.paste(src, (left, top))`: the part of `src` that lands inside `dst`.
pub fn paste(dst: &mut RgbImage, src: &RgbImage, left: i64, top: i64) {
    for (x, y, p) in src.enumerate_pixels() {
        let (dx, dy) = (left + i64::from(x), top + i64::from(y));
        if (0..i64::from(dst.width())).contains(&dx) && (0..i64::from(dst.height())).contains(&dy) {
            dst.put_pixel(dx as u32, dy as u32, *p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4×5 test picture (x across, y down) with distinct channels.
    fn picture() -> RgbImage {
        RgbImage::from_fn(4, 5, |x, y| {
            image::Rgb([(y * 50 + x * 3) as u8, (200 - y * 40) as u8, ((x * 60 + y * 7) % 256) as u8])
        })
    }

    /// Pillow 13: `im.resize((4, 2), LANCZOS, box=(0, 0, 4, 0))`, `box=(0, 5, 4, 5)` and `(3, 5)` with
    /// `box=(0, 0, 0, 5)` of [`picture`]: an empty box reads the filter's window at the edge.
    #[test]
    fn an_empty_box_stretches_the_edge_as_pillow() {
        let img = picture();
        let top = resize_box(&img, 4, 2, FILTER, [0.0, 0.0, 4.0, 0.0]);
        let row: Vec<[u8; 3]> = (0..4).map(|x| top.get_pixel(x, 1).0).collect();
        assert_eq!(row, [[0, 207, 0], [0, 207, 59], [0, 207, 119], [0, 207, 179]]);
        let bottom = resize_box(&img, 4, 2, FILTER, [0.0, 5.0, 4.0, 5.0]);
        let row: Vec<[u8; 3]> = (0..4).map(|x| bottom.get_pixel(x, 0).0).collect();
        assert_eq!(row, [[209, 33, 29], [212, 33, 89], [215, 33, 149], [218, 33, 209]]);
        let left = resize_box(&img, 3, 5, FILTER, [0.0, 0.0, 0.0, 5.0]);
        let col: Vec<[u8; 3]> = (0..5).map(|y| left.get_pixel(2, y).0).collect();
        assert_eq!(col, [[0, 200, 0], [49, 160, 0], [99, 120, 4], [149, 80, 11], [199, 40, 18]]);
    }

    /// Σ (i + 1) · byte_i over the raw RGB bytes, as the generator of the numbers below computes it.
    fn checksum(img: &RgbImage) -> u64 {
        img.as_raw().iter().enumerate().map(|(i, &v)| (i as u64 + 1) * u64::from(v)).sum()
    }

    /// diffusers 0.42 `VaeImageProcessor().resize(picture, h, w, resize_mode=...)` on [`picture`], checksummed.
    #[test]
    fn fill_and_crop_are_diffusers() {
        let img = picture();
        for ((w, h), sum) in [((8, 4), 528516), ((3, 9), 386721), ((5, 5), 254720)] {
            assert_eq!(checksum(&resize_and_fill(&img, w, h)), sum, "fill {w}x{h}");
        }
        for ((w, h), sum) in [((6, 3), 171720), ((3, 9), 381070), ((9, 11), 5102771)] {
            assert_eq!(checksum(&resize_and_crop(&img, w, h)), sum, "crop {w}x{h}");
        }
    }
}
