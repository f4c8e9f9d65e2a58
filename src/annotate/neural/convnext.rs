//! ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") as transformers' `ConvNextBackbone`: the feature
//! pyramid UperNet's segmentation head reads (`openmmlab/upernet-convnext-*`).
//!
//! A 4×4 stride-4 patch embedding, then stages at strides 4, 8, 16, 32 (each after the first opens with a
//! channels-first LayerNorm and a 2×2 stride-2 convolution). A block is a 7×7 depthwise convolution, LayerNorm
//! over the channels, an MLP (4× wide, GELU) and a learned per-channel layer scale, added to its input. Each
//! stage the head reads is normalised once more (`hidden_states_norms`). Depths and widths come from
//! `config.json`'s `backbone_config`; every tensor is checked against them as it loads.
use candle_core::Tensor;
use serde::Deserialize;

use super::nn::{Conv, LayerNorm, Linear};
use super::weights::StateDict;
use crate::Result;

/// Every LayerNorm of the backbone (transformers' `ConvNextLayerNorm` default; the config's `layer_norm_eps`
/// is only the classification model's final norm).
pub const LAYER_NORM_EPS: f32 = 1e-6;
/// The depthwise kernel of every block (7×7, padding 3).
const DEPTHWISE_PADDING: usize = 3;
/// Where the backbone's tensors are in an `UperNetForSemanticSegmentation` file.
const PREFIX: &str = "backbone";

