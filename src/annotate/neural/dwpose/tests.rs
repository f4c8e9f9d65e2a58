//! Parity with controlnet_aux 0.0.10's `DWposeDetector` on the ONNX nets (tools/fixtures/gen_dwpose.py): tiny
//! random-weight nets with the published signatures, calibrated so that people are found. Cases: one person
//! (tall), four (four), two (two), the whole-image fallback (wide: boxes, none of them a person above 0.3) and
//! nobody (no box above 0.1). The generator keeps every score at least 1e-4 from the thresholds it meets.
//! The nets, boxes and keypoints start from the image the reference's nets saw (`<case>_detect.png`: a resize
//! may be a grey level off here and there, and random nets magnify that); the maps start from the input.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::*;
use crate::annotate::{annotate_upstream, upstream_input, UpstreamSizes};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dwpose");

fn weights() -> PathBuf {
    PathBuf::from(DIR).join("weights")
}

fn load(name: &str) -> RgbImage {
    image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
}

#[derive(Deserialize)]
struct Case {
    name: String,
    input: String,
    detect: String,
    map: String,
    detect_resolution: u32,
    image_resolution: u32,
    map_nonzero: usize,
    boxes: Option<Vec<[f64; 4]>>,
    people: usize,
    nets: String,
    #[serde(default)]
    keypoints133: Vec<Vec<[f64; 2]>>,
    #[serde(default)]
    scores133: Vec<Vec<f64>>,
    #[serde(default)]
    openpose134: Vec<Vec<[f64; 3]>>,
}

impl Case {
    fn sizes(&self) -> UpstreamSizes {
        UpstreamSizes { detect_resolution: Some(self.detect_resolution), image_resolution: Some(self.image_resolution) }
    }

    /// The BGR image the reference's nets saw (controlnet_aux's `resize_image` to the detect resolution).
    fn detect_image(&self) -> Mat<u8> {
        let ours = upstream_input(&load(&self.input), &self.sizes()).unwrap().0;
        let reference = load(&self.detect);
        assert_eq!(ours.dimensions(), reference.dimensions(), "{}: detect size", self.name);
        bgr(&reference)
    }

    fn nets(&self) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{DIR}/{}", self.nets), &Device::Cpu).unwrap()
    }
}

fn cases() -> Vec<Case> {
    #[derive(Deserialize)]
    struct Manifest {
        cases: Vec<Case>,
    }
    let m: Manifest = serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/cases.json")).unwrap()).unwrap();
    assert!(m.cases.len() >= 5);
    m.cases
}

