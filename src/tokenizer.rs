//! CLIP's byte-level BPE tokenizer, as diffusers' pipelines call it:
//! `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)` gives
//! `<|startoftext|>`, the prompt's tokens (at most 75), `<|endoftext|>`, then the pad token up to 77 ids.
//!
//! The steps follow transformers 5's `CLIPTokenizer` (a `tokenizers` pipeline, see its `tokenizer.json`):
//! 1. Special tokens (bos, eos, unk, pad and any `added_tokens`) are cut out of the raw text first, leftmost
//!    and longest match wins. With SD2's pad token "!" that includes every "!" in a prompt (id 0 instead of
//!    the word-final "!</w>"), which is what transformers does.
//! 2. Each stretch between them is normalised: NFC, then lower case char by char (no context rules such as
//!    a word-final sigma). The normaliser also turns whitespace runs into one space; step 3 drops
//!    whitespace anyway, so that changes nothing here.
//! 3. CLIP's regex splits it into contractions, letter runs, single digits and runs of other non-space
//!    characters; then the byte-level step splits each piece again with GPT-2's regex (which only splits
//!    special-token texts that step 1 did not catch, e.g. upper-case `<|ENDOFTEXT|>` -> `<|`, `endoftext`, `|>`).
//! 4. Each word becomes bytes, each byte one printable character (GPT-2's byte map), the last one with the
//!    end-of-word suffix `</w>`; adjacent symbols are merged in the order of the merges list.
//!
//! Vocabulary and merges come from `tokenizer.json` or from `vocab.json` + `merges.txt`; the special
//! tokens and `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::io::weights::read_json;
use crate::{Error, Result};

/// CLIP's context length: every encoded prompt has this many ids unless the config says otherwise.
const DEFAULT_MAX_LENGTH: usize = 77;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// Suffix of a word's last symbol: "cat</w>" (a whole word) is a different token from "cat" (a prefix).
const END_OF_WORD: &str = "</w>";
/// CLIP's pre-tokenizer; the text between matches (whitespace only) is dropped.
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
/// GPT-2's split as the byte-level pre-tokenizer applies it, without its whitespace alternatives (the pieces
/// it sees contain none).
const BYTE_LEVEL_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// The special tokens and sequence length, as `tokenizer_config.json` / `special_tokens_map.json` give them.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub unk: String,
    /// SD1.x pads with `<|endoftext|>`, SD2.x with "!".
    pub pad: String,
    /// `model_max_length`: the length of every encoded prompt.
    pub max_length: usize,
}

impl Default for SpecialTokens {
    /// transformers' `CLIPTokenizer` defaults.
    fn default() -> Self {
        Self {
            bos: DEFAULT_BOS.into(),
            eos: DEFAULT_EOS.into(),
            unk: DEFAULT_EOS.into(),
            pad: DEFAULT_EOS.into(),
            max_length: DEFAULT_MAX_LENGTH,
        }
    }
}

/// One entry of the merges list: its rank (earlier merges win) and the token it produces.
#[derive(Clone, Copy, Debug)]
struct Merge {
    rank: u32,
    id: u32,
}

/// CLIP's tokenizer; see the module docs for the steps.
#[derive(Clone)]
pub struct ClipTokenizer {
    /// Vocabulary id of each byte's character, inside a word and at its end (with `</w>`).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    /// Adjacent pair of token ids -> the merge that joins them.
    merges: HashMap<(u32, u32), Merge>,
    /// Strings cut out of the raw text as single tokens, with their ids.
    specials: Vec<(String, u32)>,
    clip_split: Regex,
    byte_level_split: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    /// Tokens added after loading (textual inversion, as transformers' `add_tokens`): matched in the normalised
    /// (lower-cased) text, anywhere, longest first; (lower-cased content, id).
    added: Vec<(String, u32)>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("merges", &self.merges.len())
            .field("specials", &self.specials)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

/// `tokenizer.json`, the parts we use.
#[derive(Deserialize)]
struct TokenizerJson {
    model: BpeModelJson,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
}

#[derive(Deserialize)]
struct BpeModelJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeJson>,
    end_of_word_suffix: Option<String>,
}

