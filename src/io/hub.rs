//! Hugging Face Hub downloads: `owner/name[@revision][/file]` → a local path in the standard HF cache.
//!
//! Uses the `hf-hub` crate's blocking client, so files land where Python's `huggingface_hub` puts them
//! (`{cache}/models--owner--name/{blobs,snapshots/{commit},refs}`) and both tools share one cache.
//! Environment, as `huggingface_hub`: `HF_HUB_CACHE` (else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
//! `HF_ENDPOINT`, `HF_TOKEN` (else `HF_HOME/token`), `HF_HUB_OFFLINE=1`.
//!
//! Only what is needed is fetched: for a pipeline, `model_index.json` and each component's config and weights
//! (`.safetensors` preferred over `.bin`, the `fp16` variant when asked); for a single model folder its
//! `config.json` and weights; for a repo of single files, the file named after the repo id.
//! A snapshot already complete in the cache is used without any network access.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};

use crate::{Error, Result};

/// The hub's default endpoint.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Weight file stems of diffusers and transformers models.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];
/// Pipeline components whose configs and weights are fetched (others, e.g. safety_checker, are skipped).
const COMPONENTS: [&str; 5] = ["unet", "vae", "text_encoder", "controlnet", "scheduler"];
/// Tokenizer files (whichever exist).
const TOKENIZER_FILES: [&str; 5] =
    ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// `owner/name[@revision][/path/in/repo]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl std::str::FromStr for HubSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("{s:?} is not a hub id (owner/name[@revision][/file])"));
        let mut parts = s.splitn(3, '/');
        let (owner, name) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, r.to_string()),
            Some(_) => return Err(bad()),
            None => (name, "main".to_string()),
        };
        let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok(owner) || !ok(name) || owner.starts_with('.') {
            return Err(bad());
        }
        let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
        Ok(Self { repo: format!("{owner}/{name}"), revision, file })
    }
}

/// Is `s` meant as a hub id? (not an existing path, not written like a local one, and shaped like a hub id)
pub fn looks_like_hub_id(s: &str) -> bool {
    !Path::new(s).exists() && !looks_like_local_path(s) && s.parse::<HubSpec>().is_ok()
}

/// Weight file extensions: `owner/name.safetensors` is a local file, not a repo (a hub file is
/// `owner/name/file.safetensors`).
const WEIGHT_EXTENSIONS: [&str; 5] = ["safetensors", "ckpt", "pth", "pt", "bin"];

/// Whether `s` is written as a local path even though nothing is there: it starts with `.`, `/` or `~`, its
/// first folder or its parent folder exists (`models/tiny-sd1` beside a `models/` folder: a typo, not a hub
/// repo), or it is `a/b.safetensors` (a repo name does not end in a weights extension).
pub fn looks_like_local_path(s: &str) -> bool {
    if s.starts_with(['.', '/', '~']) {
        return true;
    }
    let path = Path::new(s);
    if !s.contains('/') {
        return false;
    }
    let first_exists = path.components().next().is_some_and(|c| Path::new(c.as_os_str()).is_dir());
    let parent_exists = path.parent().is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir());
    let weights_name = s.matches('/').count() == 1
        && path.extension().and_then(|e| e.to_str()).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e));
    first_exists || parent_exists || weights_name
}

/// What to say about a model path or id that led to nothing.
pub fn missing_path_message(spec: &str) -> String {
    if looks_like_local_path(spec) {
        let parent = Path::new(spec).parent().filter(|p| !p.as_os_str().is_empty() && p.is_dir());
        return match parent {
            Some(p) => {
                format!("no such local file or folder (the folder {} exists; is the name mistyped?)", p.display())
            }
            None => "no such local file or folder".to_string(),
        };
    }
    "no such file or folder (a hub id is written owner/name[@revision])".to_string()
}

/// A local path as given, or a hub id fetched into the cache (`HF_*` variables honoured).
pub fn resolve(path_or_id: &str, variant: Option<&str>) -> Result<PathBuf> {
    if !looks_like_hub_id(path_or_id) {
        return Ok(PathBuf::from(path_or_id));
    }
    let opts = HubOptions { variant: variant.map(str::to_string), ..HubOptions::from_env() };
    // A local path mistyped as `dir/name` reads as a hub id too: say both readings failed.
    fetch(&path_or_id.parse()?, &opts)
        .map_err(|e| Error::Invalid(format!("{e} (read as a hub id: no local file or folder {path_or_id} here)")))
}

