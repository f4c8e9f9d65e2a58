//! Image resizing that gives the same bytes as Pillow's `Image.resize` on 8-bit images.
//!
//! diffusers resizes a control image with PIL (`VaeImageProcessor.resize`, Lanczos by default), so to feed the
//! ControlNet the same pixels we reproduce Pillow's `libImaging/Resample.c`, not just "a Lanczos filter":
//! 1. per output pixel, the source window and filter weights along one axis (the filter is stretched by the
//!    downscale factor, so downscaling averages instead of aliasing), normalised to sum 1;
//! 2. the weights rounded to fixed point with [`PRECISION_BITS`] fraction bits;
//! 3. two separable passes with an intermediate 8-bit image between them: horizontal first (only over the rows
//!    the vertical pass reads) unless the height shrinks much more than the width ([`vertical_first`]); a pass
//!    whose size is unchanged is skipped;
//! 4. each sum rounded (half added before the shift) and clipped to 0..=255.
//!
//! NEAREST is a different code path in Pillow (an affine scale with accumulated source coordinates).
use image::RgbImage;

/// The resampling filters of `PIL.Image.Resampling` that diffusers can be configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResampleFilter {
    /// Windowed sinc with 3 lobes; diffusers' default (`VaeImageProcessor(resample="lanczos")`).
    Lanczos,
    /// Keys' cubic convolution with a = -0.5; PIL's default for `Image.resize`.
    Bicubic,
    /// Triangle filter.
    Bilinear,
    /// The source pixel under each output pixel's centre.
    Nearest,
}

impl ResampleFilter {
    /// Parses diffusers' `resample` config strings (`"lanczos"`, `"bicubic"`, `"bilinear"`/`"linear"`, `"nearest"`).
    pub fn from_diffusers_name(name: &str) -> Option<Self> {
        match name {
            "lanczos" => Some(Self::Lanczos),
            "bicubic" => Some(Self::Bicubic),
            "bilinear" | "linear" => Some(Self::Bilinear),
            "nearest" => Some(Self::Nearest),
            _ => None,
        }
    }

    /// Half-width of the filter kernel at scale 1, in source pixels.
    fn support(self) -> f64 {
        match self {
            Self::Lanczos => 3.0,
            Self::Bicubic => 2.0,
            Self::Bilinear => 1.0,
            Self::Nearest => 0.0,
        }
    }

