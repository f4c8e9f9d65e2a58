//! controlnet_aux's `Body.__call__`: the body net at one scale, its maps back at the image's size, joint peaks,
//! limbs scored along the part affinity fields, and limbs joined into people (Cao et al., "Realtime Multi-Person
//! 2D Pose Estimation using Part Affinity Fields").
//!
//! The result is upstream's two arrays: `candidate` (every peak: x, y, score, id) and `subset` (one row per
//! person: the candidate id of each of the 18 joints or -1, the total score, the number of joints).
use candle_core::{Device, Tensor};

use super::maps::{gaussian_filter, net_planes_to_image, pad_right_down, scaled_size, smart_resize_u8, Plane};
use crate::annotate::cv::Mat;
use crate::Result;

/// The net sees the image with its height at half of 368 (`scale_search = [0.5]`, `boxsize = 368`).
const BOX_SIZE: f64 = 368.0;
const SCALE: f64 = 0.5;
/// The nets' output stride, and the value the input is padded with to a multiple of it.
pub const STRIDE: usize = 8;
pub const PAD_VALUE: u8 = 128;
/// Joint heatmap peaks must exceed this (after the σ 3 blur).
const PEAK_THRESHOLD: f64 = 0.1;
/// A limb sample counts when its PAF projection exceeds this …
const PAF_THRESHOLD: f64 = 0.05;
/// … at more than this share of the samples.
const PAF_SHARE: f64 = 0.8;
/// Samples along a candidate limb.
const MID_SAMPLES: usize = 10;
/// COCO-18 joints.
pub const JOINTS: usize = 18;
/// A person needs at least this many joints, and at least this mean score per joint.
const MIN_PARTS: f64 = 4.0;
const MIN_MEAN_SCORE: f64 = 0.4;
/// The 19 limbs as 1-based joint pairs (the last two, shoulder–ear, only ever join existing people) …
const LIMBS: [(usize, usize); 19] = [
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
    (3, 17),
    (6, 18),
];
/// … and their PAF channels (x, y), numbered from 19 as upstream's `mapIdx` (channel = number - 19).
const PAF_CHANNELS: [(usize, usize); 19] = [
    (31, 32),
    (39, 40),
    (33, 34),
    (35, 36),
    (41, 42),
    (43, 44),
    (19, 20),
    (21, 22),
    (23, 24),
    (25, 26),
    (27, 28),
    (29, 30),
    (47, 48),
    (49, 50),
    (53, 54),
    (51, 52),
    (55, 56),
    (37, 38),
    (45, 46),
];
/// Limbs from this index on never start a new person.
const LIMBS_STARTING_PEOPLE: usize = 17;

/// One heatmap peak: image position, heatmap value there, and its id (its row in `candidate`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    pub x: usize,
    pub y: usize,
    pub score: f64,
    pub id: usize,
}

/// One person: the candidate id of each joint (`None`: not found), the total score and the joint count.
#[derive(Clone, Debug, PartialEq)]
pub struct Person {
    pub joints: [Option<usize>; JOINTS],
    pub score: f64,
    pub parts: f64,
}

/// What `Body.__call__` returns.
#[derive(Clone, Debug, PartialEq)]
pub struct BodyResult {
    pub candidates: Vec<Peak>,
    pub people: Vec<Person>,
}

impl BodyResult {
    /// Each person's joints in image pixels (`format_body_result`).
    pub fn keypoints(&self, person: &Person) -> [Option<(f64, f64)>; JOINTS] {
        person.joints.map(|j| j.map(|id| (self.candidates[id].x as f64, self.candidates[id].y as f64)))
    }
}

/// The net's input: `img` (BGR) at its size for the net, padded to the stride, as `BGR / 256 - 0.5`; and the
/// unpadded size.
pub fn net_input(bgr: &Mat<u8>) -> Result<(Tensor, (usize, usize))> {
    let scale = SCALE * BOX_SIZE / bgr.height as f64;
    let (w, h) = scaled_size(bgr.width, bgr.height, scale);
    let resized = smart_resize_u8(bgr, w, h);
    Ok((image_tensor(&pad_right_down(&resized, STRIDE, PAD_VALUE))?, (w, h)))
}

