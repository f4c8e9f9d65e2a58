//! MiDaS v3 DPT-Hybrid (Ranftl et al. 2021), the depth annotator of ControlNet 1.0/1.1 (`depth-midas`) and the
//! source of its normal maps (`normal-midas`), as controlnet_aux's `MidasDetector` runs it with
//! `dpt_hybrid-midas-501f0c75.pt`.
//!
//! The net ([`MidasNet`]): the hybrid ViT encoder ([`super::vit_hybrid`], R50 + ViT-B/16) and the DPT decoder
//! ([`super::dpt`]). The pyramid's two finest levels are the ResNet's first two stage outputs as they are (strides
//! 4 and 8); the other two are the outputs of ViT blocks 8 and 11, their class token folded into every patch token
//! by `readout="project"` (`[token, class token]` → linear → GELU), then reassembled (1×1 projection; the coarsest
//! also a 3×3 stride-2 convolution) to strides 16 and 32. Fusion and head are Depth Anything's, and the depth comes
//! out at the input's size.
//!
//! The detector (controlnet_aux's `__call__`, the same in A1111's `annotator/midas`): the picture as given (sides
//! multiples of 32; both sizing recipes make them multiples of 64), scaled to `x / 127.5 - 1`, no resize of its
//! own. The depth map is the depth min-max normalised to 0–255 (truncated), near = white. The normal map is made
//! from the raw depth: Sobel slopes as x and y, z = 2π, flat (0, 0, 1) where the normalised depth is below the
//! background threshold (default 0.1), unit length, written as (z, y, x) ([`crate::annotate::normal`]).
use candle_core::{Device, Tensor};
use image::RgbImage;

use super::depth_anything::Depth;
use super::dpt::{DptFusion, FusionKeys, Reassemble};
use super::nn::resize_bilinear;
use super::nn::Linear;
use super::vit_hybrid::HybridVit;
use super::weights::StateDict;
use crate::annotate::cv::{resize_u8, Interpolation, Mat};
use crate::annotate::normal::normal_from_depth_f32;
use crate::annotate::resize::pad_to_64;
use crate::annotate::{upstream_input, Detector, UpstreamSizes};
use crate::{Error, Result};

/// The weights' upstream file name (hub `lllyasviel/Annotators`).
pub const WEIGHTS_FILE: &str = "dpt_hybrid-midas-501f0c75.pt";
/// controlnet_aux's `bg_th` of the normal map (A1111's "Normal Background Threshold" slider starts at 0.4).
pub const DEFAULT_BG_THRESHOLD: f64 = 0.1;
/// The normals' z before normalisation (`a = np.pi * 2.0`).
pub const DEFAULT_Z: f64 = std::f64::consts::TAU;
/// Input sides must be multiples of this: the ViT's stride-16 grid is halved once more for the coarsest level.
pub const SIDE_MULTIPLE: usize = 32;
/// The ViT blocks the head reads (`hooks = [0, 1, 8, 11]` of `vitb_rn50_384`; 0 and 1 name ResNet stages).
const VIT_TAPS: [usize; 2] = [8, 11];
/// Where the tensors are: the encoder, the two readouts and reassemblies (`act_postprocess{3,4}`), the fusion.
const ENCODER: &str = "pretrained.model.";
const READOUT: [&str; 2] = ["pretrained.act_postprocess3.0.project.0", "pretrained.act_postprocess4.0.project.0"];
const PROJECT: [&str; 2] = ["pretrained.act_postprocess3.3", "pretrained.act_postprocess4.3"];
const RESIZE: [&str; 2] = ["pretrained.act_postprocess3.4", "pretrained.act_postprocess4.4"];
pub const FUSION: FusionKeys = FusionKeys {
    layer_rn: |i| format!("scratch.layer{}_rn", i + 1),
    fusion: |i| format!("scratch.refinenet{}", i + 1),
    residual: ["resConfUnit1", "resConfUnit2"],
    conv: ["conv1", "conv2"],
    out_conv: "out_conv",
    head: ["scratch.output_conv.0", "scratch.output_conv.2", "scratch.output_conv.4"],
};

