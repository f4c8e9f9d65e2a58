//! LoRA files: the kohya / A1111 layout and the diffusers / PEFT layouts, read into one form.
//!
//! A LoRA adds `up @ down` (times `alpha / rank` and the user's weight) to a weight of the UNet or a text
//! encoder. Every file is read into [`LoraFile::modules`], keyed by the [`Part`] it changes and the *flat*
//! name of the changed module: its diffusers / transformers path with `.` replaced by `_` and, for the text
//! encoders, without `text_model.` (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`,
//! `encoder_layers_0_mlp_fc1`). kohya names are flat already; flattening the others makes one lookup serve
//! all layouts. The model layer's `lora` module matches them against the weights as the model loads.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The model part a LoRA module changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::TextEncoder => "text encoder",
            Part::TextEncoder2 => "text encoder 2",
        }
    }
}

/// Which naming a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_unet_*` / `lora_te_*` / `lora_te1_*` / `lora_te2_*` with `.lora_down` / `.lora_up` / `.alpha`.
    Kohya,
    /// diffusers / PEFT: `unet.*.lora_A` / `lora_B` (and diffusers' older `processor.to_q_lora.down` / `up`).
    Peft,
}

/// One low-rank pair: `down` is [rank, in] or [rank, in, kh, kw], `up` is [out, rank] or [out, rank, 1, 1].
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    /// kohya's `alpha`; `None`: scale 1 (PEFT files carry no alpha; diffusers then uses alpha = rank).
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// `alpha / rank`, the factor kohya and diffusers put on `up @ down`.
    pub fn scale(&self) -> f64 {
        match self.alpha {
            Some(alpha) if self.rank() > 0 => alpha / self.rank() as f64,
            _ => 1.0,
        }
    }
}

/// A LoRA's multipliers: A1111's `<lora:name:TE:UNET>` gives the text encoders and the UNet their own (the UNet's
/// is the text encoders' unless set). The user's weight on top of the file's `alpha / rank`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraWeight {
    /// Both text encoders (SDXL's second too, as A1111 and diffusers' `set_adapters` do).
    pub text_encoder: f64,
    pub unet: f64,
}

impl LoraWeight {
    /// One multiplier for every part.
    pub fn uniform(weight: f64) -> Self {
        Self { text_encoder: weight, unet: weight }
    }

    /// The multiplier of one model part.
    pub fn of(self, part: Part) -> f64 {
        match part {
            Part::Unet => self.unet,
            Part::TextEncoder | Part::TextEncoder2 => self.text_encoder,
        }
    }

    pub fn is_finite(self) -> bool {
        self.text_encoder.is_finite() && self.unet.is_finite()
    }
}

impl From<f64> for LoraWeight {
    fn from(weight: f64) -> Self {
        Self::uniform(weight)
    }
}

/// `TE` when both are the same, else `TE:UNET` (A1111's tag order, and `--lora FILE:TE:UNET`'s).
impl std::fmt::Display for LoraWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.text_encoder == self.unet {
            write!(f, "{}", self.unet)
        } else {
            write!(f, "{}:{}", self.text_encoder, self.unet)
        }
    }
}

/// The model family a LoRA was made for, as far as its names and shapes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFamily {
    Sd1,
    Sd2,
    Sdxl,
    Unknown,
}

impl LoraFamily {
    pub fn name(self) -> &'static str {
        match self {
            LoraFamily::Sd1 => "SD 1.x",
            LoraFamily::Sd2 => "SD 2.x",
            LoraFamily::Sdxl => "SDXL",
            LoraFamily::Unknown => "an unknown model family",
        }
    }
}

/// A LoRA file read into flat module names (see the module docs).
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub modules: BTreeMap<(Part, String), LoraModule>,
    /// Keys read but not applied (full-weight `.diff` tensors): the caller warns.
    pub ignored: Vec<String>,
}

