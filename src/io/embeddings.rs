//! Textual-inversion embedding files: the few vectors that stand for a new word in the text encoder's input.
//!
//! The layouts people share, one table (`read_layout`):
//!
//! | maker | file | tensors |
//! | --- | --- | --- |
//! | A1111 (and the original textual_inversion repo) | `.pt` | `string_to_param.*` (n, width); `name`, `step` beside |
//! | A1111 | `.safetensors` | `emb_params` (n, width) |
//! | A1111 / kohya, SDXL | `.safetensors` | `clip_l` (n, 768) and `clip_g` (n, 1280): one set per text encoder |
//! | diffusers' training script | `learned_embeds.bin` / `.safetensors` | `{token: (width,) or (n, width)}` |
//!
//! The name that triggers an embedding is the file's stem, as in A1111's embeddings folder; a diffusers file
//! still called `learned_embeds` goes by the token stored in it.
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::checkpoint::Checkpoint;
use crate::{Error, Result};

/// The file extensions an embeddings folder is searched for (A1111 reads the same).
pub const EXTENSIONS: &[&str] = &["pt", "bin", "safetensors"];
/// diffusers' training script saves its result under this stem; such a file is named by its token.
const DIFFUSERS_STEM: &str = "learned_embeds";

/// How the file was laid out (for messages and the metadata's description).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingLayout {
    A1111Pt,
    A1111Safetensors,
    Sdxl,
    Diffusers,
}

/// One embedding: its name, its vectors for the (first) text encoder, and for SDXL the second encoder's.
#[derive(Debug, Clone)]
pub struct EmbeddingFile {
    pub path: PathBuf,
    pub name: String,
    pub layout: EmbeddingLayout,
    /// (vectors, width), f32 on the CPU: SD 1.x/2.x's encoder, or SDXL's first (`clip_l`).
    pub vectors: Tensor,
    /// SDXL's second encoder (`clip_g`), as many vectors as `vectors`.
    pub vectors_2: Option<Tensor>,
}

impl EmbeddingFile {
    /// Reads `path` (`.pt`/`.bin` pickles through the restricted reader, or `.safetensors`). Errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        let file = Checkpoint::open(path)?;
        let tensors = file.load_where(|_| true)?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let as_matrix = |key: &str| -> Result<Tensor> {
            let t = tensors[key].to_dtype(DType::F32)?;
            match t.rank() {
                1 => Ok(t.unsqueeze(0)?),
                2 if t.dim(0)? > 0 => Ok(t),
                _ => Err(Error::weights(
                    path,
                    format!("tensor {key} has shape {:?}, expected (vectors, width)", t.dims()),
                )),
            }
        };
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let (layout, vectors, vectors_2, token) = match names.as_slice() {
            [k] if *k == "emb_params" => (EmbeddingLayout::A1111Safetensors, as_matrix(k)?, None, None),
            [k] if k.starts_with("string_to_param.") => (EmbeddingLayout::A1111Pt, as_matrix(k)?, None, None),
            [g, l] if *g == "clip_g" && *l == "clip_l" => {
                let (first, second) = (as_matrix(l)?, as_matrix(g)?);
                if first.dim(0)? != second.dim(0)? {
                    return Err(Error::weights(
                        path,
                        format!("clip_l has {} vectors but clip_g {}", first.dim(0)?, second.dim(0)?),
                    ));
                }
                (EmbeddingLayout::Sdxl, first, Some(second), None)
            }
            [k] => (EmbeddingLayout::Diffusers, as_matrix(k)?, None, Some(k.to_string())),
            _ => {
                let shown: Vec<&str> = names.iter().take(4).map(|s| s.as_str()).collect();
                return Err(Error::weights(
                    path,
                    format!(
                        "not a textual-inversion embedding: expected emb_params, string_to_param, clip_l + clip_g or \
                         one {{token: vectors}} tensor, found {} tensors ({}{})",
                        names.len(),
                        shown.join(", "),
                        if names.len() > shown.len() { ", ..." } else { "" }
                    ),
                ));
            }
        };
        let name = match token {
            Some(token) if stem == DIFFUSERS_STEM => token,
            _ => stem,
        };
        if name.trim().is_empty() {
            return Err(Error::weights(path, "the embedding has no name (empty file stem)"));
        }
        Ok(Self { path: path.to_path_buf(), name, layout, vectors, vectors_2 })
    }

    /// How many tokens' worth of vectors it holds.
    pub fn num_vectors(&self) -> usize {
        self.vectors.dim(0).unwrap_or(0)
    }

    /// The width of each vector for the first encoder (768 SD 1.x, 1024 SD 2.x, 768 + 1280 SDXL).
    pub fn width(&self) -> usize {
        self.vectors.dim(1).unwrap_or(0)
    }

    /// "768" or "768 + 1280": the widths as messages give them.
    pub fn describe_width(&self) -> String {
        match &self.vectors_2 {
            Some(g) => format!("{} + {} (SDXL)", self.width(), g.dim(1).unwrap_or(0)),
            None => self.width().to_string(),
        }
    }
}

/// The embedding files of `dir` and its subfolders, by extension (A1111's embeddings folder), sorted.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            out.extend(files_in(&p)?);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(out)
}

/// The name a file in an embeddings folder goes by without reading it (its stem; diffusers' `learned_embeds`
/// files are read for their token).
pub fn name_of(path: &Path) -> Result<String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if stem == DIFFUSERS_STEM {
        return Ok(EmbeddingFile::read(path)?.name);
    }
    Ok(stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::fixture_path;

    #[test]
    fn reads_every_layout() {
        let read = |f: &str| EmbeddingFile::read(&fixture_path(&format!("textual_inversion/{f}"))).unwrap();
        let ink = read("inkstyle.pt");
        assert_eq!(
            (ink.name.as_str(), ink.layout, ink.num_vectors(), ink.width()),
            ("inkstyle", EmbeddingLayout::A1111Pt, 2, 32)
        );
        let neon = read("neonfox.safetensors");
        assert_eq!((neon.layout, neon.num_vectors()), (EmbeddingLayout::A1111Safetensors, 3));
        let cat = read("cat-toy/learned_embeds.bin");
        assert_eq!((cat.name.as_str(), cat.layout, cat.num_vectors()), ("<cat-toy>", EmbeddingLayout::Diffusers, 1));
        let xl = read("xlstyle.safetensors");
        assert_eq!(
            (xl.layout, xl.num_vectors(), xl.describe_width()),
            (EmbeddingLayout::Sdxl, 2, "32 + 48 (SDXL)".into())
        );
    }

    #[test]
    fn other_files_are_refused_by_name() {
        let err = EmbeddingFile::read(&fixture_path("lora/tiny-kohya.safetensors")).unwrap_err().to_string();
        assert!(err.contains("tiny-kohya.safetensors") && err.contains("not a textual-inversion embedding"), "{err}");
    }
}
