//! `controlnet bench --annotators`: seconds per image of each neural annotator at full size, with random
//! weights, on one 512-px image: the net plus controlnet_aux's resizing and post-processing, as `annotate`
//! runs it. `tools/bench_annotators.py` times controlnet_aux (and Depth Anything V2's own code) on the same
//! image with the same call.
//!
//! The architectures come from the upstream constructors: `tests/fixtures/annotators_neural/full_size_shapes.json`
//! lists every tensor name and shape of each upstream weights file (written by that script's `--shapes`); the
//! loaders read them exactly as they read the published files. Random weights make OpenPose and M-LSD find
//! different things than on a photo with trained weights, so their post-processing does different work; the
//! nets dominate. DWPose's nets are ONNX graphs read from files instead, timed on a picture of a person
//! ([`super::dwpose`]).
use std::collections::HashMap;

use candle_core::{Shape, Tensor};
use image::{Rgb, RgbImage};

use super::dwpose;
use super::random::RandomWeights;
use super::{cpu_model, kernels_used, load_average, timed, Timing};
use crate::annotate::neural::{detector_from, StateDict};
use crate::annotate::{annotate_upstream, Detector, DetectorOptions, UpstreamSizes};
use crate::{Error, Result};

/// Every upstream weights file's tensors as `[name, shape]` pairs.
const FULL_SIZE_SHAPES: &str = include_str!("../../tests/fixtures/annotators_neural/full_size_shapes.json");
/// The image side and the `detect_resolution` / `image_resolution` of every timed call.
pub const SIZE: u32 = 512;
/// The kinds timed, in the order of the table (the Python script's order).
pub const KINDS: [&str; 12] = [
    "hed",
    "pidinet",
    "lineart",
    "lineart-anime",
    "mlsd",
    "openpose",
    "openpose-full",
    "depth-anything",
    "depth-midas",
    "normal-midas",
    "normal-bae",
    "seg",
];

#[derive(Debug, Clone, serde::Serialize)]
pub struct AnnotatorRow {
    pub kind: String,
    /// Seconds to build the detector from the random state dict.
    pub build_s: f64,
    pub seconds: Timing,
    /// CPU seconds (all threads) of the same calls.
    pub cpu_seconds: Timing,
    /// dwpose: the people its detector finds in the picture (its pose net runs once per person).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub people: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AnnotatorReport {
    pub implementation: String,
    pub size: u32,
    pub iters: usize,
    pub kernels: String,
    pub machine: String,
    pub threads: usize,
    pub load_before: f64,
    pub load_after: f64,
    pub rows: Vec<AnnotatorRow>,
}

/// The full-size state dict of the upstream file `file`, filled with seeded random weights (batch-norm running
/// variances 1 and means 0, so that every layer stays finite).
pub fn random_state_dict(file: &str, seed: u64) -> Result<StateDict> {
    let shapes: HashMap<String, Vec<(String, Vec<usize>)>> = serde_json::from_str(FULL_SIZE_SHAPES)
        .map_err(|e| Error::Invalid(format!("the full-size annotator layouts: {e}")))?;
    let tensors = shapes.get(file).ok_or_else(|| Error::Invalid(format!("no full-size layout of {file}")))?;
    let weights = RandomWeights::new(seed);
    let mut out = Vec::with_capacity(tensors.len());
    for (name, dims) in tensors {
        let shape = Shape::from(dims.as_slice());
        let t = if name.ends_with("running_var") {
            Tensor::ones(shape, candle_core::DType::F32, &candle_core::Device::Cpu)?
        } else if name.ends_with("running_mean") {
            Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)?
        } else {
            weights.tensor(&shape, name)?
        };
        out.push((name.as_str(), t));
    }
    Ok(StateDict::from_tensors(format!("random full-size {file}"), out))
}

