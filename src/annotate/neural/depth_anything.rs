//! Depth Anything V2 (Yang et al. 2024): relative depth from one photo, a DINOv2 backbone ([`super::dinov2`]) and a
//! DPT head ([`super::dpt`]); the preprocessor of the depth ControlNets' newer checkpoints.
//!
//! Two weight layouts, each run with its own upstream's pre- and post-processing, since the maps differ by about
//! 1 % of the depth range off 518×518:
//! - transformers (`depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf`: `model.safetensors`, `config.json`,
//!   `preprocessor_config.json`): `DPTImageProcessor` (PIL-style bicubic resize keeping the aspect, sides
//!   multiples of 14, the scale closest to 1 of the two that fit a side to 518), position embeddings interpolated
//!   to the grid, the depth resized bicubically to the output (the depth-estimation pipeline);
//! - the original release (`depth_anything_v2_vit{s,b,l}.pth`): `infer_image(image, input_size)` (OpenCV cubic
//!   resize of the float image, both sides at least `input_size`, multiples of 14), position embeddings
//!   interpolated with the release's 0.1 offset, the depth resized bilinearly with aligned corners.
//!
//! The map is the depth min-max normalised to 0–255 (truncated), near = white, as both upstreams write it.
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::RgbImage;
use serde::Deserialize;

use super::dinov2::{self, Dinov2, PosInterpolation, PATCH};
use super::dpt::{self, DptHead};
use super::nn;
use super::weights::StateDict;
use crate::annotate::cv::{resize_f64, Interpolation, Mat};
use crate::annotate::{Detector, Preprocess, UpstreamSizes};
use crate::io::hub::{self, HubOptions, HubSpec};
use crate::io::images::{resize, ResampleFilter};
use crate::{Error, Result};

/// The default weights: the transformers layout of the small (Apache-2.0) model.
pub const DEFAULT_REPO: &str = "depth-anything/Depth-Anything-V2-Small-hf";
/// The original release's file names, smallest first.
pub const ORIGINAL_FILES: [&str; 3] =
    ["depth_anything_v2_vits.pth", "depth_anything_v2_vitb.pth", "depth_anything_v2_vitl.pth"];
/// The net's default input size (both upstreams).
pub const DEFAULT_INPUT_SIZE: u32 = 518;

/// `preprocessor_config.json` of the transformers layout (the fields `DPTImageProcessor` reads here).
#[derive(Deserialize, Debug, Clone)]
pub struct ProcessorConfig {
    pub size: ProcessorSize,
    #[serde(default = "yes")]
    pub keep_aspect_ratio: bool,
    #[serde(default = "fourteen")]
    pub ensure_multiple_of: u32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    #[serde(default = "rescale")]
    pub rescale_factor: f32,
}

#[derive(Deserialize, Debug, Clone, Copy)]
pub struct ProcessorSize {
    pub height: u32,
    pub width: u32,
}

fn yes() -> bool {
    true
}
fn fourteen() -> u32 {
    14
}
fn rescale() -> f32 {
    1.0 / 255.0
}

/// The part of `config.json` the loader needs: which blocks the head reads and the heads per block.
#[derive(Deserialize, Debug)]
struct ModelConfig {
    backbone_config: BackboneConfig,
    #[serde(default)]
    depth_estimation_type: Option<String>,
}

#[derive(Deserialize, Debug)]
struct BackboneConfig {
    num_attention_heads: usize,
    out_indices: Vec<usize>,
}

/// Which upstream a file comes from, with what its pre-processing needs.
#[derive(Debug, Clone)]
pub enum Layout {
    Transformers(ProcessorConfig),
    Original,
}

pub struct DepthAnythingNet {
    pub backbone: Dinov2,
    pub head: DptHead,
}

impl DepthAnythingNet {
    /// The relative depth (1, H, W) of `x` (1, 3, H, W; normalised, sides multiples of 14).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let taps = self.backbone.forward(x)?;
        self.head.forward(&taps, h / PATCH, w / PATCH)
    }
}

/// The loaded detector: the net, its layout, and the input size (`detect_resolution`; default 518).
pub struct DepthAnything {
    pub net: DepthAnythingNet,
    pub layout: Layout,
}

