//! Content shuffle (ControlNet 1.1's `ContentShuffleDetector`): the image warped by a smooth random flow, so
//! colours and textures survive while the layout is scrambled.
//!
//! The flow is two "noise disks" (uniform noise on a coarse 256-pixel grid, cubic-upsampled, min-max
//! normalised) scaled to pixel coordinates; the image is sampled there with `cv2.remap(INTER_LINEAR)`.
//! The noise comes from numpy's legacy `RandomState` (MT19937), seeded like A1111 seeds it
//! (`np.random.seed(seed)`), so a seed gives the same map as A1111 with that seed.
use image::RgbImage;

use super::cv::{self, Interpolation, Mat};
use super::{Detector, Preprocess};

/// Cell size of the random flow (`f = 256` in the reference).
const FLOW_CELL: usize = 256;

pub struct Shuffle {
    pub seed: u32,
}

impl Detector for Shuffle {
    fn name(&self) -> &str {
        "shuffle"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::Resize
    }

    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage> {
        Ok(shuffle(&Mat::from_rgb(image), self.seed).to_rgb())
    }
}

/// The shuffled image.
pub fn shuffle(img: &Mat<u8>, seed: u32) -> Mat<u8> {
    let (w, h) = (img.width, img.height);
    let mut rng = NumpyRandomState::new(seed);
    // x flow first, then y: the reference's call order
    let fx = noise_disk(&mut rng, w, h, FLOW_CELL);
    let fy = noise_disk(&mut rng, w, h, FLOW_CELL);
    let map_x: Vec<f32> = fx.iter().map(|&v| (v * (w - 1) as f64) as f32).collect();
    let map_y: Vec<f32> = fy.iter().map(|&v| (v * (h - 1) as f64) as f32).collect();
    cv::remap_linear_u8(img, &map_x, &map_y, w, h)
}

/// `make_noise_disk(H, W, 1, F)`: smooth noise in [0, 1] over an `w × h` image.
fn noise_disk(rng: &mut NumpyRandomState, w: usize, h: usize, f: usize) -> Vec<f64> {
    // 1. uniform noise on a grid with one spare cell around the image, row-major like numpy
    let (gw, gh) = (w / f + 2, h / f + 2);
    let grid = Mat { width: gw, height: gh, channels: 1, data: (0..gw * gh).map(|_| rng.random_sample()).collect() };
    // 2. cubic upsampling to the image plus an f-pixel margin, of which the centre is kept
    let big = cv::resize_f64(&grid, w + 2 * f, h + 2 * f, Interpolation::Cubic);
    let mut crop = Vec::with_capacity(w * h);
    for y in f..f + h {
        crop.extend_from_slice(&big.data[y * big.width + f..y * big.width + f + w]);
    }
    // 3. min-max normalisation (in place, as numpy: subtract the min, then divide by the new max)
    let lo = crop.iter().copied().fold(f64::INFINITY, f64::min);
    crop.iter_mut().for_each(|v| *v -= lo);
    let hi = crop.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    crop.iter_mut().for_each(|v| *v /= hi);
    crop
}

/// numpy's legacy global generator (`np.random.seed(s)`, `np.random.uniform()`): MT19937 seeded with
/// `init_genrand`, doubles from two 32-bit draws (27 + 26 bits).
struct NumpyRandomState {
    mt: [u32; 624],
    index: usize,
}

impl NumpyRandomState {
    fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { mt, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & UPPER) | (self.mt[(i + 1) % 624] & LOWER);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= MATRIX_A;
                }
                self.mt[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A double in [0, 1) with 53 random bits.
    fn random_sample(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::test_support::{assert_close, cases, load};

    #[test]
    fn numpy_random_state_sequence() {
        // np.random.seed(0); np.random.uniform(size=3)
        let mut r = NumpyRandomState::new(0);
        let v: Vec<f64> = (0..3).map(|_| r.random_sample()).collect();
        assert_eq!(v, [0.5488135039273248, 0.7151893663724195, 0.6027633760716439]);
    }

    #[test]
    fn matches_a1111_shuffle_with_numpy_seed() {
        // metric: mean |diff| <= 0.05, >= 99.5% exact (same random numbers; the flow is rounded to 1/32
        // pixel, so a last-bit difference in the cubic noise can move a sample by one sub-pixel step)
        for c in cases("shuffle") {
            let ours = Shuffle { seed: c.f64("seed") as u32 }.detect(&load(&c.input)).unwrap();
            assert_close(&ours, &load(&c.output), 0.05, 0, 0.995, &c.output);
        }
    }

    #[test]
    fn deterministic_per_seed_and_seed_dependent() {
        let img = load("input_odd.png");
        let a = Shuffle { seed: 7 }.detect(&img).unwrap();
        assert_eq!(a, Shuffle { seed: 7 }.detect(&img).unwrap());
        assert_ne!(a, Shuffle { seed: 8 }.detect(&img).unwrap());
    }

    #[test]
    fn output_colours_come_from_the_input() {
        // permutation-like: on a two-colour image, bilinear sampling can only produce blends of the two,
        // and most output pixels keep one of the input colours exactly
        let mut img = RgbImage::new(80, 60);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 40 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) };
        }
        let out = Shuffle { seed: 3 }.detect(&img).unwrap();
        let mut pure = 0;
        for p in out.pixels() {
            assert_eq!(p[1], 0, "green appeared");
            assert!(p[0] as u16 + p[2] as u16 >= 254 && p[0] as u16 + p[2] as u16 <= 256, "not a blend: {p:?}");
            if p.0 == [255, 0, 0] || p.0 == [0, 0, 255] {
                pure += 1;
            }
        }
        assert!(pure as f64 > 0.9 * (80.0 * 60.0), "only {pure} pure pixels");
    }
}
