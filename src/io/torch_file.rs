//! PyTorch `torch.save` files (`.pth`, `.ckpt`, `.bin`, `.pt`): the containers around the pickle.
//!
//! - zip (torch >= 1.6): `{archive}/data.pkl` plus one stored (uncompressed) entry `{archive}/data/{key}` per
//!   storage; the pickle refers to storages by key through persistent ids. Zip64 is read (SD files pass 4 GiB).
//! - legacy (torch < 1.6): five pickles in a row (magic number, protocol version, system info, the object,
//!   the list of storage keys), then each storage as an 8-byte element count followed by its bytes.
//!
//! The pickle itself is run by the restricted reader in [`super::pickle`]. Tensors are views into storages:
//! (storage, offset, shape, stride), all in elements; strided views are gathered on load.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::bytes::{u16_at, u32_at, u64_at};
pub use super::pickle::TorchTensor;
use super::pickle::{Unpickler, Value};
use crate::{Error, Result};

/// `torch.save`'s legacy-format magic number (the first pickle of a pre-1.6 file).
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
/// Zip signatures: local file header, central directory entry, end of central directory (and its zip64 forms).
const ZIP_LOCAL: u32 = 0x0403_4b50;
const ZIP_CENTRAL: u32 = 0x0201_4b50;
const ZIP_EOCD: u32 = 0x0605_4b50;
const ZIP64_EOCD: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
/// A pickle program larger than this is not a state dict (SD checkpoints' pickles are a few hundred KB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// How much of a legacy file is read to find its pickles (they precede the storages).
const LEGACY_PICKLE_WINDOW: u64 = 64 << 20;

/// A parsed torch file: its tensors (flattened names) and its top-level scalars (e.g. `global_step`).
#[derive(Debug)]
pub struct TorchFile {
    pub path: PathBuf,
    pub legacy: bool,
    pub tensors: Vec<TorchTensor>,
    pub scalars: BTreeMap<String, String>,
    /// Storage key -> (byte offset in the file, byte length).
    storages: HashMap<String, (u64, u64)>,
}

/// Is this the start of a torch legacy (non-zip) file? (a pickle whose first value is the magic number)
pub fn is_legacy_pickle(head: &[u8]) -> bool {
    head.len() >= 2 && head[0] == 0x80 && head[1] <= 5 && head.get(2) == Some(&0x8a)
}

