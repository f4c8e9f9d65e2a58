//! NormalBAE (Bae et al. 2021, "Estimating and Exploiting the Aleatoric Uncertainty in Surface Normal
//! Estimation"), the annotator of control_v11p_sd15_normalbae, as controlnet_aux's `NormalBaeDetector` runs it
//! with `scannet.pt`.
//!
//! The net ([`NormalBaeNet`], upstream `NNET`): an EfficientNet-B5 encoder ([`super::efficientnet`]) and a decoder
//! that climbs back from stride 32 with four `UpSampleBN` blocks (upsample to the skip's size, concatenate, two
//! 3×3 convolutions with batch norm and leaky ReLU), skips from stages 0, 1, 2 and 4 and the head convolution. A
//! 3×3 convolution predicts (x, y, z, κ) at stride 8; three refinements double it to the input size, each a
//! per-pixel MLP (1×1 convolutions) on the upsampled features and the upsampled previous prediction. Every
//! prediction is `norm_normalize`d: (x, y, z) to unit length, κ = elu(κ) + 1.01 (the uncertainty, which the map
//! does not show).
//!
//! The detector: the picture (sides multiples of 64 by controlnet_aux's sizing; the net takes multiples of 8) as
//! `x / 255`, ImageNet mean/std; the finest prediction's (x, y, z) as `(n + 1) / 2` clipped to 0–1, ×255
//! truncated, in that channel order.
use candle_core::{Device, Tensor};
use image::RgbImage;

use super::efficientnet::EfficientNet;
use super::nn::{self, Conv};
use super::weights::StateDict;
use crate::annotate::Detector;
use crate::{Error, Result};

/// The weights' upstream file name (hub `lllyasviel/Annotators`).
pub const WEIGHTS_FILE: &str = "scannet.pt";
/// Input sides must be multiples of this: the refinements double the stride-8 prediction three times and
/// concatenate it with the stride-4, -2 and -1 features.
pub const SIDE_MULTIPLE: usize = 8;
/// The encoder stages whose outputs the `UpSampleBN` blocks take, coarsest first (`up1` takes stage 4's).
const SKIP_STAGES: [usize; 4] = [4, 2, 1, 0];
/// The published file is a training checkpoint: `{'model': state_dict}` of a `DataParallel` model, so its keys
/// read `model.module.encoder…` (the `module.` of a bare state dict is already gone, see [`StateDict::open`]).
/// The first of these under which the stem is found is the file's prefix.
const PREFIXES: [&str; 3] = ["model.module.", "model.", ""];
/// Where the encoder's tensors are, under the prefix.
const ENCODER: &str = "encoder.original_model.";
/// `UpSampleBN._net`: convolution, batch norm, leaky ReLU, twice.
const UP_LAYERS: [(&str, &str); 2] = [("_net.0", "_net.1"), ("_net.3", "_net.4")];
/// The 1×1 convolutions of each refinement MLP (`nn.Sequential` indices; ReLUs between).
const MLP_LAYERS: [usize; 4] = [0, 2, 4, 6];
/// `norm_normalize`'s floor of κ.
const MIN_KAPPA: f64 = 0.01;
/// `nn.LeakyReLU()`'s default slope.
const LEAKY_SLOPE: f64 = 0.01;
/// torchvision's ImageNet normalisation the detector applies.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `UpSampleBN`: upsample (bilinear, corners aligned) to the skip's size, concatenate, two convolutions.
#[derive(Debug, Clone)]
pub struct UpSampleBn {
    pub convs: [Conv; 2],
}

impl UpSampleBn {
    fn load(sd: &StateDict, name: &str) -> Result<Self> {
        let conv = |(c, bn): (&str, &str)| Conv::load_bn(sd, &format!("{name}.{c}"), &format!("{name}.{bn}"), 1, 1);
        Ok(Self { convs: [conv(UP_LAYERS[0])?, conv(UP_LAYERS[1])?] })
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        let up = nn::interpolate_bilinear_corners(x, skip.dim(2)?, skip.dim(3)?)?;
        let mut y = Tensor::cat(&[&up, skip], 1)?;
        for conv in &self.convs {
            y = nn::leaky_relu(&conv.forward(&y)?, LEAKY_SLOPE)?;
        }
        Ok(y)
    }
}

