//! A1111's ControlNet "Control Mode" per unit, as the sd-webui-controlnet extension implements it.
//!
//! The extension turns the mode into two switches (`soft_injection`: any mode but Balanced; `cfg_injection`:
//! "ControlNet is more important" only) and applies them to the net's 13 residuals (12 down + mid for SD 1.x/2.x):
//! - soft injection: residual `i` is multiplied by `weight * 0.825^(12 - i)` instead of `weight` (0.0995 for the
//!   first, 1 for the mid block); SDXL nets (10 residuals) take the first 10 of those 13 numbers, so their mid
//!   block gets `0.825^3`;
//! - cfg injection: the residuals of the unconditional half of the batch are zeroed (`control * cond_mark`), so
//!   the ControlNet pushes only the prompt side and classifier-free guidance amplifies it.
use std::fmt;
use std::str::FromStr;

use crate::model::controlnet::ControlNetOutput;
use crate::{Error, Result};

/// The ratio between the weights of neighbouring levels in soft injection (the extension's magic number).
const SOFT_RATIO: f64 = 0.825;
/// The level that gets weight 1 in soft injection: the mid block of SD's 13 residuals.
const SOFT_TOP_LEVEL: i32 = 12;

/// How one ControlNet unit balances itself against the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ControlMode {
    /// Every residual times the weight, on both halves of the guidance batch (plain diffusers).
    #[default]
    Balanced,
    /// "My prompt is more important": soft injection.
    Prompt,
    /// "ControlNet is more important": soft injection, and on the conditional half only.
    ControlNet,
}

impl ControlMode {
    pub const ALL: [ControlMode; 3] = [ControlMode::Balanced, ControlMode::Prompt, ControlMode::ControlNet];

    /// Our name (`--control-mode`, metadata).
    pub fn cli_name(self) -> &'static str {
        match self {
            ControlMode::Balanced => "balanced",
            ControlMode::Prompt => "prompt",
            ControlMode::ControlNet => "controlnet",
        }
    }

    /// The extension's label (its API's `control_mode` string and the infotext's "Control Mode").
    pub fn a1111_name(self) -> &'static str {
        match self {
            ControlMode::Balanced => "Balanced",
            ControlMode::Prompt => "My prompt is more important",
            ControlMode::ControlNet => "ControlNet is more important",
        }
    }

    /// Balanced, the default (metadata leaves it out).
    pub fn is_balanced(&self) -> bool {
        *self == ControlMode::Balanced
    }

    /// The extension API's integer for the mode (its enum's order).
    pub fn a1111_index(self) -> u64 {
        match self {
            ControlMode::Balanced => 0,
            ControlMode::Prompt => 1,
            ControlMode::ControlNet => 2,
        }
    }

    /// From the extension API's integer.
    pub fn from_a1111_index(i: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.a1111_index() == i)
    }

    /// The residuals reach only the conditional half of the guidance batch (`cfg_injection`).
    pub fn conditional_only(self) -> bool {
        self == ControlMode::ControlNet
    }

    /// The weight of each of `levels` residuals (down blocks first, mid block last) for a unit of strength
    /// `weight`; `None` when every level gets `weight` (Balanced).
    pub fn level_scales(self, weight: f64, levels: usize) -> Option<Vec<f64>> {
        if self == ControlMode::Balanced {
            return None;
        }
        Some((0..levels).map(|i| weight * SOFT_RATIO.powf(f64::from(SOFT_TOP_LEVEL - i as i32))).collect())
    }

    /// `out` (computed at strength 1) with this mode's per-level weights for strength `weight`.
    pub fn scale(self, out: ControlNetOutput, weight: f64) -> candle_core::Result<ControlNetOutput> {
        let levels = out.down_block_res_samples.len() + 1;
        let scales = self.level_scales(weight, levels).unwrap_or_else(|| vec![weight; levels]);
        let down =
            out.down_block_res_samples.iter().zip(&scales).map(|(t, &s)| t * s).collect::<candle_core::Result<_>>()?;
        let mid = (&out.mid_block_res_sample * scales[levels - 1])?;
        Ok(ControlNetOutput { down_block_res_samples: down, mid_block_res_sample: mid })
    }

    fn valid_names() -> String {
        Self::ALL.map(|m| format!("{} ({:?})", m.cli_name(), m.a1111_name())).join(", ")
    }
}

