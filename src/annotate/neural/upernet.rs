//! UperNet (Xiao et al. 2018, "Unified Perceptual Parsing") with a ConvNeXt backbone ([`super::convnext`]):
//! ADE20K semantic segmentation, the `seg` annotator, as diffusers' sd-controlnet-seg example runs
//! `openmmlab/upernet-convnext-small` (transformers layout: `model.safetensors` or `pytorch_model.bin`,
//! `config.json`, `preprocessor_config.json`).
//!
//! The recipe:
//! 1. the image processor (`SegformerImageProcessor`): PIL-style resize to its square (512×512 on the hub; the
//!    aspect is not kept), `v / 255`, ImageNet mean and std;
//! 2. the net: backbone pyramid → UperNet head (pyramid pooling on the coarsest level, a top-down FPN, all levels
//!    fused at stride 4, a 1×1 classifier) → logits bilinearly upsampled to the processor's square;
//! 3. `post_process_semantic_segmentation`: the logits resized bilinearly to the output size, argmax per pixel;
//! 4. each class painted with its ADE20K colour ([`super::ade20k`]).
//!
//! The auxiliary FCN head of the file only trains the backbone; inference does not read it.
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::RgbImage;
use serde::Deserialize;

use super::ade20k;
use super::convnext::{ConvNextBackbone, ConvNextConfig};
use super::nn::{self, Conv};
use super::weights::StateDict;
use crate::annotate::{Detector, Preprocess, UpstreamSizes};
use crate::io::hub::{self, HubOptions, HubSpec};
use crate::io::images::{resize, ResampleFilter};
use crate::{Error, Result};

/// The default weights (MIT; the model diffusers' sd-controlnet-seg example uses).
pub const DEFAULT_REPO: &str = "openmmlab/upernet-convnext-small";
/// The weight files a transformers folder may hold, preferred first.
pub const MODEL_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// The head's tensors.
const HEAD: &str = "decode_head";

/// `config.json` (transformers' `UperNetConfig`, the fields inference reads).
#[derive(Deserialize, Debug, Clone)]
pub struct UperNetConfig {
    pub backbone_config: BackboneConfig,
    /// The head's width (512 on the hub).
    #[serde(default = "head_width")]
    pub hidden_size: usize,
    /// The pyramid pooling module's grid sizes.
    #[serde(default = "pool_scales")]
    pub pool_scales: Vec<usize>,
}

/// `backbone_config`: a ConvNeXt's (other backbones are refused by name).
#[derive(Deserialize, Debug, Clone)]
pub struct BackboneConfig {
    #[serde(default = "convnext")]
    pub model_type: String,
    #[serde(flatten)]
    pub convnext: ConvNextConfig,
}

fn head_width() -> usize {
    512
}
fn pool_scales() -> Vec<usize> {
    vec![1, 2, 3, 6]
}
fn convnext() -> String {
    "convnext".into()
}

impl UperNetConfig {
    /// `openmmlab/upernet-convnext-small`'s (for `bench`'s random full-size weights).
    pub fn convnext_small() -> Self {
        Self {
            backbone_config: BackboneConfig { model_type: convnext(), convnext: ConvNextConfig::small() },
            hidden_size: head_width(),
            pool_scales: pool_scales(),
        }
    }
}

/// `preprocessor_config.json` (transformers' `SegformerImageProcessor`; defaults are its own).
#[derive(Deserialize, Debug, Clone)]
pub struct ProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default)]
    pub size: ProcessorSize,
    /// PIL's resampling code (0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic).
    #[serde(default = "bilinear")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "rescale")]
    pub rescale_factor: f32,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "imagenet_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "imagenet_std")]
    pub image_std: [f32; 3],
}

/// `size`: `{"height", "width"}`, or one number for both (older files).
#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(untagged)]
pub enum ProcessorSize {
    Sides { height: u32, width: u32 },
    Square(u32),
}

impl Default for ProcessorSize {
    fn default() -> Self {
        Self::Square(DEFAULT_INPUT_SIZE)
    }
}

impl ProcessorSize {
    /// (width, height)
    fn sides(self) -> (u32, u32) {
        match self {
            Self::Sides { height, width } => (width, height),
            Self::Square(s) => (s, s),
        }
    }
}

