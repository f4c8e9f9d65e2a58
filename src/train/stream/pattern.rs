//! Shard lists from a `--dataset` pattern, by the rules the `webdataset` package applies to its URLs:
//! `::` separates several patterns, and each is brace-expanded as the `braceexpand` package does
//! (`{a,b}` alternatives, `{0..9}` and `{a..e}` ranges, `{0..10..2}` steps, zero padding when either end of a
//! numeric range has a leading zero, nesting, `\{` for a literal brace; unbalanced braces are an error). On top of
//! that, paths with glob characters (`*`, `?`, `[`) list the files that match, sorted. `http(s)://` URLs are
//! brace-expanded but not globbed (they are checked when the source opens, [`super::remote`]); `pipe:` commands
//! are refused.
use std::path::PathBuf;

use crate::{Error, Result};

/// Separates several patterns in one `--dataset` value (webdataset's `expand_urls`).
pub const PATTERN_SEPARATOR: &str = "::";

/// The brace expansion of `pattern`, in order (`a{1..3}b` → `a1b a2b a3b`).
pub fn brace_expand(pattern: &str) -> Result<Vec<String>> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut depth = 0i64;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 1,
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            break;
        }
        i += 1;
    }
    if depth != 0 {
        return Err(Error::setting("dataset", format!("{pattern}: unbalanced braces (write \\{{ for a literal one)")));
    }
    Ok(expand(&chars).into_iter().map(|s| unescape(&s)).collect())
}