/// What one key of a LoRA file is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// The key map, every layout in one place: a LoRA key → (part, flat module name, role). `None`: not a LoRA key.
///
/// | layout | example |
/// | --- | --- |
/// | kohya | `lora_unet_mid_block_attentions_0_proj_in.lora_down.weight`, `….alpha`, `lora_te1_text_model_…` |
/// | PEFT | `unet.mid_block.attentions.0.proj_in.lora_A.weight` (`lora_B`), `text_encoder.text_model.…` |
/// | diffusers LoRACompatible | `unet.….proj_in.lora.down.weight` (`up`), `….lora_linear_layer.down.weight` |
/// | diffusers attention processors | `unet.….attn1.processor.to_q_lora.down.weight` (`to_out_lora` → `to_out.0`; in a text encoder `q_proj` … `out_proj`) |
fn map_key(key: &str) -> Option<(LoraFormat, Part, String, Role)> {
    // kohya: a flat module name, then the role.
    const KOHYA_PARTS: &[(&str, Part)] = &[
        ("lora_unet_", Part::Unet),
        ("lora_te1_", Part::TextEncoder),
        ("lora_te2_", Part::TextEncoder2),
        ("lora_te_", Part::TextEncoder),
    ];
    const KOHYA_ROLES: &[(&str, Role)] =
        &[(".lora_down.weight", Role::Down), (".lora_up.weight", Role::Up), (".alpha", Role::Alpha)];
    for (prefix, part) in KOHYA_PARTS {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, role) in KOHYA_ROLES {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Some((LoraFormat::Kohya, *part, flat(*part, module), *role));
                }
            }
            return None;
        }
    }
    // diffusers / PEFT: a part prefix (none: the UNet, as diffusers' oldest files), a dotted module, the role.
    const PEFT_PARTS: &[(&str, Part)] =
        &[("unet.", Part::Unet), ("text_encoder_2.", Part::TextEncoder2), ("text_encoder.", Part::TextEncoder)];
    let (part, rest) =
        PEFT_PARTS.iter().find_map(|(p, part)| key.strip_prefix(p).map(|r| (*part, r))).unwrap_or((Part::Unet, key));
    const PEFT_ROLES: &[(&str, Role)] = &[
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        (".lora_linear_layer.down.weight", Role::Down),
        (".lora_linear_layer.up.weight", Role::Up),
        ("_lora.down.weight", Role::Down),
        ("_lora.up.weight", Role::Up),
        (".alpha", Role::Alpha),
    ];
    for (suffix, role) in PEFT_ROLES {
        let Some(module) = rest.strip_suffix(suffix) else { continue };
        // Attention processors: `attn1.processor.to_q` → `attn1.to_q` (text encoders: `self_attn.q_proj`).
        let module = match suffix.starts_with("_lora") {
            true => {
                let (attn, proj) = module.rsplit_once('.')?;
                let attn = attn.strip_suffix(".processor").unwrap_or(attn);
                let proj = match (proj, part == Part::Unet) {
                    ("to_out", true) => "to_out.0",
                    ("to_q", false) => "q_proj",
                    ("to_k", false) => "k_proj",
                    ("to_v", false) => "v_proj",
                    ("to_out", false) => "out_proj",
                    (other, _) => other,
                };
                format!("{attn}.{proj}")
            }
            false => module.to_string(),
        };
        return Some((LoraFormat::Peft, part, flat(part, &module), *role));
    }
    None
}

/// A module name flattened as kohya writes it; text encoder names lose `text_model_` (our loader accepts both).
fn flat(part: Part, module: &str) -> String {
    let module = module.replace('.', "_");
    match part {
        Part::Unet => module,
        _ => module.strip_prefix("text_model_").map(str::to_string).unwrap_or(module),
    }
}

