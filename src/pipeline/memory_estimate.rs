//! How much memory a generate request needs, worked out from the model configs before anything is allocated,
//! so that a size the machine cannot hold is refused with the figure instead of aborting in the allocator
//! (`--width 100000 --height 100000` asked for 30 GB in one block) or running for hours.
//!
//! The figure is the peak of the two stages that hold the most at once, in f32:
//! - denoising: the UNet's skip connections (kept from the down path for the up path), its working tensors at
//!   the widest level, the ControlNet residuals (one net's output and their running sum), and the attention
//!   scores `batch × heads × tokens²` at the largest attention level, or the block of them our attention holds
//!   at once (`model::attention::MAX_SCORES`) when that is smaller: the whole matrix never exists here;
//! - decoding: the VAE decoder's activations at full size (with tiling, those of one tile plus the blended
//!   output) and its single-head mid-block attention over the latent pixels (bounded the same way);
//! - encoding (img2img, inpainting, a Lanczos hires pass): the VAE encoder's activations at full size, the
//!   mirror of the decoder's, with the picture as f32.
//!
//! It is an estimate (the constants are the tensors alive at once, counted from the code, rounded up), meant to
//! tell "fits" from "cannot possibly fit", not to predict the resident size to the megabyte.
use crate::model::attention::MAX_SCORES;
use crate::model::unet_blocks::BlockKind;
use crate::model::unet_encoder::Level;
use crate::model::vae::AutoencoderKLConfig;

/// Bytes of one f32 element.
const F32: f64 = 4.0;
/// Tensors of a level's full width alive at once inside a block: resnet input, norm, conv, the transformer's
/// feed-forward (GEGLU: projected to 8× the channels, then 4×).
const WORKING_TENSORS: f64 = 12.0;
/// Tensors alive at once in a VAE decoder resnet at full size (input, hidden, output).
const VAE_WORKING_TENSORS: f64 = 3.0;
/// Bytes per output pixel: the decoded f32 RGB, its 8-bit copy and the image handed back.
const OUTPUT_BYTES_PER_PIXEL: f64 = 3.0 * (4.0 + 1.0 + 1.0);
/// Bytes per pixel of one fitted condition: the 8-bit RGB image and its f32 tensor.
const CONDITION_BYTES_PER_PIXEL: f64 = 3.0 * (1.0 + 4.0);

/// What a request looks like to the estimate.
#[derive(Debug, Clone, Copy)]
pub struct RequestShape {
    pub width: usize,
    pub height: usize,
    pub num_images: usize,
    /// Classifier-free guidance doubles the UNet's batch.
    pub guided: bool,
    pub controlnets: usize,
    pub vae_tiling: bool,
    /// A picture is encoded by the VAE at this size (img2img, inpainting, a Lanczos hires pass).
    pub encodes_picture: bool,
}

/// The estimate, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// UNet skips and working tensors, ControlNet residuals, latents.
    pub denoising: u64,
    /// The attention score matrix at the largest attention level (part of the denoising peak).
    pub attention_scores: u64,
    /// The VAE decoder's activations and the output images.
    pub decoding: u64,
    /// The VAE encoder's activations and the picture (0 when nothing is encoded).
    pub encoding: u64,
    /// The conditions fitted to the output size (held through both stages).
    pub conditions: u64,
    pub total: u64,
}

/// The estimate for `shape` on a UNet with these `levels` (`EncoderConfig::levels`), latent channels and VAE.
pub fn estimate(
    levels: &[Level],
    latent_channels: usize,
    vae: &AutoencoderKLConfig,
    shape: RequestShape,
) -> MemoryEstimate {
    let factor = 1usize << vae.block_out_channels.len().saturating_sub(1);
    let (h, w) = (shape.height as f64, shape.width as f64);
    let n = shape.num_images as f64;
    let batch = n * if shape.guided { 2.0 } else { 1.0 };
    // Positions of level l of the latent grid (each level halves both sides, rounding up).
    let positions = |l: usize| {
        let side = |v: usize| v.div_ceil(factor).div_ceil(1 << l) as f64;
        side(shape.height) * side(shape.width)
    };

    // 1. Denoising.
    let skips: f64 = levels
        .iter()
        .enumerate()
        .map(|(l, lv)| (lv.layers as f64 + 1.0) * lv.channels as f64 * positions(l))
        .sum::<f64>()
        * batch
        * F32;
    let working = levels
        .iter()
        .enumerate()
        .map(|(l, lv)| WORKING_TENSORS * lv.channels as f64 * positions(l))
        .fold(0.0, f64::max)
        * batch
        * F32;
    let residuals = if shape.controlnets > 0 { 2.0 * skips } else { 0.0 };
    let scores = levels
        .iter()
        .enumerate()
        .filter(|(_, lv)| lv.kind == BlockKind::CrossAttn)
        .map(|(l, lv)| held_scores(batch * lv.heads as f64 * positions(l) * positions(l)))
        .fold(0.0, f64::max);
    let latents = 4.0 * batch * latent_channels as f64 * positions(0) * F32;
    let denoising = skips + working + residuals + scores + latents;

    // 2. Decoding: the decoder's last level runs at full size with the VAE's first channel count; its mid block
    //    attends over the latent pixels with one head. Tiling decodes one tile of `sample_size` at a time.
    let full_channels = vae.block_out_channels.first().copied().unwrap_or(0) as f64;
    // One VAE pass (decoder, or its mirror the encoder) over an h × w picture: activations and attention scores.
    let vae_pass = |h: f64, w: f64| {
        let latent_pixels = (h / factor as f64).ceil() * (w / factor as f64).ceil();
        VAE_WORKING_TENSORS * full_channels * h * w * n * F32 + held_scores(n * latent_pixels * latent_pixels)
    };
    let (dec_h, dec_w) = if shape.vae_tiling {
        let tile = vae.sample_size.first() as f64;
        (tile.min(h), tile.min(w))
    } else {
        (h, w)
    };
    let decoding = vae_pass(dec_h, dec_w) + OUTPUT_BYTES_PER_PIXEL * h * w * n;

    // 3. Encoding: the encoder at full size (never tiled) and the picture as f32.
    let encoding = if shape.encodes_picture { vae_pass(h, w) + 3.0 * h * w * n * F32 } else { 0.0 };

    let conditions = CONDITION_BYTES_PER_PIXEL * h * w * shape.controlnets as f64;
    // `as u64` saturates: an absurd request reads as u64::MAX bytes, still refused.
    let total = conditions + denoising.max(decoding).max(encoding);
    MemoryEstimate {
        denoising: denoising as u64,
        attention_scores: scores as u64,
        decoding: decoding as u64,
        encoding: encoding as u64,
        conditions: conditions as u64,
        total: total as u64,
    }
}

