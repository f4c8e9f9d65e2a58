//! The array steps of controlnet_aux's OpenPose post-processing: `smart_resize` (OpenCV's area filter when
//! shrinking, Lanczos-4 when enlarging) on images and float maps, `padRightDownCorner`, scipy's
//! `gaussian_filter` and skimage's 8-connected `label`.
use crate::annotate::cv::{self, area_taps, interp_taps, separable_resize, Interpolation, Mat};

/// One float plane, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane<T> {
    pub width: usize,
    pub height: usize,
    pub data: Vec<T>,
}

impl<T: Copy> Plane<T> {
    pub fn at(&self, y: usize, x: usize) -> T {
        self.data[y * self.width + x]
    }
}

/// `smart_resize`'s choice: area when the sides shrink on the whole (`(Ht + Wt) / (Ho + Wo) < 1`), else Lanczos-4.
fn smart_interpolation(from: (usize, usize), to: (usize, usize)) -> Interpolation {
    let k = (to.0 + to.1) as f64 / (from.0 + from.1) as f64;
    if k < 1.0 {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    }
}

/// `smart_resize` of an 8-bit image to `width × height`.
pub fn smart_resize_u8(src: &Mat<u8>, width: usize, height: usize) -> Mat<u8> {
    let interp = smart_interpolation((src.width, src.height), (width, height));
    cv::resize_u8(src, width, height, interp)
}

/// `smart_resize_k(x, f, f)`'s size: `int(side * f)` of each side.
pub fn scaled_size(width: usize, height: usize, f: f64) -> (usize, usize) {
    ((width as f64 * f) as usize, (height as f64 * f) as usize)
}

/// `smart_resize` of one float plane (`cv2.resize` on float32: float taps and sums).
pub fn smart_resize_f32(src: &Plane<f32>, width: usize, height: usize) -> Plane<f32> {
    if (width, height) == (src.width, src.height) {
        return src.clone();
    }
    let interp = smart_interpolation((src.width, src.height), (width, height));
    let mat = Mat { width: src.width, height: src.height, channels: 1, data: src.data.clone() };
    let out = if interp == Interpolation::Area && width <= src.width && height <= src.height {
        area_down_f32(&mat, width, height)
    } else {
        let taps = |s, d| -> Vec<(Vec<usize>, Vec<f32>)> {
            interp_taps(s, d, interp).into_iter().map(|t| (t.index, t.weight)).collect()
        };
        separable_resize(&mat, &taps(src.width, width), &taps(src.height, height), |v| v, |acc| acc)
    };
    Plane { width, height, data: out.data }
}

/// `INTER_AREA` shrinking of a float plane: box means for integer factors (`resizeAreaFast`), fractional cell
/// coverage otherwise (`resizeArea_`), sums in float as OpenCV does.
fn area_down_f32(src: &Mat<f32>, width: usize, height: usize) -> Mat<f32> {
    let scale_x = 1.0 / (width as f64 / src.width as f64);
    let scale_y = 1.0 / (height as f64 / src.height as f64);
    let (isx, isy) = (scale_x.round_ties_even(), scale_y.round_ties_even());
    let mut out = Mat::new(width, height, 1);
    if (scale_x - isx).abs() < f64::EPSILON && (scale_y - isy).abs() < f64::EPSILON {
        let (fx, fy) = (isx as usize, isy as usize);
        let scale = 1.0f32 / (fx * fy) as f32;
        for y in 0..height {
            for x in 0..width {
                let mut sum = 0f32;
                for dy in 0..fy {
                    for dx in 0..fx {
                        sum += src.at(y * fy + dy, x * fx + dx, 0);
                    }
                }
                out.data[y * width + x] = sum * scale;
            }
        }
        return out;
    }
    let xt = area_taps(src.width, width, scale_x);
    let yt = area_taps(src.height, height, scale_y);
    let mut buf = vec![0f32; width];
    let mut sum = vec![0f32; width];
    let mut prev: Option<usize> = None;
    for t in &yt {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let row = &src.data[t.src * src.width..(t.src + 1) * src.width];
        for x in &xt {
            buf[x.dst] += row[x.src] * x.alpha;
        }
        if prev != Some(t.dst) {
            if let Some(p) = prev {
                out.data[p * width..(p + 1) * width].copy_from_slice(&sum);
            }
            sum.iter_mut().zip(&buf).for_each(|(s, &b)| *s = t.alpha * b);
            prev = Some(t.dst);
        } else {
            sum.iter_mut().zip(&buf).for_each(|(s, &b)| *s += t.alpha * b);
        }
    }
    if let Some(p) = prev {
        out.data[p * width..(p + 1) * width].copy_from_slice(&sum);
    }
    out
}

