//! DINOv2 (Oquab et al. 2023), the ViT backbone of Depth Anything V2: 14-pixel patches, a class token, learned
//! position embeddings for a 37×37 grid (518 px) interpolated bicubically to the input's grid, pre-norm blocks
//! with layer scale, and the final norm applied to the tokens of four intermediate blocks.
//!
//! One module, two weight layouts: the original release's (`pretrained.blocks.{i}.attn.qkv`, `ls1.gamma`) and
//! transformers' `Dinov2Backbone` (`backbone.encoder.layer.{i}.attention.attention.{query,key,value}`,
//! `layer_scale1.lambda1`); see [`Keys`]. The two differ in one computation, the position-embedding
//! interpolation ([`PosInterpolation`]).
use candle_core::Tensor;

use super::nn::{resize_bicubic, self_attention, Conv, LayerNorm, Linear};
use super::weights::StateDict;
use crate::Result;

/// How the 37×37 position embeddings are brought to the input's patch grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PosInterpolation {
    /// The original DINOv2 code: `scale_factor = (grid + 0.1) / 37` (a work-around of the release for a torch
    /// rounding bug), so the samples sit slightly off transformers' for any grid but 37×37.
    Offset,
    /// transformers: `size = grid`.
    Size,
}

/// Where each tensor is in one layout.
pub struct Keys {
    pub prefix: &'static str,
    pub patch_embed: &'static str,
    pub cls_token: &'static str,
    pub pos_embed: &'static str,
    pub block: &'static str,
    pub norm: &'static str,
    /// Per block: norm1, norm2, attention output, mlp fc1, fc2, layer scale 1, 2.
    pub norm1: &'static str,
    pub norm2: &'static str,
    pub proj: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    pub ls1: &'static str,
    pub ls2: &'static str,
    /// The fused qkv projection, or `None` for separate query/key/value ones.
    pub qkv: Option<&'static str>,
}

/// The original release (`depth_anything_v2_vit*.pth`).
pub const ORIGINAL: Keys = Keys {
    prefix: "pretrained.",
    patch_embed: "patch_embed.proj",
    cls_token: "cls_token",
    pos_embed: "pos_embed",
    block: "blocks",
    norm: "norm",
    norm1: "norm1",
    norm2: "norm2",
    proj: "attn.proj",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    ls1: "ls1.gamma",
    ls2: "ls2.gamma",
    qkv: Some("attn.qkv"),
};

/// transformers' `Dinov2Backbone` inside `DepthAnythingForDepthEstimation`.
pub const TRANSFORMERS: Keys = Keys {
    prefix: "backbone.",
    patch_embed: "embeddings.patch_embeddings.projection",
    cls_token: "embeddings.cls_token",
    pos_embed: "embeddings.position_embeddings",
    block: "encoder.layer",
    norm: "layernorm",
    norm1: "norm1",
    norm2: "norm2",
    proj: "attention.output.dense",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    ls1: "layer_scale1.lambda1",
    ls2: "layer_scale2.lambda1",
    qkv: None,
};

/// DINOv2's patch size.
pub const PATCH: usize = 14;

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
}

/// The backbone, with the blocks whose normalised tokens the DPT head reads.
pub struct Dinov2 {
    patch_embed: Conv,
    cls_token: Tensor,
    /// (1, 1 + g·g, width)
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    heads: usize,
    /// Indices of the blocks whose outputs are returned (0-based).
    pub taps: Vec<usize>,
    pub interpolation: PosInterpolation,
}

