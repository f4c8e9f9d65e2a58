//! Editing poses: flip, scale, translate, resize the canvas, merge files, drop unsure points.
//!
//! Geometric edits work in pixels: a normalised group is first multiplied by the canvas size (so those need
//! one), and the result is written in pixels. Missing points stay `0, 0, 0`.
use super::{check_canvas, invalid, is_normalized, Keypoint, PoseFile, FIELDS};
use crate::{Error, Result};

/// COCO-18 right/left pairs (shoulder, elbow, wrist, hip, knee, ankle, eye, ear), swapped by a mirror.
const BODY_MIRROR_PAIRS: [(usize, usize); 8] = [(2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17)];
/// The mirror image of each of the 68 iBUG face landmarks (OpenPose adds the two pupils, 68 ↔ 69).
const FACE_68_MIRROR: [usize; 68] = [
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, // jaw
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17, // eyebrows
    27, 28, 29, 30, 35, 34, 33, 32, 31, // nose bridge, nostrils
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, // eyes
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, // outer lips
    64, 63, 62, 61, 60, 67, 66, 65, // inner lips
];

/// Edit parameters must be numbers: JSON has no NaN or infinity to write the result with.
fn finite(values: &[f64], what: &str) -> Result<()> {
    match values.iter().all(|v| v.is_finite()) {
        true => Ok(()),
        false => Err(Error::Invalid(format!("pose: {what} must be finite numbers, got {values:?}"))),
    }
}

/// Keypoint edits, applied in this order: merge, flip, scale, translate (what `annotate pose` offers).
#[derive(Debug, Clone, Default)]
pub struct PoseEdits {
    /// Poses whose people are added (same canvas).
    pub merge: Vec<PoseFile>,
    /// Mirror left-right.
    pub flip: bool,
    /// Scale about the canvas origin.
    pub scale: Option<f64>,
    /// Move right and down, in pixels.
    pub translate: Option<(f64, f64)>,
}

impl PoseEdits {
    /// `pose` with the edits applied.
    pub fn apply(&self, pose: PoseFile) -> Result<PoseFile> {
        let mut pose = pose;
        for other in &self.merge {
            pose = pose.merge(other)?;
        }
        if self.flip {
            pose = pose.flip_horizontal()?;
        }
        if let Some(f) = self.scale {
            pose = pose.scale(f, f)?;
        }
        if let Some((dx, dy)) = self.translate {
            pose = pose.translate(dx, dy)?;
        }
        Ok(pose)
    }
}

impl PoseFile {
    /// The same poses on a canvas of the given size; coordinates are left as they are.
    pub fn with_canvas(&self, width: u32, height: u32) -> Result<Self> {
        check_canvas(width, height)?;
        Ok(Self { canvas_width: Some(width), canvas_height: Some(height), ..self.clone() })
    }

    /// Applies `f(group index, points)` to every present group of every person.
    fn map_groups(&self, mut f: impl FnMut(usize, usize, &[Keypoint]) -> Result<Vec<Keypoint>>) -> Result<Self> {
        let mut out = self.clone();
        for (person_index, person) in out.people.iter_mut().enumerate() {
            for (group_index, group) in person.groups_mut().into_iter().enumerate() {
                if let Some(points) = group {
                    *points = f(person_index, group_index, points)?;
                }
            }
        }
        Ok(out)
    }

    /// Moves every present point; missing points stay `0, 0, 0`.
    fn map_points(points: &[Keypoint], f: impl Fn(f64, f64) -> (f64, f64)) -> Vec<Keypoint> {
        points
            .iter()
            .map(|p| match p.is_present() {
                true => {
                    let (x, y) = f(p.x, p.y);
                    Keypoint::new(x, y, p.confidence)
                }
                false => *p,
            })
            .collect()
    }

    /// Every group in pixels: normalised groups (see [`is_normalized`]) are multiplied by the canvas size.
    pub fn to_pixels(&self) -> Result<Self> {
        self.map_groups(|person, group, points| {
            if !is_normalized(points) {
                return Ok(points.to_vec());
            }
            let (w, h) = self.require_canvas(&format!("person {person}: normalised {}", FIELDS[group]))?;
            Ok(Self::map_points(points, |x, y| (x * f64::from(w), y * f64::from(h))))
        })
    }

    /// Every group as fractions of the canvas. A reader that applies A1111's rule takes a group back as pixels if
    /// one of its points lies beyond ±1 canvas (e.g. right of the canvas), so keep such files in pixels.
    pub fn to_normalized(&self) -> Result<Self> {
        let (w, h) = self.require_canvas("normalising")?;
        self.to_pixels()?
            .map_groups(|_, _, points| Ok(Self::map_points(points, |x, y| (x / f64::from(w), y / f64::from(h)))))
    }

