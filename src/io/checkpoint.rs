//! Opening a single weights file of any common format as named tensors: `.safetensors`, and PyTorch's
//! `torch.save` files (`.pth`, `.ckpt`, `.bin`, `.pt`; zip or legacy, read by the restricted [`pickle`] reader).
//!
//! The format is told from the file's first bytes, never from its extension (civitai files are often misnamed).
//! Opening reads headers only (names, dtypes, shapes), so `inspect` works on multi-GB files instantly;
//! tensors are read one by one on demand, in the dtype they are stored in.
//!
//! [`pickle`]: super::pickle
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::torch_file::{is_legacy_pickle, TorchFile};
use crate::{Error, Result};

/// Named tensors, as the converters pass them around.
pub type TensorMap = HashMap<String, Tensor>;

/// A safetensors header larger than this is not a model header (SDXL's is ~200 KB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Safetensors,
    /// `torch.save` zip archive (torch >= 1.6).
    TorchZip,
    /// `torch.save` legacy pickle stream (torch < 1.6).
    TorchLegacy,
}

impl std::fmt::Display for FileFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileFormat::Safetensors => "safetensors",
            FileFormat::TorchZip => "torch zip pickle",
            FileFormat::TorchLegacy => "torch legacy pickle",
        })
    }
}

/// Name, dtype and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Element count (saturating: headers come from untrusted files).
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &n| a.saturating_mul(n))
    }
}

/// An opened weights file: its tensor headers, and the means to read each tensor.
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: FileFormat,
    /// Sorted by name.
    pub tensors: Vec<TensorInfo>,
    /// Top-level non-tensor values of torch files (e.g. `global_step`); empty for safetensors.
    pub scalars: BTreeMap<String, String>,
    source: Source,
}

enum Source {
    Safetensors(OnceLock<std::result::Result<MmapedSafetensors, String>>),
    Torch(Box<TorchFile>),
}

/// Tells a weights file's format from its first bytes.
pub fn sniff(path: &Path) -> Result<FileFormat> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 9];
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return Ok(FileFormat::TorchZip);
    }
    if is_legacy_pickle(head) {
        return Ok(FileFormat::TorchLegacy);
    }
    // safetensors: u64 header length, then a JSON object.
    if n == 9 && head[8] == b'{' {
        return Ok(FileFormat::Safetensors);
    }
    let what = if n == 0 { "an empty file".to_string() } else { format!("first bytes {:02x?}", head) };
    Err(Error::weights(path, format!("not a weights file: neither safetensors nor a torch.save pickle ({what})")))
}

impl Checkpoint {
    /// Reads the headers of a weights file (any supported format).
    pub fn open(path: &Path) -> Result<Self> {
        let format = sniff(path)?;
        match format {
            FileFormat::Safetensors => {
                let tensors = safetensors_header(path)?;
                let source = Source::Safetensors(OnceLock::new());
                Ok(Self { path: path.to_path_buf(), format, tensors, scalars: BTreeMap::new(), source })
            }
            FileFormat::TorchZip | FileFormat::TorchLegacy => {
                let tf = TorchFile::open(path)?;
                let tensors = tf.tensors.iter().map(|t| TensorInfo {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                });
                let tensors = tensors.collect();
                let scalars = tf.scalars.clone();
                Ok(Self { path: path.to_path_buf(), format, tensors, scalars, source: Source::Torch(Box::new(tf)) })
            }
        }
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.binary_search_by(|t| t.name.as_str().cmp(name)).ok().map(|i| &self.tensors[i])
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.info(name).map(|t| t.shape.as_slice())
    }

