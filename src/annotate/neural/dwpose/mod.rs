//! DWPose: controlnet_aux 0.0.10's `DWposeDetector` (whole-body keypoints drawn as the OpenPose skeleton the
//! openpose ControlNets read), with its two nets run from the ONNX files A1111's and ComfyUI's preprocessors
//! use (hub `yzd-v/DWPose`), through `tract-onnx`.
//!
//! 1. people ([`yolox`]): YOLOX-L boxes of class "person" scoring above 0.3 (none found at all: nobody; boxes
//!    but no person above 0.3: the whole image is one box);
//! 2. keypoints ([`rtmpose`]): RTMPose's 133 COCO-WholeBody points and scores in each box;
//! 3. OpenPose order ([`WholeBody`]): a neck between the shoulders, the 17 body points moved to COCO-18 places
//!    (134 points: 18 body, 6 feet, 68 face, 21 left hand, 21 right hand);
//! 4. the map ([`Dwpose::draw`]): body joints scoring above 0.3, hand and face points scoring at least 0.3,
//!    drawn part by part across people ([`render_part_by_part`]); the feet are not drawn.
//!
//! controlnet_aux feeds the nets the BGR image (its mmdet/mmpose pipeline expects it); A1111 passes RGB. This
//! follows controlnet_aux.
pub mod onnx;
pub mod rtmpose;
pub mod yolox;

use std::path::Path;

use image::RgbImage;

use self::onnx::OnnxNet;
use self::rtmpose::Keypoints133;
use self::yolox::Detection;
use super::weights;
use crate::annotate::cv::Mat;
use crate::annotate::pose::{render_part_by_part, DrawOptions, Keypoint, Person, PixelPoses, PoseFile};
use crate::annotate::{Detector, Preprocess};
use crate::{Error, Result};

/// The hub repo of the ONNX files (A1111's and ComfyUI's download).
pub const DEFAULT_REPO: &str = "yzd-v/DWPose";
/// The person detector (YOLOX-L, COCO).
pub const DETECTOR_FILE: &str = "yolox_l.onnx";
/// The whole-body pose model (RTMPose-l distilled by DWPose, 384×288).
pub const POSE_FILE: &str = "dw-ll_ucoco_384.onnx";
/// Points of [`WholeBody`], and where each part starts.
pub const OPENPOSE_POINTS: usize = 134;
pub const BODY: std::ops::Range<usize> = 0..18;
pub const FACE: std::ops::Range<usize> = 24..92;
pub const LEFT_HAND: std::ops::Range<usize> = 92..113;
pub const RIGHT_HAND: std::ops::Range<usize> = 113..134;
/// Body joints are drawn when they score above this; other points when they score at least this.
pub const VISIBLE: f64 = 0.3;
/// COCO-WholeBody index of the shoulders (the neck is their mean).
const SHOULDERS: [usize; 2] = [5, 6];
/// Where the neck is inserted (COCO index 17, before the feet), then the body's reordering: OpenPose index
/// `OPENPOSE_IDX[i]` takes the point at `MMPOSE_IDX[i]`.
const NECK_AT: usize = 17;
const MMPOSE_IDX: [usize; 15] = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3];
const OPENPOSE_IDX: [usize; 15] = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17];

/// The two nets, each loaded once.
pub struct DwposeNets {
    pub detector: OnnxNet,
    pub pose: OnnxNet,
}

impl DwposeNets {
    /// The nets from the `weights` setting: a folder holding both upstream files, or a hub repo (default
    /// [`DEFAULT_REPO`]). A single file cannot hold both nets.
    pub fn load(weights: Option<&str>) -> Result<Self> {
        if let Some(spec) = weights.filter(|s| Path::new(s).is_file()) {
            return Err(Error::setting(
                "weights",
                format!(
                    "{spec}: dwpose needs two files, {DETECTOR_FILE} and {POSE_FILE}: give their folder or hub repo"
                ),
            ));
        }
        let locate = |file: &str| weights::locate_in(DEFAULT_REPO, weights, file);
        Self::from_files(&locate(DETECTOR_FILE)?, &locate(POSE_FILE)?)
    }

