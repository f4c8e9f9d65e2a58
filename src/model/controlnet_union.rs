//! The parts a ControlNet union net adds to a ControlNet (xinsir's `controlnet-union-sdxl-1.0`, diffusers'
//! `ControlNetUnionModel`): one net for several condition types, told which by a control type.
//!
//! - The control type, as a one-hot vector, is embedded like SDXL's size numbers (sinusoids of each 0/1 value,
//!   then an MLP) and added to the time embedding.
//! - The condition's hint embedding no longer joins the latent as it is: its spatial mean plus the type's learned
//!   `task_embedding` is one token, the latent's spatial mean another; a small transformer mixes them and its output
//!   for the condition token becomes a per-channel offset added to the hint before it joins the latent.
//!
//! Keys (beside the ControlNet's): `task_embedding`, `transformer_layes.{i}.{ln_1,attn,ln_2,mlp}` (upstream's
//! spelling), `spatial_ch_projs`, `control_add_embedding.linear_{1,2}`.
//!
//! A call takes one condition (as diffusers runs a union net alone or inside `MultiControlNetUnionModel`, one call
//! per unit: the conditioning scale then multiplies the residuals only) or several (diffusers' single-net list
//! form, xinsir's multi-condition use: each condition's scale weighs its token and hint, the residuals are not
//! scaled again).
use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{linear, softmax_last_dim, Activation, LayerNorm, Linear};

/// `nn.LayerNorm`'s default epsilon, which the union net's transformer uses.
const LAYER_NORM_EPS: f64 = 1e-5;

/// The union fields of a `ControlNetUnionModel` `config.json` (diffusers' defaults where absent).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct UnionConfig {
    /// How many condition types the net knows (6 for xinsir's first net, 8 for ProMax).
    pub num_control_type: usize,
    #[serde(default = "default_width")]
    pub num_trans_channel: usize,
    #[serde(default = "default_heads")]
    pub num_trans_head: usize,
    #[serde(default = "default_layers")]
    pub num_trans_layer: usize,
    #[serde(default = "default_width")]
    pub num_proj_channel: usize,
}

fn default_width() -> usize {
    320
}
fn default_heads() -> usize {
    8
}
fn default_layers() -> usize {
    1
}

/// xinsir's control types (ProMax numbering; the first net knows 0-5): each name with the annotators whose maps it
/// reads.
pub const CONTROL_TYPES: [(&str, &[&str]); 8] = [
    ("openpose", &["pose"]),
    ("depth", &["depth-anything", "midas", "zoe"]),
    ("softedge", &["hed", "pidinet", "scribble", "ted"]),
    ("canny", &["lineart", "lineart-anime", "lineart-standard", "mlsd"]),
    ("normal", &[]),
    ("segment", &["seg"]),
    ("tile", &["blur"]),
    ("repaint", &["inpaint"]),
];

/// A control type by name (any listed alias) or index.
pub fn parse_control_type(s: &str) -> std::result::Result<usize, String> {
    if let Ok(i) = s.parse::<usize>() {
        return Ok(i);
    }
    let s = s.to_ascii_lowercase();
    CONTROL_TYPES.iter().position(|(name, aliases)| *name == s || aliases.contains(&s.as_str())).ok_or_else(|| {
        let names: Vec<_> = CONTROL_TYPES.iter().map(|(n, _)| *n).collect();
        format!("unknown control type {s:?}: expected one of {} or an index", names.join(", "))
    })
}

/// The control type of the maps an annotator kind makes (`canny`, `depth-midas`, `openpose-full`, ...): its name
/// or alias, else its family (the part before the first `-`). `None` for kinds no type reads (shuffle, colour).
pub fn control_type_for_annotator(kind: &str) -> Option<usize> {
    if kind.parse::<usize>().is_ok() {
        return None; // an index, not an annotator
    }
    let family = kind.split('-').next().unwrap_or(kind);
    parse_control_type(kind).or_else(|_| parse_control_type(family)).ok()
}

/// One pre-norm transformer layer over (sequence, batch, width) tokens: `x + attn(ln_1 x)`, then
/// `x + mlp(ln_2 x)` with a QuickGELU MLP of 4x width (CLIP's block; torch's `nn.MultiheadAttention` keys).
#[derive(Debug, Clone)]
struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    /// `attn.in_proj_weight` / `in_proj_bias`: q, k and v stacked.
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: usize,
}