/// The depth of one image at the output size, before it becomes a map.
pub struct Depth {
    pub width: u32,
    pub height: u32,
    pub values: Vec<f32>,
}

impl DepthAnything {
    /// The weights as the `weights` setting names them: a transformers folder (`model.safetensors` +
    /// `config.json` + `preprocessor_config.json`) or its `model.safetensors`, an original
    /// `depth_anything_v2_vit*.pth` (or a folder holding one), or a hub repo of the transformers layout
    /// ([`DEFAULT_REPO`] when not given).
    pub fn load(weights: Option<&str>) -> Result<Self> {
        let path = locate(weights)?;
        if path.extension().is_some_and(|e| e == "safetensors") {
            Self::load_transformers(&path)
        } else {
            Self::load_original(&path)
        }
    }

    /// `model.safetensors` with `config.json` and `preprocessor_config.json` beside it.
    pub fn load_transformers(model: &Path) -> Result<Self> {
        let dir = model.parent().unwrap_or(Path::new("."));
        let config: ModelConfig = read_json(&dir.join("config.json"))?;
        let processor: ProcessorConfig = read_json(&dir.join("preprocessor_config.json"))?;
        if config.depth_estimation_type.as_deref().is_some_and(|t| t != "relative") {
            return Err(Error::weights(model, "a metric depth model: only relative Depth Anything is supported"));
        }
        let sd = StateDict::open(model)?;
        // stage i is the output of block i - 1 (stage 0 is the embeddings)
        let taps: Vec<usize> = config.backbone_config.out_indices.iter().map(|&i| i.saturating_sub(1)).collect();
        if taps.len() != 4 {
            return Err(Error::weights(model, format!("out_indices {:?}: the DPT head reads 4 blocks", taps)));
        }
        let backbone = Dinov2::load(
            &sd,
            &dinov2::TRANSFORMERS,
            config.backbone_config.num_attention_heads,
            taps,
            PosInterpolation::Size,
        )?;
        let head = DptHead::load(&sd, &dpt::TRANSFORMERS)?;
        Ok(Self { net: DepthAnythingNet { backbone, head }, layout: Layout::Transformers(processor) })
    }

    /// An original `depth_anything_v2_vit*.pth` (sizes and tapped blocks from the tensors).
    pub fn load_original(path: &Path) -> Result<Self> {
        Self::from_original(&StateDict::open(path)?)
    }

    /// The tensors of an original `depth_anything_v2_vit*.pth`.
    pub fn from_original(sd: &StateDict) -> Result<Self> {
        let width = sd.get_rank("pretrained.patch_embed.proj.weight", 4)?.dim(0)?;
        let depth = sd.count("pretrained.blocks.", ".norm1.weight");
        let taps = dinov2::original_taps(depth)
            .ok_or_else(|| sd.error(format!("{depth} blocks: not a ViT-S/B/L/G Depth Anything V2")))?;
        let backbone =
            Dinov2::load(sd, &dinov2::ORIGINAL, dinov2::original_heads(width), taps, PosInterpolation::Offset)?;
        let head = DptHead::load(sd, &dpt::ORIGINAL)?;
        Ok(Self { net: DepthAnythingNet { backbone, head }, layout: Layout::Original })
    }

