//! Reading tensors out of PyTorch `torch.save` files (`.pth`, `.ckpt`, `.bin`, `.pt`) without running them.
//!
//! A `torch.save` file is a Python pickle: a small program for a stack machine. Python's unpickler imports and
//! calls whatever globals the program names, so a malicious file can run anything. This reader implements the
//! stack machine itself and knows only the handful of globals that `torch.save` uses for tensors:
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor`, `torch._utils._rebuild_parameter` (+ `_with_state`),
//! `collections.OrderedDict`, the storage types (`torch.FloatStorage`, ...) and `_codecs.encode`. Any other
//! global is refused with its name; nothing is ever executed.
//!
//! Two containers exist:
//! - zip (torch >= 1.6): `{archive}/data.pkl` plus one stored (uncompressed) entry `{archive}/data/{key}` per
//!   storage; the pickle refers to storages by key through persistent ids.
//! - legacy (torch < 1.6): five pickles in a row (magic number, protocol version, system info, the object,
//!   the list of storage keys), then each storage as an 8-byte element count followed by its bytes.
//!
//! Tensors are views into storages: (storage, offset, shape, stride), all in elements.
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

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

/// One tensor found in a torch file: where its elements live, not yet read.
#[derive(Debug, Clone)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: String,
    offset: usize,
    stride: Vec<usize>,
}

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

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

// ------------------------------------------------------------------------------------------------------------
// The restricted unpickler.
// ------------------------------------------------------------------------------------------------------------

/// The globals a tensor pickle may name; everything else is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    CodecsEncode,
    Storage(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("torch", storage) => Global::Storage(match storage {
                "FloatStorage" => DType::F32,
                "HalfStorage" => DType::F16,
                "BFloat16Storage" => DType::BF16,
                "DoubleStorage" => DType::F64,
                "LongStorage" => DType::I64,
                "IntStorage" => DType::I32,
                "ShortStorage" => DType::I16,
                "ByteStorage" | "BoolStorage" => DType::U8,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    BigInt(u128),
    Float(f64),
    Str(String),
    /// Raw bytes (never needed for tensors, so not kept).
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    /// A persistent id resolved to a storage: (key, element type).
    Storage(String, DType),
    Tensor(Rc<TorchTensor>),
    Mark,
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) if *i >= 0 => Some(*i as usize),
            _ => None,
        }
    }
    fn usizes(&self) -> Option<Vec<usize>> {
        match self {
            Value::Tuple(t) => t.iter().map(Value::as_usize).collect(),
            _ => None,
        }
    }
    fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Int(i) => Some(i.to_string()),
            Value::Float(x) => Some(x.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

struct Unpickler<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(path: &'a Path, data: &'a [u8]) -> Self {
        Self { path, data, pos: 0, stack: Vec::new(), memo: HashMap::new() }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::weights(self.path, format!("pickle at byte {}: {msg}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| self.err("truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16_at(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("truncated GLOBAL"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn text(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8(b.to_vec()).map_err(|_| self.err("invalid UTF-8 string"))?))
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&mut self) -> Result<&mut Value> {
        let e = self.err("stack underflow");
        self.stack.last_mut().ok_or(e)
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or_else(|| self.err("no MARK"))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }
    fn global(&mut self, module: &str, name: &str) -> Result<Value> {
        Global::resolve(module, name).map(Value::Global).ok_or_else(|| {
            self.err(format!(
                "refusing global `{module}.{name}`: only tensors, numbers, strings and containers are read \
                 (nothing in the file is executed); re-save the weights as .safetensors"
            ))
        })
    }

    /// Runs the program to STOP; returns the result and the number of bytes used.
    fn run(mut self) -> Result<(Value, usize)> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.u64()?;
                } // FRAME
                b'.' => {
                    let v = self.pop()?;
                    return Ok((v, self.pos));
                }
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    let v = long_value(b).ok_or_else(|| self.err("integer too large"))?;
                    self.stack.push(v)
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack.push(Value::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'T' | b'B' => self.u32()? as usize,
                        0x8e => self.u64()? as usize,
                        _ => self.u8()? as usize,
                    };
                    let b = self.take(n)?;
                    // Protocol-2 byte strings (T/U) are latin-1 text in practice (storage keys, names).
                    let v = if matches!(op, b'T' | b'U') {
                        Value::Str(b.iter().map(|&c| c as char).collect())
                    } else {
                        Value::Bytes
                    };
                    self.stack.push(v)
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Rc::default())),
                0x8f => self.stack.push(Value::List(Rc::default())), // EMPTY_SET, kept as a list
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.pairs(items)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(d))))
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.set_items(pairs)?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| self.err(format!("memo {i} unset")))?;
                    self.stack.push(v)
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(&module, &name)?;
                    self.stack.push(v)
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let v = self.global(m, n)?;
                    self.stack.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    // BUILD: set an object's state. Only empty states are accepted (nothing to set).
                    let state = self.pop()?;
                    let empty = match &state {
                        Value::None => true,
                        Value::Dict(d) => d.borrow().is_empty(),
                        Value::Tuple(t) => t.iter().all(|v| matches!(v, Value::None)),
                        _ => false,
                    };
                    if !empty {
                        return Err(self.err("BUILD with a non-empty state: not a plain state dict"));
                    }
                }
                0x81 | 0x92 => {
                    return Err(self.err("NEWOBJ: the pickle instantiates a class; not a plain state dict"));
                }
                _ => return Err(self.err(format!("unsupported opcode 0x{op:02x} (not a torch.save pickle?)"))),
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of dict items"));
        }
        let mut it = items.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn set_items(&mut self, pairs: Vec<(Value, Value)>) -> Result<()> {
        match self.top()? {
            Value::Dict(d) => {
                d.borrow_mut().extend(pairs);
                Ok(())
            }
            _ => Err(self.err("SETITEM on a non-dict")),
        }
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            _ => Err(self.err("APPEND on a non-list")),
        }
    }

    /// `('storage', StorageType, key, location, numel[, view_metadata])` -> a storage reference.
    fn persistent(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = &pid else { return Err(self.err("persistent id is not a tuple")) };
        match (t.first().and_then(Value::as_str), t.get(1), t.get(2)) {
            (Some("storage"), Some(Value::Global(Global::Storage(dtype))), Some(key)) => {
                let key = key.as_str().ok_or_else(|| self.err("storage key is not a string"))?;
                Ok(Value::Storage(key.to_string(), *dtype))
            }
            _ => Err(self.err(format!("unknown persistent id {pid:?}"))),
        }
    }

    fn call(&self, f: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = f else { return Err(self.err("REDUCE on something that is not an allowed global")) };
        let Value::Tuple(args) = args else { return Err(self.err("REDUCE arguments are not a tuple")) };
        match g {
            Global::OrderedDict => Ok(Value::Dict(Rc::default())),
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                let bad = || self.err(format!("{g:?}: unexpected arguments {args:?}"));
                let Some(Value::Storage(key, dtype)) = args.first() else { return Err(bad()) };
                let offset = args.get(1).and_then(Value::as_usize).ok_or_else(bad)?;
                let shape = args.get(2).and_then(Value::usizes).ok_or_else(bad)?;
                let stride = args.get(3).and_then(Value::usizes).ok_or_else(bad)?;
                if shape.len() != stride.len() {
                    return Err(bad());
                }
                let t = TorchTensor { name: String::new(), dtype: *dtype, shape, storage: key.clone(), offset, stride };
                Ok(Value::Tensor(Rc::new(t)))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(self.err("_rebuild_parameter without a tensor")),
            },
            Global::CodecsEncode => match args.first() {
                Some(Value::Str(_)) => Ok(Value::Bytes),
                _ => Err(self.err("_codecs.encode without a string")),
            },
            Global::Storage(_) => Err(self.err("a storage type is not callable here")),
        }
    }
}

/// A little-endian two's-complement integer (LONG1/LONG4).
fn long_value(b: &[u8]) -> Option<Value> {
    if b.is_empty() {
        return Some(Value::Int(0));
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xFFu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(b);
        return Some(Value::Int(i64::from_le_bytes(buf)));
    }
    if b.len() <= 16 && b[b.len() - 1] & 0x80 == 0 {
        let mut buf = [0u8; 16];
        buf[..b.len()].copy_from_slice(b);
        return Some(Value::BigInt(u128::from_le_bytes(buf)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/load").join(rel)
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
