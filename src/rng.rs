//! A CPU random generator that reproduces `torch.Generator("cpu")`, so that a seed gives the same latents
//! and the same per-step noise as diffusers on PyTorch CPU.
//!
//! What torch does (ATen `CPUGeneratorImpl`, `MT19937RNGEngine.h`, `DistributionsHelper.h`,
//! `TransformationHelper.h`, `native/cpu/DistributionTemplates.h`), and so what this file does:
//! - The engine is the 32-bit Mersenne Twister, seeded with the LOW 32 bits of the 64-bit seed
//!   (`manual_seed(2**32 + 5)` draws what `manual_seed(5)` draws). `random64()` is two draws, first one high.
//! - Uniform floats keep the low 24 bits of one draw (f32) or the low 53 bits of `random64()` (f64),
//!   times 2^-24 / 2^-53: values in [0, 1).
//! - `randn` of a contiguous float32 tensor with at least 16 elements fills ALL elements with f32 uniforms
//!   first, then Box–Muller in blocks of 16 (element j pairs with j + 8); if the size is not a multiple of
//!   16, 16 fresh uniforms replace the LAST 16 elements and that block is transformed again. On x86-64
//!   torch runs this with AVX2 and the Cephes-style `log256_ps` / `sincos256_ps` polynomials of
//!   `avx_mathfun.h` (AVX512 machines fall back to the AVX2 kernel), not libm; we evaluate the same
//!   polynomials in the same f32 operation order, fused multiply-adds included (see `mod cephes`).
//! - Fewer than 16 elements go one by one through `normal_distribution<double>`: two f64 uniforms per
//!   pair, the `sin` half is cached in the generator and returned by the next scalar draw, even one in a
//!   later call. `manual_seed` clears that cache; the 16-block path neither reads nor writes it.
//!
//! Checked bit for bit against torch 2.15 (x86-64, AVX512 capability) by the fixtures of
//! `tools/fixtures/gen_rng.py` (and once on 4 M values). torch without the AVX2 kernel (aarch64) uses
//! libm's `logf`/`cosf`/`sinf` instead: about 40% of its values differ from x86's, by up to ~2e-6.
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Mersenne Twister state size (words) and the middle-word offset of its recurrence.
const MT_N: usize = 624;
const MT_M: usize = 397;
/// Twist matrix constant, and the masks that pick the upper bit / lower 31 bits of a word.
const MT_MATRIX_A: u32 = 0x9908_b0df;
const MT_UPPER_MASK: u32 = 0x8000_0000;
const MT_LOWER_MASK: u32 = 0x7fff_ffff;
/// Knuth's multiplier of the MT2002 initialisation `init_genrand`.
const MT_INIT_MULT: u32 = 1_812_433_253;

/// Mantissa digits of f32 / f64: how many low bits of a draw a uniform float keeps.
const F32_DIGITS: u32 = 24;
const F64_DIGITS: u32 = 53;
/// torch switches `randint` from one 32-bit draw to `random64()` at this range (allows ~5% modulo skew).
const RANDINT_64BIT_RANGE: u64 = 1 << 28;
/// The vectorised normal kernel works on blocks of 16 (8 Box–Muller pairs) and needs at least one block.
const NORMAL_BLOCK: usize = 16;

/// The 32-bit Mersenne Twister (MT19937) with torch's bookkeeping: `left` counts down to the next
/// regeneration of the whole state, `next` indexes the word to temper next.
#[derive(Clone, Debug, PartialEq)]
struct Mt19937 {
    state: [u32; MT_N],
    left: u32,
    next: u32,
}

impl Mt19937 {
    /// `init_genrand` of MT2002 on the low 32 bits of `seed`.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = MT_INIT_MULT.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        // left = 1: the first draw regenerates the state before reading it.
        Self { state, left: 1, next: 0 }
    }

    /// The next 32-bit output.
    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.regenerate();
        }
        let mut y = self.state[self.next as usize];
        self.next += 1;
        // Tempering.
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Replaces all 624 words by the recurrence x[k+N] = x[k+M] ^ twist(x[k], x[k+1]).
    fn regenerate(&mut self) {
        for k in 0..MT_N {
            let (lo, hi) = (self.state[k], self.state[(k + 1) % MT_N]);
            let mixed = (lo & MT_UPPER_MASK) | (hi & MT_LOWER_MASK);
            let twisted = (mixed >> 1) ^ if hi & 1 == 1 { MT_MATRIX_A } else { 0 };
            self.state[k] = self.state[(k + MT_M) % MT_N] ^ twisted;
        }
        self.left = MT_N as u32;
        self.next = 0;
    }
}