/// One refinement (`out_conv_res{4,2,1}`): the features and the previous prediction doubled (bilinear, corners
/// aligned), concatenated, a per-pixel MLP (upstream `Conv1d`s with kernel 1 over the flattened pixels).
#[derive(Debug, Clone)]
pub struct Refine {
    pub layers: Vec<Conv>,
}

impl Refine {
    fn load(sd: &StateDict, name: &str) -> Result<Self> {
        let layers = MLP_LAYERS
            .iter()
            .map(|i| {
                let layer = format!("{name}.{i}");
                let weight = sd.get_rank(&format!("{layer}.weight"), 3)?.unsqueeze(3)?;
                Conv::new(sd, &layer, weight, 1, 0)
            })
            .collect::<Result<Vec<_>>>()?;
        check_widths(sd, name, &layers)?;
        Ok(Self { layers })
    }

    fn in_channels(&self) -> usize {
        self.layers[0].in_channels()
    }

    fn out_channels(&self) -> usize {
        self.layers[self.layers.len() - 1].out_channels()
    }

    fn forward(&self, features: &Tensor, prediction: &Tensor) -> Result<Tensor> {
        let double = |t: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            nn::interpolate_bilinear_corners(t, 2 * h, 2 * w)
        };
        let mut y = Tensor::cat(&[&double(features)?, &double(prediction)?], 1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            y = layer.forward(&y)?;
            if i + 1 < self.layers.len() {
                y = y.relu()?;
            }
        }
        norm_normalize(&y)
    }
}

/// A chain of convolutions, each taking what the one before makes.
fn check_widths(sd: &StateDict, name: &str, layers: &[Conv]) -> Result<()> {
    for pair in layers.windows(2) {
        if pair[0].out_channels() != pair[1].in_channels() {
            return Err(sd.error(format!(
                "{name}: a layer making {} channels feeds one taking {}",
                pair[0].out_channels(),
                pair[1].in_channels()
            )));
        }
    }
    Ok(())
}

/// (x, y, z) to unit length (+1e-10 against zero), κ to `elu(κ) + 1 + 0.01`.
pub fn norm_normalize(x: &Tensor) -> Result<Tensor> {
    let xyz = x.narrow(1, 0, 3)?;
    let norm = (xyz.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-10)?;
    let kappa = (x.narrow(1, 3, 1)?.elu(1.0)? + (1.0 + MIN_KAPPA))?;
    Ok(Tensor::cat(&[&xyz.broadcast_div(&norm)?, &kappa], 1)?)
}

/// The four predictions (1, 4, H/s, W/s), each (x, y, z, κ): strides 8, 4, 2 and 1.
pub struct Normals {
    pub res8: Tensor,
    pub res4: Tensor,
    pub res2: Tensor,
    pub res1: Tensor,
}

/// Upstream `NNET` in eval mode (`mode='test'`: every pixel refined, no sampling).
pub struct NormalBaeNet {
    pub encoder: EfficientNet,
    /// `decoder.conv2`: 1×1 on the head convolution's output.
    pub conv2: Conv,
    /// `decoder.up1` … `up4`.
    pub up: Vec<UpSampleBn>,
    /// `decoder.out_conv_res8`.
    pub out_conv_res8: Conv,
    /// `decoder.out_conv_res4`, `res2`, `res1`.
    pub refine: Vec<Refine>,
}

