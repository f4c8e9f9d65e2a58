//! The VAE as diffusers' `AutoencoderKL`: images ⇄ latents (8x smaller for SD). Keys: `encoder`, `quant_conv`,
//! `post_quant_conv`, `decoder` (blocks in [`super::vae_blocks`]). Also the image conversions of diffusers'
//! `VaeImageProcessor` around it.
use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{conv2d, Activation, Conv2d};
use super::vae_blocks::{Decoder, Encoder, VaeBlockConfig};
use crate::io::weights::{find_safetensors, read_json, var_builder, DIFFUSERS_STEM};
use crate::Error;

/// The only down block an `AutoencoderKL` has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum VaeDownBlockType {
    DownEncoderBlock2D,
}

/// The only up block an `AutoencoderKL` has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum VaeUpBlockType {
    UpDecoderBlock2D,
}

/// `vae/config.json`, with diffusers' `AutoencoderKL` defaults. `block_out_channels` and the block types are
/// required: diffusers' one-level defaults never describe a real VAE, so a config without them is a wrong file.
/// `force_upcast` and `latents_mean/std` are ignored.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    pub down_block_types: Vec<VaeDownBlockType>,
    pub up_block_types: Vec<VaeUpBlockType>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: Activation,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding (and multiplied after encoding) so they have about unit
    /// variance: 0.18215 for SD1/SD2.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted before scaling by newer VAEs (SD3, Flux); `None` for SD1/SD2.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// The image size the VAE was trained at: the tile size of tiled decoding ([`super::vae_tiling`]).
    #[serde(default = "default_sample_size")]
    pub sample_size: SampleSize,
}

/// `sample_size`: one size, or (height, width) as some configs write it (diffusers then uses the first).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    Sizes(Vec<usize>),
}

impl SampleSize {
    /// The size diffusers takes for tiling.
    pub fn first(&self) -> usize {
        match self {
            SampleSize::Square(s) => *s,
            SampleSize::Sizes(v) => v.first().copied().unwrap_or(DIFFUSERS_SAMPLE_SIZE),
        }
    }
}

/// `AutoencoderKL`'s default `sample_size` in diffusers (real VAE configs set their own: 512 for SD1.x).
const DIFFUSERS_SAMPLE_SIZE: usize = 32;

fn default_sample_size() -> SampleSize {
    SampleSize::Square(DIFFUSERS_SAMPLE_SIZE)
}

