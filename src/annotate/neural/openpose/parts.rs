//! Hands and faces from a found body: controlnet_aux's `handDetect` / `faceDetect` boxes (after OpenPose's
//! `handDetector.cpp`), the hand net at four scales (`Hand.__call__`) and the face net (`Face.__call__`,
//! `compute_peaks_from_heatmaps`), each point back in the image.
use super::body::{image_tensor, JOINTS, PAD_VALUE, STRIDE};
use super::maps::{gaussian_filter, label, net_planes_to_image, pad_right_down, smart_resize_u8, Plane};
use crate::annotate::cv::{gaussian_blur_u8, Mat};
use crate::annotate::neural::nn;
use crate::Result;

/// Joint indices (COCO-18) of the arms and the head.
const RIGHT_ARM: [usize; 3] = [2, 3, 4];
const LEFT_ARM: [usize; 3] = [5, 6, 7];
const NOSE: usize = 0;
/// Eyes and ears, in `faceDetect`'s order, with the box half-width each implies (× its distance to the nose).
const FACE_POINTS: [(usize, f64); 4] = [(14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)];
/// The hand box centre lies this far beyond the wrist, as a share of the elbow → wrist vector.
const RATIO_WRIST_ELBOW: f64 = 0.33;
/// Boxes smaller than this (pixels) are skipped.
const MIN_BOX: f64 = 20.0;
/// The hand net runs at these multiples of [`HAND_BOX`] on a σ 0.8 blurred crop; the maps are averaged at
/// [`HAND_MAP`] pixels.
const HAND_SCALES: [f64; 4] = [0.5, 1.0, 1.5, 2.0];
const HAND_BOX: f64 = 368.0;
const HAND_BLUR: f64 = 0.8;
const HAND_MAP: usize = 128;
const HAND_POINTS: usize = 21;
const HAND_THRESHOLD: f64 = 0.05;
/// The face net's input side, and its point threshold (on the unblurred map).
const FACE_INPUT: usize = 384;
const FACE_THRESHOLD: f32 = 0.05;

/// A square box in the image: top-left corner and side, pixels (`int` of upstream's floats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Box {
    pub x: usize,
    pub y: usize,
    pub side: usize,
}

/// Clips a square box at `(x, y)` of side `side` to the image as upstream does, or `None` if under 20 px.
/// `reach` is how far the box must fit (the hand's whole side; the face checks only half of its side).
fn clip(x: f64, y: f64, side: f64, reach: f64, (w, h): (usize, usize)) -> Option<Box> {
    let (x, y) = (x.max(0.0), y.max(0.0));
    let side_x = if x + reach > w as f64 { w as f64 - x } else { side };
    let side_y = if y + reach > h as f64 { h as f64 - y } else { side };
    let side = side_x.min(side_y);
    (side >= MIN_BOX).then_some(Box { x: x as usize, y: y as usize, side: side as usize })
}

/// `handDetect`: a box per arm with shoulder, elbow and wrist, left first; `true` marks the left hand.
pub fn hand_boxes(joints: &[Option<(f64, f64)>; JOINTS], size: (usize, usize)) -> Vec<(Box, bool)> {
    let mut boxes = Vec::new();
    for (arm, is_left) in [(LEFT_ARM, true), (RIGHT_ARM, false)] {
        let [Some((x1, y1)), Some((x2, y2)), Some((x3, y3))] = arm.map(|j| joints[j]) else { continue };
        let x = x3 + RATIO_WRIST_ELBOW * (x3 - x2);
        let y = y3 + RATIO_WRIST_ELBOW * (y3 - y2);
        let wrist_elbow = ((x3 - x2).powi(2) + (y3 - y2).powi(2)).sqrt();
        let elbow_shoulder = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt();
        let side = 1.5 * wrist_elbow.max(0.9 * elbow_shoulder);
        if let Some(b) = clip(x - side / 2.0, y - side / 2.0, side, side, size) {
            boxes.push((b, is_left));
        }
    }
    boxes
}

/// `faceDetect`: a box round the nose, as wide as the farthest eye (×3) or ear (×1.5) demands.
pub fn face_box(joints: &[Option<(f64, f64)>; JOINTS], size: (usize, usize)) -> Option<Box> {
    let (x0, y0) = joints[NOSE]?;
    if FACE_POINTS.iter().all(|&(j, _)| joints[j].is_none()) {
        return None;
    }
    let mut half = 0.0f64;
    for &(j, factor) in &FACE_POINTS {
        if let Some((x1, y1)) = joints[j] {
            half = half.max((x0 - x1).abs().max((y0 - y1).abs()) * factor);
        }
    }
    clip(x0 - half, y0 - half, half * 2.0, half, size)
}