impl FromStr for ControlMode {
    type Err = Error;

    /// Ours (`prompt`) or the extension's label (`"My prompt is more important"`), case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|m| m.cli_name() == wanted || m.a1111_name().to_ascii_lowercase() == wanted)
            .ok_or_else(|| {
                Error::setting("control_mode", format!("{s:?} is not a control mode; use {}", Self::valid_names()))
            })
    }
}

impl fmt::Display for ControlMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl serde::Serialize for ControlMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.cli_name())
    }
}

impl<'de> serde::Deserialize<'de> for ControlMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// `[w * 0.825 ** float(12 - i) for i in range(13)]` with w = 0.7, printed by
    /// tools/fixtures/gen_control_mode.py (the extension's formula); SDXL takes the first 10.
    const SOFT_SD15_W07: [f64; 13] = [
        0.06958977344435982,
        0.08435124053861796,
        0.10224392792559754,
        0.12393203384920914,
        0.15022064708995048,
        0.18208563283630363,
        0.22070985798339834,
        0.26752710058593737,
        0.3242752734374999,
        0.39306093749999993,
        0.4764374999999999,
        0.5774999999999999,
        0.7,
    ];

    #[test]
    fn soft_injection_weights_are_the_extensions() {
        assert_eq!(ControlMode::Balanced.level_scales(0.7, 13), None);
        for mode in [ControlMode::Prompt, ControlMode::ControlNet] {
            let s = mode.level_scales(0.7, 13).unwrap();
            for (a, b) in s.iter().zip(SOFT_SD15_W07) {
                assert!((a - b).abs() < 1e-12, "{mode}: {a} vs {b}");
            }
            // SDXL: the first ten, so the mid block is not at full weight.
            let xl = mode.level_scales(0.7, 10).unwrap();
            assert_eq!(xl.len(), 10);
            assert!((xl[9] - SOFT_SD15_W07[9]).abs() < 1e-12);
        }
    }

    #[test]
    fn only_controlnet_is_more_important_skips_the_unconditional_half() {
        let only: Vec<_> = ControlMode::ALL.into_iter().filter(|m| m.conditional_only()).collect();
        assert_eq!(only, [ControlMode::ControlNet]);
    }

    #[test]
    fn scale_multiplies_each_level() -> candle_core::Result<()> {
        let ones = Tensor::ones((1, 2, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
        let out = ControlNetOutput { down_block_res_samples: vec![ones.clone(); 12], mid_block_res_sample: ones };
        let out = ControlMode::Prompt.scale(out, 0.7)?;
        let first = out.down_block_res_samples[0].flatten_all()?.to_vec1::<f32>()?;
        assert!((first[0] as f64 - SOFT_SD15_W07[0]).abs() < 1e-6);
        let mid = out.mid_block_res_sample.flatten_all()?.to_vec1::<f32>()?;
        assert!((mid[3] - 0.7).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn names_parse_both_ways() {
        for m in ControlMode::ALL {
            assert_eq!(m.cli_name().parse::<ControlMode>().unwrap(), m);
            assert_eq!(m.a1111_name().to_uppercase().parse::<ControlMode>().unwrap(), m);
            assert_eq!(ControlMode::from_a1111_index(m.a1111_index()), Some(m));
        }
        let err = "strong".parse::<ControlMode>().unwrap_err().to_string();
        assert!(err.contains("control_mode") && err.contains("balanced"), "{err}");
    }
}
