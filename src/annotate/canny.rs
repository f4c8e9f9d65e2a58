//! Canny edges as ControlNet makes them: `cv2.Canny(rgb_image, low, high)`.
//!
//! OpenCV's Canny on a colour image keeps, per pixel, the channel with the largest gradient; then the usual
//! steps: 3×3 Sobel (replicated border), L1 magnitude, non-maximum suppression along one of four directions,
//! hysteresis (8-connected) between the two thresholds.
use image::RgbImage;

use super::cv::Mat;
use super::{Detector, Preprocess};

/// Default thresholds of ControlNet's canny annotator (and A1111's sliders).
pub const DEFAULT_LOW: f64 = 100.0;
pub const DEFAULT_HIGH: f64 = 200.0;

pub struct Canny {
    pub low: f64,
    pub high: f64,
}

impl Detector for Canny {
    fn name(&self) -> &str {
        "canny"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        Ok(canny(&Mat::from_rgb(image), self.low, self.high).to_rgb())
    }
}

/// `tan(22.5°)` in 15-bit fixed point, OpenCV's sector test (`TG22`).
const CANNY_SHIFT: u32 = 15;
const TG22: i64 = 13573; // (0.4142135623730950488 * (1 << 15) + 0.5) as int

/// Where a pixel stands after non-maximum suppression.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Not a local maximum above `low`, or outside the image.
    No,
    /// A local maximum between `low` and `high`: an edge only if connected to a strong one.
    Weak,
    /// A local maximum above `high`, or a weak one reached from it.
    Edge,
}