/// `(1, 3, H, W)` of an interleaved 8-bit image: `v / 256 - 0.5` in f32, channels as stored.
pub fn image_tensor(img: &Mat<u8>) -> Result<Tensor> {
    let (w, h, c) = (img.width, img.height, img.channels);
    let mut data = vec![0f32; c * h * w];
    for (i, px) in img.data.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            data[ch * h * w + i] = v as f32 / 256.0 - 0.5;
        }
    }
    Ok(Tensor::from_vec(data, (1, c, h, w), &Device::Cpu)?)
}

/// Planes of one kind (PAFs or heatmaps), by channel.
pub type Maps = Vec<Plane<f64>>;

/// The net's `(PAFs, heatmaps)` brought back to the `size` of the image: ×8, padding cropped, resized, as f64.
pub fn maps_at_image(
    paf: &Tensor,
    heatmap: &Tensor,
    unpadded: (usize, usize),
    size: (usize, usize),
) -> Result<(Maps, Maps)> {
    let planes = |t: &Tensor| -> Result<Maps> {
        let (_, c, h, w) = t.dims4()?;
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(net_planes_to_image(&data, (c, h, w), STRIDE, unpadded, size)
            .into_iter()
            .map(|p| Plane { width: p.width, height: p.height, data: p.data.into_iter().map(f64::from).collect() })
            .collect())
    };
    Ok((planes(paf)?, planes(heatmap)?))
}

/// Peaks of each joint's heatmap: local maxima (≥ the four neighbours, zero outside) of the σ 3 blurred map
/// above [`PEAK_THRESHOLD`], in raster order, scored by the unblurred map; ids run on across joints.
pub fn find_peaks(heatmaps: &[Plane<f64>]) -> Vec<Vec<Peak>> {
    let mut next_id = 0;
    heatmaps[..JOINTS]
        .iter()
        .map(|map| {
            let blurred = gaussian_filter(map, 3.0);
            let (w, h) = (map.width, map.height);
            let at = |y: isize, x: isize| {
                if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                    0.0
                } else {
                    blurred.at(y as usize, x as usize)
                }
            };
            let mut peaks = Vec::new();
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let v = at(y, x);
                    if v > PEAK_THRESHOLD
                        && v >= at(y - 1, x)
                        && v >= at(y + 1, x)
                        && v >= at(y, x - 1)
                        && v >= at(y, x + 1)
                    {
                        let (x, y) = (x as usize, y as usize);
                        peaks.push(Peak { x, y, score: map.at(y, x), id: next_id });
                        next_id += 1;
                    }
                }
            }
            peaks
        })
        .collect()
}

/// One accepted limb: the two candidate ids, its PAF score and the two peaks' indices within their joints.
#[derive(Clone, Copy, Debug)]
struct Connection {
    a: usize,
    b: usize,
    score: f64,
    i: usize,
    j: usize,
}

/// The PAF score of a limb from `a` to `b` of an image `height` rows tall, if it passes both criteria: the mean
/// projection of the field on the limb's direction at [`MID_SAMPLES`] points, plus a penalty for limbs longer
/// than half the image.
fn limb_score(a: &Peak, b: &Peak, field: (&Plane<f64>, &Plane<f64>), height: usize) -> Option<f64> {
    let (dx, dy) = (b.x as f64 - a.x as f64, b.y as f64 - a.y as f64);
    let norm = (dx * dx + dy * dy).sqrt().max(0.001);
    let (ux, uy) = (dx / norm, dy / norm);
    // np.linspace: start + i * step, the last sample exactly at the end
    let steps = (MID_SAMPLES - 1) as f64;
    let along = |from: usize, to: usize, i: usize| {
        if i == MID_SAMPLES - 1 {
            to as f64
        } else {
            i as f64 * ((to as f64 - from as f64) / steps) + from as f64
        }
    };
    let samples: Vec<f64> = (0..MID_SAMPLES)
        .map(|i| {
            let x = along(a.x, b.x, i).round_ties_even() as usize;
            let y = along(a.y, b.y, i).round_ties_even() as usize;
            field.0.at(y, x) * ux + field.1.at(y, x) * uy
        })
        .collect();
    let mean = samples.iter().fold(0.0, |s, v| s + v) / MID_SAMPLES as f64;
    let score = mean + (0.5 * height as f64 / norm - 1.0).min(0.0);
    let above = samples.iter().filter(|&&v| v > PAF_THRESHOLD).count() as f64;
    (above > PAF_SHARE * MID_SAMPLES as f64 && score > 0.0).then_some(score)
}

