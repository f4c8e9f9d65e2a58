//! Where a detector's weights come from (`weights`: a folder, a file or a hub id; by default the hub repo
//! `lllyasviel/Annotators`, which holds every file under its upstream name) and how they are read: torch files
//! as published (zip or legacy pickle, fp16 or fp32, `{'state_dict': …}` wrappers, `module.` prefixes of
//! `DataParallel` training), every tensor as f32 on the CPU.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::io::hub::{self, HubOptions, HubSpec};
use crate::io::torch_file::TorchFile;
use crate::{Error, Result};

/// The hub repo the detectors' weights come from by default (the files ControlNet 1.1's annotators load).
pub const DEFAULT_REPO: &str = "lllyasviel/Annotators";

/// The weights file `file` (its upstream name) as the `weights` setting says: inside a folder, the file itself,
/// or fetched from a hub repo (`owner/name` holding `file`, or `owner/name/other.pth`); [`DEFAULT_REPO`] when
/// not given. Hub files land in the shared Hugging Face cache and are read from it offline afterwards.
pub fn locate(weights: Option<&str>, file: &str) -> Result<PathBuf> {
    locate_in(DEFAULT_REPO, weights, file)
}

/// [`locate`] for a detector whose files live in another hub repo by default (`default_repo`).
pub fn locate_in(default_repo: &str, weights: Option<&str>, file: &str) -> Result<PathBuf> {
    let Some(spec) = weights else {
        let id = format!("{default_repo}/{file}");
        return fetch(&id, file).map_err(|e| Error::setting("weights", format!("the default {id}: {e}")));
    };
    let path = Path::new(spec);
    if path.is_dir() {
        let inside = path.join(file);
        return if inside.is_file() {
            Ok(inside)
        } else {
            Err(Error::setting("weights", format!("{}: the folder has no {file}", path.display())))
        };
    }
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if hub::looks_like_hub_id(spec) {
        return fetch(spec, file).map_err(|e| Error::setting("weights", e));
    }
    Err(Error::setting("weights", format!("{spec}: {}", hub::missing_path_message(spec))))
}

fn fetch(id: &str, file: &str) -> Result<PathBuf> {
    let mut spec: HubSpec = id.parse()?;
    spec.file.get_or_insert_with(|| file.to_string());
    hub::fetch(&spec, &HubOptions::from_env())
}

/// The tensors of one weights file, by name (without `module.` prefixes), as f32.
pub struct StateDict {
    pub path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl StateDict {
    /// A torch file, or a `.safetensors` file (the transformers layout of Depth Anything and UperNet).
    pub fn open(path: &Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| Error::weights(path, e))?
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            if tensors.is_empty() {
                return Err(Error::weights(path, "the file holds no tensors"));
            }
            return Ok(Self { path: path.to_path_buf(), tensors });
        }
        let file = TorchFile::open(path)?;
        let mut tensors = HashMap::new();
        for t in &file.tensors {
            // DataParallel checkpoints (PiDiNet's, some netG.pth copies) prefix every key
            let name = t.name.strip_prefix("module.").unwrap_or(&t.name).to_string();
            let value = file.load(t, &Device::Cpu)?.to_dtype(DType::F32)?;
            tensors.insert(name, value);
        }
        if tensors.is_empty() {
            return Err(Error::weights(path, "the file holds no tensors"));
        }
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    /// A state dict made in memory (tests, converted weights).
    pub fn from_tensors<'a>(path: impl Into<PathBuf>, tensors: impl IntoIterator<Item = (&'a str, Tensor)>) -> Self {
        let tensors = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Self { path: path.into(), tensors }
    }

    /// The tensor `name`, or an error naming the file and the tensor (the wrong file for this detector).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::weights(&self.path, format!("no tensor {name}: not the weights of this detector?")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked to have `rank` dimensions.
    pub fn get_rank(&self, name: &str, rank: usize) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.rank() != rank {
            return Err(Error::weights(
                &self.path,
                format!("{name}: expected {rank} dimensions, found {:?}", t.dims()),
            ));
        }
        Ok(t)
    }

    /// How many of `{prefix}{i}{suffix}` exist for i = 0, 1, … (a repeated block's count, read from the file).
    pub fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..).take_while(|i| self.has(&format!("{prefix}{i}{suffix}"))).count()
    }

    /// An error about this file.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::weights(&self.path, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::neural::test_support::{variant, weights};

    #[test]
    fn every_file_variant_reads_to_the_same_tensors() {
        let zip = StateDict::open(&weights("ControlNetHED.pth")).unwrap();
        for v in ["hed_legacy", "hed_prefixed"] {
            let other = StateDict::open(&variant(v, "ControlNetHED.pth")).unwrap();
            assert_eq!(other.tensors.len(), zip.tensors.len(), "{v}");
            for (name, t) in &zip.tensors {
                let o = other.get(name).unwrap();
                let d = (t - &o).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(d, 0.0, "{v}: {name}");
            }
        }
        // fp16 (the fixture's weights are fp16-exact) and a {'state_dict': {'module.' …}} legacy pickle
        let fp32 = StateDict::open(&weights("sk_model.pth")).unwrap();
        let fp16 = StateDict::open(&variant("lineart_fp16", "sk_model.pth")).unwrap();
        let w = "model0.1.weight";
        let d = (fp32.get(w).unwrap() - fp16.get(w).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        let pidi = StateDict::open(&variant("pidinet_legacy", "table5_pidinet.pth")).unwrap();
        assert!(pidi.has("init_block.weight"), "module. prefix and state_dict wrapper removed");
    }

    #[test]
    fn weights_setting_finds_a_folder_a_file_or_says_what_is_missing() {
        let dir = weights("");
        let d = dir.to_str().unwrap();
        assert_eq!(locate(Some(d), "netG.pth").unwrap(), dir.join("netG.pth"));
        let file = dir.join("sk_model2.pth");
        assert_eq!(locate(Some(file.to_str().unwrap()), "sk_model.pth").unwrap(), file);
        let err = locate(Some(d), "facenet.pth").unwrap_err().to_string();
        assert!(err.starts_with("weights: ") && err.ends_with("the folder has no facenet.pth"), "{err}");
        let err = locate(Some("./no/such/folder"), "netG.pth").unwrap_err().to_string();
        assert!(err.starts_with("weights: ./no/such/folder: no such local"), "{err}");
    }

    #[test]
    fn a_file_of_another_detector_names_the_missing_tensor() {
        let sd = StateDict::open(&weights("netG.pth")).unwrap();
        let err = sd.get("block1.convs.0.weight").unwrap_err().to_string();
        assert!(err.contains("netG.pth") && err.contains("no tensor block1.convs.0.weight"), "{err}");
    }
}
