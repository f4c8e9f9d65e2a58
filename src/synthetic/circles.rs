//! A Fill50k-style dataset (the ControlNet paper's tutorial task): one filled circle of a named colour on a
//! background of another named colour; the condition is the circle's outline, white on black; the prompt names
//! both colours ("a red circle on a light blue background"). Written in the fill50k layout: `prompt.json` lines
//! `{"source": "source/N.png", "target": "target/N.png", "prompt": ...}`.
use std::io::Write;
use std::path::Path;

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::io::atomic::write_atomic;
use crate::io::images::save_png;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The colour words prompts use, with the RGB each stands for. Users type these words: keep them.
pub const COLOURS: [(&str, [u8; 3]); 16] = [
    ("red", [220, 20, 60]),
    ("orange", [255, 140, 0]),
    ("yellow", [255, 215, 0]),
    ("green", [34, 139, 34]),
    ("cyan", [0, 206, 209]),
    ("blue", [30, 60, 200]),
    ("purple", [128, 0, 128]),
    ("pink", [255, 105, 180]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
    ("gray", [128, 128, 128]),
    ("brown", [139, 69, 19]),
    ("light blue", [135, 206, 250]),
    ("dark blue", [0, 0, 110]),
    ("light green", [144, 238, 144]),
    ("dark green", [0, 90, 0]),
];

/// Colours near enough to be confused (indices into [`COLOURS`]): orange/red, gray/brown, light blue/cyan,
/// light green/green. The wide variety and the evaluation sets put them together on purpose.
pub const NEAR_PAIRS: [(usize, usize); 4] = [(1, 0), (10, 11), (12, 4), (14, 3)];

/// The side the wide variety's pixel sizes are given at; they scale with the image.
const REFERENCE_SIZE: f64 = 128.0;
/// Radius range of the wide variety, px at [`REFERENCE_SIZE`].
const WIDE_RADIUS_PX: (f64, f64) = (10.0, 40.0);
/// Outline widths of the wide variety, px at [`REFERENCE_SIZE`], inclusive.
const WIDE_RING_PX: (u32, u32) = (1, 5);
/// Share of wide samples placed against a border.
const WIDE_BORDER_SHARE: f64 = 0.2;
/// "Against a border": the centre within this share of its free range from the border's side.
const BORDER_BAND: f64 = 0.05;
/// Share of wide training samples whose background is the circle's near neighbour (when it has one); at
/// random it would be 1 in 15.
const WIDE_NEAR_PAIR_SHARE: f64 = 0.3;

/// How the circles of a dataset are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Variety {
    /// The first demo's training set: radius 10–35 % of the side, 3-px rings at 128 px, colours uniform.
    #[default]
    Fill50k,
    /// What a user may draw: radius 10–40 px, ring 1–5 px, circles against the borders, near colour pairs often.
    Wide,
}

/// The held-out sets of the demo's evaluation: circles drawn from [`Variety::Wide`]'s shapes with seeds no
/// training set uses, colours laid out so that every colour is circle and background, and each near pair comes in
/// both orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// For choosing checkpoints and settings.
    Validation,
    /// For the reported figure only.
    Test,
}

impl Split {
    fn seed(self) -> u64 {
        match self {
            Split::Validation => 31_337,
            Split::Test => 47_711,
        }
    }

    /// The set's first `count` circles at `size` px (a prefix of a longer set is the same circles). In each
    /// run of 16 the circle colours are all 16; every third run pairs each colour that has a near neighbour
    /// with it, the others spread the backgrounds over the remaining colours.
    pub fn circles(self, count: usize, size: u32) -> Vec<Circle> {
        let mut rng = TorchGenerator::new(self.seed());
        (0..count)
            .map(|i| {
                let (run, fg) = (i / 16, i % 16);
                let u = rng.rand(5);
                let bg = match near_partner(fg) {
                    Some(partner) if run % 3 == 0 => partner,
                    // Offsets 1..=15 that differ between runs and colours.
                    _ => (fg + 1 + (run * 7 + fg * 3) % 15) % 16,
                };
                Circle::wide_shape(&u, size, fg, bg)
            })
            .collect()
    }
}

/// The colour `fg` is easily confused with, if any.
pub fn near_partner(fg: usize) -> Option<usize> {
    NEAR_PAIRS.iter().find_map(|&(a, b)| {
        if a == fg {
            Some(b)
        } else if b == fg {
            Some(a)
        } else {
            None
        }
    })
}

/// `floor(u · n)`, kept below `n`.
fn pick(u: f32, n: usize) -> usize {
    ((u as f64 * n as f64) as usize).min(n - 1)
}

