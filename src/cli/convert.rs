//! `controlnet convert IN OUT [--to diffusers|original] [--dtype f16|f32]`: a ControlNet between the original
//! single-file layout (lllyasviel's `control_model.*` names) and a diffusers folder, losslessly; or a single-file
//! base model (SD1.x/2.x/SDXL, A1111/civitai layout) into a diffusers pipeline folder (`--config DIR` as for
//! `generate`: a pipeline folder whose configs describe it).
//!
//! IN: an original `.pth`/`.ckpt`/`.safetensors`, a diffusers `.safetensors`, or a diffusers folder.
//! OUT: a folder (`config.json` + `diffusion_pytorch_model.safetensors`) or one original `.safetensors`;
//! written beside OUT first and moved into place when complete, so a failed run leaves nothing half-written.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, ValueEnum};

use serde_json::Value;

use crate::io::checkpoint::{save_safetensors_atomic, Checkpoint};
use crate::io::detect::{detect, Format, ModelKind};
use crate::io::single_file::{
    cast_floats, controlnet_to_original, is_union, load_controlnet, load_controlnet_file_with,
};
use crate::io::weights::DIFFUSERS_STEM;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Diffusers,
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F16,
    F32,
}

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The ControlNet to convert (file, diffusers folder, or hub id owner/name[@revision][/file]), or a
    /// single-file base model (SD1.x/2.x/SDXL checkpoint) to write as a diffusers pipeline folder.
    pub input: PathBuf,
    /// Where to write (a folder for --to diffusers, a .safetensors file for --to original).
    pub output: PathBuf,
    /// Target layout [default: the other one].
    #[arg(long, value_enum)]
    pub to: Option<Target>,
    /// Store floating-point weights in this precision [default: as stored].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// A diffusers config.json (or folder) to use instead of the one read from the weights (for a base model:
    /// a pipeline folder whose unet/, vae/, text_encoder*/ and scheduler/ configs describe it).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// The safetensors metadata key an original-layout file keeps its diffusers `config.json` under, so converting
/// back gives every field again (the original layout has no config; one inferred from the tensors cannot know
/// `attention_head_dim`, the diffusers version, ...).
const CONFIG_METADATA: &str = "diffusers_config";

pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    // 1. Read: any layout into diffusers names + config.
    let input = crate::io::hub::resolve(&args.input.to_string_lossy(), None)?;
    let args = &ConvertArgs { input, ..args.clone() };
    crate::io::atomic::check_output_is_not_input("output", &args.output, &[&args.input])?;
    if !args.input.is_dir() {
        let ck = Checkpoint::open(&args.input)?;
        if detect(&ck.tensors, "").kind == ModelKind::SdCheckpoint {
            return convert_base_model(args);
        }
    }
    check_is_controlnet(&args.input)?;
    let input_format = if args.input.is_dir() {
        Format::Diffusers
    } else {
        let ck = Checkpoint::open(&args.input)?;
        detect(&ck.tensors, "").format
    };
    let mut c = if args.input.is_dir() {
        load_controlnet(&args.input)?
    } else {
        load_controlnet_file_with(&args.input, args.config.as_deref())?
    };
    if args.config.is_none() && !args.input.is_dir() {
        if let Some(config) = embedded_config(&args.input)? {
            c.config = config;
        }
    }
    // A union net has no original layout (xinsir ships diffusers names, which ComfyUI and A1111 read as they
    // are): it only goes to a diffusers folder (from its single file, or to change the precision).
    let union = is_union(&c.config);
    let target = args.to.unwrap_or(match input_format {
        Format::Original => Target::Diffusers,
        Format::Diffusers if union => Target::Diffusers,
        Format::Diffusers => Target::Original,
    });
    if union && target == Target::Original {
        bail!(
            "{}: a union ControlNet has no original layout (its published files use diffusers names, which ComfyUI \
             and A1111 read); convert it to a diffusers folder (--to diffusers)",
            args.input.display()
        );
    }
    // 2. Precision.
    if let Some(d) = args.dtype {
        let dtype = match d {
            DTypeArg::F16 => DType::F16,
            DTypeArg::F32 => DType::F32,
        };
        c.tensors = cast_floats(&c.tensors, dtype)?;
    }
    // 3. Write.
    if args.output.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.output.display());
    }
    match target {
        Target::Diffusers => write_folder(&args.output, &c.config, &c.tensors)?,
        Target::Original => {
            let ext = args.output.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "safetensors" {
                bail!(
                    "{}: original ControlNets are written as .safetensors (pickles are never written)",
                    args.output.display()
                );
            }
            write_original(&args.output, &controlnet_to_original(&c.tensors)?, &c.config)?;
        }
    }
    let size: u64 = walk_size(&args.output);
    eprintln!(
        "wrote {} ({} layout, {} tensors, {:.1} MB)",
        args.output.display(),
        if target == Target::Diffusers { "diffusers" } else { "original" },
        c.tensors.len(),
        size as f64 / 1e6
    );
    Ok(())
}

