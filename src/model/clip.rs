//! CLIP text encoder as transformers' `CLIPTextModel`; its `last_hidden_state` is the text conditioning of the
//! UNet. Keys: `embeddings.{token,position}_embedding`, `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj,
//! layer_norm2, mlp.fc1, mlp.fc2}`, `final_layer_norm`, with or without a leading `text_model.`. With a
//! top-level `text_projection` it is `CLIPTextModelWithProjection` (SDXL's second encoder), whose projected
//! pooled output ([`ClipOutput::text_embeds`]) SDXL uses too.
use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::layers::{linear, small_param, softmax_last_dim, Activation, LayerNorm, Linear};
use crate::io::weights::{find_safetensors, read_json, var_builder, TRANSFORMERS_STEM};
use crate::Error;

/// Prefix of every key in SD checkpoints (and transformers < 5); transformers 5 saves without it.
const TEXT_MODEL_PREFIX: &str = "text_model";

/// `text_encoder/config.json`, with transformers' `CLIPTextConfig` defaults.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP, SD1) or `gelu` (OpenCLIP, SD2).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The token whose final state is the pooled output. 2 is transformers' legacy value (old configs, SDXL's):
    /// the pooled token is then the one with the highest id (CLIP's end-of-text).
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
    /// Width of `text_projection`'s output (`CLIPTextModelWithProjection`; default: `hidden_size`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

/// What [`ClipTextModel::encode`] gives.
pub struct ClipOutput {
    /// After the final layer norm (batch, seq, hidden_size): SD 1.x/2.x's conditioning.
    pub last_hidden_state: Tensor,
    /// The input of the last layer (transformers' `hidden_states[-2]`): SDXL's conditioning.
    pub penultimate: Tensor,
    /// `text_projection` of the end-of-text token's final state (batch, projection_dim), for a model with a
    /// projection.
    pub text_embeds: Option<Tensor>,
    /// transformers' `hidden_states`: the embeddings, then each layer's output (before the final layer norm);
    /// clip skip picks from the end of this.
    pub hidden_states: Vec<Tensor>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> Activation {
    Activation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> u32 {
    2
}

impl ClipTextConfig {
    /// Checks what the weights cannot: the heads must split the width evenly.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Multi-head self-attention with a causal mask (keys `q_proj`, `k_proj`, `v_proj`, `out_proj`).
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    /// 1/sqrt(head_dim).
    scale: f64,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, true, vb.pp("q_proj"))?,
            k_proj: linear(d, d, true, vb.pp("k_proj"))?,
            v_proj: linear(d, d, true, vb.pp("v_proj"))?,
            out_proj: linear(d, d, true, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            scale: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    /// (batch, seq, width) → (batch, heads, seq, head_dim)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        x.reshape((b, n, self.heads, d / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// `mask` is (seq, seq), added to the scores: 0 where a token may look, -inf at later tokens.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        // 1. project and split into heads
        let q = self.split_heads(&self.q_proj.forward(x)?)?;
        let k = self.split_heads(&self.k_proj.forward(x)?)?;
        let v = self.split_heads(&self.v_proj.forward(x)?)?;
        // 2. masked scaled dot products, softmax over the keys
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores, 1.0)?;
        // 3. weighted values, merge heads, output projection
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out_proj.forward(&out)
    }
}

