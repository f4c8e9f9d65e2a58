//! timm's hybrid ViT `vit_base_resnet50_384` (R50+ViT-B/16, Dosovitskiy et al. 2020) as MiDaS's DPT-Hybrid runs
//! it (`forward_flex` of MiDaS's `vit.py`): the ResNet stem ([`super::resnetv2`]) turns the image into a stride-16
//! feature map, a 1×1 convolution (`patch_embed.proj`, "patches" of one feature pixel) makes the tokens, a class
//! token is prepended, the learned position embeddings of the 24×24 grid (384 px) are resized bilinearly to the
//! input's grid, and 12 pre-norm transformer blocks follow (LayerNorm ε 1e-6, fused qkv, GELU MLP, no layer scale).
//!
//! The DPT head reads the ResNet's first two stage outputs and the raw outputs of two blocks (class token
//! included, before the final norm). Keys under `pretrained.model.`: `patch_embed.backbone.*` (the ResNet),
//! `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`.
use candle_core::Tensor;

use super::dinov2::original_heads;
use super::nn::{resize_bilinear, self_attention, Conv, LayerNorm, Linear};
use super::resnetv2::ResNetV2;
use super::weights::StateDict;
use crate::Result;

/// timm ViT's LayerNorm epsilon.
const LN_EPS: f32 = 1e-6;

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What the encoder gives the head: the ResNet's stage outputs and the tapped blocks' tokens.
pub struct Features {
    /// (1, C, H/4·2^s, W/4·2^s) per stage.
    pub stages: Vec<Tensor>,
    /// (1, 1 + gh·gw, width) per tapped block, in the order asked.
    pub taps: Vec<Tensor>,
    /// The token grid (rows, columns).
    pub grid: (usize, usize),
}

pub struct HybridVit {
    pub resnet: ResNetV2,
    patch_proj: Conv,
    cls_token: Tensor,
    /// (1, 1 + g·g, width)
    pos_embed: Tensor,
    blocks: Vec<Block>,
    heads: usize,
}

impl HybridVit {
    /// The encoder under `prefix` (`pretrained.model.`); the heads are ViT-B's 64-channel ones (16-channel ones
    /// for narrowed test widths, as [`original_heads`]).
    pub fn load(sd: &StateDict, prefix: &str) -> Result<Self> {
        let k = |name: &str| format!("{prefix}{name}");
        let resnet = ResNetV2::load(sd, &k("patch_embed.backbone."))?;
        let patch_proj = Conv::load(sd, &k("patch_embed.proj"), 1, 0)?;
        let (width, last) = (patch_proj.out_channels(), resnet.stage_channels(resnet.num_stages() - 1));
        if patch_proj.in_channels() != last {
            return Err(sd.error(format!(
                "{}: takes {} channels, the ResNet's last stage makes {last}",
                k("patch_embed.proj.weight"),
                patch_proj.in_channels()
            )));
        }
        let pos_embed = sd.get_rank(&k("pos_embed"), 3)?;
        let cells = pos_embed.dim(1)?.saturating_sub(1);
        let grid = (cells as f64).sqrt() as usize;
        if grid * grid != cells || grid == 0 || pos_embed.dim(2)? != width {
            return Err(sd.error(format!(
                "{}: {:?} is not 1 + a square grid of {width}",
                k("pos_embed"),
                pos_embed.dims()
            )));
        }
        let depth = sd.count(&k("blocks."), ".norm1.weight");
        let blocks = (0..depth)
            .map(|i| {
                let b = |name: &str| k(&format!("blocks.{i}.{name}"));
                Ok(Block {
                    norm1: LayerNorm::load(sd, &b("norm1"), LN_EPS)?,
                    qkv: Linear::load(sd, &b("attn.qkv"))?,
                    proj: Linear::load(sd, &b("attn.proj"))?,
                    norm2: LayerNorm::load(sd, &b("norm2"), LN_EPS)?,
                    fc1: Linear::load(sd, &b("mlp.fc1"))?,
                    fc2: Linear::load(sd, &b("mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnet,
            patch_proj,
            cls_token: sd.get(&k("cls_token"))?.reshape((1, 1, width))?,
            pos_embed,
            blocks,
            heads: original_heads(width),
        })
    }

    pub fn width(&self) -> usize {
        self.patch_proj.out_channels()
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// The ResNet's stages and the outputs of blocks `taps` (0-based, each < [`Self::depth`]) for `x` (1, 3, H, W).
    pub fn forward(&self, x: &Tensor, taps: &[usize]) -> Result<Features> {
        // 1. the ResNet, its last stage as one-pixel patches, the class token, the resized position embeddings
        let stages = self.resnet.forward(x)?;
        let features = self.patch_proj.forward(stages.last().expect("at least one stage"))?;
        let (gh, gw) = (features.dim(2)?, features.dim(3)?);
        let patches = features.flatten_from(2)?.transpose(1, 2)?;
        let mut tokens = Tensor::cat(&[&self.cls_token, &patches], 1)?;
        tokens = tokens.broadcast_add(&self.position_embeddings(gh, gw)?)?;
        // 2. the blocks, keeping the tapped outputs
        let mut out = vec![None; taps.len()];
        for (i, b) in self.blocks.iter().enumerate() {
            let x = (&tokens + self_attention(&b.qkv, &b.proj, self.heads, &b.norm1.forward(&tokens)?)?)?;
            let mlp = b.fc2.forward(&b.fc1.forward(&b.norm2.forward(&x)?)?.gelu_erf()?)?;
            tokens = (x + mlp)?;
            for (slot, _) in out.iter_mut().zip(taps).filter(|(_, &t)| t == i) {
                *slot = Some(tokens.clone());
            }
        }
        let taps = out.into_iter().flatten().collect::<Vec<_>>();
        Ok(Features { stages, taps, grid: (gh, gw) })
    }

    /// `_resize_pos_embed`: the grid's embeddings resized bilinearly (`align_corners=False`) to `gh`×`gw`, the class
    /// token's kept.
    fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let width = self.width();
        let n = self.pos_embed.dim(1)? - 1;
        let grid = (n as f64).sqrt() as usize;
        if (gh, gw) == (grid, grid) {
            return Ok(self.pos_embed.clone());
        }
        let planes = self.pos_embed.narrow(1, 1, n)?.reshape((n, width))?.t()?.contiguous()?.to_vec2::<f32>()?;
        let resized: Vec<f32> = planes.iter().flat_map(|p| resize_bilinear(p, grid, grid, gw, gh)).collect();
        let patch = Tensor::from_vec(resized, (width, gh * gw), self.pos_embed.device())?.t()?.unsqueeze(0)?;
        Ok(Tensor::cat(&[&self.pos_embed.narrow(1, 0, 1)?, &patch], 1)?)
    }
}