/// The bench image (`tools/bench_annotators.py` draws the same): a colour gradient with a bright square and a
/// dark disc.
pub fn bench_image(size: u32) -> RgbImage {
    let s = size as f32;
    RgbImage::from_fn(size, size, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        if (size / 8..size / 2).contains(&x) && (size / 8..size / 2).contains(&y) {
            return Rgb([230; 3]);
        }
        if (xf - 0.7 * s).powi(2) + (yf - 0.6 * s).powi(2) < (s / 6.0).powi(2) {
            return Rgb([25; 3]);
        }
        // numpy's astype(uint8) truncates
        Rgb([(xf * 255.0 / (s - 1.0)) as u8, (yf * 255.0 / (s - 1.0)) as u8, 128])
    })
}

/// Builds each of `kinds` from random full-size weights (dwpose: from its ONNX files, `dwpose_weights` or the
/// hub cache, see [`dwpose::load`]) and times it on the bench image (dwpose: on [`dwpose::person_image`]).
pub fn run(
    kinds: &[&str],
    iters: usize,
    seed: u64,
    dwpose_weights: Option<&str>,
    mut progress: impl FnMut(&str),
) -> Result<AnnotatorReport> {
    if iters == 0 {
        return Err(Error::setting("iters", "must be at least 1"));
    }
    let load_before = load_average();
    let sizes = UpstreamSizes { detect_resolution: Some(SIZE), image_resolution: Some(SIZE) };
    let open = |file: &str| random_state_dict(file, seed);
    let mut rows = Vec::with_capacity(kinds.len());
    for &kind in kinds {
        progress(&format!("{kind}: building"));
        let start = std::time::Instant::now();
        let (detector, image, people): (Box<dyn Detector>, RgbImage, Option<usize>) = if kind == dwpose::KIND {
            let detector = dwpose::load(dwpose_weights)?;
            let image = dwpose::person_image(SIZE);
            let people = dwpose::people(&detector, &image, &sizes)?;
            (Box::new(detector), image, Some(people))
        } else {
            let detector = detector_from(kind, &DetectorOptions::default(), &open)?
                .ok_or_else(|| Error::setting("annotators", format!("{kind} is not a neural annotator")))?;
            (detector, bench_image(SIZE), None)
        };
        let build_s = start.elapsed().as_secs_f64();
        progress(&format!("{kind}: timing"));
        let (seconds, cpu_seconds, _) = timed(iters, || annotate_upstream(detector.as_ref(), &image, &sizes))?;
        progress(&format!("{kind}: {:.3} s", seconds.median_s));
        rows.push(AnnotatorRow { kind: kind.to_string(), build_s, seconds, cpu_seconds, people });
    }
    Ok(AnnotatorReport {
        implementation: if kinds.contains(&dwpose::KIND) {
            "controlnet-rs (candle 0.11.1; dwpose: tract-onnx 0.23)".into()
        } else {
            "controlnet-rs (candle 0.11.1)".into()
        },
        size: SIZE,
        iters,
        kernels: kernels_used(candle_core::DType::F32),
        machine: cpu_model(),
        threads: candle_core::utils::get_num_threads(),
        load_before,
        load_after: load_average(),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::weights_file;

    /// Every upstream file's full-size layout loads into its net: the loaders accept the published
    /// architectures, not only the narrowed fixtures.
    #[test]
    fn full_size_layouts_load_into_every_detector() {
        let open = |file: &str| random_state_dict(file, 1);
        for kind in KINDS {
            let d = detector_from(kind, &DetectorOptions::default(), &open).unwrap();
            assert!(d.is_some(), "{kind}");
        }
        let coarse = DetectorOptions { coarse: true, ..DetectorOptions::default() };
        assert_eq!(weights_file("lineart", &coarse), Some("sk_model2.pth"));
        assert!(detector_from("lineart", &coarse, &open).unwrap().is_some());
    }

    #[test]
    fn bench_image_matches_the_python_drawing() {
        let img = bench_image(SIZE);
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 128]);
        assert_eq!(img.get_pixel(511, 511).0, [255, 255, 128]);
        assert_eq!(img.get_pixel(100, 100).0, [230; 3]);
        assert_eq!(img.get_pixel(358, 307).0, [25; 3]);
    }
}
