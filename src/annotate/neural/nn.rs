//! The layers the detector nets are built from, on the model layer's CPU kernels: plain convolutions run
//! `model::ops::conv2d` (im2col, bias fused), instance norms `model::ops::norm::group_norm` with one group per
//! channel; grouped and dilated convolutions (PiDiNet's) fall back to candle's. Widths and kernel sizes are
//! read from the weights, so a file names its own architecture within the family.
use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;

use super::weights::StateDict;
use crate::model::ops::conv2d::{conv2d, Conv2dParams};
use crate::model::ops::norm::group_norm;
use crate::Result;

/// `nn.Conv2d` (or a functional `F.conv2d`) with its weights.
#[derive(Debug, Clone)]
pub struct Conv {
    pub weight: Tensor,
    /// Zeros when the layer has none (the fused kernel always adds one).
    pub bias: Tensor,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Conv {
    /// `{name}.weight` (and `{name}.bias` if the file has it), stride 1, dilation 1, one group.
    pub fn load(sd: &StateDict, name: &str, stride: usize, padding: usize) -> Result<Self> {
        let weight = sd.get_rank(&format!("{name}.weight"), 4)?;
        Self::new(sd, name, weight, stride, padding)
    }

    /// A convolution with `weight` (e.g. converted from a pixel-difference kernel) and the bias of `name`.
    pub fn new(sd: &StateDict, name: &str, weight: Tensor, stride: usize, padding: usize) -> Result<Self> {
        let out = weight.dim(0)?;
        let bias_name = format!("{name}.bias");
        let bias = if sd.has(&bias_name) {
            let b = sd.get_rank(&bias_name, 1)?;
            if b.dim(0)? != out {
                return Err(sd.error(format!("{bias_name}: {} values for {out} output channels", b.dim(0)?)));
            }
            b
        } else {
            Tensor::zeros(out, DType::F32, &Device::Cpu)?
        };
        Ok(Self { weight, bias, stride, padding, dilation: 1, groups: 1 })
    }

    /// `{conv}` followed by the eval-mode `nn.BatchNorm2d` `{bn}` (eps 1e-5), folded into one convolution:
    /// `w * g / sqrt(var + eps)`, `(b - mean) * g / sqrt(var + eps) + beta`.
    pub fn load_bn(sd: &StateDict, conv: &str, bn: &str, stride: usize, padding: usize) -> Result<Self> {
        Self::load_bn_eps(sd, conv, bn, stride, padding, 1e-5)
    }

    /// [`Conv::load_bn`] with the batch norm's own `eps` (TensorFlow-ported nets use 1e-3).
    pub fn load_bn_eps(sd: &StateDict, conv: &str, bn: &str, stride: usize, padding: usize, eps: f64) -> Result<Self> {
        let c = Self::load(sd, conv, stride, padding)?;
        let get = |field: &str| sd.get_rank(&format!("{bn}.{field}"), 1);
        let (gamma, beta, mean, var) = (get("weight")?, get("bias")?, get("running_mean")?, get("running_var")?);
        if gamma.dim(0)? != c.out_channels() {
            return Err(sd.error(format!("{bn}: {} channels after {conv}'s {}", gamma.dim(0)?, c.out_channels())));
        }
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        let weight = c.weight.broadcast_mul(&scale.reshape((c.out_channels(), 1, 1, 1))?)?;
        let bias = ((&c.bias - mean)? * &scale)?.add(&beta)?;
        Ok(Self { weight, bias, ..c })
    }

    pub fn with_dilation(self, dilation: usize) -> Self {
        Self { dilation, ..self }
    }

    pub fn with_groups(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.groups > 1 && self.groups == self.out_channels() && self.weight.dim(1)? == 1 {
            return self.depthwise(x);
        }
        if self.groups == 1 && self.dilation == 1 {
            return Ok(conv2d(
                x,
                &self.weight,
                &self.bias,
                Conv2dParams { padding: self.padding, stride: self.stride },
            )?);
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, self.dilation, self.groups)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.out_channels(), 1, 1))?)?)
    }
}