/// `cv2.Canny(img, low, high)` (aperture 3, L1 gradient) on an 8-bit image of any channel count.
/// Returns one channel: 255 on edges, 0 elsewhere.
pub fn canny(img: &Mat<u8>, low: f64, high: f64) -> Mat<u8> {
    let (w, h, c) = (img.width, img.height, img.channels);
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // OpenCV compares integer magnitudes with the floored thresholds
    let (low, high) = (low.floor() as i64, high.floor() as i64);

    // 1. gradients: 3×3 Sobel with replicated border, per channel; keep the channel of largest |dx|+|dy|
    let px = |y: isize, x: isize, ch: usize| -> i64 {
        let y = y.clamp(0, h as isize - 1) as usize;
        let x = x.clamp(0, w as isize - 1) as usize;
        img.at(y, x, ch) as i64
    };
    let mut dx = vec![0i64; w * h];
    let mut dy = vec![0i64; w * h];
    // magnitudes with a one-pixel ring of zeros around the image, so neighbours need no bounds checks
    let mw = w + 2;
    let mut mag = vec![0i64; mw * (h + 2)];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut best = (-1i64, 0i64, 0i64);
            for ch in 0..c {
                let gx = px(y - 1, x + 1, ch) - px(y - 1, x - 1, ch)
                    + 2 * (px(y, x + 1, ch) - px(y, x - 1, ch))
                    + px(y + 1, x + 1, ch)
                    - px(y + 1, x - 1, ch);
                let gy = px(y + 1, x - 1, ch) - px(y - 1, x - 1, ch)
                    + 2 * (px(y + 1, x, ch) - px(y - 1, x, ch))
                    + px(y + 1, x + 1, ch)
                    - px(y - 1, x + 1, ch);
                let m = gx.abs() + gy.abs();
                // the first channel wins ties
                if m > best.0 {
                    best = (m, gx, gy);
                }
            }
            let i = y as usize * w + x as usize;
            dx[i] = best.1;
            dy[i] = best.2;
            mag[(y as usize + 1) * mw + x as usize + 1] = best.0;
        }
    }

    // 2. non-maximum suppression: keep a pixel whose magnitude beats its two neighbours across the edge
    let mut mark = vec![Mark::No; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let at = |oy: isize, ox: isize| mag[((y as isize + 1 + oy) as usize) * mw + (x as isize + 1 + ox) as usize];
            let m = at(0, 0);
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x], dy[y * w + x]);
            let ax = xs.abs();
            let ay = ys.abs() << CANNY_SHIFT;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                // near-horizontal gradient: compare left/right (ties go to the left pixel)
                m > at(0, -1) && m >= at(0, 1)
            } else {
                let tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
                if ay > tg67x {
                    // near-vertical gradient: compare above/below
                    m > at(-1, 0) && m >= at(1, 0)
                } else {
                    // diagonal: the sign of dx·dy picks the diagonal
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > at(-1, -s) && m > at(1, s)
                }
            };
            if !is_max {
                continue;
            }
            if m > high {
                mark[y * w + x] = Mark::Edge;
                stack.push((y, x));
            } else {
                mark[y * w + x] = Mark::Weak;
            }
        }
    }

    // 3. hysteresis: weak maxima 8-connected to a strong one become edges
    while let Some((y, x)) = stack.pop() {
        for oy in -1isize..=1 {
            for ox in -1isize..=1 {
                let (ny, nx) = (y as isize + oy, x as isize + ox);
                if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                    continue;
                }
                let i = ny as usize * w + nx as usize;
                if mark[i] == Mark::Weak {
                    mark[i] = Mark::Edge;
                    stack.push((ny as usize, nx as usize));
                }
            }
        }
    }

    Mat {
        width: w,
        height: h,
        channels: 1,
        data: mark.iter().map(|&m| if m == Mark::Edge { 255 } else { 0 }).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{cases, load};

    /// Edge pixels (non-zero in the first channel).
    fn edges(img: &RgbImage) -> Vec<bool> {
        img.pixels().map(|p| p[0] > 127).collect()
    }

    /// Edges of `a` with an edge of `b` within one pixel (8-neighbourhood).
    fn matched(a: &[bool], b: &[bool], w: usize, h: usize) -> usize {
        (0..w * h)
            .filter(|&i| a[i])
            .filter(|&i| {
                let (x, y) = ((i % w) as isize, (i / w) as isize);
                (-1..=1).any(|dy| {
                    (-1..=1).any(|dx| {
                        let (nx, ny) = (x + dx, y + dy);
                        nx >= 0 && ny >= 0 && nx < w as isize && ny < h as isize && b[ny as usize * w + nx as usize]
                    })
                })
            })
            .count()
    }

    #[test]
    fn matches_cv2_canny() {
        // metric: edge F1 >= 0.95 with a 1-pixel tolerance, and the exact pixel match rate is reported
        // (and required to be >= 99.9%: the algorithm is integer arithmetic, reproduced step by step)
        for c in cases("canny") {
            let img = load(&c.input);
            let ours = Canny { low: c.f64("low"), high: c.f64("high") }.detect(&img).unwrap();
            let reference = load(&c.output);
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (a, b) = (edges(&ours), edges(&reference));
            let precision = matched(&a, &b, w, h) as f64 / a.iter().filter(|&&v| v).count().max(1) as f64;
            let recall = matched(&b, &a, w, h) as f64 / b.iter().filter(|&&v| v).count().max(1) as f64;
            let f1 = 2.0 * precision * recall / (precision + recall).max(1e-12);
            let exact = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
            eprintln!(
                "{}: F1(1px) {f1:.4}, exact pixel match {:.3}%, edges ours {} ref {}",
                c.output,
                exact * 100.0,
                a.iter().filter(|&&v| v).count(),
                b.iter().filter(|&&v| v).count()
            );
            assert!(f1 >= 0.95, "{}: F1 {f1}", c.output);
            assert!(exact >= 0.999, "{}: exact match {exact}", c.output);
        }
    }

    #[test]
    fn swapped_thresholds_are_reordered() {
        let img = Mat::from_rgb(&load("input_square.png"));
        assert_eq!(canny(&img, 200.0, 100.0), canny(&img, 100.0, 200.0));
    }

    #[test]
    fn flat_image_has_no_edges() {
        let img = Mat { width: 5, height: 4, channels: 3, data: vec![9u8; 60] };
        assert!(canny(&img, 1.0, 2.0).data.iter().all(|&v| v == 0));
    }
}