fn detector() -> Dwpose {
    Dwpose::load(Some(weights().to_str().unwrap()), DrawOptions::default()).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// `ours` against `reference` within 1e-4 of the reference's largest magnitude.
fn assert_close(ours: &[f32], reference: &[f32], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let d = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max |diff| {d:.3e} (scale {scale:.3e})");
    assert!(d <= 1e-4 * scale, "{what}: max |diff| {d} > 1e-4 x {scale}");
}

/// The detector's raw output on the letterboxed detect image, and the pose model's SimCC scores on each crop,
/// against onnxruntime's on the same (sampled) rows.
#[test]
fn nets_match_onnxruntime() {
    let d = detector();
    for c in cases() {
        let reference = c.nets();
        let img = c.detect_image();
        let (input, _) = yolox::letterbox(&img).unwrap();
        let out = d.nets.detector.run(input).unwrap().swap_remove(0);
        assert_eq!(out.shape, [1, yolox::ROWS, yolox::ROW]);
        let rows = i64s(&reference["det_rows"]);
        let ours: Vec<f32> =
            rows.iter().flat_map(|&r| out.data[r as usize * yolox::ROW..][..yolox::ROW].to_vec()).collect();
        assert_close(&ours, &f32s(&reference["det_output"]), &format!("{}: detector rows", c.name));
        let Some(boxes) = &c.boxes else { continue };
        let boxes =
            if boxes.is_empty() { vec![[0.0, 0.0, img.width as f64, img.height as f64]] } else { boxes.clone() };
        let kp_rows = i64s(&reference["kp_rows"]);
        let per_crop = kp_rows.len() / boxes.len();
        let (wx, wy) = (rtmpose::INPUT_W * 2, rtmpose::INPUT_H * 2);
        let corner = f32s(&reference["pose_input_corner"]);
        let (x_max, y_max) = (f32s(&reference["simcc_x_max"]), f32s(&reference["simcc_y_max"]));
        let (x_arg, y_arg) = (i64s(&reference["simcc_x_argmax"]), i64s(&reference["simcc_y_argmax"]));
        let (ref_x, ref_y) = (f32s(&reference["simcc_x"]), f32s(&reference["simcc_y"]));
        for (i, b) in boxes.iter().enumerate() {
            let region = rtmpose::CropRegion::from_box(*b);
            let input = rtmpose::crop_input(&img, &region);
            // rows 180..196, columns 136..152 of each channel: the crop and its normalisation
            let plane = rtmpose::INPUT_W * rtmpose::INPUT_H;
            let ours_corner: Vec<f32> = (0..3)
                .flat_map(|ch| (180..196).flat_map(move |y| (136..152).map(move |x| (ch, y, x))))
                .map(|(ch, y, x)| input[ch * plane + y * rtmpose::INPUT_W + x])
                .collect();
            let n = ours_corner.len();
            assert_close(&ours_corner, &corner[i * n..(i + 1) * n], &format!("{}: crop {i} input", c.name));
            let outs = d.nets.pose.run(input).unwrap();
            let k = rtmpose::KEYPOINTS;
            let mut ours = (vec![], vec![]);
            for &row in &kp_rows[i * per_crop..(i + 1) * per_crop] {
                ours.0.extend_from_slice(&outs[0].data[row as usize * wx..][..wx]);
                ours.1.extend_from_slice(&outs[1].data[row as usize * wy..][..wy]);
            }
            let (sx, sy) = (ours.0.len(), ours.1.len());
            assert_close(&ours.0, &ref_x[i * sx..(i + 1) * sx], &format!("{}: crop {i} simcc_x", c.name));
            assert_close(&ours.1, &ref_y[i * sy..(i + 1) * sy], &format!("{}: crop {i} simcc_y", c.name));
            // every keypoint's maximum and where it is
            for kp in 0..k {
                let (ax, mx) = argmax_of(&outs[0].data[kp * wx..(kp + 1) * wx]);
                let (ay, my) = argmax_of(&outs[1].data[kp * wy..(kp + 1) * wy]);
                assert_eq!((ax as i64, ay as i64), (x_arg[i * k + kp], y_arg[i * k + kp]), "{}: {i}/{kp}", c.name);
                assert!((mx - x_max[i * k + kp]).abs() <= 1e-4 * x_max[i * k + kp].abs().max(1e-2));
                assert!((my - y_max[i * k + kp]).abs() <= 1e-4 * y_max[i * k + kp].abs().max(1e-2));
            }
        }
    }
}

fn argmax_of(v: &[f32]) -> (usize, f32) {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
}

/// Boxes, the 133 keypoints and scores of each person, and the 134 points in OpenPose order.
#[test]
fn boxes_and_keypoints_match_the_reference() {
    let d = detector();
    for c in cases() {
        let found = d.estimate(&c.detect_image()).unwrap();
        match (&found.boxes, &c.boxes) {
            (None, None) => {}
            (Some(ours), Some(reference)) => {
                assert_eq!(ours.len(), reference.len(), "{}: boxes", c.name);
                for (o, r) in ours.iter().zip(reference) {
                    for (a, b) in o.bbox.iter().zip(r) {
                        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "{}: box {:?} vs {r:?}", c.name, o.bbox);
                    }
                }
            }
            (ours, reference) => panic!("{}: boxes {ours:?}, reference {reference:?}", c.name),
        }
        assert_eq!(found.people.len(), c.people, "{}: people", c.name);
        for (p, (ours, reference)) in found.keypoints.iter().zip(&c.keypoints133).enumerate() {
            // boxes agree to ~1e-6 relative, the crop scales them by up to 4x: 0.01 px
            for (k, (a, b)) in ours.points.iter().zip(reference).enumerate() {
                let close = (a[0] - b[0]).abs() < 1e-2 && (a[1] - b[1]).abs() < 1e-2;
                assert!(close, "{}: person {p} keypoint {k}: {a:?} vs {b:?}", c.name);
            }
            // our boxes differ from the reference's by ~1e-6: the crop samples move by ~1e-4 px and a few of its
            // rounded levels flip, which moves a score by up to ~2e-4 (the nets agree to 1e-5 on one crop)
            for (a, b) in ours.scores.iter().zip(&c.scores133[p]) {
                assert!((f64::from(*a) - b).abs() <= 1e-3, "{}: score {a} vs {b}", c.name);
            }
        }
        for (p, (ours, reference)) in found.people.iter().zip(&c.openpose134).enumerate() {
            assert_eq!(ours.points.len(), OPENPOSE_POINTS);
            for (k, r) in reference.iter().enumerate() {
                let (a, s) = (ours.points[k], ours.scores[k]);
                let close = (a[0] - r[0]).abs() < 1e-2 && (a[1] - r[1]).abs() < 1e-2 && (s - r[2]).abs() < 1e-3;
                assert!(close, "{}: person {p} OpenPose point {k}: {a:?} {s} vs {r:?}", c.name);
            }
        }
    }
}