/// The processor's default square side.
pub const DEFAULT_INPUT_SIZE: u32 = 512;

fn yes() -> bool {
    true
}
fn bilinear() -> u32 {
    2
}
fn rescale() -> f32 {
    1.0 / 255.0
}
fn imagenet_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn imagenet_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// `UperNetConvModule`: convolution and BatchNorm2d (eps 1e-5, folded into one convolution), then ReLU.
#[derive(Debug, Clone)]
pub struct ConvModule(pub Conv);

impl ConvModule {
    fn load(sd: &StateDict, name: &str, padding: usize) -> Result<Self> {
        Ok(Self(Conv::load_bn(sd, &format!("{name}.conv"), &format!("{name}.batch_norm"), 1, padding)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        nn::relu(&self.0.forward(x)?)
    }

    fn in_channels(&self) -> usize {
        self.0.in_channels()
    }

    fn out_channels(&self) -> usize {
        self.0.out_channels()
    }
}

/// `UperNetHead`: the decode head.
#[derive(Debug, Clone)]
pub struct UperNetHead {
    /// `psp_modules.{i}`: the pooling grid size and its 1×1 convolution (`.1`).
    pub psp_modules: Vec<(usize, ConvModule)>,
    pub bottleneck: ConvModule,
    pub lateral_convs: Vec<ConvModule>,
    pub fpn_convs: Vec<ConvModule>,
    pub fpn_bottleneck: ConvModule,
    pub classifier: Conv,
}

impl UperNetHead {
    /// `decode_head.*` for a backbone with `in_channels` per level (finest first).
    pub fn load(sd: &StateDict, config: &UperNetConfig, in_channels: &[usize]) -> Result<Self> {
        let Some((&top, lower)) = in_channels.split_last() else {
            return Err(sd.error("config.json: the backbone outputs no stages"));
        };
        let width = config.hidden_size;
        let check = |name: &str, m: &ConvModule, inputs: usize| -> Result<()> {
            if m.in_channels() != inputs || m.out_channels() != width {
                return Err(sd.error(format!(
                    "{HEAD}.{name}.conv.weight: {:?}, expected {width} outputs from {inputs} inputs",
                    m.0.weight.dims()
                )));
            }
            Ok(())
        };
        let mut psp_modules = Vec::with_capacity(config.pool_scales.len());
        for (i, &scale) in config.pool_scales.iter().enumerate() {
            let name = format!("psp_modules.{i}.1");
            let m = ConvModule::load(sd, &format!("{HEAD}.{name}"), 0)?;
            check(&name, &m, top)?;
            psp_modules.push((scale, m));
        }
        let bottleneck = ConvModule::load(sd, &format!("{HEAD}.bottleneck"), 1)?;
        check("bottleneck", &bottleneck, top + config.pool_scales.len() * width)?;
        let mut lateral_convs = Vec::with_capacity(lower.len());
        let mut fpn_convs = Vec::with_capacity(lower.len());
        for (i, &c) in lower.iter().enumerate() {
            let lateral = ConvModule::load(sd, &format!("{HEAD}.lateral_convs.{i}"), 0)?;
            check(&format!("lateral_convs.{i}"), &lateral, c)?;
            let fpn = ConvModule::load(sd, &format!("{HEAD}.fpn_convs.{i}"), 1)?;
            check(&format!("fpn_convs.{i}"), &fpn, width)?;
            lateral_convs.push(lateral);
            fpn_convs.push(fpn);
        }
        let fpn_bottleneck = ConvModule::load(sd, &format!("{HEAD}.fpn_bottleneck"), 1)?;
        check("fpn_bottleneck", &fpn_bottleneck, in_channels.len() * width)?;
        let classifier = Conv::load(sd, &format!("{HEAD}.classifier"), 1, 0)?;
        if classifier.in_channels() != width {
            return Err(
                sd.error(format!("{HEAD}.classifier.weight: {:?}, expected {width} inputs", classifier.weight.dims()))
            );
        }
        Ok(Self { psp_modules, bottleneck, lateral_convs, fpn_convs, fpn_bottleneck, classifier })
    }

    /// The class logits at the finest level's resolution (stride 4) from the backbone's levels.
    pub fn forward(&self, levels: &[Tensor]) -> Result<Tensor> {
        let Some((top, lower)) = levels.split_last() else {
            return Err(Error::Invalid("seg: the backbone gave no levels".into()));
        };
        // 1. pyramid pooling on the coarsest level: pooled grids, each back at the level's size, beside it
        let (_, _, th, tw) = top.dims4()?;
        let mut psp = vec![top.clone()];
        for (scale, conv) in &self.psp_modules {
            let pooled = conv.forward(&nn::adaptive_avg_pool(top, *scale)?)?;
            psp.push(nn::interpolate_bilinear(&pooled, th, tw)?);
        }
        let mut laterals: Vec<Tensor> =
            self.lateral_convs.iter().zip(lower).map(|(conv, x)| conv.forward(x)).collect::<Result<_>>()?;
        laterals.push(self.bottleneck.forward(&Tensor::cat(&psp, 1)?)?);
        // 2. top-down: each level gets the coarser one, upsampled, added (new tensors, coarsest first)
        for i in (1..laterals.len()).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            let up = nn::interpolate_bilinear(&laterals[i], h, w)?;
            laterals[i - 1] = (&laterals[i - 1] + up)?;
        }
        // 3. a 3×3 convolution on every level but the pooled one, all brought to the finest size and fused
        let (_, _, h, w) = laterals[0].dims4()?;
        let mut outs = Vec::with_capacity(laterals.len());
        for (i, lateral) in laterals.iter().enumerate() {
            let out = match self.fpn_convs.get(i) {
                Some(conv) => conv.forward(lateral)?,
                None => lateral.clone(),
            };
            outs.push(nn::interpolate_bilinear(&out, h, w)?);
        }
        let fused = self.fpn_bottleneck.forward(&Tensor::cat(&outs, 1)?)?;
        // 4. classify
        self.classifier.forward(&fused)
    }
}

/// `UperNetForSemanticSegmentation` at inference.
pub struct UperNetNet {
    pub backbone: ConvNextBackbone,
    pub decode_head: UperNetHead,
}

impl UperNetNet {
    pub fn load(sd: &StateDict, config: &UperNetConfig) -> Result<Self> {
        if config.backbone_config.model_type != "convnext" {
            return Err(sd.error(format!(
                "config.json: a {} backbone; only UperNet with ConvNeXt (openmmlab/upernet-convnext-*) is supported",
                config.backbone_config.model_type
            )));
        }
        let backbone = ConvNextBackbone::load(sd, &config.backbone_config.convnext)?;
        let decode_head = UperNetHead::load(sd, config, &backbone.channels())?;
        Ok(Self { backbone, decode_head })
    }

