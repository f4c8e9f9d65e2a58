//! Neural annotators: the detector nets of controlnet_aux 0.0.10 (the code A1111's and ComfyUI's
//! preprocessors run, and the maps the published ControlNets were trained on), on the model layer's CPU
//! kernels.
//!
//! Each is built once from its weights ([`weights::locate`], [`weights::StateDict`]) into a
//! [`crate::annotate::Detector`] and then runs on any number of images: `detect` is the net and what
//! controlnet_aux does at the net's resolution, `finish` what it does after resizing to the output (scribble
//! thinning, lineart's inversion). The upstream resizing is [`crate::annotate::annotate_upstream`].
//!
//! | kind | net | file (hub `lllyasviel/Annotators`) |
//! | --- | --- | --- |
//! | `hed` | [`hed::HedNet`] | `ControlNetHED.pth` |
//! | `pidinet` | [`pidinet::PidiNet`] | `table5_pidinet.pth` |
//! | `lineart` | [`lineart::LineartNet`] | `sk_model.pth` (`sk_model2.pth` with `coarse`) |
//! | `lineart-anime` | [`lineart_anime::AnimeNet`] | `netG.pth` |
//! | `mlsd` | [`mlsd::MlsdNet`] | `mlsd_large_512_fp32.pth` |
//! | `openpose`, `openpose-hand`, `openpose-face`, `openpose-full` | [`openpose::Openpose`] | `body_pose_model.pth`, `hand_pose_model.pth`, `facenet.pth` |
//! | `depth-anything` | [`depth_anything::DepthAnythingNet`] | hub `depth-anything/Depth-Anything-V2-Small-hf` (transformers layout) or `depth_anything_v2_vit{s,b,l}.pth` |
//! | `depth-midas`, `normal-midas` | [`midas::MidasNet`] | `dpt_hybrid-midas-501f0c75.pt` |
//! | `normal-bae` | [`normalbae::NormalBaeNet`] | `scannet.pt` |
//! | `seg` | [`upernet::UperNetNet`] | hub `openmmlab/upernet-convnext-small` (transformers layout) |
//! | `dwpose` | [`dwpose::Dwpose`] (ONNX through tract) | hub `yzd-v/DWPose`: `yolox_l.onnx`, `dw-ll_ucoco_384.onnx` |
pub mod ade20k;
pub mod convnext;
pub mod depth_anything;
pub mod dinov2;
pub mod dpt;
pub mod dwpose;
pub mod efficientnet;
pub mod hed;
pub mod lineart;
pub mod lineart_anime;
pub mod midas;
pub mod mlsd;
pub mod nn;
pub mod normalbae;
pub mod openpose;
pub mod pidinet;
pub mod post;
pub mod resnetv2;
pub mod upernet;
pub mod vit_hybrid;
pub mod weights;

pub use weights::{locate, StateDict, DEFAULT_REPO};

use std::sync::Mutex;

use image::RgbImage;

use super::pose::PoseFile;
use super::{Detector, DetectorOptions, Preprocess};
use crate::Result;

/// A detector whose map is drawn from keypoints it can hand out too (`annotate --save-json`).
pub trait PoseDetector: Detector {
    /// The map of `image` and the pose it was drawn from, normalised to the image.
    fn detect_with_pose(&self, image: &RgbImage) -> Result<(RgbImage, PoseFile)>;
}

/// The map and the pose of one image made by `recipe` (an annotate recipe run on `detector`): the pose as found
/// at the detect resolution (empty when the recipe never ran the detector).
pub fn annotate_with_pose(
    detector: &dyn PoseDetector,
    recipe: impl FnOnce(&dyn Detector) -> Result<RgbImage>,
) -> Result<(RgbImage, PoseFile)> {
    let capture = Capture { inner: detector, pose: Mutex::new(None) };
    let map = recipe(&capture)?;
    let pose = capture.pose.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_default();
    Ok((map, pose))
}

/// A [`PoseDetector`] keeping the pose of the (one) image it detects.
struct Capture<'a> {
    inner: &'a dyn PoseDetector,
    pose: Mutex<Option<PoseFile>>,
}

impl Detector for Capture<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn preprocess(&self) -> Preprocess {
        self.inner.preprocess()
    }
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let (map, pose) = self.inner.detect_with_pose(image)?;
        *self.pose.lock().unwrap_or_else(|e| e.into_inner()) = Some(pose);
        Ok(map)
    }
}

/// The weights file of `kind` with these options (its upstream name).
pub fn weights_file(kind: &str, options: &DetectorOptions) -> Option<&'static str> {
    Some(match kind {
        "hed" => "ControlNetHED.pth",
        "pidinet" => "table5_pidinet.pth",
        "lineart" if options.coarse => "sk_model2.pth",
        "lineart" => "sk_model.pth",
        "lineart-anime" => "netG.pth",
        "mlsd" => "mlsd_large_512_fp32.pth",
        "depth-midas" | "normal-midas" => midas::WEIGHTS_FILE,
        "normal-bae" => normalbae::WEIGHTS_FILE,
        _ => return None,
    })
}

