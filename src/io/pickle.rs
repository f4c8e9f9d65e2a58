//! A restricted pickle reader: tensors out of `torch.save` pickles without running them.
//!
//! A pickle is a small program for a stack machine. Python's unpickler imports and calls whatever globals the
//! program names, so a malicious file can run anything. This reader implements the stack machine itself and
//! knows only the handful of globals that `torch.save` uses for tensors: `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_tensor`, `torch._utils._rebuild_parameter` (+ `_with_state`), `collections.OrderedDict`, the storage
//! types (`torch.FloatStorage`, ...) and `_codecs.encode`. Any other global is refused with its name; nothing is
//! ever executed. The containers (zip, legacy) are read by [`super::torch_file`].
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use candle_core::DType;

use super::bytes::{u16_at, u32_at, u64_at};
use crate::{Error, Result};

/// One tensor found in a torch file: where its elements live, not yet read (what the pickle's
/// `_rebuild_tensor_v2` calls describe; [`super::torch_file`] reads the elements).
#[derive(Debug, Clone)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub(crate) storage: String,
    pub(crate) offset: usize,
    pub(crate) stride: Vec<usize>,
}

// ------------------------------------------------------------------------------------------------------------
// The restricted unpickler.
// ------------------------------------------------------------------------------------------------------------

/// The globals a tensor pickle may name; everything else is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Global {
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
pub(crate) enum Value {
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
    pub(crate) fn as_str(&self) -> Option<&str> {
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
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Int(i) => Some(i.to_string()),
            Value::Float(x) => Some(x.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

pub(crate) struct Unpickler<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    pub(crate) fn new(path: &'a Path, data: &'a [u8]) -> Self {
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
    pub(crate) fn run(mut self) -> Result<(Value, usize)> {
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
                    // BUILD: set an object's state. Only empty states are accepted (nothing to set), and the
                    // `_metadata` (per-module version numbers) that `nn.Module.state_dict()` attaches to its
                    // OrderedDict: every `torch.save(model.state_dict())` file carries it.
                    let state = self.pop()?;
                    let empty = match &state {
                        Value::None => true,
                        Value::Dict(d) => d.borrow().iter().all(|(k, _)| k.as_str() == Some("_metadata")),
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

    fn run(program: &[u8]) -> Result<Value> {
        Unpickler::new(Path::new("test.pkl"), program).run().map(|(v, _)| v)
    }

    /// `torch.save(model.state_dict())`: the OrderedDict's BUILD state is its `_metadata`; other state is refused.
    #[test]
    fn state_dict_metadata_is_ignored_other_state_refused() {
        let with = |key: &[u8]| {
            let mut p = b"\x80\x02ccollections\nOrderedDict\n)R}X".to_vec();
            p.extend((key.len() as u32).to_le_bytes());
            p.extend(key);
            p.extend(b"}sb.");
            p
        };
        assert!(matches!(run(&with(b"_metadata")), Ok(Value::Dict(_))));
        let err = run(&with(b"weight")).unwrap_err().to_string();
        assert!(err.contains("BUILD with a non-empty state"), "{err}");
    }

    #[test]
    fn refuses_every_foreign_global_by_name() {
        // Protocol 2 GLOBAL, protocol 4 STACK_GLOBAL, and a builtin that would build objects.
        let cases: [(&[u8], &str); 3] = [
            (b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.", "os.system"),
            (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93.", "posix.system"),
            (b"\x80\x02cbuiltins\neval\n.", "builtins.eval"),
        ];
        for (program, name) in cases {
            let err = run(program).unwrap_err().to_string();
            assert!(err.contains(&format!("`{name}`")) && err.contains("refusing"), "{err}");
        }
    }

    #[test]
    fn plain_values() {
        // {"a": [1, -2, 2**70 >> 60], "b": (1.5, True, None)} with memo use.
        let v = run(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM\x00\x04eX\x01\x00\x00\x00bG?\xf8\x00\x00\x00\x00\x00\x00\x88N\x87u.")
            .unwrap();
        let Value::Dict(d) = v else { panic!("not a dict") };
        let d = d.borrow();
        assert_eq!(d[0].0.as_str(), Some("a"));
        let Value::List(l) = &d[0].1 else { panic!("not a list") };
        let ints: Vec<String> = l.borrow().iter().filter_map(Value::scalar_text).collect();
        assert_eq!(ints, ["1", "-2", "1024"]);
        let Value::Tuple(t) = &d[1].1 else { panic!("not a tuple") };
        assert_eq!(t[0].scalar_text().as_deref(), Some("1.5"));
    }

    #[test]
    fn malformed_programs_are_errors() {
        for p in [&b""[..], b"\x80\x02", b"\x80\x02t.", b"\x80\x02h\x07.", b"\x80\x02\xff.", b"\x80\x02\x81."] {
            assert!(run(p).is_err(), "{p:?}");
        }
    }
}
