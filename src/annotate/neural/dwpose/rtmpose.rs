//! The whole-body pose model: RTMPose-l (DWPose's distilled `dw-ll_ucoco_384`) top-down on each person box,
//! as sd-webui-controlnet's `cv_ox_pose.py` runs the ONNX export (mmpose's pipeline re-done in numpy).
//!
//! 1. the box → centre and scale (sides × 1.25), the scale widened to the input's 3:4 aspect;
//! 2. the affine crop of that region to 288×384 (bilinear, black outside the image), normalised with
//!    ImageNet's mean and std (applied in the image's channel order, BGR here, as upstream does);
//! 3. the net: per keypoint, SimCC class scores along x (576 bins) and y (768 bins), 2 bins per pixel;
//! 4. decode: the best bin on each axis / 2, scaled back to the box; the score is the smaller of the two
//!    maxima (a point with a score ≤ 0 is put at bin -1).
use super::onnx::{OnnxNet, Output};
use crate::annotate::cv::Mat;
use crate::Result;

/// Net input width and height.
pub const INPUT_W: usize = 288;
pub const INPUT_H: usize = 384;
/// COCO-WholeBody keypoints: 17 body, 6 feet, 68 face, 21 + 21 hands.
pub const KEYPOINTS: usize = 133;
/// SimCC bins per input pixel.
pub const SIMCC_SPLIT_RATIO: f32 = 2.0;
/// The crop is the box grown by this factor (`bbox_xyxy2cs(padding=1.25)`).
pub const BOX_PADDING: f64 = 1.25;
/// ImageNet mean and std (RGB order, applied to the channels as they come).
pub const MEAN: [f64; 3] = [123.675, 116.28, 103.53];
pub const STD: [f64; 3] = [58.395, 57.12, 57.375];

/// Where a box's crop sits in the image: its centre and (aspect-corrected) size, pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropRegion {
    pub center: [f64; 2],
    pub scale: [f64; 2],
}

impl CropRegion {
    /// Step 1 for the box `[x1, y1, x2, y2]`.
    pub fn from_box(b: [f64; 4]) -> Self {
        let center = [(b[0] + b[2]) * 0.5, (b[1] + b[3]) * 0.5];
        let (w, h) = ((b[2] - b[0]) * BOX_PADDING, (b[3] - b[1]) * BOX_PADDING);
        let aspect = INPUT_W as f64 / INPUT_H as f64;
        let scale = if w > h * aspect { [w, w / aspect] } else { [h * aspect, h] };
        Self { center, scale }
    }

    /// The map from a net-input pixel to the image, `[[a, b, c], [d, e, f]]` (x' = a x + b y + c): the inverse of
    /// `get_warp_matrix`'s transform, solved from the same three float32 point pairs.
    pub fn input_to_image(&self) -> [[f64; 3]; 2] {
        // upstream keeps the points in float32 arrays
        let f = |v: f64| f64::from(v as f32);
        let src0 = [f(self.center[0]), f(self.center[1])];
        let src1 = [f(self.center[0] + 0.0), f(self.center[1] + -0.5 * self.scale[0])];
        let src2 = third_point(src0, src1);
        let (dw, dh) = (INPUT_W as f64, INPUT_H as f64);
        let dst0 = [dw * 0.5, dh * 0.5];
        let dst1 = [dw * 0.5, dh * 0.5 - dw * 0.5];
        let dst2 = third_point(dst0, dst1);
        affine_from_points([dst0, dst1, dst2], [src0, src1, src2])
    }
}

/// `_get_3rd_point`: `b` plus `a - b` turned 90° anticlockwise, in float32.
fn third_point(a: [f64; 2], b: [f64; 2]) -> [f64; 2] {
    let d = [(a[0] as f32 - b[0] as f32), (a[1] as f32 - b[1] as f32)];
    [f64::from(b[0] as f32 + -d[1]), f64::from(b[1] as f32 + d[0])]
}

