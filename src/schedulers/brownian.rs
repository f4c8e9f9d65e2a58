//! A Brownian motion sampled on a dyadic tree, as torchsde's `BrownianInterval` with the settings diffusers'
//! `BrownianTreeNoiseSampler` uses (`tol = 1e-6`, `pool_size = 24`, `halfway_tree = True`, no Lévy area).
//!
//! The idea (a Brownian bridge): the increment W over the whole interval [t0, t1] is drawn once; any
//! sub-interval's increment is drawn conditioned on its parent's. A node [s, e] split at its midpoint m gives its
//! left child W_left = (m − s)/(e − s) · W + sqrt((m − s)(e − m)/(e − s)) · z and its right child W − W_left,
//! z being fresh noise from the parent's own seed. Every split is at the (rounded) halfway point, so the tree,
//! and with it every node's value, depends only on the entropy, never on which queries came first: a query
//! [ta, tb] is the sum of the canonical dyadic nodes that tile it.
//!
//! Seeds and numbers, as torchsde computes them:
//! - times are rounded to 6 decimals (`round(x, 6)`, from `tol = 1e-6`), the root's ends included;
//! - the root's seeds are `SeedSequence(entropy, pool_size=24).generate_state(3)` (W, H, Lévy area), each other
//!   node's `SeedSequence(entropy, spawn_key=(key, depth), pool_size=24).generate_state(4)` with key = 2·parent
//!   key + (0 left, 1 right); each draw is `torch.randn(shape)` from a generator seeded with that word (only the W
//!   seed is used: the H and Lévy-area draws never reach the result);
//! - tensor arithmetic is float32 with python-float scalars rounded to float32 first, as torch does; the root
//!   increment is scaled by sqrt(t1 − t0) of the unrounded ends.
//!
//! torchsde keeps recent node values in an LRU cache of 45; values do not depend on it, so this keeps the same
//! bounded cache only for speed.
use candle_core::{Device, Tensor};

use super::schedule::mul;
use super::seed_sequence::SeedSequence;
use crate::rng::TorchGenerator;

/// torchsde's `tol` as diffusers sets it: times are resolved to 1e-6, i.e. rounded to this many decimals.
const TIME_DECIMALS: usize = 6;
/// `pool_size` of the seed sequences (diffusers passes 24; torchsde's default is 8).
const POOL_SIZE: usize = 24;
/// torchsde's default `cache_size`: how many node values are kept.
const CACHE_SIZE: usize = 45;

/// One node of the tree: the interval [start, end], and once split, its midpoint, children and W seed.
#[derive(Debug, Clone)]
struct Node {
    start: f64,
    end: f64,
    parent: Option<usize>,
    is_left: bool,
    spawn_key: u64,
    depth: u64,
    split: Option<Split>,
}

#[derive(Debug, Clone, Copy)]
struct Split {
    midway: f64,
    left: usize,
    right: usize,
    /// Seed of the noise that splits this node's increment between its children.
    w_seed: u32,
}

/// torchsde's `BrownianInterval(t0, t1, size, entropy=entropy, tol=1e-6, pool_size=24, halfway_tree=True)`.
pub struct BrownianInterval {
    shape: Vec<usize>,
    device: Device,
    entropy: u64,
    nodes: Vec<Node>,
    /// The root's increment over [t0, t1].
    root_w: Tensor,
    /// Recently computed node increments, most recent last.
    cache: Vec<(usize, Tensor)>,
}