impl ResidualAttentionBlock {
    fn new(width: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        if heads == 0 || !width.is_multiple_of(heads) {
            bail!("num_trans_channel {width} is not a multiple of num_trans_head {heads}")
        }
        let attn = vb.pp("attn");
        Ok(Self {
            ln_1: LayerNorm::new(width, LAYER_NORM_EPS, vb.pp("ln_1"))?,
            in_proj_weight: attn.get((3 * width, width), "in_proj_weight")?,
            in_proj_bias: attn.get(3 * width, "in_proj_bias")?,
            out_proj: linear(width, width, true, attn.pp("out_proj"))?,
            ln_2: LayerNorm::new(width, LAYER_NORM_EPS, vb.pp("ln_2"))?,
            c_fc: linear(width, 4 * width, true, vb.pp("mlp").pp("c_fc"))?,
            c_proj: linear(4 * width, width, true, vb.pp("mlp").pp("c_proj"))?,
            heads,
        })
    }

    /// Multi-head self-attention along dim 0 of `x` (sequence, batch, width), as `nn.MultiheadAttention`
    /// without `batch_first`.
    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (len, batch, width) = x.dims3()?;
        let head_dim = width / self.heads;
        // 1. q, k, v = x Wᵀ + b, split; to (batch·heads, sequence, head_dim)
        let qkv = x.broadcast_matmul(&self.in_proj_weight.t()?)?.broadcast_add(&self.in_proj_bias)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * width, width)?.reshape((len, batch * self.heads, head_dim))?.transpose(0, 1)?.contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        // 2. softmax(q kᵀ / √d) v
        let probs = softmax_last_dim(&q.matmul(&k.t()?)?, 1.0 / (head_dim as f64).sqrt())?;
        let out = probs.matmul(&v)?.transpose(0, 1)?.reshape((len, batch, width))?;
        // 3. output projection
        self.out_proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.ln_1.forward(x)?)?)?;
        let h = Activation::QuickGelu.apply(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        &x + self.c_proj.forward(&h)?
    }
}

/// What one condition of a given type brings, computed once per generation.
#[derive(Debug, Clone)]
pub struct UnionHint {
    /// The condition token: the hint's spatial mean plus the type's task embedding, (hint batch, width).
    token: Tensor,
    /// Its control type (an index into [`CONTROL_TYPES`]).
    control_type: usize,
}

/// One condition of a union-net call: its hint embedding, its [`UnionHint`] and its strength.
#[derive(Debug, Clone, Copy)]
pub struct UnionCondition<'a> {
    /// The condition's hint embedding (`controlnet_cond_embedding`'s output), one per sample or one for all.
    pub cond_embedding: &'a Tensor,
    pub hint: &'a UnionHint,
    /// `controlnet_conditioning_scale` of this condition.
    pub scale: f64,
}

#[derive(Debug, Clone)]
pub struct UnionParts {
    /// One learned token offset per control type: (num_control_type, num_trans_channel).
    task_embedding: Tensor,
    /// Upstream spells it `transformer_layes`.
    transformer_layes: Vec<ResidualAttentionBlock>,
    spatial_ch_projs: Linear,
    /// Sinusoids of each 0/1 entry of the multi-hot control type (no weights).
    control_type_proj: Timesteps,
    control_add_embedding: TimestepEmbedding,
    num_control_type: usize,
}

impl UnionParts {
    /// `time_dim`: the config's `addition_time_embed_dim`; `temb`: the time embedding's width.
    pub fn new(
        cfg: &UnionConfig,
        time_dim: usize,
        temb: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let width = cfg.num_trans_channel;
        let layers = (0..cfg.num_trans_layer)
            .map(|i| ResidualAttentionBlock::new(width, cfg.num_trans_head, vb.pp("transformer_layes").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            task_embedding: vb.get((cfg.num_control_type, width), "task_embedding")?,
            transformer_layes: layers,
            spatial_ch_projs: linear(width, cfg.num_proj_channel, true, vb.pp("spatial_ch_projs"))?,
            control_type_proj: Timesteps::new(time_dim, flip_sin_to_cos, freq_shift),
            control_add_embedding: TimestepEmbedding::new(
                time_dim * cfg.num_control_type,
                temb,
                act,
                vb.pp("control_add_embedding"),
            )?,
            num_control_type: cfg.num_control_type,
        })
    }

    pub fn num_control_type(&self) -> usize {
        self.num_control_type
    }

    /// The per-generation part of a condition of type `control_type` whose hint embedding is `hint`.
    pub fn hint(&self, hint: &Tensor, control_type: usize) -> Result<UnionHint> {
        if control_type >= self.num_control_type {
            bail!("control type {control_type} is out of range: this union net knows {} types", self.num_control_type)
        }
        // the condition token: spatial mean + the type's task embedding
        let task = self.task_embedding.get(control_type)?.to_dtype(hint.dtype())?.unsqueeze(0)?;
        let token = hint.mean((2, 3))?.broadcast_add(&task)?;
        Ok(UnionHint { token, control_type })
    }

