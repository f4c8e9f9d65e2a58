//! Poses as data: OpenPose JSON in and out, keypoint edits (`edit.rs`), and the skeleton image ControlNet's
//! openpose models were trained on ([`PoseFile::render`], `render.rs`).
//!
//! The format is OpenPose's (`doc/02_output.md`) as OpenPose, A1111's ControlNet extension and pose editors
//! write it:
//! `{"people": [{"pose_keypoints_2d": [x, y, c, ...], "hand_left_keypoints_2d": [...],
//! "hand_right_keypoints_2d": [...], "face_keypoints_2d": [...]}], "canvas_width": W, "canvas_height": H}`,
//! or a list of such objects (one per image). Rules, each taken from a writer or reader of the format:
//! - A point with confidence ≤ 0 is missing (OpenPose writes `0, 0, 0`). A1111 reads `c < 1` as missing, which
//!   agrees on the files it writes (1 or 0); [`PoseFile::with_min_confidence`] reproduces it.
//! - Each keypoint group is in pixels or normalised to the canvas, decided per group as A1111 does: normalised
//!   when every present point has |x| ≤ 1 and |y| ≤ 1.
//! - Bodies are COCO-18 (what ControlNet draws); OpenPose's default BODY_25 is mapped to it on reading (its
//!   MidHip and feet are dropped). Hands have 21 points; faces any number (OpenPose 70, DWPose 68).
//! - No people is a valid pose: it renders as a black canvas, as in controlnet_aux and A1111.
//! - Empty or `null` groups are absent; fields this module does not interpret are kept and written back.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

mod edit;
mod render;
pub use edit::PoseEdits;
pub use render::{render_part_by_part, DrawOptions, PixelPoses};

/// Points in a COCO-18 body, the layout ControlNet's skeleton is drawn from.
pub const BODY_POINTS: usize = 18;
/// Points in OpenPose's default BODY_25 body (COCO + MidHip + 6 foot points).
pub const BODY_25_POINTS: usize = 25;
/// Points in an OpenPose hand.
pub const HAND_POINTS: usize = 21;

/// BODY_25 index of each COCO-18 point: the same joints, minus MidHip (8) and the feet (19..25).
const BODY_25_TO_COCO_18: [usize; BODY_POINTS] = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18];
/// JSON field of each keypoint group, in drawing order.
const FIELDS: [&str; 4] =
    ["pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d", "face_keypoints_2d"];

/// One keypoint as OpenPose writes it: position and detection confidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keypoint {
    pub x: f64,
    pub y: f64,
    pub confidence: f64,
}

impl Keypoint {
    /// What OpenPose writes for a point it did not find.
    pub const MISSING: Keypoint = Keypoint { x: 0.0, y: 0.0, confidence: 0.0 };

    pub fn new(x: f64, y: f64, confidence: f64) -> Self {
        Self { x, y, confidence }
    }
    pub fn is_present(&self) -> bool {
        self.confidence > 0.0
    }
}

/// Whether A1111's ControlNet extension reads a group's coordinates as fractions of the canvas (its
/// `is_normalized`): every present point within [-1, 1] on both axes. A group without present points counts as
/// pixels (nothing of it is drawn either way).
pub fn is_normalized(points: &[Keypoint]) -> bool {
    let mut present = points.iter().filter(|p| p.is_present()).peekable();
    present.peek().is_some() && present.all(|p| p.x.abs() <= 1.0 && p.y.abs() <= 1.0)
}

/// One entry of `people`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Person {
    /// `pose_keypoints_2d`, COCO-18 order.
    pub body: Option<Vec<Keypoint>>,
    /// `hand_left_keypoints_2d`, 21 points.
    pub left_hand: Option<Vec<Keypoint>>,
    /// `hand_right_keypoints_2d`, 21 points.
    pub right_hand: Option<Vec<Keypoint>>,
    /// `face_keypoints_2d`.
    pub face: Option<Vec<Keypoint>>,
    /// Fields not interpreted here (`person_id`, `pose_keypoints_3d`, ...), written back unchanged.
    pub other: Map<String, Value>,
}

impl Person {
    /// The four groups in drawing order: body, left hand, right hand, face.
    pub fn groups(&self) -> [Option<&Vec<Keypoint>>; 4] {
        [self.body.as_ref(), self.left_hand.as_ref(), self.right_hand.as_ref(), self.face.as_ref()]
    }
    fn groups_mut(&mut self) -> [&mut Option<Vec<Keypoint>>; 4] {
        [&mut self.body, &mut self.left_hand, &mut self.right_hand, &mut self.face]
    }
}

