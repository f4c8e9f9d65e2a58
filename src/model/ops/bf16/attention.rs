//! Scaled dot-product attention with both products on the AVX512-BF16 unit: the bf16 mode's attention, as
//! PyTorch's bf16 UNet runs it (q, k, v and the probabilities rounded to bf16, f32 sums, the softmax in f32).
//!
//! The shared kernels' 32-deep k tiles and 32-column blocks would pad SD1.5's head width of 40 to 64 on both
//! products; here k runs in pairs and columns in panels of 16 ([`avx512::rows_panels`]), so 40 is 20 pairs
//! and 48 columns. Per head, keys and values are packed once (VNNI pairs); per task (a head and a block of
//! query rows, as the f32 kernel in `ops::attention`):
//! 1. the block's queries rounded to bf16 rows of pairs;
//! 2. scores `q kᵀ · scale` into an f32 block that stays in the core's cache;
//! 3. per row, `e^(s - max)` and their sum in f32, then the probabilities scaled and rounded to bf16;
//! 4. `p v` into the output rows.
use half::bf16;
use rayon::prelude::*;

use super::avx512;
use super::TILE;
use crate::model::ops::attention::Dims;

/// Rows each kernel call computes (its register block).
const ROWS: usize = 8;
/// Target size of one task's score block (f32 elements): 512 KiB, half of a Zen 4 core's L2.
const BLOCK_SCORES: usize = 1 << 17;
/// Query rows per task: at least (short key sequences) and at most; multiples of [`ROWS`].
const MIN_ROWS: usize = 16;
const MAX_ROWS: usize = 256;
/// Extra elements per scratch row: rows 16 or 8 KiB apart would share their L1 cache sets.
const ROW_PAD: usize = 32;
/// The most panels one kernel call keeps in registers (8 rows x 3 panels = 24 accumulators of 32).
const MAX_PANELS: usize = 3;

/// Whether the bf16 attention runs: [`super::avx512_paths`].
pub fn available() -> bool {
    super::avx512_paths()
}