    /// The embedding of the call's control types, added to the time embedding: the multi-hot vector of the
    /// types present (one 1 per type, however many conditions share it), each entry's sinusoids flattened and
    /// put through the MLP; (batch, time_embed_dim).
    pub fn time_embedding(&self, conditions: &[UnionCondition], batch: usize, dtype: DType) -> Result<Tensor> {
        let Some(first) = conditions.first() else { bail!("a union net call needs at least one condition") };
        let multi_hot: Vec<f32> = (0..self.num_control_type)
            .map(|i| f32::from(u8::from(conditions.iter().any(|c| c.hint.control_type == i))))
            .collect();
        let multi_hot = Tensor::new(multi_hot, first.hint.token.device())?;
        let sinusoids = self.control_type_proj.forward(&multi_hot)?.reshape((1, ()))?.to_dtype(dtype)?;
        let time = self.control_add_embedding.forward(&sinusoids)?;
        time.broadcast_as((batch, time.dim(1)?))?.contiguous()
    }

    /// The conditions fused with the latent `h` (after `conv_in`): `h + Σ (hint + offset)`, each offset the
    /// transformer's output for that condition's token, projected per channel. One condition enters at full
    /// strength (its scale then multiplies the residuals, diffusers' single-condition path); several enter
    /// scaled, tokens and hints alike (diffusers' list form, whose residuals are not scaled again).
    pub fn fuse(&self, h: &Tensor, conditions: &[UnionCondition]) -> Result<Tensor> {
        let (batch, dtype) = (h.dim(0)?, h.dtype());
        // One condition enters at full strength, several each at its own scale.
        let joint = conditions.len() > 1;
        let scaled = |t: Tensor, c: &UnionCondition| if joint && c.scale != 1.0 { t * c.scale } else { Ok(t) };
        // 1. one token per condition, then the latent's spatial mean → (batch, n + 1, width)
        let mut tokens = conditions
            .iter()
            .map(|c| {
                let width = c.hint.token.dim(1)?;
                scaled(c.hint.token.to_dtype(dtype)?.broadcast_as((batch, width))?, c)
            })
            .collect::<Result<Vec<_>>>()?;
        tokens.push(h.mean((2, 3))?);
        let mut x = Tensor::stack(&tokens, 1)?;
        // 2. the transformer (its attention runs along dim 0, the batch: upstream feeds (batch, tokens, width)
        //    to a sequence-first nn.MultiheadAttention)
        for layer in &self.transformer_layes {
            x = layer.forward(&x)?;
        }
        // 3. per condition: hint + per-channel offset from its token, both at the condition's strength; the sum
        //    joins the latent
        //    (summed first, then added: diffusers' order of sums)
        let mut fused: Option<Tensor> = None;
        for (i, c) in conditions.iter().enumerate() {
            let alpha = self.spatial_ch_projs.forward(&x.get_on_dim(1, i)?.contiguous()?)?;
            let alpha = scaled(alpha.unsqueeze(D::Minus1)?.unsqueeze(3)?, c)?;
            let hint = scaled(c.cond_embedding.to_dtype(dtype)?.broadcast_as(h.dims())?.contiguous()?, c)?;
            let term = hint.broadcast_add(&alpha)?;
            fused = Some(match fused {
                Some(sum) => (sum + term)?,
                None => term,
            });
        }
        match fused {
            Some(fused) => h + fused,
            None => bail!("a union net call needs at least one condition"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotator_kinds_name_their_control_type() {
        let name = |kind: &str| control_type_for_annotator(kind).map(|i| CONTROL_TYPES[i].0);
        assert_eq!(name("canny"), Some("canny"));
        assert_eq!(name("lineart-anime"), Some("canny"));
        assert_eq!(name("depth-midas"), Some("depth"));
        assert_eq!(name("depth-anything"), Some("depth"));
        assert_eq!(name("normal-bae"), Some("normal"));
        assert_eq!(name("openpose-full"), Some("openpose"));
        assert_eq!(name("hed"), Some("softedge"));
        assert_eq!(name("seg"), Some("segment"));
        assert_eq!(name("blur"), Some("tile"));
        assert_eq!(name("inpaint"), Some("repaint"));
        assert_eq!(name("shuffle"), None);
        assert_eq!(name("3"), None);
    }

    #[test]
    fn control_types_by_name_alias_and_index() {
        assert_eq!(parse_control_type("openpose"), Ok(0));
        assert_eq!(parse_control_type("Depth"), Ok(1));
        assert_eq!(parse_control_type("hed"), Ok(2));
        assert_eq!(parse_control_type("mlsd"), Ok(3));
        assert_eq!(parse_control_type("repaint"), Ok(7));
        assert_eq!(parse_control_type("5"), Ok(5));
        let err = parse_control_type("colour").unwrap_err();
        assert!(err.contains("openpose, depth, softedge"), "{err}");
    }
}
