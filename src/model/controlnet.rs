//! `ControlNetModel` (Zhang et al. 2023): a trainable copy of the UNet's encoder that reads a condition image
//! (edges, pose, depth…) and returns one residual per UNet skip connection plus one for the mid block. The
//! residuals leave through zero convolutions, so an untrained ControlNet leaves the locked UNet unchanged.
//!
//! Keys: the UNet encoder's (`conv_in`, `time_embedding`, `down_blocks`, `mid_block`), plus
//! `controlnet_cond_embedding` (the hint encoder), `controlnet_down_blocks.{i}` and `controlnet_mid_block`.
use std::path::{Path, PathBuf};

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::controlnet_union::{UnionCondition, UnionConfig, UnionHint, UnionParts};
use super::layers::{conv2d, Conv2d};
use super::unet::UNet2DConditionConfig;
use super::unet_encoder::{check_context, config_error, weights_origin, EncoderConfig, UNetEncoder};
pub use super::unet_encoder::{AddedConditions, ControlNetOutput};
use crate::io::weights::{find_safetensors, read_json, var_builder, DIFFUSERS_STEM};
use crate::Error;

fn default_conditioning_channels() -> usize {
    3
}
fn default_conditioning_embedding_out_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

/// Channel order the ControlNet was trained on; `Bgr` models get their condition's channels reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

/// A diffusers ControlNet folder's `config.json`: the UNet encoder's fields plus the hint encoder's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub encoder: EncoderConfig,
    /// Channels of the condition image.
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: usize,
    /// Widths of the hint encoder's stages (each stage after the first halves the resolution).
    #[serde(default = "default_conditioning_embedding_out_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Shuffle-style ControlNets: residuals are averaged over H and W (a global, position-free hint).
    #[serde(default, deserialize_with = "crate::model::unet_encoder::null_as_default")]
    pub global_pool_conditions: bool,
    #[serde(default)]
    pub controlnet_conditioning_channel_order: ChannelOrder,
    /// A union net's (`ControlNetUnionModel`) extra fields; `None` for a plain ControlNet.
    #[serde(flatten)]
    pub union: Option<UnionConfig>,
}

