//! Sizes: A1111's resize modes, its "pixel perfect" annotator resolution, and its pre-/post-resizes.
//!
//! From sd-webui-controlnet: `ResizeMode` (scripts/enums.py), `pixel_perfect_resolution`
//! (internal_controlnet/external_code.py), `resize_image_with_pad` (scripts/utils.py) and
//! `Script.detectmap_proc` with its `high_quality_resize` (scripts/controlnet.py).
use std::collections::HashSet;

use image::RgbImage;

use super::cv::{self, Interpolation, Mat};

/// How a control map is fitted to an output of another aspect ratio (A1111's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ResizeMode {
    /// Stretch to the output size ("Just Resize").
    JustResize,
    /// Scale to cover the output, centre-crop the overflow ("Crop and Resize", A1111's default).
    #[default]
    CropAndResize,
    /// Scale to fit inside the output, pad with the median border colour ("Resize and Fill").
    ResizeAndFill,
}

/// A1111's `safeint`: `int(np.round(x))`, round half to even.
fn safeint(x: f64) -> u32 {
    x.round_ties_even().max(0.0) as u32
}

/// The annotator resolution (short side) at which the map needs no further scaling to fill an output of
/// `target_w × target_h` in `mode`: the larger scale factor for crop/stretch, the smaller for fill.
pub fn pixel_perfect_resolution(raw_w: u32, raw_h: u32, target_w: u32, target_h: u32, mode: ResizeMode) -> u32 {
    let k0 = target_h as f64 / raw_h as f64;
    let k1 = target_w as f64 / raw_w as f64;
    let k = match mode {
        ResizeMode::ResizeAndFill => k0.min(k1),
        _ => k0.max(k1),
    };
    safeint(k * raw_w.min(raw_h) as f64).max(1)
}

/// The size [`resize_short_side`] makes of a `width × height` image, without making it.
pub fn short_side_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let k = resolution as f64 / width.min(height) as f64;
    (safeint(width as f64 * k).max(1), safeint(height as f64 * k).max(1))
}

/// Short side to `resolution`, cubic when enlarging and area when shrinking (first half of A1111's
/// `resize_image_with_pad`).
pub fn resize_short_side(img: &Mat<u8>, resolution: u32) -> Mat<u8> {
    let k = resolution as f64 / img.width.min(img.height) as f64;
    let interp = if k > 1.0 { Interpolation::Cubic } else { Interpolation::Area };
    let h = safeint(img.height as f64 * k).max(1) as usize;
    let w = safeint(img.width as f64 * k).max(1) as usize;
    cv::resize_u8(img, w, h, interp)
}

/// Short side to `resolution` with area interpolation either way (`cv2_resize_shortest_edge` of A1111's
/// colour annotator, whose rounding differs slightly from [`resize_short_side`]).
pub fn resize_short_side_area(img: &Mat<u8>, resolution: u32) -> Mat<u8> {
    let (w, h) = (img.width as f64, img.height as f64);
    let r = resolution as f64;
    let (nw, nh) = if h < w { ((w / h * r).round_ties_even(), r) } else { (r, (h / w * r).round_ties_even()) };
    cv::resize_u8(img, (nw as usize).max(1), (nh as usize).max(1), Interpolation::Area)
}

/// Pad right and bottom to multiples of 64 by repeating the edge pixels (`np.pad(.., mode="edge")`).
pub fn pad_to_64(img: &Mat<u8>) -> Mat<u8> {
    let up = |v: usize| v.div_ceil(64) * 64;
    let (w, h, c) = (up(img.width), up(img.height), img.channels);
    let mut out = Mat::new(w, h, c);
    for y in 0..h {
        let sy = y.min(img.height - 1);
        for x in 0..w {
            let sx = x.min(img.width - 1);
            for ch in 0..c {
                out.set(y, x, ch, img.at(sy, sx, ch));
            }
        }
    }
    out
}

/// The size controlnet_aux's `resize_image` makes of a `width × height` image: short side to `resolution`, then
/// each side rounded to a multiple of 64 (numpy's round half to even; 0 for images too small to round up).
pub fn controlnet_aux_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let k = resolution as f64 / width.min(height) as f64;
    let round64 = |v: f64| ((v * k / 64.0).round_ties_even() * 64.0).max(0.0) as u32;
    (round64(width as f64), round64(height as f64))
}

