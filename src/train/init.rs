//! A new ControlNet from a base UNet: diffusers' `ControlNetModel.from_unet`, the original repo's
//! `tool_add_control.py`.
//!
//! - The encoder (`conv_in`, `time_embedding`, `down_blocks`, `mid_block`) is copied from the UNet: the
//!   trainable copy starts as the locked model's own encoder.
//! - The zero convolutions (`controlnet_down_blocks.*`, `controlnet_mid_block`) and the hint encoder's last
//!   convolution (`controlnet_cond_embedding.conv_out`) are exactly zero, so the new ControlNet adds nothing:
//!   the first training step starts from the base model's behaviour.
//! - The rest of the hint encoder gets PyTorch's default `nn.Conv2d` initialisation: `kaiming_uniform_(a=√5)`
//!   for the weights, i.e. U(−b, b) with b = √3 · √(2 / (1 + 5)) / √fan_in = 1/√fan_in, and U(−1/√fan_in,
//!   1/√fan_in) for the biases, drawn from a torch-compatible generator seeded with `seed` in the order in which
//!   `ControlNetModel.__init__` creates its layers (`conv_in`, `time_embedding.linear_1/2`, then the hint
//!   encoder). So `init --seed S` equals `torch.manual_seed(S); ControlNetModel.from_unet(unet)`, value for
//!   value (checked against a fixture).
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::params::TensorMap;
use std::path::Path;

use crate::io::checkpoint::Checkpoint;
use crate::io::detect::ModelKind;
use crate::io::single_file::{load_sd_checkpoint_with, SdOptions};
use crate::io::weights::{find_safetensors, read_json, DIFFUSERS_STEM};
use crate::model::controlnet::{ControlNetConfig, ControlNetModel};
use crate::model::unet::UNet2DConditionConfig;
use crate::pipeline::sd::LoadOptions;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The hint encoder's stage widths diffusers and the original ControlNet use.
pub const DEFAULT_HINT_CHANNELS: [usize; 4] = [16, 32, 96, 256];
/// The time embedding is this many times wider than the first block (diffusers' `time_embed_dim`).
const TIME_EMBED_MULT: usize = 4;
/// Keys of the UNet encoder that the ControlNet copies (diffusers' `from_unet` loads exactly these modules).
/// SDXL's `add_embedding` (size/crop and pooled-text conditioning) is copied too.
const COPIED_PREFIXES: [&str; 5] = ["conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block."];
/// UNet config keys `from_unet` passes on to the ControlNet (the encoder's shape).
const COPIED_CONFIG_KEYS: [&str; 27] = [
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "transformer_layers_per_block",
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
];
/// The diffusers version whose config layout we write.
const DIFFUSERS_VERSION: &str = "0.42.1";

/// What `init` may choose.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Channels of the condition image (3 for RGB maps; 1 for a grey map, 4 for RGB + mask, ...).
    pub conditioning_channels: usize,
    /// The hint encoder's stage widths.
    pub hint_channels: Vec<usize>,
    /// Seed of the hint encoder's random initialisation (as `torch.manual_seed`).
    pub seed: u64,
    /// How much smaller than the image the base model's latents are (8 for every Stable Diffusion VAE): the
    /// hint encoder must take the condition down as much, one stride-2 step per pair of stages.
    pub vae_scale_factor: usize,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self { conditioning_channels: 3, hint_channels: DEFAULT_HINT_CHANNELS.to_vec(), seed: 0, vae_scale_factor: 8 }
    }
}

/// How each tensor of the new ControlNet was made (the summary `tool_add_control.py` prints).
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    /// Copied from the UNet.
    pub copied: Vec<String>,
    /// New, exactly zero (zero convolutions and the hint encoder's output).
    pub zero: Vec<String>,
    /// New, randomly initialised (the hint encoder).
    pub random: Vec<String>,
}

