//! Small OpenCV look-alikes: the few `cv2` calls the reference annotators make, with OpenCV's exact
//! semantics (border rules, coordinate mapping, fixed-point rounding), so a control map made here matches the
//! one ControlNet was trained on.
//!
//! | here | OpenCV | notes |
//! | --- | --- | --- |
//! | [`Mat`] | `cv::Mat` | interleaved rows, any sample type |
//! | [`border_index`] | `cv::borderInterpolate` | [`Border::Replicate`], [`Border::Reflect101`] (OpenCV's default) |
//! | [`gaussian_blur_u8`] | `GaussianBlur` on `CV_8U` | bit-exact: 8-bit fixed-point kernel, error-diffused |
//! | [`gaussian_blur_f32`] | `GaussianBlur` on `CV_32F` | float kernel; sums in f64 (≤ 1e-5 from OpenCV) |
//! | [`sobel3_f32`] | `Sobel(ksize=3)` on `CV_32F` | reflect-101 border |
//! | [`resize_u8`], [`resize_f64`] | `resize` | `INTER_NEAREST`, `INTER_LINEAR`, `INTER_CUBIC`, `INTER_AREA` |
//! | [`remap_linear_u8`] | `remap(INTER_LINEAR)` | float weights (OpenCV 5), constant-0 border |
//! | [`rgb_to_gray`] | `cvtColor(COLOR_RGB2GRAY)` | 15-bit fixed point |
//! | [`otsu_threshold`] | `threshold(THRESH_OTSU)` | OpenCV's double-precision scan |

/// An interleaved `height × width × channels` image, rows top to bottom (the layout of a `cv::Mat`).
#[derive(Clone, Debug, PartialEq)]
pub struct Mat<T> {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<T>,
}

impl<T: Copy + Default> Mat<T> {
    pub fn new(width: usize, height: usize, channels: usize) -> Self {
        Self { width, height, channels, data: vec![T::default(); width * height * channels] }
    }

    #[inline]
    pub fn at(&self, y: usize, x: usize, c: usize) -> T {
        self.data[(y * self.width + x) * self.channels + c]
    }

    #[inline]
    pub fn set(&mut self, y: usize, x: usize, c: usize, v: T) {
        self.data[(y * self.width + x) * self.channels + c] = v;
    }