/// The affine map taking the points `from` to `to` (Cramer's rule on the 3×3 system of each output row).
fn affine_from_points(from: [[f64; 2]; 3], to: [[f64; 2]; 3]) -> [[f64; 3]; 2] {
    let det3 = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let a = [[from[0][0], from[0][1], 1.0], [from[1][0], from[1][1], 1.0], [from[2][0], from[2][1], 1.0]];
    let d = det3(a);
    let mut out = [[0.0; 3]; 2];
    for (row, o) in out.iter_mut().enumerate() {
        for (col, v) in o.iter_mut().enumerate() {
            let mut m = a;
            for (r, line) in m.iter_mut().enumerate() {
                line[col] = to[r][row];
            }
            *v = det3(m) / d;
        }
    }
    out
}

/// Step 2: the normalised net input (1×3×384×288) of `region` of `bgr`.
pub fn crop_input(bgr: &Mat<u8>, region: &CropRegion) -> Vec<f32> {
    let crop = warp_linear(bgr, region.input_to_image());
    let plane = INPUT_W * INPUT_H;
    let mut input = vec![0f32; 3 * plane];
    for (i, px) in crop.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            input[c * plane + i] = ((f64::from(px[c]) - MEAN[c]) / STD[c]) as f32;
        }
    }
    input
}