/// A new ControlNet: its diffusers `config.json` value and its tensors (f32, on the CPU).
pub struct NewControlNet {
    pub config: Value,
    pub tensors: TensorMap,
    pub report: InitReport,
}

/// The base model's UNet: its `config.json` value and tensors (as stored), from `--model` given as a diffusers
/// pipeline folder, a single-file SD checkpoint, or a hub id.
pub fn load_base_unet(spec: &str, opts: &LoadOptions) -> Result<(Value, TensorMap)> {
    let path = crate::io::hub::resolve(spec, opts.variant.as_deref()).map_err(|e| Error::setting("model", e))?;
    check_is_base_model(&path)?;
    if path.is_dir() {
        let dir = path.join("unet");
        let config: Value = read_json(&dir.join("config.json"))?;
        let mut tensors = TensorMap::new();
        for file in find_safetensors(&dir, DIFFUSERS_STEM)? {
            tensors.extend(Checkpoint::open(&file)?.load_where(|_| true)?);
        }
        return Ok((config, tensors));
    }
    if !path.is_file() {
        return Err(Error::setting("model", format!("{spec}: no such file or folder")));
    }
    let sd_opts = SdOptions { prediction_type: opts.prediction_type, config_dir: opts.config_dir.clone() };
    let c = load_sd_checkpoint_with(&path, &sd_opts)?;
    Ok((c.unet.config, c.unet.tensors))
}

/// How much smaller than the image the latents of the base model at `path` are: from its `vae/config.json`
/// (2 per level after the first), 8 for a single-file checkpoint (every Stable Diffusion VAE).
pub fn vae_scale_factor(path: &Path) -> Result<usize> {
    let config = path.join("vae").join("config.json");
    if !config.is_file() {
        return Ok(8);
    }
    let value: Value = read_json(&config)?;
    let levels = value["block_out_channels"].as_array().map(Vec::len).unwrap_or(4);
    Ok(1 << levels.saturating_sub(1))
}

/// Refuses a `--model` that is some other kind of weights (a ControlNet, a lone UNet), saying what it is.
fn check_is_base_model(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(()); // said below, with the path
    }
    let base = path.is_dir() && path.join("unet").join("config.json").is_file();
    if base {
        return Ok(());
    }
    let found = match crate::io::inspect::inspect(path) {
        Ok(i) if matches!(i.kind, ModelKind::SdCheckpoint | ModelKind::Pipeline) => return Ok(()),
        Ok(i) => format!("{} ({})", i.kind, i.description),
        Err(e) => format!("not readable as model weights ({e})"),
    };
    Err(Error::setting(
        "model",
        format!(
            "{} is a {found}; expected a Stable Diffusion base model: a diffusers pipeline folder (with unet/) or a \
             single-file checkpoint",
            path.display()
        ),
    ))
}

