//! A parsed prompt → CLIP-sized chunks, as A1111's `sd_hijack_clip.py` (`tokenize_line`) makes them: each
//! chunk holds up to 75 tokens with their weights, framed by bos and eos and padded to 77; `BREAK` starts a new
//! chunk; a chunk that fills up within 20 tokens of its last comma is cut after that comma and the words since
//! move to the next chunk, so a phrase is not split between two encoder passes.
use super::prompt_parser::Piece;
use crate::tokenizer::ClipTokenizer;

/// A1111's `comma_padding_backtrack` default: how far back a full chunk may be cut at a comma.
pub const COMMA_BACKTRACK: usize = 20;

/// One encoder pass: `max_length` token ids and the weight of each (1 for bos, eos and padding).
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// The chunks of `pieces` (at least one: an empty prompt is one chunk of bos, eos and padding).
pub fn chunks(tokenizer: &ClipTokenizer, pieces: &[Piece]) -> Vec<Chunk> {
    chunks_with_embeddings(tokenizer, pieces, &[])
}

/// [`chunks`] with textual-inversion embeddings, each given as (its name's token ids, the ids of its vectors):
/// as A1111's `find_embedding_at_position`, a name found in the tokens (the longest that matches) is replaced by
/// all its vectors, which start the next chunk when they do not fit in this one.
pub fn chunks_with_embeddings(
    tokenizer: &ClipTokenizer,
    pieces: &[Piece],
    embeddings: &[(Vec<u32>, Vec<u32>)],
) -> Vec<Chunk> {
    let mut by_length: Vec<&(Vec<u32>, Vec<u32>)> = embeddings.iter().collect();
    by_length.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut builder = Builder::new(tokenizer);
    for piece in pieces {
        match piece {
            Piece::Break => builder.finish_chunk(),
            Piece::Text { text, weight } => {
                let tokens = tokenizer.tokenize(text);
                let mut at = 0;
                while at < tokens.len() {
                    let found = by_length.iter().find(|(name, _)| tokens[at..].starts_with(name));
                    match found {
                        Some((name, vectors)) => {
                            builder.push_embedding(tokens[at], vectors, *weight as f32);
                            at += name.len();
                        }
                        None => {
                            builder.push(tokens[at], *weight as f32);
                            at += 1;
                        }
                    }
                }
            }
        }
    }
    if !builder.ids.is_empty() || builder.done.is_empty() {
        builder.finish_chunk();
    }
    builder.done
}

/// The chunk being filled and those finished.
struct Builder<'a> {
    tokenizer: &'a ClipTokenizer,
    /// Prompt tokens per chunk: `max_length - 2` (75 for CLIP).
    capacity: usize,
    comma: Option<u32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    /// Index in `ids` of the chunk's last comma.
    last_comma: Option<usize>,
    done: Vec<Chunk>,
}

impl<'a> Builder<'a> {
    fn new(tokenizer: &'a ClipTokenizer) -> Self {
        let comma = match tokenizer.tokenize(",").as_slice() {
            [id] => Some(*id),
            _ => None,
        };
        Self {
            tokenizer,
            capacity: tokenizer.max_length() - 2,
            comma,
            ids: Vec::new(),
            weights: Vec::new(),
            last_comma: None,
            done: Vec::new(),
        }
    }

    fn push(&mut self, id: u32, weight: f32) {
        self.make_room(id);
        self.ids.push(id);
        self.weights.push(weight);
    }

    /// An embedding's vectors, found where the token `first` starts its name: they stay in one chunk.
    fn push_embedding(&mut self, first: u32, vectors: &[u32], weight: f32) {
        self.make_room(first);
        if self.ids.len() + vectors.len() > self.capacity {
            self.finish_chunk();
        }
        self.ids.extend_from_slice(vectors);
        self.weights.extend(std::iter::repeat_n(weight, vectors.len()));
    }

    /// Before token `id`: note a comma, or cut a full chunk at its last comma; finish a full chunk.
    fn make_room(&mut self, id: u32) {
        if Some(id) == self.comma {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) = self.last_comma {
            // A full chunk whose last comma is near the end: cut after the comma, carry the rest over.
            if self.ids.len() == self.capacity && self.ids.len() - comma <= COMMA_BACKTRACK {
                let carried_ids = self.ids.split_off(comma + 1);
                let carried_weights = self.weights.split_off(comma + 1);
                self.finish_chunk();
                self.ids = carried_ids;
                self.weights = carried_weights;
            }
        }
        if self.ids.len() == self.capacity {
            self.finish_chunk();
        }
    }

    /// Frames the current tokens as bos, tokens, eos, padding (weight 1) and starts an empty chunk.
    fn finish_chunk(&mut self) {
        let length = self.capacity + 2;
        let mut ids = Vec::with_capacity(length);
        ids.push(self.tokenizer.bos_id());
        ids.append(&mut self.ids);
        ids.push(self.tokenizer.eos_id());
        ids.resize(length, self.tokenizer.pad_id());
        let mut weights = Vec::with_capacity(length);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.resize(length, 1.0);
        self.done.push(Chunk { ids, weights });
        self.last_comma = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::prompt_parser::parse;
    use crate::test_support::fixture_path;

    fn tokenizer() -> ClipTokenizer {
        ClipTokenizer::from_dir(&fixture_path("models/tiny-sd15/tokenizer")).unwrap()
    }

    #[test]
    fn short_prompt_is_one_padded_chunk() {
        let tok = tokenizer();
        let got = chunks(&tok, &parse("a (cat:1.5)", "prompt").unwrap());
        assert_eq!(got.len(), 1);
        let c = &got[0];
        assert_eq!((c.ids.len(), c.weights.len()), (77, 77));
        assert_eq!(c.ids[0], tok.bos_id());
        assert_eq!(&c.weights[..4], &[1.0, 1.0, 1.5, 1.0]);
        assert_eq!(c.ids[3], tok.eos_id());
    }

    #[test]
    fn break_and_empty() {
        let tok = tokenizer();
        assert_eq!(chunks(&tok, &parse("", "prompt").unwrap()).len(), 1);
        let got = chunks(&tok, &parse("a BREAK b", "prompt").unwrap());
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].ids[..3], [tok.bos_id(), tok.tokenize("b")[0], tok.eos_id()]);
    }

    #[test]
    fn long_prompt_breaks_after_last_comma() {
        let tok = tokenizer();
        // 70 words, a comma, then 10 more: the first chunk ends at the comma (71 tokens), 10 move on.
        let prompt = format!("{}, {}", ["cat"; 70].join(" "), ["dog"; 10].join(" "));
        let got = chunks(&tok, &parse(&prompt, "prompt").unwrap());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].ids[72], tok.eos_id());
        assert_eq!(got[1].ids[1..11], vec![tok.tokenize("dog")[0]; 10][..]);
        // Without a comma the chunk is cut at exactly 75.
        let prompt = ["cat"; 80].join(" ");
        let got = chunks(&tok, &parse(&prompt, "prompt").unwrap());
        assert_eq!(got[0].ids[76], tok.eos_id());
        assert_eq!(got[1].ids[6], tok.eos_id());
    }
}