/// One OpenPose JSON object: the people in one image and, when the writer recorded it, the canvas size.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoseFile {
    pub people: Vec<Person>,
    pub canvas_width: Option<u32>,
    pub canvas_height: Option<u32>,
    /// Fields not interpreted here (`version`, `animals`, ...), written back unchanged.
    pub other: Map<String, Value>,
}

/// A person as it is in the JSON, before validation.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RawPerson {
    #[serde(default)]
    pose_keypoints_2d: Option<Vec<f64>>,
    #[serde(default)]
    hand_left_keypoints_2d: Option<Vec<f64>>,
    #[serde(default)]
    hand_right_keypoints_2d: Option<Vec<f64>>,
    #[serde(default)]
    face_keypoints_2d: Option<Vec<f64>>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// A file object as it is in the JSON, before validation (people stay raw to report their index on error).
#[derive(Debug, Default, Serialize, Deserialize)]
struct RawPoseFile {
    #[serde(default)]
    people: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canvas_width: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canvas_height: Option<f64>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("pose JSON: {msg}"))
}

/// Flat `[x, y, c, ...]` → keypoints; `None` for an absent or empty group.
fn unflatten(numbers: Option<Vec<f64>>, person: usize, field: &str) -> Result<Option<Vec<Keypoint>>> {
    let Some(numbers) = numbers.filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if numbers.len() % 3 != 0 {
        return Err(invalid(format!(
            "person {person}: {field} has {} numbers, not a multiple of 3 (x, y, confidence per point)",
            numbers.len()
        )));
    }
    Ok(Some(numbers.chunks_exact(3).map(|c| Keypoint::new(c[0], c[1], c[2])).collect()))
}

fn flatten(points: &Option<Vec<Keypoint>>) -> Vec<f64> {
    points.iter().flatten().flat_map(|p| [p.x, p.y, p.confidence]).collect()
}

impl Person {
    fn from_raw(raw: RawPerson, index: usize) -> Result<Self> {
        let expect = |points: Option<Vec<Keypoint>>, field: &str, allowed: &[usize], what: &str| match points {
            Some(p) if !allowed.contains(&p.len()) => Err(invalid(format!(
                "person {index}: {field} has {} points ({} numbers); expected {what}",
                p.len(),
                p.len() * 3
            ))),
            other => Ok(other),
        };
        let body = expect(
            unflatten(raw.pose_keypoints_2d, index, FIELDS[0])?,
            FIELDS[0],
            &[BODY_POINTS, BODY_25_POINTS],
            "18 (COCO, as ControlNet draws) or 25 (OpenPose BODY_25)",
        )?
        .map(|b| match b.len() {
            BODY_25_POINTS => BODY_25_TO_COCO_18.iter().map(|&i| b[i]).collect(),
            _ => b,
        });
        let hand = |numbers, field: &str| expect(unflatten(numbers, index, field)?, field, &[HAND_POINTS], "21");
        Ok(Self {
            body,
            left_hand: hand(raw.hand_left_keypoints_2d, FIELDS[1])?,
            right_hand: hand(raw.hand_right_keypoints_2d, FIELDS[2])?,
            face: unflatten(raw.face_keypoints_2d, index, FIELDS[3])?,
            other: raw.other,
        })
    }

    fn to_raw(&self) -> RawPerson {
        // Absent groups are written as `[]`, as OpenPose does; every reader of the format accepts that.
        RawPerson {
            pose_keypoints_2d: Some(flatten(&self.body)),
            hand_left_keypoints_2d: Some(flatten(&self.left_hand)),
            hand_right_keypoints_2d: Some(flatten(&self.right_hand)),
            face_keypoints_2d: Some(flatten(&self.face)),
            other: self.other.clone(),
        }
    }
}

/// A canvas side from JSON: a whole number of pixels, at least 1.
fn canvas_side(value: Option<f64>, field: &str) -> Result<Option<u32>> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1.0 && v.fract() == 0.0 && v <= u32::MAX as f64 => Ok(Some(v as u32)),
        Some(v) => Err(invalid(format!("{field} is {v}; a canvas side is a whole number of pixels, at least 1"))),
    }
}

fn check_canvas(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(invalid(format!("canvas {width}×{height} is empty; both sides must be at least 1 pixel")));
    }
    Ok(())
}

impl PoseFile {
    /// Parses one OpenPose JSON object (a one-element list is accepted too; use [`PoseFile::list_from_json_str`]
    /// for files that hold several images' poses).
    pub fn from_json_str(json: &str) -> Result<Self> {
        let mut files = Self::list_from_json_str(json)?;
        match files.len() {
            1 => Ok(files.remove(0)),
            n => Err(invalid(format!("the file holds a list of {n} poses; expected one"))),
        }
    }