/// The original Depth Anything V2 file `detector_from` reads (the small net; `detector` also takes the others and
/// the transformers layout).
pub const DEPTH_ANYTHING_FILE: &str = "depth_anything_v2_vits.pth";

/// The name under which `detector_from` asks for UperNet's weights (`openmmlab/upernet-convnext-small`'s, read
/// with that model's config and image processor; `detector` reads any transformers folder or repo).
pub const UPERNET_FILE: &str = "upernet-convnext-small/model.safetensors";

/// Load the neural detector `kind` (None for a kind that is not one).
pub fn detector(kind: &str, options: &DetectorOptions) -> Result<Option<Box<dyn Detector>>> {
    if kind == "depth-anything" {
        return Ok(Some(Box::new(depth_anything::DepthAnything::load(options.weights.as_deref())?)));
    }
    if kind == "seg" {
        return Ok(Some(Box::new(upernet::Seg::load(options.weights.as_deref())?)));
    }
    if kind == "dwpose" {
        let include = dwpose::include(options.include_body, options.include_hand, options.include_face);
        return Ok(Some(Box::new(dwpose::Dwpose::load(options.weights.as_deref(), include)?)));
    }
    let open = |file: &str| StateDict::open(&locate(options.weights.as_deref(), file)?);
    detector_from(kind, options, &open)
}

/// The neural detector `kind` (None for a kind that is not one) from the state dicts `open` gives for each
/// upstream file name it asks for: the files on disk ([`detector`]), or full-size random weights (`bench`).
/// Depth Anything is read in its original layout from [`DEPTH_ANYTHING_FILE`], UperNet from [`UPERNET_FILE`].
pub fn detector_from(
    kind: &str,
    options: &DetectorOptions,
    open: &dyn Fn(&str) -> Result<StateDict>,
) -> Result<Option<Box<dyn Detector>>> {
    if kind == "depth-anything" {
        return Ok(Some(Box::new(depth_anything::DepthAnything::from_original(&open(DEPTH_ANYTHING_FILE)?)?)));
    }
    if kind == "seg" {
        let config = upernet::UperNetConfig::convnext_small();
        let seg = upernet::Seg::from_state_dict(&open(UPERNET_FILE)?, &config, upernet::ProcessorConfig::default())?;
        return Ok(Some(Box::new(seg)));
    }
    if kind.starts_with("openpose") {
        let include =
            openpose::Include::for_kind(kind, options.include_body, options.include_hand, options.include_face);
        let nets = openpose::OpenposeNets::from_files(open, include)?;
        return Ok(Some(Box::new(openpose::Openpose { nets: Box::new(nets), include })));
    }
    let Some(file) = weights_file(kind, options) else { return Ok(None) };
    let sd = open(file)?;
    Ok(Some(match kind {
        "hed" => Box::new(hed::Hed { net: hed::HedNet::load(&sd)?, safe: options.safe, scribble: options.scribble }),
        "pidinet" => Box::new(pidinet::Pidi {
            net: pidinet::PidiNet::load(&sd)?,
            safe: options.safe,
            scribble: options.scribble,
            apply_filter: options.apply_filter,
        }),
        "lineart" => Box::new(lineart::Lineart { net: lineart::LineartNet::load(&sd)? }),
        "mlsd" => Box::new(mlsd::Mlsd {
            net: mlsd::MlsdNet::load(&sd)?,
            score_threshold: options.score_threshold.unwrap_or(mlsd::DEFAULT_SCORE_THRESHOLD),
            distance_threshold: options.distance_threshold.unwrap_or(mlsd::DEFAULT_DISTANCE_THRESHOLD),
        }),
        "depth-midas" => Box::new(midas::Midas { net: midas::MidasNet::load(&sd)?, normal: None }),
        "normal-midas" => {
            let bg_threshold = options.bg_threshold.unwrap_or(midas::DEFAULT_BG_THRESHOLD);
            if !bg_threshold.is_finite() {
                return Err(crate::Error::setting("bg_threshold", format!("must be a number, got {bg_threshold}")));
            }
            let normal = midas::NormalSettings { bg_threshold, z: midas::DEFAULT_Z };
            Box::new(midas::Midas { net: midas::MidasNet::load(&sd)?, normal: Some(normal) })
        }
        "normal-bae" => Box::new(normalbae::NormalBae { net: normalbae::NormalBaeNet::load(&sd)? }),
        _ => Box::new(lineart_anime::LineartAnime { net: lineart_anime::AnimeNet::load(&sd)? }),
    }))
}

