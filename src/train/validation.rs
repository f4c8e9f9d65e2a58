//! What a run shows while it trains: sample images for fixed (condition, prompt) pairs as one grid per
//! validation, the loss log (`loss.jsonl`) and its curve (`loss.png`, drawn here with `image`), and a
//! control-fidelity score for edge conditions.
//!
//! Validation generates as diffusers' `log_validation` does: `StableDiffusionControlNetPipeline` with UniPC,
//! 20 steps by default, the run's seed, guidance 7.5. The condition is brought to the training resolution with
//! the training transform (resize + centre crop).
//!
//! Fidelity (canny conditions): the generated image is annotated again with the canny detector (OpenCV's
//! `Canny(100, 200)` as ControlNet's annotator), and its edges are matched against the condition's (pixels >
//! 127) within [`EDGE_TOLERANCE_PX`] pixels (Chebyshev distance), as edge benchmarks match boundaries:
//! precision = generated edge pixels near a condition edge / generated edge pixels, recall = condition edge
//! pixels near a generated edge / condition edge pixels, F1 their harmonic mean. A ControlNet that follows its
//! condition scores near 1; one that ignores it scores near the chance overlap.
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{GrayImage, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::annotate::canny::{canny, DEFAULT_HIGH, DEFAULT_LOW};
use crate::annotate::cv::Mat;
use crate::{Error, Result};

/// Edge pixels this close (in pixels, Chebyshev distance) count as matching.
pub const EDGE_TOLERANCE_PX: usize = 2;
/// A condition pixel above this grey value is an edge.
const EDGE_THRESHOLD: u8 = 127;
/// Size of the loss curve picture and its margin.
const CURVE_SIZE: (u32, u32) = (640, 360);
const CURVE_MARGIN: u32 = 24;
/// Weight of the newest loss in the curve's smoothed line (an exponential moving average).
const CURVE_SMOOTHING: f32 = 0.1;

/// One line of `loss.jsonl`: an optimizer update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossRecord {
    pub step: u64,
    /// Mean loss of the update's micro-batches.
    pub loss: f32,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub epoch: u64,
}

/// Edge agreement between a generated image and its condition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// One line of `validation.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidationRecord {
    pub step: u64,
    pub condition: PathBuf,
    pub prompt: String,
    /// Per generated image, when the fidelity score was asked for.
    pub fidelity: Vec<Fidelity>,
}

/// Appends one JSON line to `path`.
pub fn append_jsonl(path: &Path, record: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(record).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// The records of `loss.jsonl` (none if the file does not exist).
pub fn read_loss_log(path: &Path) -> Result<Vec<LossRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::config(path, e)))
        .collect()
}

/// Drops the lines of a JSONL log whose `step` is after `step` (what a resumed run redoes).
pub fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| Error::io(path, e))
}

/// The loss curve: raw losses in light grey, their moving average in blue, on a white canvas with a frame
/// (x: steps from the first to the last record, y: from 0 to the largest loss).
pub fn loss_curve(records: &[LossRecord]) -> RgbImage {
    let (w, h) = CURVE_SIZE;
    let m = CURVE_MARGIN;
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let frame = Rgb([0, 0, 0]);
    for x in m..=w - m {
        img.put_pixel(x, h - m, frame);
        img.put_pixel(x, m, Rgb([220, 220, 220]));
    }
    for y in m..=h - m {
        img.put_pixel(m, y, frame);
    }
    let losses: Vec<f32> = records.iter().map(|r| r.loss).filter(|l| l.is_finite()).collect();
    if losses.len() < 2 {
        return img;
    }
    let top = losses.iter().cloned().fold(f32::MIN, f32::max).max(f32::MIN_POSITIVE);
    let (plot_w, plot_h) = ((w - 2 * m) as f32, (h - 2 * m) as f32);
    let point = |i: usize, v: f32| -> (f32, f32) {
        let x = m as f32 + plot_w * i as f32 / (losses.len() - 1) as f32;
        let y = (h - m) as f32 - plot_h * (v / top).clamp(0.0, 1.0);
        (x, y)
    };
    let mut smooth = Vec::with_capacity(losses.len());
    let mut ema = losses[0];
    for &l in &losses {
        ema += CURVE_SMOOTHING * (l - ema);
        smooth.push(ema);
    }
    for (series, colour) in [(&losses, Rgb([190, 190, 190])), (&smooth, Rgb([30, 80, 220]))] {
        for i in 1..series.len() {
            draw_line(&mut img, point(i - 1, series[i - 1]), point(i, series[i]), colour);
        }
    }
    img
}

/// A straight line, one pixel wide, by stepping along its longer axis.
fn draw_line(img: &mut RgbImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), colour: Rgb<u8>) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
    for k in 0..=n {
        let t = k as f32 / n as f32;
        let (x, y) = ((x0 + t * (x1 - x0)).round(), (y0 + t * (y1 - y0)).round());
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// Rows of images side by side (cells take the first image's size; others are placed at their top left).
pub fn image_grid(rows: &[Vec<RgbImage>]) -> RgbImage {
    let (cw, ch) = rows.iter().flatten().next().map(|i| i.dimensions()).unwrap_or((1, 1));
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let mut grid = RgbImage::new(cw * cols, ch * rows.len().max(1) as u32);
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            image::imageops::overlay(&mut grid, img, i64::from(c as u32 * cw), i64::from(r as u32 * ch));
        }
    }
    grid
}