    /// Parses an OpenPose JSON object or a list of them (as A1111 writes for several images).
    pub fn list_from_json_str(json: &str) -> Result<Vec<Self>> {
        if json.trim().is_empty() {
            return Err(invalid("the input is empty; expected an object with \"people\""));
        }
        let value: Value = serde_json::from_str(json).map_err(invalid)?;
        match value {
            Value::Array(items) => items.into_iter().map(Self::from_value).collect(),
            value => Ok(vec![Self::from_value(value)?]),
        }
    }

    /// Reads [`PoseFile::list_from_json_str`] from a file; errors name the file.
    pub fn list_from_json_file(path: &Path) -> Result<Vec<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::list_from_json_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    /// Reads [`PoseFile::from_json_str`] from a file; errors name the file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    fn from_value(value: Value) -> Result<Self> {
        if !value.is_object() {
            return Err(invalid(format!("expected an object with \"people\", found {value}")));
        }
        let raw: RawPoseFile = serde_json::from_value(value).map_err(invalid)?;
        let people = raw
            .people
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let person = serde_json::from_value(v).map_err(|e| invalid(format!("person {i}: {e}")))?;
                Person::from_raw(person, i)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            people,
            canvas_width: canvas_side(raw.canvas_width, "canvas_width")?,
            canvas_height: canvas_side(raw.canvas_height, "canvas_height")?,
            other: raw.other,
        })
    }

    fn to_value(&self) -> Value {
        let raw = RawPoseFile {
            people: Some(self.people.iter().map(|p| serde_json::json!(p.to_raw())).collect()),
            canvas_width: self.canvas_width.map(f64::from),
            canvas_height: self.canvas_height.map(f64::from),
            other: self.other.clone(),
        };
        let mut value = serde_json::json!(raw);
        // Canvas sides are integers in every writer's output, not `512.0`.
        for (key, side) in [("canvas_width", self.canvas_width), ("canvas_height", self.canvas_height)] {
            if let Some(side) = side {
                value[key] = Value::from(side);
            }
        }
        value
    }

    /// OpenPose JSON (absent groups as `[]`, bodies as COCO-18).
    pub fn to_json_string(&self) -> String {
        self.to_value().to_string()
    }

    /// A list of poses as one JSON array.
    pub fn list_to_json_string(files: &[PoseFile]) -> String {
        Value::Array(files.iter().map(Self::to_value).collect()).to_string()
    }

    /// `(canvas_width, canvas_height)` when the file records both.
    pub fn canvas_size(&self) -> Option<(u32, u32)> {
        self.canvas_width.zip(self.canvas_height)
    }

    fn require_canvas(&self, why: &str) -> Result<(u32, u32)> {
        self.canvas_size().ok_or_else(|| {
            invalid(format!("{why} needs the canvas size, and the file has no canvas_width/canvas_height (set one)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A COCO-18 body in pixels, point i at (10 + i, 100 + 2i), with the given points missing.
    pub(super) fn body18(missing: &[usize]) -> Vec<f64> {
        (0..18)
            .flat_map(|i| match missing.contains(&i) {
                true => [0.0, 0.0, 0.0],
                false => [10.0 + i as f64, 100.0 + 2.0 * i as f64, 0.9],
            })
            .collect()
    }

    pub(super) fn file(people: Value, canvas: Option<(u32, u32)>) -> PoseFile {
        let mut v = serde_json::json!({ "people": people });
        if let Some((w, h)) = canvas {
            v["canvas_width"] = w.into();
            v["canvas_height"] = h.into();
        }
        PoseFile::from_json_str(&v.to_string()).unwrap()
    }

    fn err_of(json: &str) -> String {
        PoseFile::from_json_str(json).unwrap_err().to_string()
    }

    #[test]
    fn parses_groups_missing_points_and_extra_fields() {
        let json = serde_json::json!({
            "version": 1.3,
            "people": [{
                "person_id": [-1],
                "pose_keypoints_2d": body18(&[3]),
                "face_keypoints_2d": [],
                "hand_left_keypoints_2d": null,
                "hand_right_keypoints_2d": vec![1.0; 63],
            }],
            "canvas_width": 64.0, "canvas_height": 48,
        });
        let f = PoseFile::from_json_str(&json.to_string()).unwrap();
        assert_eq!(f.canvas_size(), Some((64, 48)));
        let p = &f.people[0];
        let body = p.body.as_ref().unwrap();
        assert_eq!(body.len(), 18);
        assert!(!body[3].is_present() && body[4].is_present());
        assert_eq!(body[5], Keypoint::new(15.0, 110.0, 0.9));
        assert!(p.left_hand.is_none() && p.face.is_none());
        assert_eq!(p.right_hand.as_ref().unwrap().len(), 21);
        assert_eq!(p.other["person_id"], serde_json::json!([-1]));
        assert_eq!(f.other["version"], serde_json::json!(1.3));

        // Round trip: everything kept, canvas written as integers, absent groups as [].
        let text = f.to_json_string();
        assert_eq!(PoseFile::from_json_str(&text).unwrap(), f);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["canvas_width"], serde_json::json!(64));
        assert_eq!(v["people"][0]["face_keypoints_2d"], serde_json::json!([]));
    }

    #[test]
    fn numbers_are_read_exactly_as_python_reads_them() {
        // Python's json gives the correctly rounded double; serde_json does too only with `float_roundtrip`
        // (its default fast path can be one ulp off on 17-digit numbers), and one ulp can move `int(x * W)`.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let values: Vec<f64> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 * 600.0
            })
            .collect();
        let texts: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        let json = format!(
            r#"{{"people": [{{"face_keypoints_2d": [{}]}}]}}"#,
            texts.iter().map(|t| format!("{t}, 1, 1")).collect::<Vec<_>>().join(", ")
        );
        let f = PoseFile::from_json_str(&json).unwrap();
        for (p, t) in f.people[0].face.as_ref().unwrap().iter().zip(&texts) {
            assert_eq!(p.x, t.parse::<f64>().unwrap(), "{t}");
        }
    }

    #[test]
    fn body_25_maps_to_coco_18() {
        // BODY_25 point i at x = i: COCO keeps 0..=7, skips MidHip (8), keeps 9..=18, drops the feet.
        let body25: Vec<f64> = (0..25).flat_map(|i| [i as f64, 1.0, 1.0]).collect();
        let f = file(serde_json::json!([{ "pose_keypoints_2d": body25 }]), None);
        let xs: Vec<f64> = f.people[0].body.as_ref().unwrap().iter().map(|p| p.x).collect();
        let expected: Vec<f64> =
            [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18].map(f64::from).to_vec();
        assert_eq!(xs, expected);
    }

    #[test]
    fn lists_and_empty_people() {
        let list = r#"[{"people": [], "canvas_width": 8, "canvas_height": 8}, {"people": []}]"#;
        let files = PoseFile::list_from_json_str(list).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files[0].people.is_empty() && files[1].canvas_size().is_none());
        assert!(err_of(list).contains("list of 2 poses"));
        assert_eq!(PoseFile::from_json_str(r#"[{"people": []}]"#).unwrap().people.len(), 0);
        // `{}` is a pose with nobody in it (renders black at a given size).
        assert!(PoseFile::from_json_str("{}").unwrap().people.is_empty());
        let back = PoseFile::list_from_json_str(&PoseFile::list_to_json_string(&files)).unwrap();
        assert_eq!(back, files);
    }

    #[test]
    fn parse_errors_name_the_person_and_field() {
        assert!(err_of("").contains("empty"));
        assert!(err_of("  \n").contains("empty"));
        assert!(err_of("{\"people\": [").contains("pose JSON"));
        assert!(err_of("42").contains("expected an object"));
        let e = err_of(r#"{"people": [{}, {"hand_left_keypoints_2d": [1, 2]}]}"#);
        assert!(e.contains("person 1") && e.contains("hand_left_keypoints_2d") && e.contains("multiple of 3"), "{e}");
        let e = err_of(&serde_json::json!({ "people": [{ "pose_keypoints_2d": vec![1.0; 17 * 3] }] }).to_string());
        assert!(e.contains("person 0") && e.contains("pose_keypoints_2d") && e.contains("17 points"), "{e}");
        let e =
            err_of(&serde_json::json!({ "people": [{ "hand_right_keypoints_2d": vec![1.0; 20 * 3] }] }).to_string());
        assert!(e.contains("hand_right_keypoints_2d") && e.contains("expected 21"), "{e}");
        let e = err_of(r#"{"people": [{"pose_keypoints_2d": "x"}]}"#);
        assert!(e.contains("person 0"), "{e}");
        assert!(err_of(r#"{"people": [], "canvas_width": 0, "canvas_height": 5}"#).contains("canvas_width is 0"));
        assert!(err_of(r#"{"people": [], "canvas_width": 5.5, "canvas_height": 5}"#).contains("whole number"));
        assert!(PoseFile::default().with_canvas(0, 4).is_err());
        assert!(PoseFile::default().scale(f64::NAN, 1.0).is_err());
    }

    #[test]
    fn normalised_detection_follows_a1111() {
        let k = |x, y, c| Keypoint::new(x, y, c);
        assert!(is_normalized(&[k(0.5, 0.5, 1.0), k(-0.2, 1.0, 1.0), k(300.0, 2.0, 0.0)]));
        assert!(!is_normalized(&[k(0.5, 0.5, 1.0), k(1.01, 0.5, 1.0)]));
        assert!(!is_normalized(&[k(0.5, 0.5, 0.0)]));
        assert!(!is_normalized(&[]));
    }
}
