//! `UNet2DConditionModel` (SD1.x, SD2.x): the noise predictor.
//!
//! An encoder ([`UNetEncoder`]: `conv_in`, `time_embedding`, `down_blocks`, `mid_block`) and a decoder
//! (`up_blocks`, `conv_norm_out`, `conv_out`) joined by skip connections, into which a ControlNet adds its
//! residuals.
use std::path::Path;

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{conv2d, group_norm, Activation, Conv2d, GroupNorm};
use super::unet_blocks::{BlockKind, UpBlock2D};
use super::unet_encoder::{check_context, config_error, weights_origin, AddedConditions, ControlNetOutput};
pub use super::unet_encoder::{EncoderConfig, Level, PerBlock, UNetEncoder};
use crate::io::weights::{find_safetensors, read_json, var_builder, DIFFUSERS_STEM};
use crate::Error;

fn default_out_channels() -> usize {
    4
}
fn default_up_block_types() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn default_conv_out_kernel() -> usize {
    3
}

/// `unet/config.json`: the encoder fields plus the decoder's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(flatten)]
    pub encoder: EncoderConfig,
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Latent size the model was trained at (64 for SD1.5 = 512 px, 96 for SD2.1 = 768 px).
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "default_conv_out_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default, deserialize_with = "crate::model::unet_encoder::null_as_default")]
    pub center_input_sample: bool,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

impl UNet2DConditionConfig {
    /// Checks the whole config (encoder and decoder) and returns the decoder's block kinds, top level first.
    pub fn validate(&self) -> std::result::Result<Vec<BlockKind>, String> {
        let levels = self.encoder.levels()?;
        if self.up_block_types.len() != levels.len() {
            return Err(format!(
                "up_block_types has {} values but down_block_types has {}",
                self.up_block_types.len(),
                levels.len()
            ));
        }
        if self.center_input_sample || self.reverse_transformer_layers_per_block.is_some() {
            return Err("center_input_sample / reverse_transformer_layers_per_block are not supported".into());
        }
        if self.conv_out_kernel.is_multiple_of(2) {
            return Err(format!("conv_out_kernel must be odd, got {}", self.conv_out_kernel));
        }
        self.up_block_types
            .iter()
            .enumerate()
            .map(|(i, name)| {
                BlockKind::from_up_type(name).ok_or_else(|| {
                    format!("up_block_types[{i}] is {name:?}: only CrossAttnUpBlock2D and UpBlock2D are supported")
                })
            })
            .collect()
    }
}

/// Adds a ControlNet residual to a UNet activation (a new tensor; broadcast over H, W for pooled residuals).
pub(crate) fn add_residual(h: &Tensor, residual: &Tensor, what: &str) -> Result<Tensor> {
    let fits = h.rank() == residual.rank() && h.dims().iter().zip(residual.dims()).all(|(a, b)| a == b || *b == 1);
    if !fits {
        bail!(
            "{what}: ControlNet residual of shape {:?} does not fit the UNet activation of shape {:?}",
            residual.dims(),
            h.dims()
        )
    }
    h.broadcast_add(&residual.to_dtype(h.dtype())?)
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    /// `conv_in`, `time_embedding`, `down_blocks`, `mid_block`.
    encoder: UNetEncoder,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    config: UNet2DConditionConfig,
    device: Device,
    dtype: DType,
    span: tracing::Span,
}