/// A single-file SD checkpoint → a diffusers pipeline folder: each component's config.json and weights, the
/// bundled CLIP tokenizer(s), the scheduler config and `model_index.json`.
fn convert_base_model(args: &ConvertArgs) -> anyhow::Result<()> {
    use crate::io::single_file::{load_sd_checkpoint_with, BundledTokenizer, SdOptions};
    if args.to == Some(Target::Original) {
        bail!("{}: already a single file; only --to diffusers applies to a base model", args.input.display());
    }
    if args.output.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.output.display());
    }
    let opts = SdOptions { prediction_type: None, config_dir: args.config.clone() };
    let mut c = load_sd_checkpoint_with(&args.input, &opts)?;
    for note in &c.notes {
        eprintln!("note: {note}");
    }
    if let Some(d) = args.dtype {
        let dtype = if d == DTypeArg::F16 { DType::F16 } else { DType::F32 };
        for t in [&mut c.unet.tensors, &mut c.vae.tensors, &mut c.text_encoder.tensors] {
            *t = cast_floats(t, dtype)?;
        }
        if let Some(x) = c.sdxl.as_mut() {
            x.text_encoder_2.tensors = cast_floats(&x.text_encoder_2.tensors, dtype)?;
        }
    }
    let class = if c.sdxl.is_some() { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" };
    let scheduler = c.scheduler_config["_class_name"].as_str().unwrap_or("PNDMScheduler").to_string();
    let mut index = serde_json::json!({
        "_class_name": class,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler],
    });
    if c.sdxl.is_some() {
        index["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = serde_json::json!(true);
    } else {
        index["safety_checker"] = serde_json::json!([null, null]);
        index["feature_extractor"] = serde_json::json!([null, null]);
        index["requires_safety_checker"] = serde_json::json!(false);
    }
    let tokenizer = |dir: &Path, t: &BundledTokenizer| -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("vocab.json"), &t.vocab_json)?;
        std::fs::write(dir.join("merges.txt"), &t.merges_txt)?;
        let cfg = serde_json::json!({"model_max_length": 77, "pad_token": t.pad_token,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"});
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)? + "\n")?;
        Ok(())
    };
    let json = |path: PathBuf, v: &Value| -> anyhow::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")?;
        Ok(())
    };
    let mut count = c.unet.tensors.len() + c.vae.tensors.len() + c.text_encoder.tensors.len();
    write_atomic_folder(&args.output, |tmp| {
        json(tmp.join("model_index.json"), &index)?;
        json(tmp.join("scheduler/scheduler_config.json"), &c.scheduler_config)?;
        for (sub, comp, stem) in [("unet", &c.unet, DIFFUSERS_STEM), ("vae", &c.vae, DIFFUSERS_STEM)] {
            json(tmp.join(sub).join("config.json"), &comp.config)?;
            save_safetensors_atomic(&comp.tensors, &tmp.join(sub).join(format!("{stem}.safetensors")))?;
        }
        json(tmp.join("text_encoder/config.json"), &c.text_encoder.config)?;
        save_safetensors_atomic(&c.text_encoder.tensors, &tmp.join("text_encoder/model.safetensors"))?;
        tokenizer(&tmp.join("tokenizer"), &c.tokenizer)?;
        if let Some(x) = &c.sdxl {
            json(tmp.join("text_encoder_2/config.json"), &x.text_encoder_2.config)?;
            save_safetensors_atomic(&x.text_encoder_2.tensors, &tmp.join("text_encoder_2/model.safetensors"))?;
            tokenizer(&tmp.join("tokenizer_2"), &x.tokenizer_2)?;
        }
        Ok(())
    })?;
    count += c.sdxl.as_ref().map_or(0, |x| x.text_encoder_2.tensors.len());
    eprintln!(
        "wrote {} ({class}, diffusers layout, {count} tensors, {:.1} MB)",
        args.output.display(),
        walk_size(&args.output) as f64 / 1e6
    );
    Ok(())
}

