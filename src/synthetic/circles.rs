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
}

impl Circle {
    /// Draws a seeded random circle for an image of `size` px: radius 10–35 % of the side, fully inside.
    pub fn random(rng: &mut TorchGenerator, size: u32) -> Self {
        let u = rng.rand(5);
        let s = size as f64;
        let radius = s * (0.10 + 0.25 * u[0] as f64);
        let cx = radius + (s - 2.0 * radius) * u[1] as f64;
        let cy = radius + (s - 2.0 * radius) * u[2] as f64;
        let fg = ((u[3] as f64 * 16.0) as usize).min(15);
        // A background different from the circle: one of the other 15 colours.
        let bg = (fg + 1 + ((u[4] as f64 * 15.0) as usize).min(14)) % 16;
        Self { cx, cy, radius, fg, bg }
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

    /// The condition: the circle's outline, white, `outline_width(size)` px wide, on black.
    pub fn condition(&self, size: u32) -> RgbImage {
        let half = outline_width(size) as f64 / 2.0;
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
pub fn write_dataset(out: &Path, count: usize, size: u32, seed: u64, on_sample: &mut dyn FnMut()) -> Result<()> {
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
    let result = write_samples(&tmp, count, size, seed, on_sample).and_then(|()| {
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
fn write_samples(out: &Path, count: usize, size: u32, seed: u64, on_sample: &mut dyn FnMut()) -> Result<()> {
    for sub in ["source", "target"] {
        std::fs::create_dir_all(out.join(sub)).map_err(|e| Error::io(out.join(sub), e))?;
    }
    let mut rng = TorchGenerator::new(seed);
    let mut lines = String::new();
    for i in 0..count {
        let c = Circle::random(&mut rng, size);
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
        write_dataset(dir.path(), 12, 64, 3, &mut || n += 1).unwrap();
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
        write_dataset(again.path(), 12, 64, 3, &mut || {}).unwrap();
        assert_eq!(text, std::fs::read_to_string(again.path().join("prompt.json")).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("target/5.png")).unwrap(),
            std::fs::read(again.path().join("target/5.png")).unwrap()
        );
    }

    #[test]
    fn scores_a_perfect_and_a_shifted_image() {
        let c = Circle { cx: 30.0, cy: 34.0, radius: 12.0, fg: 0, bg: 12 };
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

    #[test]
    fn prompts_read_as_english() {
        let c = Circle { cx: 1.0, cy: 1.0, radius: 1.0, fg: 1, bg: 12 };
        assert_eq!(c.prompt(), "an orange circle on a light blue background");
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_dataset(dir.path(), 0, 64, 1, &mut || {}).unwrap_err().to_string().starts_with("count: "));
        assert!(write_dataset(dir.path(), 1, 8, 1, &mut || {}).unwrap_err().to_string().starts_with("size: 8"));
    }

    /// A rerun with fewer samples leaves no files of the earlier one; a folder that is not a dataset is kept.
    #[test]
    fn a_rerun_replaces_the_whole_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("data");
        write_dataset(&out, 5, 16, 0, &mut || {}).unwrap();
        write_dataset(&out, 3, 16, 0, &mut || {}).unwrap();
        for sub in ["source", "target"] {
            assert_eq!(std::fs::read_dir(out.join(sub)).unwrap().count(), 3, "{sub}");
        }
        assert_eq!(std::fs::read_to_string(out.join("prompt.json")).unwrap().lines().count(), 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary folder was left");
        let other = dir.path().join("photos");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("me.jpg"), b"jpg").unwrap();
        let err = write_dataset(&other, 1, 16, 0, &mut || {}).unwrap_err().to_string();
        assert!(err.starts_with("output: ") && other.join("me.jpg").is_file(), "{err}");
    }
}
