//! OpenCV's aliased (LINE_8) drawing primitives, reproduced pixel for pixel.
//!
//! ControlNet's condition images (openpose skeletons, MLSD lines, ...) were drawn with OpenCV, and the models
//! learnt OpenCV's exact pixels: which border pixels an ellipse covers, how a 2-px line ends. A generic rasteriser
//! lands within a pixel but not on it, so this module re-derives the integer arithmetic of
//! `modules/imgproc/src/drawing.cpp`: `ellipse2Poly`, `fillConvexPoly`, filled `circle` and `line`.
//!
//! Conventions kept from OpenCV: points are integer pixel centres; everything is clipped to the image (points may
//! lie far outside); colours are written as given, channel order is the caller's business; no blending.
use std::sync::OnceLock;

use image::RgbImage;

/// OpenCV's fixed-point precision inside the polygon filler: 16 fraction bits.
const XY_SHIFT: u32 = 16;
/// 1.0 in that fixed point.
const XY_ONE: i64 = 1 << XY_SHIFT;
/// 0.5 in that fixed point: rounding offset when going back to whole pixels.
const XY_HALF: i64 = XY_ONE >> 1;

/// An 8-bit RGB colour as written into the image.
pub type Color = [u8; 3];

/// An integer point (x = column, y = row). Fixed-point points inside this module use the same type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub x: i64,
    pub y: i64,
}

impl Point {
    pub fn new(x: i64, y: i64) -> Self {
        Self { x, y }
    }
    fn shl(self, s: u32) -> Self {
        Self::new(self.x << s, self.y << s)
    }
}

/// `cvRound`: round half to even, as the SSE2 conversion OpenCV uses does.
fn cv_round(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// OpenCV's sine table, sin(k°) for k = 0..=450 (cos(k°) = table[450 - k]) as `float` literals rounded to 7
/// decimals. Rebuilt the same way (7-decimal rounding, then f32) instead of pasted: no value is near a tie.
fn sin_table() -> &'static [f32; 451] {
    static TABLE: OnceLock<[f32; 451]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0f32; 451];
        for (deg, v) in table.iter_mut().enumerate() {
            let s = (deg as f64).to_radians().sin();
            *v = format!("{s:.7}").parse().unwrap_or(s as f32);
        }
        table
    })
}

/// `cv2.ellipse2Poly(center, axes, angle, arc_start, arc_end, delta)`: the polygon OpenCV fills for an ellipse.
///
/// Angles are whole degrees (OpenCV looks them up in its sine table); the points are computed in double precision
/// from the `float` table, rounded half-to-even, and consecutive duplicates dropped.
pub fn ellipse_to_poly(
    center: Point,
    axes: (i64, i64),
    angle: i64,
    arc_start: i64,
    arc_end: i64,
    delta: i64,
) -> Vec<Point> {
    let table = sin_table();
    let sin = |deg: i64| table[deg as usize] as f64;

    // 1. Normalise the rotation to [0, 360] and the arc to a range inside [0, 360].
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let (mut start, mut end) = if arc_start > arc_end { (arc_end, arc_start) } else { (arc_start, arc_end) };
    while start < 0 {
        start += 360;
        end += 360;
    }
    while end > 360 {
        start -= 360;
        end -= 360;
    }
    if end - start > 360 {
        start = 0;
        end = 360;
    }
    let (alpha, beta) = (sin(450 - angle), sin(angle)); // cos, sin of the rotation

    // 2. Sample the arc every `delta` degrees (the last sample clamped to the arc's end), in doubles.
    let delta = delta.max(1);
    let (cx, cy) = (center.x as f64, center.y as f64);
    let (a, b) = (axes.0 as f64, axes.1 as f64);
    let mut exact = Vec::new();
    let mut i = start;
    while i < end + delta {
        let mut t = i.min(end);
        if t < 0 {
            t += 360;
        }
        let x = a * sin(450 - t);
        let y = b * sin(t);
        exact.push((cx + x * alpha - y * beta, cy + x * beta + y * alpha));
        i += delta;
    }
    if exact.len() == 1 {
        exact = vec![(cx, cy); 2];
    }

    // 3. Round to pixels, dropping repeats; a polygon that collapsed to one point becomes two copies of the centre.
    let mut pts: Vec<Point> = Vec::with_capacity(exact.len());
    for (x, y) in exact {
        let p = Point::new(cv_round(x), cv_round(y));
        if pts.last() != Some(&p) {
            pts.push(p);
        }
    }
    if pts.len() == 1 {
        pts = vec![center; 2];
    }
    pts
}

