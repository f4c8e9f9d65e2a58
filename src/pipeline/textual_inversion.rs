//! Textual-inversion embeddings in a run: which files a request uses, whether they fit the model, and the
//! text encoders and tokenizers that know them.
//!
//! - `plain` syntax is diffusers' `load_textual_inversion`: an embedding "name" of n vectors becomes the tokens
//!   name, name_1, ..., name_{n-1}, added to the tokenizer (matched case-blind, anywhere in the text) and given
//!   the next ids of the text encoder's token table; before tokenizing, a name that occurs in the prompt is
//!   replaced by "name name_1 ..." (diffusers' `maybe_convert_prompt`, a case-sensitive text replacement).
//! - `a1111` syntax is A1111's: the name is found in the prompt by its token ids and replaced by all its
//!   vectors ([`super::prompt_chunks`]); we give the vectors ids past the table as above, which is A1111's
//!   `EmbeddingsWithFixes` (the vectors written over the token embeddings at those positions).
//!
//! Files come from `embeddings` (always loaded) and `embeddings_dir` (A1111's folder: a file there is loaded
//! when its name occurs in a prompt).
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use super::request::GenerateRequest;
use super::sd::StableDiffusion;
use crate::io::embeddings::{self, EmbeddingFile};
use crate::model::clip::ClipTextModel;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The embeddings of one request, read; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Embeddings(Arc<Vec<LoadedEmbedding>>);

/// One embedding and the request field it came from (`embeddings` or `embeddings_dir`), for errors.
#[derive(Debug, Clone)]
pub struct LoadedEmbedding {
    pub file: EmbeddingFile,
    pub setting: &'static str,
}

impl PartialEq for Embeddings {
    fn eq(&self, other: &Self) -> bool {
        let key = |e: &LoadedEmbedding| (e.file.name.clone(), e.file.path.clone());
        self.0.iter().map(key).eq(other.0.iter().map(key))
    }
}