/// The final maps with controlnet_aux's sizes: at most 1% of the samples more than 2 levels off, about as many
/// drawn samples, and no blank map where people were found.
#[test]
fn maps_match_controlnet_aux() {
    let d = detector();
    for c in cases() {
        let ours = annotate_upstream(&d, &load(&c.input), &c.sizes()).unwrap();
        let reference = load(&c.map);
        assert_eq!(ours.dimensions(), reference.dimensions(), "{}: size", c.name);
        let off = ours.as_raw().iter().zip(reference.as_raw()).filter(|(&a, &b)| a.abs_diff(b) > 2).count();
        let share = off as f64 / ours.as_raw().len() as f64;
        let nonzero = ours.as_raw().iter().filter(|&&v| v > 0).count();
        eprintln!("{}: {:.3}% off by > 2, {nonzero} drawn (reference {})", c.name, share * 100.0, c.map_nonzero);
        assert!(share <= 0.01, "{}: {:.3}% of samples off by more than 2 levels", c.name, share * 100.0);
        assert!(nonzero.abs_diff(c.map_nonzero) as f64 <= 0.01 * c.map_nonzero.max(100) as f64, "{}", c.name);
        assert_eq!(c.people > 0, c.map_nonzero > 0, "{}: the reference map", c.name);
    }
}

/// The JSON holds each person's shown points normalised to the detect image with their scores; parts left out
/// by the include options are absent from the map and the JSON.
#[test]
fn pose_json_holds_the_shown_points() {
    let d = detector();
    let c = cases().into_iter().find(|c| c.people >= 2).unwrap();
    let img = c.detect_image();
    let (w, h) = (img.width as f64, img.height as f64);
    let found = d.estimate(&img).unwrap();
    let pose = d.pose_file(&found.people, img.width as u32, img.height as u32);
    assert_eq!(pose.people.len(), c.people);
    assert_eq!(pose.canvas_size(), Some((img.width as u32, img.height as u32)));
    for (person, reference) in pose.people.iter().zip(&c.openpose134) {
        let check = |group: &Option<Vec<Keypoint>>, range: std::ops::Range<usize>, strict: bool| {
            let shown = |s: f64| if strict { s > VISIBLE } else { s >= VISIBLE };
            let any = range.clone().any(|i| shown(reference[i][2]));
            let Some(points) = group else {
                assert!(!any, "a group with shown points is missing");
                return;
            };
            assert_eq!(points.len(), range.len());
            for (p, i) in points.iter().zip(range) {
                let r = reference[i];
                if shown(r[2]) {
                    assert!((p.x - r[0] / w).abs() < 1e-4 && (p.y - r[1] / h).abs() < 1e-4, "{i}: {p:?} vs {r:?}");
                    assert!((p.confidence - r[2]).abs() < 1e-3);
                } else {
                    assert_eq!(*p, Keypoint::MISSING);
                }
            }
        };
        check(&person.body, BODY, true);
        check(&person.left_hand, LEFT_HAND, false);
        check(&person.right_hand, RIGHT_HAND, false);
        check(&person.face, FACE, false);
        assert_eq!(person.face.as_ref().map(Vec::len).unwrap_or(68), 68);
    }
    // hands only: no body, no face in the JSON or on the map
    let hands_only = Dwpose { nets: d.nets, include: include(Some(false), true, false) };
    let pose = hands_only.pose_file(&found.people, img.width as u32, img.height as u32);
    assert!(pose.people.iter().all(|p| p.body.is_none() && p.face.is_none()));
    assert!(pose.people.iter().any(|p| p.left_hand.is_some() || p.right_hand.is_some()));
    let map = hands_only.draw(&found.people, img.width as u32, img.height as u32).unwrap();
    // hand bones and joints only: no white face dots, no shaded limb colours
    assert!(map.pixels().any(|p| p.0 != [0, 0, 0]));
    assert!(map.pixels().all(|p| p.0 != [255, 255, 255]));
}