pub struct MidasNet {
    pub encoder: HybridVit,
    /// `ProjectReadout` of the two ViT levels: (width, 2·width).
    readouts: [Linear; 2],
    reassemble: [Reassemble; 2],
    fusion: DptFusion,
}

impl MidasNet {
    /// Every width from the file; the pieces are checked to fit each other (a wrong or truncated file fails here
    /// naming the tensor, not in the first convolution).
    pub fn load(sd: &StateDict) -> Result<Self> {
        let encoder = HybridVit::load(sd, ENCODER)?;
        let width = encoder.width();
        if encoder.depth() <= VIT_TAPS[1] {
            return Err(sd.error(format!(
                "{} transformer blocks: DPT-Hybrid reads blocks {} and {}",
                encoder.depth(),
                VIT_TAPS[0],
                VIT_TAPS[1]
            )));
        }
        if encoder.resnet.num_stages() < 2 {
            return Err(sd.error("the ResNet has fewer than the 2 stages the head reads"));
        }
        let readout = |i: usize| -> Result<Linear> {
            let l = Linear::load(sd, READOUT[i])?;
            if l.weight.dims() != [width, 2 * width] {
                return Err(sd.error(format!(
                    "{}.weight: {:?}, expected [{width}, {}] for a {width}-wide ViT",
                    READOUT[i],
                    l.weight.dims(),
                    2 * width
                )));
            }
            Ok(l)
        };
        let reassemble = |i: usize| Reassemble::load(sd, PROJECT[i], RESIZE[i]);
        let net = Self {
            readouts: [readout(0)?, readout(1)?],
            reassemble: [reassemble(0)?, reassemble(1)?],
            fusion: DptFusion::load(sd, &FUSION)?,
            encoder,
        };
        net.check_widths(sd, width)?;
        Ok(net)
    }

    /// Each level's producer makes what its `layer{i}_rn` takes.
    fn check_widths(&self, sd: &StateDict, width: usize) -> Result<()> {
        let resnet = &self.encoder.resnet;
        let made = [
            resnet.stage_channels(0),
            resnet.stage_channels(1),
            self.reassemble[0].out_channels(),
            self.reassemble[1].out_channels(),
        ];
        for (i, made) in made.into_iter().enumerate() {
            let takes = self.fusion.level_channels(i);
            if takes != made {
                return Err(
                    sd.error(format!("{}.weight takes {takes} channels, level {i} has {made}", (FUSION.layer_rn)(i)))
                );
            }
        }
        for (i, r) in self.reassemble.iter().enumerate() {
            if r.in_channels() != width {
                return Err(sd.error(format!(
                    "{}.weight takes {} channels, the ViT makes {width}",
                    PROJECT[i],
                    r.in_channels()
                )));
            }
        }
        Ok(())
    }

    /// The relative inverse depth (1, H, W) of `x` (1, 3, H, W; `x / 127.5 - 1`; sides multiples of 32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h % SIDE_MULTIPLE != 0 || w % SIDE_MULTIPLE != 0 {
            return Err(Error::Invalid(format!(
                "depth-midas: the net takes sides that are multiples of {SIDE_MULTIPLE}, got {w}x{h}"
            )));
        }
        // 1. encode
        let features = self.encoder.forward(x, &VIT_TAPS)?;
        let (gh, gw) = features.grid;
        // 2. the pyramid: two ResNet stages, two ViT levels (readout, tokens to an image, reassemble)
        let mut levels = vec![features.stages[0].clone(), features.stages[1].clone()];
        for ((tokens, readout), reassemble) in features.taps.iter().zip(&self.readouts).zip(&self.reassemble) {
            let (n, count, width) = tokens.dims3()?;
            let patches = tokens.narrow(1, 1, count - 1)?;
            let class = tokens.narrow(1, 0, 1)?.broadcast_as((n, count - 1, width))?;
            let mixed = readout.forward(&Tensor::cat(&[&patches, &class], 2)?)?.gelu_erf()?;
            let image = mixed.transpose(1, 2)?.reshape((n, width, gh, gw))?;
            levels.push(reassemble.forward(&image)?);
        }
        // 3. fuse; the head's ×2 after the finest fusion (itself ×2 of stride 4) brings the depth to the input size
        let (l0h, l0w) = (levels[0].dim(2)?, levels[0].dim(3)?);
        self.fusion.forward(&levels, (4 * l0h, 4 * l0w))
    }
}