    /// `(x, y) → (sx·x, sy·y)` in pixels (normalised groups are converted first); the canvas is unchanged.
    pub fn scale(&self, sx: f64, sy: f64) -> Result<Self> {
        finite(&[sx, sy], "scale factors")?;
        self.to_pixels()?.map_groups(|_, _, points| Ok(Self::map_points(points, |x, y| (x * sx, y * sy))))
    }

    /// `(x, y) → (x + dx, y + dy)` in pixels (normalised groups are converted first).
    pub fn translate(&self, dx: f64, dy: f64) -> Result<Self> {
        finite(&[dx, dy], "translation")?;
        self.to_pixels()?.map_groups(|_, _, points| Ok(Self::map_points(points, |x, y| (x + dx, y + dy))))
    }

    /// The pose of the mirrored image: `x → canvas_width − x` (a mirror of the canvas, under the renderer's
    /// convention that pixel i spans [i, i+1)), and left/right swapped (body joints, hands, face landmarks), as a
    /// detector labels a mirrored person. Without the swap the colours would say "right arm" on the mirrored left
    /// arm, which the models read as a person seen from behind.
    pub fn flip_horizontal(&self) -> Result<Self> {
        let (w, _) = self.require_canvas("flipping")?;
        let width = f64::from(w);
        let mut out =
            self.to_pixels()?.map_groups(|_, _, points| Ok(Self::map_points(points, |x, y| (width - x, y))))?;
        for person in &mut out.people {
            if let Some(body) = &mut person.body {
                for &(r, l) in &BODY_MIRROR_PAIRS {
                    body.swap(r, l);
                }
            }
            std::mem::swap(&mut person.left_hand, &mut person.right_hand);
            if let Some(face) = &mut person.face {
                if face.len() == 68 || face.len() == 70 {
                    let mirrored: Vec<Keypoint> = (0..face.len())
                        .map(|i| match i {
                            68 => face[69],
                            69 => face[68],
                            i => face[FACE_68_MIRROR[i]],
                        })
                        .collect();
                    *face = mirrored;
                }
            }
        }
        Ok(out)
    }

    /// The same poses on a `width × height` canvas: pixel coordinates are scaled by the size ratio on each axis
    /// (normalised groups already follow the canvas and stay as they are).
    pub fn resize_canvas(&self, width: u32, height: u32) -> Result<Self> {
        check_canvas(width, height)?;
        let (old_w, old_h) = self.require_canvas("resizing the canvas")?;
        let (sx, sy) = (f64::from(width) / f64::from(old_w), f64::from(height) / f64::from(old_h));
        let mut out = self.map_groups(|_, _, points| {
            Ok(match is_normalized(points) {
                true => points.to_vec(),
                false => Self::map_points(points, |x, y| (x * sx, y * sy)),
            })
        })?;
        out.canvas_width = Some(width);
        out.canvas_height = Some(height);
        Ok(out)
    }

    /// The people of both files on one canvas. The canvases must agree where both are known (resize one first).
    pub fn merge(&self, other: &PoseFile) -> Result<Self> {
        let pick = |a: Option<u32>, b: Option<u32>, field: &str| match (a, b) {
            (Some(a), Some(b)) if a != b => Err(invalid(format!(
                "cannot merge poses with different {field} ({a} and {b}); resize one canvas first"
            ))),
            (a, b) => Ok(a.or(b)),
        };
        let mut people = self.people.clone();
        people.extend(other.people.iter().cloned());
        Ok(Self {
            people,
            canvas_width: pick(self.canvas_width, other.canvas_width, "canvas_width")?,
            canvas_height: pick(self.canvas_height, other.canvas_height, "canvas_height")?,
            other: self.other.clone(),
        })
    }

