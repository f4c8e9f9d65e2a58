//! OpenPose: controlnet_aux's `OpenposeDetector` (the CMU body, hand and face nets of ControlNet 1.1's
//! annotator), the detector behind control_v11p_sd15_openpose and A1111's `openpose*` preprocessors.
//!
//! 1. body ([`body`]): the body net at one scale → heatmaps and part affinity fields → joint peaks → limbs →
//!    people;
//! 2. hands and face ([`parts`]): boxes from each person's arms and head, the hand net (4 scales) and the face
//!    net on the crops, one point per heatmap;
//! 3. everything normalised to the detect image ([`PoseFile`], A1111's JSON) and drawn as the openpose
//!    ControlNets were trained ([`PoseFile::render`]).
//!
//! Which parts are detected and drawn follows controlnet_aux's `include_body`, `include_hand`, `include_face`
//! (the body is always detected: hands and face are found from it).
pub mod body;
pub mod maps;
pub mod net;
pub mod parts;

use candle_core::Tensor;
use image::RgbImage;

use self::body::BodyResult;
use self::net::{BodyNet, CpmNet};
use super::weights::{locate, StateDict};
use crate::annotate::cv::Mat;
use crate::annotate::pose::{DrawOptions, Keypoint, Person, PoseFile};
use crate::annotate::{Detector, Preprocess};
use crate::Result;

/// The weights files (hub `lllyasviel/Annotators`).
pub const BODY_FILE: &str = "body_pose_model.pth";
pub const HAND_FILE: &str = "hand_pose_model.pth";
pub const FACE_FILE: &str = "facenet.pth";

/// What is detected and drawn (controlnet_aux's `include_*`; A1111's `openpose` = body, `openpose_hand`,
/// `openpose_face`, `openpose_full` = all, `openpose_faceonly` = face without the body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Include {
    pub body: bool,
    pub hand: bool,
    pub face: bool,
}

impl Include {
    /// The parts of the annotator kind `kind` (`openpose`, `openpose-hand`, `openpose-face`, `openpose-full`),
    /// with `body` (default true), and hands / face added by the flags.
    pub fn for_kind(kind: &str, body: Option<bool>, hand: bool, face: bool) -> Self {
        let (kind_hand, kind_face) = match kind {
            "openpose-hand" => (true, false),
            "openpose-face" => (false, true),
            "openpose-full" => (true, true),
            _ => (false, false),
        };
        Self { body: body.unwrap_or(true), hand: hand || kind_hand, face: face || kind_face }
    }
}

/// The three nets (the hand and face nets only when their parts are included).
pub struct OpenposeNets {
    pub body: BodyNet,
    pub hand: Option<CpmNet>,
    pub face: Option<CpmNet>,
}

/// The network calls of the detector: the real nets, or (tests) stored outputs.
pub trait PoseNets: Send + Sync {
    /// `(PAFs, heatmaps)` of the body net.
    fn body(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
    fn hand(&self, x: &Tensor) -> Result<Tensor>;
    fn face(&self, x: &Tensor) -> Result<Tensor>;
}

impl PoseNets for OpenposeNets {
    fn body(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.body.forward(x)
    }
    fn hand(&self, x: &Tensor) -> Result<Tensor> {
        self.hand.as_ref().expect("the hand net is loaded when hands are included").forward(x)
    }
    fn face(&self, x: &Tensor) -> Result<Tensor> {
        self.face.as_ref().expect("the face net is loaded when the face is included").forward(x)
    }
}

impl OpenposeNets {
    /// The nets `include` needs, from the `weights` setting (a folder holding the upstream file names, or the
    /// hub; a single file cannot hold three nets).
    pub fn load(weights: Option<&str>, include: Include) -> Result<Self> {
        Self::from_files(&|file: &str| StateDict::open(&locate(weights, file)?), include)
    }

    /// The nets `include` needs, from the state dict `open` gives for each upstream file name.
    pub fn from_files(open: &dyn Fn(&str) -> Result<StateDict>, include: Include) -> Result<Self> {
        Ok(Self {
            body: BodyNet::load(&open(BODY_FILE)?)?,
            hand: include.hand.then(|| CpmNet::load(&open(HAND_FILE)?, HAND_FILE)).transpose()?,
            face: include.face.then(|| CpmNet::load(&open(FACE_FILE)?, FACE_FILE)).transpose()?,
        })
    }
}

/// The detector: `detect` draws the included parts of every person found.
pub struct Openpose {
    pub nets: Box<dyn PoseNets>,
    pub include: Include,
}

impl Openpose {
    pub fn load(weights: Option<&str>, include: Include) -> Result<Self> {
        Ok(Self { nets: Box::new(OpenposeNets::load(weights, include)?), include })
    }