/// Fills row `y` from `x1` to `x2` inclusive; callers have clipped both to the image.
fn hline(img: &mut RgbImage, y: i64, x1: i64, x2: i64, color: Color) {
    if x1 > x2 {
        return;
    }
    let w = img.width() as usize;
    let row = y as usize * w * 3;
    for px in img.as_mut()[row + x1 as usize * 3..row + (x2 as usize + 1) * 3].chunks_exact_mut(3) {
        px.copy_from_slice(&color);
    }
}

/// Sets one pixel if it lies inside the image.
fn put_clipped(img: &mut RgbImage, x: i64, y: i64, color: Color) {
    if x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
        hline(img, y, x, x, color);
    }
}

/// `cv::clipLine` on an image of `width × height` (any units): moves both ends onto the image border, the
/// intersection computed in doubles and truncated as OpenCV does; false when the segment misses the image.
fn clip_line(width: i64, height: i64, p1: &mut Point, p2: &mut Point) -> bool {
    if width <= 0 || height <= 0 {
        return false;
    }
    let (right, bottom) = (width - 1, height - 1);
    let code =
        |p: &Point| (p.x < 0) as i32 + (p.x > right) as i32 * 2 + (p.y < 0) as i32 * 4 + (p.y > bottom) as i32 * 8;
    let muldiv = |a: i64, b: i64, c: i64| (a as f64 * b as f64 / c as f64) as i64;
    let (mut c1, mut c2) = (code(p1), code(p2));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.x += muldiv(a - p1.y, p2.x - p1.x, p2.y - p1.y);
            p1.y = a;
            c1 = (p1.x < 0) as i32 + (p1.x > right) as i32 * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.x += muldiv(a - p2.y, p2.x - p1.x, p2.y - p1.y);
            p2.y = a;
            c2 = (p2.x < 0) as i32 + (p2.x > right) as i32 * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.y += muldiv(a - p1.x, p2.y - p1.y, p2.x - p1.x);
                p1.x = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.y += muldiv(a - p2.x, p2.y - p1.y, p2.x - p1.x);
                p2.x = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// A 1-px 8-connected Bresenham line between whole-pixel points (OpenCV's `LineIterator`, left to right).
fn line_bresenham(img: &mut RgbImage, mut p1: Point, mut p2: Point, color: Color) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let outside = |p: &Point| p.x < 0 || p.y < 0 || p.x >= w || p.y >= h;
    if (outside(&p1) || outside(&p2)) && !clip_line(w, h, &mut p1, &mut p2) {
        return;
    }
    // Walk from the left end; the longer axis advances every step, the shorter one when the error says so.
    let (mut dx, mut dy) = (p2.x - p1.x, p2.y - p1.y);
    let start = if dx < 0 {
        dx = -dx;
        dy = -dy;
        p2
    } else {
        p1
    };
    let y_dir = if dy < 0 { -1 } else { 1 };
    let dy = dy.abs();
    let steep = dy > dx;
    let (major, minor) = if steep { (dy, dx) } else { (dx, dy) };
    let mut err = major - 2 * minor;
    let (mut x, mut y) = (start.x, start.y);
    for _ in 0..=major {
        hline(img, y, x, x, color);
        let diagonal = err < 0;
        err += -2 * minor + if diagonal { 2 * major } else { 0 };
        if steep {
            y += y_dir;
            x += diagonal as i64;
        } else {
            x += 1;
            y += if diagonal { y_dir } else { 0 };
        }
    }
}

/// OpenCV's `Line2`: a 1-px line between 16.16 fixed-point points (the outline of a sub-pixel polygon).
fn line_fixed(img: &mut RgbImage, mut p1: Point, mut p2: Point, color: Color) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    if !clip_line(w << XY_SHIFT, h << XY_SHIFT, &mut p1, &mut p2) {
        return;
    }
    let (dx, dy) = (p2.x - p1.x, p2.y - p1.y);
    let (ax, ay) = (dx.abs(), dy.abs());
    let x_major = ax > ay;
    // Walk along the major axis in increasing direction.
    let backwards = if x_major { dx < 0 } else { dy < 0 };
    if backwards {
        std::mem::swap(&mut p1, &mut p2);
    }
    let (x_step, y_step, mut ecount) = if x_major {
        let dy = if dx < 0 { -dy } else { dy };
        (XY_ONE, (dy << XY_SHIFT) / (ax | 1), (p2.x - p1.x) >> XY_SHIFT)
    } else {
        let dx = if dy < 0 { -dx } else { dx };
        ((dx << XY_SHIFT) / (ay | 1), XY_ONE, (p2.y - p1.y) >> XY_SHIFT)
    };
    p1.x += XY_HALF;
    p1.y += XY_HALF;
    put_clipped(img, (p2.x + XY_HALF) >> XY_SHIFT, (p2.y + XY_HALF) >> XY_SHIFT, color);
    if x_major {
        p1.x >>= XY_SHIFT;
        while ecount >= 0 {
            put_clipped(img, p1.x, p1.y >> XY_SHIFT, color);
            p1.x += 1;
            p1.y += y_step;
            ecount -= 1;
        }
    } else {
        p1.y >>= XY_SHIFT;
        while ecount >= 0 {
            put_clipped(img, p1.x >> XY_SHIFT, p1.y, color);
            p1.x += x_step;
            p1.y += 1;
            ecount -= 1;
        }
    }
}

