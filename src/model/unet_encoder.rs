//! The encoder half of the UNet: `conv_in`, the timestep embedding, the down blocks and the mid block.
//!
//! A ControlNet IS a trainable copy of this encoder, so the UNet and the ControlNet build it with the same code
//! ([`UNetEncoder`]) from the same config fields ([`EncoderConfig`], flattened into both configs). Its weights
//! sit at the top level of both checkpoints (`conv_in.*`, `time_embedding.*`, `down_blocks.*`, `mid_block.*`).
use std::path::{Path, PathBuf};

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{conv2d, Activation, Conv2d};
use super::unet_blocks::{BlockConfig, BlockKind, DownBlock2D, UNetMidBlock2DCrossAttn};

/// A config value given once for all blocks or as one value per block (`attention_head_dim: 8` or `[5, 10, 20,
/// 20]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value of each of `n` blocks; a list of another length is an error naming `field`.
    pub fn expand(&self, n: usize, field: &str) -> std::result::Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(vs) if vs.len() == n => Ok(vs.clone()),
            PerBlock::Each(vs) => Err(format!("{field} has {} values but there are {n} down blocks", vs.len())),
        }
    }
}

// diffusers' defaults (UNet2DConditionModel.__init__ / ControlNetModel.__init__ agree on all of these).
fn default_in_channels() -> usize {
    4
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down_block_types() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some(MID_BLOCK_TYPE.to_string())
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_cross_attention_dim() -> usize {
    1280
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_only_cross_attention() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
/// diffusers writes `null` for some flags it treats as off (SDXL base's `"upcast_attention": null`): read a
/// `null` as the field's default.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_scale_factor() -> f64 {
    1.0
}
fn default_act_fn() -> Activation {
    Activation::Silu
}
fn default_time_embedding_type() -> String {
    "positional".to_string()
}
fn default_resnet_time_scale_shift() -> String {
    "default".to_string()
}
fn default_attention_type() -> String {
    "default".to_string()
}
fn default_kernel() -> usize {
    3
}

/// SD's mid block: resnet, transformer, resnet.
const MID_BLOCK_TYPE: &str = "UNetMidBlock2DCrossAttn";
/// One resnet and no attention (diffusers' `UNetMidBlock2D` with `num_layers=0, add_attention=False`, as its
/// ControlNet and UNet build it): the mid block of the small SDXL ControlNets.
const PLAIN_MID_BLOCK_TYPE: &str = "UNetMidBlock2D";
/// The time embedding is this many times wider than the first block (`time_embed_dim` in diffusers).
const TIME_EMBED_MULT: usize = 4;
/// SDXL's micro-conditioning numbers per image: original height and width, crop top and left, target height
/// and width (`add_time_ids`).
pub const TIME_IDS: usize = 6;

/// SDXL's extra conditioning (diffusers' `added_cond_kwargs`), one row per sample: `text_embeds` (batch,
/// pooled text width) from the second text encoder's projection, `time_ids` (batch, 6).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// The config fields that shape the encoder half, shared by `unet/config.json` and a ControlNet's
/// `config.json` (both parse them with diffusers' defaults).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct EncoderConfig {
    /// Latent channels (4).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Width of each resolution level.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// Resnets per down block (the up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Width of the text embeddings (768 for SD1.x, 1024 for SD2.x).
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: usize,
    /// Despite its name, diffusers uses this as the NUMBER of heads per block when `num_attention_heads` is null
    /// (a naming slip kept for checkpoint compatibility): SD1.x has 8 heads everywhere, SD2.x [5, 10, 20, 20].
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// The number of heads, when given (overrides `attention_head_dim`).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// SD2.x: transformers project in and out with linear layers instead of 1x1 convolutions.
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_linear_projection: bool,
    /// Attention scores in f32 under half precision (SD2.1).
    #[serde(default, deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    #[serde(default = "default_only_cross_attention")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "default_scale_factor")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_act_fn")]
    pub act_fn: Activation,
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    // Features SD1.x/SD2.x do not use; parsed so that a checkpoint using them fails with a clear message.
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `"text_time"`: SDXL's conditioning on the pooled text embedding and the image's size and crop
    /// ([`AddedConditions`]), through `add_time_proj` (sinusoids of `addition_time_embed_dim` per number) and
    /// `add_embedding` (an MLP from `projection_class_embeddings_input_dim` to the time embedding's width).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub dual_cross_attention: bool,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
}

/// One resolution level of the encoder with the per-block config values resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub kind: BlockKind,
    pub channels: usize,
    /// Resnets in the down block.
    pub layers: usize,
    pub heads: usize,
    pub transformer_layers: usize,
}

