//! The person detector: YOLOX-L as DWPose's ONNX export runs it (sd-webui-controlnet's `cv_ox_det.py`, the
//! code of A1111's and ComfyUI's DWPose preprocessors).
//!
//! 1. letterbox: the image (BGR, as controlnet_aux hands it over) scaled into 640×640 keeping its aspect
//!    (bilinear, OpenCV's exact 8-bit arithmetic: the random test nets magnify a level's difference), the rest
//!    grey 114, raw 0..255 values, no normalisation;
//! 2. the net: one row per cell of the stride-8, 16 and 32 grids (6400 + 1600 + 400), each `[cx, cy, w, h]`
//!    offsets, objectness and 80 class probabilities;
//! 3. decode: centres `(offset + cell) · stride`, sides `exp(raw) · stride`, back to image pixels;
//! 4. per class, boxes scoring above 0.1 (objectness × class) go through NMS at IoU 0.45; people are the
//!    class-0 boxes left scoring above 0.3.
//!
//! Arithmetic is float32 where upstream's numpy arrays are (the net's output and everything decoded from it).
use super::onnx::OnnxNet;
use crate::annotate::cv::{resize_linear_u8_vectorised, Mat};
use crate::{Error, Result};

/// Side of the square net input.
pub const INPUT_SIZE: usize = 640;
/// Grey of the letterbox padding.
pub const PAD_VALUE: f32 = 114.0;
/// Cell sizes of the three output grids, in net-input pixels.
pub const STRIDES: [usize; 3] = [8, 16, 32];
/// COCO classes of the detector.
pub const CLASSES: usize = 80;
/// Values per output row: box (4), objectness, classes.
pub const ROW: usize = 5 + CLASSES;
/// Output rows: one per cell of every grid.
pub const ROWS: usize = (INPUT_SIZE / 8) * (INPUT_SIZE / 8) + (INPUT_SIZE / 16) * (INPUT_SIZE / 16) + 400;
/// Boxes scoring at most this never reach NMS (`multiclass_nms`'s `score_thr`).
pub const CANDIDATE_SCORE: f32 = 0.1;
/// Overlap above which NMS drops the lower-scoring box.
pub const NMS_IOU: f32 = 0.45;
/// People are the boxes left scoring above this.
pub const PERSON_SCORE: f64 = 0.3;
/// COCO's class "person".
pub const PERSON_CLASS: usize = 0;

/// The letterboxed net input (1×3×640×640, channels in the image's order) and the scale applied to the image.
pub fn letterbox(bgr: &Mat<u8>) -> Result<(Vec<f32>, f64)> {
    let (w, h) = (bgr.width, bgr.height);
    let ratio = (INPUT_SIZE as f64 / h as f64).min(INPUT_SIZE as f64 / w as f64);
    let (rw, rh) = ((w as f64 * ratio) as usize, (h as f64 * ratio) as usize);
    if rw == 0 || rh == 0 {
        return Err(Error::Invalid(format!(
            "dwpose: a {w}x{h} image is too thin for the person detector's {INPUT_SIZE}-px input"
        )));
    }
    let resized = resize_linear_u8_vectorised(bgr, rw, rh);
    let plane = INPUT_SIZE * INPUT_SIZE;
    let mut input = vec![PAD_VALUE; 3 * plane];
    for y in 0..rh {
        for x in 0..rw {
            for c in 0..3 {
                input[c * plane + y * INPUT_SIZE + x] = f32::from(resized.at(y, x, c));
            }
        }
    }
    Ok((input, ratio))
}

/// One detected box in image pixels, `[x1, y1, x2, y2]`, and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub bbox: [f64; 4],
    pub score: f64,
}

/// The person boxes of `bgr`, best first: `None` when no box of any class scores above [`CANDIDATE_SCORE`]
/// (upstream then finds nobody), else the class-0 boxes above [`PERSON_SCORE`] (possibly none: the pose model
/// then runs on the whole image).
pub fn person_boxes(net: &OnnxNet, bgr: &Mat<u8>) -> Result<Option<Vec<Detection>>> {
    let (input, ratio) = letterbox(bgr)?;
    let out = net.run(input)?.swap_remove(0);
    Ok(boxes_from_output(&out.data, ratio))
}