impl NormalBaeNet {
    /// Every width and block count from the file; the pieces are checked to fit each other (another file fails
    /// here naming the tensor).
    pub fn load(sd: &StateDict) -> Result<Self> {
        let prefix = PREFIXES
            .iter()
            .find(|p| sd.has(&format!("{p}{ENCODER}conv_stem.weight")))
            .ok_or_else(|| sd.error(format!("no tensor {ENCODER}conv_stem.weight: not NormalBAE's scannet.pt?")))?;
        let encoder = EfficientNet::load(sd, &format!("{prefix}{ENCODER}"))?;
        let stages = encoder.blocks.len();
        if stages <= SKIP_STAGES[0] {
            return Err(sd.error(format!("{stages} encoder stages: the decoder reads stage {}", SKIP_STAGES[0])));
        }
        let dec = |name: &str| format!("{prefix}decoder.{name}");
        let conv2 = Conv::load(sd, &dec("conv2"), 1, 0)?;
        let up = (1..=4).map(|i| UpSampleBn::load(sd, &dec(&format!("up{i}")))).collect::<Result<Vec<_>>>()?;
        let out_conv_res8 = Conv::load(sd, &dec("out_conv_res8"), 1, 1)?;
        let refine = [4, 2, 1].map(|r| Refine::load(sd, &dec(&format!("out_conv_res{r}"))));
        let [r4, r2, r1] = refine;
        let net = Self { encoder, conv2, up, out_conv_res8, refine: vec![r4?, r2?, r1?] };
        net.check_widths(sd, &dec(""))?;
        Ok(net)
    }

    /// Each layer takes what feeds it (the published widths: 2048 → 1024 → 512 → 256 → 128, skips 176, 64, 40, 24).
    fn check_widths(&self, sd: &StateDict, decoder: &str) -> Result<()> {
        let mismatch = |name: &str, takes: usize, gets: usize| {
            sd.error(format!("{decoder}{name} takes {takes} channels, gets {gets}"))
        };
        if self.conv2.in_channels() != self.encoder.conv_head.out_channels() {
            return Err(mismatch("conv2", self.conv2.in_channels(), self.encoder.conv_head.out_channels()));
        }
        let mut width = self.conv2.out_channels();
        let mut widths = Vec::with_capacity(4);
        for (i, (up, &stage)) in self.up.iter().zip(&SKIP_STAGES).enumerate() {
            let gets = width + self.encoder.stage_channels(stage);
            if up.convs[0].in_channels() != gets {
                return Err(mismatch(&format!("up{}", i + 1), up.convs[0].in_channels(), gets));
            }
            if up.convs[1].in_channels() != up.convs[0].out_channels() {
                return Err(mismatch(
                    &format!("up{}._net.3", i + 1),
                    up.convs[1].in_channels(),
                    up.convs[0].out_channels(),
                ));
            }
            width = up.convs[1].out_channels();
            widths.push(width);
        }
        // the stride-8 prediction reads up2's output; the refinements up2's, up3's and up4's, with 4 more
        if self.out_conv_res8.in_channels() != widths[1] || self.out_conv_res8.out_channels() != 4 {
            return Err(sd.error(format!(
                "{decoder}out_conv_res8.weight: {:?}, expected [4, {}, 3, 3]",
                self.out_conv_res8.weight.dims(),
                widths[1]
            )));
        }
        for ((refine, &w), r) in self.refine.iter().zip(&widths[1..]).zip([4, 2, 1]) {
            if refine.in_channels() != w + 4 || refine.out_channels() != 4 {
                return Err(sd.error(format!(
                    "{decoder}out_conv_res{r}: maps {} to {} channels, expected {} to 4",
                    refine.in_channels(),
                    refine.out_channels(),
                    w + 4
                )));
            }
        }
        Ok(())
    }

