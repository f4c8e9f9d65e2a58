//! The skeleton image ControlNet's openpose models were trained on: controlnet_aux's `draw_poses` (= ControlNet
//! 1.1's `draw_bodypose`, `draw_handpose`, `draw_facepose`, with A1111's pixel/normalised reading) on a black canvas.
//!
//! Order, as in the reference: per person, body limbs, body joints, left hand, right hand, face; every shape is
//! painted over what is there (no blending). The float → int steps are Python's `int()` (truncation toward zero),
//! done at the same places, and the shapes are OpenCV's (see [`crate::annotate::draw`]).
use image::RgbImage;

use super::{is_normalized, Keypoint, PoseFile, FIELDS};
use crate::annotate::draw::{ellipse_to_poly, fill_circle, fill_convex_poly, line, Color, Point};
use crate::{Error, Result};

/// Half-width of a limb ellipse, pixels.
const STICK_WIDTH: i64 = 4;
/// Body limbs as 1-based COCO-18 pairs (neck–shoulders, arms, neck–hips, legs, neck–nose, nose–eyes–ears),
/// limb i drawn in `BODY_COLORS[i]`.
const LIMBS: [(usize, usize); 17] = [
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
];
/// One colour per COCO-18 joint (a hue sweep), RGB.
const BODY_COLORS: [Color; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];
/// Limbs are drawn at 60% of their colour (ControlNet 1.1; 1.0 alpha-blended full colour instead).
const LIMB_SHADE: f64 = 0.6;
const BODY_JOINT_RADIUS: i64 = 4;
/// Hand bones: wrist to each finger's four joints.
const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];
const HAND_LINE_THICKNESS: i64 = 2;
const HAND_JOINT_RADIUS: i64 = 4;
const HAND_JOINT_COLOR: Color = [0, 0, 255];
const FACE_DOT_RADIUS: i64 = 3;
const FACE_DOT_COLOR: Color = [255, 255, 255];
/// Keypoints farther than this from the canvas (in pixels) are refused: OpenCV would scan every row between
/// them and the canvas, and Python's `int` → C `int` conversion fails beyond 2^31 anyway.
const MAX_DISTANCE_PX: f64 = 1_000_000.0;
/// Largest canvas side rendered (a 3-byte-per-pixel buffer of 32768² is 3 GiB already).
const MAX_CANVAS_SIDE: u32 = 32_768;

/// Which parts of each person to draw (the `draw_body`, `draw_hand`, `draw_face` of `draw_poses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawOptions {
    pub body: bool,
    pub hands: bool,
    pub face: bool,
}

impl Default for DrawOptions {
    /// Everything the file holds, as `draw_poses` defaults to.
    fn default() -> Self {
        Self { body: true, hands: true, face: true }
    }
}

/// Python's `int(v)` on a float: truncation toward zero.
fn int(v: f64) -> i64 {
    v as i64
}

