//! How well a base (with or without a circles ControlNet) draws the demo's circles: each circle of a set is
//! generated from its outline and prompt, then scored: where the circle landed against the asked-for disk (IoU),
//! and whether the circle and the background came out in the prompted colours. `tests/integration/demo.rs` and
//! `controlnet evaluate circles` both run this.
use candle_core::Device;
use image::{Rgb, RgbImage};

use super::generate::{generate, Control, GenerateParams};
use super::request::{DEFAULT_GUIDANCE, DEFAULT_STEPS};
use super::sd::StableDiffusion;
use crate::io::images::to_tensor01;
use crate::model::controlnet::ControlNetModel;
use crate::synthetic::circles::{score, Circle};
use crate::Result;

/// A circle is visible when the pixels of its colour cover at least this share of the asked-for disk's area
/// (wherever they are: a circle that vanished into its background has next to none).
pub const VISIBLE_AREA: f64 = 0.5;
/// A circle is at its place when its IoU with the asked-for disk reaches this.
pub const PLACED_IOU: f64 = 0.5;

/// One generated image, scored.
#[derive(Debug, Clone)]
pub struct Scored {
    pub circle: Circle,
    pub image: RgbImage,
    /// Of the pixels nearer the circle's colour than the background's, against the asked-for disk.
    pub iou: f64,
    /// Pixels nearer the circle's colour than the background's, over the asked-for disk's pixels.
    pub area_ratio: f64,
    pub circle_colour_right: bool,
    pub background_colour_right: bool,
}

impl Scored {
    pub fn colours_right(&self) -> bool {
        self.circle_colour_right && self.background_colour_right
    }

    /// A circle is there ([`VISIBLE_AREA`]), wherever it is.
    pub fn visible(&self) -> bool {
        self.area_ratio >= VISIBLE_AREA
    }

    /// A circle is there and where it was asked for ([`PLACED_IOU`]).
    pub fn placed(&self) -> bool {
        self.iou >= PLACED_IOU
    }
}

/// Every image of a run, in the set's order, and its figures.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub scored: Vec<Scored>,
}

impl Evaluation {
    pub fn mean_iou(&self) -> f64 {
        self.scored.iter().map(|s| s.iou).sum::<f64>() / self.scored.len().max(1) as f64
    }

    /// Share of images with both colours right.
    pub fn colours_right(&self) -> f64 {
        self.share(Scored::colours_right)
    }

    pub fn share(&self, f: impl Fn(&Scored) -> bool) -> f64 {
        self.scored.iter().filter(|s| f(s)).count() as f64 / self.scored.len().max(1) as f64
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        format!(
            "{} images: mean IoU {:.3}, both colours right {:.1} % (circle {:.1} %, background {:.1} %), circle \
             visible {:.1} %, at its place (IoU >= {PLACED_IOU}) {:.1} %",
            self.scored.len(),
            self.mean_iou(),
            100.0 * self.colours_right(),
            100.0 * self.share(|s| s.circle_colour_right),
            100.0 * self.share(|s| s.background_colour_right),
            100.0 * self.share(Scored::visible),
            100.0 * self.share(Scored::placed),
        )
    }

    /// Indices of the images, worst first: colour mistakes, then by IoU.
    pub fn worst_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.scored.len()).collect();
        let key = |s: &Scored| (s.colours_right(), s.iou);
        order.sort_by(|&a, &b| key(&self.scored[a]).partial_cmp(&key(&self.scored[b])).expect("IoUs are finite"));
        order
    }

    /// A picture of the run: for each chosen image its condition and its result side by side, `columns` pairs
    /// a row; the `worst` worst images first, then the set's first `first` others.
    pub fn grid(&self, worst: usize, first: usize, columns: usize) -> RgbImage {
        let mut chosen: Vec<usize> = self.worst_first().into_iter().take(worst).collect();
        let others: Vec<usize> = (0..self.scored.len()).filter(|i| !chosen.contains(i)).take(first).collect();
        chosen.extend(others);
        let Some(tile) = self.scored.first().map(|s| s.image.width()) else {
            return RgbImage::new(1, 1);
        };
        let columns = columns.clamp(1, chosen.len().max(1));
        let rows = chosen.len().div_ceil(columns).max(1) as u32;
        let gap = GRID_GAP;
        let mut out =
            RgbImage::from_pixel(columns as u32 * (2 * tile + gap) - gap, rows * (tile + gap) - gap, Rgb([64; 3]));
        for (k, &i) in chosen.iter().enumerate() {
            let s = &self.scored[i];
            let (x, y) = ((k % columns) as u32 * (2 * tile + gap), (k / columns) as u32 * (tile + gap));
            image::imageops::replace(&mut out, &s.circle.condition(tile), x as i64, y as i64);
            image::imageops::replace(&mut out, &s.image, (x + tile) as i64, y as i64);
        }
        out
    }
}

/// Grey gap between the grid's tiles, px.
const GRID_GAP: u32 = 4;