impl EncoderConfig {
    /// Checks the config describes an SD1.x/SD2.x encoder and resolves its levels. The message names the field.
    pub fn levels(&self) -> std::result::Result<Vec<Level>, String> {
        self.check_supported()?;
        let n = self.down_block_types.len();
        if n == 0 || self.block_out_channels.len() != n {
            return Err(format!(
                "block_out_channels has {} values but down_block_types has {n}",
                self.block_out_channels.len()
            ));
        }
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let transformer_layers = self.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        if self.only_cross_attention.expand(n, "only_cross_attention")?.contains(&true) {
            return Err("only_cross_attention = true is not supported".into());
        }
        (0..n)
            .map(|i| {
                let name = &self.down_block_types[i];
                let kind = BlockKind::from_down_type(name).ok_or_else(|| {
                    format!(
                        "down_block_types[{i}] is {name:?}: only CrossAttnDownBlock2D and DownBlock2D are supported"
                    )
                })?;
                if heads[i] == 0 || layers[i] == 0 {
                    return Err(format!("block {i} has zero heads or layers"));
                }
                Ok(Level {
                    kind,
                    channels: self.block_out_channels[i],
                    layers: layers[i],
                    heads: heads[i],
                    transformer_layers: transformer_layers[i],
                })
            })
            .collect()
    }

    fn check_supported(&self) -> std::result::Result<(), String> {
        if self.text_time_dims()?.is_none() && self.addition_embed_type.is_some() {
            return Err(format!(
                "addition_embed_type is {:?}; only \"text_time\" (SDXL) is supported",
                self.addition_embed_type.as_deref().unwrap_or_default()
            ));
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_some()),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, used)| *used) {
            return Err(format!("{field} is set, which SD1.x/SD2.x models do not use and is not supported"));
        }
        let expect = [
            ("time_embedding_type", self.time_embedding_type.as_str(), "positional"),
            ("resnet_time_scale_shift", &self.resnet_time_scale_shift, "default"),
            ("attention_type", &self.attention_type, "default"),
        ];
        for (field, found, supported) in expect {
            if found != supported {
                return Err(format!("{field} is {found:?}; only {supported:?} is supported"));
            }
        }
        let mid = self.mid_block_type.as_deref().unwrap_or("null");
        if mid != MID_BLOCK_TYPE && mid != PLAIN_MID_BLOCK_TYPE {
            return Err(format!(
                "mid_block_type is {mid:?}; only {MID_BLOCK_TYPE:?} and {PLAIN_MID_BLOCK_TYPE:?} are supported"
            ));
        }
        if self.conv_in_kernel.is_multiple_of(2) {
            return Err(format!("conv_in_kernel must be odd, got {}", self.conv_in_kernel));
        }
        Ok(())
    }

    /// The width of each skip connection the encoder hands on, in order: `conv_in`'s, each resnet's, each
    /// downsampler's (every level but the last). A ControlNet has one zero convolution per entry.
    pub fn skip_channels(&self) -> std::result::Result<Vec<usize>, String> {
        let levels = self.levels()?;
        let mut widths = vec![self.block_out_channels[0]];
        for (i, level) in levels.iter().enumerate() {
            let n = level.layers + usize::from(i + 1 < levels.len());
            widths.extend(std::iter::repeat_n(level.channels, n));
        }
        Ok(widths)
    }

    /// SDXL's `text_time` conditioning: (sinusoid width per number, MLP input width), or `None` for a model
    /// without it (SD1.x/2.x).
    pub fn text_time_dims(&self) -> std::result::Result<Option<(usize, usize)>, String> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(None);
        }
        match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
            (Some(t), Some(p)) if t > 0 && p > TIME_IDS * t => Ok(Some((t, p))),
            (t, p) => Err(format!(
                "addition_embed_type \"text_time\" needs addition_time_embed_dim and a larger \
                 projection_class_embeddings_input_dim (pooled text width + {TIME_IDS} × the time width); got {t:?} \
                 and {p:?}"
            )),
        }
    }

    /// Width of the pooled text embedding an SDXL model takes (`text_embeds`).
    pub fn pooled_text_dim(&self) -> Option<usize> {
        self.text_time_dims().ok().flatten().map(|(t, p)| p - TIME_IDS * t)
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * TIME_EMBED_MULT
    }

    /// The settings one block of `level` shares, with `num_layers` resnets.
    pub(crate) fn block_config(&self, level: &Level, num_layers: usize, kind: BlockKind) -> BlockConfig {
        BlockConfig {
            kind,
            num_layers,
            temb_channels: self.time_embed_dim(),
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            heads: level.heads,
            transformer_layers: level.transformer_layers,
            cross_attention_dim: self.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// A config problem found by `new`, which returns candle errors; `load` checks first and names the file.
pub(crate) fn config_error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("invalid config: {msg}"))
}

