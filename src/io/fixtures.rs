//! Test support: original-layout files rebuilt from the committed tiny diffusers models by the recipes that
//! `tools/fixtures/gen_load.py` (SD1/SD2, `load/recipes.json`) and `gen_sdxl2.py` (SDXL, `sdxl/recipes.json`)
//! wrote and checked against diffusers' own conversion (see those scripts).
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::checkpoint::{save_safetensors_atomic, TensorMap};

pub use crate::test_support::fixtures;

/// The folders holding `recipes.json` and `layouts/`.
const RECIPE_DIRS: [&str; 2] = ["load", "sdxl"];

fn recipe(name: &str) -> Value {
    for dir in RECIPE_DIRS {
        let text = std::fs::read_to_string(fixtures().join(dir).join("recipes.json")).unwrap();
        let all: Value = serde_json::from_str(&text).unwrap();
        if !all[name].is_null() {
            return all[name].clone();
        }
    }
    panic!("no recipe {name}")
}

/// The diffusers tensors a recipe reads, keyed as the recipe names them. Text encoders are widened to f32 and
/// listed with and without `text_model.` (the tiny SD1.5 one is saved without it, as transformers 5 does).
pub fn twin(name: &str) -> TensorMap {
    let r = recipe(name);
    let root = fixtures().join(r["twin"].as_str().unwrap());
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    if root.join("config.json").exists() {
        return load(root.join("diffusion_pytorch_model.safetensors"));
    }
    let mut out = HashMap::new();
    for sub in ["unet", "vae"] {
        for (k, v) in load(root.join(sub).join("diffusion_pytorch_model.safetensors")) {
            out.insert(format!("{sub}/{k}"), v);
        }
    }
    for sub in ["text_encoder", "text_encoder_2"] {
        let te_dir = root.join(sub);
        if !te_dir.is_dir() {
            continue;
        }
        let te_file = std::fs::read_dir(&te_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap();
        for (k, v) in load(te_file) {
            let v = v.to_dtype(DType::F32).unwrap();
            let bare = k.strip_prefix("text_model.").unwrap_or(&k).to_string();
            out.insert(format!("{sub}/{bare}"), v.clone());
            out.insert(format!("{sub}/text_model.{bare}"), v);
        }
    }
    out
}

/// Builds the original-layout tensors of recipe `name` (extras: zeros, or 0..n position ids).
pub fn original(name: &str, dtype: Option<DType>) -> TensorMap {
    let r = recipe(name);
    let src = twin(name);
    let mut out = HashMap::new();
    for e in r["entries"].as_array().unwrap() {
        let key = e[0].as_str().unwrap();
        let args = e[2].as_array().unwrap();
        let get = |i: usize| src[args[i].as_str().unwrap()].clone();
        let t = match e[1].as_str().unwrap() {
            "copy" => get(0),
            "t" => get(0).t().unwrap().contiguous().unwrap(),
            "cat0" => Tensor::cat(&[get(0), get(1), get(2)], 0).unwrap(),
            "conv1x1" => get(0).unsqueeze(2).unwrap().unsqueeze(3).unwrap(),
            "extra" => {
                let shape: Vec<usize> = serde_json::from_value(args[1].clone()).unwrap();
                if args[0] == "I64" {
                    let n = *shape.last().unwrap();
                    Tensor::arange(0i64, n as i64, &Device::Cpu).unwrap().reshape(shape).unwrap()
                } else {
                    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
                }
            }
            op => panic!("unknown recipe op {op}"),
        };
        let t = match dtype {
            Some(d) if t.dtype().is_float() => t.to_dtype(d).unwrap(),
            _ => t,
        };
        out.insert(key.to_string(), t);
    }
    out
}

/// Writes `tensors` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, tensors: &TensorMap) -> PathBuf {
    let p = dir.join(name);
    save_safetensors_atomic(tensors, &p).unwrap();
    p
}

/// Exact equality of two tensor maps (same names, shapes, dtypes, values).
pub fn assert_same(got: &TensorMap, want: &TensorMap, what: &str) {
    let mut g: Vec<&String> = got.keys().collect();
    let mut w: Vec<&String> = want.keys().collect();
    g.sort();
    w.sort();
    assert_eq!(g, w, "{what}: names differ");
    for (k, want) in want {
        let got = &got[k];
        assert_eq!(got.dims(), want.dims(), "{what}: {k} shape");
        assert_eq!(got.dtype(), want.dtype(), "{what}: {k} dtype");
        let a = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(a == b, "{what}: {k} values differ");
    }
}

/// A safetensors file with the layout's header and a sparse hole as data (takes no disk space).
pub fn sparse_file(dir: &Path, layout: &str, file_name: &str) -> (PathBuf, u64) {
    let path = RECIPE_DIRS
        .iter()
        .map(|d| fixtures().join(d).join("layouts").join(format!("{layout}.json")))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no layout {layout}"));
    let text = std::fs::read_to_string(path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, spec) in v["tensors"].as_object().unwrap() {
        let dtype = spec[0].as_str().unwrap();
        let shape: Vec<u64> = serde_json::from_value(spec[1].clone()).unwrap();
        let size = match dtype {
            "F16" | "BF16" => 2,
            "F32" => 4,
            _ => 8,
        } * shape.iter().product::<u64>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
    }
    let h = serde_json::to_vec(&header).unwrap();
    let p = dir.join(file_name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    f.set_len(8 + h.len() as u64 + offset).unwrap();
    (p, v["parameters"].as_u64().unwrap())
}