/// Where and how to fetch; [`HubOptions::from_env`] reads the `HF_*` variables.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// `Some("fp16")`: prefer `*.fp16.safetensors`.
    pub variant: Option<String>,
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As `from_env`, with the variables given by `var` (testable without touching the process environment).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let user = var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            user.join(".cache").join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(home.join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir,
            token,
            offline,
            variant: None,
            progress: true,
        }
    }
}

/// Fetches (or finds in the cache) what `spec` names; returns the snapshot folder, or the file for a
/// single-file spec.
pub fn fetch(spec: &HubSpec, opts: &HubOptions) -> Result<PathBuf> {
    let repo_dir = opts.cache_dir.join(format!("models--{}", spec.repo.replace('/', "--")));
    // 1. Cache first: a complete snapshot needs no network.
    if let Some(snapshot) = local_snapshot(&repo_dir, &spec.revision) {
        let local = list_dir(&snapshot);
        if let Ok(files) = select(spec, &local, opts.variant.as_deref()) {
            if files.iter().all(|f| snapshot.join(f).is_file()) {
                return Ok(result_path(&snapshot, spec));
            }
        }
    }
    if opts.offline {
        return Err(Error::Invalid(format!(
            "{}@{} is not in the cache ({}) and HF_HUB_OFFLINE is set: run once online, or unset HF_HUB_OFFLINE",
            spec.repo,
            spec.revision,
            repo_dir.display()
        )));
    }
    // 2. List the repo at this revision, pick the files, download them.
    // from_cache, not new(): new() looks up the home folder and panics without one.
    let api = ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| hub_error(spec, None, e))?;
    let repo = api.repo(Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision.clone()));
    let info = repo.info().map_err(|e| hub_error(spec, None, e))?;
    let remote: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let files = select(spec, &remote, opts.variant.as_deref())?;
    let mut snapshot = None;
    for f in &files {
        let p = repo.download(f).map_err(|e| hub_error(spec, Some(f), e))?;
        // snapshots/{commit}/{f} → snapshots/{commit}
        let depth = Path::new(f).components().count();
        snapshot = p.ancestors().nth(depth).map(Path::to_path_buf);
    }
    let snapshot = snapshot.ok_or_else(|| Error::Invalid(format!("{}: nothing to download", spec.repo)))?;
    Ok(result_path(&snapshot, spec))
}

fn result_path(snapshot: &Path, spec: &HubSpec) -> PathBuf {
    match &spec.file {
        Some(f) => snapshot.join(f),
        None => snapshot.to_path_buf(),
    }
}

/// The cached snapshot of `revision` (a branch/tag via `refs/`, or a commit hash).
fn local_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?.trim().to_string()
    };
    let dir = repo_dir.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Files under `dir`, as repo-relative paths with `/`.
