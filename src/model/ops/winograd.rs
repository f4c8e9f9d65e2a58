//! 3x3 convolutions (stride 1, one pixel of zero padding) by Winograd's minimal filtering F(2x2, 3x3): each
//! 2x2 block of output pixels of one channel pair costs 16 multiplications instead of 36, so the matrix
//! products, nearly all of the VAE decoder and half of a UNet step, do 2.25x fewer multiply-adds.
//!
//! With `d` a 4x4 input tile (one pixel of overlap with its neighbours) and `g` a 3x3 kernel, the 2x2 output is
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. Summed over input channels, the element-wise product at each of the 16
//! points ξ is a matrix product: `M[ξ] (O, tiles) = U[ξ] (O, C) x V[ξ] (C, tiles)`, with `U = G g Gᵀ` per
//! kernel and `V = Bᵀ d B` per input tile. The transforms only add, subtract and halve, so F(2, 3) keeps f32
//! accuracy (larger tiles, F(4, 3), lose about two decimal digits and are not used).
//!
//! Per band of tile rows (its transforms sized to stay in the last-level cache, like the im2col bands in
//! `conv2d`): 1. input transform, one task per channel; 2. the 16 products on all threads; 3. output transform
//! with the bias, one task per output channel, written straight into the NCHW output.
use candle_core::Result;
use rayon::prelude::*;

use super::math::widest;
use super::matmul::{matmul, Mat};
use super::Weight;

/// Output pixels along each side of a tile.
const OUT: usize = 2;
/// Input pixels along each side of a tile (output + kernel - 1).
const IN: usize = 4;
/// Points of the transformed tile: one matrix product each.
const POINTS: usize = IN * IN;
/// Values of one band's transformed input (or output) tiles, in the spirit of conv2d's `BAND_ELEMENTS`.
const BAND_ELEMENTS: usize = 1 << 21;

/// Sizes of one convolution: batch, input channels, height, width, output channels (3x3 kernel, stride 1,
/// padding 1, so the output is h x w too).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
}

/// Whether Winograd runs this convolution on the CPU: enough channels and tiles for the products to be the
/// cost (the kernels' transforms are redone at every call), and not turned off.
pub(crate) fn suits(s: &Shape) -> bool {
    /// Fewer input or output channels leave the products too small to pay for the transforms (the hint
    /// embedding's first convolutions, conv_in's 4 latent channels).
    const MIN_CHANNELS: usize = 32;
    let tiles = s.b * s.h.div_ceil(OUT) * s.w.div_ceil(OUT);
    s.c >= MIN_CHANNELS && s.o >= MIN_CHANNELS && tiles >= min_tiles()
}

/// Whether 3x3 convolutions may run on Winograd at all: `CONTROLNET_WINOGRAD=0` keeps im2col everywhere (for
/// comparisons; another number sets the fewest tiles it takes).
pub fn enabled() -> bool {
    min_tiles() != usize::MAX
}

/// The fewest tiles (over the batch) a convolution takes Winograd at: below it the kernels' transform costs
/// about what the products save (the UNet's 1280-channel levels at 256 px).
fn min_tiles() -> usize {
    const MIN_TILES: usize = 128;
    static SETTING: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("CONTROLNET_WINOGRAD") {
        Ok(v) if v.trim() == "0" => usize::MAX,
        Ok(v) => v.trim().parse().unwrap_or(MIN_TILES),
        Err(_) => MIN_TILES,
    })
}