impl TorchFile {
    /// Parses the pickle (and the zip directory) of a torch file; tensor data is read later by [`Self::load`].
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic).map_err(|_| Error::weights(path, "not a torch file (shorter than 4 bytes)"))?;
        if u32::from_le_bytes(magic) == ZIP_LOCAL {
            Self::open_zip(path, &mut f)
        } else if magic[0] == 0x80 {
            Self::open_legacy(path, &mut f)
        } else {
            Err(Error::weights(path, "not a torch file (neither a zip archive nor a pickle)"))
        }
    }

    fn open_zip(path: &Path, f: &mut File) -> Result<Self> {
        let entries = zip_entries(path, f)?;
        let pkl = entries
            .keys()
            .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .min_by_key(|n| n.len())
            .cloned()
            .ok_or_else(|| Error::weights(path, "zip archive without a data.pkl: not a torch.save file"))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        if let Some(&(off, len)) = entries.get(&format!("{prefix}byteorder")) {
            let order = read_at(path, f, off, len.min(16))?;
            if order != b"little" {
                return Err(Error::weights(path, "big-endian torch file: not supported"));
            }
        }
        let (off, len) = entries[&pkl];
        if len > MAX_PICKLE_BYTES {
            return Err(Error::weights(path, format!("data.pkl is {len} bytes: not a state dict")));
        }
        let program = read_at(path, f, off, len)?;
        let root = Unpickler::new(path, &program).run()?.0;
        let storages = entries
            .iter()
            .filter_map(|(name, &loc)| name.strip_prefix(&format!("{prefix}data/")).map(|k| (k.to_string(), loc)))
            .collect();
        Self::from_root(path, false, root, storages)
    }

    fn open_legacy(path: &Path, f: &mut File) -> Result<Self> {
        let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut bytes = Vec::new();
        f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        // The pickles come first; read a generous prefix, the storages are located by offset afterwards.
        f.by_ref().take(LEGACY_PICKLE_WINDOW.min(file_len)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
        let mut pos = 0usize;
        let mut next = |what: &str| -> Result<Value> {
            let (v, used) = Unpickler::new(path, &bytes[pos..])
                .run()
                .map_err(|e| Error::weights(path, format!("legacy torch file, {what}: {e}")))?;
            pos += used;
            Ok(v)
        };
        match next("magic number")? {
            Value::Int(m) if m as u128 == LEGACY_MAGIC => {}
            Value::BigInt(m) if m == LEGACY_MAGIC => {}
            _ => return Err(Error::weights(path, "a pickle, but not a torch.save file (no torch magic number)")),
        }
        next("protocol version")?;
        next("system info")?;
        let root = next("object")?;
        let keys = match next("storage keys")? {
            Value::List(l) => l.borrow().iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>(),
            _ => None,
        }
        .ok_or_else(|| Error::weights(path, "legacy torch file: storage key list is not a list of strings"))?;
        // Each storage: element count (i64), then its bytes; the element size comes from the tensors using it.
        let mut sizes: HashMap<String, usize> = HashMap::new();
        collect_storage_elem_sizes(&root, &mut sizes);
        let mut storages = HashMap::new();
        let mut off = pos as u64;
        for key in keys {
            let count = read_at(path, f, off, 8)?;
            let n = u64::from_le_bytes(count.try_into().expect("8 bytes"));
            let elem = *sizes.get(&key).unwrap_or(&1) as u64;
            let len = n.checked_mul(elem).filter(|l| off.saturating_add(8).saturating_add(*l) <= file_len).ok_or_else(
                || {
                    Error::weights(
                        path,
                        format!("truncated: storage {key} ({n} elements) runs past the end of the file"),
                    )
                },
            )?;
            storages.insert(key, (off + 8, len));
            off += 8 + len;
        }
        Self::from_root(path, true, root, storages)
    }

    /// Flattens the unpickled object: a state dict, or a Lightning-style dict holding one under "state_dict".
    fn from_root(path: &Path, legacy: bool, root: Value, storages: HashMap<String, (u64, u64)>) -> Result<Self> {
        let mut tensors = Vec::new();
        let mut scalars = BTreeMap::new();
        let root = match &root {
            Value::Dict(d) => {
                let inner = d.borrow().iter().find(|(k, _)| k.as_str() == Some("state_dict")).map(|(_, v)| v.clone());
                for (k, v) in d.borrow().iter() {
                    if let (Some(k), Some(s)) = (k.as_str(), v.scalar_text()) {
                        scalars.insert(k.to_string(), s);
                    }
                }
                inner.unwrap_or(root.clone())
            }
            _ => return Err(Error::weights(path, "the pickled object is not a dict of tensors")),
        };
        flatten(&root, String::new(), &mut tensors);
        for t in &tensors {
            let (_, len) = storages.get(&t.storage).ok_or_else(|| {
                Error::weights(path, format!("tensor {} refers to storage {} which the file lacks", t.name, t.storage))
            })?;
            // Highest element index the view touches, +1 (saturating: a hostile file may give any numbers).
            let needed = t.shape.iter().zip(&t.stride).fold(t.offset.saturating_add(1), |acc, (&n, &s)| {
                acc.saturating_add(n.saturating_sub(1).saturating_mul(s))
            });
            let have = *len as usize / t.dtype.size_in_bytes();
            let numel = t.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
            if numel.is_none() {
                return Err(Error::weights(
                    path,
                    format!("tensor {}: shape {:?} has more elements than memory can address", t.name, t.shape),
                ));
            }
            if t.shape.iter().all(|&n| n > 0) && needed > have {
                return Err(Error::weights(
                    path,
                    format!(
                        "truncated: tensor {} needs {needed} elements of storage {}, which has {have}",
                        t.name, t.storage
                    ),
                ));
            }
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { path: path.to_path_buf(), legacy, tensors, scalars, storages })
    }

    /// Reads one tensor's elements (as stored: f16 stays f16), gathering strided views.
    pub fn load(&self, t: &TorchTensor, device: &Device) -> Result<Tensor> {
        let path = &self.path;
        let (off, len) = self.storages[&t.storage];
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let es = t.dtype.size_in_bytes();
        let numel: usize = t.shape.iter().product();
        let contiguous = is_contiguous(&t.shape, &t.stride);
        let bytes = if contiguous {
            read_at(path, &mut f, off + (t.offset * es) as u64, (numel * es) as u64)?
        } else {
            let storage = read_at(path, &mut f, off, len)?;
            gather(&storage, es, t.offset, &t.shape, &t.stride)
        };
        Tensor::from_raw_buffer(&bytes, t.dtype, &t.shape, device)
            .map_err(|e| Error::weights(path, format!("tensor {}: {e}", t.name)))
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// Copies the elements of a strided view into row-major order.
fn gather(storage: &[u8], es: usize, offset: usize, shape: &[usize], stride: &[usize]) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[at * es..(at + 1) * es]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

fn flatten(v: &Value, prefix: String, out: &mut Vec<TorchTensor>) {
    match v {
        Value::Tensor(t) => out.push(TorchTensor { name: prefix, ..(**t).clone() }),
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                if let Some(k) = k.as_str() {
                    let name = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                    flatten(v, name, out);
                }
            }
        }
        _ => {}
    }
}

