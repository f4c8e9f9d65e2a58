//! The module tree's layers import one way (docs/architecture.md): a module may use its own sub-modules and
//! modules of a lower layer, never one of its own layer or above. This test reads `src/` and fails naming
//! the file and the import that goes the wrong way.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, top first. A module may import only modules of a later (lower) entry; `bench` may use `train`
/// (it times a training step), nothing else within a layer.
const LAYERS: &[&[&str]] = &[
    &["main", "lib", "cli"],
    &["bench"],
    &["train", "serve"],
    &["pipeline"],
    // the neural detectors are networks: they run on the model layer's kernels
    &["annotate"],
    &["model", "schedulers", "tokenizer", "synthetic"],
    &["io"],
    &["error", "rng", "memory", "test_support"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names through `crate::…`, including `crate::{a::x, b}` groups.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    found
}

fn ident(s: &str) -> String {
    s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

#[test]
fn layers_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let first = rel.components().next().expect("a path").as_os_str().to_string_lossy().to_string();
        let module = first.trim_end_matches(".rs").to_string();
        let Some(own) = layer_of(&module) else {
            wrong.push(format!("{}: module `{module}` is in no layer (add it to LAYERS)", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        for import in crate_imports(&text) {
            if import == module || ["Error", "Result"].contains(&import.as_str()) {
                continue;
            }
            let allowed = match layer_of(&import) {
                Some(l) => l > own || (module == "bench" && import == "train"),
                None => true, // an item re-exported at the crate root
            };
            if !allowed {
                wrong.push(format!("{}: `{module}` imports `crate::{import}`, which is not below it", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers:\n{}", wrong.join("\n"));
}

#[test]
fn the_reader_sees_grouped_imports() {
    let found = crate_imports("use crate::{io::images, model::{unet, vae}, Error};\nuse crate::pipeline::x;");
    assert_eq!(found, ["io", "model", "pipeline"].iter().map(|s| s.to_string()).collect());
}
