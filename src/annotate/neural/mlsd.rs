//! M-LSD straight lines (Gu et al. 2021, "Towards Light-weight and Real-time Line Segment Detection";
//! controlnet_aux `mlsd/`, weights `mlsd_large_512_fp32.pth`), the net behind control_v11p_sd15_mlsd.
//!
//! A MobileNetV2 backbone (its first 14 feature blocks) and a U-shaped head give, at half the input
//! resolution, a line-centre logit and the displacements to both segment ends. Centres are the 3×3 local maxima
//! of the sigmoid (the best 200); a centre above the score threshold whose segment is longer than the distance
//! threshold is drawn as a one-pixel OpenCV line. Batch norms are folded into their convolutions at load. The
//! input is RGB plus a channel of ones, in -1…1.
use candle_core::Tensor;
use image::RgbImage;

use super::nn::{self, Conv};
use super::weights::StateDict;
use crate::annotate::draw::{self, Point};
use crate::annotate::{Detector, Preprocess};
use crate::Result;

/// controlnet_aux's defaults: `thr_v` (centre score) and `thr_d` (segment length, in net pixels).
pub const DEFAULT_SCORE_THRESHOLD: f64 = 0.1;
pub const DEFAULT_DISTANCE_THRESHOLD: f64 = 0.1;
/// Centres considered (`deccode_output_score_and_ptss(…, topk_n=200, ksize=3)`).
const TOP_K: usize = 200;
/// The backbone blocks whose outputs feed the head (`fpn_selected`), and those that downsample.
const FPN: [usize; 5] = [1, 3, 6, 10, 13];
const STRIDE_2: [usize; 3] = [2, 4, 7];

fn relu6(x: &Tensor) -> Result<Tensor> {
    Ok(x.clamp(0f32, 6f32)?)
}