impl Dinov2 {
    /// `heads`: attention heads; `taps`: the blocks read by the head (0-based).
    pub fn load(
        sd: &StateDict,
        keys: &Keys,
        heads: usize,
        taps: Vec<usize>,
        interpolation: PosInterpolation,
    ) -> Result<Self> {
        let k = |name: &str| format!("{}{name}", keys.prefix);
        let patch_embed = Conv::load(sd, &k(keys.patch_embed), PATCH, 0)?;
        let width = patch_embed.out_channels();
        if heads == 0 || width % heads != 0 {
            return Err(sd.error(format!("{width} channels do not split into {heads} attention heads")));
        }
        let depth = sd.count(&k(&format!("{}.", keys.block)), &format!(".{}.weight", keys.norm1));
        if let Some(&bad) = taps.iter().find(|&&t| t >= depth) {
            return Err(sd.error(format!("the head reads block {bad}, the file has {depth} blocks")));
        }
        let blocks = (0..depth)
            .map(|i| {
                let b = |name: &str| k(&format!("{}.{i}.{name}", keys.block));
                let qkv = match keys.qkv {
                    Some(name) => Linear::load(sd, &b(name))?,
                    None => {
                        let parts = ["query", "key", "value"]
                            .map(|p| Linear::load(sd, &b(&format!("attention.attention.{p}"))));
                        let [q, kk, v] = parts;
                        let (q, kk, v) = (q?, kk?, v?);
                        Linear {
                            weight: Tensor::cat(&[&q.weight, &kk.weight, &v.weight], 0)?,
                            bias: Tensor::cat(&[&q.bias, &kk.bias, &v.bias], 0)?,
                        }
                    }
                };
                Ok(Block {
                    norm1: LayerNorm::load(sd, &b(keys.norm1), 1e-6)?,
                    qkv,
                    proj: Linear::load(sd, &b(keys.proj))?,
                    ls1: sd.get_rank(&b(keys.ls1), 1)?,
                    norm2: LayerNorm::load(sd, &b(keys.norm2), 1e-6)?,
                    fc1: Linear::load(sd, &b(keys.fc1))?,
                    fc2: Linear::load(sd, &b(keys.fc2))?,
                    ls2: sd.get_rank(&b(keys.ls2), 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pos_embed = sd.get_rank(&k(keys.pos_embed), 3)?;
        let grid = ((pos_embed.dim(1)? - 1) as f64).sqrt() as usize;
        if grid * grid + 1 != pos_embed.dim(1)? || pos_embed.dim(2)? != width {
            return Err(sd.error(format!(
                "{}: {:?} is not 1 + a square grid of {width}",
                keys.pos_embed,
                pos_embed.dims()
            )));
        }
        Ok(Self {
            patch_embed,
            cls_token: sd.get(&k(keys.cls_token))?.reshape((1, 1, width))?,
            pos_embed,
            blocks,
            norm: LayerNorm::load(sd, &k(keys.norm), 1e-6)?,
            heads,
            taps,
            interpolation,
        })
    }

    pub fn width(&self) -> usize {
        self.patch_embed.out_channels()
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// The normalised patch tokens (1, ph·pw, width) after each tapped block, for `x` (1, 3, 14·ph, 14·pw).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        // 1. patches, class token, position embeddings
        let patches = self.patch_embed.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let mut tokens = Tensor::cat(&[&self.cls_token, &patches], 1)?;
        tokens = tokens.broadcast_add(&self.position_embeddings(h / PATCH, w / PATCH)?)?;
        // 2. blocks, keeping the tapped ones normalised and without the class token
        let mut out = Vec::with_capacity(self.taps.len());
        for (i, block) in self.blocks.iter().enumerate() {
            tokens = self.block(block, &tokens)?;
            if self.taps.contains(&i) {
                let n = tokens.dim(1)?;
                out.push(self.norm.forward(&tokens)?.narrow(1, 1, n - 1)?);
            }
        }
        Ok(out)
    }

    /// The embeddings for a `ph`×`pw` patch grid (the stored ones when the grid is theirs).
    fn position_embeddings(&self, ph: usize, pw: usize) -> Result<Tensor> {
        let width = self.width();
        let n = self.pos_embed.dim(1)? - 1;
        let grid = (n as f64).sqrt() as usize;
        // both upstreams keep the table as is for a square input of the stored size
        if ph * pw == n && ph == pw {
            return Ok(self.pos_embed.clone());
        }
        let scale = |cells: usize| match self.interpolation {
            PosInterpolation::Size => grid as f64 / cells as f64,
            PosInterpolation::Offset => 1.0 / ((cells as f64 + 0.1) / grid as f64),
        };
        let table = self.pos_embed.narrow(1, 1, n)?.reshape((grid * grid, width))?.t()?.contiguous()?;
        let planes = table.to_vec2::<f32>()?;
        let resized: Vec<f32> =
            planes.iter().flat_map(|p| resize_bicubic(p, grid, grid, (pw, ph), (scale(pw), scale(ph)))).collect();
        let patch = Tensor::from_vec(resized, (width, ph * pw), self.pos_embed.device())?.t()?.unsqueeze(0)?;
        Ok(Tensor::cat(&[&self.pos_embed.narrow(1, 0, 1)?, &patch], 1)?)
    }

    fn block(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let x = (x + self_attention(&b.qkv, &b.proj, self.heads, &b.norm1.forward(x)?)?.broadcast_mul(&b.ls1)?)?;
        let mlp = b.fc2.forward(&b.fc1.forward(&b.norm2.forward(&x)?)?.gelu_erf()?)?;
        Ok((&x + mlp.broadcast_mul(&b.ls2)?)?)
    }
}

/// The blocks the DPT head reads in the original release, by depth (`intermediate_layer_idx` of
/// `DepthAnythingV2`: ViT-S/B 12 blocks, ViT-L 24, ViT-G 40).
pub fn original_taps(depth: usize) -> Option<Vec<usize>> {
    Some(match depth {
        12 => vec![2, 5, 8, 11],
        24 => vec![4, 11, 17, 23],
        40 => vec![9, 19, 29, 39],
        _ => return None,
    })
}

/// The attention heads of a released DINOv2 of this width (64 channels each: ViT-S 6, B 12, L 16, G 24); reduced
/// widths that are not a multiple of 64 (test models) use 16-channel heads.
pub fn original_heads(width: usize) -> usize {
    if width.is_multiple_of(64) {
        width / 64
    } else {
        (width / 16).max(1)
    }
}