impl UNet2DConditionModel {
    pub fn new(config: &UNet2DConditionConfig, vb: VarBuilder) -> Result<Self> {
        let up_kinds = config.validate().map_err(config_error)?;
        let enc = &config.encoder;
        let levels = enc.levels().map_err(config_error)?;
        let encoder = UNetEncoder::new(enc, vb.clone())?;
        // The decoder mirrors the encoder: level i of the up path is level n-1-i of the down path.
        let n = levels.len();
        let rev: Vec<Level> = levels.iter().rev().copied().collect();
        let vb_up = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_output = rev[0].channels;
        for (i, (level, kind)) in rev.iter().zip(&up_kinds).enumerate() {
            let is_last = i + 1 == n;
            let skip_in = rev[(i + 1).min(n - 1)].channels;
            // One more resnet than the down block: it also eats the downsampler's (or conv_in's) skip.
            let block = enc.block_config(level, level.layers + 1, *kind);
            up_blocks.push(UpBlock2D::new(&block, skip_in, prev_output, level.channels, !is_last, vb_up.pp(i))?);
            prev_output = level.channels;
        }
        let c0 = enc.block_out_channels[0];
        Ok(Self {
            encoder,
            up_blocks,
            conv_norm_out: group_norm(enc.norm_num_groups, c0, enc.norm_eps, vb.pp("conv_norm_out"))?,
            conv_act: enc.act_fn,
            conv_out: conv2d(
                c0,
                config.out_channels,
                config.conv_out_kernel,
                1,
                config.conv_out_kernel / 2,
                vb.pp("conv_out"),
            )?,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: super::layers::activation_dtype(&vb),
            span: tracing::span!(tracing::Level::TRACE, "unet"),
        })
    }

    /// Loads `dir/config.json` and the weights next to it (`diffusion_pytorch_model[.fp16].safetensors` or
    /// shards). Errors name the file or folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        Self::load_with(dir, dtype, device, &|vb| vb)
    }

    /// [`Self::load`] with the weights read through `wrap` (e.g. [`super::lora::LoraMerge::wrap`]).
    pub fn load_with(
        dir: &Path,
        dtype: DType,
        device: &Device,
        wrap: &dyn Fn(VarBuilder<'static>) -> VarBuilder<'static>,
    ) -> crate::Result<Self> {
        let config_path = dir.join("config.json");
        let config: UNet2DConditionConfig = read_json(&config_path)?;
        config.validate().map_err(|m| Error::config(&config_path, m))?;
        let files = find_safetensors(dir, DIFFUSERS_STEM)?;
        let vb = wrap(var_builder(&files, dtype, device)?);
        Self::new(&config, vb).map_err(|e| Error::weights(weights_origin(dir, &files), e))
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The device and dtype the weights were loaded to (the pipeline makes its tensors to match).
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the weights are kept in: bf16 with f32 activations on the CPU (`dtype` says f32 there).
    pub fn weights_dtype(&self) -> DType {
        self.conv_out.weight().dtype()
    }

    /// Predicts the noise (or v) of `sample` (batch, in_channels, h, w) at one `timestep` per sample (batch,)
    /// given the text embeddings (batch, tokens, cross_attention_dim). `residuals`: ControlNet outputs added to
    /// the skip connections and the mid block output.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        residuals: Option<&ControlNetOutput>,
    ) -> Result<Tensor> {
        self.forward_with(sample, timestep, encoder_hidden_states, None, residuals)
    }

    /// [`Self::forward`] with SDXL's extra conditioning (required by SDXL UNets, refused by the others).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        residuals: Option<&ControlNetOutput>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let ctx = encoder_hidden_states;
        check_context(sample, ctx, self.config.encoder.cross_attention_dim)?;
        // 1. time (and SDXL's pooled text + size/crop conditioning)
        let temb = self.encoder.embed_time(timestep, sample.dim(0)?, sample.dtype(), added)?;
        // 2. pre-process
        let h = self.encoder.conv_in(sample)?;
        // 3. down, then ControlNet residuals onto the skip connections
        let (h, mut skips) = self.encoder.down(&h, &temb, ctx)?;
        if let Some(res) = residuals {
            let n = res.down_block_res_samples.len();
            if n != skips.len() {
                bail!(
                    "the ControlNet gives {n} down-block residuals but the UNet has {} skip connections: \
                     they were built for different base models",
                    skips.len()
                )
            }
            skips = skips
                .iter()
                .zip(&res.down_block_res_samples)
                .enumerate()
                .map(|(i, (s, r))| add_residual(s, r, &format!("down-block residual {i}")))
                .collect::<Result<_>>()?;
        }
        // 4. mid, then the ControlNet's mid residual
        let mut h = self.encoder.mid(&h, &temb, ctx)?;
        if let Some(res) = residuals {
            h = add_residual(&h, &res.mid_block_res_sample, "mid-block residual")?;
        }
        // 5. up: each block eats its skip connections from the end; the next skip's size sets the upsampling
        for (i, block) in self.up_blocks.iter().enumerate() {
            let rest = skips.len() - block.num_inputs();
            let these = skips.split_off(rest);
            let size = match skips.last() {
                Some(next) if i + 1 < self.up_blocks.len() => Some((next.dim(2)?, next.dim(3)?)),
                _ => None,
            };
            h = block.forward(&h, &these, &temb, ctx, size)?;
        }
        // 6. post-process
        let h = self.conv_norm_out.forward_then(&h, self.conv_act)?;
        self.conv_out.forward(&h)
    }
}