#[cfg(test)]
pub(crate) mod test_support2 {
    //! Reading the fixtures of `tools/fixtures/gen_neural_annotators2.py`.
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};
    use image::RgbImage;
    use serde::Deserialize;

    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_neural2");

    /// A file or folder under `depth_anything/`.
    pub fn da_weights(name: &str) -> PathBuf {
        PathBuf::from(DIR).join("depth_anything").join(name)
    }

    #[derive(Deserialize, Debug, Clone)]
    pub struct Case {
        pub kind: String,
        pub layout: String,
        pub input: String,
        pub size: Option<u32>,
        pub output: String,
        pub net: Option<String>,
        pub depth: String,
    }

    #[derive(Deserialize)]
    struct Manifest {
        cases: Vec<Case>,
    }

    pub fn cases(kind: &str) -> Vec<Case> {
        let text = std::fs::read_to_string(format!("{DIR}/manifest.json")).unwrap();
        let m: Manifest = serde_json::from_str(&text).unwrap();
        let cases: Vec<Case> = m.cases.into_iter().filter(|c| c.kind == kind).collect();
        assert!(!cases.is_empty(), "no fixture cases for {kind}");
        cases
    }

    pub fn load(name: &str) -> RgbImage {
        image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
    }

    pub fn tensors(name: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{DIR}/{name}"), &Device::Cpu).unwrap()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Reading the fixtures of `tools/fixtures/gen_neural_annotators.py`.
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};
    use image::RgbImage;
    use serde::Deserialize;

    use crate::annotate::{annotate_upstream, Detector, UpstreamSizes};

    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_neural");

    pub fn weights(name: &str) -> PathBuf {
        PathBuf::from(DIR).join("weights").join(name)
    }

    pub fn variant(which: &str, name: &str) -> PathBuf {
        PathBuf::from(DIR).join("variants").join(which).join(name)
    }

    #[derive(Deserialize, Debug, Clone)]
    pub struct Case {
        pub kind: String,
        pub input: String,
        pub output: String,
        #[serde(default)]
        pub net_input: Option<String>,
        #[serde(default)]
        pub net: Option<String>,
        pub params: serde_json::Map<String, serde_json::Value>,
    }

    impl Case {
        pub fn flag(&self, key: &str) -> bool {
            self.params.get(key).and_then(|v| v.as_bool()).unwrap_or(false)
        }
        pub fn u32(&self, key: &str) -> u32 {
            self.params[key].as_u64().unwrap_or_else(|| panic!("{}: no {key}", self.output)) as u32
        }
    }

    #[derive(Deserialize)]
    struct Manifest {
        cases: Vec<Case>,
    }

    pub fn cases(kind: &str) -> Vec<Case> {
        let text = std::fs::read_to_string(format!("{DIR}/manifest.json")).unwrap();
        let m: Manifest = serde_json::from_str(&text).unwrap();
        let cases: Vec<Case> = m.cases.into_iter().filter(|c| c.kind == kind).collect();
        assert!(!cases.is_empty(), "no fixture cases for {kind}");
        cases
    }

    pub fn load(name: &str) -> RgbImage {
        image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
    }

    pub fn load_net_input(c: &Case) -> RgbImage {
        load(c.net_input.as_deref().expect("a case with net outputs"))
    }

    pub fn net_outputs(c: &Case) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{DIR}/{}", c.net.as_deref().unwrap()), &Device::Cpu).unwrap()
    }

    /// Net outputs within 1e-4 of the reference's largest magnitude (f32 parity).
    pub fn assert_net_close(ours: &Tensor, reference: &Tensor, what: &str) {
        assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        let d = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{what}: max |diff| {d:.3e} (scale {scale:.3e})");
        assert!(d <= 1e-4 * scale, "{what}: max |diff| {d} > 1e-4 x {scale}");
    }

    /// The detector's map made with controlnet_aux's resizing against the reference: at most 1% of the
    /// samples more than 2 levels off.
    pub fn assert_upstream_map(d: &dyn Detector, c: &Case) {
        let sizes = UpstreamSizes {
            detect_resolution: Some(c.u32("detect_resolution")),
            image_resolution: Some(c.u32("image_resolution")),
        };
        let ours = annotate_upstream(d, &load(&format!("input_{}.png", c.input)), &sizes).unwrap();
        let reference = load(&c.output);
        assert_eq!(ours.dimensions(), reference.dimensions(), "{}: size", c.output);
        let diffs: Vec<u8> = ours.as_raw().iter().zip(reference.as_raw()).map(|(&a, &b)| a.abs_diff(b)).collect();
        let off = diffs.iter().filter(|&&v| v > 2).count() as f64 / diffs.len() as f64;
        let mean = diffs.iter().map(|&v| v as f64).sum::<f64>() / diffs.len() as f64;
        eprintln!("{}: {:.3}% off by > 2, mean |diff| {mean:.3}", c.output, off * 100.0);
        assert!(off <= 0.01, "{}: {:.3}% of samples off by more than 2 levels", c.output, off * 100.0);
    }
}