/// Everything that determines a generator's future draws, for saving and exactly resuming a run.
/// Field meanings follow torch's `get_state()` layout, so values can be compared with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratorState {
    /// The seed given to `new` (torch's `initial_seed()`), the full 64 bits.
    pub seed: u64,
    /// The 624 Mersenne Twister words.
    pub mt: Vec<u32>,
    /// Draws left before the state is regenerated (1..=624).
    pub left: u32,
    /// Index of the next word to temper.
    pub next: u32,
    /// The cached second value of the scalar Box–Muller, as f64 bits (bits, not a float, so that any
    /// serde format round-trips it exactly).
    pub next_normal_bits: Option<u64>,
}

/// `torch.Generator("cpu").manual_seed(seed)` and the draws diffusers makes with it.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    /// torch's `next_double_normal_sample_`.
    next_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        Self { seed, engine: Mt19937::new(seed), next_normal: None }
    }

    /// The seed this generator was created with (`initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// Two draws, the first as the high word (`CPUGeneratorImpl::random64`).
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: the low 24 bits of one draw, scaled into [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        let bits = self.random() & ((1 << F32_DIGITS) - 1);
        bits as f32 * (1.0 / (1u32 << F32_DIGITS) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: the low 53 bits of `random64()`, scaled into [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        let bits = self.random64() & ((1u64 << F64_DIGITS) - 1);
        bits as f64 * (1.0 / (1u64 << F64_DIGITS) as f64)
    }

    /// `normal_distribution<double>(0, 1)`: Box–Muller on two f64 uniforms; returns the cosine half and
    /// keeps the sine half for the next call. Both go through torch's `n * std + mean` with std = 1,
    /// mean = 0 on the way out, which only turns -0 into +0.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_normal.take() {
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(radius * theta.sin());
        radius * theta.cos() + 0.0
    }

    /// `torch.randn(n, generator=g)` in float32.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < NORMAL_BLOCK {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        // 1. Uniforms for every element, in order.
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        // 2. Box–Muller on each whole block of 16.
        for block in data.chunks_exact_mut(NORMAL_BLOCK) {
            normal_fill_16(block);
        }
        // 3. A partial last block: redraw the last 16 elements and transform them as one block.
        if !n.is_multiple_of(NORMAL_BLOCK) {
            let tail = &mut data[n - NORMAL_BLOCK..];
            for x in tail.iter_mut() {
                *x = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=g)` in float32, placed on `device` (drawn on the CPU, as diffusers
    /// does with a CPU generator, so the values do not depend on the device).
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn(n), shape, device)
    }

    /// `torch.rand(n, generator=g)` in float32: uniforms in [0, 1).
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randint(low, high, (n,), generator=g)`: integers in [low, high) as `(draw % range) + low`.
    ///
    /// # Panics
    /// If `high <= low` (torch raises "random_ expects 'from' to be less than 'to'").
    pub fn randint(&mut self, low: i64, high: i64, n: usize) -> Vec<i64> {
        assert!(low < high, "randint: low ({low}) must be less than high ({high})");
        let range = high.wrapping_sub(low) as u64;
        (0..n)
            .map(|_| {
                let draw = if range >= RANDINT_64BIT_RANGE { self.random64() } else { self.random() as u64 };
                ((draw % range) as i64).wrapping_add(low)
            })
            .collect()
    }

    /// Snapshot of everything that determines future draws.
    pub fn state(&self) -> GeneratorState {
        GeneratorState {
            seed: self.seed,
            mt: self.engine.state.to_vec(),
            left: self.engine.left,
            next: self.engine.next,
            next_normal_bits: self.next_normal.map(f64::to_bits),
        }
    }

    /// Rebuilds a generator from [`TorchGenerator::state`]; it continues exactly where that one stopped.
    pub fn from_state(state: &GeneratorState) -> crate::Result<Self> {
        let mt: [u32; MT_N] = state.mt.as_slice().try_into().map_err(|_| {
            crate::Error::Invalid(format!(
                "generator state: expected {MT_N} Mersenne Twister words, found {}",
                state.mt.len()
            ))
        })?;
        // Same checks as torch's `mt19937::is_valid`, plus: every read before the next regeneration stays
        // inside the state (next + left <= N + 1).
        let (left, next) = (state.left as usize, state.next as usize);
        if !(1..=MT_N).contains(&left) || next + left > MT_N + 1 {
            return Err(crate::Error::Invalid(format!(
                "generator state: inconsistent position (left = {left}, next = {next}, state size {MT_N})"
            )));
        }
        Ok(Self {
            seed: state.seed,
            engine: Mt19937 { state: mt, left: state.left, next: state.next },
            next_normal: state.next_normal_bits.map(f64::from_bits),
        })
    }
}

/// Box–Muller on one block of 16 f32 uniforms in place, as torch's AVX2 `NormalFill16<float>`:
/// u1 = 1 - data[j] (in (0, 1], safe for log), u2 = data[j + 8], radius = sqrt(-2 log u1),
/// theta = 2 pi u2; data[j] = radius cos theta, data[j + 8] = radius sin theta.
fn normal_fill_16(data: &mut [f32]) {
    // 2 pi rounded to f32 once, as `_mm256_set1_ps(2.0f * c10::pi<double>)`.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..NORMAL_BLOCK / 2 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + NORMAL_BLOCK / 2];
        let radius = (-2.0 * cephes::log(u1)).sqrt();
        let (sin, cos) = cephes::sincos(two_pi * u2);
        // torch finishes with fma(n, std = 1, mean = 0): n itself, except that -0 becomes +0.
        data[j] = radius * cos + 0.0;
        data[j + NORMAL_BLOCK / 2] = radius * sin + 0.0;
    }
}