/// `padRightDownCorner(img, stride, pad_value)`: the image grown right and down to multiples of `stride`.
pub fn pad_right_down(img: &Mat<u8>, stride: usize, value: u8) -> Mat<u8> {
    let up = |v: usize| v.div_ceil(stride) * stride;
    let (w, h, c) = (up(img.width), up(img.height), img.channels);
    let mut out = Mat { width: w, height: h, channels: c, data: vec![value; w * h * c] };
    for y in 0..img.height {
        let src = &img.data[y * img.width * c..(y + 1) * img.width * c];
        out.data[y * w * c..y * w * c + img.width * c].copy_from_slice(src);
    }
    out
}

/// The net's output planes `(C, h, w)` brought back to the image: ×`stride` (`smart_resize_k`), the padding
/// cropped to `crop`, then to `size` (`smart_resize`).
pub fn net_planes_to_image(
    data: &[f32],
    (c, h, w): (usize, usize, usize),
    stride: usize,
    crop: (usize, usize),
    size: (usize, usize),
) -> Vec<Plane<f32>> {
    (0..c)
        .map(|i| {
            let plane = Plane { width: w, height: h, data: data[i * h * w..(i + 1) * h * w].to_vec() };
            let up = smart_resize_f32(&plane, w * stride, h * stride);
            let mut cropped = Vec::with_capacity(crop.0 * crop.1);
            for y in 0..crop.1 {
                cropped.extend_from_slice(&up.data[y * up.width..y * up.width + crop.0]);
            }
            smart_resize_f32(&Plane { width: crop.0, height: crop.1, data: cropped }, size.0, size.1)
        })
        .collect()
}

/// scipy's `gaussian_filter(x, sigma)` (truncate 4, mode `reflect`: `dcba|abcd|dcba`), rows then columns,
/// in float64 with scipy's symmetric-kernel sums.
pub fn gaussian_filter(src: &Plane<f64>, sigma: f64) -> Plane<f64> {
    let radius = (4.0 * sigma + 0.5) as isize;
    let mut kernel: Vec<f64> = (-radius..=radius).map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp()).collect();
    let total: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let reflect = |p: isize, n: isize| -> usize {
        let period = 2 * n;
        let m = p.rem_euclid(period);
        (if m < n { m } else { period - 1 - m }) as usize
    };
    let filter = |line: &[f64]| -> Vec<f64> {
        let n = line.len() as isize;
        (0..n)
            .map(|i| {
                let mut acc = line[i as usize] * kernel[radius as usize];
                for j in 1..=radius {
                    let (a, b) = (line[reflect(i - j, n)], line[reflect(i + j, n)]);
                    acc += (a + b) * kernel[(radius + j) as usize];
                }
                acc
            })
            .collect()
    };
    let (w, h) = (src.width, src.height);
    // axis 0 (down the columns) first, as scipy filters axes in order
    let mut cols = vec![0f64; w * h];
    for x in 0..w {
        let line: Vec<f64> = (0..h).map(|y| src.data[y * w + x]).collect();
        for (y, v) in filter(&line).into_iter().enumerate() {
            cols[y * w + x] = v;
        }
    }
    let data = cols.chunks(w).flat_map(filter).collect();
    Plane { width: w, height: h, data }
}

/// skimage's `label(mask, connectivity=2)`: 8-connected components numbered 1, 2, … in the raster order of
/// their first pixel, 0 for the background; and their count.
pub fn label(mask: &[bool], width: usize, height: usize) -> (Vec<usize>, usize) {
    let mut labels = vec![0usize; mask.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (y, x) = ((i / width) as isize, (i % width) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (ny, nx) = (y + dy, x + dx);
                    if ny < 0 || nx < 0 || ny >= height as isize || nx >= width as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = count;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_filter_keeps_the_sum_and_reflects_at_the_border() {
        // a unit impulse spreads into the normalised kernel; reflection keeps the total mass inside
        let mut p = Plane { width: 9, height: 7, data: vec![0.0; 63] };
        p.data[3 * 9 + 4] = 1.0;
        let out = gaussian_filter(&p, 1.0);
        let sum: f64 = out.data.iter().sum();
        assert!((sum - 1.0).abs() < 1e-12, "{sum}");
        assert!(out.at(3, 4) > out.at(3, 5) && out.at(3, 5) > out.at(3, 6));
        assert!((out.at(3, 3) - out.at(3, 5)).abs() < 1e-15, "symmetric");
    }

    #[test]
    fn label_joins_diagonal_neighbours_and_numbers_in_raster_order() {
        #[rustfmt::skip]
        let m = [
            false, false, true,  false,
            true,  false, false, true,
            false, true,  false, false,
        ];
        let (labels, count) = label(&m, 4, 3);
        assert_eq!(count, 2);
        assert_eq!(labels, vec![0, 0, 1, 0, 2, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn padding_grows_right_and_down_only() {
        let img = Mat { width: 3, height: 2, channels: 1, data: vec![1, 2, 3, 4, 5, 6] };
        let p = pad_right_down(&img, 4, 128);
        assert_eq!((p.width, p.height), (4, 4));
        assert_eq!(p.data, vec![1, 2, 3, 128, 4, 5, 6, 128, 128, 128, 128, 128, 128, 128, 128, 128]);
    }
}