/// Keys of LyCORIS networks this reader does not apply (LoHa, LoKr, DoRA): refused by name.
const UNSUPPORTED: &[(&str, &str)] =
    &[("hada_w1", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA"), ("lokr_w2", "LoKr")];

/// One module's `lora_down`, `lora_up` and `alpha`, as they are found.
type DownUpAlpha = (Option<Tensor>, Option<Tensor>, Option<f64>);

impl LoraFile {
    /// Reads a LoRA `.safetensors` file (tensors as f32 on the CPU). Errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        super::weights::check_safetensors(path)?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::weights(path, e))?;
        Self::from_tensors(path, tensors)
    }

    pub fn from_tensors(path: &Path, tensors: std::collections::HashMap<String, Tensor>) -> Result<Self> {
        if let Some((_, kind)) = tensors.keys().find_map(|k| UNSUPPORTED.iter().find(|(m, _)| k.contains(m))) {
            return Err(Error::weights(path, format!("is a LyCORIS {kind} network: LoHa/LoKr not supported yet")));
        }
        let mut parts: BTreeMap<(Part, String), DownUpAlpha> = BTreeMap::new();
        let mut format = None;
        let mut ignored = Vec::new();
        let mut unknown = Vec::new();
        for (key, t) in tensors {
            let Some((fmt, part, module, role)) = map_key(&key) else {
                if key.ends_with(".diff") || key.ends_with(".diff_b") {
                    ignored.push(key);
                } else {
                    unknown.push(key);
                }
                continue;
            };
            format.get_or_insert(fmt);
            let t = t.to_dtype(DType::F32).map_err(|e| Error::weights(path, format!("{key}: {e}")))?;
            let entry = parts.entry((part, module)).or_default();
            match role {
                Role::Down => entry.0 = Some(t),
                Role::Up => entry.1 = Some(t),
                Role::Alpha => {
                    let a = t.flatten_all().and_then(|t| t.to_vec1::<f32>());
                    entry.2 = a.ok().and_then(|v| v.first().copied()).map(f64::from);
                }
            }
        }
        let Some(format) = format else {
            return Err(Error::weights(path, "no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys)"));
        };
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::weights(
                path,
                format!(
                    "{} keys are not LoRA keys, e.g. {}",
                    unknown.len(),
                    unknown[..unknown.len().min(3)].join(", ")
                ),
            ));
        }
        let mut modules = BTreeMap::new();
        for ((part, module), (down, up, alpha)) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(Error::weights(
                    path,
                    format!("{} module {module}: down and up weights must both be there", part.name()),
                ));
            };
            let (rank_d, rank_u) = (down.dims().first().copied(), up.dims().get(1).copied());
            if rank_d != rank_u || down.rank() < 2 || up.rank() < 2 {
                return Err(Error::weights(
                    path,
                    format!("{module}: down {:?} and up {:?} are not a low-rank pair", down.dims(), up.dims()),
                ));
            }
            modules.insert((part, module), LoraModule { down, up, alpha });
        }
        ignored.sort();
        Ok(Self { path: path.to_path_buf(), format, modules, ignored })
    }

    /// The largest rank of its modules.
    pub fn rank(&self) -> usize {
        self.modules.values().map(LoraModule::rank).max().unwrap_or(0)
    }

    /// The family it was made for: SDXL when it changes a second text encoder or names the UNet as SDXL's
    /// kohya files do (LDM `input_blocks`), else by the width of the text a cross-attention reads
    /// (768: SD 1.x, 1024: SD 2.x, 2048: SDXL).
    pub fn family(&self) -> LoraFamily {
        let ldm = |m: &str| {
            m.starts_with("input_blocks_") || m.starts_with("output_blocks_") || m.starts_with("middle_block_")
        };
        if self.modules.keys().any(|(p, m)| *p == Part::TextEncoder2 || (*p == Part::Unet && ldm(m))) {
            return LoraFamily::Sdxl;
        }
        let cross = self
            .modules
            .iter()
            .find(|((p, m), _)| *p == Part::Unet && (m.ends_with("attn2_to_k") || m.ends_with("attn2_to_v")));
        match cross.and_then(|(_, lm)| lm.down.dims().get(1).copied()) {
            Some(768) => LoraFamily::Sd1,
            Some(1024) => LoraFamily::Sd2,
            Some(2048) => LoraFamily::Sdxl,
            _ => LoraFamily::Unknown,
        }
    }

    /// A one-line description for `inspect`.
    pub fn describe(&self) -> String {
        let count = |part: Part| self.modules.keys().filter(|(p, _)| *p == part).count();
        let format = match self.format {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "diffusers/PEFT",
        };
        let family = self.family();
        let target = if family == LoraFamily::Unknown {
            "unknown target family".to_string()
        } else {
            format!("for {}", family.name())
        };
        format!(
            "a LoRA ({format} format, rank {}, {target}: {} UNet, {} text encoder, {} text encoder 2 modules)",
            self.rank(),
            count(Part::Unet),
            count(Part::TextEncoder),
            count(Part::TextEncoder2)
        )
    }
}