/// `fc1` → activation → `fc2`.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, true, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, true, vb.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.apply(&self.fc1.forward(x)?)?)
    }
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?
    }
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    /// Learned absolute positions, (max_position_embeddings, hidden_size).
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection` only: (projection_dim, hidden_size), no bias.
    text_projection: Option<Linear>,
    config: ClipTextConfig,
    span: tracing::Span,
}

impl ClipTextModel {
    /// Builds the encoder from `vb`, whose keys may carry the `text_model.` prefix or not.
    pub fn new(cfg: ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(msg) = cfg.validate() {
            candle_core::bail!("text encoder config: {msg}");
        }
        let text_projection = match vb.contains_tensor("text_projection.weight") {
            true => {
                let projection_dim = cfg.projection_dim.unwrap_or(cfg.hidden_size);
                Some(linear(cfg.hidden_size, projection_dim, false, vb.pp("text_projection"))?)
            }
            false => None,
        };
        let prefixed = format!("{TEXT_MODEL_PREFIX}.embeddings.token_embedding.weight");
        let vb = if vb.contains_tensor(&prefixed) { vb.pp(TEXT_MODEL_PREFIX) } else { vb };
        let emb = vb.pp("embeddings");
        // Lookups, not products: in the activations' dtype (f32 when the weights are bf16 on the CPU).
        let tokens = emb.pp("token_embedding").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let token_embedding = candle_nn::Embedding::new(small_param(tokens, &vb)?, cfg.hidden_size);
        let position_embedding = small_param(
            emb.pp("position_embedding").get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?,
            &vb,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            text_projection,
            config: cfg,
            span: tracing::span!(tracing::Level::TRACE, "clip-text"),
        })
    }

    /// Loads a `text_encoder/` folder: `config.json` and `model.safetensors` (or its fp16 variant or shards),
    /// converted to `dtype`. Errors name the config file or the weights file and tensor.
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
        let cfg: ClipTextConfig = read_json(&config_path)?;
        cfg.validate().map_err(|msg| Error::config(&config_path, msg))?;
        let paths = find_safetensors(dir, TRANSFORMERS_STEM)?;
        let vb = wrap(var_builder(&paths, dtype, device)?);
        let origin = if paths.len() == 1 { paths[0].clone() } else { dir.to_path_buf() };
        Self::new(cfg, vb).map_err(|e| Error::weights(origin, format!("does not fit {}: {e}", config_path.display())))
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids` (batch, seq) of token ids (u32) → `last_hidden_state` (batch, seq, hidden_size).
    /// No padding mask: diffusers passes none for CLIP, so padding tokens are attended to (causally).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.encode(input_ids)?.last_hidden_state)
    }

    /// The final layer norm alone (A1111 applies it to an earlier layer's output under clip skip).
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// Rows of the token-embedding table: the first id a token added to the tokenizer gets.
    pub fn num_token_embeddings(&self) -> usize {
        self.token_embedding.embeddings().dim(0).unwrap_or(0)
    }

    /// The token-embedding width (`hidden_size`).
    pub fn embedding_width(&self) -> usize {
        self.config.hidden_size
    }

    /// This encoder with `rows` (n, hidden_size) appended to its token-embedding table, for ids
    /// `num_token_embeddings()..+n` (transformers' `resize_token_embeddings` followed by writing the rows, as
    /// diffusers' `load_textual_inversion` does). The other weights are shared, not copied.
    pub fn with_extra_tokens(&self, rows: &Tensor) -> Result<Self> {
        let table = self.token_embedding.embeddings();
        let rows = rows.to_dtype(table.dtype())?.to_device(table.device())?;
        let table = Tensor::cat(&[table, &rows], 0)?;
        let mut out = self.clone();
        out.token_embedding = Embedding::new(table, self.config.hidden_size);
        Ok(out)
    }

    /// Whether this is `CLIPTextModelWithProjection` (it has a `text_projection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// `input_ids` (batch, seq) → the final states, the last layer's input and (with a projection) the
    /// projected pooled output.
    pub fn encode(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        let _enter = self.span.enter();
        let (_b, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: sequence of {seq} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        // 1. token + position embeddings (positions 0..seq)
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut x = self.token_embedding.forward(input_ids)?.broadcast_add(&positions)?;
        // 2. causal transformer layers: each token sees itself and earlier tokens only
        let mask = causal_mask(seq, x.dtype(), x.device())?;
        let mut penultimate = x.clone();
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            penultimate = x;
            x = layer.forward(&penultimate, &mask)?;
            hidden_states.push(x.clone());
        }
        // 3. final layer norm
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        // 4. pooled: the end-of-text token's final state, projected
        let text_embeds = match &self.text_projection {
            Some(projection) => {
                let rows = input_ids
                    .to_vec2::<u32>()?
                    .iter()
                    .enumerate()
                    .map(|(b, ids)| {
                        let pos = pooled_position(ids, self.config.eos_token_id);
                        last_hidden_state.get(b)?.narrow(0, pos, 1)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(projection.forward(&Tensor::cat(&rows, 0)?)?)
            }
            None => None,
        };
        Ok(ClipOutput { last_hidden_state, penultimate, text_embeds, hidden_states })
    }
}

/// transformers' pooled-token rule: with the legacy `eos_token_id` 2, the first position of the highest id;
/// else the first position of `eos_token_id` (the last position when it is missing).
fn pooled_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&id| id == max).unwrap_or(0)
    } else {
        ids.iter().position(|&id| id == eos_token_id).unwrap_or(ids.len().saturating_sub(1))
    }
}

