//! Floating-point operations of one forward pass, counted from the layer shapes the configs imply.
//!
//! Counted as torch's `FlopCounterMode` does (so GFLOP/s compare across implementations): 2 per multiply-add of
//! every convolution, linear layer and attention matrix product; norms, activations and additions are free.
//! `tests/fixtures/bench/flops.json` holds torch's counts for SD1.5 and SD2.1, which the tests reproduce.
use crate::model::controlnet::ControlNetConfig;
use crate::model::unet::{EncoderConfig, UNet2DConditionConfig};
use crate::model::unet_blocks::BlockKind;
use crate::model::vae::AutoencoderKLConfig;

/// Width of the GEGLU feed-forward's hidden layer relative to the model width.
const FF_MULT: usize = 4;
/// Kernel size of SD's resnet, sampler and hint-encoder convolutions.
const KERNEL: usize = 3;

/// A spatial size (height, width).
type Size = (usize, usize);

fn pixels((h, w): Size) -> f64 {
    (h * w) as f64
}

/// A k×k convolution whose output has `out` pixels.
fn conv(c_in: usize, c_out: usize, k: usize, out: Size) -> f64 {
    2.0 * (c_in * c_out * k * k) as f64 * pixels(out)
}

/// A linear layer applied to `tokens` vectors.
fn linear(d_in: usize, d_out: usize, tokens: f64) -> f64 {
    2.0 * (d_in * d_out) as f64 * tokens
}

/// Output size of a 3x3 stride-2 convolution with padding 1 (the UNet's downsampler).
fn halve((h, w): Size) -> Size {
    (h.div_ceil(2), w.div_ceil(2))
}

/// Multi-head attention of `n` queries of width `c` over `m` keys of width `d_kv` (projections included).
fn attention(c: usize, d_kv: usize, n: f64, m: f64) -> f64 {
    // q and out projections on the queries, k and v on the keys, then scores and weighted values.
    2.0 * linear(c, c, n) + 2.0 * linear(d_kv, c, m) + 2.0 * (2.0 * n * m * c as f64)
}

fn resnet(c_in: usize, c_out: usize, temb: Option<usize>, size: Size) -> f64 {
    let shortcut = if c_in != c_out { conv(c_in, c_out, 1, size) } else { 0.0 };
    conv(c_in, c_out, KERNEL, size)
        + conv(c_out, c_out, KERNEL, size)
        + shortcut
        + temb.map_or(0.0, |t| linear(t, c_out, 1.0))
}

/// `Transformer2DModel` on a `c`-channel map: projections in and out, then per layer self-attention,
/// cross-attention on `text_tokens` tokens of width `d_text`, and the GEGLU feed-forward.
fn transformer(c: usize, layers: usize, d_text: usize, text_tokens: usize, size: Size) -> f64 {
    let n = pixels(size);
    let block = attention(c, c, n, n)
        + attention(c, d_text, n, text_tokens as f64)
        + linear(c, 2 * FF_MULT * c, n)
        + linear(FF_MULT * c, c, n);
    2.0 * linear(c, c, n) + layers as f64 * block
}

/// Per image: the encoder (time MLP, conv_in, down and mid blocks) at a latent of `size`, and the skip
/// connections it hands on as (channels, size).
fn encoder(cfg: &EncoderConfig, size: Size, text_tokens: usize) -> Result<(f64, Vec<(usize, Size)>), String> {
    let levels = cfg.levels()?;
    let c0 = cfg.block_out_channels[0];
    let temb = cfg.time_embed_dim();
    let text = |c: usize, layers: usize, s: Size| transformer(c, layers, cfg.cross_attention_dim, text_tokens, s);
    let mut flops =
        linear(c0, temb, 1.0) + linear(temb, temb, 1.0) + conv(cfg.in_channels, c0, cfg.conv_in_kernel, size);
    let mut skips = vec![(c0, size)];
    let (mut c, mut size) = (c0, size);
    for (i, level) in levels.iter().enumerate() {
        for _ in 0..level.layers {
            flops += resnet(c, level.channels, Some(temb), size);
            c = level.channels;
            if level.kind == BlockKind::CrossAttn {
                flops += text(c, level.transformer_layers, size);
            }
            skips.push((c, size));
        }
        if i + 1 < levels.len() {
            size = halve(size);
            flops += conv(c, c, KERNEL, size);
            skips.push((c, size));
        }
    }
    // Mid block: resnet, transformer, resnet.
    let last = levels[levels.len() - 1];
    flops += 2.0 * resnet(c, c, Some(temb), size) + text(c, last.transformer_layers, size);
    Ok((flops, skips))
}