impl Conv {
    /// A depthwise convolution (one input channel per output channel: PiDiNet's and MobileNet's), one channel
    /// per task; candle would run one convolution per group.
    fn depthwise(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let (n, c, h, w) = x.dims4()?;
        let (kh, kw) = (self.weight.dim(2)?, self.weight.dim(3)?);
        let (s, p, d) = (self.stride, self.padding as isize, self.dilation);
        let span = |len: usize, k: usize| (len + 2 * self.padding).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1);
        let (Some(oh), Some(ow)) = (span(h, kh), span(w, kw)) else {
            return Err(
                candle_core::Error::Msg(format!("depthwise conv: {h}x{w} input smaller than the kernel")).into()
            );
        };
        let input = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let weight = self.weight.flatten_all()?.to_vec1::<f32>()?;
        let bias = self.bias.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(nc, plane)| {
            let ch = nc % c;
            let src = &input[nc * h * w..(nc + 1) * h * w];
            let k = &weight[ch * kh * kw..(ch + 1) * kh * kw];
            for (oy, row) in plane.chunks_mut(ow).enumerate() {
                row.fill(bias[ch]);
                for ky in 0..kh {
                    let y = (oy * s) as isize + (ky * d) as isize - p;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    let line = &src[y as usize * w..(y as usize + 1) * w];
                    for kx in 0..kw {
                        let kv = k[ky * kw + kx];
                        for (ox, o) in row.iter_mut().enumerate() {
                            let xx = (ox * s) as isize + (kx * d) as isize - p;
                            if xx >= 0 && xx < w as isize {
                                *o += kv * line[xx as usize];
                            }
                        }
                    }
                }
            }
        });
        Ok(Tensor::from_vec(out, (n, c, oh, ow), x.device())?)
    }
}

/// `nn.ConvTranspose2d(in, out, k, stride, padding, output_padding)` as `stride²` ordinary convolutions, one per
/// output phase (sub-pixel decomposition): output row `s·q + r` only sees the kernel rows `k ≡ r + padding (mod
/// s)`, at input rows `q + (r + padding - k) / s`. They run on the same kernel as [`Conv`] and do a quarter of the
/// work of convolving an input with zeros inserted between its pixels (stride 2).
#[derive(Debug, Clone)]
pub struct ConvTranspose {
    /// Per phase `(ry, rx)`, row-major; `None` when no kernel tap reaches that phase (bias only).
    phases: Vec<Option<Phase>>,
    bias: Tensor,
    stride: usize,
    /// The output size is `(in - 1) * stride + extra` along each side.
    extra: usize,
}

/// One output phase of a [`ConvTranspose`]: its convolution, the zero rows/columns (top, left) added before the
/// input, and the input rows/columns (top, left) it skips.
#[derive(Debug, Clone)]
struct Phase {
    conv: Conv,
    pad: (usize, usize),
    skip: (usize, usize),
}

/// The kernel taps of one output phase, ordered by the input offset they read (ascending), and the first offset.
fn phase_taps(k: usize, stride: usize, padding: usize, phase: usize) -> (Vec<u32>, isize) {
    let mut taps: Vec<(isize, u32)> = (0..k)
        .filter(|&t| ((phase + padding) as isize - t as isize).rem_euclid(stride as isize) == 0)
        .map(|t| (((phase + padding) as isize - t as isize) / stride as isize, t as u32))
        .collect();
    taps.sort();
    let first = taps.first().map(|t| t.0).unwrap_or(0);
    (taps.into_iter().map(|t| t.1).collect(), first)
}