/// The convolution of `x` (B, C, H, W) with `kernel` (O, C, 3, 3) plus `bias` (O), as (B, O, H, W).
pub(crate) fn conv3x3<K: Weight>(x: &[f32], kernel: &[K], bias: &[f32], s: &Shape) -> Result<Vec<f32>> {
    let Shape { b, c, h, w, o } = *s;
    if x.len() != b * c * h * w || kernel.len() != o * c * 9 || bias.len() != o {
        candle_core::bail!("winograd conv: operands do not fit {s:?}")
    }
    // 1. The kernels' transforms, [out channel][point][in channel]: the products' left operands.
    let u = transform_kernels(kernel, o, c);
    let (tiles_h, tiles_w) = (h.div_ceil(OUT), w.div_ceil(OUT));
    let band_tile_rows = (BAND_ELEMENTS / (POINTS * c.max(o) * tiles_w).max(1)).clamp(1, tiles_h);
    let most = band_tile_rows * tiles_w;
    // Every value of the band's part of these is written before it is read.
    let mut v = super::unfilled::<f32>(c * POINTS * most);
    let mut m = super::unfilled::<f32>(o * POINTS * most);
    // The output transform writes every output pixel.
    let mut out = super::unfilled::<f32>(b * o * h * w);
    for item in 0..b {
        let input = &x[item * c * h * w..(item + 1) * c * h * w];
        let output = &mut out[item * o * h * w..(item + 1) * o * h * w];
        for row0 in (0..tiles_h).step_by(band_tile_rows) {
            let rows = band_tile_rows.min(tiles_h - row0);
            let n = rows * tiles_w;
            // 2. Input tiles, [in channel][point][tile].
            let v = &mut v[..c * POINTS * n];
            v.par_chunks_mut(POINTS * n)
                .zip(input.par_chunks(h * w))
                .for_each(|(v, plane)| transform_input(plane, h, w, row0, rows, v));
            // 3. One product per point: M[ξ] (O, n) = U[ξ] (O, C) x V[ξ] (C, n), rows POINTS * n apart.
            let m = &mut m[..o * POINTS * n];
            for point in 0..POINTS {
                let lhs = Mat::rows(&u[point * c..], POINTS * c);
                let rhs = Mat::rows(&v[point * n..], POINTS * n);
                matmul(o, n, c, &mut m[point * n..], (POINTS * n, 1), false, lhs, rhs)?;
            }
            // 4. Output tiles back to pixels, bias added.
            output
                .par_chunks_mut(h * w)
                .zip(m.par_chunks(POINTS * n))
                .zip(bias.par_iter())
                .for_each(|((plane, m), &bias)| transform_output(m, n, bias, h, w, row0, rows, plane));
        }
    }
    Ok(out)
}