    /// Marks points below `min_confidence` as missing (`0, 0, 0`). `1.0` reproduces A1111's reading, which drops
    /// every point with confidence under 1 (harmless on its own files, drastic on OpenPose's).
    pub fn with_min_confidence(&self, min_confidence: f64) -> Self {
        let mut out = self.clone();
        for person in &mut out.people {
            for points in person.groups_mut().into_iter().flatten() {
                for p in points.iter_mut().filter(|p| p.confidence < min_confidence) {
                    *p = Keypoint::MISSING;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{body18, file};
    use super::*;

    #[test]
    fn keypoint_operations() {
        // Person 0 in pixels, person 1 normalised on a 200×100 canvas.
        let people = serde_json::json!([
            { "pose_keypoints_2d": body18(&[0]) },
            { "hand_left_keypoints_2d": (0..21).flat_map(|i| [0.01 * i as f64, 0.5, 1.0]).collect::<Vec<_>>() },
        ]);
        let f = file(people, Some((200, 100)));
        let px = f.to_pixels().unwrap();
        let hand = px.people[1].left_hand.as_ref().unwrap();
        assert_eq!((hand[3].x, hand[3].y), (0.01 * 3.0 * 200.0, 50.0));
        assert_eq!(px.people[0], f.people[0]);

        let t = f.translate(5.0, -2.0).unwrap();
        let b = t.people[0].body.as_ref().unwrap();
        assert_eq!((b[1].x, b[1].y, b[1].confidence), (16.0, 100.0, 0.9));
        assert_eq!(b[0], Keypoint::MISSING, "missing points do not move");
        assert_eq!(t.people[1].left_hand.as_ref().unwrap()[3].x, 0.01 * 3.0 * 200.0 + 5.0);

        let s = f.scale(2.0, 0.5).unwrap();
        let b = s.people[0].body.as_ref().unwrap();
        assert_eq!((b[2].x, b[2].y), (24.0, 52.0));

        let r = f.resize_canvas(400, 50).unwrap();
        assert_eq!(r.canvas_size(), Some((400, 50)));
        let b = r.people[0].body.as_ref().unwrap();
        assert_eq!((b[2].x, b[2].y), (24.0, 52.0));
        assert_eq!(r.people[1], f.people[1], "normalised groups follow the canvas by themselves");

        // Flip: x → 200 − x, right/left joints swapped (COCO 2 = right shoulder ↔ 5 = left shoulder), hands swapped.
        let fl = f.flip_horizontal().unwrap();
        let b = fl.people[0].body.as_ref().unwrap();
        assert_eq!((b[2].x, b[2].y), (200.0 - 15.0, 110.0));
        assert_eq!((b[5].x, b[5].y), (200.0 - 12.0, 104.0));
        assert_eq!((b[1].x, b[1].y), (200.0 - 11.0, 102.0));
        assert_eq!(b[0], Keypoint::MISSING);
        assert!(fl.people[1].left_hand.is_none());
        assert_eq!(fl.people[1].right_hand.as_ref().unwrap()[3].x, 200.0 - 0.01 * 3.0 * 200.0);
        // Flipping twice restores the pose in pixels (up to the rounding of 200 − (200 − x)).
        let twice = fl.flip_horizontal().unwrap();
        for (a, b) in twice.people.iter().zip(&px.people) {
            for (ga, gb) in a.groups().into_iter().zip(b.groups()) {
                for (p, q) in ga.into_iter().flatten().zip(gb.into_iter().flatten()) {
                    assert!((p.x - q.x).abs() < 1e-12 && p.y == q.y && p.confidence == q.confidence);
                }
            }
        }

        let n = f.to_normalized().unwrap();
        assert_eq!(n.people[0].body.as_ref().unwrap()[2].x, 12.0 / 200.0);

        let m = f.merge(&file(serde_json::json!([{}]), None)).unwrap();
        assert_eq!((m.people.len(), m.canvas_size()), (3, Some((200, 100))));
        let e = f.merge(&file(serde_json::json!([]), Some((201, 100)))).unwrap_err().to_string();
        assert!(e.contains("canvas_width") && e.contains("200") && e.contains("201"), "{e}");

        let c = f.with_min_confidence(1.0);
        assert!(c.people[0].body.as_ref().unwrap().iter().all(|p| *p == Keypoint::MISSING));
        assert_eq!(c.people[1], f.people[1]);
    }

    #[test]
    fn face_flip_mirrors_landmarks() {
        for (i, &j) in FACE_68_MIRROR.iter().enumerate() {
            assert_eq!(FACE_68_MIRROR[j], i, "the mirror map is an involution");
        }
        let face: Vec<f64> = (0..70).flat_map(|i| [10.0 + i as f64, 5.0, 1.0]).collect();
        let f = file(serde_json::json!([{ "face_keypoints_2d": face }]), Some((100, 100)));
        let flipped = f.flip_horizontal().unwrap();
        let face = flipped.people[0].face.as_ref().unwrap();
        assert_eq!(face[0].x, 100.0 - 26.0, "jaw start ↔ jaw end (landmark 16)");
        assert_eq!(face[68].x, 100.0 - 79.0, "pupils swap");
    }

    #[test]
    fn operations_on_normalised_groups_need_a_canvas() {
        let people = serde_json::json!([{ "face_keypoints_2d": [0.5, 0.5, 1.0] }]);
        let e = file(people.clone(), None).translate(1.0, 1.0).unwrap_err().to_string();
        assert!(e.contains("person 0") && e.contains("face_keypoints_2d") && e.contains("canvas"), "{e}");
        assert!(file(people, None).flip_horizontal().is_err());
        // Pixel files need none for scale/translate.
        let f = file(serde_json::json!([{ "face_keypoints_2d": [5.0, 5.0, 1.0] }]), None);
        assert_eq!(f.translate(1.0, 0.0).unwrap().people[0].face.as_ref().unwrap()[0].x, 6.0);
    }
}