/// Colour of hand bone `edge`: matplotlib's `hsv_to_rgb([edge / 20, 1, 1]) * 255` in float64, then OpenCV's
/// conversion of a float colour to bytes (round half to even, saturate).
fn hand_edge_color(edge: usize) -> Color {
    let (s, v) = (1.0f64, 1.0f64);
    let h = edge as f64 / HAND_EDGES.len() as f64;
    let sector = (h * 6.0) as i64;
    let f = h * 6.0 - sector as f64;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let rgb = match sector % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    };
    rgb.map(|c| (c * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
}

/// `draw_bodypose`: limbs as filled ellipses (long axis = the limb, short = [`STICK_WIDTH`]), then joints.
fn draw_body(img: &mut RgbImage, joints: &[Option<(f64, f64)>]) {
    for limb in 0..LIMBS.len() {
        draw_limb(img, joints, limb);
    }
    for joint in 0..joints.len().min(BODY_COLORS.len()) {
        draw_joint(img, joints, joint);
    }
}

/// Limb `limb` of one body (when both its joints are there), already shaded.
fn draw_limb(img: &mut RgbImage, joints: &[Option<(f64, f64)>], limb: usize) {
    let (a, b) = LIMBS[limb];
    let (Some((x1, y1)), Some((x2, y2))) = (joints[a - 1], joints[b - 1]) else {
        return;
    };
    let (mean_x, mean_y) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
    let length = ((y1 - y2) * (y1 - y2) + (x1 - x2) * (x1 - x2)).sqrt();
    // The reference calls rows X and columns Y: atan2(row difference, column difference).
    let angle = (y1 - y2).atan2(x1 - x2).to_degrees();
    let polygon =
        ellipse_to_poly(Point::new(int(mean_x), int(mean_y)), (int(length / 2.0), STICK_WIDTH), int(angle), 0, 360, 1);
    fill_convex_poly(img, &polygon, BODY_COLORS[limb].map(|c| int(f64::from(c) * LIMB_SHADE) as u8));
}

/// Joint `joint` of one body as a dot in its colour.
fn draw_joint(img: &mut RgbImage, joints: &[Option<(f64, f64)>], joint: usize) {
    if let Some((x, y)) = joints[joint] {
        fill_circle(img, Point::new(int(x), int(y)), BODY_JOINT_RADIUS, BODY_COLORS[joint]);
    }
}

/// Every person's parts in canvas pixels (`None`: not drawn), for [`render_part_by_part`].
#[derive(Debug, Clone, Default)]
pub struct PixelPoses {
    /// COCO-18 joints of each body.
    pub bodies: Vec<Vec<Option<(f64, f64)>>>,
    /// 21 points of each hand, every left hand and then every right hand.
    pub hands: Vec<Vec<Option<(f64, f64)>>>,
    /// The points of each face.
    pub faces: Vec<Vec<Option<(f64, f64)>>>,
}

/// DWPose's `draw_pose` (controlnet_aux 0.0.10's `dwpose/`): the same shapes as [`PoseFile::render`] in another
/// order, part by part across people: each limb of every body (limb by limb, shading the limbs once they are
/// all drawn, as 60% of their colour), each joint of every body (joint by joint), every hand, every face.
pub fn render_part_by_part(width: u32, height: u32, poses: &PixelPoses, opts: DrawOptions) -> Result<RgbImage> {
    super::check_canvas(width, height)?;
    if width.max(height) > MAX_CANVAS_SIDE {
        return Err(Error::Invalid(format!(
            "pose: canvas {width}×{height} is larger than {MAX_CANVAS_SIDE} px on a side"
        )));
    }
    let limit = MAX_DISTANCE_PX + f64::from(width.max(height));
    let groups = [("body", &poses.bodies), ("hand", &poses.hands), ("face", &poses.faces)];
    for (what, group) in groups {
        for (i, points) in group.iter().enumerate() {
            if let Some((x, y)) = points.iter().flatten().find(|(x, y)| !(x.abs() <= limit && y.abs() <= limit)) {
                return Err(Error::Invalid(format!(
                    "pose: {what} {i} has a point at ({x}, {y}) px, more than {MAX_DISTANCE_PX} px outside the \
                     {width}×{height} canvas"
                )));
            }
        }
    }
    let mut img = RgbImage::new(width, height);
    if opts.body {
        for limb in 0..LIMBS.len() {
            poses.bodies.iter().for_each(|joints| draw_limb(&mut img, joints, limb));
        }
        for joint in 0..BODY_COLORS.len() {
            poses.bodies.iter().filter(|j| joint < j.len()).for_each(|joints| draw_joint(&mut img, joints, joint));
        }
    }
    if opts.hands {
        poses.hands.iter().for_each(|hand| draw_hand(&mut img, hand));
    }
    if opts.face {
        poses.faces.iter().for_each(|face| draw_face(&mut img, face));
    }
    Ok(img)
}

/// `draw_handpose`: bones as 2-px lines coloured round the hue circle, then blue joints. Points in row or column 0
/// (or beyond, negative) are skipped: the reference compares their integer pixel with `eps = 0.01`.
fn draw_hand(img: &mut RgbImage, joints: &[Option<(f64, f64)>]) {
    let visible = |p: Option<(f64, f64)>| p.map(|(x, y)| Point::new(int(x), int(y))).filter(|p| p.x > 0 && p.y > 0);
    for (edge, &(a, b)) in HAND_EDGES.iter().enumerate() {
        // An edge with a missing end is skipped before its coordinates are looked at.
        if let (Some(p1), Some(p2)) = (visible(joints[a]), visible(joints[b])) {
            line(img, p1, p2, hand_edge_color(edge), HAND_LINE_THICKNESS);
        }
    }
    for &joint in joints {
        if let Some(p) = visible(joint) {
            fill_circle(img, p, HAND_JOINT_RADIUS, HAND_JOINT_COLOR);
        }
    }
}

/// `draw_facepose`: white dots, with the same `> eps` test as hands.
fn draw_face(img: &mut RgbImage, points: &[Option<(f64, f64)>]) {
    for p in points.iter().flatten() {
        let (x, y) = (int(p.0), int(p.1));
        if x > 0 && y > 0 {
            fill_circle(img, Point::new(x, y), FACE_DOT_RADIUS, FACE_DOT_COLOR);
        }
    }
}

impl PoseFile {
    /// Draws every person on a black `width × height` canvas, as controlnet_aux / A1111 do. Normalised groups are
    /// scaled to this canvas; pixel groups are drawn where they are (see [`PoseFile::resize_canvas`] to move them
    /// with a new size). Channel order is RGB, as in the reference's output image.
    pub fn render(&self, width: u32, height: u32, opts: DrawOptions) -> Result<RgbImage> {
        super::check_canvas(width, height)?;
        if width.max(height) > MAX_CANVAS_SIDE {
            return Err(Error::Invalid(format!(
                "pose: canvas {width}×{height} is larger than {MAX_CANVAS_SIDE} px on a side"
            )));
        }
        let mut img = RgbImage::new(width, height);
        for (person_index, person) in self.people.iter().enumerate() {
            let enabled = [opts.body, opts.hands, opts.hands, opts.face];
            for (group_index, group) in person.groups().into_iter().enumerate() {
                let Some(points) = group.filter(|_| enabled[group_index]) else {
                    continue;
                };
                let joints = to_canvas(points, width, height, person_index, group_index)?;
                match group_index {
                    0 => draw_body(&mut img, &joints),
                    1 | 2 => draw_hand(&mut img, &joints),
                    _ => draw_face(&mut img, &joints),
                }
            }
        }
        Ok(img)
    }

    /// The image at an output size: the file's canvas, or `width`/`height` with the keypoints rescaled with the
    /// canvas (one side given: the other keeps the canvas's). A file without a canvas needs both. Sizes are
    /// checked before anything is allocated.
    pub fn render_at(&self, width: Option<u32>, height: Option<u32>, opts: DrawOptions) -> Result<RgbImage> {
        for (name, v) in [("width", width), ("height", height)] {
            if v == Some(0) {
                return Err(Error::setting(name, "must be at least 1, got 0"));
            }
        }
        let no_canvas =
            || Error::Invalid("the pose has no canvas_width/canvas_height; give both the width and the height".into());
        let pose = match (width, height, self.canvas_size()) {
            (None, None, _) => self.clone(),
            (w, h, Some((cw, ch))) => self.resize_canvas(w.unwrap_or(cw), h.unwrap_or(ch))?,
            (Some(w), Some(h), None) => self.with_canvas(w, h)?,
            _ => return Err(no_canvas()),
        };
        let (w, h) = pose.canvas_size().ok_or_else(no_canvas)?;
        let setting = if height.is_some() && width.is_none() { "height" } else { "width" };
        crate::annotate::check_image_size(setting, w, h)?;
        pose.render_canvas(opts)
    }

    /// [`PoseFile::render`] at the file's own `canvas_width × canvas_height`.
    pub fn render_canvas(&self, opts: DrawOptions) -> Result<RgbImage> {
        let (w, h) = self.require_canvas("rendering at the file's size")?;
        self.render(w, h, opts)
    }
}

/// Present points in canvas pixels, exactly as the reference computes them: `x * W` for normalised groups and
/// `x * 1.0` for pixel groups.
fn to_canvas(
    points: &[Keypoint],
    width: u32,
    height: u32,
    person: usize,
    group: usize,
) -> Result<Vec<Option<(f64, f64)>>> {
    let (sx, sy) = match is_normalized(points) {
        true => (f64::from(width), f64::from(height)),
        false => (1.0, 1.0),
    };
    let limit = MAX_DISTANCE_PX + f64::from(width.max(height));
    points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if !p.is_present() {
                return Ok(None);
            }
            let (x, y) = (p.x * sx, p.y * sy);
            if !(x.abs() <= limit && y.abs() <= limit) {
                return Err(Error::Invalid(format!(
                    "pose: person {person}: {} point {i} is at ({x}, {y}) px, more than {MAX_DISTANCE_PX} px \
                     outside the {width}×{height} canvas",
                    FIELDS[group]
                )));
            }
            Ok(Some((x, y)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pose/");

    /// One entry of tools/fixtures/gen_pose.py's cases.json.
    #[derive(Deserialize)]
    struct Case {
        name: String,
        json: String,
        png: String,
        width: u32,
        height: u32,
        frame: usize,
        body: bool,
        hands: bool,
        face: bool,
    }

    /// (PSNR in dB over all channels, fraction of pixels equal in all channels).
    fn compare(a: &RgbImage, b: &RgbImage) -> (f64, f64) {
        assert_eq!(a.dimensions(), b.dimensions());
        let sq: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
        let mse = sq / a.as_raw().len() as f64;
        let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() };
        let equal = a.pixels().zip(b.pixels()).filter(|(p, q)| p == q).count();
        (psnr, equal as f64 / (a.width() * a.height()) as f64)
    }

    #[test]
    fn renders_like_controlnet_aux_draw_poses() {
        let manifest = std::fs::read_to_string(format!("{FIXTURES}cases.json")).unwrap();
        let cases: Vec<Case> = serde_json::from_str(&manifest).unwrap();
        assert!(cases.len() >= 6);
        for case in cases {
            let files =
                PoseFile::list_from_json_file(std::path::Path::new(&format!("{FIXTURES}{}", case.json))).unwrap();
            let pose = &files[case.frame];
            let opts = DrawOptions { body: case.body, hands: case.hands, face: case.face };
            let img = pose.render(case.width, case.height, opts).unwrap();
            if pose.canvas_size().is_some() {
                assert_eq!(pose.render_canvas(opts).unwrap(), img);
            }
            let reference = image::open(format!("{FIXTURES}{}", case.png)).unwrap().to_rgb8();
            let (psnr, equal) = compare(&img, &reference);
            eprintln!("{}: PSNR {psnr:.2} dB, {:.4}% of pixels equal", case.name, 100.0 * equal);
            assert!(psnr >= 40.0, "{}: PSNR {psnr:.2} dB < 40 dB", case.name);
        }
    }

    #[test]
    fn hand_colours_match_matplotlib_then_opencv_rounding() {
        // Printed by cv2.line with matplotlib.colors.hsv_to_rgb([i / 20, 1, 1]) * 255 (cv2 5.0, matplotlib 3.11):
        // 76.50000000000001 → 77 but 229.49999999999997 → 229 and 127.5 → 128 (half to even).
        let expected: [Color; 20] = [
            [255, 0, 0],
            [255, 77, 0],
            [255, 153, 0],
            [255, 229, 0],
            [204, 255, 0],
            [128, 255, 0],
            [51, 255, 0],
            [0, 255, 25],
            [0, 255, 102],
            [0, 255, 179],
            [0, 255, 255],
            [0, 178, 255],
            [0, 102, 255],
            [0, 25, 255],
            [51, 0, 255],
            [128, 0, 255],
            [204, 0, 255],
            [255, 0, 230],
            [255, 0, 153],
            [255, 0, 77],
        ];
        for (i, c) in expected.iter().enumerate() {
            assert_eq!(hand_edge_color(i), *c, "edge {i}");
        }
    }

    #[test]
    fn nobody_renders_black_and_bad_sizes_fail() {
        let empty = PoseFile::default();
        let img = empty.render(7, 5, DrawOptions::default()).unwrap();
        assert_eq!(img.dimensions(), (7, 5));
        assert!(img.pixels().all(|p| p.0 == [0, 0, 0]));
        assert!(empty.render(0, 5, DrawOptions::default()).is_err());
        assert!(empty.render(5, 1 << 20, DrawOptions::default()).is_err());
        assert!(empty.render_canvas(DrawOptions::default()).unwrap_err().to_string().contains("canvas"));
    }

    #[test]
    fn far_away_points_are_an_error_not_a_hang() {
        let json = r#"{"people": [{"face_keypoints_2d": [5, 5, 1, 3e9, 5, 1]}]}"#;
        let e = PoseFile::from_json_str(json).unwrap().render(8, 8, DrawOptions::default()).unwrap_err();
        assert!(e.to_string().contains("face_keypoints_2d point 1"), "{e}");
    }

    /// Output sizes: the canvas, one side kept to the canvas's aspect, refusals named by setting.
    #[test]
    fn render_at_sizes() {
        let pose = PoseFile::from_json_str(r#"{"people": [], "canvas_width": 64, "canvas_height": 32}"#).unwrap();
        let opts = DrawOptions::default();
        assert_eq!(pose.render_at(None, None, opts).unwrap().dimensions(), (64, 32));
        assert_eq!(pose.render_at(Some(128), None, opts).unwrap().dimensions(), (128, 32));
        assert_eq!(pose.render_at(None, Some(0), opts).unwrap_err().to_string(), "height: must be at least 1, got 0");
        let err = pose.render_at(Some(100_000), Some(100_000), opts).unwrap_err().to_string();
        assert!(err.starts_with("width: ") && err.contains("100000x100000"), "{err}");
        let bare = PoseFile::from_json_str(r#"{"people": []}"#).unwrap();
        assert!(bare.render_at(Some(8), None, opts).unwrap_err().to_string().contains("no canvas_width"));
        assert_eq!(bare.render_at(Some(8), Some(4), opts).unwrap().dimensions(), (8, 4));
    }
}