/// Builds the ControlNet of `unet_config` / `unet` (a UNet's config.json value and its tensors by diffusers
/// name). Fails if the UNet lacks a tensor the encoder needs, naming it.
pub fn controlnet_from_unet(unet_config: &Value, unet: &TensorMap, opts: &InitOptions) -> Result<NewControlNet> {
    let config = controlnet_config(unet_config, opts)?;
    let parsed: ControlNetConfig =
        serde_json::from_value(config.clone()).map_err(|e| Error::Invalid(format!("ControlNet config: {e}")))?;
    let enc = &parsed.encoder;
    enc.levels().map_err(|m| Error::Invalid(format!("base UNet config: {m}")))?;
    let dev = Device::Cpu;
    let mut tensors = TensorMap::new();
    let mut report = InitReport::default();

    // 1. The encoder, copied.
    for (name, t) in unet {
        if COPIED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            tensors.insert(name.clone(), t.to_dtype(DType::F32)?.to_device(&dev)?);
            report.copied.push(name.clone());
        }
    }

    // 2. The hint encoder, drawn as torch draws it after conv_in and the time embedding.
    let mut rng = TorchGenerator::new(opts.seed);
    let c0 = enc.block_out_channels[0];
    let time_dim = TIME_EMBED_MULT * c0;
    let k = enc.conv_in_kernel;
    // Draws made (and discarded) for the layers the UNet's weights then overwrite.
    let mut discarded = vec![
        (enc.in_channels * k * k, c0 * enc.in_channels * k * k, c0),
        (c0, time_dim * c0, time_dim),
        (time_dim, time_dim * time_dim, time_dim),
    ];
    // SDXL: `add_embedding.linear_1/2` come next in `__init__` (text_time), before the hint encoder.
    if let Some((_, input_dim)) = enc.text_time_dims().map_err(Error::Invalid)? {
        discarded.push((input_dim, time_dim * input_dim, time_dim));
        discarded.push((time_dim, time_dim * time_dim, time_dim));
    }
    for (fan_in, n_weight, n_bias) in discarded {
        torch_default_init(&mut rng, fan_in, n_weight, n_bias);
    }
    let hint = &opts.hint_channels;
    let mut convs: Vec<(String, usize, usize, usize)> =
        vec![("conv_in".into(), opts.conditioning_channels, hint[0], 1)];
    for (i, pair) in hint.windows(2).enumerate() {
        convs.push((format!("blocks.{}", 2 * i), pair[0], pair[0], 1));
        convs.push((format!("blocks.{}", 2 * i + 1), pair[0], pair[1], 2));
    }
    convs.push(("conv_out".into(), hint[hint.len() - 1], c0, 1));
    for (name, c_in, c_out, _stride) in &convs {
        let fan_in = c_in * 9;
        let (w, b) = torch_default_init(&mut rng, fan_in, c_out * fan_in, *c_out);
        let key = format!("controlnet_cond_embedding.{name}");
        let (w, b) = if name == "conv_out" {
            // zero_module: drawn (so later draws stay aligned with torch), then zeroed.
            report.zero.extend([format!("{key}.weight"), format!("{key}.bias")]);
            (vec![0.0; w.len()], vec![0.0; b.len()])
        } else {
            report.random.extend([format!("{key}.weight"), format!("{key}.bias")]);
            (w, b)
        };
        tensors.insert(format!("{key}.weight"), Tensor::from_vec(w, (*c_out, *c_in, 3, 3), &dev)?);
        tensors.insert(format!("{key}.bias"), Tensor::from_vec(b, *c_out, &dev)?);
    }

    // 3. Zero convolutions: one per skip connection, one on the mid block.
    let widths = enc.skip_channels().map_err(Error::Invalid)?;
    let c_mid = enc.block_out_channels[enc.block_out_channels.len() - 1];
    let zero_convs = widths
        .iter()
        .enumerate()
        .map(|(i, &c)| (format!("controlnet_down_blocks.{i}"), c))
        .chain([("controlnet_mid_block".to_string(), c_mid)]);
    for (key, c) in zero_convs {
        tensors.insert(format!("{key}.weight"), Tensor::zeros((c, c, 1, 1), DType::F32, &dev)?);
        tensors.insert(format!("{key}.bias"), Tensor::zeros(c, DType::F32, &dev)?);
        report.zero.extend([format!("{key}.weight"), format!("{key}.bias")]);
    }

    // 4. The model must build from exactly these tensors (a missing encoder tensor is named here).
    let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    ControlNetModel::new(&parsed, vb)
        .map_err(|e| Error::Invalid(format!("the base UNet does not give a complete ControlNet: {e}")))?;
    for list in [&mut report.copied, &mut report.zero, &mut report.random] {
        list.sort();
    }
    Ok(NewControlNet { config, tensors, report })
}