/// Fills a temporary sibling folder with `fill`, then renames it to `out` (replacing what is there).
fn write_atomic_folder(out: &Path, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        std::fs::create_dir_all(&tmp)?;
        fill(&tmp)?;
        if out.exists() {
            if out.is_dir() {
                std::fs::remove_dir_all(out)?;
            } else {
                std::fs::remove_file(out)?;
            }
        }
        std::fs::rename(&tmp, out)?;
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    result.with_context(|| format!("writing {}", out.display()))
}

/// config.json + weights into a temporary sibling folder, then renamed to `out`.
fn write_folder(
    out: &Path,
    config: &serde_json::Value,
    tensors: &crate::io::checkpoint::TensorMap,
) -> anyhow::Result<()> {
    write_atomic_folder(out, |tmp| {
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(config)? + "\n")?;
        save_safetensors_atomic(tensors, &tmp.join(format!("{DIFFUSERS_STEM}.safetensors")))?;
        Ok(())
    })
}

/// Refuses a folder without a config.json that is some other kind of model, saying what it is (a pipeline folder
/// has no config.json of its own, so loading it would only say that file is missing).
fn check_is_controlnet(input: &Path) -> anyhow::Result<()> {
    if !input.is_dir() || input.join("config.json").is_file() {
        return Ok(()); // the loaders say what a file or a folder's class is, or that the path is missing
    }
    match crate::io::inspect::inspect(input) {
        Ok(i) if matches!(i.kind, ModelKind::ControlNet | ModelKind::Unknown) => Ok(()),
        Ok(i) => bail!(
            "{} is a {} ({}); expected a ControlNet: a diffusers folder with config.json, or a single weights file",
            input.display(),
            i.kind,
            i.description
        ),
        Err(_) => Ok(()), // the loader says why it cannot be read
    }
}

/// An original-layout `.safetensors` with the diffusers config in its metadata ([`CONFIG_METADATA`]), written
/// atomically.
fn write_original(out: &Path, tensors: &crate::io::checkpoint::TensorMap, config: &Value) -> anyhow::Result<()> {
    let config = serde_json::to_string(config)?;
    crate::io::atomic::write_atomic(out, |tmp| {
        let plain = tmp.with_extension("plain");
        let result = candle_core::safetensors::save(tensors, &plain)
            .map_err(|e| crate::Error::weights(out, format!("writing: {e}")))
            .and_then(|()| with_metadata(&plain, tmp, CONFIG_METADATA, &config));
        let _ = std::fs::remove_file(&plain);
        result
    })?;
    Ok(())
}