/// Scalar versions of the Cephes-derived AVX polynomials in torch's `avx_mathfun.h` (J. Pommier's
/// `sse_mathfun`), one lane at a time, with the same f32 operations in the same order. Where the source
/// multiplies and then adds, torch's compiled kernel holds a fused multiply-add (GCC contracts the
/// intrinsics), so we use `mul_add` there: without it ~1% of `randn` values come out 1 ulp off; with it
/// they match bit for bit. Valid for the arguments Box–Muller gives them: `log` on (0, 1], `sincos` on
/// [0, 2 pi).
// The constants keep every digit the C source prints, so that they round to the same f32.
#[allow(clippy::excessive_precision)]
mod cephes {
    /// Constants are written as C does (a double literal rounded to f32), so they round identically.
    const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    const LOG_P: [f32; 9] = [
        7.037_683_629_2e-2_f64 as f32,
        -1.151_461_031_0e-1_f64 as f32,
        1.167_699_874_0e-1_f64 as f32,
        -1.242_014_084_6e-1_f64 as f32,
        1.424_932_278_7e-1_f64 as f32,
        -1.666_805_766_5e-1_f64 as f32,
        2.000_071_476_5e-1_f64 as f32,
        -2.499_999_399_3e-1_f64 as f32,
        3.333_333_117_4e-1_f64 as f32,
    ];
    /// ln 2 split into a short head (exact in f32 products) and a small correction: Q2 + Q1 = ln 2.
    const LOG_Q1: f32 = -2.121_944_40e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693_359_375_f64 as f32;
    /// Smallest normal f32: the log kernel flushes smaller (subnormal) inputs up to it.
    const MIN_NORM_POS: f32 = f32::MIN_POSITIVE;
    const EXPONENT_MASK: u32 = 0x7f80_0000;
    const EXPONENT_BIAS: i32 = 0x7f;