/// tokenizers writes merges as `["a", "b"]` since 0.20 and as `"a b"` before.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Pair(String, String),
    Joined(String),
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    content: String,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json`, or else `vocab.json` + `merges.txt`; special tokens and
    /// `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let special = read_special_tokens(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.is_file() {
            let parsed: TokenizerJson = read_json(&tokenizer_json)?;
            let model = parsed.model;
            if model.kind.as_deref().is_some_and(|k| k != "BPE") {
                return Err(Error::config(&tokenizer_json, format!("model type {:?}, expected BPE", model.kind)));
            }
            if model.end_of_word_suffix.as_deref() != Some(END_OF_WORD) {
                return Err(Error::config(
                    &tokenizer_json,
                    format!(
                        "end_of_word_suffix {:?}, expected {END_OF_WORD:?}: not a CLIP tokenizer",
                        model.end_of_word_suffix
                    ),
                ));
            }
            let merges = model
                .merges
                .into_iter()
                .enumerate()
                .map(|(i, m)| match m {
                    MergeJson::Pair(a, b) => Ok((a, b)),
                    MergeJson::Joined(line) => split_merge(&line, i + 1, &tokenizer_json),
                })
                .collect::<Result<Vec<_>>>()?;
            let mut vocab = model.vocab;
            for added in parsed.added_tokens.iter() {
                vocab.entry(added.content.clone()).or_insert(added.id);
            }
            let added: Vec<String> = parsed.added_tokens.into_iter().map(|t| t.content).collect();
            return Self::new(&vocab, &merges, &special, &added, &tokenizer_json);
        }
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab_path.is_file() || !merges_path.is_file() {
            return Err(Error::config(
                dir,
                "no tokenizer found: expected tokenizer.json, or vocab.json and merges.txt",
            ));
        }
        let vocab: HashMap<String, u32> = read_json(&vocab_path)?;
        let merges_txt = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
        let merges = parse_merges_txt(&merges_txt, &merges_path)?;
        Self::new(&vocab, &merges, &special, &[], dir)
    }

    /// Builds the tokenizer from the text of `vocab.json` and `merges.txt` with CLIP's default special
    /// tokens, the given pad token and 77 ids (e.g. for a vocabulary bundled into the binary).
    pub fn from_vocab_and_merges(vocab_json: &str, merges_txt: &str, pad: &str) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|e| Error::config("vocab.json", e))?;
        let merges = parse_merges_txt(merges_txt, Path::new("merges.txt"))?;
        let special = SpecialTokens { pad: pad.into(), ..SpecialTokens::default() };
        Self::new(&vocab, &merges, &special, &[], Path::new("merges.txt"))
    }

    /// `origin` is the file errors are reported against.
    fn new(
        vocab: &HashMap<String, u32>,
        merges: &[(String, String)],
        special: &SpecialTokens,
        added_tokens: &[String],
        origin: &Path,
    ) -> Result<Self> {
        let id_of = |token: &str, role: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| Error::config(origin, format!("{role} token {token:?} is not in the vocabulary")))
        };
        let (bos_id, eos_id, pad_id) =
            (id_of(&special.bos, "bos")?, id_of(&special.eos, "eos")?, id_of(&special.pad, "pad")?);
        let unk_id = id_of(&special.unk, "unk")?;
        if special.max_length < 2 {
            return Err(Error::config(
                origin,
                format!("model_max_length {} leaves no room for bos and eos", special.max_length),
            ));
        }

        // 1. Every byte's symbol, inside and at the end of a word (unknown ones map to unk, as BPE does).
        let byte_chars = byte_to_char();
        let byte_ids = byte_chars.map(|c| vocab.get(c.to_string().as_str()).copied().unwrap_or(unk_id));
        let byte_end_ids = byte_chars.map(|c| vocab.get(&format!("{c}{END_OF_WORD}")).copied().unwrap_or(unk_id));

        // 2. Merges by rank; all three tokens of a merge must exist (tokenizers refuses the file otherwise).
        let mut merge_table = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let lookup = |t: &str| vocab.get(t).copied();
            let (Some(a_id), Some(b_id), Some(id)) = (lookup(a), lookup(b), lookup(&format!("{a}{b}"))) else {
                return Err(Error::config(
                    origin,
                    format!("merge {} ({a:?} {b:?}) uses a token that is not in the vocabulary", rank + 1),
                ));
            };
            merge_table.insert((a_id, b_id), Merge { rank: rank as u32, id });
        }

        // 3. Special tokens, each once.
        let mut specials: Vec<(String, u32)> = Vec::new();
        let roles = [&special.bos, &special.eos, &special.unk, &special.pad];
        for token in roles.into_iter().chain(added_tokens) {
            if !token.is_empty() && !specials.iter().any(|(t, _)| t == token) {
                specials.push((token.clone(), id_of(token, "added")?));
            }
        }

        Ok(Self {
            byte_ids,
            byte_end_ids,
            merges: merge_table,
            specials,
            clip_split: Regex::new(CLIP_SPLIT).map_err(|e| Error::Invalid(e.to_string()))?,
            byte_level_split: Regex::new(BYTE_LEVEL_SPLIT).map_err(|e| Error::Invalid(e.to_string()))?,
            bos_id,
            eos_id,
            pad_id,
            max_length: special.max_length,
            added: Vec::new(),
        })
    }

    /// `max_length` ids: bos, the prompt's tokens (truncated to `max_length - 2`), eos, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut tokens = self.tokenize(text);
        tokens.truncate(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// The end of `text` that [`encode`](Self::encode) cuts off (it keeps `max_length - 2` tokens), from the
    /// word where the cut falls, lowercased as the tokenizer reads it; `None` when everything fits. diffusers
    /// warns with this text ("The following part of your input was truncated ...").
    pub fn truncated_part(&self, text: &str) -> Option<String> {
        let limit = self.max_length - 2;
        let mut count = 0;
        let mut rest = text;
        loop {
            let special = self.find_special(rest);
            let stretch = special.map_or(rest, |(start, _, _)| &rest[..start]);
            let normalized: String = stretch.nfc().flat_map(char::to_lowercase).collect();
            for piece in self.clip_split.find_iter(&normalized) {
                let mut ids = Vec::new();
                for word in self.byte_level_split.find_iter(piece.as_str()) {
                    self.bpe(word.as_str().as_bytes(), &mut ids);
                }
                if count + ids.len() > limit {
                    let cut = format!("{}{}", &normalized[piece.start()..], &rest[stretch.len()..]);
                    return Some(cut.trim().to_string());
                }
                count += ids.len();
            }
            let (start, len, _) = special?;
            if count + 1 > limit {
                return Some(rest[start..].trim().to_string());
            }
            count += 1;
            rest = &rest[start + len..];
        }
    }

    /// The prompt's token ids alone: no bos/eos, no truncation or padding (compare the length with
    /// `max_length() - 2` to tell whether `encode` truncates).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        // Cut out special tokens from the raw text; encode the stretches between them.
        while let Some((start, len, id)) = self.find_special(rest) {
            self.encode_ordinary(&rest[..start], &mut ids);
            ids.push(id);
            rest = &rest[start + len..];
        }
        self.encode_ordinary(rest, &mut ids);
        ids
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The leftmost special token in `text` (the longest one if several start there): (byte offset,
    /// byte length, id).
    fn find_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        find_leftmost_longest(&self.specials, text)
    }

    /// This tokenizer with `tokens` (content, id) added as transformers' `add_tokens` adds them: ordinary
    /// (not special) tokens matched in the normalised text, so case does not matter and a match may sit inside
    /// a word.
    pub fn with_added_tokens(&self, tokens: &[(String, u32)]) -> Self {
        let mut out = self.clone();
        for (content, id) in tokens {
            let content: String = content.nfc().flat_map(char::to_lowercase).collect();
            if !content.is_empty() && !out.added.iter().any(|(c, _)| *c == content) {
                out.added.push((content, *id));
            }
        }
        out
    }

    /// Steps 2–4 of the module docs for text without special tokens (added tokens are cut out after step 2).
    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) {
        let normalized: String = text.nfc().flat_map(char::to_lowercase).collect();
        let mut rest = normalized.as_str();
        while let Some((start, len, id)) = find_leftmost_longest(&self.added, rest) {
            self.encode_normalized(&rest[..start], ids);
            ids.push(id);
            rest = &rest[start + len..];
        }
        self.encode_normalized(rest, ids);
    }

    /// Steps 3–4 for normalised text.
    fn encode_normalized(&self, normalized: &str, ids: &mut Vec<u32>) {
        for piece in self.clip_split.find_iter(normalized) {
            for word in self.byte_level_split.find_iter(piece.as_str()) {
                self.bpe(word.as_str().as_bytes(), ids);
            }
        }
    }

    /// Byte-pair encoding of one word: start from one symbol per byte (the last with `</w>`), then
    /// repeatedly join every occurrence of the adjacent pair whose merge ranks first.
    fn bpe(&self, word: &[u8], ids: &mut Vec<u32>) {
        let Some((&last, init)) = word.split_last() else { return };
        let mut symbols: Vec<u32> = init.iter().map(|&b| self.byte_ids[b as usize]).collect();
        symbols.push(self.byte_end_ids[last as usize]);
        loop {
            let merge_at = |s: &[u32], i: usize| self.merges.get(&(s[i], s[i + 1])).copied();
            let Some(best) =
                (0..symbols.len().saturating_sub(1)).filter_map(|i| merge_at(&symbols, i)).min_by_key(|m| m.rank)
            else {
                break;
            };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && merge_at(&symbols, i).is_some_and(|m| m.rank == best.rank) {
                    merged.push(best.id);
                    i += 2;
                } else {
                    merged.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = merged;
        }
        ids.extend(symbols);
    }
}