/// One of the 15 colours other than `fg`.
fn other_colour(fg: usize, u: f32) -> usize {
    (fg + 1 + pick(u, 15)) % 16
}

/// The RGB of a colour word, if it is one of [`COLOURS`].
pub fn colour(name: &str) -> Option<[u8; 3]> {
    COLOURS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// One sample: where the circle is and which colours it has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Circle {
    pub cx: f64,
    pub cy: f64,
    pub radius: f64,
    pub fg: usize,
    pub bg: usize,
    /// Width of the condition's outline ring in px.
    pub ring: f64,
}

impl Circle {
    /// Draws a seeded random circle for an image of `size` px: radius 10–35 % of the side, fully inside.
    pub fn random(rng: &mut TorchGenerator, size: u32) -> Self {
        let u = rng.rand(5);
        let s = size as f64;
        let radius = s * (0.10 + 0.25 * u[0] as f64);
        let cx = radius + (s - 2.0 * radius) * u[1] as f64;
        let cy = radius + (s - 2.0 * radius) * u[2] as f64;
        let fg = pick(u[3], 16);
        let bg = other_colour(fg, u[4]);
        Self { cx, cy, radius, fg, bg, ring: outline_width(size) as f64 }
    }

    /// Draws a seeded random circle from the [`Variety::Wide`] range (what a user may draw): radius 10–40 px,
    /// ring 1–5 px (both at 128 px, scaled with the side), a share against a border, a share of backgrounds
    /// that are the circle colour's near neighbour ([`NEAR_PAIRS`]).
    pub fn wide(rng: &mut TorchGenerator, size: u32) -> Self {
        let u = rng.rand(8);
        let fg = pick(u[0], 16);
        let bg = match near_partner(fg) {
            Some(partner) if (u[1] as f64) < WIDE_NEAR_PAIR_SHARE => partner,
            _ => other_colour(fg, u[2]),
        };
        Self::wide_shape(&u[3..], size, fg, bg)
    }

    /// Places a [`Variety::Wide`] circle of the given colours from five uniform numbers.
    fn wide_shape(u: &[f32], size: u32, fg: usize, bg: usize) -> Self {
        let s = size as f64;
        let scale = s / REFERENCE_SIZE;
        let (r0, r1) = WIDE_RADIUS_PX;
        let radius = ((r0 + (r1 - r0) * u[0] as f64) * scale).min(s / 2.0 - 1.0);
        let (w0, w1) = WIDE_RING_PX;
        let ring = ((w0 + pick(u[1], (w1 - w0 + 1) as usize) as u32) as f64 * scale).max(1.0);
        // Where the centre may go with the disk and its ring inside the image.
        let lo = radius + ring / 2.0;
        let hi = s - lo;
        let along = lo + (hi - lo) * u[3] as f64;
        let (cx, cy) = if (u[2] as f64) < WIDE_BORDER_SHARE {
            // Against one of the four borders (which one from the same draw, rescaled).
            let side = pick(u[2] / WIDE_BORDER_SHARE as f32, 4);
            let near = lo + (hi - lo) * BORDER_BAND * u[4] as f64;
            match side {
                0 => (near, along),
                1 => (s - near, along),
                2 => (along, near),
                _ => (along, s - near),
            }
        } else {
            (along, lo + (hi - lo) * u[4] as f64)
        };
        Self { cx, cy, radius, fg, bg, ring }
    }

    /// "a red circle on a light blue background" ("an orange …" where English wants it).
    pub fn prompt(&self) -> String {
        let (fg, bg) = (COLOURS[self.fg].0, COLOURS[self.bg].0);
        format!("{} {fg} circle on {} {bg} background", article(fg), article(bg))
    }

    /// Distance of a pixel's centre from the circle's centre.
    fn distance(&self, x: u32, y: u32) -> f64 {
        ((x as f64 + 0.5 - self.cx).powi(2) + (y as f64 + 0.5 - self.cy).powi(2)).sqrt()
    }

    /// The target image: the filled circle on its background.
    pub fn image(&self, size: u32) -> RgbImage {
        let (fg, bg) = (Rgb(COLOURS[self.fg].1), Rgb(COLOURS[self.bg].1));
        RgbImage::from_fn(size, size, |x, y| if self.distance(x, y) <= self.radius { fg } else { bg })
    }

    /// The condition: the circle's outline, white, `ring` px wide, on black.
    pub fn condition(&self, size: u32) -> RgbImage {
        let half = self.ring / 2.0;
        RgbImage::from_fn(size, size, |x, y| {
            if (self.distance(x, y) - self.radius).abs() <= half {
                Rgb([255, 255, 255])
            } else {
                Rgb([0, 0, 0])
            }
        })
    }
}