    /// The head's logits (1, classes, H/4, W/4) of `x` (1, 3, H, W; normalised).
    pub fn head_logits(&self, x: &Tensor) -> Result<Tensor> {
        self.decode_head.forward(&self.backbone.forward(x)?)
    }

    /// The model's logits (1, classes, H, W): the head's, upsampled bilinearly to the input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        nn::interpolate_bilinear(&self.head_logits(x)?, h, w)
    }
}

/// The loaded `seg` detector.
pub struct Seg {
    pub net: UperNetNet,
    pub processor: ProcessorConfig,
}

/// A class map: one class id per pixel, row-major.
pub struct ClassMap {
    pub width: u32,
    pub height: u32,
    pub classes: Vec<u16>,
}

impl Seg {
    /// The weights as the `weights` setting names them: a transformers folder, its `model.safetensors` or
    /// `pytorch_model.bin` (the two JSON files beside it), or a hub repo ([`DEFAULT_REPO`] when not given).
    pub fn load(weights: Option<&str>) -> Result<Self> {
        let model = locate(weights)?;
        let dir = model.parent().unwrap_or(Path::new("."));
        let config: UperNetConfig = read_json(&dir.join("config.json"))?;
        let processor: ProcessorConfig = read_json(&dir.join("preprocessor_config.json"))?;
        Self::from_state_dict(&StateDict::open(&model)?, &config, processor)
    }