/// `softmax(q kᵀ · scale) v` for contiguous f32 `q` (heads, queries, d), `k` (heads, keys, d) and `v` (heads,
/// keys, dv) → (heads, queries, dv), on all threads. Needs [`available`].
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &Dims, scale: f32) -> Vec<f32> {
    assert!(available(), "bf16 attention: the CPU has no AVX512-BF16");
    assert!(
        q.len() == s.heads * s.queries * s.d && k.len() == s.heads * s.keys * s.d && v.len() == s.heads * s.keys * s.dv,
        "bf16 attention: operands do not fit {s:?}"
    );
    let mut out = vec![0f32; s.heads * s.queries * s.dv];
    if out.is_empty() || s.keys == 0 {
        return out;
    }
    let (d_pairs, key_pairs) = (s.d.div_ceil(2), s.keys.div_ceil(2));
    let (key_panels, dv_panels) = (s.keys.div_ceil(TILE), s.dv.div_ceil(TILE));
    // 0. Keys and values of every head packed once: keys as the right operand of q kᵀ (k runs along the head
    //    width), values as the right operand of p v (k runs along the keys).
    let k_panel = d_pairs * 2 * TILE;
    let v_panel = key_pairs * 2 * TILE;
    let mut packed_k = vec![0u16; s.heads * key_panels * k_panel];
    let mut packed_v = vec![0u16; s.heads * dv_panels * v_panel];
    packed_k.par_chunks_mut(key_panels * k_panel).zip(k.par_chunks(s.keys * s.d)).for_each(|(dst, k_h)| {
        for (j, key) in k_h.chunks_exact(s.d).enumerate() {
            let base = (j / TILE) * k_panel + (j % TILE) * 2;
            for (c, &x) in key.iter().enumerate() {
                dst[base + (c / 2) * 2 * TILE + c % 2] = bf16::from_f32(x).to_bits();
            }
        }
    });
    packed_v.par_chunks_mut(dv_panels * v_panel).zip(v.par_chunks(s.keys * s.dv)).for_each(|(dst, v_h)| {
        for (i, value) in v_h.chunks_exact(s.dv).enumerate() {
            let base = (i / 2) * 2 * TILE + i % 2;
            for (c, &x) in value.iter().enumerate() {
                dst[(c / TILE) * v_panel + base + (c % TILE) * 2] = bf16::from_f32(x).to_bits();
            }
        }
    });

    let rows = (BLOCK_SCORES / s.keys).clamp(MIN_ROWS, MAX_ROWS).min(s.queries.next_multiple_of(ROWS));
    let rows = rows.next_multiple_of(ROWS);
    // Scratch row strides (elements): queries in pairs, scores in panels, probabilities in pairs, outputs in
    // panels.
    let (q_rs, s_rs) = (2 * d_pairs, key_panels * TILE + ROW_PAD);
    let (p_rs, o_rs) = (2 * key_pairs + ROW_PAD, dv_panels * TILE);
    // Tasks never straddle two heads: blocks of rows within each head's output.
    let tasks = out
        .par_chunks_mut(s.queries * s.dv)
        .enumerate()
        .flat_map(|(h, out_h)| out_h.par_chunks_mut(rows * s.dv).enumerate().map(move |(b, out_b)| (h, b, out_b)));
    tasks.for_each_init(
        // Zeroed once per worker: padding pairs and padding rows stay zero (only real entries are written).
        || (vec![0u16; rows * q_rs], vec![0f32; rows * s_rs], vec![0u16; rows * p_rs], vec![0f32; rows * o_rs]),
        |(q_bits, scores, probs, o), (h, b, out_b)| {
            let n = out_b.len() / s.dv;
            let n_pad = n.next_multiple_of(ROWS);
            // 1. queries as bf16 pairs (rows past n are zero, or an earlier block's: finite, and never read back)
            let q0 = (h * s.queries + b * rows) * s.d;
            for (dst, src) in q_bits.chunks_exact_mut(q_rs).zip(q[q0..q0 + n * s.d].chunks_exact(s.d)) {
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = bf16::from_f32(x).to_bits();
                }
            }
            // 2. scores, scaled
            let k_h = &packed_k[h * key_panels * k_panel..(h + 1) * key_panels * k_panel];
            for r0 in (0..n_pad).step_by(ROWS) {
                for (first, count) in panel_groups(key_panels) {
                    // SAFETY: rows r0..r0+8 of q_bits (n_pad <= rows) hold d_pairs pairs; panels first..first+count
                    // of k_h hold d_pairs pairs each; the score rows hold key_panels panels; AVX512-BF16 checked.
                    unsafe {
                        panel_product(
                            count,
                            (q_bits[r0 * q_rs..].as_ptr(), q_rs),
                            (k_h[first * k_panel..].as_ptr(), k_panel),
                            d_pairs,
                            scale,
                            (scores[r0 * s_rs + first * TILE..].as_mut_ptr(), s_rs),
                        )
                    }
                }
            }
            // 3. probabilities, rounded (odd key counts: the last pair's second entry stays zero)
            for r in 0..n {
                let row = &mut scores[r * s_rs..r * s_rs + s.keys];
                let sum = super::super::math::exp_row(row);
                // SAFETY: AVX512-BF16 checked; the probability row holds `keys` values.
                unsafe { avx512::scale_round(row, 1.0 / sum, &mut probs[r * p_rs..r * p_rs + s.keys]) };
            }
            // 4. weighted values
            let v_h = &packed_v[h * dv_panels * v_panel..(h + 1) * dv_panels * v_panel];
            for r0 in (0..n_pad).step_by(ROWS) {
                for (first, count) in panel_groups(dv_panels) {
                    // SAFETY: as in 2., with key_pairs pairs per probability row and value panel.
                    unsafe {
                        panel_product(
                            count,
                            (probs[r0 * p_rs..].as_ptr(), p_rs),
                            (v_h[first * v_panel..].as_ptr(), v_panel),
                            key_pairs,
                            1.0,
                            (o[r0 * o_rs + first * TILE..].as_mut_ptr(), o_rs),
                        )
                    }
                }
            }
            for (dst, src) in out_b.chunks_exact_mut(s.dv).zip(o.chunks_exact(o_rs)) {
                dst.copy_from_slice(&src[..s.dv]);
            }
        },
    );
    out
}

/// `count` panels (1 to [`MAX_PANELS`]) of 8 rows: [`avx512::rows_panels`] for that count.
///
/// # Safety
/// As [`avx512::rows_panels`].
unsafe fn panel_product(
    count: usize,
    (a, a_rs): (*const u16, usize),
    (b, b_ps): (*const u16, usize),
    pairs: usize,
    alpha: f32,
    (out, out_rs): (*mut f32, usize),
) {
    match count {
        1 => avx512::rows_panels::<1>(a, a_rs, b, b_ps, pairs, alpha, out, out_rs),
        2 => avx512::rows_panels::<2>(a, a_rs, b, b_ps, pairs, alpha, out, out_rs),
        _ => avx512::rows_panels::<3>(a, a_rs, b, b_ps, pairs, alpha, out, out_rs),
    }
}