/// `backbone_config` of `config.json` (transformers' `ConvNextConfig`, the fields inference reads).
#[derive(Deserialize, Debug, Clone)]
pub struct ConvNextConfig {
    /// Blocks per stage (`[3, 3, 27, 3]` for convnext-small).
    pub depths: Vec<usize>,
    /// Channels per stage (`[96, 192, 384, 768]` for convnext-small).
    pub hidden_sizes: Vec<usize>,
    /// The stages the head reads, by name (`stem`, `stage1`, …).
    #[serde(default = "all_stages")]
    pub out_features: Vec<String>,
    #[serde(default = "four")]
    pub patch_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn all_stages() -> Vec<String> {
    (1..=4).map(|i| format!("stage{i}")).collect()
}
fn four() -> usize {
    4
}
fn gelu() -> String {
    "gelu".into()
}

impl ConvNextConfig {
    /// `openmmlab/upernet-convnext-small`'s backbone.
    pub fn small() -> Self {
        Self {
            depths: vec![3, 3, 27, 3],
            hidden_sizes: vec![96, 192, 384, 768],
            out_features: all_stages(),
            patch_size: 4,
            hidden_act: gelu(),
        }
    }
}

/// `ConvNextLayerNorm(data_format="channels_first")`: LayerNorm over the channels of an NCHW tensor.
#[derive(Debug, Clone)]
pub struct ChannelsFirstNorm(pub LayerNorm);

impl ChannelsFirstNorm {
    fn load(sd: &StateDict, name: &str, channels: usize) -> Result<Self> {
        let norm = LayerNorm::load(sd, name, LAYER_NORM_EPS)?;
        check_len(sd, &format!("{name}.weight"), &norm.weight, channels)?;
        Ok(Self(norm))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.0.forward(&x.permute((0, 2, 3, 1))?)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// `ConvNextLayer`: one residual block.
#[derive(Debug, Clone)]
pub struct ConvNextLayer {
    pub dwconv: Conv,
    pub layernorm: LayerNorm,
    pub pwconv1: Linear,
    pub pwconv2: Linear,
    /// The learned per-channel scale of the block's output (absent when the model was built without one).
    pub layer_scale_parameter: Option<Tensor>,
}

impl ConvNextLayer {
    fn load(sd: &StateDict, name: &str, dim: usize) -> Result<Self> {
        let dwconv = Conv::load(sd, &format!("{name}.dwconv"), 1, DEPTHWISE_PADDING)?.with_groups(dim);
        if dwconv.weight.dims() != [dim, 1, 7, 7] {
            return Err(
                sd.error(format!("{name}.dwconv.weight: {:?}, expected [{dim}, 1, 7, 7]", dwconv.weight.dims()))
            );
        }
        let layernorm = LayerNorm::load(sd, &format!("{name}.layernorm"), LAYER_NORM_EPS)?;
        check_len(sd, &format!("{name}.layernorm.weight"), &layernorm.weight, dim)?;
        let pwconv1 = Linear::load(sd, &format!("{name}.pwconv1"))?;
        let pwconv2 = Linear::load(sd, &format!("{name}.pwconv2"))?;
        if pwconv1.weight.dim(1)? != dim || pwconv2.weight.dims() != [dim, pwconv1.weight.dim(0)?] {
            return Err(sd.error(format!(
                "{name}: pwconv1 {:?} and pwconv2 {:?} do not make a {dim}-channel MLP",
                pwconv1.weight.dims(),
                pwconv2.weight.dims()
            )));
        }
        let scale_name = format!("{name}.layer_scale_parameter");
        let layer_scale_parameter = if sd.has(&scale_name) {
            let s = sd.get_rank(&scale_name, 1)?;
            check_len(sd, &scale_name, &s, dim)?;
            Some(s)
        } else {
            None
        };
        Ok(Self { dwconv, layernorm, pwconv1, pwconv2, layer_scale_parameter })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1. mix space, per channel
        let h = self.dwconv.forward(x)?;
        // 2. mix channels, per pixel (channels last)
        let h = self.layernorm.forward(&h.permute((0, 2, 3, 1))?)?;
        let h = self.pwconv2.forward(&self.pwconv1.forward(&h)?.gelu_erf()?)?;
        // 3. layer scale, then back to channels first and onto the residual
        let h = match &self.layer_scale_parameter {
            Some(gamma) => h.broadcast_mul(gamma)?,
            None => h,
        };
        Ok((x + h.permute((0, 3, 1, 2))?)?.contiguous()?)
    }
}

/// `ConvNextStage`: the downsampling (all stages but the first) and the blocks.
#[derive(Debug, Clone)]
pub struct ConvNextStage {
    pub downsampling_layer: Option<(ChannelsFirstNorm, Conv)>,
    pub layers: Vec<ConvNextLayer>,
}

impl ConvNextStage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = match &self.downsampling_layer {
            Some((norm, conv)) => conv.forward(&norm.forward(x)?)?,
            None => x.clone(),
        };
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        Ok(h)
    }
}

/// `ConvNextBackbone`: embeddings, stages, and the norms of the stages it outputs.
#[derive(Debug, Clone)]
pub struct ConvNextBackbone {
    pub patch_embeddings: Conv,
    pub embeddings_layernorm: ChannelsFirstNorm,
    pub stages: Vec<ConvNextStage>,
    /// For each output, the index into `stage_names` (`0` is the stem) and its norm.
    pub hidden_states_norms: Vec<(usize, ChannelsFirstNorm)>,
}

impl ConvNextBackbone {
    /// The backbone of an UperNet file (`backbone.*`) with the shapes `config` names.
    pub fn load(sd: &StateDict, config: &ConvNextConfig) -> Result<Self> {
        let widths = &config.hidden_sizes;
        if config.depths.len() != widths.len() || widths.is_empty() {
            return Err(sd.error(format!(
                "config.json: backbone_config has {} depths for {} hidden_sizes",
                config.depths.len(),
                widths.len()
            )));
        }
        if config.hidden_act != "gelu" {
            return Err(sd.error(format!("config.json: hidden_act {:?}: only gelu is supported", config.hidden_act)));
        }
        let e = format!("{PREFIX}.embeddings");
        let patch_embeddings = Conv::load(sd, &format!("{e}.patch_embeddings"), config.patch_size, 0)?;
        if patch_embeddings.out_channels() != widths[0] || patch_embeddings.weight.dim(2)? != config.patch_size {
            return Err(sd.error(format!(
                "{e}.patch_embeddings.weight: {:?}, expected {} channels of {p}x{p} patches",
                patch_embeddings.weight.dims(),
                widths[0],
                p = config.patch_size
            )));
        }
        let embeddings_layernorm = ChannelsFirstNorm::load(sd, &format!("{e}.layernorm"), widths[0])?;
        let mut stages = Vec::with_capacity(widths.len());
        for (i, (&depth, &dim)) in config.depths.iter().zip(widths).enumerate() {
            let name = format!("{PREFIX}.encoder.stages.{i}");
            let prev = if i == 0 { widths[0] } else { widths[i - 1] };
            // transformers leaves the first stage without one (same width, stride 1)
            let downsampling_layer = if i > 0 || prev != dim {
                let norm = ChannelsFirstNorm::load(sd, &format!("{name}.downsampling_layer.0"), prev)?;
                let conv = Conv::load(sd, &format!("{name}.downsampling_layer.1"), 2, 0)?;
                if conv.weight.dims()[..2] != [dim, prev] {
                    return Err(sd.error(format!(
                        "{name}.downsampling_layer.1.weight: {:?}, expected [{dim}, {prev}, 2, 2]",
                        conv.weight.dims()
                    )));
                }
                Some((norm, conv))
            } else {
                None
            };
            let layers = (0..depth)
                .map(|j| ConvNextLayer::load(sd, &format!("{name}.layers.{j}"), dim))
                .collect::<Result<_>>()?;
            stages.push(ConvNextStage { downsampling_layer, layers });
        }
        let mut hidden_states_norms = Vec::with_capacity(config.out_features.len());
        for feature in &config.out_features {
            let index = stage_index(feature, widths.len())
                .ok_or_else(|| sd.error(format!("config.json: out_features names an unknown stage {feature:?}")))?;
            let channels = if index == 0 { widths[0] } else { widths[index - 1] };
            let norm = ChannelsFirstNorm::load(sd, &format!("{PREFIX}.hidden_states_norms.{feature}"), channels)?;
            hidden_states_norms.push((index, norm));
        }
        Ok(Self { patch_embeddings, embeddings_layernorm, stages, hidden_states_norms })
    }