/// The encoder half: `conv_in`, `time_proj`/`time_embedding`, `down_blocks`, `mid_block` (top-level keys of both
/// the UNet and the ControlNet checkpoints).
#[derive(Debug, Clone)]
pub struct UNetEncoder {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// SDXL: `add_time_proj` (no weights) and `add_embedding`.
    add_embedding: Option<(Timesteps, TimestepEmbedding)>,
    down_blocks: Vec<DownBlock2D>,
    mid_block: UNetMidBlock2DCrossAttn,
}

impl UNetEncoder {
    /// Reads the encoder's weights from the model's root `vb`.
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.levels().map_err(config_error)?;
        let c0 = cfg.block_out_channels[0];
        let temb = cfg.time_embed_dim();
        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(levels.len());
        let mut in_channels = c0;
        for (i, level) in levels.iter().enumerate() {
            let is_last = i + 1 == levels.len();
            let block = cfg.block_config(level, level.layers, level.kind);
            let padding = (!is_last).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock2D::new(&block, in_channels, level.channels, padding, vb_down.pp(i))?);
            in_channels = level.channels;
        }
        let last = levels[levels.len() - 1];
        // SD's mid block: one transformer between two resnets; the plain one is a single resnet.
        let plain_mid = cfg.mid_block_type.as_deref() == Some(PLAIN_MID_BLOCK_TYPE);
        let mid = cfg.block_config(&last, usize::from(!plain_mid), BlockKind::CrossAttn);
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, c0, cfg.conv_in_kernel, 1, cfg.conv_in_kernel / 2, vb.pp("conv_in"))?,
            time_proj: Timesteps::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift),
            time_embedding: TimestepEmbedding::new(c0, temb, cfg.act_fn, vb.pp("time_embedding"))?,
            add_embedding: match cfg.text_time_dims().map_err(config_error)? {
                Some((time_dim, input_dim)) => Some((
                    Timesteps::new(time_dim, cfg.flip_sin_to_cos, cfg.freq_shift),
                    TimestepEmbedding::new(input_dim, temb, cfg.act_fn, vb.pp("add_embedding"))?,
                )),
                None => None,
            },
            down_blocks,
            mid_block: UNetMidBlock2DCrossAttn::new(
                &mid,
                last.channels,
                cfg.mid_block_scale_factor,
                vb.pp("mid_block"),
            )?,
        })
    }

    /// The time embedding of one timestep per sample: `timestep` holds `batch` values (or one for all, or a
    /// scalar). Sinusoids are computed in f32, then the MLP runs in `dtype`. An SDXL encoder adds the
    /// embedding of `added` (which it requires; other encoders refuse it).
    pub fn embed_time(
        &self,
        timestep: &Tensor,
        batch: usize,
        dtype: DType,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        self.embed_time_plus(timestep, batch, dtype, None, added)
    }

    /// [`Self::embed_time`] with `extra` (batch, time_embed_dim) added to the timestep's embedding before SDXL's
    /// (a union net's control-type embedding, in diffusers' order of sums).
    pub fn embed_time_plus(
        &self,
        timestep: &Tensor,
        batch: usize,
        dtype: DType,
        extra: Option<&Tensor>,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let t = timestep.to_dtype(DType::F32)?.flatten_all()?;
        let t = match t.dim(0)? {
            n if n == batch => t,
            1 => t.broadcast_as(batch)?.contiguous()?,
            n => bail!("timestep has {n} values for a batch of {batch}: give one per sample or one for all"),
        };
        let sinusoids = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&sinusoids)?;
        let temb = match extra {
            Some(extra) => (temb + extra)?,
            None => temb,
        };
        match (&self.add_embedding, added) {
            (None, None) => Ok(temb),
            (Some((time_proj, embedding)), Some(added)) => {
                // 1. sinusoids of each of the 6 numbers, flattened per sample; 2. after the pooled text; 3. MLP.
                let ids = added.time_ids.to_dtype(DType::F32)?;
                let (b, k) = ids.dims2()?;
                if b != batch || k != TIME_IDS {
                    bail!("time_ids has shape {:?}; expected ({batch}, {TIME_IDS})", ids.dims());
                }
                let time_embeds = time_proj.forward(&ids.flatten_all()?)?.reshape((batch, ()))?;
                let text = added.text_embeds.to_dtype(DType::F32)?;
                if text.dims2()?.0 != batch {
                    bail!("text_embeds has shape {:?} for a batch of {batch}", text.dims());
                }
                let add = Tensor::cat(&[&text, &time_embeds], 1)?.to_dtype(dtype)?;
                temb + embedding.forward(&add)?
            }
            (Some(_), None) => {
                bail!("this is an SDXL model: it needs the pooled text embedding and the size/crop time ids")
            }
            (None, Some(_)) => {
                bail!("pooled text embeddings and time ids were given to a model that has no use for them")
            }
        }
    }

    pub fn conv_in(&self, sample: &Tensor) -> Result<Tensor> {
        self.conv_in.forward(sample)
    }

    /// Number of skip connections: `conv_in`'s output, then each down block's.
    pub fn num_skips(&self) -> usize {
        1 + self.down_blocks.iter().map(DownBlock2D::num_outputs).sum::<usize>()
    }

    /// Runs the down blocks on `conv_in`'s output `h`. Returns the lowest-resolution map and the skip
    /// connections, `h` itself first.
    pub fn down(&self, h: &Tensor, temb: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = vec![h.clone()];
        let mut h = h.clone();
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, temb, context)?;
            skips.extend(block_skips);
            h = out;
        }
        Ok((h, skips))
    }

    pub fn mid(&self, h: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.mid_block.forward(h, temb, context)
    }
}