#[test]
fn include_flags_default_to_everything() {
    assert_eq!(include(None, false, false), DrawOptions { body: true, hands: true, face: true });
    assert_eq!(include(None, true, false), DrawOptions { body: true, hands: true, face: false });
    assert_eq!(include(Some(false), false, true), DrawOptions { body: false, hands: false, face: true });
}

#[test]
fn bad_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = |w: &std::path::Path| Dwpose::load(Some(w.to_str().unwrap()), DrawOptions::default()).err().unwrap();
    // a folder without the files
    let e = err(dir.path()).to_string();
    assert!(e.starts_with("weights: ") && e.contains(DETECTOR_FILE), "{e}");
    // one file: both nets are needed
    let e = err(&weights().join(POSE_FILE)).to_string();
    assert!(e.contains("two files") && e.contains(DETECTOR_FILE), "{e}");
    // the pose model under the detector's name: its shapes are refused, naming the file
    std::fs::copy(weights().join(POSE_FILE), dir.path().join(DETECTOR_FILE)).unwrap();
    std::fs::copy(weights().join(POSE_FILE), dir.path().join(POSE_FILE)).unwrap();
    let e = err(dir.path()).to_string();
    assert!(e.contains(&dir.path().join(DETECTOR_FILE).display().to_string()), "{e}");
    // not ONNX at all
    std::fs::write(dir.path().join(DETECTOR_FILE), b"not a graph").unwrap();
    let e = err(dir.path()).to_string();
    assert!(e.contains(DETECTOR_FILE) && e.contains("ONNX"), "{e}");
}

#[test]
fn wholebody_puts_the_neck_between_the_shoulders() {
    let points: Vec<[f64; 2]> = (0..rtmpose::KEYPOINTS).map(|i| [i as f64, 2.0 * i as f64]).collect();
    let mut scores = vec![0.9f32; rtmpose::KEYPOINTS];
    scores[6] = 0.2;
    let w = WholeBody::from_coco(&Keypoints133 { points, scores });
    assert_eq!(w.points.len(), OPENPOSE_POINTS);
    // neck = mean of COCO 5 and 6, hidden since one shoulder scores 0.2
    assert_eq!((w.points[1], w.scores[1]), ([5.5, 11.0], 0.0));
    // OpenPose 2 (right shoulder) is COCO 6, OpenPose 5 (left shoulder) stays COCO 5, nose stays 0
    assert_eq!(w.points[2], [6.0, 12.0]);
    assert_eq!(w.points[5], [5.0, 10.0]);
    assert_eq!(w.points[0], [0.0, 0.0]);
    // the feet, face and hands follow, shifted by the inserted neck
    assert_eq!(w.points[18], [17.0, 34.0]);
    assert_eq!(w.points[133], [132.0, 264.0]);
}
