//! The networks. Struct fields mirror checkpoint key names, so `down_blocks.1.attentions.0.proj_in.weight`
//! reads as a path through the code.
pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod controlnet_union;
pub mod embeddings;
pub mod layers;
pub mod lora;
pub mod ops;
pub mod resnet;
pub mod transformer_2d;
pub mod unet;
pub mod unet_blocks;
pub mod unet_encoder;
pub mod vae;
pub mod vae_blocks;
pub mod vae_tiling;
pub mod weight_tap;
