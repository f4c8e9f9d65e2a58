//! The AVX512-BF16 kernel (`vdpbf16ps`: each f32 lane adds the products of one pair of bf16 values), and the
//! vector f32 → bf16 rounding the packers use.
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Tiles, BLOCK, TILE, TILE_ELEMS};

/// Whether the CPU has AVX512-BF16 (Zen 4/5, Intel since Cooper Lake).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// 32 f32 rounded to nearest-even bf16 bits.
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); `src` and `dst` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn round_32(src: &[f32], dst: &mut [u16]) {
    debug_assert!(src.len() >= 32 && dst.len() >= 32);
    let lo = _mm512_loadu_ps(src.as_ptr());
    let hi = _mm512_loadu_ps(src.as_ptr().add(16));
    // The second operand fills the low half.
    let v = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(dst.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(v));
}

/// Rows `k` and `k + 1` (16 f32 each) rounded to bf16 and interleaved, `k0 k1 k0 k1 ...` per column: one row
/// of a packed right-hand tile.
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); `r0`, `r1` hold 16 values, `dst` 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn round_interleave_16(r0: &[f32], r1: &[f32], dst: &mut [u16]) {
    debug_assert!(r0.len() >= 16 && r1.len() >= 16 && dst.len() >= 32);
    let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(r1.as_ptr()), _mm512_loadu_ps(r0.as_ptr()));
    // Lane 2j takes row 0's column j (index j), lane 2j+1 row 1's (index 16 + j).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let v = _mm512_permutexvar_epi16(idx, std::mem::transmute::<__m512bh, __m512i>(v));
    _mm512_storeu_si512(dst.as_mut_ptr().cast(), v);
}

/// A whole packed right-hand tile: for each of `TILE` pairs `p`, rows `start + 2p·rs` and the one after
/// (16 f32 from each) as [`round_interleave_16`] packs them, into `dst`'s 32-value row `p`. One call per tile
/// instead of one per pair (the calls and their bounds checks were half of the packing's time).
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); `src` holds 16 values from every row start addressed, `dst` a
/// whole tile (`TILE_ELEMS` values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn round_interleave_tile(src: &[f32], start: usize, rs: usize, dst: &mut [u16]) {
    debug_assert!(start + (2 * TILE - 1) * rs + 16 <= src.len() && dst.len() >= TILE_ELEMS);
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let (src, out) = (src.as_ptr(), dst.as_mut_ptr());
    for p in 0..TILE {
        let r0 = src.add(start + 2 * p * rs);
        let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(r0.add(rs)), _mm512_loadu_ps(r0));
        let v = _mm512_permutexvar_epi16(idx, std::mem::transmute::<__m512bh, __m512i>(v));
        _mm512_storeu_si512(out.add(p * 2 * TILE).cast(), v);
    }
}

/// A whole packed right-hand tile from 32 runs of 16 f32: pair `p` interleaves runs `2p` and `2p + 1` (as
/// [`round_interleave_tile`]), each read under its lane mask; masked-off lanes are zero and not read (a
/// convolution window's padding: AVX-512's masked loads do not touch them).
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); for every run, the lanes set in its mask are readable f32 at
/// `pointer + lane`; `dst` holds a whole tile (`TILE_ELEMS` values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn round_interleave_masked_tile(runs: &[(*const f32, u16); 2 * TILE], dst: &mut [u16]) {
    assert!(dst.len() >= TILE_ELEMS);
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let out = dst.as_mut_ptr();
    for p in 0..TILE {
        let ((p0, m0), (p1, m1)) = (runs[2 * p], runs[2 * p + 1]);
        let v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, p1), _mm512_maskz_loadu_ps(m0, p0));
        let v = _mm512_permutexvar_epi16(idx, std::mem::transmute::<__m512bh, __m512i>(v));
        _mm512_storeu_si512(out.add(p * 2 * TILE).cast(), v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn round_interleave_masked_tile(_: &[(*const f32, u16); 2 * TILE], _: &mut [u16]) {
    unreachable!("no AVX512-BF16 off x86-64")
}

/// One row of a packed left-hand panel: `tiles` runs of 32 f32 from `src` rounded to bf16 into `dst` at
/// `offset`, `offset + TILE_ELEMS`, ... (one call per row instead of one per row and tile).
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); `src` holds `32 · tiles` values, `dst` reaches
/// `offset + (tiles - 1) · TILE_ELEMS + 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn round_row_tiles(src: &[f32], tiles: usize, dst: &mut [u16], offset: usize) {
    debug_assert!(src.len() >= 32 * tiles && (tiles == 0 || dst.len() >= offset + (tiles - 1) * TILE_ELEMS + 32));
    let (src, out) = (src.as_ptr(), dst.as_mut_ptr());
    for t in 0..tiles {
        let lo = _mm512_loadu_ps(src.add(32 * t));
        let hi = _mm512_loadu_ps(src.add(32 * t + 16));
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(out.add(offset + t * TILE_ELEMS).cast(), std::mem::transmute::<__m512bh, __m512i>(v));
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn round_row_tiles(_: &[f32], _: usize, _: &mut [u16], _: usize) {
    unreachable!("no AVX512-BF16 off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn round_interleave_tile(_: &[f32], _: usize, _: usize, _: &mut [u16]) {
    unreachable!("no AVX512-BF16 off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn round_32(_: &[f32], _: &mut [u16]) {
    unreachable!("no AVX512-BF16 off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn round_interleave_16(_: &[f32], _: &[f32], _: &mut [u16]) {
    unreachable!("no AVX512-BF16 off x86-64")
}

/// Rows of the output each pass keeps in registers: 8 rows x 2 column tiles = 16 accumulators of 32.
const ROWS: usize = 8;

/// One 32x32 block of sums from two rows of left tiles (where `at` says) and two packed right panels of
/// `k_tiles` tiles.
///
/// # Safety
/// The CPU has AVX512-BF16; `at` addresses 2 x `k_tiles` tiles inside `a` (checked by the caller), `b` holds
/// 2 * `k_tiles` packed tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn block(a: &[u16], at: Tiles, b: &[u16], k_tiles: usize, sums: &mut [f32; BLOCK * BLOCK]) {
    let panel = k_tiles * TILE_ELEMS;
    assert!(b.len() >= 2 * panel);
    for half in 0..2 {
        let a_panel = a.as_ptr().add(at.offset + half * at.second);
        for r0 in (0..TILE).step_by(ROWS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for kt in 0..k_tiles {
                let a_tile = a_panel.add(kt * at.step);
                let (b0, b1) = (b.as_ptr().add(kt * TILE_ELEMS), b.as_ptr().add(panel + kt * TILE_ELEMS));
                for p in 0..TILE {
                    // Row p of a right tile: 16 columns' (k, k+1) pairs.
                    let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(p * 2 * TILE).cast()));
                    let v1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * 2 * TILE).cast()));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // Row r0 + r's pair p of the left tile, in every lane.
                        let pair = a_tile.add((r0 + r) * at.row + 2 * p).cast::<i32>().read_unaligned();
                        let u: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        acc[0] = _mm512_dpbf16_ps(acc[0], u, v0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], u, v1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = &mut sums[(half * TILE + r0 + r) * BLOCK..];
                _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(row.as_mut_ptr().add(TILE), acc[1]);
            }
        }
    }
}