    /// The net's input for `image` at `input_size` (None: the layout's default), as its upstream makes it.
    pub fn net_input(&self, image: &RgbImage, input_size: Option<u32>) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        match &self.layout {
            Layout::Original => {
                let size = input_size.unwrap_or(DEFAULT_INPUT_SIZE);
                let (nw, nh) = lower_bound_size(w, h, size);
                let src = Mat {
                    width: w as usize,
                    height: h as usize,
                    channels: 3,
                    data: image.as_raw().iter().map(|&v| v as f64 / 255.0).collect(),
                };
                let resized = resize_f64(&src, nw as usize, nh as usize, Interpolation::Cubic);
                const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
                const STD: [f64; 3] = [0.229, 0.224, 0.225];
                planar(&resized.data, nw, nh, |v, c| ((v - MEAN[c]) / STD[c]) as f32)
            }
            Layout::Transformers(p) => {
                let target = input_size.map(|s| (s, s)).unwrap_or((p.size.width, p.size.height));
                let (nw, nh) = processor_size(w, h, target, p.keep_aspect_ratio, p.ensure_multiple_of);
                let resized = resize(image, nw, nh, ResampleFilter::Bicubic);
                let data: Vec<f64> = resized.as_raw().iter().map(|&v| v as f64).collect();
                let (mean, std, r) = (p.image_mean, p.image_std, p.rescale_factor);
                planar(&data, nw, nh, |v, c| (v as f32 * r - mean[c]) / std[c])
            }
        }
    }

    /// The depth of `image` at `out` (width, height): the net at `input_size`, then resized as the layout's
    /// upstream resizes it.
    pub fn depth(&self, image: &RgbImage, input_size: Option<u32>, out: (u32, u32)) -> Result<Depth> {
        let x = self.net_input(image, input_size)?;
        let (_, _, h, w) = x.dims4()?;
        let depth = self.net.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let (ow, oh) = (out.0 as usize, out.1 as usize);
        let values = match self.layout {
            Layout::Original => nn::resize_bilinear_corners(&depth, w, h, ow, oh),
            Layout::Transformers(_) => {
                nn::resize_bicubic(&depth, w, h, (ow, oh), (w as f64 / ow as f64, h as f64 / oh as f64))
            }
        };
        Ok(Depth { width: out.0, height: out.1, values })
    }

    /// The depth with the upstream sizes: the net at `detect_resolution`, the output at the input's size or with
    /// its short side at `image_resolution`.
    pub fn sized_depth(&self, image: &RgbImage, sizes: &UpstreamSizes) -> Result<Depth> {
        for (setting, value) in
            [("detect_resolution", sizes.detect_resolution), ("image_resolution", sizes.image_resolution)]
        {
            match value {
                Some(0) => return Err(Error::setting(setting, "must be at least 1, got 0")),
                Some(v) if v > 16384 => {
                    return Err(Error::setting(setting, format!("{v} is too large (at most 16384)")))
                }
                _ => {}
            }
        }
        let out = Self::output_size(image, sizes.image_resolution);
        crate::annotate::check_image_size("image_resolution", out.0, out.1)?;
        self.depth(image, sizes.detect_resolution, out)
    }

    /// The output size: the input's, or its short side brought to `image_resolution` (aspect kept).
    pub fn output_size(image: &RgbImage, image_resolution: Option<u32>) -> (u32, u32) {
        let (w, h) = image.dimensions();
        match image_resolution {
            None => (w, h),
            Some(r) => {
                let k = r as f64 / w.min(h) as f64;
                (((w as f64 * k).round() as u32).max(1), ((h as f64 * k).round() as u32).max(1))
            }
        }
    }
}

impl Depth {
    /// `(d - min) / (max - min) * 255`, truncated, as grey RGB (a flat depth is black).
    pub fn to_map(&self) -> RgbImage {
        let (lo, hi) = self.values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let range = hi - lo;
        let data = self
            .values
            .iter()
            .map(|&v| if range > 0.0 { ((v - lo) / range * 255.0).clamp(0.0, 255.0) as u8 } else { 0 })
            .flat_map(|v| [v, v, v])
            .collect();
        RgbImage::from_raw(self.width, self.height, data).expect("three samples per pixel")
    }

    /// The depth as a little-endian float32 `.npy` array of shape (height, width).
    pub fn to_npy(&self) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", self.height, self.width);
        // magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64
        let total = (10 + header.len() + 1).div_ceil(64) * 64;
        header.push_str(&" ".repeat(total - 10 - header.len() - 1));
        header.push('\n');
        let mut out = Vec::with_capacity(total + 4 * self.values.len());
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

impl Detector for DepthAnything {
    fn name(&self) -> &str {
        "depth-anything"
    }

    /// The net resizes the image itself (to its input size), so the detector sees the picture as given.
    fn preprocess(&self) -> Preprocess {
        Preprocess::AsIs
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        Ok(self.depth(image, None, image.dimensions())?.to_map())
    }