    /// pi/4 split into three parts for the extended-precision argument reduction.
    const MINUS_DP: [f32; 3] =
        [-0.785_156_25_f64 as f32, -2.418_756_484_985_351_562_5e-4_f64 as f32, -3.774_894_977_445_941_08e-8_f64 as f32];
    const SIN_P: [f32; 3] =
        [-1.951_529_589_1e-4_f64 as f32, 8.332_160_873_6e-3_f64 as f32, -1.666_665_461_1e-1_f64 as f32];
    const COS_P: [f32; 3] = [
        2.443_315_711_809_948e-5_f64 as f32,
        -1.388_731_625_493_765e-3_f64 as f32,
        4.166_664_568_298_827e-2_f64 as f32,
    ];
    const FOUR_OVER_PI: f32 = 1.273_239_544_735_16_f64 as f32;
    const SIGN_MASK: u32 = 0x8000_0000;

    /// Natural logarithm (`log256_ps`): x = m 2^e with m in [sqrt(1/2), sqrt 2), log(1 + (m - 1)) by a
    /// degree-9 polynomial, plus e ln 2.
    pub(super) fn log(x: f32) -> f32 {
        // 1. Split into exponent and a mantissa in [0.5, 1).
        let x = x.max(MIN_NORM_POS);
        let bits = x.to_bits();
        let mut e = ((bits >> 23) as i32 - EXPONENT_BIAS) as f32 + 1.0;
        let mut m = f32::from_bits((bits & !EXPONENT_MASK) | 0.5f32.to_bits());
        // 2. Move the mantissa to [sqrt(1/2), sqrt 2) and subtract 1.
        let below = m < SQRT_HALF;
        let tmp = if below { m } else { 0.0 };
        m -= 1.0;
        e -= if below { 1.0 } else { 0.0 };
        m += tmp;
        // 3. Polynomial in m (Horner), times m^3, minus m^2/2.
        let z = m * m;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(m, p);
        }
        y = (y * m).mul_add(z, e * LOG_Q1);
        y -= z * 0.5;
        // 4. Add back the exponent's share.
        e.mul_add(LOG_Q2, m + y)
    }

    /// Sine and cosine together (`sincos256_ps`): reduce by multiples of pi/4, then pick between the
    /// sine and cosine polynomials on [-pi/4, pi/4] by octant.
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        // 1. |x|, and the sine's sign.
        let mut sign_sin = x.to_bits() & SIGN_MASK;
        let x = x.abs();
        // 2. Octant j = (trunc(|x| 4/pi) + 1) & !1, i.e. rounded to even.
        let j = ((x * FOUR_OVER_PI) as i32).wrapping_add(1) & !1;
        let y = j as f32;
        let swap_sign_sin = ((j & 4) as u32) << 29;
        let use_sin_poly_for_sin = j & 2 == 0;
        // 3. x - j pi/4 in three steps (extended precision).
        let x = y.mul_add(MINUS_DP[2], y.mul_add(MINUS_DP[1], y.mul_add(MINUS_DP[0], x)));
        let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
        sign_sin ^= swap_sign_sin;
        // 4. Both polynomials.
        let z = x * x;
        let mut cos_poly = COS_P[0];
        cos_poly = cos_poly.mul_add(z, COS_P[1]);
        cos_poly = cos_poly.mul_add(z, COS_P[2]);
        cos_poly = (cos_poly * z).mul_add(z, -(z * 0.5)) + 1.0;
        let mut sin_poly = SIN_P[0];
        sin_poly = sin_poly.mul_add(z, SIN_P[1]);
        sin_poly = sin_poly.mul_add(z, SIN_P[2]);
        sin_poly = (sin_poly * z).mul_add(x, x);
        // 5. Select by octant with the kernel's masked adds (they also fix the sign of zeros), then signs.
        let (sin_part_cos, sin_part_sin) = if use_sin_poly_for_sin { (0.0, sin_poly) } else { (cos_poly, 0.0) };
        let sin = sin_part_cos + sin_part_sin;
        let cos = (cos_poly - sin_part_cos) + (sin_poly - sin_part_sin);
        (f32::from_bits(sin.to_bits() ^ sign_sin), f32::from_bits(cos.to_bits() ^ sign_cos))
    }
}