/// One UNet forward pass of one image at a `latent` size, with `text_tokens` prompt tokens (77).
pub fn unet(cfg: &UNet2DConditionConfig, latent: Size, text_tokens: usize) -> Result<f64, String> {
    let up_kinds = cfg.validate()?;
    let enc = &cfg.encoder;
    let levels = enc.levels()?;
    let temb = enc.time_embed_dim();
    let (mut flops, mut skips) = encoder(enc, latent, text_tokens)?;
    let mut c = enc.block_out_channels[levels.len() - 1];
    for (i, (level, kind)) in levels.iter().rev().zip(&up_kinds).enumerate() {
        for _ in 0..=level.layers {
            let (skip_c, size) = skips.pop().ok_or("internal: ran out of skip connections")?;
            flops += resnet(c + skip_c, level.channels, Some(temb), size);
            c = level.channels;
            if *kind == BlockKind::CrossAttn {
                flops += transformer(c, level.transformer_layers, enc.cross_attention_dim, text_tokens, size);
            }
        }
        if i + 1 < levels.len() {
            // Upsample to the next skip's size, then a 3x3 conv there.
            let next = skips.last().ok_or("internal: ran out of skip connections")?.1;
            flops += conv(c, c, KERNEL, next);
        }
    }
    Ok(flops + conv(c, cfg.out_channels, cfg.conv_out_kernel, latent))
}

/// One ControlNet forward pass of one image without the hint embedding (the pipeline computes that once).
pub fn controlnet(cfg: &ControlNetConfig, latent: Size, text_tokens: usize) -> Result<f64, String> {
    let (flops, skips) = encoder(&cfg.encoder, latent, text_tokens)?;
    // Zero convolutions: one 1x1 per skip connection, one on the mid block output.
    let zero: f64 = skips.iter().map(|&(c, s)| conv(c, c, 1, s)).sum();
    let (c_mid, mid_size) = *skips.last().ok_or("no skip connections")?;
    Ok(flops + zero + conv(c_mid, c_mid, 1, mid_size))
}

/// The hint embedding of one condition image of `image` pixels: 3x3 convolutions, stride 2 between stages.
pub fn controlnet_embedding(cfg: &ControlNetConfig, image: Size) -> f64 {
    let widths = &cfg.conditioning_embedding_out_channels;
    let (Some(&first), Some(&last)) = (widths.first(), widths.last()) else { return 0.0 };
    let mut size = image;
    let mut flops = conv(cfg.conditioning_channels, first, KERNEL, size);
    for pair in widths.windows(2) {
        flops += conv(pair[0], pair[0], KERNEL, size);
        size = halve(size);
        flops += conv(pair[0], pair[1], KERNEL, size);
    }
    flops + conv(last, cfg.encoder.block_out_channels[0], KERNEL, size)
}

/// One VAE decode of one latent of `latent` size (to 8x the pixels for SD).
pub fn vae_decode(cfg: &AutoencoderKLConfig, latent: Size) -> f64 {
    let latent_c = cfg.latent_channels;
    let channels: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let top = channels[0];
    let mut size = latent;
    let post_quant = if cfg.use_post_quant_conv { conv(latent_c, latent_c, 1, size) } else { 0.0 };
    let mut flops = post_quant + conv(latent_c, top, KERNEL, size) + 2.0 * resnet(top, top, None, size);
    if cfg.mid_block_add_attention {
        let n = pixels(size);
        flops += attention(top, top, n, n);
    }
    let mut c = top;
    for (i, &out) in channels.iter().enumerate() {
        for _ in 0..=cfg.layers_per_block {
            flops += resnet(c, out, None, size);
            c = out;
        }
        if i + 1 < channels.len() {
            size = (2 * size.0, 2 * size.1);
            flops += conv(c, c, KERNEL, size);
        }
    }
    flops + conv(c, cfg.out_channels, KERNEL, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Preset;

    /// torch's `FlopCounterMode` on diffusers' models (tools/fixtures/gen_bench.py): equal to the last FLOP.
    #[test]
    fn counts_equal_torch_flop_counter() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bench/flops.json");
        let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fx["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let preset = Preset::parse(case["preset"].as_str().unwrap()).unwrap();
            let s = case["latent"].as_u64().unwrap() as usize;
            let tokens = case["text_tokens"].as_u64().unwrap() as usize;
            let (u, c, v) = (preset.unet_config(), preset.controlnet_config(), preset.vae_config());
            let what = format!("{} {s}", case["preset"]);
            let got = [
                ("unet", unet(&u, (s, s), tokens).unwrap()),
                ("controlnet_embed", controlnet_embedding(&c, (8 * s, 8 * s))),
                // torch's ControlNet forward includes the hint embedding.
                ("controlnet", controlnet(&c, (s, s), tokens).unwrap() + controlnet_embedding(&c, (8 * s, 8 * s))),
                ("vae_decode", vae_decode(&v, (s, s))),
            ];
            for (key, ours) in got {
                let torch = case[key].as_f64().unwrap();
                assert_eq!(ours, torch, "{what} {key}");
            }
        }
    }

    /// Odd latent sizes follow the convolutions' rounding (the UNet upsamples to the skip's size).
    #[test]
    fn odd_latent_is_between_its_neighbours() {
        let u = Preset::Sd15.unet_config();
        let f = |s| unet(&u, (s, s), 77).unwrap();
        assert!(f(30) < f(31) && f(31) < f(32));
    }
}
