//! AUTOMATIC1111's prompt syntax (`modules/prompt_parser.py::parse_prompt_attention`): a prompt → runs of text
//! with a weight, and `BREAK`s.
//!
//! - `(text)` multiplies the weight by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies by 1.3; they
//!   nest (`((a))` = 1.21). A bracket left open applies to the end of the prompt; a stray closer is text.
//! - `\(`, `\)`, `\[`, `\]`, `\\` are the literal characters; any other `\` is kept as is.
//! - `BREAK` (upper case, a word of its own) ends the current 75-token chunk.
//! - Anything else, `<lora:name:0.8>` included, is plain text (LoRA tags are stripped before this runs).
//!
//! Adjacent runs of equal weight are joined, so `(a)(b)` is one run "ab" at 1.1, as A1111 does.
use std::sync::OnceLock;

use regex::Regex;

use crate::{Error, Result};

/// `(text)`: A1111's `round_bracket_multiplier`.
pub const ROUND_BRACKET: f64 = 1.1;
/// `[text]`: A1111's `square_bracket_multiplier`.
pub const SQUARE_BRACKET: f64 = 1.0 / 1.1;

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text {
        text: String,
        weight: f64,
    },
    /// `BREAK`: start a new chunk here.
    Break,
}

/// The tokens of the syntax, leftmost alternative first (the order matters: an escape before a bracket, a
/// `:weight)` before a lone `:`).
fn attention_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
            .expect("valid attention regex")
    })
}

fn break_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\s*\bBREAK\b\s*").expect("valid BREAK regex"))
}

/// `prompt` as A1111 parses it. `setting` names the request field in the error for a weight that is no number
/// (`(a:1.2.3)`, which A1111 fails on too).
pub fn parse(prompt: &str, setting: &str) -> Result<Vec<Piece>> {
    // (text, weight) with A1111's weight -1 standing for BREAK, so the merge below treats it as it does.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, start: usize, by: f64| {
        for piece in &mut res[start..] {
            piece.1 *= by;
        }
    };
    for m in attention_re().captures_iter(prompt) {
        let text = m.get(0).map_or("", |t| t.as_str());
        let weight = m.get(1).map(|w| w.as_str());
        if let Some(escaped) = text.strip_prefix('\\') {
            // `\\(` → "(", a lone `\` → "" (A1111 drops it: `text[1:]`).
            res.push((escaped.to_string(), 1.0));
        } else if text == "(" {
            round.push(res.len());
        } else if text == "[" {
            square.push(res.len());
        } else if let (Some(w), Some(start)) = (weight, round.last().copied()) {
            let w: f64 = w.parse().map_err(|_| {
                Error::setting(setting, format!("the weight {w:?} in {text:?} is not a number (write e.g. (word:1.2))"))
            })?;
            round.pop();
            multiply(&mut res, start, w);
        } else if text == ")" && !round.is_empty() {
            let start = round.pop().unwrap_or(0);
            multiply(&mut res, start, ROUND_BRACKET);
        } else if text == "]" && !square.is_empty() {
            let start = square.pop().unwrap_or(0);
            multiply(&mut res, start, SQUARE_BRACKET);
        } else {
            for (i, part) in break_re().split(text).enumerate() {
                if i > 0 {
                    res.push(("BREAK".into(), -1.0));
                }
                res.push((part.to_string(), 1.0));
            }
        }
    }
    // Brackets left open apply to the end.
    for start in round {
        multiply(&mut res, start, ROUND_BRACKET);
    }
    for start in square {
        multiply(&mut res, start, SQUARE_BRACKET);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Join adjacent runs of equal weight.
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (text, weight) in res {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    Ok(merged
        .into_iter()
        .map(
            |(text, weight)| {
                if text == "BREAK" && weight == -1.0 {
                    Piece::Break
                } else {
                    Piece::Text { text, weight }
                }
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::fixture_path;

    /// Every case of the fixture generator's copy of A1111's parser (tools/fixtures/gen_prompt_syntax.py).
    #[test]
    fn matches_a1111_parser() {
        let text = std::fs::read_to_string(fixture_path("prompt_syntax/parse.json")).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let prompt = case["text"].as_str().unwrap();
            let expected: Vec<Piece> = case["parsed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let (t, w) = (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap());
                    if t == "BREAK" && w == -1.0 {
                        Piece::Break
                    } else {
                        Piece::Text { text: t, weight: w }
                    }
                })
                .collect();
            let got = parse(prompt, "prompt").unwrap();
            assert_eq!(got.len(), expected.len(), "{prompt:?}: {got:?} vs {expected:?}");
            for (g, e) in got.iter().zip(&expected) {
                match (g, e) {
                    (Piece::Text { text: a, weight: x }, Piece::Text { text: b, weight: y }) => {
                        assert_eq!(a, b, "{prompt:?}");
                        assert!((x - y).abs() < 1e-12, "{prompt:?}: weight {x} vs {y}");
                    }
                    _ => assert_eq!(g, e, "{prompt:?}"),
                }
            }
        }
    }

    #[test]
    fn nested_weights_and_escapes() {
        let got = parse(r"((a)) [b] (c:1.5) \(d\) <lora:x:0.5>", "prompt").unwrap();
        let weights: Vec<(String, f64)> = got
            .into_iter()
            .filter_map(|p| match p {
                Piece::Text { text, weight } => Some((text, (weight * 1e6).round() / 1e6)),
                Piece::Break => None,
            })
            .collect();
        assert_eq!(weights[0], ("a".into(), 1.21));
        assert_eq!(weights[2], ("b".into(), (1e6 / 1.1_f64).round() / 1e6));
        assert_eq!(weights[4], ("c".into(), 1.5));
        assert_eq!(weights[5], (r" (d) <lora".to_string() + ":x:0.5>", 1.0));
    }

    #[test]
    fn bad_weight_names_the_setting() {
        let err = parse("(a:1.2.3)", "negative_prompt").unwrap_err().to_string();
        assert!(err.contains("negative_prompt") && err.contains("1.2.3"), "{err}");
    }
}
