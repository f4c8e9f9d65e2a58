//! What cannot be read from weights, per base model, in one table: attention heads, default sizes, the text
//! encoder's activation and head count, the scheduler, the tokenizer's padding token.
//!
//! Values are those of the diffusers folders on the hub (`stable-diffusion-v1-5/stable-diffusion-v1-5`,
//! `stabilityai/stable-diffusion-2-1`, `stabilityai/stable-diffusion-xl-base-1.0`) and of the ControlNets trained
//! on them. Weights tell the base apart by the cross-attention width (the text encoder's hidden size).
use serde_json::{json, Value};

/// What the denoising model predicts (`prediction_type` in `scheduler_config.json`): the noise (SD1.x, SD2.x-base),
/// the velocity (SD2.x 768 models) or the clean sample. One type for the loaders, the schedulers and training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum PredictionType {
    /// The noise that was added (SD1.x, SD2-base).
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (SD2.x 768).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample x0 itself.
    #[serde(rename = "sample")]
    Sample,
}

impl PredictionType {
    /// The name diffusers writes in `scheduler_config.json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

impl std::fmt::Display for PredictionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user's override of a checkpoint's prediction type: the two that Stable Diffusion models are trained with
/// (`sample` is for configs, not an override).
impl std::str::FromStr for PredictionType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "epsilon" | "eps" => Ok(Self::Epsilon),
            "v_prediction" | "v" | "v-prediction" => Ok(Self::VPrediction),
            _ => Err(crate::Error::setting("prediction_type", format!("expected epsilon or v_prediction, got {s:?}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    Sd15,
    Sd21,
    Sdxl,
    Unknown,
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Base::Sd15 => "sd15",
            Base::Sd21 => "sd21",
            Base::Sdxl => "sdxl",
            Base::Unknown => "unknown",
        })
    }
}

/// diffusers' `attention_head_dim`: SD1.5 gives a head count for every level (8); SD2.x/SDXL use 64-wide heads,
/// written as a per-level head count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// The same number of heads at every level.
    Count(usize),
    /// Heads of this width: each level gets channels / width heads.
    Width(usize),
}

/// Facts about one base model that its weights do not carry.
#[derive(Debug, Clone, Copy)]
pub struct BaseFacts {
    pub base: Base,
    /// The text encoder's hidden size = the UNet's `cross_attention_dim`.
    pub cross_attention_dim: usize,
    pub heads: Heads,
    /// Attention computed in f32 even in f16 models (SD2.1's UNet sets it; no effect in f32).
    pub upcast_attention: bool,
    /// Default image size in pixels.
    pub image_size: usize,
    /// GroupNorm groups of the UNet and VAE.
    pub norm_num_groups: usize,
    /// VAE latent scaling (`scaling_factor`).
    pub vae_scaling_factor: f64,
    /// CLIP text encoder activation: OpenAI CLIP uses quick_gelu, OpenCLIP gelu.
    pub text_hidden_act: &'static str,
    /// Width of a text-encoder attention head (64 for every CLIP in SD).
    pub text_head_dim: usize,
    /// The tokenizer's padding token: OpenAI CLIP pads with end-of-text, SD2's OpenCLIP tokenizer with "!".
    pub pad_token: &'static str,
    /// SDXL's size/crop conditioning: `addition_time_embed_dim`.
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL's second text encoder (OpenCLIP bigG with projection).
    pub text_encoder_2: Option<SecondTextEncoder>,
}

/// What SDXL's second text encoder's weights do not say.
#[derive(Debug, Clone, Copy)]
pub struct SecondTextEncoder {
    /// OpenCLIP: gelu.
    pub hidden_act: &'static str,
    /// `tokenizer_2` pads with "!" (OpenCLIP's tokenizer), the first one with end-of-text.
    pub pad_token: &'static str,
}