impl ConvTranspose {
    pub fn load(sd: &StateDict, name: &str, stride: usize, padding: usize, output_padding: usize) -> Result<Self> {
        let w = sd.get_rank(&format!("{name}.weight"), 4)?;
        let k = w.dim(2)?;
        if k + output_padding < 2 * padding + 1 || w.dim(3)? != k || stride == 0 {
            return Err(sd.error(format!("{name}.weight: kernel {:?} does not fit padding {padding}", w.dims())));
        }
        let bias = Conv::new(sd, name, w.transpose(0, 1)?.contiguous()?, 1, 0)?.bias;
        let mut phases = Vec::with_capacity(stride * stride);
        for ry in 0..stride {
            for rx in 0..stride {
                let (ty, dy) = phase_taps(k, stride, padding, ry);
                let (tx, dx) = phase_taps(k, stride, padding, rx);
                if ty.is_empty() || tx.is_empty() {
                    phases.push(None);
                    continue;
                }
                let sub = w
                    .index_select(&Tensor::new(ty, &Device::Cpu)?, 2)?
                    .index_select(&Tensor::new(tx, &Device::Cpu)?, 3)?
                    .transpose(0, 1)?
                    .contiguous()?;
                let conv = Conv { bias: bias.clone(), ..Conv::new(sd, name, sub, 1, 0)? };
                // a negative first offset reads zeros before the input: pad; a positive one skips input rows
                let pad = ((-dy).max(0) as usize, (-dx).max(0) as usize);
                let skip = (dy.max(0) as usize, dx.max(0) as usize);
                phases.push(Some(Phase { conv, pad, skip }));
            }
        }
        Ok(Self { phases, bias, stride, extra: k + output_padding - 2 * padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let s = self.stride;
        let (out_h, out_w) = ((h - 1) * s + self.extra, (w - 1) * s + self.extra);
        // every phase is computed on the same (qh, qw) grid; rows past the output are cut at the end
        let (qh, qw) = (out_h.div_ceil(s), out_w.div_ceil(s));
        let out_c = self.bias.dim(0)?;
        let mut rows = Vec::with_capacity(s);
        for ry in 0..s {
            let mut cols = Vec::with_capacity(s);
            for rx in 0..s {
                let y = match &self.phases[ry * s + rx] {
                    None => self.bias.reshape((1, out_c, 1, 1))?.broadcast_as((n, out_c, qh, qw))?.contiguous()?,
                    Some(Phase { conv, pad: (pt, pl), skip: (st, sl) }) => {
                        let (ky, kx) = (conv.weight.dim(2)?, conv.weight.dim(3)?);
                        let z =
                            x.narrow(2, (*st).min(h), h - (*st).min(h))?.narrow(3, (*sl).min(w), w - (*sl).min(w))?;
                        let (zh, zw) = (z.dim(2)?, z.dim(3)?);
                        // enough zeros after the input for qh x qw outputs
                        let pb = (qh + ky - 1).saturating_sub(zh + pt);
                        let pr = (qw + kx - 1).saturating_sub(zw + pl);
                        let z = z.pad_with_zeros(2, *pt, pb)?.pad_with_zeros(3, *pl, pr)?;
                        conv.forward(&z)?.narrow(2, 0, qh)?.narrow(3, 0, qw)?
                    }
                };
                cols.push(y.unsqueeze(4)?);
            }
            rows.push(Tensor::cat(&cols, 4)?.reshape((n, out_c, qh, qw * s))?.unsqueeze(3)?);
        }
        let out = Tensor::cat(&rows, 3)?.reshape((n, out_c, qh * s, qw * s))?;
        Ok(out.narrow(2, 0, out_h)?.narrow(3, 0, out_w)?)
    }
}

/// `nn.Linear`: `x · Wᵀ + b` over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn load(sd: &StateDict, name: &str) -> Result<Self> {
        let weight = sd.get_rank(&format!("{name}.weight"), 2)?;
        let bias = sd.get_rank(&format!("{name}.bias"), 1)?;
        if bias.dim(0)? != weight.dim(0)? {
            return Err(sd.error(format!("{name}: bias of {} for {:?} weights", bias.dim(0)?, weight.dims())));
        }
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
}

/// Multi-head self-attention with a fused `qkv` projection (timm's and DINOv2's `Attention`): softmax(q·kᵀ /
/// √d)·v per head, heads joined, then `proj`. `x`: (n, tokens, width).
pub fn self_attention(qkv: &Linear, proj: &Linear, heads: usize, x: &Tensor) -> Result<Tensor> {
    let (n, tokens, width) = x.dims3()?;
    let head = width / heads;
    let qkv = qkv.forward(x)?.reshape((n, tokens, 3, heads, head))?.permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)? * (head as f64).powf(-0.5))?.contiguous()?;
    let (k, v) = (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
    let weights = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
    let y = weights.matmul(&v)?.transpose(1, 2)?.reshape((n, tokens, width))?;
    proj.forward(&y)
}