    pub fn from_state_dict(sd: &StateDict, config: &UperNetConfig, processor: ProcessorConfig) -> Result<Self> {
        if !processor.do_resize {
            return Err(
                sd.error("preprocessor_config.json: do_resize false is not supported (the net needs a fixed size)")
            );
        }
        Ok(Self { net: UperNetNet::load(sd, config)?, processor })
    }

    /// The net's input for `image` with the processor's square side replaced by `input_size` when given.
    pub fn net_input(&self, image: &RgbImage, input_size: Option<u32>) -> Result<Tensor> {
        let p = &self.processor;
        let (w, h) = input_size.map(|s| (s, s)).unwrap_or(p.size.sides());
        let filter = match p.resample {
            0 => ResampleFilter::Nearest,
            1 => ResampleFilter::Lanczos,
            2 => ResampleFilter::Bilinear,
            3 => ResampleFilter::Bicubic,
            other => {
                return Err(Error::Invalid(format!(
                    "preprocessor_config.json: resample {other} is not one of PIL's 0-3"
                )))
            }
        };
        let resized = resize(image, w, h, filter);
        let r = if p.do_rescale { p.rescale_factor } else { 1.0 };
        let (mean, std) = if p.do_normalize { (p.image_mean, p.image_std) } else { ([0.0; 3], [1.0; 3]) };
        let n = (w * h) as usize;
        let mut data = vec![0f32; 3 * n];
        for (i, px) in resized.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * n + i] = (px[c] as f32 * r - mean[c]) / std[c];
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h as usize, w as usize), &candle_core::Device::Cpu)?)
    }

    /// The class map of `image` at `out` (width, height): the net at `input_size` (None: the processor's), its
    /// logits resized to `out`, argmax.
    pub fn classes(&self, image: &RgbImage, input_size: Option<u32>, out: (u32, u32)) -> Result<ClassMap> {
        let logits = self.net.forward(&self.net_input(image, input_size)?)?;
        argmax_resized(&logits, out)
    }

    /// The class map with the upstream sizes: the net at `detect_resolution` (a square), the output at the
    /// input's size or with its short side at `image_resolution`.
    pub fn sized_classes(&self, image: &RgbImage, sizes: &UpstreamSizes) -> Result<ClassMap> {
        for (setting, value) in
            [("detect_resolution", sizes.detect_resolution), ("image_resolution", sizes.image_resolution)]
        {
            match value {
                Some(v) if v < MIN_SIDE => {
                    return Err(Error::setting(setting, format!("must be at least {MIN_SIDE}, got {v}")))
                }
                Some(v) if v > 16384 => {
                    return Err(Error::setting(setting, format!("{v} is too large (at most 16384)")))
                }
                _ => {}
            }
        }
        let out = output_size(image, sizes.image_resolution);
        crate::annotate::check_image_size("image_resolution", out.0, out.1)?;
        self.classes(image, sizes.detect_resolution, out)
    }
}

/// The smallest side the net takes: ConvNeXt's stride 32 must leave one pixel.
pub const MIN_SIDE: u32 = 32;

/// The output size: the input's, or its short side brought to `image_resolution` (aspect kept).
pub fn output_size(image: &RgbImage, image_resolution: Option<u32>) -> (u32, u32) {
    super::depth_anything::DepthAnything::output_size(image, image_resolution)
}

/// `post_process_semantic_segmentation`: logits (1, C, h, w) resized bilinearly (torch's, corners not aligned)
/// to `out`, then the first class of largest logit per pixel. One output pixel at a time, so the resized logits
/// (C × the output size) never exist at once.
pub fn argmax_resized(logits: &Tensor, out: (u32, u32)) -> Result<ClassMap> {
    use rayon::prelude::*;
    let (_, c, h, w) = logits.dims4()?;
    // pixels major, classes minor: one output pixel reads four runs of C values
    let hwc = logits.get(0)?.permute((1, 2, 0))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (ow, oh) = (out.0 as usize, out.1 as usize);
    let xt = nn::bilinear_taps(w, ow);
    let yt = nn::bilinear_taps(h, oh);
    let mut classes = vec![0u16; ow * oh];
    classes.par_chunks_mut(ow).zip(&yt).for_each(|(row, &(y0, y1, fy))| {
        for (slot, &(x0, x1, fx)) in row.iter_mut().zip(&xt) {
            let at = |y: usize, x: usize| &hwc[(y * w + x) * c..(y * w + x + 1) * c];
            let (p00, p01, p10, p11) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            let mut best = (f32::NEG_INFINITY, 0usize);
            for k in 0..c {
                let top = p00[k] * (1.0 - fx) + p01[k] * fx;
                let bottom = p10[k] * (1.0 - fx) + p11[k] * fx;
                let v = top * (1.0 - fy) + bottom * fy;
                if v > best.0 {
                    best = (v, k);
                }
            }
            *slot = best.1 as u16;
        }
    });
    Ok(ClassMap { width: out.0, height: out.1, classes })
}