/// The edges of an edge-map condition: pixels whose brightest channel is above 127.
pub fn condition_edges(condition: &RgbImage) -> GrayImage {
    GrayImage::from_fn(condition.width(), condition.height(), |x, y| {
        let v = condition.get_pixel(x, y).0.into_iter().max().unwrap_or(0);
        image::Luma([if v > EDGE_THRESHOLD { 255 } else { 0 }])
    })
}

/// The canny edges of a generated image (OpenCV's `Canny(img, 100, 200)` as ControlNet's annotator).
pub fn canny_edges(image: &RgbImage) -> GrayImage {
    let edges = canny(&Mat::from_rgb(image), DEFAULT_LOW, DEFAULT_HIGH);
    GrayImage::from_raw(edges.width as u32, edges.height as u32, edges.data).expect("canny returns one channel")
}

/// Edge precision, recall and F1 of `found` against `reference` (same size), matching within `tolerance`
/// pixels. Two empty edge maps agree perfectly (F1 = 1); one empty against a non-empty one scores 0.
pub fn edge_f1(found: &GrayImage, reference: &GrayImage, tolerance: usize) -> Fidelity {
    let near = |map: &GrayImage, x: u32, y: u32| -> bool {
        let t = tolerance as i64;
        let (w, h) = (map.width() as i64, map.height() as i64);
        for dy in -t..=t {
            for dx in -t..=t {
                let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                if xx >= 0 && yy >= 0 && xx < w && yy < h && map.get_pixel(xx as u32, yy as u32).0[0] > 0 {
                    return true;
                }
            }
        }
        false
    };
    let share = |a: &GrayImage, b: &GrayImage| -> Option<f64> {
        let (mut total, mut hit) = (0usize, 0usize);
        for (x, y, p) in a.enumerate_pixels() {
            if p.0[0] > 0 {
                total += 1;
                hit += usize::from(near(b, x, y));
            }
        }
        (total > 0).then(|| hit as f64 / total as f64)
    };
    match (share(found, reference), share(reference, found)) {
        (None, None) => Fidelity { precision: 1.0, recall: 1.0, f1: 1.0 },
        (precision, recall) => {
            let (p, r) = (precision.unwrap_or(0.0), recall.unwrap_or(0.0));
            let f1 = if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
            Fidelity { precision: p, recall: r, f1 }
        }
    }
}

/// The canny fidelity of a generated image to its edge condition.
pub fn canny_fidelity(generated: &RgbImage, condition: &RgbImage) -> Fidelity {
    edge_f1(&canny_edges(generated), &condition_edges(condition), EDGE_TOLERANCE_PX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(size: u32, r: f32, cx: f32) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - size as f32 / 2.0).powi(2)).sqrt();
            if (d - r).abs() < 1.0 {
                Rgb([255; 3])
            } else {
                Rgb([0; 3])
            }
        })
    }

    #[test]
    fn fidelity_is_high_for_the_same_shape_and_low_for_another() {
        let cond = ring(64, 20.0, 32.0);
        // A picture of a filled disc whose border is the condition's ring.
        let disc = RgbImage::from_fn(64, 64, |x, y| {
            let d = ((x as f32 - 32.0).powi(2) + (y as f32 - 32.0).powi(2)).sqrt();
            if d < 20.0 {
                Rgb([200, 40, 40])
            } else {
                Rgb([20, 20, 120])
            }
        });
        let good = canny_fidelity(&disc, &cond);
        assert!(good.f1 > 0.9, "{good:?}");
        let elsewhere = ring(64, 8.0, 14.0);
        let bad = edge_f1(&condition_edges(&elsewhere), &condition_edges(&cond), EDGE_TOLERANCE_PX);
        assert!(bad.f1 < 0.2, "{bad:?}");
        let flat = RgbImage::from_pixel(64, 64, Rgb([90, 90, 90]));
        assert_eq!(canny_fidelity(&flat, &cond).f1, 0.0);
        assert_eq!(canny_fidelity(&flat, &flat).f1, 1.0);
    }

    #[test]
    fn loss_log_round_trips_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.jsonl");
        for step in 1..=5 {
            let r = LossRecord { step, loss: 1.0 / step as f32, lr: 1e-5, grad_norm: 0.5, epoch: 0 };
            append_jsonl(&path, &r).unwrap();
        }
        truncate_log(&path, 3).unwrap();
        let records = read_loss_log(&path).unwrap();
        assert_eq!(records.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3]);
        let img = loss_curve(&records);
        assert_eq!(img.dimensions(), CURVE_SIZE);
        // The smoothed line is drawn: some blue pixels exist.
        assert!(img.pixels().any(|p| p.0 == [30, 80, 220]));
    }

    #[test]
    fn grid_places_cells() {
        let a = RgbImage::from_pixel(4, 3, Rgb([255, 0, 0]));
        let b = RgbImage::from_pixel(4, 3, Rgb([0, 255, 0]));
        let g = image_grid(&[vec![a.clone(), b.clone()], vec![b, a]]);
        assert_eq!(g.dimensions(), (8, 6));
        assert_eq!(g.get_pixel(5, 1).0, [0, 255, 0]);
        assert_eq!(g.get_pixel(5, 4).0, [255, 0, 0]);
    }
}