impl Embeddings {
    pub fn new(list: Vec<LoadedEmbedding>) -> Self {
        Self(Arc::new(list))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &LoadedEmbedding> {
        self.0.iter()
    }

    /// Reads the embeddings `request` uses: every `embeddings` file, and the files of `embeddings_dir` whose
    /// name occurs (case-blind) in one of its prompts. A name given twice is refused; a file given by
    /// `embeddings` hides a folder file of the same name.
    pub fn for_request(request: &GenerateRequest) -> Result<Self> {
        let mut list: Vec<LoadedEmbedding> = Vec::new();
        for path in &request.embeddings {
            let file = read("embeddings", path)?;
            if let Some(other) = list.iter().find(|e| e.file.name == file.name) {
                return Err(Error::setting(
                    "embeddings",
                    format!(
                        "{} and {} are both named {:?}: a prompt could not tell them apart",
                        other.file.path.display(),
                        path.display(),
                        file.name
                    ),
                ));
            }
            list.push(LoadedEmbedding { file, setting: "embeddings" });
        }
        if let Some(dir) = &request.embeddings_dir {
            if !dir.is_dir() {
                return Err(Error::setting("embeddings_dir", format!("{}: not a folder", dir.display())));
            }
            let texts: Vec<String> = [
                Some(&request.prompt),
                Some(&request.negative_prompt),
                request.sdxl.prompt_2.as_ref(),
                request.sdxl.negative_prompt_2.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(|t| t.to_lowercase())
            .collect();
            for path in embeddings::files_in(dir).map_err(|e| Error::setting("embeddings_dir", e))? {
                let name = embeddings::name_of(&path).map_err(|e| Error::setting("embeddings_dir", e))?;
                let used = texts.iter().any(|t| t.contains(&name.to_lowercase()));
                if used && !list.iter().any(|e| e.file.name == name) {
                    list.push(LoadedEmbedding { file: read("embeddings_dir", &path)?, setting: "embeddings_dir" });
                }
            }
        }
        Ok(Self::new(list))
    }

    /// Refuses an embedding made for another model: its width must be the text encoder's (768 SD 1.x, 1024
    /// SD 2.x), and an SDXL model needs SDXL files (`clip_l` + `clip_g`) and only those.
    pub fn check_fits(&self, sd: &StableDiffusion) -> Result<()> {
        let width = sd.text_encoder.embedding_width();
        let width_2 = sd.sdxl.as_ref().map(|x| x.text_encoder_2.embedding_width());
        let model = match width_2 {
            Some(w2) => format!("{width} + {w2} (SDXL)"),
            None => width.to_string(),
        };
        for e in self.iter() {
            let f = &e.file;
            let fits = f.width() == width && f.vectors_2.as_ref().map(|g| g.dim(1).unwrap_or(0)) == width_2;
            if !fits {
                return Err(Error::setting(
                    e.setting,
                    format!(
                        "{}: the embedding {:?} has vectors of width {}, but this model's text encoders take {model}: \
                         it was made for another model (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 + 1280)",
                        f.path.display(),
                        f.name,
                        f.describe_width()
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn read(setting: &'static str, path: &Path) -> Result<EmbeddingFile> {
    EmbeddingFile::read(path).map_err(|e| Error::setting(setting, e))
}

/// One embedding as one text encoder knows it: its name and the ids its vectors got, in order.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub ids: Vec<u32>,
}

/// A tokenizer and text encoder, with the request's embeddings added where it has any.
pub struct TextSide<'a> {
    pub tokenizer: Cow<'a, ClipTokenizer>,
    pub encoder: Cow<'a, ClipTextModel>,
    pub entries: Vec<Entry>,
}

impl<'a> TextSide<'a> {
    /// `tokenizer` and `encoder` with `embeddings` added (`second`: SDXL's second encoder, whose vectors are
    /// the files' `clip_g`). Ids follow the encoder's table: name, name_1, ... as diffusers numbers them.
    pub fn new(
        tokenizer: &'a ClipTokenizer,
        encoder: &'a ClipTextModel,
        embeddings: &Embeddings,
        second: bool,
    ) -> Result<Self> {
        if embeddings.is_empty() {
            return Ok(Self { tokenizer: Cow::Borrowed(tokenizer), encoder: Cow::Borrowed(encoder), entries: vec![] });
        }
        let mut next = encoder.num_token_embeddings() as u32;
        let mut rows: Vec<Tensor> = Vec::new();
        let mut added: Vec<(String, u32)> = Vec::new();
        let mut entries = Vec::new();
        for e in embeddings.iter() {
            let vectors = match (second, &e.file.vectors_2) {
                (false, _) => &e.file.vectors,
                (true, Some(g)) => g,
                (true, None) => return Err(Error::Invalid(format!("{}: no clip_g vectors", e.file.path.display()))),
            };
            let n = vectors.dim(0)?;
            let ids: Vec<u32> = (next..next + n as u32).collect();
            for (i, &id) in ids.iter().enumerate() {
                let token = if i == 0 { e.file.name.clone() } else { format!("{}_{i}", e.file.name) };
                added.push((token, id));
            }
            next += n as u32;
            rows.push(vectors.clone());
            entries.push(Entry { name: e.file.name.clone(), ids });
        }
        let rows = Tensor::cat(&rows, 0)?;
        Ok(Self {
            tokenizer: Cow::Owned(tokenizer.with_added_tokens(&added)),
            encoder: Cow::Owned(encoder.with_extra_tokens(&rows)?),
            entries,
        })
    }

    /// diffusers' `maybe_convert_prompt`: each multi-vector name the tokenizer finds in `prompt` is replaced
    /// (as text, case-sensitive, every occurrence) by "name name_1 ... name_{n-1}".
    pub fn expand_multi_vector(&self, prompt: &str) -> String {
        if self.entries.iter().all(|e| e.ids.len() < 2) {
            return prompt.to_string();
        }
        let found = self.tokenizer.tokenize(prompt);
        let mut out = prompt.to_string();
        for e in &self.entries {
            if e.ids.len() > 1 && found.contains(&e.ids[0]) {
                let names: Vec<String> = std::iter::once(e.name.clone())
                    .chain((1..e.ids.len()).map(|i| format!("{}_{i}", e.name)))
                    .collect();
                out = out.replace(&e.name, &names.join(" "));
            }
        }
        out
    }

    /// For A1111 chunking: each embedding's name as the plain tokenizer reads it, and its vector ids.
    pub fn names_as_tokens(&self, base: &ClipTokenizer) -> Vec<(Vec<u32>, Vec<u32>)> {
        self.entries.iter().map(|e| (base.tokenize(&e.name), e.ids.clone())).filter(|(n, _)| !n.is_empty()).collect()
    }
}

/// The paths the embeddings came from, for the metadata.
pub fn paths(embeddings: &Embeddings) -> Vec<(String, PathBuf)> {
    embeddings.iter().map(|e| (e.file.name.clone(), e.file.path.clone())).collect()
}