/// Scoring a generated image against the circle it was asked for (the demo's test and `docs/demo.md`).
pub mod score {
    use super::*;

    /// The filled disk of `circle` at `size` px, row-major.
    pub fn disk(circle: &Circle, size: u32) -> Vec<bool> {
        (0..size * size).map(|i| circle.distance(i % size, i / size) <= circle.radius).collect()
    }

    /// Pixels nearer (in RGB) to the circle's colour than to the background's.
    pub fn segment(image: &RgbImage, circle: &Circle) -> Vec<bool> {
        let (fg, bg) = (COLOURS[circle.fg].1, COLOURS[circle.bg].1);
        image.pixels().map(|p| distance2(p.0, fg) < distance2(p.0, bg)).collect()
    }

    /// Intersection over union of two masks (1 when both are empty).
    pub fn iou(a: &[bool], b: &[bool]) -> f64 {
        let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
        let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
        if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        }
    }

    /// The named colour nearest to the mean of the pixels `mask` selects (`None` when it selects none).
    pub fn mean_colour_name(image: &RgbImage, mask: &[bool]) -> Option<usize> {
        let mut sum = [0f64; 3];
        let mut n = 0usize;
        for (p, _) in image.pixels().zip(mask).filter(|(_, m)| **m) {
            for (total, &v) in sum.iter_mut().zip(&p.0) {
                *total += v as f64;
            }
            n += 1;
        }
        if n == 0 {
            return None;
        }
        let mean = sum.map(|s| (s / n as f64).round() as u8);
        (0..COLOURS.len()).min_by_key(|&i| distance2(mean, COLOURS[i].1))
    }

    fn distance2(a: [u8; 3], b: [u8; 3]) -> u32 {
        a.iter().zip(b).map(|(&x, y)| (x as i32 - y as i32).pow(2) as u32).sum()
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// Outline width: 3 px at 128 px, scaling with the image (at least 2).
pub fn outline_width(size: u32) -> u32 {
    (size * 3 / 128).max(2)
}

/// One line of `prompt.json`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PromptLine {
    pub source: String,
    pub target: String,
    pub prompt: String,
}

/// Writes `count` samples of `size` px into `out`: `source/N.png`, `target/N.png`, `prompt.json`. `on_sample`
/// is called after each one (progress). The folder is made beside `out` and put in its place when complete: a
/// failed run leaves an earlier dataset as it was, a rerun with fewer samples leaves none of the old ones. A
/// folder that is not a dataset (no `prompt.json`, not empty) is not replaced.
pub fn write_dataset(
    out: &Path,
    count: usize,
    size: u32,
    seed: u64,
    variety: Variety,
    on_sample: &mut dyn FnMut(),
) -> Result<()> {
    let mut rng = TorchGenerator::new(seed);
    let circles = (0..count).map(|_| match variety {
        Variety::Fill50k => Circle::random(&mut rng, size),
        Variety::Wide => Circle::wide(&mut rng, size),
    });
    write_circles(out, circles.collect(), size, on_sample)
}

/// Writes the evaluation set `split`'s first `count` circles as a dataset (see [`write_dataset`]).
pub fn write_split(out: &Path, split: Split, count: usize, size: u32, on_sample: &mut dyn FnMut()) -> Result<()> {
    write_circles(out, split.circles(count, size), size, on_sample)
}