fn list_dir(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.insert(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The files to fetch from a repo listing.
fn select(spec: &HubSpec, files: &BTreeSet<String>, variant: Option<&str>) -> Result<Vec<String>> {
    if let Some(f) = &spec.file {
        return if files.contains(f) {
            Ok(vec![f.clone()])
        } else {
            Err(Error::Invalid(format!("{}@{} has no file {f}", spec.repo, spec.revision)))
        };
    }
    if files.contains("model_index.json") {
        let mut out = vec!["model_index.json".to_string()];
        for c in COMPONENTS {
            if files.iter().any(|f| f.starts_with(&format!("{c}/"))) {
                out.extend(component_files(files, &format!("{c}/"), variant, &spec.repo)?);
            }
        }
        out.extend(TOKENIZER_FILES.iter().map(|f| format!("tokenizer/{f}")).filter(|f| files.contains(f)));
        return Ok(out);
    }
    if files.contains("config.json") {
        return component_files(files, "", variant, &spec.repo);
    }
    let singles: Vec<&String> = files
        .iter()
        .filter(|f| [".safetensors", ".pth", ".ckpt", ".bin", ".pt"].iter().any(|e| f.ends_with(e)))
        .collect();
    match singles.as_slice() {
        [one] => Ok(vec![(*one).clone()]),
        [] => Err(Error::Invalid(format!("{}@{}: no model files in this repo", spec.repo, spec.revision))),
        many => {
            let list: Vec<&str> = many.iter().take(12).map(|s| s.as_str()).collect();
            Err(Error::Invalid(format!(
                "{} holds several weight files; name one as {}/FILE: {}",
                spec.repo,
                spec.repo,
                list.join(", ")
            )))
        }
    }
}

/// A component folder's config and weights: safetensors before .bin, the variant first when asked,
/// sharded checkpoints through their index.
fn component_files(files: &BTreeSet<String>, dir: &str, variant: Option<&str>, repo: &str) -> Result<Vec<String>> {
    let configs = ["config.json", "scheduler_config.json"];
    let mut out: Vec<String> = configs.iter().map(|c| format!("{dir}{c}")).filter(|f| files.contains(f)).collect();
    if dir == "scheduler/" {
        return Ok(out);
    }
    let variants: Vec<String> = match variant {
        Some(v) => vec![format!(".{v}"), String::new()],
        None => vec![String::new(), ".fp16".to_string()],
    };
    for ext in ["safetensors", "bin"] {
        for v in &variants {
            for stem in STEMS {
                let single = format!("{dir}{stem}{v}.{ext}");
                if files.contains(&single) {
                    out.push(single);
                    return Ok(out);
                }
                let index = format!("{dir}{stem}{v}.{ext}.index.json");
                if files.contains(&index) {
                    // Shards are named {stem}{v}-0000i-of-0000n.{ext}.
                    let shard = format!("{dir}{stem}{v}-");
                    out.push(index);
                    out.extend(
                        files.iter().filter(|f| f.starts_with(&shard) && f.ends_with(&format!(".{ext}"))).cloned(),
                    );
                    return Ok(out);
                }
            }
        }
    }
    Err(Error::Invalid(format!("{repo}: no weights in {}", if dir.is_empty() { "the repo root" } else { dir })))
}

/// A clear message for what the hub answered.
fn hub_error(spec: &HubSpec, file: Option<&str>, e: ApiError) -> Error {
    let what = match file {
        Some(f) => format!("{}@{}: {f}", spec.repo, spec.revision),
        None => format!("{}@{}", spec.repo, spec.revision),
    };
    let msg = match &e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(code, response) => {
                let code_name = response.header("x-error-code").unwrap_or("");
                match (*code, code_name) {
                    (_, "RevisionNotFound") => format!("revision {:?} does not exist", spec.revision),
                    (_, "EntryNotFound") => "file not found in the repo".to_string(),
                    (_, "RepositoryNotFound") | (404, _) if file.is_none() => {
                        "repository not found (or private: set HF_TOKEN)".to_string()
                    }
                    (401 | 403, _) => "access denied: the repo is gated or private; set HF_TOKEN".to_string(),
                    (404, _) => "not found".to_string(),
                    (c, _) => format!("the hub answered HTTP {c}"),
                }
            }
            ureq::Error::Transport(t) => {
                format!("cannot reach the hub ({t}); for cached models set HF_HUB_OFFLINE=1")
            }
        },
        other => other.to_string(),
    };
    Error::Invalid(format!("{what}: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const REPO: &str = "test/tiny-cn";

    fn model(rel: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(rel)).unwrap()
    }

    /// The files of the served repo: tiny-controlnet-a, a .bin twin that must not be fetched, an fp16 variant
    /// (tiny-controlnet-b's bytes, to tell them apart), and a listed file the server lacks.
    fn repo_files() -> Vec<(String, Vec<u8>)> {
        vec![
            ("config.json".into(), model("tiny-controlnet-a/config.json")),
            (
                "diffusion_pytorch_model.safetensors".into(),
                model("tiny-controlnet-a/diffusion_pytorch_model.safetensors"),
            ),
            (
                "diffusion_pytorch_model.fp16.safetensors".into(),
                model("tiny-controlnet-b/diffusion_pytorch_model.safetensors"),
            ),
            ("diffusion_pytorch_model.bin".into(), b"pickle bytes that must not be fetched".to_vec()),
            ("README.md".into(), b"# tiny".to_vec()),
        ]
    }

    /// A local server in the hub's URL layout: `/api/models/{repo}/revision/{rev}` (listing) and
    /// `/{repo}/resolve/{rev}/{file}` (with the etag, x-repo-commit and content-range headers hf-hub reads).
    struct Hub {
        endpoint: String,
        requests: Arc<AtomicUsize>,
    }

    fn serve(files: Vec<(String, Vec<u8>)>, listed_extra: &'static [&'static str]) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).ok();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim().to_string());
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                let reply = respond(&files, listed_extra, &path, range.as_deref());
                stream.write_all(&reply).ok();
            }
        });
        Hub { endpoint, requests }
    }

    fn http(status: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        r.push_str("\r\n");
        let mut out = r.into_bytes();
        out.extend_from_slice(body);
        out
    }

    fn not_found(code: &str) -> Vec<u8> {
        http("404 Not Found", &[("x-error-code".into(), code.into())], b"{\"error\":\"not found\"}")
    }

    fn respond(files: &[(String, Vec<u8>)], extra: &[&str], path: &str, range: Option<&str>) -> Vec<u8> {
        let good_rev = |r: &str| r == "main" || r == COMMIT;
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let Some((repo, rev)) = rest.split_once("/revision/") else { return not_found("RepositoryNotFound") };
            if repo != REPO {
                return not_found("RepositoryNotFound");
            }
            if !good_rev(rev) {
                return not_found("RevisionNotFound");
            }
            let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
            names.extend(extra.iter().map(|s| s.to_string()));
            let siblings: Vec<serde_json::Value> = names.iter().map(|n| serde_json::json!({"rfilename": n})).collect();
            let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
            return http("200 OK", &[], body.as_bytes());
        }
        let Some(rest) = path.strip_prefix(&format!("/{REPO}/resolve/")) else {
            return not_found("RepositoryNotFound");
        };
        let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
        if !good_rev(rev) {
            return not_found("RevisionNotFound");
        }
        let Some((_, data)) = files.iter().find(|(n, _)| n == file) else { return not_found("EntryNotFound") };
        let (start, end) = match range.and_then(|r| r.split_once('-')) {
            Some((a, b)) => (a.parse::<usize>().unwrap_or(0), b.parse::<usize>().unwrap_or(data.len() - 1)),
            None => (0, data.len() - 1),
        };
        let etag = format!("\"{:016x}{:08x}\"", fnv(data), data.len());
        let headers = [
            ("etag".to_string(), etag),
            ("x-repo-commit".to_string(), COMMIT.to_string()),
            ("content-range".to_string(), format!("bytes {start}-{end}/{}", data.len())),
        ];
        http("206 Partial Content", &headers, &data[start..=end])
    }

    fn fnv(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    }

    fn options(hub: &Hub, cache: &Path) -> HubOptions {
        HubOptions {
            endpoint: hub.endpoint.clone(),
            cache_dir: cache.to_path_buf(),
            token: None,
            offline: false,
            variant: None,
            progress: false,
        }
    }

    #[test]
    fn first_download_then_cache_hit_without_network() {
        let hub = serve(repo_files(), &[]);
        let cache = tempfile::tempdir().unwrap();
        let spec: HubSpec = REPO.parse().unwrap();
        let dir = fetch(&spec, &options(&hub, cache.path())).unwrap();
        assert!(dir.ends_with(format!("models--test--tiny-cn/snapshots/{COMMIT}")), "{}", dir.display());
        assert_eq!(
            std::fs::read(dir.join("diffusion_pytorch_model.safetensors")).unwrap(),
            model("tiny-controlnet-a/diffusion_pytorch_model.safetensors")
        );
        assert!(dir.join("config.json").is_file());
        assert!(!dir.join("diffusion_pytorch_model.bin").exists(), "safetensors preferred, .bin not fetched");
        assert!(!dir.join("README.md").exists(), "only what is needed");
        // The fetched folder loads as a ControlNet.
        assert!(crate::io::single_file::load_controlnet(&dir).is_ok());

        let before = hub.requests.load(Ordering::SeqCst);
        assert!(before > 0);
        assert_eq!(fetch(&spec, &options(&hub, cache.path())).unwrap(), dir);
        assert_eq!(hub.requests.load(Ordering::SeqCst), before, "a cache hit makes no request");
        // Offline, the cached snapshot is still found; by commit hash too.
        let offline = HubOptions { offline: true, ..options(&hub, cache.path()) };
        assert_eq!(fetch(&spec, &offline).unwrap(), dir);
        let pinned: HubSpec = format!("{REPO}@{COMMIT}").parse().unwrap();
        assert_eq!(fetch(&pinned, &offline).unwrap(), dir);
    }

    #[test]
    fn offline_and_not_cached_is_a_clear_error() {
        let hub = serve(repo_files(), &[]);
        let cache = tempfile::tempdir().unwrap();
        let opts = HubOptions { offline: true, ..options(&hub, cache.path()) };
        let err = fetch(&REPO.parse().unwrap(), &opts).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE") && err.contains("not in the cache"), "{err}");
        assert_eq!(hub.requests.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn fp16_variant() {
        let hub = serve(repo_files(), &[]);
        let cache = tempfile::tempdir().unwrap();
        let opts = HubOptions { variant: Some("fp16".into()), ..options(&hub, cache.path()) };
        let dir = fetch(&REPO.parse().unwrap(), &opts).unwrap();
        assert_eq!(
            std::fs::read(dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap(),
            model("tiny-controlnet-b/diffusion_pytorch_model.safetensors")
        );
        assert!(!dir.join("diffusion_pytorch_model.safetensors").exists());
    }

    #[test]
    fn missing_files_bad_revisions_and_unknown_repos() {
        let hub = serve(repo_files(), &["ghost.safetensors"]);
        let cache = tempfile::tempdir().unwrap();
        let opts = options(&hub, cache.path());
        let err = fetch(&format!("{REPO}/nope.safetensors").parse().unwrap(), &opts).unwrap_err().to_string();
        assert!(err.contains("has no file nope.safetensors"), "{err}");
        let err = fetch(&format!("{REPO}/ghost.safetensors").parse().unwrap(), &opts).unwrap_err().to_string();
        assert!(err.contains("ghost.safetensors") && err.contains("file not found"), "{err}");
        let err = fetch(&format!("{REPO}@v9").parse().unwrap(), &opts).unwrap_err().to_string();
        assert!(err.contains("revision \"v9\" does not exist"), "{err}");
        let err = fetch(&"test/other".parse().unwrap(), &opts).unwrap_err().to_string();
        assert!(err.contains("repository not found"), "{err}");
        // A single named file lands at its path in the snapshot.
        let p = fetch(&format!("{REPO}/config.json").parse().unwrap(), &opts).unwrap();
        assert!(p.ends_with("config.json") && p.is_file());
    }

    /// A mistyped local path (its folder exists) is not sent to the hub as an id.
    #[test]
    fn a_missing_local_path_is_not_a_hub_id() {
        // Tests run in the crate root, where `src/` and `tests/fixtures/models/` exist.
        for typo in ["src/nope", "tests/fixtures/models/tiny-sd1", "models/tiny.safetensors", "~/sd/x"] {
            assert!(!looks_like_hub_id(typo), "{typo}");
            assert!(missing_path_message(typo).starts_with("no such local file or folder"), "{typo}");
        }
        assert!(missing_path_message("tests/fixtures/models/tiny-sd1").contains("tests/fixtures/models exists"));
        assert!(missing_path_message("owner-x/name-y").contains("a hub id is written"));
    }

    #[test]
    fn specs_and_environment() {
        let s: HubSpec = "lllyasviel/ControlNet-v1-1@main/control_v11p_sd15_canny.pth".parse().unwrap();
        assert_eq!(
            s,
            HubSpec {
                repo: "lllyasviel/ControlNet-v1-1".into(),
                revision: "main".into(),
                file: Some("control_v11p_sd15_canny.pth".into())
            }
        );
        assert_eq!("a/b@v1.0".parse::<HubSpec>().unwrap().revision, "v1.0");
        assert!("just-a-name".parse::<HubSpec>().is_err() && "a/b@".parse::<HubSpec>().is_err());
        assert!(looks_like_hub_id("lllyasviel/sd-controlnet-canny") && !looks_like_hub_id("./x/y"));
        assert!(looks_like_hub_id("lllyasviel/ControlNet-v1-1/control_v11p_sd15_canny.pth"));

        let env = |vars: &'static [(&'static str, &'static str)]| {
            HubOptions::from_lookup(move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        let o = env(&[("HOME", "/home/u")]);
        assert_eq!(
            (o.cache_dir, o.endpoint.as_str(), o.offline),
            (PathBuf::from("/home/u/.cache/huggingface/hub"), DEFAULT_ENDPOINT, false)
        );
        let o = env(&[
            ("HF_HOME", "/hf"),
            ("HF_TOKEN", " hf_x \n"),
            ("HF_HUB_OFFLINE", "True"),
            ("HF_ENDPOINT", "http://mirror/"),
        ]);
        assert_eq!((o.cache_dir, o.token.as_deref(), o.offline), (PathBuf::from("/hf/hub"), Some("hf_x"), true));
        assert_eq!(o.endpoint, "http://mirror");
        let o = env(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/fast/cache"), ("HF_HUB_OFFLINE", "0")]);
        assert_eq!((o.cache_dir, o.offline), (PathBuf::from("/fast/cache"), false));
    }
}