/// The normal map's settings (`normal-midas`).
#[derive(Clone, Copy, Debug)]
pub struct NormalSettings {
    /// Normalised depth below which a pixel is flat background.
    pub bg_threshold: f64,
    /// z of every normal before normalisation.
    pub z: f64,
}

/// The loaded detector: the depth map, or with `normal` the normal map.
pub struct Midas {
    pub net: MidasNet,
    pub normal: Option<NormalSettings>,
}

impl Midas {
    /// The net's input for `image`: `x / 127.5 - 1`, planar RGB (1, 3, H, W).
    pub fn net_input(image: &RgbImage) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let n = w * h;
        let mut data = vec![0f32; 3 * n];
        for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * n + i] = px[c] as f32 / 127.5 - 1.0;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
    }

    /// The raw depth of `image` at its size.
    pub fn depth(&self, image: &RgbImage) -> Result<Depth> {
        let depth = self.net.forward(&Self::net_input(image)?)?;
        Ok(Depth { width: image.width(), height: image.height(), values: depth.flatten_all()?.to_vec1::<f32>()? })
    }
}

impl Midas {
    /// The depth map and the float depth it was made from, both at the map's size (`annotate depth-midas
    /// --save-raw`): with controlnet_aux's sizes when either is given (the depth resized bilinearly as a float
    /// where the map is resized as 8-bit), else at the image's size (the net on the image padded to multiples of
    /// 64, the padding cropped), the map then being what `annotate` makes without sizes.
    pub fn map_and_depth(&self, image: &RgbImage, sizes: &UpstreamSizes) -> Result<(RgbImage, Depth)> {
        if self.normal.is_some() {
            return Err(Error::setting("save_raw", "writes depth, so it applies to depth-midas, not normal-midas"));
        }
        let (w, h) = image.dimensions();
        if sizes.given() {
            let (input, (ow, oh)) = upstream_input(image, sizes)?;
            let depth = self.depth(&input)?;
            let map = resize_u8(&Mat::from_rgb(&depth.to_map()), ow as usize, oh as usize, Interpolation::Linear);
            let (dw, dh) = (depth.width as usize, depth.height as usize);
            let values = resize_bilinear(&depth.values, dw, dh, ow as usize, oh as usize);
            return Ok((map.to_rgb(), Depth { width: ow, height: oh, values }));
        }
        let padded = pad_to_64(&Mat::from_rgb(image));
        let depth = self.depth(&padded.to_rgb())?;
        let values = (0..h as usize)
            .flat_map(|y| depth.values[y * padded.width..y * padded.width + w as usize].iter().copied())
            .collect();
        let depth = Depth { width: w, height: h, values };
        Ok((depth.to_map(), depth))
    }
}

