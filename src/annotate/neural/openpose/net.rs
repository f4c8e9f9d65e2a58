//! The CMU OpenPose nets as controlnet_aux builds them (`open_pose/model.py`, `face.py`): convolutional pose
//! machines. A VGG-19 trunk (to `conv4_2`, then two CPM convolutions; the hand and face trunks go on to
//! `conv5_3_CPM`) makes a feature map at 1/8 of the input; stage 1 predicts from it, and each of stages 2–6
//! refines the previous prediction concatenated with the features (7×7 convolutions).
//!
//! - body (`body_pose_model.pth`): two branches per stage, L1 = 38 part affinity fields (x, y of 19 limbs),
//!   L2 = 19 heatmaps (18 joints + background).
//! - hand (`hand_pose_model.pth`): 22 heatmaps (21 points + background).
//! - face (`facenet.pth`): 71 heatmaps (70 points + background), the hand's layout with other widths.
//!
//! Widths come from the file; kernels are 3×3 (padding 1), 1×1 or 7×7 (padding 3), read from the weights.
use candle_core::Tensor;

use crate::annotate::neural::nn::{self, Conv};
use crate::annotate::neural::weights::StateDict;
use crate::Result;

/// One layer of a `make_layers` chain: a convolution (ReLU after it or not) or a 2×2 max pool.
enum Step {
    Conv { conv: Conv, relu: bool },
    Pool,
}

/// A chain of layers as `make_layers` builds it from a name list ("pool" = max pool).
struct Chain(Vec<Step>);

impl Chain {
    /// `names` in order; every convolution but those in `linear` is followed by a ReLU.
    fn load(sd: &StateDict, names: &[String], linear: &[String]) -> Result<Self> {
        let steps = names
            .iter()
            .map(|name| {
                if name == "pool" {
                    return Ok(Step::Pool);
                }
                let w = sd.get_rank(&format!("{name}.weight"), 4)?;
                let padding = w.dim(2)? / 2;
                Ok(Step::Conv { conv: Conv::load(sd, name, 1, padding)?, relu: !linear.contains(name) })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self(steps))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for step in &self.0 {
            h = match step {
                Step::Pool => nn::max_pool2(&h)?,
                Step::Conv { conv, relu: true } => nn::relu(&conv.forward(&h)?)?,
                Step::Conv { conv, relu: false } => conv.forward(&h)?,
            };
        }
        Ok(h)
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The VGG trunk shared by the three nets, up to `conv4_2`.
const VGG: [&str; 12] = [
    "conv1_1", "conv1_2", "pool", "conv2_1", "conv2_2", "pool", "conv3_1", "conv3_2", "conv3_3", "conv3_4", "pool",
    "conv4_1",
];
/// Stages after the first.
const STAGES: std::ops::RangeInclusive<usize> = 2..=6;

/// The body net: trunk (`model0`), then stages 1–6 of two branches each.
pub struct BodyNet {
    trunk: Chain,
    /// `(L1, L2)` per stage: PAFs and heatmaps.
    stages: Vec<(Chain, Chain)>,
}

impl BodyNet {
    pub fn load(sd: &StateDict) -> Result<Self> {
        if !sd.has("conv4_3_CPM.weight") || !sd.has("Mconv1_stage2_L1.weight") {
            return Err(sd.error("no tensor conv4_3_CPM.weight / Mconv1_stage2_L1.weight: not body_pose_model.pth?"));
        }
        let trunk =
            names(&VGG).into_iter().chain(names(&["conv4_2", "conv4_3_CPM", "conv4_4_CPM"])).collect::<Vec<_>>();
        let trunk = Chain::load(sd, &trunk, &[])?;
        let mut stages = Vec::new();
        let stage1 = |b: &str| {
            let n: Vec<String> = (1..=5).map(|i| format!("conv5_{i}_CPM_{b}")).collect();
            Chain::load(sd, &n, &[format!("conv5_5_CPM_{b}")])
        };
        stages.push((stage1("L1")?, stage1("L2")?));
        for s in STAGES {
            let stage = |b: &str| {
                let n: Vec<String> = (1..=7).map(|i| format!("Mconv{i}_stage{s}_{b}")).collect();
                // upstream's no-ReLU list names Mconv7_stage6_L1 twice and never Mconv7_stage6_L2, so the
                // final heatmaps pass through a ReLU
                let last = format!("Mconv7_stage{s}_{b}");
                let linear = if s == 6 && b == "L2" { vec![] } else { vec![last] };
                Chain::load(sd, &n, &linear)
            };
            stages.push((stage("L1")?, stage("L2")?));
        }
        Ok(Self { trunk, stages })
    }

    /// `(PAFs (1, 38, h/8, w/8), heatmaps (1, 19, h/8, w/8))` of `x` (1, 3, h, w; BGR / 256 - 0.5).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        // 1. features
        let features = self.trunk.forward(x)?;
        // 2. stage 1 from the features, 3. stages 2–6 from the last prediction and the features
        let mut input = features.clone();
        let mut out = None;
        for (l1, l2) in &self.stages {
            let (paf, heat) = (l1.forward(&input)?, l2.forward(&input)?);
            input = Tensor::cat(&[&paf, &heat, &features], 1)?;
            out = Some((paf, heat));
        }
        Ok(out.expect("six stages"))
    }
}

/// The hand and face nets: trunk (to `conv5_3_CPM`), stage 1 (`conv6_1_CPM`, `conv6_2_CPM`), stages 2–6.
pub struct CpmNet {
    trunk: Chain,
    stages: Vec<Chain>,
}

impl CpmNet {
    /// `what` names the file in errors (`hand_pose_model.pth`, `facenet.pth`).
    pub fn load(sd: &StateDict, what: &str) -> Result<Self> {
        if !sd.has("conv5_3_CPM.weight") || !sd.has("Mconv1_stage2.weight") {
            return Err(sd.error(format!("no tensor conv5_3_CPM.weight / Mconv1_stage2.weight: not {what}?")));
        }
        let trunk: Vec<String> = names(&VGG)
            .into_iter()
            .chain(names(&["conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3_CPM"]))
            .collect();
        let mut stages = vec![Chain::load(sd, &names(&["conv6_1_CPM", "conv6_2_CPM"]), &names(&["conv6_2_CPM"]))?];
        for s in STAGES {
            let n: Vec<String> = (1..=7).map(|i| format!("Mconv{i}_stage{s}")).collect();
            stages.push(Chain::load(sd, &n, &[format!("Mconv7_stage{s}")])?);
        }
        Ok(Self { trunk: Chain::load(sd, &trunk, &[])?, stages })
    }

    /// The last stage's heatmaps (1, C, h/8, w/8) of `x` (1, 3, h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.trunk.forward(x)?;
        let mut h = self.stages[0].forward(&features)?;
        for stage in &self.stages[1..] {
            h = stage.forward(&Tensor::cat(&[&h, &features], 1)?)?;
        }
        Ok(h)
    }
}