impl ClassMap {
    /// Every class in its ADE20K colour (black beyond the palette).
    pub fn to_map(&self) -> RgbImage {
        let data = self.classes.iter().flat_map(|&k| ade20k::colour(k as usize)).collect();
        RgbImage::from_raw(self.width, self.height, data).expect("three samples per pixel")
    }
}

impl Detector for Seg {
    fn name(&self) -> &str {
        "seg"
    }

    /// The processor resizes the image itself (to its square), so the detector sees the picture as given.
    fn preprocess(&self) -> Preprocess {
        Preprocess::AsIs
    }

    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        Ok(self.classes(image, None, image.dimensions())?.to_map())
    }

    /// `detect_resolution` is the processor's square side, `image_resolution` the output's short side.
    fn annotate_sized(&self, image: &RgbImage, sizes: &UpstreamSizes) -> Option<Result<RgbImage>> {
        Some(self.sized_classes(image, sizes).map(|m| m.to_map()))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::weights(path, format!("not an UperNet config: {e}")))
}

/// The weights file the `weights` setting names (see [`Seg::load`]).
pub fn locate(weights: Option<&str>) -> Result<PathBuf> {
    let Some(spec) = weights else {
        return fetch_transformers(DEFAULT_REPO)
            .map_err(|e| Error::setting("weights", format!("the default {DEFAULT_REPO}: {e}")));
    };
    let path = Path::new(spec);
    if path.is_dir() {
        return MODEL_FILES.iter().map(|f| path.join(f)).find(|p| p.is_file()).ok_or_else(|| {
            Error::setting(
                "weights",
                format!("{}: the folder has neither {}", path.display(), MODEL_FILES.join(" nor ")),
            )
        });
    }
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if hub::looks_like_hub_id(spec) {
        return fetch_transformers(spec).map_err(|e| Error::setting("weights", e));
    }
    Err(Error::setting("weights", format!("{spec}: {}", hub::missing_path_message(spec))))
}