/// The ControlNet `config.json` `from_unet` writes for this UNet config.
pub fn controlnet_config(unet_config: &Value, opts: &InitOptions) -> Result<Value> {
    let Value::Object(unet) = unet_config else {
        return Err(Error::Invalid("the base UNet config is not a JSON object".into()));
    };
    if opts.conditioning_channels == 0 {
        return Err(Error::setting("conditioning_channels", "must be at least 1"));
    }
    check_hint_channels(&opts.hint_channels, opts.vae_scale_factor)?;
    let mut out = Map::new();
    out.insert("_class_name".into(), "ControlNetModel".into());
    out.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    for key in COPIED_CONFIG_KEYS {
        if let Some(v) = unet.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    out.insert("conditioning_channels".into(), opts.conditioning_channels.into());
    out.insert("conditioning_embedding_out_channels".into(), opts.hint_channels.clone().into());
    out.insert("controlnet_conditioning_channel_order".into(), "rgb".into());
    out.insert("global_pool_conditions".into(), false.into());
    // The config must also describe an encoder this crate supports.
    let parsed: UNet2DConditionConfig =
        serde_json::from_value(unet_config.clone()).map_err(|e| Error::Invalid(format!("base UNet config: {e}")))?;
    parsed.validate().map_err(|m| Error::Invalid(format!("base UNet config: {m}")))?;
    Ok(Value::Object(out))
}

/// The hint encoder's stages must take the condition to the latent size: one stride-2 step between consecutive
/// entries, so `log2(vae_scale_factor) + 1` entries (4 for Stable Diffusion's 8x VAE), each at least 1 channel.
fn check_hint_channels(hint: &[usize], vae_scale_factor: usize) -> Result<()> {
    let steps = vae_scale_factor.max(1).trailing_zeros() as usize;
    let want = steps + 1;
    if !vae_scale_factor.is_power_of_two() {
        return Err(Error::setting(
            "hint_channels",
            format!("the VAE scale factor {vae_scale_factor} is not a power of 2"),
        ));
    }
    if hint.len() != want {
        let list = hint.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        return Err(Error::setting(
            "hint_channels",
            format!(
                "{list} has {} entries, which take the condition {}x down, but the base model's latents are \
                 {vae_scale_factor}x smaller than the image: give {want} entries (e.g. {})",
                hint.len(),
                1usize << hint.len().saturating_sub(1).min(63),
                DEFAULT_HINT_CHANNELS.map(|c| c.to_string()).join(",")
            ),
        ));
    }
    if hint.contains(&0) {
        return Err(Error::setting("hint_channels", "every stage needs at least 1 channel"));
    }
    Ok(())
}

/// torch's `reset_parameters` of `nn.Conv2d` / `nn.Linear`: `kaiming_uniform_(weight, a=√5)`, then the bias
/// uniform in ±1/√fan_in, each element one f32 uniform draw. Returns (weight, bias) values in draw order.
fn torch_default_init(rng: &mut TorchGenerator, fan_in: usize, n_weight: usize, n_bias: usize) -> (Vec<f32>, Vec<f32>) {
    // kaiming_uniform_: gain = calculate_gain("leaky_relu", √5) = √(2 / (1 + √5²)), std = gain / √fan_in,
    // bound = √3 · std; the same f64 operations as torch.nn.init.
    let slope = 5f64.sqrt();
    let gain = (2.0 / (1.0 + slope * slope)).sqrt();
    let w_bound = 3f64.sqrt() * (gain / (fan_in as f64).sqrt());
    let b_bound = 1.0 / (fan_in as f64).sqrt();
    let w = uniform(rng, n_weight, -w_bound, w_bound);
    let b = uniform(rng, n_bias, -b_bound, b_bound);
    (w, b)
}

/// `tensor.uniform_(from, to)` on a float32 CPU tensor: per element, the low 24 bits of one 32-bit draw scaled
/// into [0, 1), then `x * (to - from) + from` in f32 (fused multiply-add, as torch's vectorised CPU build
/// compiles it).
fn uniform(rng: &mut TorchGenerator, n: usize, from: f64, to: f64) -> Vec<f32> {
    let (from, to) = (from as f32, to as f32);
    let range = to - from;
    rng.rand(n).into_iter().map(|x| x.mul_add(range, from)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs_diff, repo_path as repo};

    fn tiny_unet() -> (Value, TensorMap) {
        let dir = repo("tests/fixtures/models/tiny-sd15/unet");
        let config: Value = read_json(&dir.join("config.json")).unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
        (config, tensors)
    }

    /// `torch.manual_seed(7); ControlNetModel.from_unet(unet)` (tools/fixtures/gen_train.py): the hint encoder's
    /// random tensors equal ours value for value (exact f32 equality for those stored in full; sums and sums of
    /// squares within 1e-6 relative for all).
    #[test]
    fn hint_encoder_init_is_torchs() {
        let (config, unet) = tiny_unet();
        let new = controlnet_from_unet(&config, &unet, &InitOptions { seed: 7, ..Default::default() }).unwrap();
        let fx = candle_core::safetensors::load(repo("tests/fixtures/train/init.safetensors"), &Device::Cpu).unwrap();
        let mut full = 0;
        for (name, t) in new.tensors.iter().filter(|(k, _)| k.starts_with("controlnet_cond_embedding.")) {
            if let Some(reference) = fx.get(name) {
                assert_eq!(max_abs_diff(t, reference), 0.0, "{name}");
                full += 1;
            }
            let t64 = t.to_dtype(DType::F64).unwrap();
            let sum: f64 = t64.sum_all().unwrap().to_scalar().unwrap();
            let sumsq: f64 = t64.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            for (what, ours) in [("sum", sum), ("sumsq", sumsq)] {
                let r: Vec<f32> = fx[&format!("{name}.{what}")].to_vec1().unwrap();
                assert!(
                    (ours - r[0] as f64).abs() <= 1e-6 * (1.0 + r[0].abs() as f64),
                    "{name}.{what}: {ours} vs {}",
                    r[0]
                );
            }
        }
        assert!(full >= 10, "only {full} tensors compared in full");
    }

    /// SDXL: `torch.manual_seed(7); ControlNetModel.from_unet(tiny-sdxl unet)` (tools/fixtures/gen_sdxl2.py):
    /// add_embedding is copied and the hint encoder is drawn after its (discarded) initialisation.
    #[test]
    fn sdxl_init_is_diffusers_from_unet() {
        let dir = repo("tests/fixtures/models/tiny-sdxl/unet");
        let config: Value = read_json(&dir.join("config.json")).unwrap();
        let unet =
            candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
        let new = controlnet_from_unet(&config, &unet, &InitOptions { seed: 7, ..Default::default() }).unwrap();
        let fx = candle_core::safetensors::load(repo("tests/fixtures/sdxl/init.safetensors"), &Device::Cpu).unwrap();
        let mut full = 0;
        for (name, t) in new.tensors.iter().filter(|(k, _)| k.starts_with("controlnet_cond_embedding.")) {
            if let Some(reference) = fx.get(name) {
                assert_eq!(max_abs_diff(t, reference), 0.0, "{name}");
                full += 1;
            }
            let sum: f64 = t.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar().unwrap();
            let r: Vec<f32> = fx[&format!("{name}.sum")].to_vec1().unwrap();
            assert!((sum - r[0] as f64).abs() <= 1e-6 * (1.0 + r[0].abs() as f64), "{name}: {sum} vs {}", r[0]);
        }
        assert!(full >= 6, "only {full} tensors compared in full");
        for name in ["add_embedding.linear_1.weight", "add_embedding.linear_2.bias"] {
            assert_eq!(max_abs_diff(&new.tensors[name], &unet[name]), 0.0, "{name}");
        }
    }

    #[test]
    fn encoder_is_copied_and_new_convolutions_are_zero() {
        let (config, unet) = tiny_unet();
        let new = controlnet_from_unet(&config, &unet, &InitOptions::default()).unwrap();
        let reference = candle_core::safetensors::load(
            repo("tests/fixtures/models/tiny-controlnet-a/diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        // Same names and shapes as diffusers' from_unet (tiny-controlnet-a was made by it).
        let mut ours: Vec<_> = new.tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        let mut theirs: Vec<_> = reference.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
        for name in &new.report.copied {
            assert_eq!(max_abs_diff(&new.tensors[name], &unet[name]), 0.0, "{name}");
        }
        assert_eq!(new.report.zero.len(), 2 * 8, "7 zero convolutions + the hint output");
        for name in &new.report.zero {
            assert_eq!(new.tensors[name].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
        assert_eq!(new.report.copied.len() + new.report.zero.len() + new.report.random.len(), new.tensors.len());
        // A fresh ControlNet adds exactly nothing.
        let parsed: ControlNetConfig = serde_json::from_value(new.config.clone()).unwrap();
        assert_eq!(parsed.conditioning_embedding_out_channels, DEFAULT_HINT_CHANNELS);
        let vb = candle_nn::VarBuilder::from_tensors(new.tensors, DType::F32, &Device::Cpu);
        let cn = ControlNetModel::new(&parsed, vb).unwrap();
        let cond = Tensor::rand(0f32, 1., (1, 3, 64, 64), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 4, 8, 8), &Device::Cpu).unwrap();
        let ctx = Tensor::randn(0f32, 1., (1, 77, 32), &Device::Cpu).unwrap();
        let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
        let out = cn.forward(&x, &t, &ctx, &cn.embed_condition(&cond).unwrap(), 1.0, false).unwrap();
        for r in out.down_block_res_samples.iter().chain([&out.mid_block_res_sample]) {
            assert_eq!(r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn conditioning_channels_and_missing_tensors() {
        let (config, mut unet) = tiny_unet();
        let opts = InitOptions { conditioning_channels: 1, ..Default::default() };
        let new = controlnet_from_unet(&config, &unet, &opts).unwrap();
        assert_eq!(new.tensors["controlnet_cond_embedding.conv_in.weight"].dims(), [16, 1, 3, 3]);
        assert_eq!(new.config["conditioning_channels"], 1);
        unet.remove("mid_block.resnets.0.conv1.weight");
        let err = controlnet_from_unet(&config, &unet, &opts).err().unwrap().to_string();
        assert!(err.contains("mid_block.resnets.0.conv1.weight"), "{err}");
        let err = controlnet_from_unet(&config, &TensorMap::new(), &InitOptions { conditioning_channels: 0, ..opts })
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("conditioning_channels: "), "{err}");
    }

    /// A hint encoder that does not reach the latent size is refused at init (generate would fail on the
    /// embedding's shape), naming the setting and what it needs.
    #[test]
    fn hint_channels_must_reach_the_latent_size() {
        let (config, unet) = tiny_unet();
        let opts = InitOptions { hint_channels: vec![16, 32], ..Default::default() };
        let err = controlnet_from_unet(&config, &unet, &opts).err().unwrap().to_string();
        assert!(err.starts_with("hint_channels: ") && err.contains("give 4 entries"), "{err}");
        let opts = InitOptions { hint_channels: vec![8, 0, 16, 16], ..Default::default() };
        assert!(controlnet_from_unet(&config, &unet, &opts).is_err());
        let ok = InitOptions { hint_channels: vec![8, 8, 16, 16], ..Default::default() };
        controlnet_from_unet(&config, &unet, &ok).unwrap();
    }

    /// `--model` given a ControlNet: said what it is, and what was expected.
    #[test]
    fn a_controlnet_is_not_a_base_model() {
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            prediction_type: None,
            config_dir: None,
        };
        let cn = repo("tests/fixtures/models/tiny-controlnet-a");
        let err = load_base_unet(&cn.to_string_lossy(), &opts).err().unwrap().to_string();
        assert!(err.starts_with("model: ") && err.contains("ControlNet") && err.contains("expected"), "{err}");
        assert_eq!(vae_scale_factor(&repo("tests/fixtures/models/tiny-sd15")).unwrap(), 8);
    }
}