    /// `detect_resolution` is the net's input size, `image_resolution` the output's short side (no rounding to
    /// multiples of 64: neither upstream does it).
    fn annotate_sized(&self, image: &RgbImage, sizes: &UpstreamSizes) -> Option<Result<RgbImage>> {
        Some(self.sized_depth(image, sizes).map(|d| d.to_map()))
    }
}

/// The original `Resize(keep_aspect_ratio, ensure_multiple_of=14, resize_method="lower_bound")`: both sides at
/// least `size`, rounded (half to even) to multiples of 14, up when rounding falls below `size`.
pub fn lower_bound_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let scale = (size as f64 / w as f64).max(size as f64 / h as f64);
    let fit = |x: f64| {
        let m = PATCH as f64;
        let y = (x / m).round_ties_even() * m;
        (if y < size as f64 { (x / m).ceil() * m } else { y }) as u32
    };
    (fit(scale * w as f64), fit(scale * h as f64))
}

/// transformers' `get_resize_output_image_size`: with `keep_aspect` the one of the two scales that is closer to
/// 1, each side rounded (half to even) to a multiple of `multiple`.
pub fn processor_size(w: u32, h: u32, target: (u32, u32), keep_aspect: bool, multiple: u32) -> (u32, u32) {
    let (mut sw, mut sh) = (target.0 as f64 / w as f64, target.1 as f64 / h as f64);
    if keep_aspect {
        if (1.0 - sw).abs() < (1.0 - sh).abs() {
            sh = sw;
        } else {
            sw = sh;
        }
    }
    let m = multiple.max(1) as f64;
    let fit = |x: f64| ((x / m).round_ties_even() * m).max(m) as u32;
    (fit(sw * w as f64), fit(sh * h as f64))
}

/// Interleaved RGB samples to a (1, 3, H, W) tensor, each through `f(value, channel)`.
fn planar(data: &[f64], w: u32, h: u32, f: impl Fn(f64, usize) -> f32) -> Result<Tensor> {
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, px) in data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = f(px[c], c);
        }
    }
    Ok(Tensor::from_vec(out, (1, 3, h as usize, w as usize), &candle_core::Device::Cpu)?)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::weights(path, format!("not a Depth Anything config: {e}")))
}

/// The weights file the `weights` setting names (see [`DepthAnything::load`]).
pub fn locate(weights: Option<&str>) -> Result<PathBuf> {
    let Some(spec) = weights else {
        return fetch_transformers(DEFAULT_REPO)
            .map_err(|e| Error::setting("weights", format!("the default {DEFAULT_REPO}: {e}")));
    };
    let path = Path::new(spec);
    if path.is_dir() {
        let model = path.join("model.safetensors");
        if model.is_file() {
            return Ok(model);
        }
        if let Some(f) = ORIGINAL_FILES.iter().map(|f| path.join(f)).find(|p| p.is_file()) {
            return Ok(f);
        }
        return Err(Error::setting(
            "weights",
            format!(
                "{}: the folder has neither model.safetensors (transformers) nor {}",
                path.display(),
                ORIGINAL_FILES.join(", ")
            ),
        ));
    }
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if hub::looks_like_hub_id(spec) {
        return fetch_transformers(spec).map_err(|e| Error::setting("weights", e));
    }
    Err(Error::setting("weights", format!("{spec}: {}", hub::missing_path_message(spec))))
}