/// The hint encoder: 3x3 convolutions with SiLU, stride 2 between stages (8x down for 4 stages), then a zero
/// convolution to the UNet's first width. Keys: `conv_in`, `blocks.{i}`, `conv_out`.
#[derive(Debug, Clone)]
pub struct ControlNetConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    pub fn new(in_channels: usize, widths: &[usize], out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let (Some(&first), Some(&last)) = (widths.first(), widths.last()) else {
            bail!("conditioning_embedding_out_channels is empty")
        };
        let vb_blocks = vb.pp("blocks");
        let mut blocks = Vec::with_capacity(2 * (widths.len() - 1));
        for (i, pair) in widths.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(conv2d(c_in, c_in, 3, 1, 1, vb_blocks.pp(2 * i))?);
            blocks.push(conv2d(c_in, c_out, 3, 2, 1, vb_blocks.pp(2 * i + 1))?);
        }
        Ok(Self {
            conv_in: conv2d(in_channels, first, 3, 1, 1, vb.pp("conv_in"))?,
            blocks,
            conv_out: conv2d(last, out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for ControlNetConditioningEmbedding {
    fn forward(&self, cond: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(cond)?.silu()?;
        for block in &self.blocks {
            h = block.forward(&h)?.silu()?;
        }
        self.conv_out.forward(&h)
    }
}

/// Guess mode's per-residual weights: `10^(-1 + k/n)` for the `n` down residuals (k = 0..n-1) and the mid
/// residual (k = n, weight 1), i.e. diffusers' `logspace(-1, 0, n + 1)`. The original code writes
/// `0.825 ** (12 - k)` for SD's 13 residuals: 0.825 ≈ 10^(-1/12).
pub fn guess_mode_scales(n_down: usize) -> Vec<f64> {
    (0..=n_down).map(|k| 10f64.powf(-1.0 + k as f64 / n_down as f64)).collect()
}

/// What a call adds to the latent after `conv_in`: a plain net's hint embedding, or a union net's conditions.
#[derive(Clone, Copy)]
enum Hint<'a> {
    Plain(&'a Tensor),
    Union(&'a [UnionCondition<'a>]),
}

#[derive(Debug, Clone)]
pub struct ControlNetModel {
    /// `conv_in`, `time_embedding`, `down_blocks`, `mid_block`: the UNet encoder's code and keys.
    encoder: UNetEncoder,
    controlnet_cond_embedding: ControlNetConditioningEmbedding,
    /// Zero convolutions, one per skip connection.
    controlnet_down_blocks: Vec<Conv2d>,
    /// Zero convolution on the mid block output.
    controlnet_mid_block: Conv2d,
    /// A union net's control-type machinery (`task_embedding`, `transformer_layes`, ...).
    union: Option<UnionParts>,
    config: ControlNetConfig,
    /// The folder it was loaded from, for error messages.
    source: Option<PathBuf>,
    span: tracing::Span,
}

impl ControlNetModel {
    pub fn new(config: &ControlNetConfig, vb: VarBuilder) -> Result<Self> {
        let enc = &config.encoder;
        // The encoder validates the config first.
        let encoder = UNetEncoder::new(enc, vb.clone())?;
        let (c0, c_mid) = (enc.block_out_channels[0], enc.block_out_channels[enc.block_out_channels.len() - 1]);
        let controlnet_cond_embedding = ControlNetConditioningEmbedding::new(
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            c0,
            vb.pp("controlnet_cond_embedding"),
        )?;
        // One 1x1 zero convolution per skip connection, at that skip's width.
        let widths = enc.skip_channels().map_err(config_error)?;
        let vb_zero = vb.pp("controlnet_down_blocks");
        let controlnet_down_blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(c, c, 1, 1, 0, vb_zero.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        if controlnet_down_blocks.len() != encoder.num_skips() {
            bail!("internal: zero convolutions do not match the encoder's skip connections")
        }
        let union = match &config.union {
            None => None,
            Some(u) => {
                let Some((time_dim, _)) = enc.text_time_dims().map_err(config_error)? else {
                    bail!("a union net needs SDXL's addition_time_embed_dim in its config")
                };
                let temb = enc.time_embed_dim();
                Some(UnionParts::new(u, time_dim, temb, enc.flip_sin_to_cos, enc.freq_shift, enc.act_fn, vb.clone())?)
            }
        };
        Ok(Self {
            encoder,
            controlnet_cond_embedding,
            controlnet_down_blocks,
            union,
            controlnet_mid_block: conv2d(c_mid, c_mid, 1, 1, 0, vb.pp("controlnet_mid_block"))?,
            config: config.clone(),
            source: None,
            span: tracing::span!(tracing::Level::TRACE, "controlnet"),
        })
    }

    /// Loads a diffusers ControlNet folder: `config.json` + `diffusion_pytorch_model[.fp16].safetensors`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config_path = path.join("config.json");
        let config: ControlNetConfig = read_json(&config_path)?;
        config.encoder.levels().map_err(|m| Error::config(&config_path, m))?;
        let files = find_safetensors(path, DIFFUSERS_STEM)?;
        let vb = var_builder(&files, dtype, device)?;
        let mut model = Self::new(&config, vb).map_err(|e| Error::weights(weights_origin(path, &files), e))?;
        model.source = Some(path.to_path_buf());
        Ok(model)
    }

    /// Builds from tensors already named the diffusers way and a diffusers `config.json` value (what
    /// `io::single_file` makes of original checkpoints); `origin` is named in errors.
    pub fn from_tensors(
        config: serde_json::Value,
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        origin: &Path,
    ) -> crate::Result<Self> {
        let config: ControlNetConfig = serde_json::from_value(config).map_err(|e| Error::config(origin, e))?;
        Self::from_config_and_tensors(&config, tensors, dtype, device, origin)
    }

    /// [`Self::from_tensors`] with the config already made (a control-LoRA's is the base UNet's).
    pub fn from_config_and_tensors(
        config: &ControlNetConfig,
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        origin: &Path,
    ) -> crate::Result<Self> {
        config.encoder.levels().map_err(|m| Error::config(origin, m))?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let mut model = Self::new(config, vb).map_err(|e| Error::weights(origin, e))?;
        model.source = Some(origin.to_path_buf());
        Ok(model)
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The folder or file it was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The hint embedding of a (batch, C, H, W) condition in [0,1]: computed once per image, reused every step.
    /// H and W are 8x the latent's.
    pub fn embed_condition(&self, cond: &Tensor) -> Result<Tensor> {
        let cond = match self.config.controlnet_conditioning_channel_order {
            ChannelOrder::Rgb => cond.clone(),
            ChannelOrder::Bgr => {
                let c = cond.dim(1)?;
                let reversed: Vec<u32> = (0..c as u32).rev().collect();
                cond.index_select(&Tensor::new(reversed, cond.device())?, 1)?
            }
        };
        // The activations' dtype (a bf16-weight model on the CPU computes in f32; its biases say so).
        let mid = &self.controlnet_mid_block;
        let dtype = mid.bias().unwrap_or(mid.weight()).dtype();
        self.controlnet_cond_embedding.forward(&cond.to_dtype(dtype)?)
    }

    /// The residuals for one denoising step. `cond_embedding` comes from [`Self::embed_condition`].
    /// `guess_mode` weights shallow residuals down (0.1 for the first, rising to 1 for the mid block) so the
    /// ControlNet can steer without a prompt.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        cond_embedding: &Tensor,
        conditioning_scale: f64,
        guess_mode: bool,
    ) -> Result<ControlNetOutput> {
        self.forward_with(sample, timestep, encoder_hidden_states, None, cond_embedding, conditioning_scale, guess_mode)
    }

    /// [`Self::forward`] with SDXL's extra conditioning (required by SDXL ControlNets, refused by the others).
    /// The arguments are diffusers' `ControlNetModel.forward`'s.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        cond_embedding: &Tensor,
        conditioning_scale: f64,
        guess_mode: bool,
    ) -> Result<ControlNetOutput> {
        let (ctx, scale) = (encoder_hidden_states, conditioning_scale);
        self.forward_inner(sample, timestep, ctx, added, Hint::Plain(cond_embedding), scale, guess_mode)
    }

    /// A union net's condition of type `control_type` (see `model::controlnet_union`), from its hint
    /// embedding; `None` for a plain ControlNet.
    pub fn union_hint(&self, cond_embedding: &Tensor, control_type: usize) -> Result<Option<UnionHint>> {
        self.union.as_ref().map(|u| u.hint(cond_embedding, control_type)).transpose()
    }

    /// How many control types this net knows; `None` for a plain ControlNet.
    pub fn num_control_type(&self) -> Option<usize> {
        self.union.as_ref().map(UnionParts::num_control_type)
    }

    /// A union net's residuals for one call with one or several conditions (diffusers'
    /// `ControlNetUnionModel.forward`: one condition as alone or inside `MultiControlNetUnionModel`, its scale on
    /// the residuals; several as its list form, each scale on its condition's token and hint). Guess mode is not
    /// offered: diffusers' union pipeline cannot run it either.
    pub fn forward_union(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        conditions: &[UnionCondition],
    ) -> Result<ControlNetOutput> {
        let scale = match conditions {
            [one] => one.scale,
            [] => bail!("a union net call needs at least one condition"),
            _ => 1.0,
        };
        let ctx = encoder_hidden_states;
        self.forward_inner(sample, timestep, ctx, added, Hint::Union(conditions), scale, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        hint: Hint,
        conditioning_scale: f64,
        guess_mode: bool,
    ) -> Result<ControlNetOutput> {
        let _enter = self.span.enter();
        let ctx = encoder_hidden_states;
        check_context(sample, ctx, self.config.encoder.cross_attention_dim)?;
        let (batch, dtype) = (sample.dim(0)?, sample.dtype());
        let union = match (&self.union, hint) {
            (Some(parts), Hint::Union(conditions)) => Some((parts, conditions)),
            (None, Hint::Plain(_)) => None,
            (Some(_), Hint::Plain(_)) => {
                bail!("this is a union net: it needs the condition's control type (see `union_hint`)")
            }
            (None, Hint::Union(_)) => bail!("union conditions go with a union net only"),
        };
        // 1. time (a union net adds its control types' embedding; SDXL its pooled text + size/crop conditioning)
        let type_emb = union.map(|(parts, conditions)| parts.time_embedding(conditions, batch, dtype)).transpose()?;
        let temb = self.encoder.embed_time_plus(timestep, batch, dtype, type_emb.as_ref(), added)?;
        // 2. pre-process: the hint joins the latent right after conv_in (one hint may serve the whole batch)
        let h = self.encoder.conv_in(sample)?;
        let embeddings: Vec<&Tensor> = match hint {
            Hint::Plain(e) => vec![e],
            Hint::Union(conditions) => conditions.iter().map(|c| c.cond_embedding).collect(),
        };
        for e in embeddings {
            let (e, hd) = (e.dims(), h.dims());
            if e.len() != 4 || e[1..] != hd[1..] || (e[0] != hd[0] && e[0] != 1) {
                bail!(
                    "condition embedding has shape {e:?} but the latent after conv_in has {hd:?}: the condition \
                     image must be 8x the latent size, with one image per sample or one for all"
                )
            }
        }
        let h = match (union, hint) {
            // a union net first offsets each hint by what its transformer reads from the hints and the latent
            (Some((parts, conditions)), _) => parts.fuse(&h, conditions)?,
            (None, Hint::Plain(e)) => h.broadcast_add(&e.to_dtype(sample.dtype())?)?,
            (None, Hint::Union(_)) => bail!("union conditions go with a union net only"),
        };
        // 3. down, 4. mid: the UNet's encoder
        let (h, skips) = self.encoder.down(&h, &temb, ctx)?;
        let h = self.encoder.mid(&h, &temb, ctx)?;
        // 5. zero convolutions: exactly zero at initialisation, so a fresh ControlNet does not disturb the
        //    locked UNet and training starts from the base model's behaviour
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, zero_conv)| zero_conv.forward(s))
            .collect::<Result<Vec<_>>>()?;
        let mid = self.controlnet_mid_block.forward(&h)?;
        // 6. strength: uniform, or guess mode's ramp (not for pooled ControlNets)
        let scales = if guess_mode && !self.config.global_pool_conditions {
            guess_mode_scales(down.len()).into_iter().map(|s| s * conditioning_scale).collect()
        } else {
            vec![conditioning_scale; down.len() + 1]
        };
        let scale = |t: &Tensor, s: f64| if s == 1.0 { Ok(t.clone()) } else { t * s };
        let mut down = down.iter().zip(&scales).map(|(t, &s)| scale(t, s)).collect::<Result<Vec<_>>>()?;
        let mut mid = scale(&mid, scales[scales.len() - 1])?;
        // 7. global pooling: one value per channel
        if self.config.global_pool_conditions {
            down = down.iter().map(|t| t.mean_keepdim((2, 3))).collect::<Result<_>>()?;
            mid = mid.mean_keepdim((2, 3))?;
        }
        Ok(ControlNetOutput { down_block_res_samples: down, mid_block_res_sample: mid })
    }

    /// Checks this ControlNet fits a base UNet: same latent channels, level widths, resnets per level and
    /// text-embedding width. The error names the dimension and both values.
    pub fn check_compatible(&self, unet: &UNet2DConditionConfig) -> crate::Result<()> {
        let (cn, base) = (&self.config.encoder, &unet.encoder);
        let n = base.down_block_types.len();
        let lists = |c: &EncoderConfig| {
            c.layers_per_block.expand(c.down_block_types.len(), "layers_per_block").unwrap_or_default()
        };
        let err = |msg: String| match &self.source {
            Some(path) => Error::config(path, msg),
            None => Error::Invalid(msg),
        };
        // SDXL vs SD 1.x/2.x first: the plainest way to say the two do not go together.
        let family = |c: &EncoderConfig| if c.pooled_text_dim().is_some() { "SDXL" } else { "SD 1.x/2.x" };
        if family(cn) != family(base) {
            return Err(err(format!(
                "this ControlNet is for {} base models but the model is {}: use a ControlNet made for {}",
                family(cn),
                family(base),
                family(base)
            )));
        }
        let checks: [(&str, String, String); 5] = [
            ("in_channels", cn.in_channels.to_string(), base.in_channels.to_string()),
            ("number of down blocks", cn.down_block_types.len().to_string(), n.to_string()),
            ("block_out_channels", format!("{:?}", cn.block_out_channels), format!("{:?}", base.block_out_channels)),
            ("layers_per_block", format!("{:?}", lists(cn)), format!("{:?}", lists(base))),
            ("cross_attention_dim", cn.cross_attention_dim.to_string(), base.cross_attention_dim.to_string()),
        ];
        for (field, ours, theirs) in checks {
            if ours != theirs {
                let msg = format!(
                    "this ControlNet does not fit the base UNet: {field} is {ours} in the ControlNet but {theirs} \
                     in the UNet (they were made for different Stable Diffusion versions)"
                );
                return Err(err(msg));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::unet::test_support::*;

    fn tiny(name: &str) -> ControlNetModel {
        let dir = repo_path(&format!("tests/fixtures/models/{name}"));
        ControlNetModel::load(&dir, DType::F32, &Device::Cpu).unwrap()
    }

    fn check(out: &ControlNetOutput, fx: &HashMap<String, Tensor>, prefix: &str) {
        let n = out.down_block_res_samples.len();
        assert!(!fx.contains_key(&format!("{prefix}.down.{n}")), "{prefix}: too few residuals");
        for (i, r) in out.down_block_res_samples.iter().enumerate() {
            assert_close(r, &fx[&format!("{prefix}.down.{i}")], &format!("{prefix}.down.{i}"));
        }
        assert_close(&out.mid_block_res_sample, &fx[&format!("{prefix}.mid")], &format!("{prefix}.mid"));
    }

    /// Hint embedding and residuals against diffusers (ControlNets a and b on tiny SD1.x): scale 1.0, scale 0.7,
    /// guess mode at 0.8, and a's weights with global_pool_conditions (guess mode at 0.9, which pooling
    /// turns into a uniform scale).
    #[test]
    fn sd15_controlnets_match_diffusers() {
        let inp = fixture("inputs");
        let fx = fixture("sd15");
        let cond = condition_image();
        let (x, t, ctx) = (&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"]);
        for name in ["a", "b"] {
            let cn = tiny(&format!("tiny-controlnet-{name}"));
            let hint = cn.embed_condition(&cond).unwrap();
            assert_close(&hint, &fx[&format!("{name}.hint")], "hint");
            check(&cn.forward(x, t, ctx, &hint, 1.0, false).unwrap(), &fx, &format!("{name}.scale1"));
            if name == "a" {
                check(&cn.forward(x, t, ctx, &hint, 0.7, false).unwrap(), &fx, "a.scale0.7");
                check(&cn.forward(x, t, ctx, &hint, 0.8, true).unwrap(), &fx, "a.guess0.8");
                let mut pooled = cn.clone();
                pooled.config.global_pool_conditions = true;
                check(&pooled.forward(x, t, ctx, &hint, 0.9, true).unwrap(), &fx, "a.pool");
            }
        }
    }

    #[test]
    fn sd2_controlnet_matches_diffusers() {
        let inp = fixture("inputs");
        let fx = fixture("sd2");
        let (x, t, ctx) = (&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"]);
        let cn = tiny("tiny-controlnet-sd2");
        let hint = cn.embed_condition(&condition_image()).unwrap();
        assert_close(&hint, &fx["c.hint"], "hint");
        check(&cn.forward(x, t, ctx, &hint, 1.0, false).unwrap(), &fx, "c.scale1");
        check(&cn.forward(x, t, ctx, &hint, 0.8, true).unwrap(), &fx, "c.guess0.8");
    }

    #[test]
    fn guess_mode_scales_are_the_original_ramp() {
        let s = guess_mode_scales(12);
        assert_eq!(s.len(), 13);
        assert!((s[0] - 0.1).abs() < 1e-12 && (s[12] - 1.0).abs() < 1e-12);
        for (i, v) in s.iter().enumerate() {
            // lllyasviel/ControlNet: 0.825 ** (12 - i), rounded there to 3 digits.
            assert!((v - 0.825f64.powi(12 - i as i32)).abs() < 0.01, "{i}");
        }
    }

    #[test]
    fn bgr_models_reverse_the_condition_channels() {
        let mut cn = tiny("tiny-controlnet-a");
        let cond = condition_image();
        let rgb = cn.embed_condition(&cond).unwrap();
        cn.config.controlnet_conditioning_channel_order = ChannelOrder::Bgr;
        let flipped = cond.index_select(&Tensor::new(&[2u32, 1, 0], &Device::Cpu).unwrap(), 1).unwrap();
        assert_close(&cn.embed_condition(&flipped).unwrap(), &rgb, "bgr of flipped = rgb");
    }

    #[test]
    fn full_size_layouts_match_diffusers() {
        for (name, count) in [("sd15_controlnet", 361_279_120usize), ("sd21_controlnet", 364_228_240)] {
            let (config, expected) = layout(name);
            let config: ControlNetConfig = serde_json::from_value(config).unwrap();
            let rec = RecordingBackend::default();
            ControlNetModel::new(&config, rec.var_builder()).unwrap();
            let seen = rec.names_and_shapes();
            let params: usize = seen.values().map(|s| s.iter().product::<usize>()).sum();
            for (k, shape) in &expected {
                assert_eq!(seen.get(k), Some(shape), "{name}: {k}");
            }
            assert_eq!(seen, expected, "{name}: extra tensors requested");
            assert_eq!((seen.len(), params), (340, count), "{name}");
        }
    }

    #[test]
    fn incompatible_cross_attention_dim_is_named() {
        let dir = repo_path("tests/fixtures/models/tiny-controlnet-a");
        let mut config: ControlNetConfig = read_json(&dir.join("config.json")).unwrap();
        config.encoder.cross_attention_dim = 1024;
        let rec = RecordingBackend::default();
        let cn = ControlNetModel::new(&config, rec.var_builder()).unwrap();
        let unet: UNet2DConditionConfig =
            read_json(&repo_path("tests/fixtures/models/tiny-sd15/unet/config.json")).unwrap();
        let err = cn.check_compatible(&unet).unwrap_err().to_string();
        assert!(err.contains("cross_attention_dim is 1024 in the ControlNet but 32 in the UNet"), "{err}");
        tiny("tiny-controlnet-a").check_compatible(&unet).unwrap();
        // A loaded model names its folder.
        let mut sd2 = tiny("tiny-controlnet-sd2");
        sd2.config.encoder.block_out_channels = vec![32, 64, 64];
        let err = sd2.check_compatible(&unet).unwrap_err().to_string();
        assert!(err.contains("tiny-controlnet-sd2") && err.contains("block_out_channels is [32, 64, 64]"), "{err}");
    }

    #[test]
    fn missing_tensor_names_tensor_and_file() {
        let src = repo_path("tests/fixtures/models/tiny-controlnet-a");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let mut tensors =
            candle_core::safetensors::load(src.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
        let victim = "controlnet_down_blocks.3.weight";
        assert!(tensors.remove(victim).is_some());
        let file = dir.path().join("diffusion_pytorch_model.safetensors");
        candle_core::safetensors::save(&tensors, &file).unwrap();
        let err = ControlNetModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(victim) && err.contains(&file.display().to_string()), "{err}");
    }

    /// Training will backpropagate through the whole ControlNet: every weight must receive a gradient.
    #[test]
    fn every_weight_gets_a_gradient() {
        let dir = repo_path("tests/fixtures/models/tiny-controlnet-a");
        let config: ControlNetConfig = read_json(&dir.join("config.json")).unwrap();
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let cn = ControlNetModel::new(&config, vb).unwrap();
        let inp = fixture("inputs");
        let cond = condition_image();
        let hint = cn.embed_condition(&cond).unwrap();
        let out =
            cn.forward(&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"], &hint, 1.0, false).unwrap();
        let mut loss = out.mid_block_res_sample.sqr().unwrap().sum_all().unwrap();
        for r in &out.down_block_res_samples {
            loss = (loss + r.sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let data = map.data().lock().unwrap();
        let in_file =
            candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(data.len(), in_file.len(), "trainable tensors vs checkpoint tensors");
        for (name, var) in data.iter() {
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient for {name}");
        }
    }

    #[test]
    fn summing_outputs_of_different_layouts_fails() {
        let t = Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let a = ControlNetOutput { down_block_res_samples: vec![t.clone(); 3], mid_block_res_sample: t.clone() };
        let b = ControlNetOutput { down_block_res_samples: vec![t.clone(); 2], mid_block_res_sample: t };
        let err = a.add(&b).unwrap_err().to_string();
        assert!(err.contains("3 and 2"), "{err}");
        assert_eq!(a.add(&a).unwrap().down_block_res_samples.len(), 3);
    }
}