/// The table. Index it with [`facts`].
pub const BASES: [BaseFacts; 3] = [
    BaseFacts {
        base: Base::Sd15,
        cross_attention_dim: 768,
        heads: Heads::Count(8),
        upcast_attention: false,
        image_size: 512,
        norm_num_groups: 32,
        vae_scaling_factor: 0.18215,
        text_hidden_act: "quick_gelu",
        text_head_dim: 64,
        pad_token: "<|endoftext|>",
        addition_time_embed_dim: None,
        text_encoder_2: None,
    },
    BaseFacts {
        base: Base::Sd21,
        cross_attention_dim: 1024,
        heads: Heads::Width(64),
        upcast_attention: true,
        image_size: 768,
        norm_num_groups: 32,
        vae_scaling_factor: 0.18215,
        text_hidden_act: "gelu",
        text_head_dim: 64,
        pad_token: "!",
        addition_time_embed_dim: None,
        text_encoder_2: None,
    },
    BaseFacts {
        base: Base::Sdxl,
        cross_attention_dim: 2048,
        heads: Heads::Width(64),
        upcast_attention: false,
        image_size: 1024,
        norm_num_groups: 32,
        vae_scaling_factor: 0.13025,
        // The first text encoder is OpenAI's CLIP ViT-L, as SD1.5's.
        text_hidden_act: "quick_gelu",
        text_head_dim: 64,
        pad_token: "<|endoftext|>",
        addition_time_embed_dim: Some(256),
        text_encoder_2: Some(SecondTextEncoder { hidden_act: "gelu", pad_token: "!" }),
    },
];

/// The facts of a base; `Unknown` (e.g. a tiny test model) gets SD1.5's conventions.
pub fn facts(base: Base) -> &'static BaseFacts {
    BASES.iter().find(|f| f.base == base).unwrap_or(&BASES[0])
}

/// The base whose cross-attention width (text hidden size) this is.
pub fn base_for_width(width: usize) -> Base {
    BASES.iter().find(|f| f.cross_attention_dim == width).map_or(Base::Unknown, |f| f.base)
}

/// `attention_head_dim` for diffusers' config, given the per-level channels.
pub fn attention_head_dim(heads: Heads, block_out_channels: &[usize]) -> Value {
    match heads {
        Heads::Count(n) => json!(n),
        Heads::Width(w) => json!(block_out_channels.iter().map(|c| c / w).collect::<Vec<_>>()),
    }
}

/// The scheduler the base model ships with (`scheduler/scheduler_config.json` of its diffusers folder).
/// SD2.x: v-prediction for the 768 models, epsilon for the 512 "base" models (the caller decides).
pub fn scheduler_config(base: Base, prediction_type: &str) -> Value {
    let common = json!({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "steps_offset": 1, "trained_betas": null, "prediction_type": prediction_type,
        "timestep_spacing": "leading",
    });
    let mut c = common.as_object().cloned().unwrap_or_default();
    match base {
        // stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json.
        Base::Sdxl => {
            c.insert("_class_name".into(), json!("EulerDiscreteScheduler"));
            c.insert("interpolation_type".into(), json!("linear"));
            c.insert("use_karras_sigmas".into(), json!(false));
            c.insert("sample_max_value".into(), json!(1.0));
            c.insert("skip_prk_steps".into(), json!(true));
            c.insert("clip_sample".into(), json!(false));
            c.remove("trained_betas");
        }
        Base::Sd21 => {
            c.insert("_class_name".into(), json!("DDIMScheduler"));
            c.insert("clip_sample".into(), json!(false));
        }
        _ => {
            c.insert("_class_name".into(), json!("PNDMScheduler"));
            c.insert("skip_prk_steps".into(), json!(true));
        }
    }
    Value::Object(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_name_bases() {
        assert_eq!(base_for_width(768), Base::Sd15);
        assert_eq!(base_for_width(1024), Base::Sd21);
        assert_eq!(base_for_width(2048), Base::Sdxl);
        assert_eq!(base_for_width(32), Base::Unknown);
        assert_eq!(Base::Sd21.to_string(), "sd21");
    }

    #[test]
    fn head_dims_as_diffusers_writes_them() {
        assert_eq!(attention_head_dim(facts(Base::Sd15).heads, &[320, 640, 1280, 1280]), json!(8));
        assert_eq!(attention_head_dim(facts(Base::Sd21).heads, &[320, 640, 1280, 1280]), json!([5, 10, 20, 20]));
    }

    #[test]
    fn scheduler_matches_the_tiny_pipelines() {
        // The tiny pipelines' schedulers were written by diffusers with SD1.5's and SD2.1's hub configs.
        // tiny-sdxl's is SDXL base 1.0's file as the hub has it.
        for (dir, base, pred) in [
            ("tiny-sd15", Base::Sd15, "epsilon"),
            ("tiny-sd2", Base::Sd21, "v_prediction"),
            ("tiny-sdxl", Base::Sdxl, "epsilon"),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models")
                .join(dir)
                .join("scheduler/scheduler_config.json");
            let want: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let got = scheduler_config(base, pred);
            for (k, v) in got.as_object().unwrap() {
                assert_eq!(want.get(k), Some(v), "{dir}: {k}");
            }
        }
    }
}