/// controlnet_aux's `resize_image`: to [`controlnet_aux_size`], Lanczos-4 when enlarging, area otherwise (the
/// net input of every controlnet_aux detector, and the size of its output).
pub fn controlnet_aux_resize(img: &Mat<u8>, resolution: u32) -> Mat<u8> {
    let (w, h) = controlnet_aux_size(img.width as u32, img.height as u32, resolution);
    let k = resolution as f64 / img.width.min(img.height) as f64;
    let interp = if k > 1.0 { Interpolation::Lanczos4 } else { Interpolation::Area };
    cv::resize_u8(img, w as usize, h as usize, interp)
}

/// Fit a control map to `width × height` in `mode` (A1111's `detectmap_proc`).
pub fn fit_to_output(map: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    let m = Mat::from_rgb(map);
    let (old_w, old_h) = (m.width as f64, m.height as f64);
    let k0 = height as f64 / old_h;
    let k1 = width as f64 / old_w;
    let (w, h) = (width as usize, height as usize);
    let out = match mode {
        ResizeMode::JustResize => high_quality_resize(&m, w, h),
        ResizeMode::ResizeAndFill => {
            let k = k0.min(k1);
            let border = median_border_colour(&m);
            let nw = (safeint(old_w * k) as usize).clamp(1, w);
            let nh = (safeint(old_h * k) as usize).clamp(1, h);
            let inner = high_quality_resize(&m, nw, nh);
            let (px, py) = ((w - nw) / 2, (h - nh) / 2);
            let mut out = Mat::new(w, h, 3);
            for y in 0..h {
                for x in 0..w {
                    let inside = (px..px + nw).contains(&x) && (py..py + nh).contains(&y);
                    for (c, &fill) in border.iter().enumerate() {
                        let v = if inside { inner.at(y - py, x - px, c) } else { fill };
                        out.set(y, x, c, v);
                    }
                }
            }
            out
        }
        ResizeMode::CropAndResize => {
            let k = k0.max(k1);
            // never smaller than the output (A1111 would return a short map on a rounding-down)
            let nw = (safeint(old_w * k) as usize).max(w);
            let nh = (safeint(old_h * k) as usize).max(h);
            let big = high_quality_resize(&m, nw, nh);
            let (px, py) = ((nw - w) / 2, (nh - h) / 2);
            let mut out = Mat::new(w, h, 3);
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        out.set(y, x, c, big.at(y + py, x + px, c));
                    }
                }
            }
            out
        }
    };
    out.to_rgb()
}

/// Per-channel median of the four border lines (corners counted twice), truncated to u8 like numpy's
/// `np.median(..).astype(uint8)`.
fn median_border_colour(m: &Mat<u8>) -> [u8; 3] {
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<u8> = Vec::with_capacity(2 * (m.width + m.height));
        for x in 0..m.width {
            v.push(m.at(0, x, c));
        }
        for x in 0..m.width {
            v.push(m.at(m.height - 1, x, c));
        }
        for y in 0..m.height {
            v.push(m.at(y, 0, c));
        }
        for y in 0..m.height {
            v.push(m.at(y, m.width - 1, c));
        }
        v.sort_unstable();
        let n = v.len();
        let med = if n % 2 == 1 { v[n / 2] as f64 } else { (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0 };
        *o = med as u8;
    }
    out
}

/// Number of distinct colours, counted up to `cap` (A1111 only asks "2?", "< 200?").
fn count_colours(m: &Mat<u8>, cap: usize) -> usize {
    let mut seen = HashSet::new();
    for p in m.data.chunks_exact(m.channels) {
        seen.insert([p[0], p[1], p[2]]);
        if seen.len() >= cap {
            break;
        }
    }
    seen.len()
}