/// `U = G g Gᵀ` for every (out, in) channel pair, laid out `[out][point][in]`. G's rows are
/// `(1, 0, 0), (½, ½, ½), (½, -½, ½), (0, 0, 1)`.
fn transform_kernels<K: Weight>(kernel: &[K], o: usize, c: usize) -> Vec<f32> {
    let g_rows = |a: f32, b: f32, d: f32| [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
    // One task per output channel.
    let mut u = super::unfilled::<f32>(o * POINTS * c);
    u.par_chunks_mut(POINTS * c).zip(kernel.par_chunks(9 * c)).for_each(|(u, kernels)| {
        for (i, g) in kernels.chunks_exact(9).enumerate() {
            let g: [f32; 9] = std::array::from_fn(|j| g[j].widen());
            // G g: 4 rows of 3, one per combination of g's rows.
            let mut gg = [[0f32; 3]; IN];
            for col in 0..3 {
                for (r, value) in g_rows(g[col], g[3 + col], g[6 + col]).into_iter().enumerate() {
                    gg[r][col] = value;
                }
            }
            // (G g) Gᵀ: the same combinations of each row's columns.
            for (r, row) in gg.iter().enumerate() {
                for (q, value) in g_rows(row[0], row[1], row[2]).into_iter().enumerate() {
                    u[(r * IN + q) * c + i] = value;
                }
            }
        }
    });
    u
}

widest! {
    /// `V = Bᵀ d B` for the tiles of tile rows `row0..row0 + rows` of one input channel's `plane`, into `v`
    /// (`[point][tile]`). Bᵀ's rows are `(1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)`.
    fn transform_input(plane: &[f32], h: usize, w: usize, row0: usize, rows: usize, v: &mut [f32]) = input_tiles
}

widest! {
    /// `Y = Aᵀ M A + bias` for the `n` tiles of one output channel (`m`: `[point][tile]`), written into the output
    /// rows of tile rows `row0..row0 + rows` of `plane` (the last tile row and column may be half outside it).
    /// Aᵀ's rows are `(1, 1, 1, 0), (0, 1, -1, -1)`.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(m: &[f32], n: usize, bias: f32, h: usize, w: usize, row0: usize, rows: usize, plane: &mut [f32]) = output_tiles
}

/// [`transform_input`]; every loop runs over contiguous columns or tiles, so it vectorises.
#[inline(always)]
fn input_tiles(plane: &[f32], h: usize, w: usize, row0: usize, rows: usize, v: &mut [f32]) {
    let tiles_w = w.div_ceil(OUT);
    let n = rows * tiles_w;
    // Input rows padded with zeros: one column on the left, enough on the right for the last tile.
    let width = OUT * tiles_w + 2;
    let mut padded = [vec![0f32; width], vec![0f32; width], vec![0f32; width], vec![0f32; width]];
    let mut combined = vec![0f32; width];
    // Tile t's four columns of a combined row are even[t], odd[t], even[t + 1], odd[t + 1].
    let (mut even, mut odd) = (vec![0f32; tiles_w + 1], vec![0f32; tiles_w + 1]);
    for tile_row in 0..rows {
        // 1. The tile row's four input rows (from one above its first output row), zero outside the plane.
        let top = (OUT * (row0 + tile_row)) as isize - 1;
        for (r, row) in padded.iter_mut().enumerate() {
            let y = top + r as isize;
            if (0..h as isize).contains(&y) {
                let y = y as usize;
                row[1..=w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                row[w + 1..].fill(0.0);
            } else {
                row.fill(0.0);
            }
        }
        let first = tile_row * tiles_w;
        for r in 0..IN {
            // 2. Row r of Bᵀ d, `a ± b` of two input rows (the sign a factor of ±1, exact), every column at once;
            // then split into even and odd columns.
            let (a, b, sign) = match r {
                0 => (&padded[0], &padded[2], -1.0),
                1 => (&padded[1], &padded[2], 1.0),
                2 => (&padded[2], &padded[1], -1.0),
                _ => (&padded[1], &padded[3], -1.0),
            };
            for ((c, &a), &b) in combined.iter_mut().zip(a).zip(b) {
                *c = a + sign * b;
            }
            for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(combined.chunks_exact(2)) {
                (*e, *o) = (pair[0], pair[1]);
            }
            // 3. (Bᵀ d) B: the same combinations of each tile's four columns, one point at a time.
            let (e0, e1, o0, o1) = (&even[..tiles_w], &even[1..], &odd[..tiles_w], &odd[1..]);
            for (q, (x, y, sign)) in
                [(e0, e1, -1.0), (o0, e1, 1.0), (e1, o0, -1.0), (o0, o1, -1.0)].into_iter().enumerate()
            {
                let start = (r * IN + q) * n + first;
                for ((v, &x), &y) in v[start..start + tiles_w].iter_mut().zip(x).zip(y) {
                    *v = x + sign * y;
                }
            }
        }
    }
}

/// [`transform_output`]; every loop runs over contiguous tiles, so it vectorises.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_tiles(m: &[f32], n: usize, bias: f32, h: usize, w: usize, row0: usize, rows: usize, plane: &mut [f32]) {
    let tiles_w = w.div_ceil(OUT);
    // Each tile's two output pixels of one row.
    let (mut even, mut odd) = (vec![0f32; tiles_w], vec![0f32; tiles_w]);
    for tile_row in 0..rows {
        let first = tile_row * tiles_w;
        // Point (r, q) of this tile row's tiles.
        let point = |r: usize, q: usize| &m[(r * IN + q) * n + first..][..tiles_w];
        for a in 0..OUT {
            let y = OUT * (row0 + tile_row) + a;
            if y >= h {
                break;
            }
            // 1. Row a of Aᵀ M for each column q: `(M[r0] ± M[r1]) ± M[r2]` (the sign a factor of ±1, exact).
            let (r0, r1, r2, sign) = if a == 0 { (0, 1, 2, 1.0) } else { (1, 2, 3, -1.0) };
            let s = |q: usize| (point(r0, q), point(r1, q), point(r2, q));
            let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
            // 2. (Aᵀ M) A plus the bias: columns s0 + s1 + s2 and s1 - s2 - s3.
            for t in 0..tiles_w {
                let sq = |(x, y, z): (&[f32], &[f32], &[f32])| (x[t] + sign * y[t]) + sign * z[t];
                let (v0, v1, v2, v3) = (sq(s0), sq(s1), sq(s2), sq(s3));
                even[t] = v0 + v1 + v2 + bias;
                odd[t] = v1 - v2 - v3 + bias;
            }
            // 3. Into the output row, the last tile's second column where it is inside.
            let row = &mut plane[y * w..(y + 1) * w];
            for (pair, (&e, &o)) in row.chunks_mut(OUT).zip(even.iter().zip(&odd)) {
                pair[0] = e;
                if let Some(p) = pair.get_mut(1) {
                    *p = o;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::conv2d::Conv2dParams;
    use crate::model::ops::test_support::{candle_conv2d, max_rel_diff};
    use candle_core::{DType, Device, Tensor};

    /// Ours against candle's convolution in f64, on random values seeded by `seed`.
    fn check(s: Shape, seed: u64) {
        let Shape { b, c, h, w, o } = s;
        let random = |len: usize, seed: u64| -> Vec<f32> {
            crate::rng::TorchGenerator::new(seed).rand(len).into_iter().map(|u| u * 2.0 - 1.0).collect()
        };
        let (x, k, bias) = (random(b * c * h * w, seed), random(o * c * 9, seed + 1), random(o, seed + 2));
        let ours = conv3x3(&x, &k, &bias, &s).unwrap();
        let dev = Device::Cpu;
        let f64s =
            |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &dev).unwrap().to_dtype(DType::F64).unwrap();
        let (x, k, bias) = (f64s(&x, &[b, c, h, w]), f64s(&k, &[o, c, 3, 3]), f64s(&bias, &[o]));
        let want = candle_conv2d(&x, &k, &bias, Conv2dParams { padding: 1, stride: 1 });
        let diff = max_rel_diff(&f64s(&ours, &[b, o, h, w]), &want);
        assert!(diff < 1e-5, "{s:?}: relative difference {diff:e}");
    }

    #[test]
    fn matches_candle_on_odd_and_even_sizes() {
        // Odd sizes leave half tiles on the bottom and right; 1x1 and 2x3 planes are all padding but one tile.
        for (b, c, h, w, o) in [(2, 3, 5, 7, 4), (1, 8, 8, 8, 5), (1, 2, 1, 1, 3), (1, 4, 2, 3, 2), (3, 5, 9, 4, 6)] {
            check(Shape { b, c, h, w, o }, 1);
        }
    }

    #[test]
    fn bands_of_tile_rows_match_one_band() {
        // 160 channels of a 64-wide plane: a band holds ~6 tile rows, so a 40-row plane takes several bands,
        // the last one short.
        check(Shape { b: 1, c: 160, h: 40, w: 64, o: 33 }, 4);
    }

    #[test]
    fn runs_where_channels_and_tiles_are_enough() {
        // conv2d's test shape for Winograd (forward and input gradient, batch 2).
        assert!(suits(&Shape { b: 2, c: 32, h: 19, w: 23, o: 40 }));
        assert!(!suits(&Shape { b: 2, c: 16, h: 19, w: 23, o: 40 }), "too few input channels");
        assert!(!suits(&Shape { b: 2, c: 1280, h: 8, w: 8, o: 1280 }), "too few tiles");
    }

    /// The dispatched transforms (AVX2 or AVX-512 where the CPU has them) give the plain loops' bits, on odd
    /// planes (half tiles) and on a band that starts below the first tile row.
    #[test]
    fn dispatched_transforms_are_the_plain_loops() {
        let values =
            |len: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.013).collect() };
        for (h, w, row0, rows) in [(9usize, 13usize, 0usize, 5usize), (8, 16, 1, 3), (1, 1, 0, 1)] {
            let n = rows * w.div_ceil(OUT);
            let plane = values(h * w);
            let (mut fast, mut plain) = (vec![0f32; POINTS * n], vec![0f32; POINTS * n]);
            transform_input(&plane, h, w, row0, rows, &mut fast);
            input_tiles(&plane, h, w, row0, rows, &mut plain);
            assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "input {h}x{w}");
            let m = values(POINTS * n);
            let (mut fast, mut plain) = (vec![0f32; h * w], vec![0f32; h * w]);
            transform_output(&m, n, 0.25, h, w, row0, rows, &mut fast);
            output_tiles(&m, n, 0.25, h, w, row0, rows, &mut plain);
            assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "output {h}x{w}");
        }
    }

    #[test]
    fn rejects_operands_that_do_not_fit() {
        let s = Shape { b: 1, c: 2, h: 3, w: 3, o: 2 };
        assert!(conv3x3(&[0.0; 17], &[0.0; 36], &[0.0; 2], &s).is_err());
    }
}