    /// The predictions for `x` (1, 3, H, W; ImageNet-normalised; sides multiples of 8).
    pub fn forward(&self, x: &Tensor) -> Result<Normals> {
        let (_, _, h, w) = x.dims4()?;
        if h % SIDE_MULTIPLE != 0 || w % SIDE_MULTIPLE != 0 || h == 0 || w == 0 {
            return Err(Error::Invalid(format!(
                "normal-bae: the net takes sides that are multiples of {SIDE_MULTIPLE}, got {w}x{h}"
            )));
        }
        // 1. encode
        let features = self.encoder.forward(x)?;
        // 2. decode from stride 32 to 2 (x_d0 … x_d4), a skip per step
        let mut decoded = vec![self.conv2.forward(&features.head)?];
        for (up, &stage) in self.up.iter().zip(&SKIP_STAGES) {
            let next = up.forward(&decoded[decoded.len() - 1], &features.stages[stage])?;
            decoded.push(next);
        }
        // 3. the coarse prediction at stride 8
        let res8 = norm_normalize(&self.out_conv_res8.forward(&decoded[2])?)?;
        // 4. refine to strides 4, 2, 1 from x_d2, x_d3, x_d4
        let res4 = self.refine[0].forward(&decoded[2], &res8)?;
        let res2 = self.refine[1].forward(&decoded[3], &res4)?;
        let res1 = self.refine[2].forward(&decoded[4], &res2)?;
        Ok(Normals { res8, res4, res2, res1 })
    }
}

/// The loaded detector.
pub struct NormalBae {
    pub net: NormalBaeNet,
}

impl NormalBae {
    /// The net's input for `image`: `x / 255`, then ImageNet mean/std per channel, planar RGB (1, 3, H, W).
    pub fn net_input(image: &RgbImage) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let n = w * h;
        let mut data = vec![0f32; 3 * n];
        for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * n + i] = (px[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
    }
}

