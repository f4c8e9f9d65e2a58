//! The models a server keeps loaded: one Stable Diffusion model and the ControlNets it was started with,
//! loaded once on the worker thread; [`Catalog`] is what the HTTP side knows of them (names, hashes), plain data.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::model::controlnet::ControlNetModel;
use crate::pipeline::generator::read_loras;
use crate::pipeline::image_metadata::{recorded_path, weights_hash};
use crate::pipeline::request::{LoraRequest, LoraWeight};
use crate::pipeline::sd::{open_controlnet, LoadOptions};
use crate::pipeline::{demo, Generator, Progress, StableDiffusion};
use crate::{Error, Result};

/// What to load, as the command line names it.
#[derive(Debug, Clone, Default)]
pub struct ModelSpecs {
    /// `None`: the bundled demo model (and its ControlNet when no ControlNet is named).
    pub model: Option<String>,
    pub controlnets: Vec<String>,
    /// Every ControlNet in this folder (sub-folders with a `config.json`, `.safetensors`/`.pth` files) is loaded
    /// too.
    pub models_dir: Option<PathBuf>,
    // LoRAs through serve: the folder A1111 prompt tags (`<lora:name:w>`) name.
    /// Where `<lora:name:weight>` tags in prompts are found (`name.safetensors`, subfolders too).
    pub lora_dir: Option<PathBuf>,
}

/// One loaded ControlNet as clients name it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetInfo {
    /// The name clients use: the file or folder stem (`control_v11p_sd15_canny`).
    pub name: String,
    /// A1111's title: the name with the first 8 hex digits of its SHA-256 (`control_sd15_canny [fef5e48e]`).
    pub title: String,
    /// As given (a path or a hub id).
    pub spec: String,
    pub sha256: String,
    /// A union net: how many condition types it knows (`None`: a plain ControlNet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_types: Option<usize>,
}

/// The loaded models as the HTTP side sees them.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub model_name: String,
    pub model_spec: String,
    pub model_sha256: String,
    pub nets: Vec<NetInfo>,
    /// The VAE's down-sampling factor (output sizes are multiples of it) and the model's native size.
    pub vae_factor: usize,
    pub default_size: usize,
    /// `--lora-dir`: where prompts' LoRA tags are found (`None`: tags are refused).
    pub lora_dir: Option<PathBuf>,
}

impl Catalog {
    /// The index of the ControlNet a client names: its name, its A1111 title (`name [hash]`), or its spec.
    pub fn find_net(&self, wanted: &str) -> Option<usize> {
        let wanted = wanted.trim();
        let bare = match wanted.rsplit_once(" [") {
            Some((name, hash)) if hash.ends_with(']') => name,
            _ => wanted,
        };
        self.nets.iter().position(|n| n.title == wanted || n.name == bare || n.spec == wanted)
    }

    pub fn net_names(&self) -> String {
        self.nets.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The models themselves; they live on the worker thread.
pub struct Models {
    pub sd: StableDiffusion,
    pub nets: Vec<ControlNetModel>,
    pub catalog: Catalog,
    /// The model as given and how it was loaded: a model with LoRAs merged is loaded from them again.
    pub model_spec: String,
    pub opts: LoadOptions,
}

impl Models {
    pub fn load(specs: &ModelSpecs, device: &Device) -> Result<Self> {
        let opts = LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            variant: None,
            prediction_type: None,
            config_dir: None,
        };
        let model_spec = match &specs.model {
            Some(m) => m.clone(),
            None => demo::base()?.display().to_string(),
        };
        let mut net_specs = specs.controlnets.clone();
        if specs.model.is_none() && net_specs.is_empty() && specs.models_dir.is_none() {
            net_specs.push(demo::controlnet()?.display().to_string());
        }
        let named = net_specs.len();
        if let Some(dir) = &specs.models_dir {
            net_specs.extend(controlnets_in(dir)?);
        }
        let sd = StableDiffusion::open(&model_spec, &opts)?;
        let mut nets = Vec::new();
        let mut infos: Vec<NetInfo> = Vec::new();
        for (i, spec) in net_specs.iter().enumerate() {
            // The ones found in `models_dir` come after those named one by one.
            let setting = if i < named { "controlnet" } else { "models_dir" };
            let net = open_controlnet(setting, spec, None, &opts, Some(&sd))?;
            let weights = net.source().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(spec));
            let sha256 = weights_hash(&weights, false)?;
            let name = stem(spec);
            if infos.iter().any(|n| n.name == name) {
                return Err(Error::setting(setting, format!("{spec}: a ControlNet named {name} is already loaded")));
            }
            infos.push(NetInfo {
                title: format!("{name} [{}]", &sha256[..8.min(sha256.len())]),
                name,
                spec: recorded_path(spec),
                sha256,
                control_types: net.num_control_type(),
            });
            nets.push(net);
        }
        let catalog = Catalog {
            model_name: stem(&model_spec),
            model_sha256: weights_hash(&sd.dir, true)?,
            model_spec: recorded_path(&model_spec),
            nets: infos,
            vae_factor: sd.vae_scale_factor(),
            default_size: sd.default_size(),
            lora_dir: specs.lora_dir.clone(),
        };
        Ok(Self { sd, nets, catalog, model_spec, opts })
    }
}

