//! The demo base's architecture: SD1.x's layout shrunk for 128 px images of flat shapes.
use serde_json::{json, Value};

/// The networks' `config.json`s and the scheduler's.
#[derive(Debug, Clone)]
pub struct Architecture {
    pub text_encoder: Value,
    pub vae: Value,
    pub unet: Value,
    pub scheduler: Value,
}

impl Architecture {
    /// The demo base: SD1.x's layout shrunk for 128 px images of flat shapes. A VAE with 8x downsampling to
    /// 4 latent channels (16x16 latents at 128 px), a 3-level UNet with cross-attention at the two finer
    /// levels and the middle, and a 2-layer CLIP text encoder 32 wide (its vocabulary table, 49408 x 32, is
    /// the largest tensor of the model).
    ///
    /// The VAE normalises with one group: a group norm subtracts each group's mean over the image, and with
    /// few channels per group a flat-colour picture loses its absolute colour there (a first VAE with 8 groups
    /// of 2 channels reconstructed shapes well but shifted colours: black came back dark green).
    pub fn demo() -> Self {
        let text_encoder = json!({
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
            "projection_dim": 32
        });
        let vae = json!({
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 1,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "act_fn": "silu", "sample_size": 128, "scaling_factor": 1.0, "mid_block_add_attention": true,
            "force_upcast": true
        });
        let unet = json!({
            "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 32, "attention_head_dim": 4,
            "act_fn": "silu", "flip_sin_to_cos": true, "freq_shift": 0
        });
        let scheduler = json!({
            "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1, "timestep_spacing": "leading"
        });
        Self { text_encoder, vae, unet, scheduler }
    }
}