/// Copies the safetensors file `from` to `to` with `key: value` added to its header's `__metadata__` (the data
/// offsets are relative to the end of the header, so the data is copied as is).
fn with_metadata(from: &Path, to: &Path, key: &str, value: &str) -> crate::Result<()> {
    use std::io::{Read, Write};
    let io = |e| crate::Error::io(from, e);
    let mut input = std::io::BufReader::new(std::fs::File::open(from).map_err(io)?);
    let mut header = read_header(&mut input, from)?;
    let meta = header.as_object_mut().ok_or_else(|| crate::Error::weights(from, "header is not an object"))?;
    let entry = meta.entry("__metadata__").or_insert_with(|| Value::Object(Default::default()));
    if let Some(m) = entry.as_object_mut() {
        m.insert(key.to_string(), Value::String(value.to_string()));
    }
    let mut text = serde_json::to_string(&header).map_err(|e| crate::Error::weights(from, e))?;
    while text.len() % 8 != 0 {
        text.push(' '); // the format pads its header to 8 bytes with spaces
    }
    let mut output = std::io::BufWriter::new(std::fs::File::create(to).map_err(|e| crate::Error::io(to, e))?);
    let out_io = |e| crate::Error::io(to, e);
    output.write_all(&(text.len() as u64).to_le_bytes()).map_err(out_io)?;
    output.write_all(text.as_bytes()).map_err(out_io)?;
    let mut data = Vec::new();
    input.read_to_end(&mut data).map_err(io)?;
    output.write_all(&data).map_err(out_io)?;
    output.into_inner().map_err(|e| out_io(e.into_error()))?.sync_all().map_err(out_io)
}

/// The JSON header of a safetensors stream (the reader is left at the data).
fn read_header(input: &mut impl std::io::Read, path: &Path) -> crate::Result<Value> {
    let mut len = [0u8; 8];
    input.read_exact(&mut len).map_err(|e| crate::Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(crate::Error::weights(path, format!("a {len}-byte header is not a safetensors header")));
    }
    let mut text = vec![0u8; len as usize];
    input.read_exact(&mut text).map_err(|e| crate::Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| crate::Error::weights(path, format!("header: {e}")))
}

/// The diffusers config a file written by [`write_original`] carries (None for other files).
fn embedded_config(path: &Path) -> anyhow::Result<Option<Value>> {
    let Ok(file) = std::fs::File::open(path) else { return Ok(None) };
    let Ok(header) = read_header(&mut std::io::BufReader::new(file), path) else { return Ok(None) };
    let Some(text) = header["__metadata__"][CONFIG_METADATA].as_str() else { return Ok(None) };
    let config = serde_json::from_str(text).with_context(|| format!("{}: {CONFIG_METADATA}", path.display()))?;
    Ok(Some(config))
}