/// `nn.LayerNorm` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(sd: &StateDict, name: &str, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: sd.get_rank(&format!("{name}.weight"), 1)?,
            bias: sd.get_rank(&format!("{name}.bias"), 1)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }
}

/// torch's bicubic interpolation of one plane (`F.interpolate(mode="bicubic", align_corners=False)`, A = -0.75,
/// edge samples clamped, no antialiasing). `scale_x`/`scale_y` map output to input coordinates: `in / out` when a
/// size is given, `1 / scale_factor` when a scale factor is (DINOv2's position embeddings).
pub fn resize_bicubic(plane: &[f32], w: usize, h: usize, out: (usize, usize), scale: (f64, f64)) -> Vec<f32> {
    let (out_w, out_h) = out;
    let taps = |src: usize, dst: usize, scale: f64| -> Vec<([usize; 4], [f32; 4])> {
        let scale = scale as f32;
        (0..dst)
            .map(|d| {
                let real = scale * (d as f32 + 0.5) - 0.5;
                let i = real.floor();
                let t = real - i;
                let idx = [-1isize, 0, 1, 2].map(|o| (i as isize + o).clamp(0, src as isize - 1) as usize);
                (idx, torch_cubic(t))
            })
            .collect()
    };
    let (xt, yt) = (taps(w, out_w, scale.0), taps(h, out_h, scale.1));
    let mut result = Vec::with_capacity(out_w * out_h);
    for (yi, yw) in &yt {
        for (xi, xw) in &xt {
            let mut acc = 0f32;
            for k in 0..4 {
                let row = &plane[yi[k] * w..(yi[k] + 1) * w];
                let line: f32 = (0..4).map(|j| xw[j] * row[xi[j]]).sum();
                acc += yw[k] * line;
            }
            result.push(acc);
        }
    }
    result
}

/// `get_cubic_upsample_coefficients` (A = -0.75) at fractional offset `t`.
fn torch_cubic(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// `(1, C, H, W)` → `(1, C, out_h, out_w)` with [`resize_bilinear_corners`] per channel
/// (`F.interpolate(mode="bilinear", align_corners=True)`).
pub fn interpolate_bilinear_corners(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let out: Vec<f32> = data.chunks(h * w).flat_map(|p| resize_bilinear_corners(p, w, h, out_w, out_h)).collect();
    Ok(Tensor::from_vec(out, (n, c, out_h, out_w), x.device())?)
}

/// `nn.InstanceNorm2d` without affine parameters (eps 1e-5): group norm with one group per channel.
pub fn instance_norm(x: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let ones = Tensor::ones(c, DType::F32, x.device())?;
    let zeros = Tensor::zeros(c, DType::F32, x.device())?;
    Ok(group_norm(x, &ones, &zeros, c, 1e-5, false)?)
}

/// `nn.ReflectionPad2d(p)`: mirror `p` pixels on every side (the edge pixel itself not repeated).
pub fn reflection_pad(x: &Tensor, p: usize) -> Result<Tensor> {
    let index = |len: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..len + 2 * p)
            .map(|i| {
                let j = i as isize - p as isize;
                let j = if j < 0 {
                    -j
                } else if j >= len as isize {
                    2 * (len as isize - 1) - j
                } else {
                    j
                };
                j.clamp(0, len as isize - 1) as u32
            })
            .collect();
        Ok(Tensor::new(idx, &Device::Cpu)?)
    };
    let (_, _, h, w) = x.dims4()?;
    Ok(x.index_select(&index(w)?, 3)?.index_select(&index(h)?, 2)?)
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}

pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    Ok(x.maximum(&(x * slope)?)?)
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}

/// `F.max_pool2d(x, 2, 2)` (an odd last row/column is dropped, as torch does).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d(2)?)
}