/// `panels` split into runs of at most [`MAX_PANELS`] as (first, count), avoiding runs of one where possible
/// (4 = 2 + 2, 7 = 3 + 2 + 2): a one-panel call broadcasts as often as it multiplies.
fn panel_groups(panels: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut first = 0;
    std::iter::from_fn(move || {
        let left = panels - first;
        let count = match left {
            0 => return None,
            4 => 2,
            _ => left.min(MAX_PANELS),
        };
        first += count;
        Some((first - count, count))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panel_groups_cover_every_panel_once() {
        for panels in 0..20 {
            let groups: Vec<_> = panel_groups(panels).collect();
            assert_eq!(groups.iter().map(|g| g.1).sum::<usize>(), panels);
            assert!(groups.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            assert!(groups.iter().all(|&(_, c)| (1..=MAX_PANELS).contains(&c)));
            assert!(panels < 2 || groups.iter().all(|&(_, c)| c > 1), "{panels}: {groups:?}");
        }
    }

    /// f64 attention of the operands as the bf16 path sees them when `rounded` (q, k, v rounded; the
    /// probabilities rounded after the softmax), or of the exact f32 values.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &Dims, scale: f32, rounded: bool) -> Vec<f64> {
        let r = |x: f32| if rounded { bf16::from_f32(x).to_f64() } else { x as f64 };
        let mut out = vec![0f64; s.heads * s.queries * s.dv];
        for h in 0..s.heads {
            for i in 0..s.queries {
                let qi = &q[(h * s.queries + i) * s.d..][..s.d];
                let scores: Vec<f64> = (0..s.keys)
                    .map(|j| {
                        let kj = &k[(h * s.keys + j) * s.d..][..s.d];
                        let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| r(a) * r(b)).sum();
                        dot * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::MIN, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for (j, &sc) in scores.iter().enumerate() {
                    let p = (sc - max).exp() / sum;
                    let p = if rounded { r(p as f32) } else { p };
                    for c in 0..s.dv {
                        out[(h * s.queries + i) * s.dv + c] += p * r(v[(h * s.keys + j) * s.dv + c]);
                    }
                }
            }
        }
        out
    }

    fn worst(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0f64, f64::max)
    }

    #[test]
    fn matches_rounded_reference_on_odd_shapes() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        // Deterministic values in [-a/2, a/2); q and k narrower for wide heads, so that no softmax saturates
        // into a single key.
        let values = |n: usize, offset: usize, m: usize, a: f32| -> Vec<f32> {
            (0..n).map(|i| (((i + offset) * 7919 % m) as f32 / m as f32 - 0.5) * a).collect()
        };
        // (heads, queries, keys, d, dv): SD1.5's widths, odd key and query counts, a text context of 77, one
        // query, an odd head width, a wide single head (the VAE's).
        for (heads, queries, keys, d, dv) in
            [(2, 37, 53, 40, 40), (3, 16, 77, 40, 40), (1, 1, 5, 8, 8), (2, 20, 33, 7, 9), (1, 24, 40, 160, 80)]
        {
            let s = &Dims { heads, queries, keys, d, dv };
            let a = 3.0 / (d as f32 / 8.0).sqrt().max(1.0);
            let (q, k) = (values(heads * queries * d, 0, 101, a), values(heads * keys * d, 5, 97, a));
            let v = values(heads * keys * dv, 11, 89, 3.0);
            let scale = 1.0 / (d as f32).sqrt();
            let ours = attention(&q, &k, &v, s, scale);
            // The same roundings as the reference, with f32 sums and exp against f64: equal but for a
            // probability next to a bf16 rounding boundary (one bf16 step of it: 9e-5 in one case here).
            let rounded = worst(&ours, &reference(&q, &k, &v, s, scale, true));
            assert!(rounded < 2e-4, "{s:?}: {rounded} from the rounded reference");
            // ... and the roundings matter: the exact values' attention is further away (6e-4 to 1.3e-3).
            let exact = worst(&ours, &reference(&q, &k, &v, s, scale, false));
            assert!(exact > 4e-4 && exact < 1e-2, "{s:?}: {exact} from the exact reference");
        }
    }
}