/// Generates and scores each circle at `size` px with `generate`'s default steps and guidance (the README's
/// command): the circle's prompt, seed = its index in the set, the ControlNet (when given) at scale 1 on the
/// circle's outline. `on_image` hears each image's index as it is done (not in order).
///
/// The images are independent, so they are made side by side, one per thread of rayon's pool: at the demo's
/// 128 px one image's layers are too small to share the cores (the threads mostly waited for each other at
/// every op). Each image is the one a lone `generate` makes.
pub fn evaluate(
    sd: &StableDiffusion,
    net: Option<&ControlNetModel>,
    circles: &[Circle],
    size: u32,
    on_image: &(dyn Fn(usize) + Sync),
) -> Result<Evaluation> {
    use rayon::prelude::*;
    let scored = circles
        .par_iter()
        .enumerate()
        .map(|(i, c)| {
            let scored = score_one(sd, net, c, i, size)?;
            on_image(i);
            Ok(scored)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Evaluation { scored })
}

/// [`evaluate`] of circle number `i`.
fn score_one(sd: &StableDiffusion, net: Option<&ControlNetModel>, c: &Circle, i: usize, size: u32) -> Result<Scored> {
    let controls: Vec<Control> = match net {
        Some(net) => vec![Control::plain(net, to_tensor01(&c.condition(size), &Device::Cpu)?)],
        None => Vec::new(),
    };
    let params =
        GenerateParams::plain(c.prompt(), size as usize, size as usize, DEFAULT_STEPS, DEFAULT_GUIDANCE, i as u64);
    let image = generate(sd, &controls, &params, &mut |_, _| {})?.images.remove(0);
    let found = score::segment(&image, c);
    let outside: Vec<bool> = found.iter().map(|f| !f).collect();
    let disk = score::disk(c, size);
    let count = |mask: &[bool]| mask.iter().filter(|m| **m).count() as f64;
    Ok(Scored {
        circle: *c,
        iou: score::iou(&found, &disk),
        area_ratio: count(&found) / count(&disk).max(1.0),
        circle_colour_right: score::mean_colour_name(&image, &found) == Some(c.fg),
        background_colour_right: score::mean_colour_name(&image, &outside) == Some(c.bg),
        image,
    })
}

/// The IoU a circle placed without looking at the condition gets on `circles`: each disk against the other
/// circles' disks.
pub fn chance_iou(circles: &[Circle], size: u32) -> f64 {
    let disks: Vec<Vec<bool>> = circles.iter().map(|c| score::disk(c, size)).collect();
    let mut total = 0.0;
    let mut n = 0usize;
    for (i, a) in disks.iter().enumerate() {
        for b in &disks[i + 1..] {
            total += score::iou(a, b);
            n += 1;
        }
    }
    total / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(iou: f64, area_ratio: f64, colours: bool) -> Scored {
        let circle = Circle { cx: 16.0, cy: 16.0, radius: 8.0, fg: 0, bg: 1, ring: 2.0 };
        Scored {
            circle,
            image: circle.image(32),
            iou,
            area_ratio,
            circle_colour_right: colours,
            background_colour_right: true,
        }
    }

    /// Worst first means colour mistakes, then low IoU; the grid puts them first, two tiles (condition,
    /// result) per entry, and the figures count what they say.
    #[test]
    fn figures_order_and_grid() {
        let eval = Evaluation {
            scored: vec![
                scored(0.9, 1.0, true),
                scored(0.3, 0.2, true),
                scored(0.95, 1.1, false),
                scored(0.6, 0.7, true),
            ],
        };
        assert_eq!(eval.worst_first(), vec![2, 1, 3, 0]);
        assert!((eval.mean_iou() - 0.6875).abs() < 1e-12);
        assert_eq!(eval.colours_right(), 0.75);
        assert_eq!(eval.share(Scored::visible), 0.75);
        assert_eq!(eval.share(Scored::placed), 0.75);
        assert!(!eval.scored[1].visible() && !eval.scored[1].placed());
        let grid = eval.grid(1, 2, 2);
        // Three entries, two a row: 2 rows of 2 x (32 + 32 + gap) - gap.
        assert_eq!(grid.dimensions(), (2 * (64 + GRID_GAP) - GRID_GAP, 2 * (32 + GRID_GAP) - GRID_GAP));
        // The first tile is the worst entry's condition (white ring on black), the second its picture.
        assert_eq!(grid.get_pixel(24, 16).0, [255, 255, 255]);
        assert_eq!(grid.get_pixel(32 + 16, 16).0, eval.scored[2].image.get_pixel(16, 16).0);
    }

    /// Chance: two identical disks overlap fully, two far apart not at all.
    #[test]
    fn chance_of_two_sets() {
        let a = Circle { cx: 8.0, cy: 8.0, radius: 6.0, fg: 0, bg: 1, ring: 1.0 };
        let b = Circle { cx: 40.0, cy: 40.0, ..a };
        assert_eq!(chance_iou(&[a, a], 48), 1.0);
        assert_eq!(chance_iou(&[a, b], 48), 0.0);
        assert!((chance_iou(&[a, a, b], 48) - 1.0 / 3.0).abs() < 1e-12);
    }
}