/// `cv2.warpAffine(img, M, (288, 384), INTER_LINEAR)` given the inverse map: each output pixel samples the image
/// bilinearly at its mapped position, zero outside, rounded to the nearest level (OpenCV 5's float path).
fn warp_linear(src: &Mat<u8>, m: [[f64; 3]; 2]) -> Mat<u8> {
    let mut out = Mat::new(INPUT_W, INPUT_H, 3);
    let fetch = |y: i64, x: i64, c: usize| -> f64 {
        if (0..src.height as i64).contains(&y) && (0..src.width as i64).contains(&x) {
            f64::from(src.at(y as usize, x as usize, c))
        } else {
            0.0
        }
    };
    for y in 0..INPUT_H {
        for x in 0..INPUT_W {
            let (xf, yf) = (x as f64, y as f64);
            let sx = m[0][0] * xf + m[0][1] * yf + m[0][2];
            let sy = m[1][0] * xf + m[1][1] * yf + m[1][2];
            let (fx, fy) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - fx, sy - fy);
            let (ix, iy) = (fx as i64, fy as i64);
            for c in 0..3 {
                let top = fetch(iy, ix, c) * (1.0 - ax) + fetch(iy, ix + 1, c) * ax;
                let bottom = fetch(iy + 1, ix, c) * (1.0 - ax) + fetch(iy + 1, ix + 1, c) * ax;
                let v = top * (1.0 - ay) + bottom * ay;
                out.set(y, x, c, v.round_ties_even().clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// The keypoints of one person, in image pixels, with their scores (COCO-WholeBody order).
#[derive(Debug, Clone, PartialEq)]
pub struct Keypoints133 {
    pub points: Vec<[f64; 2]>,
    pub scores: Vec<f32>,
}

/// Steps 1–4 on one box.
pub fn estimate(net: &OnnxNet, bgr: &Mat<u8>, bbox: [f64; 4]) -> Result<Keypoints133> {
    let region = CropRegion::from_box(bbox);
    let outputs = net.run(crop_input(bgr, &region))?;
    Ok(decode(&outputs[0], &outputs[1], &region))
}

/// Step 4 (`get_simcc_maximum`, then the rescale to the box).
pub fn decode(simcc_x: &Output, simcc_y: &Output, region: &CropRegion) -> Keypoints133 {
    let (wx, wy) = (INPUT_W * 2, INPUT_H * 2);
    let mut points = Vec::with_capacity(KEYPOINTS);
    let mut scores = Vec::with_capacity(KEYPOINTS);
    for k in 0..KEYPOINTS {
        let (x_loc, x_max) = argmax(&simcc_x.data[k * wx..(k + 1) * wx]);
        let (y_loc, y_max) = argmax(&simcc_y.data[k * wy..(k + 1) * wy]);
        let score = if x_max > y_max { y_max } else { x_max };
        let (lx, ly) = if score <= 0.0 { (-1.0f32, -1.0f32) } else { (x_loc as f32, y_loc as f32) };
        let input = [lx / SIMCC_SPLIT_RATIO, ly / SIMCC_SPLIT_RATIO];
        let size = [INPUT_W as f64, INPUT_H as f64];
        let point: [f64; 2] = std::array::from_fn(|i| {
            f64::from(input[i]) / size[i] * region.scale[i] + region.center[i] - region.scale[i] / 2.0
        });
        points.push(point);
        scores.push(score);
    }
    Keypoints133 { points, scores }
}

/// numpy's `argmax` and `amax`: the first largest value (a NaN wins, as numpy's does).
fn argmax(v: &[f32]) -> (usize, f32) {
    let mut best = (0, v[0]);
    for (i, &x) in v.iter().enumerate().skip(1) {
        if best.1.is_nan() {
            break;
        }
        if x > best.1 || x.is_nan() {
            best = (i, x);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_region_keeps_the_input_aspect() {
        // a tall box: height rules, width widened to 3:4
        let r = CropRegion::from_box([10.0, 20.0, 50.0, 220.0]);
        assert_eq!(r.center, [30.0, 120.0]);
        assert_eq!(r.scale, [187.5, 250.0]);
        // a wide box: width rules
        let r = CropRegion::from_box([0.0, 0.0, 300.0, 100.0]);
        assert_eq!(r.scale, [375.0, 500.0]);
    }

    #[test]
    fn input_to_image_maps_the_crop_onto_the_region() {
        let r = CropRegion { center: [100.0, 200.0], scale: [144.0, 192.0] };
        let m = r.input_to_image();
        let map = |x: f64, y: f64| (m[0][0] * x + m[0][1] * y + m[0][2], m[1][0] * x + m[1][1] * y + m[1][2]);
        let close = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9;
        // the input's centre is the region's, its corners the region's corners (half scale)
        assert!(close(map(144.0, 192.0), (100.0, 200.0)), "{:?}", map(144.0, 192.0));
        assert!(close(map(0.0, 0.0), (28.0, 104.0)), "{:?}", map(0.0, 0.0));
        assert!(close(map(288.0, 384.0), (172.0, 296.0)));
    }

    #[test]
    fn argmax_is_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), (1, 0.7));
        assert_eq!(argmax(&[-3.0]), (0, -3.0));
    }

    #[test]
    fn decode_scales_bins_back_to_the_box_and_hides_nonpositive_scores() {
        let region = CropRegion { center: [100.0, 200.0], scale: [144.0, 192.0] };
        let mut x = vec![0f32; KEYPOINTS * INPUT_W * 2];
        let mut y = vec![0f32; KEYPOINTS * INPUT_H * 2];
        // keypoint 0 at bin (288, 384) = input pixel (144, 192) = the centre, score min(0.9, 0.6)
        x[288] = 0.9;
        y[384] = 0.6;
        let out = |shape: usize, data| Output { shape: vec![1, KEYPOINTS, shape], data };
        let k = decode(&out(INPUT_W * 2, x), &out(INPUT_H * 2, y), &region);
        assert_eq!(k.points[0], [100.0, 200.0]);
        assert_eq!(k.scores[0], 0.6);
        // keypoint 1: all zeros -> score 0 -> bin -1 (half a pixel left of / above the crop's corner)
        assert_eq!(k.scores[1], 0.0);
        assert_eq!(k.points[1], [-0.5 / 288.0 * 144.0 + 100.0 - 72.0, -0.5 / 384.0 * 192.0 + 200.0 - 96.0]);
    }
}