    /// The nets from their two files, checked to have the upstream inputs and outputs.
    pub fn from_files(detector: &Path, pose: &Path) -> Result<Self> {
        let side = yolox::INPUT_SIZE;
        let detector = OnnxNet::load(detector, &[1, 3, side, side], &[Some(vec![1, yolox::ROWS, yolox::ROW])])?;
        let (w, h) = (rtmpose::INPUT_W, rtmpose::INPUT_H);
        let k = rtmpose::KEYPOINTS;
        let pose = OnnxNet::load(pose, &[1, 3, h, w], &[Some(vec![1, k, w * 2]), Some(vec![1, k, h * 2])])?;
        Ok(Self { detector, pose })
    }
}

/// One person's 134 points in OpenPose order (image pixels) and their scores.
#[derive(Debug, Clone, PartialEq)]
pub struct WholeBody {
    pub points: Vec<[f64; 2]>,
    pub scores: Vec<f64>,
}

impl WholeBody {
    /// Step 3: the neck (mean of the shoulders, shown when both score above 0.3) inserted and the body reordered.
    pub fn from_coco(k: &Keypoints133) -> Self {
        let mut points: Vec<[f64; 2]> = k.points.clone();
        let mut scores: Vec<f64> = k.scores.iter().map(|&s| f64::from(s)).collect();
        let [l, r] = SHOULDERS;
        let neck = [(points[l][0] + points[r][0]) / 2.0, (points[l][1] + points[r][1]) / 2.0];
        let neck_score = if scores[l] > VISIBLE && scores[r] > VISIBLE { 1.0 } else { 0.0 };
        points.insert(NECK_AT, neck);
        scores.insert(NECK_AT, neck_score);
        let (old_points, old_scores) = (points.clone(), scores.clone());
        for (&to, &from) in OPENPOSE_IDX.iter().zip(&MMPOSE_IDX) {
            points[to] = old_points[from];
            scores[to] = old_scores[from];
        }
        Self { points, scores }
    }
}

/// What each step found in one image (for tests and `--save-json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// Step 1: `None` when nothing scored above 0.1.
    pub boxes: Option<Vec<Detection>>,
    /// Step 2, one per box (or one for the whole image).
    pub keypoints: Vec<Keypoints133>,
    /// Step 3.
    pub people: Vec<WholeBody>,
}

/// Which parts are drawn and written (controlnet_aux draws them all; `include_*` as openpose's flags).
pub fn include(body: Option<bool>, hand: bool, face: bool) -> DrawOptions {
    let (hands, face) = if hand || face { (hand, face) } else { (true, true) };
    DrawOptions { body: body.unwrap_or(true), hands, face }
}

/// The detector: `detect` draws the included parts of every person found.
pub struct Dwpose {
    pub nets: DwposeNets,
    pub include: DrawOptions,
}

impl Dwpose {
    pub fn load(weights: Option<&str>, include: DrawOptions) -> Result<Self> {
        Ok(Self { nets: DwposeNets::load(weights)?, include })
    }

    /// Steps 1–3 on the BGR image.
    pub fn estimate(&self, bgr: &Mat<u8>) -> Result<Estimate> {
        // 1. people (nobody: no box; boxes but no person: the whole image)
        let boxes = yolox::person_boxes(&self.nets.detector, bgr)?;
        let regions: Vec<[f64; 4]> = match &boxes {
            None => vec![],
            Some(found) if found.is_empty() => vec![[0.0, 0.0, bgr.width as f64, bgr.height as f64]],
            Some(found) => found.iter().map(|d| d.bbox).collect(),
        };
        // 2. keypoints in each box
        let keypoints =
            regions.iter().map(|&b| rtmpose::estimate(&self.nets.pose, bgr, b)).collect::<Result<Vec<_>>>()?;
        // 3. OpenPose order
        let people = keypoints.iter().map(WholeBody::from_coco).collect();
        Ok(Estimate { boxes, keypoints, people })
    }