/// The leftmost of `tokens` in `text` (the longest one if several start there): (byte offset, byte length, id).
fn find_leftmost_longest(tokens: &[(String, u32)], text: &str) -> Option<(usize, usize, u32)> {
    tokens
        .iter()
        .filter_map(|(token, id)| text.find(token.as_str()).map(|start| (start, token.len(), *id)))
        .min_by_key(|&(start, len, _)| (start, std::cmp::Reverse(len)))
}

/// GPT-2's reversible byte-to-character map: printable Latin-1 bytes stand for themselves; the other 68
/// bytes get U+0100, U+0101, … in byte order, so every byte has a visible vocabulary entry.
fn byte_to_char() -> [char; 256] {
    let mut next = 0x100u32;
    std::array::from_fn(|b| {
        let byte = b as u8;
        if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        }
    })
}

/// `merges.txt`: an optional `#version` header, then one "left right" pair per line, best first.
fn parse_merges_txt(text: &str, origin: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.is_empty() && !line.starts_with("#version"))
        .map(|(i, line)| split_merge(line, i + 1, origin))
        .collect()
}

fn split_merge(line: &str, line_no: usize, origin: &Path) -> Result<(String, String)> {
    match line.split(' ').collect::<Vec<_>>()[..] {
        [a, b] => Ok((a.to_string(), b.to_string())),
        _ => Err(Error::config(origin, format!("merge {line_no} ({line:?}) is not two tokens separated by a space"))),
    }
}