/// The files `pattern` names: each `::` part brace-expanded, then globbed where it has glob characters. An
/// expanded path without glob characters must exist; a glob must match at least one file. URLs are kept as
/// they are (a URL shard is a `PathBuf` holding the URL).
pub fn shard_paths(pattern: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for part in pattern.split(PATTERN_SEPARATOR) {
        if part.trim_start().starts_with("pipe:") {
            return Err(Error::setting(
                "dataset",
                format!(
                    "{part}: pipe: commands are not run; name the shards as local files or http(s):// URLs \
                     (brace ranges work for both)"
                ),
            ));
        }
        for path in brace_expand(part)? {
            if super::remote::is_url(&path) {
                out.push(PathBuf::from(path));
            } else if path.contains(['*', '?', '[']) {
                let matches = glob::glob(&path).map_err(|e| Error::setting("dataset", format!("{path}: {e}")))?;
                let mut found: Vec<PathBuf> = matches.filter_map(|m| m.ok()).filter(|p| p.is_file()).collect();
                found.sort();
                if found.is_empty() {
                    problems.push(format!("{path}: no file matches"));
                }
                out.extend(found);
            } else if PathBuf::from(&path).is_file() {
                out.push(PathBuf::from(path));
            } else {
                problems.push(format!("{path}: no such file"));
            }
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(10).collect();
        let more = problems.len().saturating_sub(shown.len());
        let tail = if more > 0 { format!("\n  … and {more} more") } else { String::new() };
        return Err(Error::setting(
            "dataset",
            format!(
                "{pattern}: {} of the shards it names are missing:\n  {}{tail}",
                problems.len(),
                shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
            ),
        ));
    }
    Ok(out)
}

/// Whether `s` has brace or glob syntax (a pattern rather than one path).
pub fn is_pattern(s: &str) -> bool {
    s.contains(PATTERN_SEPARATOR) || s.contains(['{', '*', '?', '['])
}

fn expand(s: &[char]) -> Vec<String> {
    // 1. The first top-level `{` that has a matching `}`; text without one is literal.
    let Some((open, close)) = first_group(s) else { return vec![s.iter().collect()] };
    let prefix: String = s[..open].iter().collect();
    let inner = &s[open + 1..close];
    // 2. The group's alternatives: a range, a comma list (each expanded), or the literal `{inner}`.
    let alternatives: Vec<String> = if let Some(items) = range(&inner.iter().collect::<String>()) {
        items
    } else {
        let parts = split_top_level_commas(inner);
        if parts.len() > 1 {
            parts.iter().flat_map(|p| expand(p)).collect()
        } else {
            // braceexpand keeps `{x}` (no comma, no range) as text, expanding what is inside it.
            expand(inner).into_iter().map(|x| format!("\\{{{x}\\}}")).collect()
        }
    };
    // 3. The product with the rest, in order.
    let rest = expand(&s[close + 1..]);
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for a in &alternatives {
        for r in &rest {
            out.push(format!("{prefix}{a}{r}"));
        }
    }
    out
}

/// The first `{` outside escapes with its matching `}`.
fn first_group(s: &[char]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '\\' => i += 2,
            '{' => {
                let mut depth = 0usize;
                let mut j = i;
                while j < s.len() {
                    match s[j] {
                        '\\' => j += 1,
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some((i, j));
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                // No match for this one: it is text; look further.
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

fn split_top_level_commas(s: &[char]) -> Vec<&[char]> {
    let mut parts = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, 0usize, 0usize);
    while i < s.len() {
        match s[i] {
            '\\' => i += 1,
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

/// `a..b` or `a..b..step` over integers (zero-padded as braceexpand pads) or single letters.
fn range(s: &str) -> Option<Vec<String>> {
    let parts: Vec<&str> = s.split("..").collect();
    if !(parts.len() == 2 || parts.len() == 3) {
        return None;
    }
    let step: i64 = match parts.get(2) {
        Some(p) => p.parse::<i64>().ok()?.unsigned_abs().max(1) as i64,
        None => 1,
    };
    let (left, right) = (parts[0], parts[1]);
    if let (Ok(a), Ok(b)) = (left.parse::<i64>(), right.parse::<i64>()) {
        let leading_zero = |t: &str| t != "0" && t != "-0" && (t.starts_with('0') || t.starts_with("-0"));
        let width = if leading_zero(left) || leading_zero(right) { left.len().max(right.len()) } else { 0 };
        let values = stepped(a, b, step);
        return Some(
            values
                .into_iter()
                .map(
                    |v| {
                        if v < 0 {
                            format!("-{:0w$}", -v, w = width.saturating_sub(1))
                        } else {
                            format!("{v:0width$}")
                        }
                    },
                )
                .collect(),
        );
    }
    let (mut l, mut r) = (left.chars(), right.chars());
    match (l.next(), l.next(), r.next(), r.next()) {
        (Some(a), None, Some(b), None) if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some(stepped(a as i64, b as i64, step).into_iter().map(|c| char::from(c as u8).to_string()).collect())
        }
        _ => None,
    }
}

fn stepped(a: i64, b: i64, step: i64) -> Vec<i64> {
    if a <= b {
        (a..=b).step_by(step as usize).collect()
    } else {
        (b..=a).rev().step_by(step as usize).collect()
    }
}

/// `\x` → `x` (braceexpand's escapes).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values are what `braceexpand.braceexpand` (0.1.7, webdataset 1.0.2's) returns for the same
    /// patterns.
    #[test]
    fn braces_expand_as_braceexpand_does() {
        let brace_expand = |p: &str| super::brace_expand(p).unwrap();
        assert_eq!(
            brace_expand("shards/{00000..00002}.tar"),
            ["shards/00000.tar", "shards/00001.tar", "shards/00002.tar"]
        );
        assert_eq!(brace_expand("{1..3}"), ["1", "2", "3"]);
        assert_eq!(brace_expand("{8..11}"), ["8", "9", "10", "11"]);
        assert_eq!(brace_expand("{08..11}"), ["08", "09", "10", "11"]);
        assert_eq!(brace_expand("{3..1}"), ["3", "2", "1"]);
        assert_eq!(brace_expand("{0..10..5}"), ["0", "5", "10"]);
        assert_eq!(brace_expand("{a..c}"), ["a", "b", "c"]);
        assert_eq!(brace_expand("x{a,b{1,2}}y"), ["xay", "xb1y", "xb2y"]);
        assert_eq!(brace_expand("{a,b}-{1..2}"), ["a-1", "a-2", "b-1", "b-2"]);
        assert_eq!(brace_expand("{abc}"), ["{abc}"]);
        assert_eq!(brace_expand("{-03..1}"), ["-03", "-02", "-01", "000", "001"]);
        assert_eq!(brace_expand("x{a{1,2}}y"), ["x{a1}y", "x{a2}y"]);
        assert_eq!(brace_expand("{a..c..2}"), ["a", "c"]);
        assert_eq!(brace_expand("{1..3..-1}"), ["1", "2", "3"]);
        assert_eq!(brace_expand(r"\{a,b\}"), ["{a,b}"]);
        for unbalanced in ["a{b", "a}b", r"\{a,b}"] {
            let err = super::brace_expand(unbalanced).unwrap_err().to_string();
            assert!(err.contains("unbalanced braces"), "{unbalanced}: {err}");
        }
        assert_eq!(brace_expand("plain.tar"), ["plain.tar"]);
    }

    #[test]
    fn shard_lists_glob_and_report_every_missing_shard() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["a-0.tar", "a-1.tar", "b-0.tar"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let d = dir.path().display();
        let got = shard_paths(&format!("{d}/a-{{0..1}}.tar::{d}/b-*.tar")).unwrap();
        let names: Vec<String> = got.iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
        assert_eq!(names, ["a-0.tar", "a-1.tar", "b-0.tar"]);
        let err = shard_paths(&format!("{d}/a-{{0..3}}.tar")).unwrap_err().to_string();
        assert!(err.contains("2 of the shards") && err.contains("a-2.tar: no such file"), "{err}");
        assert!(shard_paths(&format!("{d}/c-*.tar")).unwrap_err().to_string().contains("no file matches"));
        assert!(is_pattern("x/{0..1}.tar") && is_pattern("x/*.tar") && !is_pattern("x/0.tar"));
    }
}