impl Detector for NormalBae {
    fn name(&self) -> &str {
        "normal-bae"
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let normals = self.net.forward(&Self::net_input(image)?)?.res1;
        let (w, h) = (image.width() as usize, image.height() as usize);
        let planes = normals.get(0)?.narrow(0, 0, 3)?.flatten_all()?.to_vec1::<f32>()?;
        let mut data = Vec::with_capacity(3 * w * h);
        for i in 0..w * h {
            for c in 0..3 {
                // numpy's astype(uint8) truncates
                let v = ((planes[c * w * h + i] + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0;
                data.push(v as u8);
            }
        }
        Ok(RgbImage::from_raw(image.width(), image.height(), data).expect("three samples per pixel"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::*;
    use crate::annotate::neural::test_support::assert_net_close;
    use crate::annotate::{annotate_upstream, UpstreamSizes};

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_normalbae");

    /// One case of `tools/fixtures/gen_normalbae.py`.
    #[derive(Deserialize)]
    struct Case {
        input: String,
        detect_resolution: u32,
        image_resolution: u32,
        output: String,
        net: Option<String>,
    }

    #[derive(Deserialize)]
    struct Manifest {
        cases: Vec<Case>,
        odd_net: String,
    }

    fn manifest() -> Manifest {
        let text = std::fs::read_to_string(format!("{DIR}/manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn load(name: &str) -> RgbImage {
        image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
    }

    fn weights() -> PathBuf {
        PathBuf::from(DIR).join(WEIGHTS_FILE)
    }

    fn net() -> NormalBaeNet {
        NormalBaeNet::load(&StateDict::open(&weights()).unwrap()).unwrap()
    }

    #[test]
    fn net_matches_controlnet_aux() {
        let net = net();
        let m = manifest();
        let files: Vec<&str> = m.cases.iter().filter_map(|c| c.net.as_deref()).chain([m.odd_net.as_str()]).collect();
        assert!(files.len() >= 2, "two net cases expected");
        for file in files {
            let t = candle_core::safetensors::load(format!("{DIR}/{file}"), &Device::Cpu).unwrap();
            let ours = net.forward(&t["pixel_values"]).unwrap();
            assert_net_close(&ours.res8, &t["out_res8"], &format!("{file} out_res8"));
            assert_net_close(&ours.res1, &t["out_res1"], &format!("{file} out_res1"));
        }
    }

    #[test]
    fn input_is_imagenet_normalised() {
        let image = RgbImage::from_raw(1, 1, vec![0, 255, 51]).unwrap();
        let x = NormalBae::net_input(&image).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [-0.485 / 0.229, (1.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{x:?}");
        }
    }

    #[test]
    fn maps_match_controlnet_aux() {
        let d = NormalBae { net: net() };
        for c in manifest().cases {
            let image = load(&format!("input_{}.png", c.input));
            let sizes = UpstreamSizes {
                detect_resolution: Some(c.detect_resolution),
                image_resolution: Some(c.image_resolution),
            };
            let ours = annotate_upstream(&d, &image, &sizes).unwrap();
            let reference = load(&c.output);
            assert_eq!(ours.dimensions(), reference.dimensions(), "{}: size", c.output);
            let diffs: Vec<u8> = ours.as_raw().iter().zip(reference.as_raw()).map(|(&a, &b)| a.abs_diff(b)).collect();
            let off = diffs.iter().filter(|&&v| v > 4).count() as f64 / diffs.len() as f64;
            let max = diffs.iter().copied().max().unwrap_or(0);
            eprintln!("{}: {:.3}% more than 4 off, max {max}", c.output, off * 100.0);
            assert!(off <= 0.02, "{}: {:.3}% of the samples more than 4 levels off", c.output, off * 100.0);
        }
    }

    #[test]
    fn full_size_checkpoint_passes_the_loaders_checks() {
        // every tensor of the real scannet.pt (names and shapes from the upstream constructor), as a zero view of
        // its shape, under the published file's `model.module.` prefix
        let text = std::fs::read_to_string(format!("{DIR}/full_shapes.json")).unwrap();
        let shapes: HashMap<String, Vec<usize>> = serde_json::from_str(&text).unwrap();
        assert!(shapes.len() > 800, "{} tensors", shapes.len());
        let zero = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let full = |shapes: &HashMap<String, Vec<usize>>| {
            let names: Vec<String> = shapes.keys().map(|k| format!("model.module.{k}")).collect();
            let tensors: Vec<(&str, Tensor)> = names
                .iter()
                .zip(shapes.values())
                .map(|(k, s)| (k.as_str(), zero.reshape(vec![1; s.len()]).unwrap().broadcast_as(s.as_slice()).unwrap()))
                .collect();
            StateDict::from_tensors(WEIGHTS_FILE, tensors)
        };
        let net = NormalBaeNet::load(&full(&shapes)).unwrap();
        let e = &net.encoder;
        assert_eq!(e.blocks.iter().map(Vec::len).collect::<Vec<_>>(), [3, 5, 5, 7, 7, 9, 3]);
        assert_eq!((0..7).map(|s| e.stage_channels(s)).collect::<Vec<_>>(), [24, 40, 64, 128, 176, 304, 512]);
        assert_eq!(e.conv_head.out_channels(), 2048);
        assert_eq!(net.up.iter().map(|u| u.convs[1].out_channels()).collect::<Vec<_>>(), [1024, 512, 256, 128]);
        // a decoder block that does not fit its skip is named
        let mut bad = shapes.clone();
        bad.insert("decoder.up2._net.0.weight".into(), vec![512, 1024, 3, 3]);
        let err = NormalBaeNet::load(&full(&bad)).err().unwrap().to_string();
        assert!(err.contains("model.module.decoder.up2 takes 1024 channels, gets 1088"), "{err}");
    }

    #[test]
    fn another_file_is_named_and_odd_sizes_are_refused() {
        let other = crate::annotate::neural::test_support::weights("netG.pth");
        let err = NormalBaeNet::load(&StateDict::open(&other).unwrap()).err().unwrap().to_string();
        assert!(err.contains("netG.pth") && err.contains("encoder.original_model.conv_stem.weight"), "{err}");
        let d = NormalBae { net: net() };
        let err = d.detect(&RgbImage::new(64, 44)).unwrap_err().to_string();
        assert!(err.contains("multiples of 8, got 64x44"), "{err}");
    }
}