/// Special tokens and length from `tokenizer_config.json`, overridden by `special_tokens_map.json` as
/// transformers does for configs without `added_tokens_decoder` (the layout of the SD2 repos, whose pad "!"
/// is only in `special_tokens_map.json`). Missing files or fields keep CLIP's defaults.
fn read_special_tokens(dir: &Path) -> Result<SpecialTokens> {
    let mut special = SpecialTokens::default();
    let config_path = dir.join("tokenizer_config.json");
    let mut map_overrides = true;
    if config_path.is_file() {
        let config: Value = read_json(&config_path)?;
        apply_token_fields(&config, &mut special);
        map_overrides = config.get("added_tokens_decoder").is_none();
        if let Some(length) = config.get("model_max_length") {
            special.max_length = length.as_u64().and_then(|l| usize::try_from(l).ok()).ok_or_else(|| {
                Error::config(&config_path, format!("model_max_length {length} is not a usable sequence length"))
            })?;
        }
    }
    let map_path: PathBuf = dir.join("special_tokens_map.json");
    if map_overrides && map_path.is_file() {
        apply_token_fields(&read_json(&map_path)?, &mut special);
    }
    Ok(special)
}

/// Copies `bos_token` etc. from a config, written either as a string or as `{"content": ...}`.
fn apply_token_fields(config: &Value, special: &mut SpecialTokens) {
    let fields = [
        ("bos_token", &mut special.bos),
        ("eos_token", &mut special.eos),
        ("unk_token", &mut special.unk),
        ("pad_token", &mut special.pad),
    ];
    for (key, slot) in fields {
        let token = match config.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str),
            _ => None,
        };
        if let Some(token) = token {
            *slot = token.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models");
    const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/cases.json");

    /// tests/fixtures/tokenizer/cases.json (tools/fixtures/gen_tokenizer.py): prompts and transformers' ids.
    fn cases() -> Value {
        serde_json::from_str(&std::fs::read_to_string(CASES).unwrap()).unwrap()
    }

    fn tokenizer_dir(model: &str) -> PathBuf {
        Path::new(MODELS).join(model).join("tokenizer")
    }

    /// Every fixture prompt must give exactly transformers' 77 ids.
    fn assert_matches_transformers(tok: &ClipTokenizer, model: &str) {
        let cases = cases();
        let prompts = cases["prompts"].as_array().unwrap();
        let expected = cases[model].as_array().unwrap();
        assert_eq!(prompts.len(), expected.len());
        for (prompt, want) in prompts.iter().zip(expected) {
            let prompt = prompt.as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(want.clone()).unwrap();
            assert_eq!(tok.encode(prompt).unwrap(), want, "{model}: prompt {prompt:?}");
        }
    }

    #[test]
    fn tokenizer_json_folder_matches_transformers() {
        let tok = ClipTokenizer::from_dir(&tokenizer_dir("tiny-sd15")).unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (49406, 49407, 49407, 77));
        assert_matches_transformers(&tok, "tiny-sd15");
    }

    #[test]
    fn vocab_and_merges_folder_with_bang_padding_matches_transformers() {
        let tok = ClipTokenizer::from_dir(&tokenizer_dir("tiny-sd2")).unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (49406, 49407, 0, 77));
        assert_matches_transformers(&tok, "tiny-sd2");
    }

    /// The in-memory constructor (for a bundled vocabulary) gives both models' results from one vocabulary.
    #[test]
    fn from_vocab_and_merges_matches_both_folders() {
        let dir = tokenizer_dir("tiny-sd2");
        let vocab = std::fs::read_to_string(dir.join("vocab.json")).unwrap();
        let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
        let sd2 = ClipTokenizer::from_vocab_and_merges(&vocab, &merges, "!").unwrap();
        assert_matches_transformers(&sd2, "tiny-sd2");
        let sd15 = ClipTokenizer::from_vocab_and_merges(&vocab, &merges, "<|endoftext|>").unwrap();
        assert_matches_transformers(&sd15, "tiny-sd15");
    }

    /// The part `encode` drops is told word for word, so a front end can warn as diffusers does.
    #[test]
    fn truncated_part_is_the_text_encode_drops() {
        let tok = ClipTokenizer::from_dir(&tokenizer_dir("tiny-sd15")).unwrap();
        let fits = "cat ".repeat(75);
        assert_eq!(tok.truncated_part(&fits), None);
        let long = format!("{fits}A Red dog");
        assert_eq!(tok.truncated_part(&long).as_deref(), Some("a red dog"));
        // A special token past the limit is part of what is cut.
        let special = format!("{fits}<|endoftext|> cat");
        assert_eq!(tok.truncated_part(&special).as_deref(), Some("<|endoftext|> cat"));
        assert_eq!(tok.truncated_part(""), None);
    }

    #[test]
    fn tokenize_reports_untruncated_length() {
        let tok = ClipTokenizer::from_dir(&tokenizer_dir("tiny-sd15")).unwrap();
        assert_eq!(tok.tokenize("a photo of a cat"), vec![320, 1125, 539, 320, 2368]);
        let long = "cat ".repeat(100);
        assert_eq!(tok.tokenize(&long).len(), 100);
        let ids = tok.encode(&long).unwrap();
        assert_eq!((ids.len(), ids[75], ids[76]), (77, 2368, 49407));
    }

    /// A folder laid out like the SD2 repos: pad "<|endoftext|>" in tokenizer_config.json but "!" in
    /// special_tokens_map.json (which wins), and a shorter model_max_length.
    #[test]
    fn special_tokens_map_overrides_config_and_max_length_is_read() {
        let src = tokenizer_dir("tiny-sd2");
        let dir = tempfile::tempdir().unwrap();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let config =
            r#"{"model_max_length": 8, "pad_token": "<|endoftext|>", "bos_token": {"content": "<|startoftext|>"}}"#;
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        std::fs::write(dir.path().join("special_tokens_map.json"), r#"{"pad_token": "!"}"#).unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!((tok.pad_id(), tok.max_length()), (0, 8));
        assert_eq!(tok.encode("a cat").unwrap(), vec![49406, 320, 2368, 49407, 0, 0, 0, 0]);
        assert_eq!(tok.encode(&"cat ".repeat(20)).unwrap(), vec![49406, 2368, 2368, 2368, 2368, 2368, 2368, 49407]);
    }

    #[test]
    fn errors_name_the_folder_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("merges.txt"), "{err}");

        let vocab = r#"{"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "<|startoftext|>": 4, "<|endoftext|>": 5}"#;
        let err = ClipTokenizer::from_vocab_and_merges(vocab, "#version: 0.2\na b\n", "!").unwrap_err().to_string();
        assert!(err.contains("pad token \"!\""), "{err}");
        let err =
            ClipTokenizer::from_vocab_and_merges(vocab, "#version: 0.2\na b\n", DEFAULT_EOS).unwrap_err().to_string();
        assert!(err.contains("merges.txt") && err.contains("merge 1"), "{err}");
        let err = ClipTokenizer::from_vocab_and_merges(vocab, "a b c\n", DEFAULT_EOS).unwrap_err().to_string();
        assert!(err.contains("not two tokens"), "{err}");

        std::fs::write(
            dir.path().join("tokenizer.json"),
            r#"{"model": {"type": "Unigram", "vocab": {}, "merges": []}}"#,
        )
        .unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("Unigram"), "{err}");
    }

    /// A tiny hand-made vocabulary pins the merge order: lower rank first, every occurrence, left to right.
    #[test]
    fn bpe_merges_by_rank() {
        let vocab = r#"{"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab": 4, "ab</w>": 5, "aa": 6, "aab</w>": 7,
                        "<|startoftext|>": 8, "<|endoftext|>": 9}"#;
        let merges = "#version: 0.2\na b</w>\na a\naa b</w>\na b\n";
        let tok = ClipTokenizer::from_vocab_and_merges(vocab, merges, DEFAULT_EOS).unwrap();
        // "aab": a a b</w> -> (a, b</w>) ranks first -> a ab</w>; (a, ab</w>) has no merge.
        assert_eq!(tok.tokenize("aab"), vec![0, 5]);
        // "aaaa": a a a a -> aa aa (left to right, non-overlapping); (aa, aa) has no merge. Last "a" is "a</w>".
        assert_eq!(tok.tokenize("aaaa"), vec![6, 0, 2]);
        assert_eq!(tok.tokenize("ab ab"), vec![5, 5]);
    }

    #[test]
    fn byte_map_is_a_bijection_onto_printable_chars() {
        let chars = byte_to_char();
        let unique: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(unique.len(), 256);
        assert_eq!((chars[b'a' as usize], chars[b' ' as usize], chars[0]), ('a', 'Ġ', 'Ā'));
    }
}