/// `cv2.fillConvexPoly(img, pts, color)` with LINE_8 and shift 0.
pub fn fill_convex_poly(img: &mut RgbImage, pts: &[Point], color: Color) {
    fill_convex_poly_shifted(img, pts, color, 0);
}

/// OpenCV's `FillConvexPoly` for points with `shift` fraction bits: outline first (Bresenham for whole pixels,
/// `Line2` for sub-pixel points), then a scanline fill between the left and right chains that start at the top
/// vertex. Each chain steps in 16.16 fixed point with a rounded per-row slope, which is what decides the border
/// pixels.
fn fill_convex_poly_shifted(img: &mut RgbImage, v: &[Point], color: Color, shift: u32) {
    let n = v.len();
    if n == 0 {
        return;
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let delta = (1i64 << shift) >> 1;
    let up = XY_SHIFT - shift;

    // 1. Outline, closing the polygon from the last vertex; find the bounding box and the top vertex.
    let mut p0 = v[n - 1].shl(up);
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].x, v[0].x, v[0].y, v[0].y);
    let mut imin = 0;
    for (i, &p) in v.iter().enumerate() {
        if p.y < ymin {
            ymin = p.y;
            imin = i;
        }
        ymax = ymax.max(p.y);
        xmax = xmax.max(p.x);
        xmin = xmin.min(p.x);
        let p = p.shl(up);
        if shift == 0 {
            let whole = |q: Point| Point::new(q.x >> XY_SHIFT, q.y >> XY_SHIFT);
            line_bresenham(img, whole(p0), whole(p), color);
        } else {
            line_fixed(img, p0, p, color);
        }
        p0 = p;
    }
    let round = |c: i64| (c + delta) >> shift;
    let (xmin, xmax, ymin, ymax) = (round(xmin), round(xmax), round(ymin), round(ymax));
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= w || ymin >= h {
        return;
    }
    let ymax = ymax.min(h - 1);

    // 2. Scanlines. Two chains leave the top vertex, one forwards (+1) and one backwards (n-1) through the
    //    vertex list; `budget` counts the polygon edges left to hand out, shared by both chains.
    #[derive(Clone, Copy)]
    struct Chain {
        idx: usize,
        step: usize,
        x: i64,
        dx: i64,
        y_end: i64,
    }
    let start = Chain { idx: imin, step: 1, x: -XY_ONE, dx: 0, y_end: ymin };
    let mut chains = [start, Chain { step: n - 1, ..start }];
    let mut budget = n as i64;
    let mut y = ymin;
    loop {
        for chain in chains.iter_mut() {
            if y < chain.y_end {
                continue;
            }
            // Advance this chain to the next vertex strictly below the current row.
            let mut idx0 = chain.idx;
            let mut idx = (idx0 + chain.step) % n;
            loop {
                let more = budget > 0;
                budget -= 1;
                if !more {
                    break;
                }
                let ty = (v[idx].y + delta) >> shift;
                if ty > y {
                    let xs = v[idx0].x << up;
                    let xe = v[idx].x << up;
                    chain.y_end = ty;
                    chain.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                    chain.x = xs;
                    chain.idx = idx;
                    break;
                }
                idx0 = idx;
                idx = (idx + chain.step) % n;
            }
        }
        if budget < 0 {
            break;
        }
        if y >= 0 {
            let (l, r) = if chains[0].x > chains[1].x { (1, 0) } else { (0, 1) };
            let x1 = (chains[l].x + XY_HALF) >> XY_SHIFT;
            let x2 = (chains[r].x + XY_HALF) >> XY_SHIFT;
            if x2 >= 0 && x1 < w {
                hline(img, y, x1.max(0), x2.min(w - 1), color);
            }
        }
        chains[0].x += chains[0].dx;
        chains[1].x += chains[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// `cv2.circle(img, center, radius, color, thickness=-1)` with LINE_8: OpenCV's midpoint circle, filled with
/// horizontal spans (four per step: the octant pairs above and below the centre).
pub fn fill_circle(img: &mut RgbImage, center: Point, radius: i64, color: Color) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (cx, cy) = (center.x, center.y);
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (0i64, radius, 0i64, 1i64, (radius << 1) - 1);
    let inside = cx >= radius && cx < w - radius && cy >= radius && cy < h - radius;
    let row_ok = |y: i64| y >= 0 && y < h;
    while dx >= dy {
        let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
        let (x11, x12, x21, x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        if inside {
            hline(img, y11, x11, x12, color);
            hline(img, y12, x11, x12, color);
            hline(img, y21, x21, x22, color);
            hline(img, y22, x21, x22, color);
        } else if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
            let (x11, x12) = (x11.max(0), x12.min(w - 1));
            for y in [y11, y12] {
                if row_ok(y) {
                    hline(img, y, x11, x12, color);
                }
            }
            if x21 < w && x22 >= 0 {
                let (x21, x22) = (x21.max(0), x22.min(w - 1));
                for y in [y21, y22] {
                    if row_ok(y) {
                        hline(img, y, x21, x22, color);
                    }
                }
            }
        }
        // Midpoint step: y always advances, x shrinks when the error turns positive.
        dy += 1;
        err += plus;
        plus += 2;
        if err > 0 {
            err -= minus;
            dx -= 1;
            minus -= 2;
        }
    }
}

/// `cv2.line(img, p0, p1, color, thickness)` with LINE_8 and shift 0 (as OpenCV 5.0 draws it).
///
/// Thickness 1 is a Bresenham line. Thicker lines are first clipped to the image grown by `thickness` on every
/// side (whole pixels: this moves far ends, and so the slope, slightly), then drawn as OpenCV's `ThickLine`: a
/// sub-pixel parallelogram of half-width `thickness / 2` filled as a convex polygon, plus a filled circle at each
/// end (round caps).
pub fn line(img: &mut RgbImage, p0: Point, p1: Point, color: Color, thickness: i64) {
    if thickness <= 1 {
        line_bresenham(img, p0, p1, color);
        return;
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let grow = |p: Point| Point::new(p.x + thickness, p.y + thickness);
    let (mut p0, mut p1) = (grow(p0), grow(p1));
    if !clip_line(w + 2 * thickness, h + 2 * thickness, &mut p0, &mut p1) {
        return;
    }
    let shrink = |p: Point| Point::new(p.x - thickness, p.y - thickness);
    let (p0, p1) = (shrink(p0), shrink(p1));
    let (p0, p1) = (p0.shl(XY_SHIFT), p1.shl(XY_SHIFT));
    let inv_one = 1.0 / XY_ONE as f64;
    let dx = (p0.x - p1.x) as f64 * inv_one;
    let dy = (p1.y - p0.y) as f64 * inv_one;
    let len2 = dx * dx + dy * dy;
    let odd = thickness & 1;
    let half_width = thickness << (XY_SHIFT - 1); // thickness / 2 in 16.16
    if len2.abs() > f64::EPSILON {
        let r = (half_width as f64 + odd as f64 * XY_ONE as f64 * 0.5) / len2.sqrt();
        let d = Point::new(cv_round(dy * r), cv_round(dx * r)); // the normal, scaled to the half-width
        let quad = [
            Point::new(p0.x + d.x, p0.y + d.y),
            Point::new(p0.x - d.x, p0.y - d.y),
            Point::new(p1.x - d.x, p1.y - d.y),
            Point::new(p1.x + d.x, p1.y + d.y),
        ];
        fill_convex_poly_shifted(img, &quad, color, XY_SHIFT);
    }
    let cap_radius = (half_width + XY_HALF) >> XY_SHIFT;
    for end in [p0, p1] {
        let center = Point::new((end.x + XY_HALF) >> XY_SHIFT, (end.y + XY_HALF) >> XY_SHIFT);
        fill_circle(img, center, cap_radius, color);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pose/");

    /// tools/fixtures/gen_pose.py's record of cv2 calls and their results.
    #[derive(Deserialize)]
    struct Primitives {
        ellipse2poly: Vec<EllipseCase>,
        canvases: Vec<CanvasCase>,
    }
    #[derive(Deserialize)]
    struct EllipseCase {
        center: [i64; 2],
        axes: [i64; 2],
        angle: i64,
        arc_start: i64,
        arc_end: i64,
        delta: i64,
        points: Vec<[i64; 2]>,
    }
    #[derive(Deserialize)]
    struct CanvasCase {
        name: String,
        width: u32,
        height: u32,
        png: String,
        ops: Vec<Op>,
    }
    #[derive(Deserialize)]
    #[serde(tag = "op", rename_all = "lowercase")]
    enum Op {
        Poly { points: Vec<[i64; 2]>, color: Color },
        Circle { center: [i64; 2], radius: i64, color: Color },
        Line { p0: [i64; 2], p1: [i64; 2], thickness: i64, color: Color },
    }

    fn primitives() -> Primitives {
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}primitives.json")).unwrap()).unwrap()
    }

    fn pt(p: [i64; 2]) -> Point {
        Point::new(p[0], p[1])
    }

    #[test]
    fn ellipse_to_poly_matches_cv2() {
        for (i, c) in primitives().ellipse2poly.iter().enumerate() {
            let got = ellipse_to_poly(pt(c.center), (c.axes[0], c.axes[1]), c.angle, c.arc_start, c.arc_end, c.delta);
            let expected: Vec<Point> = c.points.iter().map(|&p| pt(p)).collect();
            assert_eq!(got, expected, "case {i}: center {:?} axes {:?} angle {}", c.center, c.axes, c.angle);
        }
    }

    #[test]
    fn fill_poly_circle_and_line_match_cv2_pixel_for_pixel() {
        // Each canvas: ~30 calls of one primitive, many clipped, replayed in order; every pixel must agree.
        for case in primitives().canvases {
            let mut img = RgbImage::new(case.width, case.height);
            for op in &case.ops {
                match op {
                    Op::Poly { points, color } => {
                        fill_convex_poly(&mut img, &points.iter().map(|&p| pt(p)).collect::<Vec<_>>(), *color)
                    }
                    Op::Circle { center, radius, color } => fill_circle(&mut img, pt(*center), *radius, *color),
                    Op::Line { p0, p1, thickness, color } => line(&mut img, pt(*p0), pt(*p1), *color, *thickness),
                }
            }
            let reference = image::open(format!("{FIXTURES}{}", case.png)).unwrap().to_rgb8();
            let differing = img.pixels().zip(reference.pixels()).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{}: {differing} pixels differ from cv2", case.name);
        }
    }

    #[test]
    fn sine_table_matches_opencv_literals() {
        let t = sin_table();
        // A few entries as printed in drawing.cpp's SinTable.
        assert_eq!(t[1], 0.0174524f32);
        assert_eq!(t[44], 0.6946584f32);
        assert_eq!(t[90], 1.0);
        assert_eq!(t[181], -0.0174524f32);
        assert_eq!(t[449], 0.9998477f32);
        assert!(t[360] == 0.0 && t[360].is_sign_negative());
    }

    #[test]
    fn degenerate_ellipse_is_two_centre_points() {
        let c = Point::new(5, 7);
        assert_eq!(ellipse_to_poly(c, (0, 0), 0, 0, 360, 1), vec![c, c]);
    }

    #[test]
    fn circle_radius_one_is_a_plus() {
        // cv2.circle(np.zeros((5, 5, 3)), (2, 2), 1, 9, -1): the 2-px line caps are these pluses.
        let mut img = RgbImage::new(5, 5);
        fill_circle(&mut img, Point::new(2, 2), 1, [9, 9, 9]);
        let set: Vec<(u32, u32)> = img.enumerate_pixels().filter(|p| p.2 .0[0] == 9).map(|p| (p.0, p.1)).collect();
        assert_eq!(set, vec![(2, 1), (1, 2), (2, 2), (3, 2), (2, 3)]);
    }

    #[test]
    fn drawing_far_outside_does_not_panic() {
        let mut img = RgbImage::new(7, 5);
        let far = Point::new(-100_000, 90_000);
        fill_circle(&mut img, far, 4, [1, 2, 3]);
        line(&mut img, far, Point::new(3, 2), [1, 2, 3], 2);
        line(&mut img, far, Point::new(100_000, -3), [1, 2, 3], 1);
        let poly = ellipse_to_poly(Point::new(3, 2), (50_000, 4), 33, 0, 360, 1);
        fill_convex_poly(&mut img, &poly, [4, 5, 6]);
        assert!(img.pixels().any(|p| p.0 == [4, 5, 6]));
    }
}