/// Where a model's weights came from, for error messages: the file, or the folder of a sharded checkpoint.
pub(crate) fn weights_origin(dir: &Path, files: &[PathBuf]) -> PathBuf {
    match files {
        [one] => one.clone(),
        _ => dir.to_path_buf(),
    }
}

/// Checks the text embeddings fit the sample's batch and the model's cross-attention width (a clear message
/// instead of a matmul shape error deep inside a transformer).
pub(crate) fn check_context(sample: &Tensor, context: &Tensor, cross_attention_dim: usize) -> Result<()> {
    let (b, _, _, _) = sample.dims4()?;
    match context.dims() {
        &[cb, _, d] if cb == b && d == cross_attention_dim => Ok(()),
        dims => bail!(
            "encoder_hidden_states has shape {dims:?}; expected ({b}, tokens, {cross_attention_dim}) for a \
             sample of shape {:?}",
            sample.dims()
        ),
    }
}

/// The residuals a ControlNet adds to the UNet: one per skip connection of this encoder (in the order its down
/// path produces them) and one for the mid block output. Defined beside the encoder both networks share, so the
/// UNet (which adds them) and the ControlNet (which makes them) need not import each other.
#[derive(Debug, Clone)]
pub struct ControlNetOutput {
    pub down_block_res_samples: Vec<Tensor>,
    pub mid_block_res_sample: Tensor,
}

impl ControlNetOutput {
    /// The same output with zero down-block residuals: only the middle block conditions the UNet (the
    /// original repo's `only_mid_control`).
    pub fn mid_only(self) -> candle_core::Result<Self> {
        let down = self.down_block_res_samples.iter().map(|r| r.zeros_like()).collect::<Result<_>>()?;
        Ok(Self { down_block_res_samples: down, mid_block_res_sample: self.mid_block_res_sample })
    }

    /// The sum of two ControlNets' residuals (how several ControlNets condition one UNet), as new tensors.
    pub fn add(&self, other: &ControlNetOutput) -> crate::Result<Self> {
        let (a, b) = (&self.down_block_res_samples, &other.down_block_res_samples);
        if a.len() != b.len() {
            return Err(crate::Error::Invalid(format!(
                "cannot sum ControlNet outputs with {} and {} down-block residuals: the ControlNets have \
                 different layouts",
                a.len(),
                b.len()
            )));
        }
        let down = a.iter().zip(b).map(|(x, y)| x.broadcast_add(y)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            down_block_res_samples: down,
            mid_block_res_sample: self.mid_block_res_sample.broadcast_add(&other.mid_block_res_sample)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The small SDXL ControlNets' plain mid block is read; a mid block we cannot build is refused by name.
    #[test]
    fn mid_block_types() {
        let cfg = |mid: &str| -> EncoderConfig {
            serde_json::from_value(serde_json::json!({"mid_block_type": mid})).unwrap()
        };
        assert!(cfg("UNetMidBlock2D").levels().is_ok());
        assert!(cfg("UNetMidBlock2DCrossAttn").levels().is_ok());
        let err = cfg("UNetMidBlock2DSimpleCrossAttn").levels().unwrap_err();
        assert!(err.contains("mid_block_type is \"UNetMidBlock2DSimpleCrossAttn\""), "{err}");
    }

    /// SDXL base's unet/config.json says `"upcast_attention": null`: off, as diffusers reads it; a wrong type
    /// is still refused.
    #[test]
    fn null_flags_are_off() {
        let cfg = |v: serde_json::Value| serde_json::from_value::<EncoderConfig>(v);
        let c = cfg(serde_json::json!({"upcast_attention": null, "use_linear_projection": null})).unwrap();
        assert!(!c.upcast_attention && !c.use_linear_projection);
        assert!(cfg(serde_json::json!({"upcast_attention": true})).unwrap().upcast_attention);
        assert!(cfg(serde_json::json!({"upcast_attention": "yes"})).is_err());
    }
}