/// Helpers shared by the UNet and ControlNet tests: committed fixtures, the parity metric, a weightless
/// `VarBuilder` that records what a model asks for.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::{Arc, Mutex};

    use candle_core::{DType, Device, Result, Shape, Tensor};
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::VarBuilder;

    pub use crate::test_support::{assert_close, repo_path};

    /// `tests/fixtures/unet/{name}.safetensors`, written by tools/fixtures/gen_unet.py.
    pub fn fixture(name: &str) -> HashMap<String, Tensor> {
        let path = repo_path(&format!("tests/fixtures/unet/{name}.safetensors"));
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
    }

    /// The condition image of the fixtures: stored as uint8, scaled to [0, 1] exactly as the generator did.
    pub fn condition_image() -> Tensor {
        let u8s = fixture("cond").remove("cond_u8").unwrap();
        (u8s.to_dtype(DType::F32).unwrap() / 255.0).unwrap()
    }

    /// A `VarBuilder` backend that hands out zero-stride zero tensors (no memory per tensor) and records each
    /// requested name and shape, so full-size models can be "built" to check their layout.
    #[derive(Clone, Default)]
    pub struct RecordingBackend {
        pub seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    }

    impl SimpleBackend for RecordingBackend {
        fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
            let previous = self.seen.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
            assert!(previous.is_none(), "{name} requested twice");
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            candle_core::bail!("unexpected unchecked get of {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    impl RecordingBackend {
        pub fn var_builder(&self) -> VarBuilder<'static> {
            VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
        }
        pub fn names_and_shapes(&self) -> BTreeMap<String, Vec<usize>> {
            self.seen.lock().unwrap().clone()
        }
    }

    /// `tests/fixtures/unet/layout_{name}.json`: the hub config and every tensor's shape of a full-size model.
    pub fn layout(name: &str) -> (serde_json::Value, BTreeMap<String, Vec<usize>>) {
        let path = repo_path(&format!("tests/fixtures/unet/layout_{name}.json"));
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let tensors = serde_json::from_value(v["tensors"].take()).unwrap();
        (v["config"].take(), tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn tiny_unet(name: &str) -> UNet2DConditionModel {
        let dir = repo_path(&format!("tests/fixtures/models/{name}/unet"));
        UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap()
    }

    fn residuals(fx: &std::collections::HashMap<String, Tensor>, prefix: &str) -> ControlNetOutput {
        let mut down = Vec::new();
        while let Some(t) = fx.get(&format!("{prefix}.down.{}", down.len())) {
            down.push(t.clone());
        }
        ControlNetOutput { down_block_res_samples: down, mid_block_res_sample: fx[&format!("{prefix}.mid")].clone() }
    }

    /// The UNet against diffusers on the tiny SD1.x model: without residuals, with one ControlNet's residuals,
    /// with two summed, with pooled (broadcast) residuals, and at an odd latent size (6x6). Residuals are
    /// diffusers' own, so this isolates the UNet.
    #[test]
    fn sd15_unet_matches_diffusers() {
        let unet = tiny_unet("tiny-sd15");
        let inp = fixture("inputs");
        let fx = fixture("sd15");
        let (x, t, ctx) = (&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"]);
        let out = unet.forward(x, t, ctx, None).unwrap();
        assert_close(&out, &fx["unet.plain"], "plain");
        let a = residuals(&fx, "a.scale1");
        assert_eq!(a.down_block_res_samples.len(), 6);
        let out = unet.forward(x, t, ctx, Some(&a)).unwrap();
        assert_close(&out, &fx["unet.with_a"], "with a");
        let ab = a.add(&residuals(&fx, "b.scale1")).unwrap();
        let out = unet.forward(x, t, ctx, Some(&ab)).unwrap();
        assert_close(&out, &fx["unet.with_ab"], "with a + b");
        let out = unet.forward(x, t, ctx, Some(&residuals(&fx, "a.pool"))).unwrap();
        assert_close(&out, &fx["unet.with_pool"], "with pooled residuals");
        let ctx1 = ctx.narrow(0, 0, 1).unwrap();
        let out = unet.forward(&inp["odd.sample"], &inp["odd.timesteps"], &ctx1, None).unwrap();
        assert_close(&out, &fx["unet.odd"], "odd 6x6 latent");
    }

    /// SD2.x: linear proj_in/out, per-block head counts, upcast_attention.
    #[test]
    fn sd2_unet_matches_diffusers() {
        let unet = tiny_unet("tiny-sd2");
        let inp = fixture("inputs");
        let fx = fixture("sd2");
        let (x, t, ctx) = (&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"]);
        assert_close(&unet.forward(x, t, ctx, None).unwrap(), &fx["unet.plain"], "plain");
        let c = residuals(&fx, "c.scale1");
        assert_close(&unet.forward(x, t, ctx, Some(&c)).unwrap(), &fx["unet.with_c"], "with c");
    }

    /// f16 weights on the CPU: the model computes in f32 (its dtype, and the output's), its linear layers and
    /// convolutions keep f16 weights and multiply in f32, and the result stays near diffusers' f32 one, closer
    /// than bf16 weights get (f16 keeps 11 significant bits: max diff <= 2e-3 * max(1, max |ref|)).
    #[test]
    fn sd2_unet_runs_with_f16_weights() {
        let dir = repo_path("tests/fixtures/models/tiny-sd2/unet");
        let unet = UNet2DConditionModel::load(&dir, DType::F16, &Device::Cpu).unwrap();
        assert_eq!((unet.dtype(), unet.weights_dtype()), (DType::F32, DType::F16));
        let inp = fixture("inputs");
        let fx = fixture("sd2");
        let c = residuals(&fx, "c.scale1");
        let out = unet.forward(&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"], Some(&c)).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let reference = &fx["unet.with_c"];
        let diff = crate::test_support::max_abs_diff(&out, reference);
        let tol = 2e-3 * crate::test_support::max_abs(reference).max(1.0);
        assert!(diff <= tol, "f16 weights vs f32 reference: {diff} > {tol}");
        // Not the f32 result: the weights were rounded.
        let f32_out = tiny_unet("tiny-sd2")
            .forward(&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"], Some(&c))
            .unwrap();
        assert!(crate::test_support::max_abs_diff(&out, &f32_out) > 0.0);
    }

    /// bf16 weights on the CPU: the model computes in f32 (its dtype, and the output's, is f32), its linear
    /// layers and convolutions keep bf16 weights, and the result stays near diffusers' f32 one (bf16 has 8
    /// significant bits: max diff <= 3e-2 * max(1, max |ref|)).
    #[test]
    fn sd15_unet_runs_with_bf16_weights() {
        let dir = repo_path("tests/fixtures/models/tiny-sd15/unet");
        let unet = UNet2DConditionModel::load(&dir, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(unet.dtype(), DType::F32);
        let inp = fixture("inputs");
        let fx = fixture("sd15");
        let a = residuals(&fx, "a.scale1");
        let out = unet.forward(&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"], Some(&a)).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let reference = &fx["unet.with_a"];
        let diff = crate::test_support::max_abs_diff(&out, reference);
        let tol = 3e-2 * crate::test_support::max_abs(reference).max(1.0);
        assert!(diff <= tol, "bf16 weights vs f32 reference: {diff} > {tol}");
        // Not the f32 result: the products did run in bf16.
        let f32_out = tiny_unet("tiny-sd15")
            .forward(&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"], Some(&a))
            .unwrap();
        assert!(crate::test_support::max_abs_diff(&out, &f32_out) > 0.0);
    }

    /// Building the full-size UNets from the hub configs asks for exactly the tensors (names and shapes) of
    /// the real checkpoints, nothing more or less.
    #[test]
    fn full_size_layouts_match_diffusers() {
        for (name, count) in [("sd15_unet", 859_520_964usize), ("sd21_unet", 865_910_724)] {
            let (config, expected) = layout(name);
            let config: UNet2DConditionConfig = serde_json::from_value(config).unwrap();
            let rec = RecordingBackend::default();
            UNet2DConditionModel::new(&config, rec.var_builder()).unwrap();
            let seen = rec.names_and_shapes();
            let params: usize = seen.values().map(|s| s.iter().product::<usize>()).sum();
            for (k, shape) in &expected {
                assert_eq!(seen.get(k), Some(shape), "{name}: {k}");
            }
            assert_eq!(seen, expected, "{name}: extra tensors requested");
            assert_eq!((seen.len(), params), (686, count), "{name}");
        }
    }

    #[test]
    fn residual_count_mismatch_is_a_clear_error() {
        let unet = tiny_unet("tiny-sd15");
        let inp = fixture("inputs");
        let fx = fixture("sd15");
        let mut a = residuals(&fx, "a.scale1");
        a.down_block_res_samples.pop();
        let err = unet
            .forward(&inp["sample"], &inp["timesteps"], &inp["encoder_hidden_states"], Some(&a))
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 down-block residuals") && err.contains("6 skip connections"), "{err}");
        // Text embeddings of the wrong width (an SD2 text encoder with an SD1 UNet).
        let ctx = Tensor::zeros((2, 77, 1024), DType::F32, &Device::Cpu).unwrap();
        let err = unet.forward(&inp["sample"], &inp["timesteps"], &ctx, None).unwrap_err().to_string();
        assert!(err.contains("[2, 77, 1024]") && err.contains("(2, tokens, 32)"), "{err}");
    }

    #[test]
    fn unsupported_configs_are_named() {
        let parse = |json: &str| serde_json::from_str::<UNet2DConditionConfig>(json).unwrap().validate();
        let sdxl = parse(r#"{"addition_embed_type": "text_time"}"#).unwrap_err();
        assert!(sdxl.contains("addition_time_embed_dim"), "{sdxl}");
        let other = parse(r#"{"addition_embed_type": "image"}"#).unwrap_err();
        assert!(other.contains("only \"text_time\""), "{other}");
        let block = parse(r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#)
            .unwrap_err();
        assert!(block.contains("down_block_types[0]") && block.contains("AttnDownBlock2D"), "{block}");
        let heads = parse(r#"{"attention_head_dim": [5, 10]}"#).unwrap_err();
        assert!(heads.contains("attention_head_dim has 2 values"), "{heads}");
        let only = parse(r#"{"only_cross_attention": true}"#).unwrap_err();
        assert!(only.contains("only_cross_attention"), "{only}");
        // diffusers' defaults give SD1.x's layout apart from the cross-attention width.
        assert_eq!(
            parse("{}").unwrap(),
            vec![BlockKind::Plain, BlockKind::CrossAttn, BlockKind::CrossAttn, BlockKind::CrossAttn]
        );
    }

    #[test]
    fn config_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"addition_embed_type": "text_time"}"#).unwrap();
        let err = UNet2DConditionModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("addition_time_embed_dim"), "{err}");
    }
}