/// A transformers repo's three files (from the cache when there); the path of its `model.safetensors`.
fn fetch_transformers(id: &str) -> Result<PathBuf> {
    let base: HubSpec = id.parse()?;
    let opts = HubOptions::from_env();
    let mut model = PathBuf::new();
    for file in ["config.json", "preprocessor_config.json", "model.safetensors"] {
        let spec = HubSpec { file: Some(file.to_string()), ..base.clone() };
        model = hub::fetch(&spec, &opts)?;
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::test_support::assert_net_close;
    use crate::annotate::neural::test_support2::{cases, da_weights, load, tensors};

    fn transformers() -> DepthAnything {
        DepthAnything::load(Some(da_weights("hf").to_str().unwrap())).unwrap()
    }

    fn original() -> DepthAnything {
        DepthAnything::load(Some(da_weights("depth_anything_v2_vits.pth").to_str().unwrap())).unwrap()
    }

    fn of(layout: &str) -> DepthAnything {
        if layout == "original" {
            original()
        } else {
            transformers()
        }
    }

    #[test]
    fn sizes_follow_each_upstream() {
        // original: both sides >= 518, multiples of 14 (the short side exactly 518)
        assert_eq!(lower_bound_size(96, 64, 518), (784, 518));
        assert_eq!(lower_bound_size(640, 480, 518), (686, 518));
        // transformers: the scale closer to 1 (a small image's long side goes to 518)
        assert_eq!(processor_size(96, 64, (518, 518), true, 14), (518, 350));
        assert_eq!(processor_size(1280, 960, (518, 518), true, 14), (686, 518));
    }

    #[test]
    fn net_matches_both_upstreams() {
        for c in cases("depth-anything").iter().filter(|c| c.net.is_some()) {
            let d = of(&c.layout);
            let t = tensors(c.net.as_deref().unwrap());
            let input = d.net_input(&load(&format!("input_{}.png", c.input)), c.size).unwrap();
            assert_eq!(input.dims(), t["pixel_values"].dims(), "{}: input size", c.output);
            // the net on the reference's own input (the resizes are compared through the maps)
            let ours = d.net.forward(&t["pixel_values"]).unwrap();
            assert_net_close(&ours, &t["depth"], &c.output);
        }
    }

    #[test]
    fn maps_match_both_upstreams() {
        let (hf, orig) = (transformers(), original());
        for c in cases("depth-anything") {
            let d = if c.layout == "original" { &orig } else { &hf };
            let image = load(&format!("input_{}.png", c.input));
            let depth = d.depth(&image, c.size, image.dimensions()).unwrap();
            let reference = load(&c.output);
            assert_map_close(&depth.to_map(), &reference, &c.output);
            // the raw depth, relative to its range
            let raw = tensors(&c.depth)["depth"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let range = raw.iter().cloned().fold(f32::MIN, f32::max) - raw.iter().cloned().fold(f32::MAX, f32::min);
            let worst = depth.values.iter().zip(&raw).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            eprintln!("{}: raw depth max |diff| {:.3}% of the range", c.output, 100.0 * worst / range);
            assert!(worst <= 0.01 * range, "{}: raw depth off by {worst} (range {range})", c.output);
        }
    }

    /// At most 2 % of the pixels more than 4 levels off.
    fn assert_map_close(ours: &RgbImage, reference: &RgbImage, what: &str) {
        assert_eq!(ours.dimensions(), reference.dimensions(), "{what}: size");
        let diffs: Vec<u8> = ours.as_raw().iter().zip(reference.as_raw()).map(|(&a, &b)| a.abs_diff(b)).collect();
        let off = diffs.iter().filter(|&&v| v > 4).count() as f64 / diffs.len() as f64;
        eprintln!("{what}: {:.3}% off by > 4, max {}", off * 100.0, diffs.iter().max().unwrap());
        assert!(off <= 0.02, "{what}: {:.3}% of the samples more than 4 levels off", off * 100.0);
    }

    #[test]
    fn the_two_paths_differ_off_square_inputs() {
        // the 0.1 offset: the same weights, other position embeddings for a 96x64 image
        let image = load("input_a.png");
        let (a, b) = (transformers(), original());
        let xa = a.net_input(&image, Some(140)).unwrap();
        let da = a.net.forward(&xa).unwrap();
        let db = b.net.forward(&xa).unwrap();
        let d = (da - db).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 1e-3, "the position-embedding interpolations should differ ({d})");
    }

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let d = Depth { width: 3, height: 2, values: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0] };
        let npy = d.to_npy();
        let len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&npy[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'), "{header}");
        assert_eq!(&npy[10 + len..10 + len + 8], &[0, 0, 0, 0, 0, 0, 0x80, 0x3f]);
        assert_eq!(d.to_map().get_pixel(2, 1).0, [255; 3]);
    }

    #[test]
    fn weights_setting_says_what_a_folder_lacks() {
        let dir = crate::annotate::neural::test_support::weights("");
        let err = locate(Some(dir.to_str().unwrap())).unwrap_err().to_string();
        assert!(err.starts_with("weights: ") && err.contains("neither model.safetensors"), "{err}");
        // another net's file names the missing tensor
        let err = DepthAnything::load(Some(dir.join("netG.pth").to_str().unwrap())).err().unwrap().to_string();
        assert!(err.contains("netG.pth") && err.contains("pretrained.patch_embed.proj.weight"), "{err}");
    }
}