/// torch's CPU `randperm(n, generator)`: from the identity, swap element i with one drawn from [i, n).
pub fn randperm(n: usize, rng: &mut TorchGenerator) -> Vec<usize> {
    let mut r: Vec<usize> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let z = rng.random() as usize % (n - i);
        r.swap(i, z + i);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::safetensors::load;
    use std::collections::HashMap;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng/rng.safetensors");
    /// Must equal SIZES in tools/fixtures/gen_rng.py.
    const SIZES: [usize; 8] = [1, 3, 15, 16, 17, 31, 64, 1024];
    /// Must equal RANDINT in tools/fixtures/gen_rng.py: (low, high, n).
    const RANDINT: [(i64, i64, usize); 4] = [(0, 1000, 10), (-5, 5, 7), (0, 1 << 30, 6), (100, 101, 3)];

    /// One call of CALLS in tools/fixtures/gen_rng.py.
    enum Call {
        Randn(usize),
        Rand(usize),
        Randint(i64, i64, usize),
    }
    const CALLS: [Call; 11] = [
        Call::Randn(3),
        Call::Randn(5),
        Call::Randn(20),
        Call::Randn(1),
        Call::Rand(7),
        Call::Randn(17),
        Call::Randint(0, 1000, 5),
        Call::Randn(2),
        Call::Randn(1),
        Call::Randn(64),
        Call::Randn(1),
    ];

    fn fixtures() -> HashMap<String, Tensor> {
        load(FIXTURE, &Device::Cpu).unwrap()
    }

    fn seeds(fx: &HashMap<String, Tensor>) -> Vec<u64> {
        fx["seeds"].to_vec1::<i64>().unwrap().into_iter().map(|s| s as u64).collect()
    }

    fn f32s(fx: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
        fx[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn i64s(fx: &HashMap<String, Tensor>, key: &str) -> Vec<i64> {
        fx[key].to_vec1::<i64>().unwrap()
    }

    /// Floats must match torch bit for bit (they do on x86-64); report the largest difference otherwise.
    fn assert_same(ours: &[f32], torch: &[f32], what: &str) {
        assert_eq!(ours.len(), torch.len(), "{what}: length");
        let max_diff = ours.iter().zip(torch).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let first_bad = ours.iter().zip(torch).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(first_bad.is_none(), "{what}: differs from torch at {first_bad:?}, max |diff| = {max_diff:e}");
    }

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // Known outputs of MT19937 seeded with 5489 (the C++ std::mt19937 default): first, and 10000th.
        let mut g = TorchGenerator::new(5489);
        assert_eq!(g.random(), 3_499_211_612);
        let mut g = TorchGenerator::new(5489);
        let last = (0..10_000).map(|_| g.random()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_keeps_low_32_bits() {
        let mut a = TorchGenerator::new((1 << 32) + 5);
        let mut b = TorchGenerator::new(5);
        assert_eq!(a.randn(40), b.randn(40));
        assert_eq!(a.seed(), (1 << 32) + 5);
    }

    #[test]
    fn randn_fresh_generators_match_torch() {
        let fx = fixtures();
        for (i, &seed) in seeds(&fx).iter().enumerate() {
            for n in SIZES {
                let key = format!("randn.s{i}.n{n}");
                assert_same(&TorchGenerator::new(seed).randn(n), &f32s(&fx, &key), &key);
            }
        }
    }

    #[test]
    fn randn_tensor_matches_torch_4d() {
        let fx = fixtures();
        for (i, &seed) in seeds(&fx).iter().enumerate() {
            let key = format!("randn4d.s{i}");
            let t = TorchGenerator::new(seed).randn_tensor(&[1, 4, 16, 16], &Device::Cpu).unwrap();
            assert_eq!(t.dims(), fx[&key].dims(), "{key}: shape");
            assert_same(&t.flatten_all().unwrap().to_vec1().unwrap(), &f32s(&fx, &key), &key);
        }
    }

    #[test]
    fn rand_and_randint_match_torch() {
        let fx = fixtures();
        for (i, &seed) in seeds(&fx).iter().enumerate() {
            for n in [1, 5, 100] {
                let key = format!("rand.s{i}.n{n}");
                assert_same(&TorchGenerator::new(seed).rand(n), &f32s(&fx, &key), &key);
            }
            for (k, (low, high, n)) in RANDINT.into_iter().enumerate() {
                let key = format!("randint.s{i}.{k}");
                assert_eq!(TorchGenerator::new(seed).randint(low, high, n), i64s(&fx, &key), "{key}");
            }
        }
    }

    /// One generator through mixed calls: pins the Box–Muller cache (kept across scalar calls, untouched by
    /// the 16-block path) and the engine position, and then the whole state against torch's `get_state()`.
    #[test]
    fn call_sequence_and_final_state_match_torch() {
        let fx = fixtures();
        for (i, &seed) in seeds(&fx).iter().enumerate() {
            let mut g = TorchGenerator::new(seed);
            for (k, call) in CALLS.iter().enumerate() {
                let key = format!("seq.s{i}.{k}");
                match *call {
                    Call::Randn(n) => assert_same(&g.randn(n), &f32s(&fx, &key), &key),
                    Call::Rand(n) => assert_same(&g.rand(n), &f32s(&fx, &key), &key),
                    Call::Randint(lo, hi, n) => {
                        assert_eq!(g.randint(lo, hi, n), i64s(&fx, &key), "{key}")
                    }
                }
            }
            let st = g.state();
            let torch_mt: Vec<u32> = i64s(&fx, &format!("seqstate.s{i}.mt")).iter().map(|&w| w as u32).collect();
            assert_eq!(st.mt, torch_mt, "s{i}: Mersenne Twister words");
            assert_eq!(st.left as i64, i64s(&fx, &format!("seqstate.s{i}.left"))[0], "s{i}: left");
            assert_eq!(st.next as i64, i64s(&fx, &format!("seqstate.s{i}.next"))[0], "s{i}: next");
            assert_eq!(st.seed, i64s(&fx, &format!("seqstate.s{i}.seed"))[0] as u64, "s{i}: seed");
            let normal = i64s(&fx, &format!("seqstate.s{i}.normal"));
            let torch_cache = (normal[0] != 0).then_some(normal[1] as u64);
            assert_eq!(st.next_normal_bits, torch_cache, "s{i}: cached normal sample");
        }
    }

    #[test]
    fn state_round_trips_through_json_and_resumes_exactly() {
        let mut g = TorchGenerator::new(42);
        g.randn(3); // leaves a cached normal sample
        g.randn(700); // crosses a state regeneration
        let json = serde_json::to_string(&g.state()).unwrap();
        let mut resumed = TorchGenerator::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(resumed.state(), g.state());
        assert_eq!(resumed.randn(5), g.randn(5));
        assert_eq!(resumed.randn(33), g.randn(33));
    }

    #[test]
    fn from_state_rejects_bad_states() {
        let good = TorchGenerator::new(1).state();
        let short = GeneratorState { mt: vec![0; 10], ..good.clone() };
        let err = TorchGenerator::from_state(&short).unwrap_err().to_string();
        assert!(err.contains("624") && err.contains("10"), "{err}");
        let zero_left = GeneratorState { left: 0, ..good.clone() };
        assert!(TorchGenerator::from_state(&zero_left).is_err());
        let past_end = GeneratorState { left: 5, next: 623, ..good };
        assert!(TorchGenerator::from_state(&past_end).is_err());
    }

    #[test]
    #[should_panic(expected = "must be less than high")]
    fn randint_rejects_empty_range() {
        TorchGenerator::new(0).randint(3, 3, 1);
    }

    /// How far libm's float functions (torch's non-AVX2 path, e.g. on aarch64) land from the AVX2
    /// polynomials: within a few ulp, never bit-identical everywhere.
    #[test]
    fn cephes_functions_are_close_to_libm() {
        for k in 1..=1000 {
            let u = k as f32 / 1000.0;
            assert!((cephes::log(u) - u.ln()).abs() <= 4.0 * f32::EPSILON * u.ln().abs().max(1.0));
            let theta = u * std::f32::consts::TAU;
            let (s, c) = cephes::sincos(theta);
            assert!((s - theta.sin()).abs() <= 4.0 * f32::EPSILON, "sin({theta})");
            assert!((c - theta.cos()).abs() <= 4.0 * f32::EPSILON, "cos({theta})");
        }
    }
}