/// A1111's `high_quality_resize` (lvmin's control-map scaler): nearest for few-colour maps (segmentation),
/// area when shrinking, cubic when enlarging; two-colour black/white maps are re-binarised with Otsu.
///
/// Not reproduced: A1111's extra thinning of one-pixel edge maps (`nake_nms` + `lvmin_thin`) when they are
/// rescaled; such maps here are re-binarised with Otsu only. With the pixel-perfect default resolution the
/// map is not rescaled in crop-and-resize and resize-and-fill modes, so this only shows when
/// `--resolution` is set or the aspect ratio changes in just-resize mode.
pub fn high_quality_resize(m: &Mat<u8>, w: usize, h: usize) -> Mat<u8> {
    if (m.width, m.height) == (w, h) {
        return m.clone();
    }
    let smaller = w * h < m.width * m.height;
    let colours = count_colours(m, 200);
    let (lo, hi) = m.data.iter().fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let is_binary = colours == 2 && lo < 16 && hi > 240;
    let interp = if colours > 2 && colours < 200 {
        Interpolation::Nearest
    } else if smaller {
        Interpolation::Area
    } else {
        Interpolation::Cubic
    };
    let y = cv::resize_u8(m, w, h, interp);
    if !is_binary {
        return y;
    }
    // mean over channels in float32, truncated; then Otsu (THRESH_BINARY: above the threshold is white)
    let grey = Mat {
        width: w,
        height: h,
        channels: 1,
        data: y
            .data
            .chunks_exact(3)
            .map(|p| ((p[0] as f32 + p[1] as f32 + p[2] as f32) / 3.0).clamp(0.0, 255.0) as u8)
            .collect(),
    };
    let t = cv::otsu_threshold(&grey);
    Mat {
        width: w,
        height: h,
        channels: 3,
        data: grey.data.iter().flat_map(|&v| [if v > t { 255 } else { 0 }; 3]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn pixel_perfect_matches_a1111() {
        // numbers from A1111's formula: raw 61x97 (h x w) to 512x512
        assert_eq!(pixel_perfect_resolution(97, 61, 512, 512, ResizeMode::CropAndResize), 512);
        assert_eq!(pixel_perfect_resolution(97, 61, 512, 512, ResizeMode::ResizeAndFill), 322);
        assert_eq!(pixel_perfect_resolution(97, 61, 512, 512, ResizeMode::JustResize), 512);
        // same size: the annotator runs at the input's short side
        assert_eq!(pixel_perfect_resolution(97, 61, 97, 61, ResizeMode::CropAndResize), 61);
        // 512x768 (w x h) image for a 768x512 output: crop needs 768 on the short side
        assert_eq!(pixel_perfect_resolution(512, 768, 768, 512, ResizeMode::CropAndResize), 768);
        assert_eq!(pixel_perfect_resolution(512, 768, 768, 512, ResizeMode::ResizeAndFill), 341);
    }

    #[test]
    fn controlnet_aux_sizes_round_to_64() {
        // resize_image(96x64, 64): k = 1, 96 -> 1.5 * 64 rounds half to even -> 128
        assert_eq!(controlnet_aux_size(96, 64, 64), (128, 64));
        assert_eq!(controlnet_aux_size(72, 104, 128), (128, 192));
        assert_eq!(controlnet_aux_size(512, 768, 512), (512, 768));
        // the short side is the resolution itself: 32 rounds (half to even) to 0, 33 to 64
        assert_eq!(controlnet_aux_size(100, 150, 32), (0, 64));
        assert_eq!(controlnet_aux_size(100, 150, 33), (64, 64));
    }

    #[test]
    fn resize_with_pad_matches_a1111() {
        // metric: mean |diff| <= 0.01, >= 99.5% exact (area shrinking is exact; cubic enlarging may round
        // exact .5 ties the other way, most often at simple ratios such as 5:4)
        for c in cases("a1111_resize_with_pad") {
            let img = Mat::from_rgb(&load(&c.input));
            let ours = pad_to_64(&resize_short_side(&img, c.f64("resolution") as u32)).to_rgb();
            assert_close(&ours, &load(&c.output), 0.01, 0, 0.995, &c.output);
        }
    }

    #[test]
    fn fit_to_output_matches_a1111_detectmap_proc() {
        // metric: mean |diff| <= 0.15 grey levels, >= 99.9% of samples within 1 (nearest, area shrinking,
        // the median border colour and Otsu are exact; cubic may round .5 ties the other way; a shrink along
        // one axis with growth along the other takes OpenCV's linear "area" variant, one level off on ~10%)
        for c in cases("a1111_detectmap") {
            let img = Mat::from_rgb(&load(&c.input));
            let source = match c.str("source") {
                "smooth" => cv::gaussian_blur_u8(&img, 2.0).to_rgb(),
                _ => crate::annotate::binary::binary(&img, 0.0).to_rgb(),
            };
            let mode = match c.str("mode") {
                "just-resize" => ResizeMode::JustResize,
                "crop-and-resize" => ResizeMode::CropAndResize,
                _ => ResizeMode::ResizeAndFill,
            };
            let ours = fit_to_output(&source, c.f64("width") as u32, c.f64("height") as u32, mode);
            assert_close(&ours, &load(&c.output), 0.15, 1, 0.999, &c.output);
        }
    }
}