    /// Sample-wise conversion (`Mat::convertTo` without scaling).
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Mat<U> {
        Mat {
            width: self.width,
            height: self.height,
            channels: self.channels,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

impl Mat<u8> {
    pub fn from_rgb(image: &image::RgbImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            channels: 3,
            data: image.as_raw().clone(),
        }
    }

    /// To an RGB image; a one-channel map is repeated into the three channels (ControlNet's `HWC3`).
    ///
    /// # Panics
    /// On a `Mat` with other than 1 or 3 channels (the annotators only make those).
    pub fn to_rgb(&self) -> image::RgbImage {
        let data = match self.channels {
            3 => self.data.clone(),
            1 => self.data.iter().flat_map(|&v| [v, v, v]).collect(),
            c => panic!("to_rgb: {c}-channel Mat"),
        };
        image::RgbImage::from_raw(self.width as u32, self.height as u32, data).expect("buffer length matches the size")
    }
}

/// How pixels outside the image are made up (`cv::BorderTypes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Border {
    /// `aaaaaa|abcdefgh|hhhhhhh`
    Replicate,
    /// `gfedcb|abcdefgh|gfedcba`, OpenCV's `BORDER_DEFAULT`.
    Reflect101,
}

/// `cv::borderInterpolate`: the in-image index that stands for index `p` of a row of `len` samples.
pub fn border_index(p: isize, len: usize, border: Border) -> usize {
    let n = len as isize;
    if (0..n).contains(&p) {
        return p as usize;
    }
    match border {
        Border::Replicate => p.clamp(0, n - 1) as usize,
        Border::Reflect101 => {
            if n == 1 {
                return 0;
            }
            // reflect as often as needed: kernels may be wider than the image
            let mut p = p;
            while !(0..n).contains(&p) {
                p = if p < 0 { -p } else { 2 * (n - 1) - p };
            }
            p as usize
        }
    }
}

/// `cvRound` of a double: round half to even (what `lrint` does in the default rounding mode).
#[inline]
pub fn cv_round(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// `saturate_cast<uchar>(float)`.
#[inline]
pub fn saturate_u8(v: f32) -> u8 {
    (v as f64).round_ties_even().clamp(0.0, 255.0) as u8
}

// ---------------------------------------------------------------------------------------------------------
// Gaussian blur
// ---------------------------------------------------------------------------------------------------------

/// Kernel size OpenCV picks for `GaussianBlur(img, (0, 0), sigma)`: ±3σ for 8-bit images, ±4σ otherwise.
pub fn gaussian_ksize(sigma: f64, is_u8: bool) -> usize {
    let reach = if is_u8 { 3.0 } else { 4.0 };
    (cv_round(sigma * reach * 2.0 + 1.0) as usize) | 1
}

/// `getGaussianKernel(n, sigma)` in double precision (sigma > 0), normalised to sum 1.
pub fn gaussian_kernel(n: usize, sigma: f64) -> Vec<f64> {
    let scale = -0.5 / (sigma * sigma);
    let centre = (n as f64 - 1.0) * 0.5;
    let k: Vec<f64> = (0..n)
        .map(|i| {
            let x = i as f64 - centre;
            (scale * x * x).exp()
        })
        .collect();
    let sum: f64 = k.iter().sum();
    k.iter().map(|v| v / sum).collect()
}

/// The 8-bit fixed-point kernel of OpenCV's bit-exact `CV_8U` blur: values × 256 rounded with error
/// diffusion from the outside in, the centre tap takes what is left so the taps sum to exactly 256.
pub fn gaussian_kernel_fixed8(n: usize, sigma: f64) -> Vec<i64> {
    const ONE: i64 = 256;
    let k = gaussian_kernel(n, sigma);
    let mut out = vec![0i64; n];
    let (mut err, mut sum) = (0.0f64, 0i64);
    for i in 0..n / 2 {
        let v = k[i] * ONE as f64 + err;
        let r = cv_round(v);
        err = v - r as f64;
        out[i] = r;
        out[n - 1 - i] = r;
        sum += 2 * r;
    }
    out[n / 2] = ONE - sum;
    out
}

/// `cv2.GaussianBlur(img, (0, 0), sigma)` on an 8-bit image, bit-exact with OpenCV ≥ 4: rows are filtered
/// into 8.8 fixed point, columns into 16.16, rounded once at the end. Border: reflect-101.
pub fn gaussian_blur_u8(src: &Mat<u8>, sigma: f64) -> Mat<u8> {
    let n = gaussian_ksize(sigma, true);
    // OpenCV shrinks the kernel to 1 along an axis of length 1
    let kx = if src.width == 1 { vec![256] } else { gaussian_kernel_fixed8(n, sigma) };
    let ky = if src.height == 1 { vec![256] } else { gaussian_kernel_fixed8(n, sigma) };
    let rows = filter_rows(src, &kx, |v| v as i64, Border::Reflect101);
    let mut out = Mat::new(src.width, src.height, src.channels);
    filter_cols(&rows, &ky, Border::Reflect101, &mut out, |acc: i64| ((acc + (1 << 15)) >> 16).clamp(0, 255) as u8);
    out
}

/// `cv2.GaussianBlur(img, (0, 0), sigma)` on a float image (kernel ±4σ, reflect-101 border).
pub fn gaussian_blur_f32(src: &Mat<f32>, sigma: f64) -> Mat<f32> {
    let n = gaussian_ksize(sigma, false);
    // OpenCV builds a float kernel from the double one
    let k: Vec<f64> = gaussian_kernel(n, sigma).iter().map(|&v| v as f32 as f64).collect();
    let kx = if src.width == 1 { vec![1.0] } else { k.clone() };
    let ky = if src.height == 1 { vec![1.0] } else { k };
    let rows = filter_rows(src, &kx, |v| v as f64, Border::Reflect101);
    let mut out = Mat::new(src.width, src.height, src.channels);
    filter_cols(&rows, &ky, Border::Reflect101, &mut out, |acc: f64| acc as f32);
    out
}

/// Horizontal pass of a separable filter (centred kernel of odd length).
fn filter_rows<T: Copy, A>(src: &Mat<T>, k: &[A], widen: impl Fn(T) -> A, border: Border) -> Mat<A>
where
    A: Copy + Default + std::ops::Mul<Output = A> + std::ops::AddAssign,
{
    let (w, c, r) = (src.width, src.channels, (k.len() / 2) as isize);
    let mut out = Mat::new(w, src.height, c);
    let cols: Vec<Vec<usize>> =
        (0..w as isize).map(|x| (-r..=r).map(|d| border_index(x + d, w, border)).collect()).collect();
    for y in 0..src.height {
        let row = &src.data[y * w * c..(y + 1) * w * c];
        for (x, taps) in cols.iter().enumerate() {
            for ch in 0..c {
                let mut acc = A::default();
                for (&sx, &kv) in taps.iter().zip(k) {
                    acc += widen(row[sx * c + ch]) * kv;
                }
                out.data[(y * w + x) * c + ch] = acc;
            }
        }
    }
    out
}

/// Vertical pass of a separable filter, `finish` turning each accumulated sum into the output sample.
fn filter_cols<A, O>(src: &Mat<A>, k: &[A], border: Border, out: &mut Mat<O>, finish: impl Fn(A) -> O)
where
    A: Copy + Default + std::ops::Mul<Output = A> + std::ops::AddAssign,
    O: Copy,
{
    let (h, stride, r) = (src.height, src.width * src.channels, (k.len() / 2) as isize);
    for y in 0..h {
        let taps: Vec<usize> = (-r..=r).map(|d| border_index(y as isize + d, h, border)).collect();
        for i in 0..stride {
            let mut acc = A::default();
            for (&sy, &kv) in taps.iter().zip(k) {
                acc += src.data[sy * stride + i] * kv;
            }
            out.data[y * stride + i] = finish(acc);
        }
    }
}

/// `cv2.Sobel(img, CV_32F, dx, dy, ksize=3)` on a one-channel float image: the 3×3 Sobel operator
/// (`[-1 0 1]` along the derivative axis, `[1 2 1]` across), reflect-101 border.
pub fn sobel3_f32(src: &Mat<f32>, dx: bool) -> Mat<f32> {
    assert_eq!(src.channels, 1, "sobel3_f32 takes one channel");
    let (w, h) = (src.width, src.height);
    let mut out = Mat::new(w, h, 1);
    let px =
        |y: isize, x: isize| src.at(border_index(y, h, Border::Reflect101), border_index(x, w, Border::Reflect101), 0);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let v = if dx {
                (px(y - 1, x + 1) - px(y - 1, x - 1))
                    + 2.0 * (px(y, x + 1) - px(y, x - 1))
                    + (px(y + 1, x + 1) - px(y + 1, x - 1))
            } else {
                (px(y + 1, x - 1) - px(y - 1, x - 1))
                    + 2.0 * (px(y + 1, x) - px(y - 1, x))
                    + (px(y + 1, x + 1) - px(y - 1, x + 1))
            };
            out.set(y as usize, x as usize, 0, v);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Resize
// ---------------------------------------------------------------------------------------------------------

/// `cv::InterpolationFlags` used by the annotators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Linear,
    Cubic,
    /// Pixel-area averaging when shrinking; a linear variant when enlarging.
    Area,
    /// 8-tap Lanczos (`INTER_LANCZOS4`, controlnet_aux's enlarging filter).
    Lanczos4,
}

/// Fixed-point scale of OpenCV's 8-bit resize coefficients (`INTER_RESIZE_COEF_BITS = 11`).
const RESIZE_COEF_SCALE: f32 = 2048.0;
const RESIZE_COEF_BITS: u32 = 11;

/// Source taps and weights of one output coordinate along one axis.
pub(crate) struct Taps {
    pub index: Vec<usize>,
    pub weight: Vec<f32>,
}

/// `interpolateCubic` with OpenCV's A = -0.75 (not the -0.5 of PIL).
fn cubic_coeffs(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// `interpolateLanczos4`: a windowed sinc over 8 taps, normalised to sum 1.
fn lanczos4_coeffs(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] =
        [[1.0, 0.0], [-S45, -S45], [0.0, 1.0], [S45, -S45], [-1.0, 0.0], [S45, S45], [0.0, -1.0], [-S45, S45]];
    let mut coeffs = [0f32; 8];
    let y0 = -(x as f64 + 3.0) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut sum = 0f32;
    for (i, c) in coeffs.iter_mut().enumerate() {
        let y0_ = x + 3.0 - i as f32;
        *c = if y0_.abs() >= 1e-6 {
            let y = -(y0_ as f64) * std::f64::consts::PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *c;
    }
    let inv = 1.0 / sum;
    coeffs.iter_mut().for_each(|c| *c *= inv);
    coeffs
}

/// Taps of `resize`'s interpolating path (`resizeGeneric`) along one axis: the source coordinate of output
/// sample `d` is `(d + 0.5) * scale - 0.5` (or the area-upscale variant); out-of-range taps are clamped.
pub(crate) fn interp_taps(src_len: usize, dst_len: usize, interp: Interpolation) -> Vec<Taps> {
    // OpenCV stores the inverse scale and inverts it again; keep the same double rounding
    let inv_scale = dst_len as f64 / src_len as f64;
    let scale = 1.0 / inv_scale;
    let ksize: isize = match interp {
        Interpolation::Cubic => 4,
        Interpolation::Lanczos4 => 8,
        _ => 2,
    };
    (0..dst_len)
        .map(|d| {
            let (mut sx, mut fx);
            if interp == Interpolation::Area {
                sx = (d as f64 * scale).floor() as isize;
                fx = ((d + 1) as f64 - (sx + 1) as f64 * inv_scale) as f32;
                fx = if fx <= 0.0 { 0.0 } else { fx - fx.floor() };
            } else {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                sx = f.floor() as isize;
                fx = f - sx as f32;
            }
            if ksize == 2 {
                // linear: taps outside the image collapse onto the edge sample
                if sx < 0 {
                    sx = 0;
                    fx = 0.0;
                }
                if sx >= src_len as isize - 1 {
                    sx = src_len as isize - 1;
                    fx = 0.0;
                }
            }
            let weight = match ksize {
                4 => cubic_coeffs(fx).to_vec(),
                8 => lanczos4_coeffs(fx).to_vec(),
                _ => vec![1.0 - fx, fx],
            };
            let first = sx - (ksize / 2 - 1);
            let index = (0..ksize).map(|k| (first + k).clamp(0, src_len as isize - 1) as usize).collect();
            Taps { index, weight }
        })
        .collect()
}

/// `cv2.resize` of an 8-bit image to `width × height`.
///
/// Cubic follows the reference build (OpenCV 5 with Intel IPP): float coefficients, sums rounded once; ties
/// at exactly .5 may land on the other side (< 0.1% of samples). Linear and area-enlarging use OpenCV's
/// generic 11-bit fixed point; the reference build's own path for those differs by one grey level on
/// ~10% of samples (see `resize_matches_cv2`). Lanczos4 is the same fixed point, which the reference build
/// matches exactly. Area shrinking is OpenCV's algorithm exactly.
pub fn resize_u8(src: &Mat<u8>, width: usize, height: usize, interp: Interpolation) -> Mat<u8> {
    if (width, height) == (src.width, src.height) {
        return src.clone();
    }
    match interp {
        Interpolation::Nearest => resize_nearest(src, width, height),
        Interpolation::Area if width <= src.width && height <= src.height => resize_area_down(src, width, height),
        Interpolation::Cubic => {
            let widen = |taps: Vec<Taps>| -> Vec<(Vec<usize>, Vec<f64>)> {
                taps.into_iter().map(|t| (t.index, t.weight.iter().map(|&a| a as f64).collect())).collect()
            };
            let xt = widen(interp_taps(src.width, width, interp));
            let yt = widen(interp_taps(src.height, height, interp));
            separable_resize(src, &xt, &yt, |v| v as f64, |acc: f64| acc.round_ties_even().clamp(0.0, 255.0) as u8)
        }
        _ => {
            // fixed point: 11-bit coefficients per axis, one rounding at the end (`FixedPtCast<.., 22>`)
            let to_fixed = |taps: Vec<Taps>| -> Vec<(Vec<usize>, Vec<i64>)> {
                taps.into_iter()
                    .map(|t| {
                        let w = t.weight.iter().map(|&a| cv_round((a * RESIZE_COEF_SCALE) as f64)).collect();
                        (t.index, w)
                    })
                    .collect()
            };
            let xt = to_fixed(interp_taps(src.width, width, interp));
            let yt = to_fixed(interp_taps(src.height, height, interp));
            separable_resize(
                src,
                &xt,
                &yt,
                |v| v as i64,
                |acc: i64| ((acc + (1 << (2 * RESIZE_COEF_BITS - 1))) >> (2 * RESIZE_COEF_BITS)).clamp(0, 255) as u8,
            )
        }
    }
}

/// `cv2.resize(src, (width, height), INTER_LINEAR)` on an 8-bit image as the reference OpenCV 5 build computes
/// it, bit for bit (checked on up- and down-scaling): 11-bit weights from float32 positions (edge columns take
/// the edge pixel, edge rows blend the clamped row with itself), the horizontal pass in integers, and the
/// vectorised vertical pass `((b0·(h0 >> 4)) >> 16) + ((b1·(h1 >> 4)) >> 16) + 2) >> 2`, whose truncations put
/// [`resize_u8`]'s single rounding a level off on ~5% of samples.
pub fn resize_linear_u8_vectorised(src: &Mat<u8>, width: usize, height: usize) -> Mat<u8> {
    // (first tap, second tap, their weights) per output coordinate
    let taps = |n_in: usize, n_out: usize, edge_weights_zero: bool| -> Vec<(usize, usize, i64, i64)> {
        let scale = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|d| {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let i = f.floor();
                let mut a = f - i;
                let i = i as i64;
                if edge_weights_zero && (i < 0 || i >= n_in as i64 - 1) {
                    a = 0.0;
                }
                let clamp = |v: i64| v.clamp(0, n_in as i64 - 1) as usize;
                let w0 = ((1.0f32 - a) * RESIZE_COEF_SCALE).round_ties_even() as i64;
                let w1 = (a * RESIZE_COEF_SCALE).round_ties_even() as i64;
                (clamp(i), clamp(i + 1), w0, w1)
            })
            .collect()
    };
    let (xt, yt) = (taps(src.width, width, true), taps(src.height, height, false));
    let c = src.channels;
    let row = |y: usize| -> Vec<i64> {
        let mut out = Vec::with_capacity(width * c);
        for &(x0, x1, w0, w1) in &xt {
            for ch in 0..c {
                out.push(i64::from(src.at(y, x0, ch)) * w0 + i64::from(src.at(y, x1, ch)) * w1);
            }
        }
        out
    };
    let mut out = Mat::new(width, height, c);
    for (dy, &(y0, y1, b0, b1)) in yt.iter().enumerate() {
        let (top, bottom) = (row(y0), row(y1));
        for (i, (t, b)) in top.iter().zip(&bottom).enumerate() {
            let v = (((b0 * (t >> 4)) >> 16) + ((b1 * (b >> 4)) >> 16) + 2) >> 2;
            out.data[dy * width * c + i] = v.clamp(0, 255) as u8;
        }
    }
    out
}

/// `cv2.resize` of a double image with `INTER_CUBIC` or `INTER_LINEAR` (float coefficients, double sums).
pub fn resize_f64(src: &Mat<f64>, width: usize, height: usize, interp: Interpolation) -> Mat<f64> {
    assert!(matches!(interp, Interpolation::Cubic | Interpolation::Linear));
    if (width, height) == (src.width, src.height) {
        return src.clone();
    }
    let widen = |taps: Vec<Taps>| -> Vec<(Vec<usize>, Vec<f64>)> {
        taps.into_iter().map(|t| (t.index, t.weight.iter().map(|&a| a as f64).collect())).collect()
    };
    let xt = widen(interp_taps(src.width, width, interp));
    let yt = widen(interp_taps(src.height, height, interp));
    separable_resize(src, &xt, &yt, |v| v, |acc| acc)
}

/// Horizontal then vertical weighted sums over precomputed taps.
pub(crate) fn separable_resize<T: Copy, A, O: Copy + Default>(
    src: &Mat<T>,
    xt: &[(Vec<usize>, Vec<A>)],
    yt: &[(Vec<usize>, Vec<A>)],
    widen: impl Fn(T) -> A,
    finish: impl Fn(A) -> O,
) -> Mat<O>
where
    A: Copy + Default + std::ops::Mul<Output = A> + std::ops::AddAssign,
{
    let c = src.channels;
    let (w, h) = (xt.len(), yt.len());
    // horizontal pass over every source row
    let mut rows = vec![A::default(); src.height * w * c];
    for y in 0..src.height {
        for (x, (idx, wt)) in xt.iter().enumerate() {
            for ch in 0..c {
                let mut acc = A::default();
                for (&sx, &a) in idx.iter().zip(wt) {
                    acc += widen(src.data[(y * src.width + sx) * c + ch]) * a;
                }
                rows[(y * w + x) * c + ch] = acc;
            }
        }
    }
    let mut out = Mat::new(w, h, c);
    for (y, (idx, wt)) in yt.iter().enumerate() {
        for i in 0..w * c {
            let mut acc = A::default();
            for (&sy, &b) in idx.iter().zip(wt) {
                acc += rows[sy * w * c + i] * b;
            }
            out.data[y * w * c + i] = finish(acc);
        }
    }
    out
}

/// `INTER_NEAREST`: source index `floor(d * src / dst)`.
fn resize_nearest(src: &Mat<u8>, width: usize, height: usize) -> Mat<u8> {
    let ifx = 1.0 / (width as f64 / src.width as f64);
    let ify = 1.0 / (height as f64 / src.height as f64);
    let c = src.channels;
    let mut out = Mat::new(width, height, c);
    for y in 0..height {
        let sy = ((y as f64 * ify).floor() as usize).min(src.height - 1);
        for x in 0..width {
            let sx = ((x as f64 * ifx).floor() as usize).min(src.width - 1);
            for ch in 0..c {
                out.set(y, x, ch, src.at(sy, sx, ch));
            }
        }
    }
    out
}

/// One source sample's share of one output sample (`DecimateAlpha`).
pub(crate) struct AreaTap {
    pub dst: usize,
    pub src: usize,
    pub alpha: f32,
}

/// `computeResizeAreaTab`: the fraction of each source cell covered by each output cell.
pub(crate) fn area_taps(src_len: usize, dst_len: usize, scale: f64) -> Vec<AreaTap> {
    let mut taps = Vec::new();
    for d in 0..dst_len {
        let fs1 = d as f64 * scale;
        let fs2 = fs1 + scale;
        let cell = scale.min(src_len as f64 - fs1);
        let mut s2 = fs2.floor() as usize;
        s2 = s2.min(src_len - 1);
        let s1 = (fs1.ceil() as usize).min(s2);
        if s1 as f64 - fs1 > 1e-3 {
            taps.push(AreaTap { dst: d, src: s1 - 1, alpha: ((s1 as f64 - fs1) / cell) as f32 });
        }
        for s in s1..s2 {
            taps.push(AreaTap { dst: d, src: s, alpha: (1.0 / cell) as f32 });
        }
        if fs2 - s2 as f64 > 1e-3 {
            let a = (fs2 - s2 as f64).min(1.0).min(cell) / cell;
            taps.push(AreaTap { dst: d, src: s2, alpha: a as f32 });
        }
    }
    taps
}

/// `INTER_AREA` shrinking: exact box averages for integer factors, fractional cell coverage otherwise.
fn resize_area_down(src: &Mat<u8>, width: usize, height: usize) -> Mat<u8> {
    let c = src.channels;
    let scale_x = 1.0 / (width as f64 / src.width as f64);
    let scale_y = 1.0 / (height as f64 / src.height as f64);
    let (isx, isy) = (scale_x.round_ties_even(), scale_y.round_ties_even());
    let mut out = Mat::new(width, height, c);
    if (scale_x - isx).abs() < f64::EPSILON && (scale_y - isy).abs() < f64::EPSILON {
        // integer factors (`resizeAreaFast`): integer sums; 2×2 rounds half up, the rest via float scale
        let (fx, fy) = (isx as usize, isy as usize);
        let area = (fx * fy) as i64;
        let scale = 1.0f32 / area as f32;
        for y in 0..height {
            for x in 0..width {
                for ch in 0..c {
                    let mut sum = 0i64;
                    for dy in 0..fy {
                        for dx in 0..fx {
                            sum += src.at(y * fy + dy, x * fx + dx, ch) as i64;
                        }
                    }
                    let v = if area == 4 { ((sum + 2) >> 2) as u8 } else { saturate_u8(sum as f32 * scale) };
                    out.set(y, x, ch, v);
                }
            }
        }
        return out;
    }
    // general factors (`resizeArea_`): float sums, row by row, in OpenCV's order
    let xt = area_taps(src.width, width, scale_x);
    let yt = area_taps(src.height, height, scale_y);
    let row_len = width * c;
    let mut buf = vec![0f32; row_len];
    let mut sum = vec![0f32; row_len];
    let mut prev_dy: Option<usize> = None;
    let flush = |out: &mut Mat<u8>, dy: usize, sum: &[f32]| {
        for (i, &v) in sum.iter().enumerate() {
            out.data[dy * row_len + i] = saturate_u8(v);
        }
    };
    for t in &yt {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let row = &src.data[t.src * src.width * c..(t.src + 1) * src.width * c];
        for xt in &xt {
            for ch in 0..c {
                buf[xt.dst * c + ch] += row[xt.src * c + ch] as f32 * xt.alpha;
            }
        }
        if prev_dy != Some(t.dst) {
            if let Some(p) = prev_dy {
                flush(&mut out, p, &sum);
            }
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s = t.alpha * b;
            }
            prev_dy = Some(t.dst);
        } else {
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s += t.alpha * b;
            }
        }
    }
    if let Some(p) = prev_dy {
        flush(&mut out, p, &sum);
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Remap, colour, threshold
// ---------------------------------------------------------------------------------------------------------

/// `cv2.remap(src, map_x, map_y, INTER_LINEAR)` for an 8-bit image: output pixel `i` samples `src` at
/// `(map_x[i], map_y[i])` bilinearly, pixels outside the image count as 0 (`BORDER_CONSTANT`).
///
/// OpenCV 5 (the reference build) interpolates with float weights at the exact coordinates; OpenCV 4's
/// generic path rounded the coordinates to 1/32 pixel first (up to a few grey levels apart on sharp edges).
pub fn remap_linear_u8(src: &Mat<u8>, map_x: &[f32], map_y: &[f32], width: usize, height: usize) -> Mat<u8> {
    assert_eq!(map_x.len(), width * height);
    assert_eq!(map_y.len(), width * height);
    let c = src.channels;
    let mut out = Mat::new(width, height, c);
    let fetch = |y: i64, x: i64, ch: usize| -> f32 {
        if (0..src.height as i64).contains(&y) && (0..src.width as i64).contains(&x) {
            src.at(y as usize, x as usize, ch) as f32
        } else {
            0.0
        }
    };
    for i in 0..width * height {
        let (fx, fy) = (map_x[i].floor(), map_y[i].floor());
        let (ax, ay) = (map_x[i] - fx, map_y[i] - fy);
        let (sx, sy) = (fx as i64, fy as i64);
        for ch in 0..c {
            let top = fetch(sy, sx, ch) * (1.0 - ax) + fetch(sy, sx + 1, ch) * ax;
            let bottom = fetch(sy + 1, sx, ch) * (1.0 - ax) + fetch(sy + 1, sx + 1, ch) * ax;
            out.data[i * c + ch] = saturate_u8(top * (1.0 - ay) + bottom * ay);
        }
    }
    out
}

/// `cv2.cvtColor(img, COLOR_RGB2GRAY)`: `0.299 R + 0.587 G + 0.114 B` in 15-bit fixed point (the
/// coefficients of OpenCV's vectorised 8-bit path).
pub fn rgb_to_gray(src: &Mat<u8>) -> Mat<u8> {
    assert_eq!(src.channels, 3, "rgb_to_gray takes RGB");
    const SHIFT: u32 = 15;
    const R: u32 = 9798;
    const G: u32 = 19235;
    const B: u32 = 3735;
    let data = src
        .data
        .chunks_exact(3)
        .map(|p| ((p[0] as u32 * R + p[1] as u32 * G + p[2] as u32 * B + (1 << (SHIFT - 1))) >> SHIFT) as u8)
        .collect();
    Mat { width: src.width, height: src.height, channels: 1, data }
}

/// Otsu's threshold of a one-channel 8-bit image as `cv2.threshold(.., THRESH_OTSU)` computes it: the grey
/// level maximising the between-class variance (first maximum, scanned in double precision).
pub fn otsu_threshold(src: &Mat<u8>) -> u8 {
    assert_eq!(src.channels, 1, "otsu_threshold takes one channel");
    let mut hist = [0u64; 256];
    for &v in &src.data {
        hist[v as usize] += 1;
    }
    let scale = 1.0 / src.data.len() as f64;
    let mu: f64 = hist.iter().enumerate().map(|(i, &h)| i as f64 * h as f64).sum::<f64>() * scale;
    let (mut mu1, mut q1) = (0.0f64, 0.0f64);
    let (mut max_sigma, mut max_val) = (0.0f64, 0u8);
    let eps = f32::EPSILON as f64;
    for (i, &h) in hist.iter().enumerate() {
        let p = h as f64 * scale;
        mu1 *= q1;
        q1 += p;
        let q2 = 1.0 - q1;
        if q1.min(q2) < eps || q1.max(q2) > 1.0 - eps {
            continue;
        }
        mu1 = (mu1 + i as f64 * p) / q1;
        let mu2 = (mu - q1 * mu1) / q2;
        let sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
        if sigma > max_sigma {
            max_sigma = sigma;
            max_val = i as u8;
        }
    }
    max_val
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-pixel row widened to 4: edge columns copy the edge pixel, inner ones blend with 11-bit weights
    /// (0.75/0.25 -> 1536/512) and the vertical pass's truncations: 63.75 -> 64, 191.25 -> 191.
    #[test]
    fn vectorised_linear_resize_by_hand() {
        let mut src = Mat::new(2, 1, 1);
        src.set(0, 1, 0, 255);
        assert_eq!(resize_linear_u8_vectorised(&src, 4, 1).data, vec![0, 64, 191, 255]);
        let grey = Mat { data: vec![77u8; 5 * 3 * 3], ..Mat::new(5, 3, 3) };
        assert!(resize_linear_u8_vectorised(&grey, 7, 11).data.iter().all(|&v| v == 77));
    }
}