    /// The map of `people` found in a `width × height` image (step 4, `draw_pose`), from the coordinates
    /// normalised to the image as upstream keeps them.
    pub fn draw(&self, people: &[WholeBody], width: u32, height: u32) -> Result<RgbImage> {
        let (w, h) = (f64::from(width), f64::from(height));
        let part = |p: &WholeBody, range: std::ops::Range<usize>, shown: &dyn Fn(f64) -> bool| {
            range
                .map(|i| shown(p.scores[i]).then(|| (p.points[i][0] / w * w, p.points[i][1] / h * h)))
                .collect::<Vec<_>>()
        };
        let body_shown = |s: f64| s > VISIBLE;
        let point_shown = |s: f64| s >= VISIBLE;
        let poses = PixelPoses {
            bodies: people.iter().map(|p| part(p, BODY, &body_shown)).collect(),
            hands: people
                .iter()
                .map(|p| part(p, LEFT_HAND, &point_shown))
                .chain(people.iter().map(|p| part(p, RIGHT_HAND, &point_shown)))
                .collect(),
            faces: people.iter().map(|p| part(p, FACE, &point_shown)).collect(),
        };
        render_part_by_part(width, height, &poses, self.include)
    }

    /// The people as OpenPose JSON normalised to the image (A1111's layout): the included parts, each point's
    /// score as its confidence, points not shown as `0, 0, 0`, a hand or face with no point shown left out.
    pub fn pose_file(&self, people: &[WholeBody], width: u32, height: u32) -> PoseFile {
        let (w, h) = (f64::from(width), f64::from(height));
        let group = |p: &WholeBody, range: std::ops::Range<usize>, threshold_strict: bool| {
            let points: Vec<Keypoint> = range
                .map(|i| {
                    let s = p.scores[i];
                    let shown = if threshold_strict { s > VISIBLE } else { s >= VISIBLE };
                    if shown {
                        Keypoint::new(p.points[i][0] / w, p.points[i][1] / h, s)
                    } else {
                        Keypoint::MISSING
                    }
                })
                .collect();
            points.iter().any(Keypoint::is_present).then_some(points)
        };
        let people = people
            .iter()
            .map(|p| Person {
                body: self.include.body.then(|| group(p, BODY, true).unwrap_or_else(|| vec![Keypoint::MISSING; 18])),
                left_hand: self.include.hands.then(|| group(p, LEFT_HAND, false)).flatten(),
                right_hand: self.include.hands.then(|| group(p, RIGHT_HAND, false)).flatten(),
                face: self.include.face.then(|| group(p, FACE, false)).flatten(),
                ..Person::default()
            })
            .collect();
        PoseFile { people, canvas_width: Some(width), canvas_height: Some(height), ..PoseFile::default() }
    }

    /// The map and the pose of one image at the detector's resolution.
    pub fn detect_with_pose(&self, image: &RgbImage) -> Result<(RgbImage, PoseFile)> {
        let found = self.estimate(&bgr(image))?;
        let (w, h) = image.dimensions();
        Ok((self.draw(&found.people, w, h)?, self.pose_file(&found.people, w, h)))
    }
}

/// The image as controlnet_aux hands it to the nets: BGR.
pub fn bgr(image: &RgbImage) -> Mat<u8> {
    let mut m = Mat::from_rgb(image);
    m.data.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
    m
}

impl Detector for Dwpose {
    fn name(&self) -> &str {
        "dwpose"
    }

    /// The detector letterboxes and the pose model crops by itself: no 64-pixel padding.
    fn preprocess(&self) -> Preprocess {
        Preprocess::Resize
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        Ok(self.detect_with_pose(image)?.0)
    }
}

impl super::PoseDetector for Dwpose {
    fn detect_with_pose(&self, image: &RgbImage) -> Result<(RgbImage, PoseFile)> {
        Dwpose::detect_with_pose(self, image)
    }
}

#[cfg(test)]
mod tests;