/// Writes `circles` into `out` as [`write_dataset`] says.
fn write_circles(out: &Path, circles: Vec<Circle>, size: u32, on_sample: &mut dyn FnMut()) -> Result<()> {
    let count = circles.len();
    if count == 0 {
        return Err(Error::setting("count", "must be at least 1"));
    }
    if !(16..=4096).contains(&size) {
        return Err(Error::setting("size", format!("{size} must be between 16 and 4096 px")));
    }
    let empty = |d: &Path| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none());
    if out.exists() && !(out.join("prompt.json").is_file() || empty(out)) {
        return Err(Error::setting(
            "output",
            format!("{} exists and is not a dataset (no prompt.json): choose another folder", out.display()),
        ));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".into());
    let tmp = parent.join(format!(".{name}.{}.partial", std::process::id()));
    let result = write_samples(&tmp, &circles, size, on_sample).and_then(|()| {
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The samples and `prompt.json` into `out` (created).
fn write_samples(out: &Path, circles: &[Circle], size: u32, on_sample: &mut dyn FnMut()) -> Result<()> {
    for sub in ["source", "target"] {
        std::fs::create_dir_all(out.join(sub)).map_err(|e| Error::io(out.join(sub), e))?;
    }
    let mut lines = String::new();
    for (i, c) in circles.iter().enumerate() {
        let line =
            PromptLine { source: format!("source/{i}.png"), target: format!("target/{i}.png"), prompt: c.prompt() };
        save_png(&out.join(&line.source), &c.condition(size), &[])?;
        save_png(&out.join(&line.target), &c.image(size), &[])?;
        lines.push_str(&serde_json::to_string(&line).map_err(|e| Error::Invalid(e.to_string()))?);
        lines.push('\n');
        on_sample();
    }
    let path = out.join("prompt.json");
    write_atomic(&path, |tmp| {
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(lines.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|e| Error::io(&path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_the_named_ones() {
        assert_eq!(colour("light blue"), Some([135, 206, 250]));
        assert_eq!(colour("dark green"), Some([0, 90, 0]));
        assert_eq!(colour("magenta"), None);
        let names: std::collections::HashSet<_> = COLOURS.iter().map(|c| c.0).collect();
        assert_eq!(names.len(), 16);
    }

    #[test]
    fn dataset_layout_colours_and_outline() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        write_dataset(dir.path(), 12, 64, 3, Variety::Fill50k, &mut || n += 1).unwrap();
        assert_eq!(n, 12);
        let text = std::fs::read_to_string(dir.path().join("prompt.json")).unwrap();
        let lines: Vec<PromptLine> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 12);
        let mut rng = TorchGenerator::new(3);
        for line in &lines {
            let c = Circle::random(&mut rng, 64);
            assert_eq!(line.prompt, c.prompt());
            assert_ne!(c.fg, c.bg);
            assert!(c.cx - c.radius >= 0.0 && c.cx + c.radius <= 64.0 && c.cy - c.radius >= 0.0);
            let target = image::open(dir.path().join(&line.target)).unwrap().to_rgb8();
            let source = image::open(dir.path().join(&line.source)).unwrap().to_rgb8();
            // Centre has the circle's colour, a far corner the background's.
            let (cx, cy) = (c.cx as u32, c.cy as u32);
            assert_eq!(target.get_pixel(cx, cy).0, COLOURS[c.fg].1);
            let corner = if c.cx < 32.0 {
                (63, if c.cy < 32.0 { 63 } else { 0 })
            } else {
                (0, if c.cy < 32.0 { 63 } else { 0 })
            };
            assert_eq!(target.get_pixel(corner.0, corner.1).0, COLOURS[c.bg].1);
            // The condition is white exactly on the outline ring, black inside and outside it.
            assert_eq!(source.get_pixel(cx, cy).0, [0, 0, 0]);
            let ring_x = (c.cx + c.radius).min(63.0) as u32;
            assert_eq!(source.get_pixel(ring_x.min(63), cy).0, [255, 255, 255], "{c:?}");
            assert!(source.pixels().all(|p| p.0 == [0, 0, 0] || p.0 == [255, 255, 255]));
        }
        // Seeded: the same seed writes the same files.
        let again = tempfile::tempdir().unwrap();
        write_dataset(again.path(), 12, 64, 3, Variety::Fill50k, &mut || {}).unwrap();
        assert_eq!(text, std::fs::read_to_string(again.path().join("prompt.json")).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("target/5.png")).unwrap(),
            std::fs::read(again.path().join("target/5.png")).unwrap()
        );
    }

    #[test]
    fn scores_a_perfect_and_a_shifted_image() {
        let c = Circle { cx: 30.0, cy: 34.0, radius: 12.0, fg: 0, bg: 12, ring: 3.0 };
        let img = c.image(64);
        let disk = score::disk(&c, 64);
        assert_eq!(score::segment(&img, &c), disk);
        assert_eq!(score::iou(&score::segment(&img, &c), &disk), 1.0);
        assert_eq!(score::mean_colour_name(&img, &disk), Some(0));
        let inverse: Vec<bool> = disk.iter().map(|d| !d).collect();
        assert_eq!(score::mean_colour_name(&img, &inverse), Some(12));
        // The same circle moved by its radius: two disks of radius r at distance r overlap by
        // 2r²·acos(1/2) − (r/2)·√3·r ≈ 1.228 r² of a union 2πr² − that, IoU ≈ 0.243.
        let moved = Circle { cx: 42.0, ..c };
        let iou = score::iou(&score::segment(&moved.image(64), &c), &disk);
        assert!((iou - 0.243).abs() < 0.02, "{iou}");
        assert_eq!(score::iou(&[false; 4], &[false; 4]), 1.0);
    }

    /// The test set covers what the demo's issue asks for: every colour as circle and as background, each near
    /// pair in both orders, radius 10–40 px, rings 1–5 px, circles against the borders; validation differs.
    #[test]
    fn evaluation_sets_cover_the_range() {
        let test = Split::Test.circles(128, 128);
        for colour in 0..16 {
            assert!(test.iter().filter(|c| c.fg == colour).count() >= 8, "circle colour {colour}");
            assert!(test.iter().filter(|c| c.bg == colour).count() >= 4, "background colour {colour}");
        }
        for (a, b) in NEAR_PAIRS {
            assert!(test.iter().filter(|c| (c.fg, c.bg) == (a, b)).count() >= 3, "{a}/{b}");
            assert!(test.iter().filter(|c| (c.fg, c.bg) == (b, a)).count() >= 3, "{b}/{a}");
        }
        assert!(test.iter().all(|c| c.fg != c.bg));
        let radii: Vec<f64> = test.iter().map(|c| c.radius).collect();
        assert!(radii.iter().all(|r| (10.0..=40.0).contains(r)));
        assert!(radii.iter().any(|&r| r < 14.0) && radii.iter().any(|&r| r > 36.0), "{radii:?}");
        for width in 1..=5 {
            assert!(test.iter().filter(|c| c.ring == width as f64).count() >= 10, "ring {width}");
        }
        let gap = |c: &Circle| {
            (c.cx - c.radius).min(c.cy - c.radius).min(128.0 - c.cx - c.radius).min(128.0 - c.cy - c.radius)
        };
        assert!(test.iter().all(|c| gap(c) >= c.ring / 2.0 - 1e-9), "a ring leaves the image");
        assert!(test.iter().filter(|c| gap(c) < 3.0 + c.ring).count() >= 15, "too few against a border");
        // A prefix is the same circles; validation is another set.
        assert_eq!(Split::Test.circles(20, 128), test[..20]);
        assert_ne!(Split::Validation.circles(20, 128), test[..20]);
    }

    /// The wide training variety draws near pairs far more often than chance (1 in 15) and spans the range.
    #[test]
    fn wide_variety_spans_the_range() {
        let mut rng = TorchGenerator::new(5);
        let circles: Vec<Circle> = (0..2000).map(|_| Circle::wide(&mut rng, 128)).collect();
        let paired = circles.iter().filter(|c| near_partner(c.fg) == Some(c.bg)).count() as f64;
        let with_partner = circles.iter().filter(|c| near_partner(c.fg).is_some()).count() as f64;
        assert!((paired / with_partner - 0.3).abs() < 0.05, "{}", paired / with_partner);
        assert!(circles.iter().all(|c| c.fg != c.bg && (1.0..=5.0).contains(&c.ring)));
        assert!(circles.iter().all(|c| (10.0..=40.0).contains(&c.radius)));
        // At 256 px the sizes scale.
        let big = Circle::wide(&mut TorchGenerator::new(5), 256);
        assert_eq!(big.radius, circles[0].radius * 2.0);
    }

    #[test]
    fn prompts_read_as_english() {
        let c = Circle { cx: 1.0, cy: 1.0, radius: 1.0, fg: 1, bg: 12, ring: 3.0 };
        assert_eq!(c.prompt(), "an orange circle on a light blue background");
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_dataset(dir.path(), 0, 64, 1, Variety::Fill50k, &mut || {})
            .unwrap_err()
            .to_string()
            .starts_with("count: "));
        assert!(write_dataset(dir.path(), 1, 8, 1, Variety::Fill50k, &mut || {})
            .unwrap_err()
            .to_string()
            .starts_with("size: 8"));
    }

    /// A rerun with fewer samples leaves no files of the earlier one; a folder that is not a dataset is kept.
    #[test]
    fn a_rerun_replaces_the_whole_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("data");
        write_dataset(&out, 5, 16, 0, Variety::Fill50k, &mut || {}).unwrap();
        write_dataset(&out, 3, 16, 0, Variety::Fill50k, &mut || {}).unwrap();
        for sub in ["source", "target"] {
            assert_eq!(std::fs::read_dir(out.join(sub)).unwrap().count(), 3, "{sub}");
        }
        assert_eq!(std::fs::read_to_string(out.join("prompt.json")).unwrap().lines().count(), 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary folder was left");
        let other = dir.path().join("photos");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("me.jpg"), b"jpg").unwrap();
        let err = write_dataset(&other, 1, 16, 0, Variety::Fill50k, &mut || {}).unwrap_err().to_string();
        assert!(err.starts_with("output: ") && other.join("me.jpg").is_file(), "{err}");
    }
}