    /// `Body.__call__` on `bgr`: candidates and people, in image pixels.
    pub fn body(&self, bgr: &Mat<u8>) -> Result<BodyResult> {
        let (x, unpadded) = body::net_input(bgr)?;
        let (paf, heatmap) = self.nets.body(&x)?;
        let (pafs, heatmaps) = body::maps_at_image(&paf, &heatmap, unpadded, (bgr.width, bgr.height))?;
        let peaks = body::find_peaks(&heatmaps);
        Ok(body::assemble(&peaks, &pafs, bgr.height))
    }

    /// `detect_poses`: every person with the included hands and face, normalised to the image, on a canvas of
    /// the image's size (A1111's JSON).
    pub fn detect_poses(&self, image: &RgbImage) -> Result<PoseFile> {
        let bgr = bgr(image);
        let size = (bgr.width, bgr.height);
        let found = self.body(&bgr)?;
        let (w, h) = (size.0 as f64, size.1 as f64);
        let mut people = Vec::with_capacity(found.people.len());
        for person in &found.people {
            let joints = found.keypoints(person);
            let mut out = Person {
                body: Some(
                    joints
                        .iter()
                        .map(|j| j.map_or(Keypoint::MISSING, |(x, y)| Keypoint::new(x / w, y / h, 1.0)))
                        .collect(),
                ),
                ..Person::default()
            };
            let group = |points: Vec<(usize, usize)>, b: parts::Box| -> Option<Vec<Keypoint>> {
                let kps: Vec<Keypoint> = points
                    .into_iter()
                    .map(|p| {
                        let (x, y) = parts::normalised(p, b, size);
                        Keypoint::new(f64::from(x), f64::from(y), 1.0)
                    })
                    .collect();
                (!kps.is_empty()).then_some(kps)
            };
            if self.include.hand {
                for (b, is_left) in parts::hand_boxes(&joints, size) {
                    let points = parts::hand_points(&parts::crop(&bgr, b), &|x| self.nets.hand(x))?;
                    let slot = if is_left { &mut out.left_hand } else { &mut out.right_hand };
                    *slot = group(points, b);
                }
            }
            if self.include.face {
                if let Some(b) = parts::face_box(&joints, size) {
                    out.face = group(parts::face_points(&parts::crop(&bgr, b), &|x| self.nets.face(x))?, b);
                }
            }
            people.push(out);
        }
        Ok(PoseFile {
            people,
            canvas_width: Some(size.0 as u32),
            canvas_height: Some(size.1 as u32),
            ..PoseFile::default()
        })
    }

    fn draw_options(&self) -> DrawOptions {
        DrawOptions { body: self.include.body, hands: self.include.hand, face: self.include.face }
    }

    /// The map and the pose of `image` by `recipe` (the annotate recipe run on this detector), for
    /// `--save-json`: the pose as found at the detect resolution.
    pub fn annotate_with_pose(
        &self,
        recipe: impl FnOnce(&dyn Detector) -> Result<RgbImage>,
    ) -> Result<(RgbImage, PoseFile)> {
        super::annotate_with_pose(self, recipe)
    }
}

/// The image as the detector's arrays hold it: BGR (`oriImg[:, :, ::-1]`).
fn bgr(image: &RgbImage) -> Mat<u8> {
    let mut m = Mat::from_rgb(image);
    m.data.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
    m
}

impl Detector for Openpose {
    /// The kind that detects these parts.
    fn name(&self) -> &str {
        match (self.include.hand, self.include.face) {
            (false, false) => "openpose",
            (true, false) => "openpose-hand",
            (false, true) => "openpose-face",
            (true, true) => "openpose-full",
        }
    }

    /// The net pads to its stride itself; no 64-pixel padding that would add image to detect people in.
    fn preprocess(&self) -> Preprocess {
        Preprocess::Resize
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        self.draw(&self.detect_poses(image)?, image)
    }
}

impl Openpose {
    /// The map of `pose` at the size of `image`. Hand and face points are float32 upstream, and its drawing
    /// multiplies them by the canvas side in float32 before truncating to a pixel: they are drawn from those
    /// pixel positions (a float64 product can fall just below the integer the float32 one rounds to).
    fn draw(&self, pose: &PoseFile, image: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (image.width() as f32, image.height() as f32);
        let to_pixels = |group: &Option<Vec<Keypoint>>| {
            group.as_ref().map(|g| {
                g.iter()
                    .map(|k| Keypoint::new(f64::from(k.x as f32 * w), f64::from(k.y as f32 * h), k.confidence))
                    .collect::<Vec<_>>()
            })
        };
        let mut drawn = pose.clone();
        for p in &mut drawn.people {
            (p.left_hand, p.right_hand, p.face) =
                (to_pixels(&p.left_hand), to_pixels(&p.right_hand), to_pixels(&p.face));
        }
        drawn.render(image.width(), image.height(), self.draw_options())
    }
}

impl super::PoseDetector for Openpose {
    fn detect_with_pose(&self, image: &RgbImage) -> Result<(RgbImage, PoseFile)> {
        let pose = self.detect_poses(image)?;
        Ok((self.draw(&pose, image)?, pose))
    }
}

#[cfg(test)]
mod tests;