fn collect_storage_elem_sizes(v: &Value, out: &mut HashMap<String, usize>) {
    match v {
        Value::Tensor(t) => {
            out.insert(t.storage.clone(), t.dtype.size_in_bytes());
        }
        Value::Dict(d) => d.borrow().iter().for_each(|(_, v)| collect_storage_elem_sizes(v, out)),
        Value::List(l) => l.borrow().iter().for_each(|v| collect_storage_elem_sizes(v, out)),
        Value::Tuple(t) => t.iter().for_each(|v| collect_storage_elem_sizes(v, out)),
        _ => {}
    }
}

fn read_at(path: &Path, f: &mut File, off: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(off)).map_err(|e| Error::io(path, e))?;
    f.read_exact(&mut buf).map_err(|_| {
        Error::weights(path, format!("truncated: {len} bytes at offset {off} run past the end of the file"))
    })?;
    Ok(buf)
}

// ------------------------------------------------------------------------------------------------------------
// Zip directory (stored entries only, zip64 aware: SD checkpoints are larger than 4 GiB).
// ------------------------------------------------------------------------------------------------------------

/// Entry name -> (data offset, length) of every entry of a zip archive.
fn zip_entries(path: &Path, f: &mut File) -> Result<HashMap<String, (u64, u64)>> {
    let bad = |msg: &str| Error::weights(path, format!("zip archive: {msg} (truncated or not a torch file?)"));
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let tail_len = len.min(22 + 65535);
    let tail = read_at(path, f, len - tail_len, tail_len)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| u32_at(&tail, i) == ZIP_EOCD)
        .ok_or_else(|| bad("no end-of-central-directory record"))?;
    let mut count = u16_at(&tail, eocd + 10) as u64;
    let mut cd_size = u32_at(&tail, eocd + 12) as u64;
    let mut cd_off = u32_at(&tail, eocd + 16) as u64;
    if (count == 0xFFFF || cd_off == 0xFFFF_FFFF || cd_size == 0xFFFF_FFFF) && eocd >= 20 {
        if u32_at(&tail, eocd - 20) != ZIP64_LOCATOR {
            return Err(bad("zip64 locator missing"));
        }
        let eocd64 = read_at(path, f, u64_at(&tail, eocd - 20 + 8), 56)?;
        if u32_at(&eocd64, 0) != ZIP64_EOCD {
            return Err(bad("zip64 end record missing"));
        }
        count = u64_at(&eocd64, 32);
        cd_size = u64_at(&eocd64, 40);
        cd_off = u64_at(&eocd64, 48);
    }
    if cd_off.saturating_add(cd_size) > len {
        return Err(bad("central directory lies past the end of the file"));
    }
    let cd = read_at(path, f, cd_off, cd_size)?;
    let mut entries = HashMap::new();
    let mut p = 0usize;
    for _ in 0..count {
        if p + 46 > cd.len() || u32_at(&cd, p) != ZIP_CENTRAL {
            return Err(bad("corrupt central directory"));
        }
        let method = u16_at(&cd, p + 10);
        let mut size = u32_at(&cd, p + 20) as u64;
        let name_len = u16_at(&cd, p + 28) as usize;
        let extra_len = u16_at(&cd, p + 30) as usize;
        let comment_len = u16_at(&cd, p + 32) as usize;
        let mut local = u32_at(&cd, p + 42) as u64;
        if p + 46 + name_len + extra_len > cd.len() {
            return Err(bad("corrupt central directory"));
        }
        let name = String::from_utf8_lossy(&cd[p + 46..p + 46 + name_len]).into_owned();
        // Zip64 extra field: 64-bit values for the 32-bit fields that are saturated, in this order.
        let mut e = p + 46 + name_len;
        let extra_end = e + extra_len;
        while e + 4 <= extra_end {
            let (id, n) = (u16_at(&cd, e), u16_at(&cd, e + 2) as usize);
            if id == 1 {
                let mut q = e + 4;
                if u32_at(&cd, p + 24) == 0xFFFF_FFFF {
                    size = u64_at(&cd, q);
                    q += 8;
                }
                if u32_at(&cd, p + 20) == 0xFFFF_FFFF {
                    q += 8;
                }
                if local == 0xFFFF_FFFF {
                    local = u64_at(&cd, q);
                }
            }
            e += 4 + n;
        }
        if method != 0 {
            return Err(Error::weights(
                path,
                format!("zip entry {name} is compressed: torch files store entries uncompressed"),
            ));
        }
        let header = read_at(path, f, local, 30)?;
        if u32_at(&header, 0) != ZIP_LOCAL {
            return Err(bad("corrupt local header"));
        }
        let data = local + 30 + u16_at(&header, 26) as u64 + u16_at(&header, 28) as u64;
        if data.saturating_add(size) > len {
            return Err(Error::weights(path, format!("truncated: zip entry {name} runs past the end of the file")));
        }
        entries.insert(name, (data, size));
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::DType;

    fn fixture(rel: &str) -> PathBuf {
        crate::test_support::fixture_path("load").join(rel)
    }

    /// Every tensor of a torch.save'd file equals the one torch itself saved beside it (exact, as stored).
    fn check_nested(file: &str) {
        let tf = TorchFile::open(&fixture(file)).unwrap();
        let expected =
            candle_core::safetensors::load(fixture("pickles/nested_expected.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(tf.scalars.get("global_step").map(String::as_str), Some("875000"));
        assert_eq!(tf.tensors.len(), expected.len());
        for t in &tf.tensors {
            let got = tf.load(t, &Device::Cpu).unwrap();
            let want = &expected[&t.name];
            assert_eq!(got.dims(), want.dims(), "{}", t.name);
            // i64 values and f16/bf16 widened to f32 are all exact in f64.
            let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let w = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(g, w, "{}", t.name);
        }
        let dtype = |n: &str| tf.tensors.iter().find(|t| t.name == n).unwrap().dtype;
        assert_eq!(dtype("model.f16"), DType::F16);
        assert_eq!(dtype("model.bf16"), DType::BF16);
    }

    #[test]
    fn zip_pickle_views_offsets_shared_storage_and_parameters() {
        check_nested("pickles/nested.pt");
    }

    #[test]
    fn legacy_pickle() {
        let tf = TorchFile::open(&fixture("pickles/nested_legacy.pt")).unwrap();
        assert!(tf.legacy);
        check_nested("pickles/nested_legacy.pt");
    }

    #[test]
    fn refuses_os_system_naming_it() {
        let err = TorchFile::open(&fixture("pickles/evil_os_system.pt")).unwrap_err().to_string();
        assert!(err.contains("os.system") && err.contains("refusing"), "{err}");
    }

    #[test]
    fn truncated_zip_is_an_error() {
        let bytes = std::fs::read(fixture("control_tiny_sd15_fp16.pth")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 10, 100] {
            let p = dir.path().join("cut.pth");
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = TorchFile::open(&p).unwrap_err().to_string();
            assert!(err.contains("cut.pth") && (err.contains("truncated") || err.contains("zip")), "{err}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pth");
        std::fs::write(&p, b"\x80\x02\xffgarbage").unwrap();
        assert!(TorchFile::open(&p).unwrap_err().to_string().contains("x.pth"));
        std::fs::write(&p, b"hello world").unwrap();
        assert!(TorchFile::open(&p).unwrap_err().to_string().contains("not a torch file"));
    }

    /// Cut or corrupted files give errors, never panics (every prefix length class, every pickle byte flipped).
    #[test]
    fn corrupt_files_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["pickles/nested.pt", "pickles/nested_legacy.pt"] {
            let bytes = std::fs::read(fixture(file)).unwrap();
            let mut variants: Vec<Vec<u8>> = (0..bytes.len()).step_by(37).map(|n| bytes[..n].to_vec()).collect();
            // The pickle sits in the first ~1 KB of both files: flip each of its bytes in turn.
            for i in 0..bytes.len().min(1100) {
                let mut b = bytes.clone();
                b[i] ^= 0x5a;
                variants.push(b);
            }
            for (n, v) in variants.iter().enumerate() {
                let p = dir.path().join("x.pt");
                std::fs::write(&p, v).unwrap();
                let r = std::panic::catch_unwind(|| {
                    if let Ok(tf) = TorchFile::open(&p) {
                        for t in &tf.tensors {
                            let _ = tf.load(t, &Device::Cpu);
                        }
                    }
                });
                assert!(r.is_ok(), "{file}: variant {n} panicked");
            }
        }
    }

    #[test]
    fn strided_gather() {
        // A 2x3 row-major storage read transposed: [[0,3],[1,4],[2,5]].
        let storage: Vec<u8> = (0u8..6).collect();
        assert_eq!(gather(&storage, 1, 0, &[3, 2], &[1, 3]), vec![0, 3, 1, 4, 2, 5]);
        assert!(is_contiguous(&[2, 3], &[3, 1]) && !is_contiguous(&[3, 2], &[1, 3]));
    }
}