impl Detector for Midas {
    fn name(&self) -> &str {
        if self.normal.is_some() {
            "normal-midas"
        } else {
            "depth-midas"
        }
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let depth = self.depth(image)?;
        Ok(match self.normal {
            None => depth.to_map(),
            Some(n) => {
                let d =
                    Mat { width: depth.width as usize, height: depth.height as usize, channels: 1, data: depth.values };
                normal_from_depth_f32(&d, n.z, n.bg_threshold).to_rgb()
            }
        })
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

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_midas");

    /// One case of `tools/fixtures/gen_midas.py`.
    #[derive(Deserialize)]
    struct Case {
        input: String,
        detect_resolution: u32,
        image_resolution: u32,
        depth: String,
        normal: String,
        net: Option<String>,
    }

    fn cases() -> Vec<Case> {
        #[derive(Deserialize)]
        struct Manifest {
            cases: Vec<Case>,
        }
        let text = std::fs::read_to_string(format!("{DIR}/manifest.json")).unwrap();
        serde_json::from_str::<Manifest>(&text).unwrap().cases
    }

    fn load(name: &str) -> RgbImage {
        image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
    }

    fn weights() -> PathBuf {
        PathBuf::from(DIR).join(WEIGHTS_FILE)
    }

    fn net() -> MidasNet {
        MidasNet::load(&StateDict::open(&weights()).unwrap()).unwrap()
    }

    /// Samples more than `tol` levels off, as a fraction, and the largest difference.
    fn off(ours: &RgbImage, reference: &RgbImage, tol: u8, what: &str) -> (f64, u8) {
        assert_eq!(ours.dimensions(), reference.dimensions(), "{what}: size");
        let diffs: Vec<u8> = ours.as_raw().iter().zip(reference.as_raw()).map(|(&a, &b)| a.abs_diff(b)).collect();
        let off = diffs.iter().filter(|&&d| d > tol).count() as f64 / diffs.len() as f64;
        let max = diffs.iter().copied().max().unwrap_or(0);
        eprintln!("{what}: {:.3}% more than {tol} off, max {max}", off * 100.0);
        (off, max)
    }

    #[test]
    fn net_matches_controlnet_aux() {
        let net = net();
        let mut seen = 0;
        for c in cases().iter().filter(|c| c.net.is_some()) {
            let t =
                candle_core::safetensors::load(format!("{DIR}/{}", c.net.as_deref().unwrap()), &Device::Cpu).unwrap();
            // the input as the detector makes it from controlnet_aux's resized picture
            let x = &t["pixel_values"];
            let ours = net.forward(x).unwrap();
            assert_net_close(&ours, &t["depth"], c.net.as_deref().unwrap());
            seen += 1;
        }
        assert!(seen >= 2, "two net cases expected");
    }

    #[test]
    fn input_is_the_picture_scaled_to_minus_one_one() {
        let image = RgbImage::from_raw(2, 1, vec![0, 255, 51, 102, 0, 255]).unwrap();
        let x = Midas::net_input(&image).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, vec![-1.0, 102.0 / 127.5 - 1.0, 1.0, -1.0, 51.0 / 127.5 - 1.0, 1.0]);
    }

    #[test]
    fn maps_match_controlnet_aux() {
        let depth = Midas { net: net(), normal: None };
        let normal =
            Midas { net: net(), normal: Some(NormalSettings { bg_threshold: DEFAULT_BG_THRESHOLD, z: DEFAULT_Z }) };
        for c in cases() {
            let image = load(&format!("input_{}.png", c.input));
            let sizes = UpstreamSizes {
                detect_resolution: Some(c.detect_resolution),
                image_resolution: Some(c.image_resolution),
            };
            let ours = annotate_upstream(&depth, &image, &sizes).unwrap();
            let (off1, _) = off(&ours, &load(&c.depth), 1, &c.depth);
            assert!(off1 <= 0.01, "{}: {:.3}% of the samples more than 1 level off", c.depth, off1 * 100.0);
            let ours = annotate_upstream(&normal, &image, &sizes).unwrap();
            let (off1, _) = off(&ours, &load(&c.normal), 1, &c.normal);
            assert!(off1 <= 0.01, "{}: {:.3}% of the samples more than 1 level off", c.normal, off1 * 100.0);
        }
    }