/// The crop of `img` under `b` (numpy slicing: clipped at the image's edges).
pub fn crop(img: &Mat<u8>, b: Box) -> Mat<u8> {
    let (x1, y1) = ((b.x + b.side).min(img.width), (b.y + b.side).min(img.height));
    let (w, h, c) = (x1.saturating_sub(b.x), y1.saturating_sub(b.y), img.channels);
    let mut out = Mat::new(w, h, c);
    for y in 0..h {
        let src = &img.data[((b.y + y) * img.width + b.x) * c..((b.y + y) * img.width + x1) * c];
        out.data[y * w * c..(y + 1) * w * c].copy_from_slice(src);
    }
    out
}

/// `Hand.__call__` on a crop (BGR): the 21 points in crop pixels, `(0, 0)` where a map has nothing above the
/// threshold. `net` maps the input tensor to the 22 heatmaps.
pub fn hand_points(
    crop: &Mat<u8>,
    net: &dyn Fn(&candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<Vec<(usize, usize)>> {
    let blurred = gaussian_blur_u8(crop, HAND_BLUR);
    let mut avg = vec![Plane { width: HAND_MAP, height: HAND_MAP, data: vec![0f64; HAND_MAP * HAND_MAP] }; 22];
    for scale in HAND_SCALES {
        let side = (scale * HAND_BOX) as usize;
        let resized = smart_resize_u8(&blurred, side, side);
        let padded = pad_right_down(&resized, STRIDE, PAD_VALUE);
        let out = net(&image_tensor(&padded)?)?;
        let (_, c, h, w) = out.dims4()?;
        let data = out.flatten_all()?.to_vec1::<f32>()?;
        let planes = net_planes_to_image(&data, (c, h, w), STRIDE, (side, side), (HAND_MAP, HAND_MAP));
        for (acc, p) in avg.iter_mut().zip(planes) {
            for (a, v) in acc.data.iter_mut().zip(p.data) {
                *a += f64::from(v / HAND_SCALES.len() as f32);
            }
        }
    }
    Ok(avg[..HAND_POINTS]
        .iter()
        .map(|map| {
            let blurred = gaussian_filter(map, 3.0);
            let mask: Vec<bool> = blurred.data.iter().map(|&v| v > HAND_THRESHOLD).collect();
            if !mask.iter().any(|&m| m) {
                return (0, 0);
            }
            // the component with the largest mass of the unblurred map; only its pixels stay
            let (labels, count) = label(&mask, HAND_MAP, HAND_MAP);
            let mut mass = vec![0f64; count + 1];
            for (&l, &v) in labels.iter().zip(&map.data) {
                mass[l] += v;
            }
            let best = (1..=count).fold(1, |b, l| if mass[l] > mass[b] { l } else { b });
            let kept = map.data.iter().zip(&labels).map(|(&v, &l)| if l == best { v } else { 0.0 });
            let (mut at, mut max) = (0, f64::NEG_INFINITY);
            for (i, v) in kept.enumerate() {
                if v > max {
                    (at, max) = (i, v);
                }
            }
            let (y, x) = (at / HAND_MAP, at % HAND_MAP);
            let to_crop = |v: usize, side: usize| (v as f64 * side as f64 / HAND_MAP as f64) as usize;
            (to_crop(x, crop.width), to_crop(y, crop.height))
        })
        .collect())
}

/// `Face.__call__` and `compute_peaks_from_heatmaps` on a crop (BGR): per heatmap (all 71, background
/// included) with a value above the threshold, its first maximum, in crop pixels.
pub fn face_points(
    crop: &Mat<u8>,
    net: &dyn Fn(&candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<Vec<(usize, usize)>> {
    let resized = smart_resize_u8(crop, FACE_INPUT, FACE_INPUT);
    let out = net(&image_tensor(&resized)?)?;
    let maps = nn::interpolate_bilinear_corners(&out, crop.height, crop.width)?;
    let (_, c, h, w) = maps.dims4()?;
    let data = maps.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..c)
        .filter_map(|i| {
            let plane = &data[i * h * w..(i + 1) * h * w];
            let mut best: Option<(usize, f32)> = None;
            for (p, &v) in plane.iter().enumerate() {
                if v > FACE_THRESHOLD && best.is_none_or(|(_, m)| v > m) {
                    best = Some((p, v));
                }
            }
            best.map(|(p, _)| (p % w, p / w))
        })
        .collect())
}

/// A part point in the detect image, normalised as upstream stores it (float32): a coordinate of 0 in the crop
/// means "not found" and becomes -1 before the division.
pub fn normalised(p: (usize, usize), b: Box, (w, h): (usize, usize)) -> (f32, f32) {
    let axis = |v: usize, offset: usize, side: usize| {
        let v = if (v as f32) < 1e-6 { -1.0 } else { v as f32 + offset as f32 };
        v / side as f32
    };
    (axis(p.0, b.x, w), axis(p.1, b.y, h))
}