/// (seq, seq) additive mask: 0 on and below the diagonal, -inf above it.
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_close, repo_path as repo};

    /// Runs both id batches of a fixture through the model loaded from `model_dir`.
    fn check_fixture(model_dir: &str, fixture: &str) -> ClipTextModel {
        let dev = Device::Cpu;
        let model = ClipTextModel::load(&repo(model_dir), DType::F32, &dev).unwrap();
        let fx = candle_core::safetensors::load(repo(fixture), &dev).unwrap();
        for case in ["prompt", "random"] {
            let ids = fx[&format!("{case}_ids")].to_dtype(DType::U32).unwrap();
            let ours = model.forward(&ids).unwrap();
            assert_close(&ours, &fx[&format!("{case}_hidden")], &format!("{fixture} {case}"));
        }
        model
    }

    /// quick_gelu, keys without `text_model.` (what transformers 5 saves), f32 file.
    #[test]
    fn sd15_text_encoder_matches_transformers() {
        let model =
            check_fixture("tests/fixtures/models/tiny-sd15/text_encoder", "tests/fixtures/clip/sd15.safetensors");
        assert_eq!(model.config().hidden_act, Activation::QuickGelu);
    }

    /// gelu, keys with `text_model.` (real SD checkpoints), fp16 file loaded into f32.
    #[test]
    fn sd2_fp16_prefixed_text_encoder_matches_transformers() {
        let model = check_fixture("tests/fixtures/models/tiny-sd2/text_encoder", "tests/fixtures/clip/sd2.safetensors");
        assert_eq!(model.config().hidden_act, Activation::Gelu);
    }

    /// The causal mask matters: changing a later token must not change earlier outputs, and must change its own.
    #[test]
    fn earlier_tokens_do_not_see_later_ones() {
        let dev = Device::Cpu;
        let model =
            ClipTextModel::load(&repo("tests/fixtures/models/tiny-sd15/text_encoder"), DType::F32, &dev).unwrap();
        let a = Tensor::new(&[[49406u32, 320, 1125, 49407]], &dev).unwrap();
        let b = Tensor::new(&[[49406u32, 320, 4558, 49407]], &dev).unwrap();
        let (ha, hb) = (model.forward(&a).unwrap(), model.forward(&b).unwrap());
        let first = |h: &Tensor| h.narrow(1, 0, 2).unwrap();
        assert_close(&first(&ha), &first(&hb), "prefix");
        let d = (ha.narrow(1, 2, 1).unwrap() - hb.narrow(1, 2, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-3, "changed token left its output unchanged ({d})");
    }

    /// A config whose hidden_size disagrees with the weights fails, naming the weights file and the tensor.
    #[test]
    fn hidden_size_mismatch_names_file_and_tensor() {
        let src = repo("tests/fixtures/models/tiny-sd2/text_encoder");
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        cfg["hidden_size"] = 64.into();
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(src.join("model.fp16.safetensors"), tmp.path().join("model.fp16.safetensors")).unwrap();
        let err = ClipTextModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("model.fp16.safetensors"), "{err}");
        assert!(err.contains("text_model.embeddings.token_embedding.weight"), "{err}");
    }

    #[test]
    fn bad_activation_names_config_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), r#"{"hidden_size": 32, "hidden_act": "relu6"}"#).unwrap();
        let err = ClipTextModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("relu6"), "{err}");
    }

    #[test]
    fn too_long_sequence_is_an_error() {
        let dev = Device::Cpu;
        let model =
            ClipTextModel::load(&repo("tests/fixtures/models/tiny-sd15/text_encoder"), DType::F32, &dev).unwrap();
        let ids = Tensor::zeros((1, 78), DType::U32, &dev).unwrap();
        let err = model.forward(&ids).unwrap_err().to_string();
        assert!(err.contains("max_position_embeddings"), "{err}");
    }
}