/// Steps 3 and 4 on the net's raw `ROWS × ROW` output.
pub fn boxes_from_output(raw: &[f32], ratio: f64) -> Option<Vec<Detection>> {
    let boxes = decode(raw, ratio as f32);
    // 4. class by class: candidates, NMS; the people are class 0's survivors
    let mut any = false;
    let mut people = Vec::new();
    for class in 0..CLASSES {
        let candidates: Vec<usize> =
            (0..ROWS).filter(|&i| raw[i * ROW + 4] * raw[i * ROW + 5 + class] > CANDIDATE_SCORE).collect();
        if candidates.is_empty() {
            continue;
        }
        any = true;
        if class != PERSON_CLASS {
            continue;
        }
        let scores: Vec<f32> = candidates.iter().map(|&i| raw[i * ROW + 4] * raw[i * ROW + 5 + class]).collect();
        let cand_boxes: Vec<[f32; 4]> = candidates.iter().map(|&i| boxes[i]).collect();
        for k in nms(&cand_boxes, &scores, NMS_IOU) {
            let score = f64::from(scores[k]);
            if score > PERSON_SCORE {
                people.push(Detection { bbox: cand_boxes[k].map(f64::from), score });
            }
        }
    }
    any.then_some(people)
}

/// Step 3: every row's box as `[x1, y1, x2, y2]` in image pixels.
fn decode(raw: &[f32], ratio: f32) -> Vec<[f32; 4]> {
    let mut boxes = Vec::with_capacity(ROWS);
    for stride in STRIDES {
        let side = INPUT_SIZE / stride;
        let s = stride as f64;
        for gy in 0..side {
            for gx in 0..side {
                let r = &raw[boxes.len() * ROW..];
                // float32 values, float64 arithmetic with the integer grid, stored back as float32
                let cx = ((f64::from(r[0]) + gx as f64) * s) as f32;
                let cy = ((f64::from(r[1]) + gy as f64) * s) as f32;
                let w = (f64::from(r[2].exp()) * s) as f32;
                let h = (f64::from(r[3].exp()) * s) as f32;
                boxes.push([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v / ratio));
            }
        }
    }
    boxes
}

/// Greedy NMS (`cv_ox_det.nms`): highest score first, dropping boxes that overlap a kept one by more than
/// `iou` (areas with the `+ 1` pixel convention). The kept indices, best first.
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou: f32) -> Vec<usize> {
    // numpy's `argsort()[::-1]`: descending; equal scores keep the later index first
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    order.reverse();
    let area = |b: &[f32; 4]| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
    let mut keep = Vec::new();
    while let Some((&i, rest)) = order.split_first() {
        keep.push(i);
        let a = &boxes[i];
        order = rest
            .iter()
            .copied()
            .filter(|&j| {
                let b = &boxes[j];
                let w = (a[2].min(b[2]) - a[0].max(b[0]) + 1.0).max(0.0);
                let h = (a[3].min(b[3]) - a[1].max(b[1]) + 1.0).max(0.0);
                let inter = w * h;
                inter / (area(a) + area(b) - inter) <= iou
            })
            .collect();
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_the_three_grids() {
        assert_eq!(ROWS, 8400);
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 4.0]];
        let scores = [0.5, 0.9, 0.4, 0.3];
        // box 1 suppresses 0 (IoU 0.69); box 3 overlaps box 1 by 40 / 136 = 0.29 and stays
        assert_eq!(nms(&boxes, &scores, 0.45), vec![1, 2, 3]);
    }

    #[test]
    fn decode_places_boxes_on_the_grid() {
        let mut raw = vec![0f32; ROWS * ROW];
        // the second cell of the stride-8 grid: centre (1 + 0.5) * 8 = 12, sides e^0 * 8 = 8
        raw[ROW..ROW + 4].copy_from_slice(&[0.5, 0.0, 0.0, 0.0]);
        let boxes = decode(&raw, 0.5);
        assert_eq!(boxes[1], [16.0, -8.0, 32.0, 8.0]);
        // the first cell of the stride-32 grid
        let first32 = 6400 + 1600;
        assert_eq!(boxes[first32], [-32.0, -32.0, 32.0, 32.0]);
    }

    #[test]
    fn thresholds_separate_nobody_from_no_person_above_0_3() {
        let mut raw = vec![0f32; ROWS * ROW];
        assert_eq!(boxes_from_output(&raw, 1.0), None);
        // one cell: objectness 0.5, person 0.5 -> 0.25: a candidate, not a person
        raw[4] = 0.5;
        raw[5] = 0.5;
        assert_eq!(boxes_from_output(&raw, 1.0), Some(vec![]));
        raw[5] = 0.9;
        let people = boxes_from_output(&raw, 1.0).unwrap();
        assert_eq!(people.len(), 1);
        assert!((people[0].score - 0.45).abs() < 1e-6);
    }
}