    /// The kernel at distance `x`, written with Pillow's operation order so the f64 results match bit for bit.
    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Nearest => unreachable!("nearest does not use convolution weights"),
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fraction bits of Pillow's fixed-point weights: 32 bits minus 8 for the pixel value and 2 for the overshoot
/// of filters with negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The weights of a 1-D resampling: for output pixel `i`, source pixels `first[i]..first[i] + len[i]` with
/// fixed-point weights `weights[i * ksize..][..len[i]]`.
struct AxisWeights {
    ksize: usize,
    first: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

impl AxisWeights {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` pixels to `out_size`.
    #[cfg(test)]
    fn new(in_size: usize, out_size: usize, filter: ResampleFilter) -> Self {
        Self::with_box(in_size, (0.0, in_size as f32), out_size, filter)
    }

    /// Those weights for the source extent `in0..in1` (Pillow's `box`, f32; it may be empty: every output pixel then
    /// reads the filter's window around `in0`).
    fn with_box(in_size: usize, (in0, in1): (f32, f32), out_size: usize, filter: ResampleFilter) -> Self {
        // The extent is subtracted in f32, as Pillow's float box.
        let scale = f64::from(in1 - in0) / out_size as f64;
        // Downscaling stretches the kernel so every source pixel contributes (anti-aliasing).
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filter_scale = 1.0 / filter_scale;

        let mut first = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut window = Vec::with_capacity(ksize);
        for i in 0..out_size {
            let center = f64::from(in0) + (i as f64 + 0.5) * scale;
            // Window ends rounded as Pillow does: add 0.5 and truncate toward zero.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            window.clear();
            let mut total = 0.0;
            for x in lo..hi {
                let w = filter.weight((x as f64 - center + 0.5) * inv_filter_scale);
                window.push(w);
                total += w;
            }
            for (slot, &w) in weights[i * ksize..].iter_mut().zip(&window) {
                let w = if total != 0.0 { w / total } else { w };
                *slot = to_fixed(w);
            }
            first.push(lo);
            len.push(hi - lo);
        }
        Self { ksize, first, len, weights }
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        (self.first[i], &self.weights[i * self.ksize..][..self.len[i]])
    }
}

/// A normalised weight in fixed point, rounded half away from zero like Pillow.
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Rounds a fixed-point sum (which already holds the half) back to a pixel value, clipping the overshoot.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding half added to every fixed-point sum.
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Whether Pillow runs the vertical pass first. Pillow 13 does so when the height shrinks by more than twice
/// as many pixels as the width does (so always when the height shrinks and the width does not); otherwise
/// horizontal first. The order changes the rounding of the intermediate 8-bit image, so it must match.
/// This rule was measured on the reference Pillow 13.0.0 (exact on 16k size pairs, three filters); the
/// Pillow sources we could read still show horizontal-first or a simpler rule.
pub(super) fn vertical_first((in_w, in_h): (usize, usize), (out_w, out_h): (usize, usize)) -> bool {
    let shrink_w = in_w as i64 - out_w as i64;
    let shrink_h = in_h as i64 - out_h as i64;
    shrink_h > 0 && shrink_h > 2 * shrink_w
}

/// Resamples each row of `src` (`width` pixels of `channels` bytes), for rows `rows` only.
fn horizontal_pass(
    src: &[u8],
    width: usize,
    channels: usize,
    rows: std::ops::Range<usize>,
    weights: &AxisWeights,
) -> Vec<u8> {
    let out_w = weights.first.len();
    let mut out = vec![0u8; rows.len() * out_w * channels];
    for (row_out, y) in out.chunks_exact_mut(out_w * channels).zip(rows) {
        let row_in = &src[y * width * channels..][..width * channels];
        for (x, px) in row_out.chunks_exact_mut(channels).enumerate() {
            let (lo, k) = weights.of(x);
            for (c, out) in px.iter_mut().enumerate() {
                let sum = k
                    .iter()
                    .enumerate()
                    .fold(HALF, |acc, (j, &w)| acc + i64::from(row_in[(lo + j) * channels + c]) * i64::from(w));
                *out = clip8(sum);
            }
        }
    }
    out
}

/// Resamples the columns of `src` (rows of `width` pixels); its row 0 is source row `row_offset`.
fn vertical_pass(src: &[u8], width: usize, channels: usize, row_offset: usize, weights: &AxisWeights) -> Vec<u8> {
    let stride = width * channels;
    let out_h = weights.first.len();
    let mut out = vec![0u8; out_h * stride];
    for (y, row_out) in out.chunks_exact_mut(stride).enumerate() {
        let (lo, k) = weights.of(y);
        let lo = lo - row_offset;
        for (i, out) in row_out.iter_mut().enumerate() {
            let sum = k
                .iter()
                .enumerate()
                .fold(HALF, |acc, (j, &w)| acc + i64::from(src[(lo + j) * stride + i]) * i64::from(w));
            *out = clip8(sum);
        }
    }
    out
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel) with a convolution filter, as `ImagingResample`.
fn resample_convolution(
    src: &[u8],
    (in_w, in_h): (usize, usize),
    channels: usize,
    (out_w, out_h): (usize, usize),
    filter: ResampleFilter,
    [x0, y0, x1, y1]: [f32; 4],
) -> Vec<u8> {
    // A pass runs when its size changes or the box does not span the whole axis (Pillow's `need_horizontal`).
    let need_horizontal = out_w != in_w || x0 != 0.0 || x1 != in_w as f32;
    let need_vertical = out_h != in_h || y0 != 0.0 || y1 != in_h as f32;
    let horizontal = need_horizontal.then(|| AxisWeights::with_box(in_w, (x0, x1), out_w, filter));
    let vertical = need_vertical.then(|| AxisWeights::with_box(in_h, (y0, y1), out_h, filter));
    match (horizontal, vertical) {
        (Some(h), None) => horizontal_pass(src, in_w, channels, 0..in_h, &h),
        (None, Some(v)) => vertical_pass(src, in_w, channels, 0, &v),
        (Some(h), Some(v)) if vertical_first((in_w, in_h), (out_w, out_h)) => {
            let mid = vertical_pass(src, in_w, channels, 0, &v);
            horizontal_pass(&mid, in_w, channels, 0..out_h, &h)
        }
        (Some(h), Some(v)) => {
            // Only the source rows the vertical pass reads go through the horizontal pass.
            let first_row = v.first[0];
            let last_row = v.first[out_h - 1] + v.len[out_h - 1];
            let mid = horizontal_pass(src, in_w, channels, first_row..last_row, &h);
            vertical_pass(&mid, out_w, channels, first_row, &v)
        }
        (None, None) => src.to_vec(),
    }
}

/// Source index of each output pixel along one axis for NEAREST, as Pillow's `ImagingScaleAffine` computes it:
/// the source coordinate is accumulated step by step in f64 (not multiplied), then truncated.
fn nearest_indices(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f32 as f64 / out_size as f64;
    let mut pos = step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = (pos as usize).min(in_size - 1);
            pos += step;
            i
        })
        .collect()
}

fn resample_nearest(
    src: &[u8],
    (in_w, in_h): (usize, usize),
    channels: usize,
    (out_w, out_h): (usize, usize),
) -> Vec<u8> {
    let xs = nearest_indices(in_w, out_w);
    let ys = nearest_indices(in_h, out_h);
    let mut out = Vec::with_capacity(out_w * out_h * channels);
    for &y in &ys {
        for &x in &xs {
            let at = (y * in_w + x) * channels;
            out.extend_from_slice(&src[at..at + channels]);
        }
    }
    out
}

/// Resizes like PIL's `image.resize((width, height), resample=filter)` on an RGB image, byte for byte.
///
/// An unchanged size returns a copy, as PIL does. A zero target size is not an image: it gives an empty one.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: ResampleFilter) -> RgbImage {
    const CHANNELS: usize = 3;
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let in_size = (in_w as usize, in_h as usize);
    let out_size = (width as usize, height as usize);
    let pixels = match filter {
        ResampleFilter::Nearest => resample_nearest(img.as_raw(), in_size, CHANNELS, out_size),
        _ => {
            let whole = [0.0, 0.0, in_w as f32, in_h as f32];
            resample_convolution(img.as_raw(), in_size, CHANNELS, out_size, filter, whole)
        }
    };
    RgbImage::from_raw(width, height, pixels).expect("resampled buffer has width * height * 3 bytes")
}

/// PIL's `image.resize((width, height), resample=filter, box=(x0, y0, x1, y1))` for a convolution filter: the
/// source region `box` (in pixels; it may be empty along an axis, as diffusers' "fill" resize uses it to stretch
/// an edge) resampled to `width`×`height`.
pub fn resize_box(img: &RgbImage, width: u32, height: u32, filter: ResampleFilter, region: [f32; 4]) -> RgbImage {
    const CHANNELS: usize = 3;
    assert!(filter != ResampleFilter::Nearest, "resize_box takes a convolution filter");
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let in_size = (in_w as usize, in_h as usize);
    let out_size = (width as usize, height as usize);
    let pixels = resample_convolution(img.as_raw(), in_size, CHANNELS, out_size, filter, region);
    RgbImage::from_raw(width, height, pixels).expect("resampled buffer has width * height * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [ResampleFilter::Lanczos, ResampleFilter::Bicubic, ResampleFilter::Bilinear] {
            for (n_in, n_out) in [(37, 128), (130, 8), (64, 17), (5, 5)] {
                let w = AxisWeights::new(n_in, n_out, filter);
                for i in 0..n_out {
                    let (lo, k) = w.of(i);
                    assert!(lo + k.len() <= n_in);
                    let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                    // Each weight is rounded separately, so the sum is off by at most half a unit per tap.
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{filter:?} {sum}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(13, 7, image::Rgb([200, 0, 255]));
        for filter in
            [ResampleFilter::Lanczos, ResampleFilter::Bicubic, ResampleFilter::Bilinear, ResampleFilter::Nearest]
        {
            let out = resize(&img, 40, 3, filter);
            assert!(out.pixels().all(|p| p.0 == [200, 0, 255]), "{filter:?}");
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        assert_eq!(resize(&img, 5, 4, ResampleFilter::Lanczos), img);
    }

    #[test]
    fn diffusers_names() {
        assert_eq!(ResampleFilter::from_diffusers_name("lanczos"), Some(ResampleFilter::Lanczos));
        assert_eq!(ResampleFilter::from_diffusers_name("linear"), Some(ResampleFilter::Bilinear));
        assert_eq!(ResampleFilter::from_diffusers_name("box"), None);
    }
}