    #[test]
    fn save_raw_depth_goes_with_the_map_of_either_recipe() {
        use crate::annotate::{annotate_with, AnnotateSettings};
        let depth = Midas { net: net(), normal: None };
        let c = &cases()[0];
        let image = load(&format!("input_{}.png", c.input));
        let upstream =
            UpstreamSizes { detect_resolution: Some(c.detect_resolution), image_resolution: Some(c.image_resolution) };
        for sizes in [upstream, UpstreamSizes::default()] {
            let (map, raw) = depth.map_and_depth(&image, &sizes).unwrap();
            // the map is the one `annotate` writes without --save-raw
            let plain = annotate_with(&depth, &image, &AnnotateSettings::default(), &sizes).unwrap();
            assert_eq!(map, plain, "{sizes:?}");
            assert_eq!((raw.width, raw.height), map.dimensions());
            // and the float depth, normalised, is that map (8-bit resizing aside)
            let (off, _) = off(&raw.to_map(), &map, 2, "raw");
            assert!(off <= 0.01, "{sizes:?}: {:.3}% of the samples more than 2 levels off", off * 100.0);
            let spread = raw.values.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
                - raw.values.iter().fold(f32::INFINITY, |a, &b| a.min(b));
            assert!(spread > 0.0, "a depth with variation");
        }
        let normal =
            Midas { net: net(), normal: Some(NormalSettings { bg_threshold: DEFAULT_BG_THRESHOLD, z: DEFAULT_Z }) };
        let err = normal.map_and_depth(&image, &upstream).err().unwrap().to_string();
        assert!(err.starts_with("save_raw: "), "{err}");
    }

    #[test]
    fn full_size_checkpoint_passes_the_loaders_checks() {
        // every tensor of the real dpt_hybrid-midas-501f0c75.pt (names and shapes from the upstream constructor)
        // as a zero view of its shape (nothing allocated per tensor)
        let text = std::fs::read_to_string(format!("{DIR}/full_shapes.json")).unwrap();
        let shapes: HashMap<String, Vec<usize>> = serde_json::from_str(&text).unwrap();
        assert!(shapes.len() > 300, "{} tensors", shapes.len());
        let zero = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let full = |shapes: &HashMap<String, Vec<usize>>| {
            let tensors = shapes.iter().map(|(k, s)| {
                (k.as_str(), zero.reshape(vec![1; s.len()]).unwrap().broadcast_as(s.as_slice()).unwrap())
            });
            StateDict::from_tensors(WEIGHTS_FILE, tensors)
        };
        let net = MidasNet::load(&full(&shapes)).unwrap();
        assert_eq!((net.encoder.width(), net.encoder.depth()), (768, 12));
        assert_eq!(net.encoder.resnet.num_stages(), 3);
        assert_eq!([0, 1, 2].map(|s| net.encoder.resnet.stage_channels(s)), [256, 512, 1024]);
        assert_eq!((0..4).map(|i| net.fusion.level_channels(i)).collect::<Vec<_>>(), [256, 512, 768, 768]);
        // a level that does not fit its fusion input is named
        let mut bad = shapes.clone();
        bad.insert("scratch.layer3_rn.weight".into(), vec![256, 512, 3, 3]);
        let err = MidasNet::load(&full(&bad)).err().unwrap().to_string();
        assert!(err.contains("scratch.layer3_rn.weight takes 512 channels, level 2 has 768"), "{err}");
    }

    #[test]
    fn another_file_names_the_missing_tensor_and_odd_sizes_are_refused() {
        let other = crate::annotate::neural::test_support::weights("netG.pth");
        let err = MidasNet::load(&StateDict::open(&other).unwrap()).err().unwrap().to_string();
        assert!(
            err.contains("netG.pth") && err.contains("pretrained.model.patch_embed.backbone.stem.conv.weight"),
            "{err}"
        );
        let d = Midas { net: net(), normal: None };
        let err = d.detect(&RgbImage::new(64, 48)).unwrap_err().to_string();
        assert!(err.contains("multiples of 32, got 64x48"), "{err}");
    }
}