    /// Reads one tensor, in its stored dtype, on the CPU.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let missing = || Error::weights(&self.path, format!("has no tensor {name}"));
        match &self.source {
            Source::Safetensors(cell) => {
                // SAFETY: read-only map of a file we do not modify; as every mmap-based loader (candle, safetensors).
                let st = cell.get_or_init(|| unsafe { MmapedSafetensors::new(&self.path) }.map_err(|e| e.to_string()));
                let st = st.as_ref().map_err(|e| Error::weights(&self.path, e))?;
                self.info(name).ok_or_else(missing)?;
                st.load(name, &Device::Cpu).map_err(|e| Error::weights(&self.path, format!("tensor {name}: {e}")))
            }
            Source::Torch(tf) => {
                let t = tf.tensors.iter().find(|t| t.name == name).ok_or_else(missing)?;
                tf.load(t, &Device::Cpu)
            }
        }
    }

    /// Reads every tensor whose name passes `keep`.
    pub fn load_where(&self, keep: impl Fn(&str) -> bool) -> Result<TensorMap> {
        self.tensors.iter().filter(|t| keep(&t.name)).map(|t| Ok((t.name.clone(), self.load(&t.name)?))).collect()
    }

    /// The most common dtype among floating-point tensors (what "an fp16 file" means).
    pub fn float_dtype(&self) -> Option<DType> {
        let mut counts: BTreeMap<&'static str, (usize, DType)> = BTreeMap::new();
        for t in self.tensors.iter().filter(|t| t.dtype.is_float()) {
            counts.entry(t.dtype.as_str()).or_insert((0, t.dtype)).0 += 1;
        }
        counts.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }
}

/// Parses a safetensors header (checking every tensor lies within the file) without reading any data.
fn safetensors_header(path: &Path) -> Result<Vec<TensorInfo>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| Error::weights(path, "truncated: shorter than the 8-byte safetensors header"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > len {
        return Err(Error::weights(
            path,
            format!("truncated or not safetensors: header of {header_len} bytes, file of {len}"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| Error::weights(path, format!("not safetensors: header is not JSON ({e})")))?;
    let data_len = len - 8 - header_len;
    let mut out = Vec::with_capacity(meta.len());
    for (name, info) in meta.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = |what: &str| Error::weights(path, format!("tensor {name}: bad header ({what})"));
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
        let dtype = match dtype {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "U8" | "BOOL" => DType::U8,
            "U32" => DType::U32,
            other => return Err(bad(&format!("dtype {other} is not supported"))),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad("no shape"))?;
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no data_offsets"))?;
        if end > data_len {
            return Err(Error::weights(
                path,
                format!("truncated: tensor {name} ends at byte {end} of the data, which has {data_len}"),
            ));
        }
        out.push(TensorInfo { name: name.clone(), dtype, shape });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes tensors as a safetensors file atomically: a temporary file beside `path`, renamed on success.
pub fn save_safetensors_atomic(tensors: &TensorMap, path: &Path) -> Result<()> {
    super::atomic::write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|e| Error::weights(path, format!("writing: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::fixture_path as fixture;

    #[test]
    fn sniffs_formats_by_content() {
        assert_eq!(sniff(&fixture("load/control_tiny_sd15_fp16.pth")).unwrap(), FileFormat::TorchZip);
        assert_eq!(sniff(&fixture("load/pickles/nested_legacy.pt")).unwrap(), FileFormat::TorchLegacy);
        let st = fixture("models/tiny-controlnet-a/diffusion_pytorch_model.safetensors");
        assert_eq!(sniff(&st).unwrap(), FileFormat::Safetensors);
        let err = sniff(&fixture("load/recipes.json")).unwrap_err().to_string();
        assert!(err.contains("not a weights file") && err.contains("recipes.json"), "{err}");
    }

    #[test]
    fn safetensors_and_pickle_give_the_same_headers() {
        let pth = Checkpoint::open(&fixture("load/control_tiny_sd15_fp16.pth")).unwrap();
        assert_eq!(pth.tensors.len(), 170);
        assert_eq!(pth.float_dtype(), Some(DType::F16));
        assert_eq!(pth.shape("control_model.input_hint_block.0.weight"), Some(&[16, 3, 3, 3][..]));
        let t = pth.load("control_model.input_hint_block.0.weight").unwrap();
        assert_eq!((t.dtype(), t.dims()), (DType::F16, &[16, 3, 3, 3][..]));
    }

    #[test]
    fn truncated_safetensors_is_named() {
        let src = fixture("models/tiny-controlnet-a/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("half.safetensors");
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let err = Checkpoint::open(&p).err().unwrap().to_string();
        assert!(err.contains("truncated") && err.contains("half.safetensors"), "{err}");
        std::fs::write(&p, []).unwrap();
        assert!(Checkpoint::open(&p).err().unwrap().to_string().contains("empty file"));
    }

    #[test]
    fn atomic_save_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        save_safetensors_atomic(&HashMap::from([("a".to_string(), t)]), &p).unwrap();
        let c = Checkpoint::open(&p).unwrap();
        assert_eq!(c.load("a").unwrap().to_vec2::<f32>().unwrap(), vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