/// `ROWS` rows x `PANELS` panels of 16 columns of `alpha · a · b`, overwriting `out`: `a` holds bf16 rows of
/// pairs (row r's pair p at `a + r·a_rs + 2p`), `b` packed panels of `pairs` VNNI rows (`[pair][16 columns][2]`,
/// panel q at `b + q·b_ps`), and row r of `out` starts at `out + r·out_rs` with 16·`PANELS` f32. Unlike
/// [`block`], k runs in pairs rather than 32-deep tiles and the column count in single panels, so a head width
/// of 40 (SD1.5) is 20 pairs and 3 panels, not 64 and 64 (attention's products).
///
/// # Safety
/// The CPU has AVX512-BF16; the pointers address `ROWS` rows of `pairs` pairs, `PANELS` panels of `pairs` x 32
/// values and `ROWS` output rows of 16·`PANELS` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_panels<const PANELS: usize>(
    a: *const u16,
    a_rs: usize,
    b: *const u16,
    b_ps: usize,
    pairs: usize,
    alpha: f32,
    out: *mut f32,
    out_rs: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); PANELS]; ROWS];
    for p in 0..pairs {
        let mut v = [_mm512_setzero_si512(); PANELS];
        for (q, v) in v.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(b.add(q * b_ps + p * 2 * TILE).cast());
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = a.add(r * a_rs + 2 * p).cast::<i32>().read_unaligned();
            let u: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (acc, &v) in acc.iter_mut().zip(&v) {
                *acc = _mm512_dpbf16_ps(*acc, u, std::mem::transmute::<__m512i, __m512bh>(v));
            }
        }
    }
    let alpha = _mm512_set1_ps(alpha);
    for (r, acc) in acc.iter().enumerate() {
        for (q, &acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * out_rs + q * TILE), _mm512_mul_ps(acc, alpha));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_panels<const PANELS: usize>(
    _: *const u16,
    _: usize,
    _: *const u16,
    _: usize,
    _: usize,
    _: f32,
    _: *mut f32,
    _: usize,
) {
    unreachable!("no AVX512-BF16 off x86-64")
}

/// `src · scale` rounded to nearest-even bf16 bits into `dst` (16 per instruction; the rest one by one).
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); `dst` holds `src.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub unsafe fn scale_round(src: &[f32], scale: f32, dst: &mut [u16]) {
    assert!(dst.len() >= src.len());
    let s = _mm512_set1_ps(scale);
    let mut chunks = src.chunks_exact(16);
    let mut i = 0;
    for c in &mut chunks {
        let v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), s));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), std::mem::transmute::<__m256bh, __m256i>(v));
        i += 16;
    }
    for (d, &x) in dst[i..].iter_mut().zip(chunks.remainder()) {
        *d = half::bf16::from_f32(x * scale).to_bits();
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn scale_round(_: &[f32], _: f32, _: &mut [u16]) {
    unreachable!("no AVX512-BF16 off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn block(_: &[u16], _: Tiles, _: &[u16], _: usize, _: &mut [f32; BLOCK * BLOCK]) {
    unreachable!("no AVX512-BF16 off x86-64")
}