/// Limb `k`'s connections: every pair of peaks scored, best first, each peak used once.
fn connect(k: usize, peaks: &[Vec<Peak>], pafs: &[Plane<f64>], height: usize) -> Option<Vec<Connection>> {
    let (cand_a, cand_b) = (&peaks[LIMBS[k].0 - 1], &peaks[LIMBS[k].1 - 1]);
    if cand_a.is_empty() || cand_b.is_empty() {
        return None;
    }
    let field = (&pafs[PAF_CHANNELS[k].0 - 19], &pafs[PAF_CHANNELS[k].1 - 19]);
    let mut scored = Vec::new();
    for (i, a) in cand_a.iter().enumerate() {
        for (j, b) in cand_b.iter().enumerate() {
            if let Some(s) = limb_score(a, b, field, height) {
                scored.push((i, j, s));
            }
        }
    }
    // stable, as Python's sorted: equal scores keep their order
    scored.sort_by(|x, y| y.2.total_cmp(&x.2));
    let mut out: Vec<Connection> = Vec::new();
    for (i, j, score) in scored {
        if out.iter().any(|c| c.i == i || c.j == j) {
            continue;
        }
        out.push(Connection { a: cand_a[i].id, b: cand_b[j].id, score, i, j });
        if out.len() >= cand_a.len().min(cand_b.len()) {
            break;
        }
    }
    Some(out)
}

/// Upstream's `subset` row: 18 candidate ids (-1 = none), total score, joint count.
type Row = [f64; JOINTS + 2];
const SCORE: usize = JOINTS;
const PARTS: usize = JOINTS + 1;

/// Joins the limbs into people, limb by limb as upstream does (a limb touching one person extends it, one
/// touching two disjoint people merges them), then drops people with few joints or a low mean score.
pub fn assemble(peaks: &[Vec<Peak>], pafs: &[Plane<f64>], height: usize) -> BodyResult {
    let candidates: Vec<Peak> = peaks.iter().flatten().copied().collect();
    let mut subset: Vec<Row> = Vec::new();
    for (k, &(a, b)) in LIMBS.iter().enumerate() {
        let Some(connections) = connect(k, peaks, pafs, height) else { continue };
        let (ia, ib) = (a - 1, b - 1);
        for c in connections {
            let (pa, pb) = (c.a as f64, c.b as f64);
            let found: Vec<usize> = (0..subset.len()).filter(|&j| subset[j][ia] == pa || subset[j][ib] == pb).collect();
            match found.len() {
                1 => {
                    let row = &mut subset[found[0]];
                    if row[ib] != pb {
                        row[ib] = pb;
                        row[PARTS] += 1.0;
                        row[SCORE] += candidates[c.b].score + c.score;
                    }
                }
                // upstream has room for two matches (a third would fail there)
                n if n >= 2 => {
                    let (j1, j2) = (found[0], found[1]);
                    let overlap = (0..JOINTS).any(|p| subset[j1][p] >= 0.0 && subset[j2][p] >= 0.0);
                    if !overlap {
                        let other = subset[j2];
                        let row = &mut subset[j1];
                        for p in 0..JOINTS {
                            row[p] += other[p] + 1.0;
                        }
                        row[SCORE] += other[SCORE];
                        row[PARTS] += other[PARTS];
                        row[SCORE] += c.score;
                        subset.remove(j2);
                    } else {
                        let row = &mut subset[j1];
                        row[ib] = pb;
                        row[PARTS] += 1.0;
                        row[SCORE] += candidates[c.b].score + c.score;
                    }
                }
                0 if k < LIMBS_STARTING_PEOPLE => {
                    let mut row = [-1.0; JOINTS + 2];
                    row[ia] = pa;
                    row[ib] = pb;
                    row[PARTS] = 2.0;
                    row[SCORE] = candidates[c.a].score + candidates[c.b].score + c.score;
                    subset.push(row);
                }
                _ => {}
            }
        }
    }
    let people = subset
        .into_iter()
        .filter(|row| !(row[PARTS] < MIN_PARTS || row[SCORE] / row[PARTS] < MIN_MEAN_SCORE))
        .map(|row| Person {
            joints: std::array::from_fn(|p| (row[p] >= 0.0).then_some(row[p] as usize)),
            score: row[SCORE],
            parts: row[PARTS],
        })
        .collect();
    BodyResult { candidates, people }
}