    /// The normalised outputs of the configured stages for `x` (1, 3, H, W), finest first.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        // 1. patches
        let mut h = self.embeddings_layernorm.forward(&self.patch_embeddings.forward(x)?)?;
        // 2. stages, keeping every hidden state (the stem's first)
        let mut hidden_states = vec![h.clone()];
        for stage in &self.stages {
            h = stage.forward(&h)?;
            hidden_states.push(h.clone());
        }
        // 3. the outputs, each normalised
        self.hidden_states_norms.iter().map(|(i, norm)| norm.forward(&hidden_states[*i])).collect()
    }

    /// The channels of each output, finest first (the head's `in_channels`).
    pub fn channels(&self) -> Vec<usize> {
        self.hidden_states_norms.iter().map(|(_, n)| n.0.weight.dims()[0]).collect()
    }
}

/// `stem` → 0, `stageN` → N (1-based, up to `stages`).
fn stage_index(name: &str, stages: usize) -> Option<usize> {
    if name == "stem" {
        return Some(0);
    }
    let n: usize = name.strip_prefix("stage")?.parse().ok()?;
    (1..=stages).contains(&n).then_some(n)
}

fn check_len(sd: &StateDict, name: &str, t: &Tensor, expected: usize) -> Result<()> {
    if t.dims() != [expected] {
        return Err(sd.error(format!("{name}: {:?}, expected [{expected}]", t.dims())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_map_to_hidden_states() {
        assert_eq!(stage_index("stem", 4), Some(0));
        assert_eq!(stage_index("stage4", 4), Some(4));
        assert_eq!(stage_index("stage5", 4), None);
        assert_eq!(stage_index("res2", 4), None);
    }
}