impl BrownianInterval {
    /// A Brownian motion on [t0, t1] (t0 <= t1) of tensors shaped `shape`, determined by `entropy`.
    pub fn new(t0: f64, t1: f64, shape: &[usize], entropy: u64, device: &Device) -> candle_core::Result<Self> {
        if t0 > t1 || t0.is_nan() || t1.is_nan() {
            candle_core::bail!("Brownian interval: t0 ({t0}) must not exceed t1 ({t1})");
        }
        // 1. The root's seeds; its increment scales unit noise by sqrt(t1 - t0) (unrounded ends).
        let seeds = SeedSequence::new(entropy, &[], POOL_SIZE).generate_state(3);
        let noise = TorchGenerator::new(seeds[0] as u64).randn_tensor(shape, device)?;
        let root_w = mul(&noise, (t1 - t0).sqrt() as f32)?;
        // 2. The root node, its ends rounded like every time in the tree.
        let root = Node {
            start: round_time(t0),
            end: round_time(t1),
            parent: None,
            is_left: false,
            spawn_key: 0,
            depth: 0,
            split: None,
        };
        Ok(Self {
            shape: shape.to_vec(),
            device: device.clone(),
            entropy,
            nodes: vec![root],
            root_w,
            cache: Vec::new(),
        })
    }

    /// The increment W(tb) − W(ta) for ta <= tb (torchsde's `__call__(ta, tb)`): times outside the interval are
    /// clamped to it (torchsde warns), equal times give zeros.
    pub fn increment(&mut self, ta: f64, tb: f64) -> candle_core::Result<Tensor> {
        let (start, end) = (self.nodes[0].start, self.nodes[0].end);
        let (ta, tb) = (ta.clamp(start, end), tb.clamp(start, end));
        if ta > tb {
            candle_core::bail!("Brownian interval: query times must satisfy ta <= tb, got {ta} and {tb}");
        }
        if ta == tb {
            return Tensor::zeros(self.shape.as_slice(), candle_core::DType::F32, &self.device);
        }
        let (ta, tb) = (round_time(ta), round_time(tb));
        if ta == tb {
            candle_core::bail!("Brownian interval: query times {ta} and {tb} are closer than its 1e-6 resolution");
        }
        // 1. The canonical dyadic nodes that tile [ta, tb], left to right.
        let mut nodes = Vec::new();
        self.locate(0, ta, tb, &mut nodes);
        // 2. Their increments, summed in order.
        let mut w = self.node_increment(nodes[0])?;
        for &node in &nodes[1..] {
            w = (w + self.node_increment(node)?)?;
        }
        Ok(w)
    }

    /// Appends the nodes tiling [ta, tb] (inside `node`, times rounded) to `out`, splitting nodes at their
    /// halfway points as needed.
    fn locate(&mut self, node: usize, ta: f64, tb: f64, out: &mut Vec<usize>) {
        let (start, end) = (self.nodes[node].start, self.nodes[node].end);
        if ta == start && tb == end {
            out.push(node);
            return;
        }
        let split = match self.nodes[node].split {
            Some(split) => split,
            None => self.split(node),
        };
        if tb <= split.midway {
            self.locate(split.left, ta, tb, out);
        } else if ta >= split.midway {
            self.locate(split.right, ta, tb, out);
        } else {
            self.locate(split.left, ta, split.midway, out);
            self.locate(split.right, split.midway, tb, out);
        }
    }

    /// Splits a node at its rounded halfway point; its W seed comes from its place in the tree.
    fn split(&mut self, node: usize) -> Split {
        let n = &self.nodes[node];
        let midway = round_time(0.5 * (n.end + n.start));
        let (start, end, key, depth) = (n.start, n.end, n.spawn_key, n.depth);
        let w_seed = SeedSequence::new(self.entropy, &[key, depth], POOL_SIZE).generate_state(1)[0];
        let left = self.nodes.len();
        let child = |start, end, is_left: bool| Node {
            start,
            end,
            parent: Some(node),
            is_left,
            spawn_key: 2 * key + u64::from(!is_left),
            depth: depth + 1,
            split: None,
        };
        self.nodes.push(child(start, midway, true));
        self.nodes.push(child(midway, end, false));
        let split = Split { midway, left, right: left + 1, w_seed };
        self.nodes[node].split = Some(split);
        split
    }

