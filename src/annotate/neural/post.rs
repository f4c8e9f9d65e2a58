//! controlnet_aux's map post-processing (`controlnet_aux/util.py`): `safe_step` (soft edges quantised to a few
//! levels, A1111's "safe" variants) and the scribble recipe (`nms`, blur, threshold) of HED and PiDiNet.
use image::RgbImage;

use crate::annotate::cv::{gaussian_blur_f32, gaussian_blur_u8, Mat};

/// `safe_step(x, 2)`: `int(x * 3) / 2` in float32 — values in [0, 1] become 0, 0.5, 1 (1.5 at exactly 1).
pub fn safe_step(x: f32) -> f32 {
    ((x * 3.0) as i32) as f32 / 2.0
}

/// `v * 255` clipped to [0, 255] and truncated (numpy's `(x * 255.0).clip(0, 255).astype(np.uint8)`).
pub fn to_u8(v: f64) -> u8 {
    (v * 255.0).clamp(0.0, 255.0) as u8
}

/// controlnet_aux's scribble of a soft-edge map: `nms(map, 127, 3.0)`, Gaussian blur σ 3, then every pixel
/// above 4 white and the rest black.
pub fn scribble(map: &RgbImage) -> RgbImage {
    let grey = Mat { width: map.width() as usize, height: map.height() as usize, channels: 1, data: channel0(map) };
    let thin = nms(&grey, 127.0, 3.0);
    let blurred = gaussian_blur_u8(&thin, 3.0);
    blurred.map(|v| if v > 4 { 255u8 } else { 0 }).to_rgb()
}

/// The first channel (the maps are grey: all three are equal).
fn channel0(map: &RgbImage) -> Vec<u8> {
    map.as_raw().chunks_exact(3).map(|p| p[0]).collect()
}

/// `nms(x, t, s)`: blur by σ `s` (float), keep the pixels that are a maximum along one of four directions
/// (`cv2.dilate` with a 3-tap line kernel leaves them unchanged), white where the kept value exceeds `t`.
pub fn nms(x: &Mat<u8>, t: f32, s: f64) -> Mat<u8> {
    let (w, h) = (x.width, x.height);
    let blurred = gaussian_blur_f32(&x.map(|v| v as f32), s);
    // horizontal, vertical, diagonal and anti-diagonal neighbours of the centre
    let lines: [[(isize, isize); 2]; 4] =
        [[(0, -1), (0, 1)], [(-1, 0), (1, 0)], [(-1, -1), (1, 1)], [(-1, 1), (1, -1)]];
    let at = |y: usize, x: usize| blurred.data[y * w + x];
    let mut out = Mat::new(w, h, 1);
    for y in 0..h {
        for xx in 0..w {
            let v = at(y, xx);
            // dilate ignores the outside (its border value is -inf)
            let is_max = lines.iter().any(|line| {
                line.iter().all(|&(dy, dx)| {
                    let (ny, nx) = (y as isize + dy, xx as isize + dx);
                    if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                        return true;
                    }
                    at(ny as usize, nx as usize) <= v
                })
            });
            if is_max && v > t {
                out.data[y * w + xx] = 255;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_step_quantises_to_halves() {
        assert_eq!([0.2, 0.34, 0.5, 0.67, 0.99, 1.0].map(safe_step), [0.0, 0.5, 0.5, 1.0, 1.0, 1.5]);
    }

    #[test]
    fn nms_keeps_only_maxima_along_some_direction() {
        // a plane rising along every one of the four directions: no inside pixel is a maximum, only those whose
        // higher neighbour lies outside (dilate ignores the outside): the last row and column, and the first
        // column along the anti-diagonal; a ridge's crest is kept, its flanks fall below the threshold after
        // the blur
        let mut plane = Mat::new(9, 9, 1);
        for y in 0..9 {
            for x in 0..9 {
                plane.data[y * 9 + x] = (10 * x + 20 * y) as u8;
            }
        }
        let out = nms(&plane, 1.0, 0.5);
        let kept: Vec<usize> = (0..81).filter(|&i| out.data[i] == 255).collect();
        let edges: Vec<usize> = (0..81).filter(|i| i % 9 == 0 || i % 9 == 8 || i / 9 == 8).collect();
        assert_eq!(kept, edges);
        let mut ridge = Mat::new(9, 9, 1);
        for y in 0..9 {
            for (x, v) in [(3, 150u8), (4, 255), (5, 150)] {
                ridge.data[y * 9 + x] = v;
            }
        }
        let out = nms(&ridge, 200.0, 0.5);
        for y in 0..9 {
            assert_eq!(out.data[y * 9..(y + 1) * 9], [0, 0, 0, 0, 255, 0, 0, 0, 0], "row {y}");
        }
    }
}