fn default_image_channels() -> usize {
    3
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> Activation {
    Activation::Silu
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl AutoencoderKLConfig {
    /// Checks what the weights cannot: one block type per level, channels divisible into groups, SiLU.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return Err(format!(
                "{levels} block_out_channels but {} down_block_types and {} up_block_types",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self.block_out_channels.iter().find(|&&c| groups == 0 || c % groups != 0) {
            return Err(format!("block_out_channels {c} is not divisible by norm_num_groups {groups}"));
        }
        if self.act_fn != Activation::Silu {
            return Err(format!("act_fn {:?} is not supported (only silu)", self.act_fn));
        }
        Ok(())
    }

    /// Downsampling factor between image and latents: 2 per level but the last (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The encoder's posterior: a Gaussian per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

/// diffusers clamps the log-variance so `exp` neither underflows to 0 nor overflows.
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

impl DiagonalGaussian {
    /// Splits the encoder's moments (batch, 2*latent, h, w) into mean and log-variance along the channels.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(Self { mean: moments.narrow(1, 0, c)?, logvar: moments.narrow(1, c, c)?.clamp(LOGVAR_MIN, LOGVAR_MAX)? })
    }

    /// The most likely latents (the mean).
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise`, with `noise` ~ N(0, 1) of the mean's shape drawn by the caller (so it can come from
    /// the torch-compatible generator, as diffusers' `latent_dist.sample(generator)`).
    pub fn sample_with_noise(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.std()? * noise)?
    }
}

/// Old diffusers checkpoints name the mid-block attention's projections `query`, `key`, `value`, `proj_attn`
/// (diffusers renames them on load, `_fix_state_dict_keys_on_load`). When such names are present, ours are
/// mapped onto them; the renaming sits at the root because candle applies it to full key names.
fn with_deprecated_attention_names(vb: VarBuilder) -> VarBuilder {
    let deprecated = ["encoder", "decoder"]
        .iter()
        .any(|part| vb.contains_tensor(&format!("{part}.mid_block.attentions.0.query.weight")));
    if !deprecated {
        return vb;
    }
    vb.rename_f(|name: &str| {
        if !name.contains(".mid_block.attentions.") {
            return name.to_string();
        }
        name.replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.")
    })
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    /// 1x1 convs on the moments / latents (absent when the config turns them off).
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
    span: tracing::Span,
}

impl AutoencoderKL {
    pub fn new(cfg: AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(msg) = cfg.validate() {
            candle_core::bail!("VAE config: {msg}");
        }
        let blocks = VaeBlockConfig { norm_num_groups: cfg.norm_num_groups };
        let vb = with_deprecated_attention_names(vb);
        let latent = cfg.latent_channels;
        // The encoder outputs mean and log-variance stacked on the channels ("double_z").
        let encoder = Encoder::new(
            blocks,
            cfg.in_channels,
            2 * latent,
            &cfg.block_out_channels,
            cfg.layers_per_block,
            cfg.mid_block_add_attention,
            vb.pp("encoder"),
        )?;
        let decoder = Decoder::new(
            blocks,
            latent,
            cfg.out_channels,
            &cfg.block_out_channels,
            cfg.layers_per_block,
            cfg.mid_block_add_attention,
            vb.pp("decoder"),
        )?;
        let quant_conv =
            if cfg.use_quant_conv { Some(conv2d(2 * latent, 2 * latent, 1, 1, 0, vb.pp("quant_conv"))?) } else { None };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(latent, latent, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            config: cfg,
            span: tracing::span!(tracing::Level::TRACE, "vae"),
        })
    }

    /// Loads a `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors` (or its fp16 variant or
    /// shards), converted to `dtype`. Errors name the config file or the weights file and tensor.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config_path = dir.join("config.json");
        let cfg: AutoencoderKLConfig = read_json(&config_path)?;
        cfg.validate().map_err(|msg| Error::config(&config_path, msg))?;
        let paths = find_safetensors(dir, DIFFUSERS_STEM)?;
        let vb = var_builder(&paths, dtype, device)?;
        let origin = if paths.len() == 1 { paths[0].clone() } else { dir.to_path_buf() };
        Self::new(cfg, vb).map_err(|e| Error::weights(origin, format!("does not fit {}: {e}", config_path.display())))
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Images (batch, in_channels, H, W) in [-1, 1] → posterior over the latents (batch, latent, H/8, W/8).
    /// The caller multiplies samples by `scaling_factor`.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let _enter = self.span.enter();
        let moments = self.encoder.forward(images)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&moments)?,
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Latents (batch, latent, h, w), already divided by `scaling_factor` → raw decoder output
    /// (batch, out_channels, 8h, 8w), about [-1, 1] but not clamped; see [`latents_to_image`].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}

/// The decoder's output (batch, C, H, W), about [-1, 1] → u8 pixels (batch, C, H, W), exactly as diffusers'
/// `VaeImageProcessor.postprocess` + `numpy_to_pil`: `(x / 2 + 0.5).clamp(0, 1)`, `* 255` in f32, then
/// numpy's round (half to even), then u8.
pub fn latents_to_image(decoded: &Tensor) -> Result<Tensor> {
    let shape = decoded.shape().clone();
    let values = decoded.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let pixels: Vec<u8> =
        values.into_iter().map(|x| ((x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
    Tensor::from_vec(pixels, shape, decoded.device())
}

/// u8 pixels (batch, C, H, W) → f32 in [-1, 1] as diffusers' `VaeImageProcessor.preprocess`:
/// `x / 255` (a true division, as numpy does), then `2x - 1`.
pub fn image_to_input(images: &Tensor) -> Result<Tensor> {
    let x = images.to_dtype(DType::F32)?;
    let max = Tensor::new(255f32, x.device())?;
    (x.broadcast_div(&max)? * 2.0)? - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_close, repo_path as repo};
    use std::collections::HashMap;

    const TINY_VAE: &str = "tests/fixtures/models/tiny-sd15/vae";

    fn fixture(name: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(repo(&format!("tests/fixtures/vae/{name}")), &Device::Cpu).unwrap()
    }

    fn tiny_vae() -> AutoencoderKL {
        AutoencoderKL::load(&repo(TINY_VAE), DType::F32, &Device::Cpu).unwrap()
    }

    fn u8_values(t: &Tensor) -> Vec<u8> {
        t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
    }

    /// Our pixels equal diffusers' except, at most, off by one where the reference value lies within
    /// `1e-3` of a rounding boundary (x.5 after `* 255`): there a ~1e-6 difference in the raw output flips
    /// the rounding. Anything else fails.
    fn assert_pixels_match(ours: &Tensor, ref_decoded: &Tensor, ref_image: &Tensor) {
        let (a, b) = (u8_values(ours), u8_values(ref_image));
        let raw: Vec<f32> = ref_decoded.flatten_all().unwrap().to_vec1().unwrap();
        let mut flipped = 0;
        for ((&x, &y), &r) in a.iter().zip(&b).zip(&raw) {
            if x != y {
                let scaled = (r * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0;
                let to_boundary = (scaled - scaled.floor() - 0.5).abs();
                assert!(
                    x.abs_diff(y) == 1 && to_boundary < 1e-3,
                    "pixel {x} vs {y} (reference value {scaled}) is not a rounding tie"
                );
                flipped += 1;
            }
        }
        assert!(flipped * 1000 <= a.len(), "{flipped} pixels flipped");
    }

    fn check_decode(name: &str) {
        let vae = tiny_vae();
        let fx = fixture(name);
        let decoded = vae.decode(&fx["latents"]).unwrap();
        assert_close(&decoded, &fx["decoded"], name);
        let image = latents_to_image(&decoded).unwrap();
        assert_eq!(image.dtype(), DType::U8);
        assert_pixels_match(&image, &fx["decoded"], &fx["image"]);
    }

    #[test]
    fn decode_square_matches_diffusers() {
        check_decode("decode_16x16.safetensors");
    }

    /// Non-square latents and a batch of two.
    #[test]
    fn decode_non_square_batch_matches_diffusers() {
        check_decode("decode_8x12_batch2.safetensors");
    }

    /// The postprocess alone, on diffusers' own decoded values, must give diffusers' pixels exactly.
    #[test]
    fn postprocess_equals_diffusers_exactly() {
        for name in ["decode_16x16.safetensors", "decode_8x12_batch2.safetensors"] {
            let fx = fixture(name);
            let ours = latents_to_image(&fx["decoded"]).unwrap();
            assert_eq!(u8_values(&ours), u8_values(&fx["image"]), "{name}");
        }
    }

    #[test]
    fn postprocess_rounds_half_to_even_and_clamps() {
        // 0.5 * 255 = 127.5 → 128 (even); x = 2/255 - 1 maps to exactly 1.0 → 1; out-of-range values clamp.
        let x = Tensor::new(&[0.0f32, -3.0, 3.0, 1.0, -1.0], &Device::Cpu).unwrap();
        assert_eq!(u8_values(&latents_to_image(&x).unwrap()), vec![128, 0, 255, 255, 0]);
    }

    /// Exact f32 bits of diffusers' preprocess (numpy `x / 255`, then `2x - 1`), read off the venv; a
    /// multiplication by 1/255 instead differs in the last bit for 111 of the 256 values.
    #[test]
    fn preprocess_equals_diffusers_exactly() {
        let x = Tensor::new(&[0u8, 1, 127, 128, 254, 255], &Device::Cpu).unwrap();
        let y: Vec<f32> = image_to_input(&x).unwrap().to_vec1().unwrap();
        let want_bits = [0xbf80_0000u32, 0xbf7d_fdfe, 0xbb80_8080, 0x3b80_8100, 0x3f7d_fdfe, 0x3f80_0000];
        let want: Vec<f32> = want_bits.into_iter().map(f32::from_bits).collect();
        assert_eq!(y, want);
    }

    #[test]
    fn encode_matches_diffusers() {
        let vae = tiny_vae();
        let fx = fixture("encode.safetensors");
        let input = image_to_input(&fx["image"]).unwrap();
        let posterior = vae.encode(&input).unwrap();
        assert_close(&posterior.mean, &fx["mean"], "mean");
        assert_close(&posterior.logvar, &fx["logvar"], "logvar");
        assert_close(&posterior.mode(), &fx["mean"], "mode");
        // diffusers' latent_dist.sample(generator) with the fixture's noise.
        let sample = posterior.sample_with_noise(&fx["noise"]).unwrap();
        assert_close(&sample, &fx["sample"], "sample");
        assert_eq!(vae.config().downsample_factor(), 8);
    }

    #[test]
    fn logvar_is_clamped() {
        let moments = Tensor::new(&[0.0f32, 1.0, -100.0, 100.0], &Device::Cpu).unwrap().reshape((1, 4, 1, 1)).unwrap();
        let g = DiagonalGaussian::from_moments(&moments).unwrap();
        let lv: Vec<f32> = g.logvar.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(lv, vec![-30.0, 20.0]);
    }

    /// Old diffusers checkpoints name the mid-block attention `query/key/value/proj_attn`: same output.
    #[test]
    fn deprecated_attention_names_load() {
        let dev = Device::Cpu;
        let weights =
            candle_core::safetensors::load(repo(TINY_VAE).join("diffusion_pytorch_model.safetensors"), &dev).unwrap();
        let renamed: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(k, v)| {
                let k = if k.contains("mid_block.attentions.0.") {
                    k.replace(".to_q.", ".query.")
                        .replace(".to_k.", ".key.")
                        .replace(".to_v.", ".value.")
                        .replace(".to_out.0.", ".proj_attn.")
                } else {
                    k
                };
                (k, v)
            })
            .collect();
        assert!(renamed.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
        let vb = VarBuilder::from_tensors(renamed, DType::F32, &dev);
        let vae = AutoencoderKL::new(tiny_vae().config().clone(), vb).unwrap();
        let fx = fixture("decode_8x12_batch2.safetensors");
        assert_close(&vae.decode(&fx["latents"]).unwrap(), &fx["decoded"], "renamed");
    }

    /// Writes the tiny VAE's weights with an edited config into a temporary folder and loads it.
    fn load_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let src = repo(TINY_VAE);
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            src.join("diffusion_pytorch_model.safetensors"),
            tmp.path().join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        AutoencoderKL::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err().to_string()
    }

    #[test]
    fn missing_block_out_channels_names_config_file() {
        let err = load_with_config(|c| {
            c.as_object_mut().unwrap().remove("block_out_channels");
        });
        assert!(err.contains("config.json") && err.contains("block_out_channels"), "{err}");
    }

    #[test]
    fn unknown_block_type_names_config_file() {
        let err = load_with_config(|c| c["up_block_types"][1] = "AttnUpDecoderBlock2D".into());
        assert!(err.contains("config.json") && err.contains("AttnUpDecoderBlock2D"), "{err}");
    }

    #[test]
    fn channel_mismatch_names_weights_file_and_tensor() {
        let err = load_with_config(|c| c["block_out_channels"][0] = 24.into());
        assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
        assert!(err.contains("encoder.conv_in.weight"), "{err}");
    }
}