    /// A node's increment: the root's, or its share of its parent's by the Brownian bridge.
    fn node_increment(&mut self, node: usize) -> candle_core::Result<Tensor> {
        if let Some(pos) = self.cache.iter().position(|(n, _)| *n == node) {
            let entry = self.cache.remove(pos);
            let w = entry.1.clone();
            self.cache.push(entry);
            return Ok(w);
        }
        let Some(parent) = self.nodes[node].parent else { return Ok(self.root_w.clone()) };
        let parent_w = self.node_increment(parent)?;
        let p = &self.nodes[parent];
        let split = p.split.expect("a child's parent is split");
        // Brownian bridge: mean (m - s)/h · W, variance (m - s)(e - m)/h (float64 scalars, float32 tensors).
        let h_reciprocal = 1.0 / (p.end - p.start);
        let left_diff = split.midway - p.start;
        let right_diff = p.end - split.midway;
        let mean = mul(&mul(&parent_w, left_diff as f32)?, h_reciprocal as f32)?;
        let var = left_diff * right_diff * h_reciprocal;
        let noise = TorchGenerator::new(split.w_seed as u64).randn_tensor(&self.shape, &self.device)?;
        let left_w = (mean + mul(&noise, var.sqrt() as f32)?)?;
        let w = if self.nodes[node].is_left { left_w } else { (parent_w - left_w)? };
        if self.cache.len() >= CACHE_SIZE {
            self.cache.remove(0);
        }
        self.cache.push((node, w.clone()));
        Ok(w)
    }
}

/// Python's `round(x, 6)`: x's exact binary value rounded to 6 decimals (ties to even), read back as the
/// nearest double. Rust's fixed-precision formatting rounds the exact value the same way.
fn round_time(x: f64) -> f64 {
    format!("{x:.TIME_DECIMALS$}").parse().expect("a formatted float parses")
}

/// diffusers' `BrownianTreeNoiseSampler` on one tree: unit-variance noise for a step from `sigma` to
/// `sigma_next`, the Brownian increment between them divided by sqrt(|sigma_next − sigma|).
pub struct BrownianTreeNoise {
    tree: BrownianInterval,
}

impl BrownianTreeNoise {
    /// A tree over [sigma_min, sigma_max] (the smallest positive and the largest sigma of the schedule).
    pub fn new(
        sigma_min: f32,
        sigma_max: f32,
        shape: &[usize],
        entropy: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (lo, hi) = if sigma_min < sigma_max { (sigma_min, sigma_max) } else { (sigma_max, sigma_min) };
        Ok(Self { tree: BrownianInterval::new(lo as f64, hi as f64, shape, entropy, device)? })
    }

    /// The noise for the step sigma → sigma_next (float32, as diffusers computes it).
    pub fn sample(&mut self, sigma: f32, sigma_next: f32) -> candle_core::Result<Tensor> {
        // diffusers sorts the times and flips the sign when they come in decreasing order (they always do
        // while denoising); the tree itself was built with increasing ends.
        let (lo, hi, sign) = if sigma < sigma_next { (sigma, sigma_next, 1.0) } else { (sigma_next, sigma, -1.0) };
        let w = mul(&self.tree.increment(lo as f64, hi as f64)?, sign)?;
        super::schedule::div(&w, (sigma_next - sigma).abs().sqrt())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/brownian/brownian.safetensors");

    fn fixture() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(FIXTURE, &Device::Cpu).unwrap()
    }

    fn ints(t: &Tensor) -> Vec<i64> {
        t.to_vec1::<i64>().unwrap()
    }

    fn pairs(t: &Tensor) -> Vec<[f32; 2]> {
        t.to_vec2::<f32>().unwrap().into_iter().map(|p| [p[0], p[1]]).collect()
    }