/// Bytes of attention scores held at once for `elements` scores in all: queries run in blocks of at most
/// `MAX_SCORES` scores.
fn held_scores(elements: f64) -> f64 {
    elements.min(MAX_SCORES as f64) * F32
}

impl MemoryEstimate {
    /// Refuses the request when it cannot fit in `available` bytes (see `memory::available_bytes`), naming
    /// `setting`, the size and the largest parts.
    pub fn check(&self, setting: &str, width: usize, height: usize, available: Option<u64>) -> crate::Result<()> {
        use crate::memory::format_bytes;
        let mut what = format!(
            "a {width}x{height} image (attention scores {}, denoising {}, decoding {}",
            format_bytes(self.attention_scores),
            format_bytes(self.denoising),
            format_bytes(self.decoding)
        );
        if self.encoding > 0 {
            what.push_str(&format!(", encoding the picture {}", format_bytes(self.encoding)));
        }
        what.push(')');
        crate::memory::check_fits(setting, &what, self.total, available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD1.5's UNet levels: 320/640/1280/1280 channels, 8 heads, attention on the first three.
    fn sd15_levels() -> Vec<Level> {
        [320, 640, 1280, 1280]
            .iter()
            .enumerate()
            .map(|(i, &channels)| Level {
                kind: if i < 3 { BlockKind::CrossAttn } else { BlockKind::Plain },
                channels,
                layers: 2,
                heads: 8,
                transformer_layers: 1,
            })
            .collect()
    }

    fn sd15_vae() -> AutoencoderKLConfig {
        serde_json::from_str(
            r#"{"block_out_channels": [128, 256, 512, 512], "sample_size": 512,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        )
        .unwrap()
    }

    fn shape(width: usize, height: usize) -> RequestShape {
        RequestShape {
            width,
            height,
            num_images: 1,
            guided: true,
            controlnets: 1,
            vae_tiling: false,
            encodes_picture: false,
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_512px_sd15_request_needs_a_few_gib() {
        let e = estimate(&sd15_levels(), 4, &sd15_vae(), shape(512, 512));
        // The 4096-token scores of a guided batch with 8 heads (2 · 8 · 4096² = 2^28) are held a block of 2^24
        // at a time.
        assert_eq!(e.attention_scores, (MAX_SCORES * 4) as u64);
        assert!(e.total > GIB / 4 && e.total < 4 * GIB, "{e:?}");
    }

    #[test]
    fn huge_sizes_need_more_than_any_machine() {
        let e = estimate(&sd15_levels(), 4, &sd15_vae(), shape(100_000, 100_000));
        assert!(e.total > 1 << 40, "{e:?}");
        // One huge side is enough: the decoder's activations at 100000 x 512.
        let e = estimate(&sd15_levels(), 4, &sd15_vae(), shape(100_000, 512));
        assert!(e.decoding > 16 * GIB, "{e:?}");
        let err = e.check("width", 100_000, 512, Some(16 * GIB)).unwrap_err().to_string();
        assert!(err.starts_with("width: a 100000x512 image (attention scores ") && err.contains("16.0 GiB available"));
    }

    #[test]
    fn tiled_decoding_needs_one_tile() {
        let plain = estimate(&sd15_levels(), 4, &sd15_vae(), shape(2048, 2048));
        let tiled = estimate(&sd15_levels(), 4, &sd15_vae(), RequestShape { vae_tiling: true, ..shape(2048, 2048) });
        assert!(tiled.decoding * 4 < plain.decoding, "{plain:?} vs {tiled:?}");
        assert_eq!(tiled.denoising, plain.denoising);
    }

    #[test]
    fn an_encoded_picture_counts_the_encoder() {
        let txt2img = estimate(&sd15_levels(), 4, &sd15_vae(), shape(2048, 2048));
        assert_eq!(txt2img.encoding, 0);
        let img2img =
            estimate(&sd15_levels(), 4, &sd15_vae(), RequestShape { encodes_picture: true, ..shape(2048, 2048) });
        // the encoder's first level is as wide as the decoder's last, plus the f32 picture
        assert!(img2img.encoding > txt2img.decoding / 2, "{img2img:?}");
        // tiled decoding no longer bounds the peak: the encoder is not tiled
        let tiled = RequestShape { encodes_picture: true, vae_tiling: true, ..shape(2048, 2048) };
        let tiled = estimate(&sd15_levels(), 4, &sd15_vae(), tiled);
        assert!(tiled.total >= tiled.encoding && tiled.encoding > 4 * tiled.decoding, "{tiled:?}");
        let err = img2img.check("width", 2048, 2048, Some(1 << 20)).unwrap_err().to_string();
        assert!(err.contains(", encoding the picture "), "{err}");
    }
}