/// Zero padding on the right and bottom only (`F.pad(x, (0, 1, 0, 1))` before MobileNet's stride-2 convs).
fn pad_bottom_right(x: &Tensor) -> Result<Tensor> {
    Ok(x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
}

/// `ConvBNReLU`: conv + batch norm + ReLU6; stride 2 pads right/bottom instead of around.
struct ConvBnRelu6 {
    conv: Conv,
    stride2: bool,
}

impl ConvBnRelu6 {
    fn load(sd: &StateDict, name: &str, stride2: bool, depthwise: bool) -> Result<Self> {
        let w = sd.get_rank(&format!("{name}.0.weight"), 4)?;
        let padding = if stride2 { 0 } else { (w.dim(2)? - 1) / 2 };
        let mut conv =
            Conv::load_bn(sd, &format!("{name}.0"), &format!("{name}.1"), if stride2 { 2 } else { 1 }, padding)?;
        if depthwise {
            let groups = conv.out_channels();
            conv = conv.with_groups(groups);
        }
        Ok(Self { conv, stride2 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.stride2 { pad_bottom_right(x)? } else { x.clone() };
        relu6(&self.conv.forward(&x)?)
    }
}

/// `InvertedResidual`: (1×1 expansion), depthwise 3×3, 1×1 projection with batch norm; a skip when the shape
/// is kept.
struct InvertedResidual {
    expand: Option<ConvBnRelu6>,
    depthwise: ConvBnRelu6,
    project: Conv,
    residual: bool,
}

impl InvertedResidual {
    fn load(sd: &StateDict, name: &str, stride2: bool) -> Result<Self> {
        let expanded = sd.has(&format!("{name}.conv.3.weight"));
        let (expand, dw, proj, bn) = if expanded { (Some(0), 1, 2, 3) } else { (None, 0, 1, 2) };
        let expand = match expand {
            Some(i) => Some(ConvBnRelu6::load(sd, &format!("{name}.conv.{i}"), false, false)?),
            None => None,
        };
        let depthwise = ConvBnRelu6::load(sd, &format!("{name}.conv.{dw}"), stride2, true)?;
        let project = Conv::load_bn(sd, &format!("{name}.conv.{proj}"), &format!("{name}.conv.{bn}"), 1, 0)?;
        let inp = match &expand {
            Some(e) => e.conv.in_channels(),
            None => depthwise.conv.out_channels(),
        };
        let residual = !stride2 && inp == project.out_channels();
        Ok(Self { expand, depthwise, project, residual })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward(&y)?;
        }
        let y = self.project.forward(&self.depthwise.forward(&y)?)?;
        Ok(if self.residual { (x + y)? } else { y })
    }
}

/// `BlockTypeA`: 1×1 conv+BN+ReLU of both inputs, the deeper one upsampled ×2 (align_corners), concatenated.
struct BlockA {
    conv1: Conv,
    conv2: Conv,
    upscale: bool,
}

impl BlockA {
    fn load(sd: &StateDict, name: &str, upscale: bool) -> Result<Self> {
        let c = |i: usize| Conv::load_bn(sd, &format!("{name}.conv{i}.0"), &format!("{name}.conv{i}.1"), 1, 0);
        Ok(Self { conv1: c(1)?, conv2: c(2)?, upscale })
    }

    fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut b = nn::relu(&self.conv1.forward(b)?)?;
        let a = nn::relu(&self.conv2.forward(a)?)?;
        if self.upscale {
            b = nn::upsample2_corners(&b)?;
        }
        Ok(Tensor::cat(&[&a, &b], 1)?)
    }
}

/// `BlockTypeB`: a residual 3×3 conv+BN+ReLU, then another.
struct BlockB {
    conv1: Conv,
    conv2: Conv,
}

impl BlockB {
    fn load(sd: &StateDict, name: &str) -> Result<Self> {
        let c = |i: usize| Conv::load_bn(sd, &format!("{name}.conv{i}.0"), &format!("{name}.conv{i}.1"), 1, 1);
        Ok(Self { conv1: c(1)?, conv2: c(2)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (nn::relu(&self.conv1.forward(x)?)? + x)?;
        nn::relu(&self.conv2.forward(&x)?)
    }
}

/// The M-LSD large net.
pub struct MlsdNet {
    stem: ConvBnRelu6,
    blocks: Vec<InvertedResidual>,
    a: [BlockA; 4],
    b: [BlockB; 4],
    /// `BlockTypeC`: dilated 3×3 (5), 3×3, then the 1×1 output convolution.
    c: [Conv; 3],
}

impl MlsdNet {
    pub fn load(sd: &StateDict) -> Result<Self> {
        if !sd.has("backbone.features.0.0.weight") {
            return Err(sd.error("no tensor backbone.features.0.0.weight: not M-LSD weights?"));
        }
        let stem = ConvBnRelu6::load(sd, "backbone.features.0", true, false)?;
        let blocks = (1..=FPN[4])
            .map(|i| InvertedResidual::load(sd, &format!("backbone.features.{i}"), STRIDE_2.contains(&i)))
            .collect::<Result<Vec<_>>>()?;
        let a = [
            BlockA::load(sd, "block15", false)?,
            BlockA::load(sd, "block17", true)?,
            BlockA::load(sd, "block19", true)?,
            BlockA::load(sd, "block21", true)?,
        ];
        let b = [
            BlockB::load(sd, "block16")?,
            BlockB::load(sd, "block18")?,
            BlockB::load(sd, "block20")?,
            BlockB::load(sd, "block22")?,
        ];
        let c = [
            Conv::load_bn(sd, "block23.conv1.0", "block23.conv1.1", 1, 5)?.with_dilation(5),
            Conv::load_bn(sd, "block23.conv2.0", "block23.conv2.1", 1, 1)?,
            Conv::load(sd, "block23.conv3", 1, 0)?,
        ];
        if c[2].out_channels() < 12 {
            return Err(sd.error(format!("block23.conv3: {} output channels, M-LSD has 16", c[2].out_channels())));
        }
        Ok(Self { stem, blocks, a, b, c })
    }

    /// The 9 output maps (1, 9, H/2, W/2) of `x` (1, 4, H, W): line-centre logit, then start and end
    /// displacements (x, y, x, y), in net pixels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1. backbone, keeping the selected features
        let mut y = self.stem.forward(x)?;
        let mut features = Vec::with_capacity(5);
        for (i, block) in self.blocks.iter().enumerate() {
            y = block.forward(&y)?;
            if FPN.contains(&(i + 1)) {
                features.push(y.clone());
            }
        }
        // 2. head: deepest first, each step joining a shallower feature
        let mut h = features[4].clone();
        for (k, (a, b)) in self.a.iter().zip(&self.b).enumerate() {
            h = b.forward(&a.forward(&features[3 - k], &h)?)?;
        }
        let h = nn::relu(&self.c[0].forward(&h)?)?;
        let h = nn::relu(&self.c[1].forward(&h)?)?;
        let out = self.c[2].forward(&h)?;
        let channels = out.dim(1)?;
        Ok(out.narrow(1, 7, channels - 7)?)
    }
}

/// `MLSDdetector.__call__` with `thr_v` and `thr_d`.
pub struct Mlsd {
    pub net: MlsdNet,
    pub score_threshold: f64,
    pub distance_threshold: f64,
}

impl Mlsd {
    /// The segments `[x0, y0, x1, y1]` (input pixels) of `pred_lines`.
    pub fn lines(&self, out: &Tensor) -> Result<Vec<[f64; 4]>> {
        let (_, _, h, w) = out.dims4()?;
        let maps = out.get(0)?.flatten_all()?.to_vec1::<f32>()?;
        let plane = |c: usize| &maps[c * h * w..(c + 1) * h * w];
        let heat: Vec<f32> = plane(0).iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
        // 1. centres: 3x3 local maxima (max pool, stride 1, the outside ignored)
        let mut peaks: Vec<(f32, usize)> = (0..h * w)
            .map(|i| {
                let (y, x) = (i / w, i % w);
                let v = heat[i];
                let is_max = (y.saturating_sub(1)..(y + 2).min(h))
                    .all(|yy| (x.saturating_sub(1)..(x + 2).min(w)).all(|xx| heat[yy * w + xx] <= v));
                (if is_max { v } else { 0.0 }, i)
            })
            .collect();
        if peaks.len() < TOP_K {
            // torch.topk fails on fewer values; controlnet_aux catches it and draws nothing
            return Ok(Vec::new());
        }
        peaks.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // 2. segments of the best centres
        let mut lines = Vec::new();
        for &(score, i) in &peaks[..TOP_K] {
            let d: [f32; 4] = [plane(1)[i], plane(2)[i], plane(3)[i], plane(4)[i]];
            let distance = ((d[0] - d[2]).powi(2) + (d[1] - d[3]).powi(2)).sqrt();
            if (score as f64) > self.score_threshold && (distance as f64) > self.distance_threshold {
                let (x, y) = ((i % w) as f64, (i / w) as f64);
                // the net runs at half resolution
                lines.push([
                    2.0 * (x + d[0] as f64),
                    2.0 * (y + d[1] as f64),
                    2.0 * (x + d[2] as f64),
                    2.0 * (y + d[3] as f64),
                ]);
            }
        }
        Ok(lines)
    }
}

impl Detector for Mlsd {
    fn name(&self) -> &str {
        "mlsd"
    }

    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let rgb = nn::image_tensor(image, 1.0 / 127.5, 127.5, false)?;
        let ones = Tensor::full(1f32 / 127.5 - 1.0, (1, 1, h, w), rgb.device())?;
        let out = self.net.forward(&Tensor::cat(&[&rgb, &ones], 1)?)?;
        let mut map = RgbImage::new(w as u32, h as u32);
        for [x0, y0, x1, y1] in self.lines(&out)? {
            // int(): toward zero
            let p = |x: f64, y: f64| Point::new(x as i64, y as i64);
            draw::line(&mut map, p(x0, y0), p(x1, y1), [255, 255, 255], 1);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::test_support::{
        assert_net_close, assert_upstream_map, cases, load_net_input, net_outputs, weights,
    };

    fn net() -> MlsdNet {
        MlsdNet::load(&StateDict::open(&weights("mlsd_large_512_fp32.pth")).unwrap()).unwrap()
    }

    #[test]
    fn net_matches_controlnet_aux() {
        let net = net();
        for c in cases("mlsd").iter().filter(|c| c.net.is_some()) {
            let img = load_net_input(c);
            let rgb = nn::image_tensor(&img, 1.0 / 127.5, 127.5, false).unwrap();
            let ones =
                Tensor::full(1f32 / 127.5 - 1.0, (1, 1, img.height() as usize, img.width() as usize), rgb.device())
                    .unwrap();
            let x = Tensor::cat(&[&rgb, &ones], 1).unwrap();
            assert_net_close(&net.forward(&x).unwrap(), &net_outputs(c)["out"], &c.output);
        }
    }

    #[test]
    fn maps_match_controlnet_aux() {
        let mut d = Mlsd { net: net(), score_threshold: 0.0, distance_threshold: 0.0 };
        for c in cases("mlsd") {
            let thr = |k: &str, default: f64| c.params.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
            d.score_threshold = thr("thr_v", DEFAULT_SCORE_THRESHOLD);
            d.distance_threshold = thr("thr_d", DEFAULT_DISTANCE_THRESHOLD);
            assert_upstream_map(&d, &c);
        }
    }
}