/// Generators for the combinations of ControlNets requests use, made once each (each keeps the weight hashes
/// of its metadata).
pub struct Generators<'a> {
    models: &'a Models,
    made: HashMap<Vec<usize>, Generator<'a>>,
}

impl<'a> Generators<'a> {
    pub fn new(models: &'a Models) -> Self {
        Self { models, made: HashMap::new() }
    }

    /// The generator running the nets `nets` (indices into the catalog) in this order.
    pub fn get(&mut self, nets: &[usize]) -> &Generator<'a> {
        let models = self.models;
        self.made.entry(nets.to_vec()).or_insert_with(|| models.generator(&models.sd, nets))
    }
}

impl Models {
    /// A generator on `sd` (the loaded model, or it with LoRAs merged) and the nets `nets`, with the weight
    /// hashes worked out at load.
    pub fn generator<'a>(&'a self, sd: &'a StableDiffusion, nets: &[usize]) -> Generator<'a> {
        let hashes = nets.iter().map(|&i| self.catalog.nets[i].sha256.clone()).collect();
        Generator::new(sd, nets.iter().map(|&i| &self.nets[i]).collect())
            .with_known_hashes(self.catalog.model_sha256.clone(), hashes)
    }

    /// The model with exactly `loras` merged (files and weights, in order): `slot` when it holds that merge,
    /// else loaded again with them (the previous merge is dropped first: one LoRA model at a time).
    pub fn with_loras<'s>(
        &self,
        slot: &'s mut Option<StableDiffusion>,
        loras: &[LoraRequest],
        progress: &dyn Fn(Progress),
    ) -> Result<&'s StableDiffusion> {
        let wanted: Vec<(PathBuf, LoraWeight)> = loras.iter().map(|l| (l.path.clone(), l.weight)).collect();
        if slot.as_ref().is_none_or(|sd| sd.loras != wanted) {
            *slot = None;
            let files = read_loras(loras, progress)?;
            *slot = Some(StableDiffusion::open_with_loras(&self.model_spec, &self.opts, &files)?);
        }
        Ok(slot.as_ref().expect("just loaded"))
    }
}

/// A model's name as clients see it: a file's stem, a folder's or hub id's last part (`sd-v1.5` keeps its dot).
fn stem(spec: &str) -> String {
    let p = Path::new(spec.trim_end_matches('/'));
    let is_file = p.is_file();
    let name = if is_file { p.file_stem() } else { p.file_name() };
    name.and_then(|s| s.to_str()).unwrap_or(spec).to_string()
}

/// The ControlNets in `dir`, sorted by name: folders with a `config.json`, `.safetensors` and `.pth` files.
fn controlnets_in(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        let is_weights = path.extension().is_some_and(|e| e == "safetensors" || e == "pth");
        if !hidden && ((path.is_dir() && path.join("config.json").is_file()) || (path.is_file() && is_weights)) {
            found.push(path.display().to_string());
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(Error::setting("models_dir", format!("{}: holds no ControlNet", dir.display())));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let net = |name: &str| NetInfo {
            name: name.into(),
            title: format!("{name} [01234567]"),
            spec: format!("/m/{name}"),
            sha256: "0123456789".into(),
            control_types: None,
        };
        Catalog {
            model_name: "m".into(),
            model_spec: "/m".into(),
            model_sha256: String::new(),
            nets: vec![net("canny"), net("depth")],
            vae_factor: 8,
            default_size: 512,
            lora_dir: None,
        }
    }

    #[test]
    fn nets_are_found_by_name_title_or_path() {
        let c = catalog();
        assert_eq!(c.find_net("depth"), Some(1));
        assert_eq!(c.find_net("canny [01234567]"), Some(0));
        assert_eq!(c.find_net("depth [ffffffff]"), Some(1));
        assert_eq!(c.find_net("/m/canny"), Some(0));
        assert_eq!(c.find_net("pose"), None);
    }

    #[test]
    fn names_are_file_stems_or_folder_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("canny.safetensors");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(stem(file.to_str().unwrap()), "canny");
        let folder = dir.path().join("sd-v1.5");
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(stem(&format!("{}/", folder.display())), "sd-v1.5");
        assert_eq!(stem("lllyasviel/control_v11p_sd15_canny"), "control_v11p_sd15_canny");
    }
}