    fn assert_same(ours: &Tensor, theirs: &Tensor, what: &str) {
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst == 0.0, "{what}: max |diff| {worst:e}");
    }

    /// SeedSequence words as numpy generates them for torchsde's root and node keys.
    #[test]
    fn seed_sequences_match_numpy() {
        let fx = fixture();
        for i in 0.. {
            let Some(expected) = fx.get(&format!("seed_sequence.{i}")) else { break };
            let input: Vec<u64> =
                ints(&fx[&format!("seed_sequence.{i}.input")]).into_iter().map(|v| v as u64).collect();
            let words = SeedSequence::new(input[0], &input[1..], POOL_SIZE).generate_state(4);
            let expected: Vec<u32> = ints(expected).into_iter().map(|v| v as u32).collect();
            assert_eq!(words, expected, "seed sequence {input:?}");
        }
    }

    /// Increments of one tree, queried in torchsde's order (nested, adjacent, clamped, empty, one tolerance
    /// step wide), equal torchsde's bit for bit.
    #[test]
    fn increments_match_torchsde() {
        let fx = fixture();
        let queries = pairs(&fx["interval.queries"]);
        let (t0, t1) = (queries[0][0] as f64, queries[0][1] as f64);
        let shape = fx["interval.0"].dims().to_vec();
        let entropy = ints(&fx["interval.entropy"])[0] as u64;
        let mut tree = BrownianInterval::new(t0, t1, &shape, entropy, &Device::Cpu).unwrap();
        for (j, [ta, tb]) in queries.into_iter().enumerate() {
            let w = tree.increment(ta as f64, tb as f64).unwrap();
            assert_same(&w, &fx[&format!("interval.{j}")], &format!("query {j}: [{ta}, {tb}]"));
        }
    }

    /// diffusers' BrownianTreeNoiseSampler: sorted times, sign, division by sqrt(|sigma_next - sigma|).
    #[test]
    fn noise_sampler_matches_diffusers() {
        let fx = fixture();
        let range = fx["sampler.range"].to_vec1::<f32>().unwrap();
        let shape = fx["sampler.0"].dims().to_vec();
        let entropy = ints(&fx["sampler.entropy"])[0] as u64;
        let mut noise = BrownianTreeNoise::new(range[0], range[1], &shape, entropy, &Device::Cpu).unwrap();
        for (j, [sigma, sigma_next]) in pairs(&fx["sampler.pairs"]).into_iter().enumerate() {
            let n = noise.sample(sigma, sigma_next).unwrap();
            assert_same(&n, &fx[&format!("sampler.{j}")], &format!("noise {j}: {sigma} -> {sigma_next}"));
        }
    }

    #[test]
    fn rounds_like_python() {
        assert_eq!(round_time(14.614643096923828), 14.614643);
        assert_eq!(round_time(0.029167532920837402), 0.029168);
        // An exact tie rounds to even, as Python's round(0.0078125, 6) == 0.007812.
        assert_eq!(round_time(0.0078125), 0.007812);
        assert_eq!(round_time(0.0078135), 0.007813);
    }

    /// The bridge is consistent: the increments of [a, b] and [b, c] add up to that of [a, c], and the whole
    /// interval's is the root's.
    #[test]
    fn increments_add_up() {
        let dev = Device::Cpu;
        let mut tree = BrownianInterval::new(0.03, 14.6, &[1, 4, 2, 2], 42, &dev).unwrap();
        let whole = tree.increment(0.03, 14.6).unwrap();
        let diff = (whole - tree.root_w.clone()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>();
        assert_eq!(diff.unwrap(), 0.0);
        let ab = tree.increment(1.0, 3.5).unwrap();
        let bc = tree.increment(3.5, 7.25).unwrap();
        let ac = tree.increment(1.0, 7.25).unwrap();
        let gap = ((ab + bc).unwrap() - ac).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gap < 1e-5, "{gap}");
        assert!(tree.increment(2.0, 1.0).is_err());
    }
}
