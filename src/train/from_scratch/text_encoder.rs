//! Part 1 of a from-scratch run: the CLIP text encoder at its seeded random start and the real CLIP tokenizer.
//! The encoder then trains with the UNet unless the run freezes it ([`super::unet`]).
use candle_core::DType;
use serde_json::{json, Value};

use super::{is_complete, Run, TEXT_SEED_OFFSET};
use crate::io::single_file::bundled_tokenizer;
use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::train::files::{self, Entry};
use crate::train::params::TensorMap;
use crate::train::random_weights;
use crate::{Error, Result};

/// Text encoder weights file (transformers' name).
pub const TEXT_WEIGHTS: &str = "model.safetensors";

/// The text encoder's config.
pub(super) fn config(config: &Value) -> Result<ClipTextConfig> {
    serde_json::from_value(config.clone()).map_err(|e| Error::Invalid(format!("text encoder config: {e}")))
}

/// Writes `text_encoder/` (unless there) and `tokenizer/` (unless there).
pub(super) fn write_initial(run: &Run) -> Result<()> {
    let text_config = config(&run.arch.text_encoder)?;
    if !is_complete(&run.model_dir.join("text_encoder"), TEXT_WEIGHTS) {
        let seed = run.settings.seed.wrapping_add(TEXT_SEED_OFFSET);
        let tensors = random_weights::draw(seed, |vb| ClipTextModel::new(text_config.clone(), vb))?;
        // Stored in half precision (half the size; the largest file of the demo). A frozen encoder is used with
        // exactly these values, converted to f32 on load; a trained one starts from them and is written back
        // in f32.
        let tensors =
            tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F16)?))).collect::<Result<TensorMap>>()?;
        files::write_folder(
            &run.model_dir.join("text_encoder"),
            &[Entry::Json("config.json", &run.arch.text_encoder), Entry::Tensors(TEXT_WEIGHTS, &tensors)],
        )?;
    }
    if !run.model_dir.join("tokenizer").join("merges.txt").is_file() {
        let bundled = bundled_tokenizer("<|endoftext|>")?;
        let config = json!({ "model_max_length": 77, "pad_token": "<|endoftext|>" });
        files::write_folder(
            &run.model_dir.join("tokenizer"),
            &[
                Entry::Text("vocab.json", &bundled.vocab_json),
                Entry::Text("merges.txt", &bundled.merges_txt),
                Entry::Json("tokenizer_config.json", &config),
            ],
        )?;
    }
    Ok(())
}