/// A transformers repo's two JSON files and its weights (safetensors when the repo has them, else the torch
/// file), from the cache when there; the path of the weights.
fn fetch_transformers(id: &str) -> Result<PathBuf> {
    let base: HubSpec = id.parse()?;
    let opts = HubOptions::from_env();
    let get = |file: &str| hub::fetch(&HubSpec { file: Some(file.to_string()), ..base.clone() }, &opts);
    get("config.json")?;
    get("preprocessor_config.json")?;
    get(MODEL_FILES[0]).or_else(|first| get(MODEL_FILES[1]).map_err(|_| first))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::annotate::neural::test_support::assert_net_close;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_seg");

    #[derive(Deserialize)]
    struct Case {
        input: String,
        detect_resolution: Option<u32>,
        image_resolution: Option<u32>,
        net: String,
        output: String,
    }

    #[derive(Deserialize)]
    struct Manifest {
        cases: Vec<Case>,
    }

    fn cases() -> Vec<Case> {
        let text = std::fs::read_to_string(format!("{DIR}/manifest.json")).unwrap();
        serde_json::from_str::<Manifest>(&text).unwrap().cases
    }

    fn seg() -> Seg {
        Seg::load(Some(&format!("{DIR}/upernet"))).unwrap()
    }

    fn tensors(name: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{DIR}/{name}"), &candle_core::Device::Cpu).unwrap()
    }

    fn load(name: &str) -> RgbImage {
        image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
    }

    #[test]
    fn net_matches_transformers() {
        let seg = seg();
        for c in cases().iter().filter(|c| c.image_resolution.is_none()) {
            let reference = tensors(&c.net);
            // the input within one grey level (our PIL-style bilinear resize rounds a few samples the other way)
            let x = seg.net_input(&load(&c.input), c.detect_resolution).unwrap();
            let d = (x - &reference["pixel_values"]).unwrap().abs().unwrap().max_all().unwrap();
            let one_level = 1.0 / 255.0 / 0.224 + 1e-5;
            assert!(d.to_scalar::<f32>().unwrap() <= one_level, "{}: pixel_values off by {d}", c.net);
            // the reference's own input, so the net is compared alone
            let x = &reference["pixel_values"];
            let head = seg.net.head_logits(x).unwrap();
            assert_net_close(&head, &reference["head"], &format!("{}: head logits", c.net));
            let logits = seg.net.forward(x).unwrap().narrow(1, 0, 4).unwrap();
            assert_net_close(&logits, &reference["logits4"], &format!("{}: logits", c.net));
        }
    }

    #[test]
    fn class_maps_match_the_reference() {
        let seg = seg();
        for c in cases() {
            let image = load(&c.input);
            let sizes = UpstreamSizes { detect_resolution: c.detect_resolution, image_resolution: c.image_resolution };
            let ours = seg.sized_classes(&image, &sizes).unwrap();
            let reference: Vec<i64> = tensors(&c.net)["classes"].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(ours.classes.len(), reference.len(), "{}: size", c.output);
            let same = ours.classes.iter().zip(&reference).filter(|(&a, &b)| a as i64 == b).count();
            let share = same as f64 / reference.len() as f64;
            let distinct = reference.iter().collect::<std::collections::HashSet<_>>().len();
            eprintln!("{}: {:.3}% of pixels in the same class ({distinct} classes)", c.output, share * 100.0);
            assert!(distinct >= 5, "{}: the reference should show many classes", c.output);
            assert!(share >= 0.99, "{}: only {:.3}% of pixels agree", c.output, share * 100.0);
            // the coloured map, as the example paints it
            let map = ours.to_map();
            let expected = load(&c.output);
            assert_eq!(map.dimensions(), expected.dimensions(), "{}", c.output);
            let same = map.pixels().zip(expected.pixels()).filter(|(a, b)| a == b).count();
            assert!(same as f64 >= 0.99 * reference.len() as f64, "{}: colours", c.output);
        }
    }

    #[test]
    fn argmax_keeps_the_first_of_equal_logits_and_resizes() {
        // two classes, 1x2 logits resized to 1x4 (samples at x = 0, 0.25, 0.75, 1): class 1 wins wherever its
        // logit is above 0; the equal logits of the first pixel give class 0
        let logits = Tensor::new(&[[[[0f32, 0.0]], [[0.0, 1.0]]]], &candle_core::Device::Cpu).unwrap();
        let m = argmax_resized(&logits, (4, 1)).unwrap();
        assert_eq!(m.classes, vec![0, 1, 1, 1]);
        assert_eq!(m.to_map().get_pixel(0, 0).0, ade20k::PALETTE[0]);
    }

    #[test]
    fn processor_defaults_are_segformers() {
        let p = ProcessorConfig::default();
        assert_eq!(p.size.sides(), (512, 512));
        assert_eq!(p.resample, 2);
        let old: ProcessorConfig = serde_json::from_str(r#"{"size": 384}"#).unwrap();
        assert_eq!(old.size.sides(), (384, 384));
    }

    #[test]
    fn weights_setting_errors_name_what_is_missing() {
        let empty = std::env::temp_dir().join("controlnet-seg-empty-weights");
        std::fs::create_dir_all(&empty).unwrap();
        let err = locate(Some(empty.to_str().unwrap())).err().unwrap().to_string();
        assert!(err.starts_with("weights: ") && err.contains("model.safetensors nor pytorch_model.bin"), "{err}");
        // a Depth Anything folder is not an UperNet: the config says so
        let da = crate::annotate::neural::test_support2::da_weights("hf");
        let err = Seg::load(Some(da.to_str().unwrap())).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