fn walk_size(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p).map(|d| d.flatten().map(|e| walk_size(&e.path())).sum()).unwrap_or(0)
    } else {
        p.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::single_file::load_controlnet_file;
    use crate::test_support::fixture_path as fixture;

    fn convert(input: &Path, output: &Path, to: Option<Target>, dtype: Option<DTypeArg>) -> anyhow::Result<()> {
        run(&ConvertArgs { input: input.into(), output: output.into(), to, dtype, config: None, force: false })
    }

    fn same(a: &Path, b: &Path) {
        let (a, b) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
        assert_eq!(a.tensors, b.tensors, "headers");
        for t in &a.tensors {
            let (x, y) = (a.load(&t.name).unwrap(), b.load(&t.name).unwrap());
            let x = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let y = y.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(x == y, "{} differs", t.name);
        }
    }

    /// A single-file SDXL checkpoint becomes a pipeline folder that loads and gives the single file's image.
    #[test]
    fn sdxl_single_file_to_a_pipeline_folder() {
        use crate::io::fixtures;
        use crate::pipeline::{generate, GenerateParams, StableDiffusion};
        let dir = tempfile::tempdir().unwrap();
        let file = fixtures::write(dir.path(), "tiny-sdxl.safetensors", &fixtures::original("sdxl_single_file", None));
        let out = dir.path().join("tiny-sdxl");
        let config = Some(fixture("models/tiny-sdxl"));
        let args = |to| ConvertArgs {
            input: file.clone(),
            output: out.clone(),
            to,
            dtype: None,
            config: config.clone(),
            force: false,
        };
        run(&args(None)).unwrap();
        let err = run(&args(None)).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        let err = run(&args(Some(Target::Original))).unwrap_err().to_string();
        assert!(err.contains("already a single file"), "{err}");
        let folder = StableDiffusion::load(&out, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(folder.sdxl.is_some());
        let opts = crate::pipeline::sd::LoadOptions {
            dtype: DType::F32,
            device: candle_core::Device::Cpu,
            variant: None,
            prediction_type: None,
            config_dir: config.clone(),
        };
        let single = StableDiffusion::open(file.to_str().unwrap(), &opts).unwrap();
        let params = GenerateParams::plain("a red circle", 64, 64, 2, 5.0, 4);
        let a = generate(&folder, &[], &params, &mut |_, _| {}).unwrap();
        let b = generate(&single, &[], &params, &mut |_, _| {}).unwrap();
        assert_eq!(a.images[0], b.images[0]);

        // SD1.x files take the same road (one text encoder, StableDiffusionPipeline).
        let sd15 = fixtures::write(dir.path(), "tiny-sd15.safetensors", &fixtures::original("sd15_single_file", None));
        let out15 = dir.path().join("tiny-sd15");
        let config = Some(fixture("models/tiny-sd15"));
        run(&ConvertArgs { input: sd15, output: out15.clone(), to: None, dtype: None, config, force: false }).unwrap();
        let sd = StableDiffusion::load(&out15, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(sd.sdxl.is_none());
    }

    #[test]
    fn diffusers_to_original_and_back_is_lossless() {
        let dir = tempfile::tempdir().unwrap();
        let twin = fixture("models/tiny-controlnet-a");
        let orig = dir.path().join("control_tiny.safetensors");
        convert(&twin, &orig, None, None).unwrap();
        let back = dir.path().join("back");
        convert(&orig, &back, None, None).unwrap();
        same(&back.join("diffusion_pytorch_model.safetensors"), &twin.join("diffusion_pytorch_model.safetensors"));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["_class_name"], "ControlNetModel");
        // And original -> diffusers -> original gives the first original file again.
        let orig2 = dir.path().join("again.safetensors");
        convert(&back, &orig2, Some(Target::Original), None).unwrap();
        same(&orig, &orig2);
    }

    #[test]
    fn pth_to_diffusers_and_f16_halves_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("from-pth");
        convert(&fixture("load/control_tiny_sd15_fp16.pth"), &out, None, None).unwrap();
        let c = load_controlnet_file(&out.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(c.tensors.values().all(|t| t.dtype() == DType::F16));

        let f32_dir = dir.path().join("f32");
        let f16_dir = dir.path().join("f16");
        convert(&fixture("models/tiny-controlnet-a"), &f32_dir.join("a.safetensors"), None, None).unwrap();
        convert(&fixture("models/tiny-controlnet-a"), &f16_dir.join("a.safetensors"), None, Some(DTypeArg::F16))
            .unwrap();
        let (big, small) = (walk_size(&f32_dir), walk_size(&f16_dir));
        // Same header, data halved: within the header's size of exactly half.
        assert!(small * 2 > big && small * 2 - big < 40_000, "f32 {big} bytes, f16 {small} bytes");
    }

    /// A union net's single file becomes its folder (config from the weights, union fields included), a folder
    /// can be halved; the original layout is refused, as no such layout exists.
    #[test]
    fn union_nets_go_to_diffusers_folders_only() {
        let dir = tempfile::tempdir().unwrap();
        let net = fixture("models/tiny-controlnet-sdxl-union");
        let folder = dir.path().join("union");
        convert(&net.join("diffusion_pytorch_model.safetensors"), &folder, None, None).unwrap();
        same(&folder.join("diffusion_pytorch_model.safetensors"), &net.join("diffusion_pytorch_model.safetensors"));
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        let (got, want) = (read(&folder), read(&net));
        for key in ["_class_name", "num_control_type", "num_trans_channel", "num_trans_layer", "num_proj_channel"] {
            assert_eq!(got[key], want[key], "{key}");
        }
        let half = dir.path().join("half");
        convert(&folder, &half, None, Some(DTypeArg::F16)).unwrap();
        let c = crate::io::single_file::load_controlnet(&half).unwrap();
        assert!(is_union(&c.config) && c.tensors.values().all(|t| t.dtype() == DType::F16));
        let err = convert(&net, &dir.path().join("u.safetensors"), Some(Target::Original), None).unwrap_err();
        assert!(err.to_string().contains("a union ControlNet has no original layout"), "{err}");
    }

    #[test]
    fn refuses_to_overwrite_and_pickles_as_output() {
        let dir = tempfile::tempdir().unwrap();
        let twin = fixture("models/tiny-controlnet-a");
        let err = convert(&twin, dir.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("exists") && err.contains("--force"), "{err}");
        let err = convert(&twin, &dir.path().join("x.pth"), None, None).unwrap_err().to_string();
        assert!(err.contains(".safetensors"), "{err}");
        let err =
            convert(&fixture("models/tiny-sd15/unet"), &dir.path().join("y"), None, None).unwrap_err().to_string();
        assert!(err.contains("expected a ControlNet"), "{err}");
        // A pipeline folder: said what it is (it has no config.json of its own).
        let err = convert(&fixture("models/tiny-sd15"), &dir.path().join("z"), None, None).unwrap_err().to_string();
        assert!(err.contains("pipeline") && err.contains("expected a ControlNet"), "{err}");
        // The output is one of the inputs.
        let orig = dir.path().join("o.safetensors");
        convert(&twin, &orig, None, None).unwrap();
        let err = run(&ConvertArgs {
            input: orig.clone(),
            output: orig.clone(),
            to: None,
            dtype: None,
            config: None,
            force: true,
        })
        .unwrap_err();
        assert!(crate::cli::describe(&err).contains("--output"), "{err}");
    }

    /// diffusers → original → diffusers gives the same config.json, every field (attention_head_dim, the
    /// version, ...), not one inferred from the tensors.
    #[test]
    fn round_trips_keep_every_config_field() {
        let dir = tempfile::tempdir().unwrap();
        let twin = fixture("models/tiny-controlnet-a");
        let orig = dir.path().join("o.safetensors");
        convert(&twin, &orig, None, None).unwrap();
        let back = dir.path().join("back");
        convert(&orig, &back, None, None).unwrap();
        let read = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
        assert_eq!(read(&back.join("config.json")), read(&twin.join("config.json")));
        // The original file still loads as one.
        crate::io::single_file::load_controlnet_file(&orig).unwrap();
    }

    /// Weight files get the permissions other outputs get (File::create's, 0644 under umask 022), not the
    /// safetensors writer's private 0600.
    #[cfg(unix)]
    #[test]
    fn weight_files_are_not_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let usual = dir.path().join("usual");
        std::fs::File::create(&usual).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let twin = fixture("models/tiny-controlnet-a");
        let orig = dir.path().join("o.safetensors");
        convert(&twin, &orig, None, None).unwrap();
        let back = dir.path().join("back");
        convert(&orig, &back, None, None).unwrap();
        assert_eq!(mode(&orig), mode(&usual));
        assert_eq!(mode(&back.join("diffusion_pytorch_model.safetensors")), mode(&usual));
    }
}