/// Whether a safetensors header's keys look like a LoRA (for `detect`).
pub fn looks_like_lora<'a>(mut keys: impl Iterator<Item = &'a str>) -> bool {
    keys.any(|k| {
        k.ends_with(".lora_down.weight")
            || k.ends_with(".lora_A.weight")
            || k.ends_with("_lora.down.weight")
            || k.ends_with(".lora.down.weight")
            || UNSUPPORTED.iter().any(|(m, _)| k.contains(m))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_maps_to_the_same_flat_name() {
        let cases = [
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                Part::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                Part::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
                Part::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
                Part::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                Part::TextEncoder,
                "encoder_layers_0_self_attn_q_proj",
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",
                Part::TextEncoder,
                "encoder_layers_0_self_attn_q_proj",
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.processor.to_out_lora.down.weight",
                Part::TextEncoder,
                "encoder_layers_0_self_attn_out_proj",
            ),
            (
                "lora_te2_text_model_encoder_layers_3_mlp_fc2.lora_down.weight",
                Part::TextEncoder2,
                "encoder_layers_3_mlp_fc2",
            ),
            (
                "text_encoder_2.text_model.encoder.layers.3.mlp.fc2.lora_A.weight",
                Part::TextEncoder2,
                "encoder_layers_3_mlp_fc2",
            ),
        ];
        for (key, part, module) in cases {
            let (_, p, m, role) = map_key(key).unwrap_or_else(|| panic!("{key} not mapped"));
            assert_eq!((p, m.as_str(), role), (part, module, Role::Down), "{key}");
        }
        assert_eq!(map_key("lora_unet_mid_block_resnets_0_conv1.alpha").unwrap().3, Role::Alpha);
        assert!(map_key("model.diffusion_model.input_blocks.0.0.weight").is_none());
    }

    #[test]
    fn loha_is_refused_by_name() {
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let tensors = [("lora_unet_x.hada_w1_a".to_string(), t)].into_iter().collect();
        let err = LoraFile::from_tensors(Path::new("loha.safetensors"), tensors).unwrap_err().to_string();
        assert!(err.contains("LoHa/LoKr not supported yet") && err.contains("loha.safetensors"), "{err}");
    }

    #[test]
    fn fixtures_read_with_rank_alpha_and_family() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
        let kohya = LoraFile::read(&dir.join("tiny-kohya.safetensors")).unwrap();
        assert_eq!((kohya.format, kohya.rank(), kohya.modules.len()), (LoraFormat::Kohya, 4, 8));
        let conv = &kohya.modules[&(Part::Unet, "down_blocks_0_resnets_0_conv1".to_string())];
        assert_eq!((conv.down.dims(), conv.scale()), (&[4, 32, 3, 3][..], 0.5));
        let peft = LoraFile::read(&dir.join("tiny-peft.safetensors")).unwrap();
        assert_eq!(peft.format, LoraFormat::Peft);
        assert!(peft.modules.contains_key(&(Part::TextEncoder, "encoder_layers_1_self_attn_v_proj".to_string())));
        assert!(peft.describe().contains("diffusers/PEFT format, rank 4"), "{}", peft.describe());
    }
}