/// One plane resized bilinearly: torch's `F.interpolate(mode="bilinear", align_corners=False)` and
/// `cv2.resize(float, INTER_LINEAR)` (the same sampling: centres aligned, edge samples clamped).
pub fn resize_bilinear(plane: &[f32], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    let (xt, yt) = (bilinear_taps(w, out_w), bilinear_taps(h, out_h));
    let mut out = Vec::with_capacity(out_w * out_h);
    for &(y0, y1, fy) in &yt {
        for &(x0, x1, fx) in &xt {
            let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
            let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// The two source indices and the weight of the second for each of `dst` outputs resampling `src` samples
/// bilinearly, corners not aligned ([`resize_bilinear`]'s sampling).
pub fn bilinear_taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = (((d as f64 + 0.5) * scale - 0.5) as f32).max(0.0);
            let i0 = (f.floor() as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, if i0 == src - 1 { 0.0 } else { f - i0 as f32 })
        })
        .collect()
}

/// `F.interpolate(mode="bilinear", align_corners=True)` of one plane: the corner samples line up.
pub fn resize_bilinear_corners(plane: &[f32], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    let taps = |src: usize, dst: usize| -> Vec<(usize, usize, f32)> {
        let scale = if dst > 1 { (src - 1) as f32 / (dst - 1) as f32 } else { 0.0 };
        (0..dst)
            .map(|d| {
                let f = scale * d as f32;
                let i0 = (f.floor() as usize).min(src - 1);
                let i1 = (i0 + 1).min(src - 1);
                (i0, i1, f - i0 as f32)
            })
            .collect()
    };
    let (xt, yt) = (taps(w, out_w), taps(h, out_h));
    let mut out = Vec::with_capacity(out_w * out_h);
    for &(y0, y1, fy) in &yt {
        for &(x0, x1, fx) in &xt {
            let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
            let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// `(1, C, H, W)` → `(1, C, 2H, 2W)` with [`resize_bilinear_corners`] per channel.
pub fn upsample2_corners(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let out: Vec<f32> = data.chunks(h * w).flat_map(|p| resize_bilinear_corners(p, w, h, 2 * w, 2 * h)).collect();
    Ok(Tensor::from_vec(out, (n, c, 2 * h, 2 * w), x.device())?)
}

/// `(1, C, H, W)` → `(1, C, out_h, out_w)` with [`resize_bilinear`] per channel.
pub fn interpolate_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let out: Vec<f32> = data.chunks(h * w).flat_map(|p| resize_bilinear(p, w, h, out_w, out_h)).collect();
    Ok(Tensor::from_vec(out, (n, c, out_h, out_w), x.device())?)
}

/// An RGB image as a `(1, 3, H, W)` f32 tensor, `(v - offset) * scale` per sample, channels as given (`bgr`
/// reverses them, as detectors trained on OpenCV's order want).
pub fn image_tensor(image: &RgbImage, scale: f32, offset: f32, bgr: bool) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            let src = if bgr { 2 - c } else { c };
            data[c * w * h + i] = (p[src] as f32 - offset) * scale;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
}

/// The first channel of a `(1, C, H, W)` tensor as a row-major plane.
pub fn first_plane(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.get(0)?.get(0)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Mean over dimension 0 of a stack of equally sized planes.
pub fn mean_planes(planes: &[Vec<f32>]) -> Vec<f32> {
    let n = planes.len() as f32;
    (0..planes[0].len()).map(|i| planes.iter().map(|p| p[i]).sum::<f32>() / n).collect()
}

/// `nn.AdaptiveAvgPool2d(size)` of a `(N, C, H, W)` tensor: output cell `i` averages input rows
/// `floor(i·H/size) .. ceil((i+1)·H/size)` (overlapping bins when `size` does not divide the side), the same
/// along the columns.
pub fn adaptive_avg_pool(x: &Tensor, size: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let bins = |len: usize| -> Vec<(usize, usize)> {
        (0..size).map(|i| (i * len / size, ((i + 1) * len).div_ceil(size))).collect()
    };
    let (rows, cols) = (bins(h), bins(w));
    let data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(n * c * size * size);
    for plane in data.chunks_exact(h * w) {
        for &(y0, y1) in &rows {
            for &(x0, x1) in &cols {
                let sum: f32 = (y0..y1).map(|y| plane[y * w + x0..y * w + x1].iter().sum::<f32>()).sum();
                out.push(sum / ((y1 - y0) * (x1 - x0)) as f32);
            }
        }
    }
    Ok(Tensor::from_vec(out, (n, c, size, size), x.device())?)
}

/// Sum of a tensor's last two dimensions, kept (`weights.sum(dim=[2, 3], keepdim=True)`).
pub fn sum_spatial(w: &Tensor) -> Result<Tensor> {
    Ok(w.sum_keepdim(D::Minus1)?.sum_keepdim(D::Minus2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_doubling_matches_torch() {
        // torch: F.interpolate([[0, 1]], size=4, mode="bilinear", align_corners=False) along x
        let out = resize_bilinear(&[0.0, 1.0], 2, 1, 4, 1);
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn bicubic_matches_torch() {
        // torch: F.interpolate(tensor([[[[0., 1., 4., 9.]]]]), size=(1, 6), mode="bicubic", align_corners=False)
        let out = resize_bicubic(&[0.0, 1.0, 4.0, 9.0], 4, 1, (6, 1), (4.0 / 6.0, 1.0));
        let torch = [-0.086_805_58_f32, 0.21875, 1.430_555, 3.152_777_7, 6.78125, 9.434_029];
        for (o, t) in out.iter().zip(torch) {
            assert!((o - t).abs() < 1e-5, "{out:?}");
        }
        // the identity size leaves the plane unchanged
        assert_eq!(resize_bicubic(&[0.0, 1.0, 4.0, 9.0], 2, 2, (2, 2), (1.0, 1.0)), vec![0.0, 1.0, 4.0, 9.0]);
    }

    #[test]
    fn conv_transpose_matches_candles() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 3, 5, 7), &dev).unwrap();
        for (k, stride, padding, output_padding) in
            [(3, 2, 1, 1), (4, 2, 1, 0), (3, 1, 1, 0), (5, 3, 2, 1), (2, 3, 0, 0)]
        {
            let w = Tensor::randn(0f32, 1., (3, 4, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let sd = StateDict::from_tensors("t.pth", [("up.weight", w.clone()), ("up.bias", b.clone())]);
            let ours = ConvTranspose::load(&sd, "up", stride, padding, output_padding).unwrap().forward(&x).unwrap();
            let theirs = x.conv_transpose2d(&w, padding, output_padding, stride, 1).unwrap();
            let theirs = theirs.broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "k {k} stride {stride}: {d}");
        }
    }

    #[test]
    fn depthwise_matches_candles_grouped_convolution() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 4, 9, 7), &dev).unwrap();
        for (k, stride, padding, dilation) in [(3, 1, 1, 1), (5, 1, 2, 1), (3, 2, 0, 1), (3, 1, 2, 2)] {
            let w = Tensor::randn(0f32, 1., (4, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let conv = Conv { weight: w.clone(), bias: b.clone(), stride, padding, dilation, groups: 4 };
            let ours = conv.forward(&x).unwrap();
            let theirs = x.conv2d(&w, padding, stride, dilation, 4).unwrap();
            let theirs = theirs.broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "k {k} stride {stride} dilation {dilation}: {d}");
        }
    }

    #[test]
    fn adaptive_pool_uses_overlapping_bins_like_torch() {
        // torch: F.adaptive_avg_pool2d(arange(16.).reshape(1, 1, 4, 4), 3): bins 0..2, 1..3, 2..4 on each side
        let x = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
        let y = adaptive_avg_pool(&x, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, vec![2.5, 3.5, 4.5, 6.5, 7.5, 8.5, 10.5, 11.5, 12.5]);
        let one = adaptive_avg_pool(&x, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(one, vec![7.5]);
    }

    #[test]
    fn reflection_pad_mirrors_without_repeating_the_edge() {
        let x = Tensor::new(&[[[[1f32, 2., 3.]]]], &Device::Cpu).unwrap();
        let x = x.broadcast_as((1, 1, 3, 3)).unwrap().contiguous().unwrap();
        let y = reflection_pad(&x, 2).unwrap();
        let row: Vec<f32> = y.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(row, vec![3., 2., 1., 2., 3., 2., 1.]);
    }
}
