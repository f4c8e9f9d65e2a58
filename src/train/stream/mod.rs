//! Training data streamed from shards: WebDataset tar files ([`webdataset`]) and Hugging Face datasets' parquet
//! files ([`hf_parquet`]), named by a pattern ([`pattern`]), local or at `http(s)://` URLs ([`remote`]); read in
//! batches across epochs by [`batches`] (for `train` and `train-base` alike).
//!
//! One epoch is a pipeline of threads with bounded queues, so memory stays flat however large the data:
//!
//! 1. a *reader* thread takes the shards in an order shuffled by the epoch's seed, lists their samples (tar:
//!    member positions from the headers; parquet: the rows of one row group at a time) and passes them through a
//!    seeded shuffle buffer ([`shuffle::ShuffleBuffer`]);
//! 2. *worker* threads read and decode the images (and resize and crop them to the training resolution), so the
//!    model never waits on JPEG decoding;
//! 3. the training loop takes the results in the reader's order, whichever worker finished first.
//!
//! The order depends only on the shard list, the epoch's seed and the buffer size, never on thread timing. A
//! position in an epoch is therefore (epoch seed, samples taken): a resumed run replays the reader's shard and
//! shuffle decisions up to that count without decoding anything (tar headers only; parquet row counts from the
//! file footers), and continues bit for bit.
//!
//! A bad sample (a part missing, a damaged image, an unreadable caption) is skipped and counted, never fatal;
//! so is a shard that cannot be read (it is reported, and its samples before the damage are used).
pub mod batches;
pub mod cached;
pub mod hf_parquet;
pub mod pattern;
pub mod remote;
pub mod shuffle;
pub mod webdataset;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dataset::resize_center_crop;
use crate::io::images::decode_rgb;
use crate::rng::{randperm, TorchGenerator};
use crate::{Error, Result};
use shuffle::ShuffleBuffer;

/// Samples the shuffle buffer holds when none is asked for (webdataset's usual `shuffle(1000)`).
pub const DEFAULT_SHUFFLE_BUFFER: usize = 1000;
/// Decoded samples waiting for the training loop, per worker: enough to hide a slow JPEG, few enough to keep
/// memory flat.
const PREFETCH_PER_WORKER: usize = 4;
/// Bad samples described one by one in the report; the rest are only counted.
const REPORTED_SKIPS: usize = 20;

/// Which kind of shards a pattern names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// `.tar` files in the WebDataset layout.
    WebDataset,
    /// `.parquet` files in the Hugging Face datasets layout.
    Parquet,
    /// `.tar` files of a latent cache (`cache-latents`): VAE posteriors, conditions and caption embeddings.
    Latents,
}

/// Where a sample's target image, condition image and caption are: WebDataset extensions (the first one a
/// sample has wins) or parquet column names (one each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fields {
    pub image: Vec<String>,
    pub conditioning_image: Vec<String>,
    pub caption: Vec<String>,
}

impl Fields {
    /// WebDataset: the image as `jpg`/`jpeg`/`png`/`webp` (webdataset's usual `"jpg;png;jpeg;webp"`), the
    /// condition as `cond.<same>`, the caption as `txt` or `json`. Parquet: diffusers' `train_controlnet.py`
    /// column names `image`, `conditioning_image`, `text`.
    pub fn defaults(kind: StreamKind) -> Self {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        match kind {
            StreamKind::WebDataset => Self {
                image: list(&["jpg", "jpeg", "png", "webp"]),
                conditioning_image: list(&["cond.jpg", "cond.jpeg", "cond.png", "cond.webp"]),
                caption: list(&["txt", "json"]),
            },
            StreamKind::Parquet => Self {
                image: list(&["image"]),
                conditioning_image: list(&["conditioning_image"]),
                caption: list(&["text"]),
            },
            StreamKind::Latents => Self {
                image: list(&[cached::TENSORS_EXT]),
                conditioning_image: list(&[cached::TENSORS_EXT]),
                caption: list(&[cached::CAPTIONS_EXT]),
            },
        }
    }

    /// These fields with the given ones (`a;b` lists alternatives, webdataset's `to_tuple` syntax) in their
    /// place. Extensions are compared lower-cased, as webdataset lower-cases them.
    pub fn with(
        self,
        kind: StreamKind,
        image: Option<&str>,
        conditioning_image: Option<&str>,
        caption: Option<&str>,
    ) -> Self {
        let d = self;
        let parse = |given: Option<&str>, default: Vec<String>| match given {
            Some(s) => s
                .split(';')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| {
                    let x = x.trim_start_matches('.');
                    if kind == StreamKind::WebDataset {
                        x.to_lowercase()
                    } else {
                        x.to_string()
                    }
                })
                .collect(),
            None => default,
        };
        Self {
            image: parse(image, d.image),
            conditioning_image: parse(conditioning_image, d.conditioning_image),
            caption: parse(caption, d.caption),
        }
    }

    fn validate(&self, kind: StreamKind) -> Result<()> {
        for (setting, names) in [
            ("image_column", &self.image),
            ("conditioning_image_column", &self.conditioning_image),
            ("caption_column", &self.caption),
        ] {
            if names.is_empty() {
                return Err(Error::setting(setting, "names nothing"));
            }
            if kind == StreamKind::Parquet && names.len() > 1 {
                return Err(Error::setting(setting, format!("{}: a parquet column is one name", names.join(";"))));
            }
        }
        Ok(())
    }
}

/// A tar member: its extension and where its bytes are in the shard; a URL shard's members carry their bytes
/// (it is read once, front to back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ext: String,
    pub offset: u64,
    pub size: u64,
    pub bytes: Option<Arc<[u8]>>,
}

/// The members of a WebDataset sample that training reads.
#[derive(Debug, Clone)]
pub struct TarParts {
    pub image: Member,
    pub condition: Member,
    pub caption: Member,
}

/// A parquet row's cells that training reads (image bytes and captions).
#[derive(Debug, Clone)]
pub struct RowData {
    pub image: Vec<u8>,
    pub condition: Vec<u8>,
    pub captions: Vec<String>,
}

/// The cells of a row group's rows, or why a row cannot be used.
pub type Rows = Vec<std::result::Result<RowData, String>>;

/// Where a listed sample's data is.
#[derive(Debug, Clone)]
pub enum RecordBody {
    Tar(TarParts),
    /// A parquet row; its cells when the reader read them (not while a resumed run replays the epoch).
    Row {
        row_group: usize,
        row: usize,
        data: Option<std::result::Result<RowData, String>>,
    },
}

/// A sample as listed by the reader: which shard, its index there, its key, and its parts or why it is bad.
#[derive(Debug)]
pub struct Record {
    pub shard: usize,
    pub index: u64,
    pub key: String,
    pub body: std::result::Result<RecordBody, String>,
}

/// A sample at training resolution.
#[derive(Debug, Clone)]
pub enum Decoded {
    /// From images (captions: one or several, one is picked per use).
    Images { target: RgbImage, condition: RgbImage, captions: Vec<String> },
    /// From a latent cache.
    Latents { sample: cached::CachedSample, captions: Vec<String> },
}

impl Decoded {
    pub fn captions(&self) -> &[String] {
        match self {
            Self::Images { captions, .. } | Self::Latents { captions, .. } => captions,
        }
    }
}

/// Which sample a result is about (for the checkpoint and the skip report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplePosition {
    /// Index into the source's shard list, and the sample's index in that shard.
    pub shard: usize,
    pub index: u64,
    pub key: String,
}

/// One sample as the training loop receives it.
#[derive(Debug)]
pub struct Outcome {
    pub position: SamplePosition,
    /// The sample, or why it was skipped.
    pub sample: std::result::Result<Decoded, String>,
}

/// The bad samples and shards seen so far. Counted where the training loop reaches them (a damaged shard when
/// the loop has taken the samples the reader emitted before the damage), so a run's count is the same whatever
/// the threads' timing, and a checkpoint carries it to the resumed run.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipReport {
    pub samples: u64,
    pub shards: u64,
    /// The first few, one line each (`shard: key: why`).
    pub lines: Vec<String>,
}

impl SkipReport {
    fn note(&mut self, line: String) {
        if self.lines.len() < REPORTED_SKIPS {
            self.lines.push(line);
        }
    }
}

/// A sharded dataset: the shards a pattern names, what kind they are and which parts to read.
#[derive(Debug, Clone)]
pub struct StreamSource {
    /// The `--dataset` value.
    pub pattern: String,
    pub kind: StreamKind,
    pub shards: Vec<PathBuf>,
    pub fields: Fields,
    /// A latent cache's embeddings of the empty caption (caption dropout).
    pub empty_caption: Option<crate::train::objective::CaptionEmbeddings>,
    /// Per shard, the `Content-Length` a URL's `HEAD` answered when the source opened (`None` for local files,
    /// whose size is read when asked, and for servers that do not say).
    remote_sizes: Vec<Option<u64>>,
    skips: Arc<Mutex<SkipReport>>,
}

/// The kind of a shard file from its extension (and, for a latent cache's, its folder). A URL's is from its file
/// name (a latent cache is read from local files only).
pub fn kind_of(path: &Path) -> Option<StreamKind> {
    if let Some(url) = path.to_str().filter(|p| remote::is_url(p)) {
        let name = remote::file_name(url);
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        return match ext.as_str() {
            "tar" => Some(StreamKind::WebDataset),
            "parquet" => Some(StreamKind::Parquet),
            _ => None,
        };
    }
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "tar" if path.parent().is_some_and(cached::is_cache_dir) => Some(StreamKind::Latents),
        "tar" => Some(StreamKind::WebDataset),
        "parquet" => Some(StreamKind::Parquet),
        _ => None,
    }
}

/// The URL a shard path holds, if it is one.
pub fn url_of(path: &Path) -> Option<&str> {
    path.to_str().filter(|p| remote::is_url(p))
}

impl StreamSource {
    /// The shards `pattern` names (see [`pattern`]), or the `.tar`/`.parquet` files under a folder, all of one
    /// kind. `fields` is given per kind (defaults from [`Fields::defaults`]). Checks that every shard opens
    /// (parquet: that it has the columns), reporting all problems at once.
    pub fn open(pattern: &str, fields: impl Fn(StreamKind) -> Fields) -> Result<Self> {
        let shards = if Path::new(pattern).is_dir() {
            let mut found = Vec::new();
            collect_shards(Path::new(pattern), 2, &mut found);
            found.sort();
            if found.is_empty() {
                return Err(Error::setting("dataset", format!("{pattern}: no .tar or .parquet files in it")));
            }
            found
        } else {
            pattern::shard_paths(pattern)?
        };
        if shards.is_empty() {
            return Err(Error::setting("dataset", format!("{pattern}: names no files")));
        }
        let kinds: Vec<Option<StreamKind>> = shards.iter().map(|p| kind_of(p)).collect();
        let kind = match kinds[0] {
            Some(k) if kinds.iter().all(|x| *x == Some(k)) => k,
            _ => {
                let odd = shards.iter().zip(&kinds).find(|(_, k)| **k != kinds[0] || k.is_none()).map(|(p, _)| p);
                return Err(Error::setting(
                    "dataset",
                    format!(
                        "{pattern}: shards must be all .tar (WebDataset) or all .parquet files; {} is not like {}",
                        odd.unwrap_or(&shards[0]).display(),
                        shards[0].display()
                    ),
                ));
            }
        };
        let fields = fields(kind);
        fields.validate(kind)?;
        let empty_caption = match kind {
            StreamKind::Latents => {
                let dir = shards[0].parent().unwrap_or(Path::new("."));
                Some(cached::read_empty_caption(dir)?)
            }
            _ => None,
        };
        let remote_sizes = vec![None; shards.len()];
        let mut source = Self {
            pattern: pattern.to_string(),
            kind,
            shards,
            fields,
            empty_caption,
            remote_sizes,
            skips: Default::default(),
        };
        source.check()?;
        Ok(source)
    }

    /// Every shard opens (parquet: its footer reads and it has the columns; a URL: its `HEAD` succeeds, and
    /// gives its size); all problems in one error.
    fn check(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        for (path, size) in self.shards.iter().zip(&mut self.remote_sizes) {
            let r = match (url_of(path), self.kind) {
                (Some(_), StreamKind::Parquet) => Err("parquet files need random access, which this reader does \
                                                        not do over HTTP: download them and name the local files"
                    .to_string()),
                (Some(url), _) => remote::content_length(url).map(|n| *size = n),
                (None, StreamKind::WebDataset | StreamKind::Latents) => {
                    File::open(path).map(|_| ()).map_err(|e| e.to_string())
                }
                (None, StreamKind::Parquet) => hf_parquet::check_columns(path, &self.fields),
            };
            if let Err(e) = r {
                problems.push(format!("{}: {e}", path.display()));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::setting(
            "dataset",
            format!("{} shards cannot be used:\n  {}", problems.len(), problems.join("\n  ")),
        ))
    }

    /// What a resumed run must find again: every shard's name and size (a URL's file name and `Content-Length`,
    /// 0 when its server did not give one).
    pub fn fingerprint(&self) -> Vec<(String, u64)> {
        self.shards
            .iter()
            .zip(&self.remote_sizes)
            .map(|(p, remote_size)| match url_of(p) {
                Some(url) => (remote::file_name(url).to_string(), remote_size.unwrap_or(0)),
                None => {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    (name, std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                }
            })
            .collect()
    }

    /// The bad samples and shards seen so far (by this process).
    pub fn skipped(&self) -> SkipReport {
        self.skips.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Continues the count of a checkpoint (a resumed run reports what the whole run skipped).
    pub fn restore_skipped(&self, report: SkipReport) {
        if let Ok(mut s) = self.skips.lock() {
            *s = report;
        }
    }

    /// This source with a count of its own (a from-scratch stage reports its own skips).
    pub fn with_own_count(&self) -> Self {
        Self { skips: Default::default(), ..self.clone() }
    }

    /// Records a bad sample the training loop consumed.
    pub fn note_skipped(&self, position: &SamplePosition, why: &str) {
        if let Ok(mut s) = self.skips.lock() {
            s.samples += 1;
            let shard = self.shards.get(position.shard).map(|p| p.display().to_string()).unwrap_or_default();
            s.note(format!("{shard}: {}: {why}", position.key));
        }
        tracing::warn!(key = %position.key, "skipping a bad sample: {why}");
    }

    /// Starts reading the epoch whose order `epoch_seed` draws, after its first `skip` samples (a resumed
    /// run's position; they are replayed, not decoded).
    pub fn epoch(&self, epoch_seed: u64, skip: u64, options: &StreamOptions) -> EpochStream {
        let workers = options.workers.max(1);
        let (ordered_tx, ordered) = sync_channel::<Slot>(workers * PREFETCH_PER_WORKER);
        let (work_tx, work_rx) = sync_channel::<Work>(workers);
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..workers {
            let (rx, source, resolution) = (work_rx.clone(), self.clone(), options.resolution);
            std::thread::spawn(move || decode_worker(&rx, &source, resolution));
        }
        let source = self.clone();
        let buffer = options.shuffle_buffer;
        let producer = std::thread::spawn(move || read_epoch(&source, epoch_seed, skip, buffer, &work_tx, &ordered_tx));
        EpochStream { ordered, producer: Some(producer), taken: skip, ended: false, skips: self.skips.clone() }
    }
}

/// Shard files under a folder, `depth` levels down (a Hugging Face dataset keeps them in `data/`).
fn collect_shards(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            collect_shards(&path, depth - 1, out);
        } else if path.is_file() && kind_of(&path).is_some() {
            out.push(path);
        }
    }
}

/// How an epoch is read.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Samples the shuffle buffer holds (1: shard order shuffled, samples in shard order).
    pub shuffle_buffer: usize,
    /// Decoding threads.
    pub workers: usize,
    /// Training resolution: samples are resized and centre-cropped to it.
    pub resolution: u32,
}

/// Decoding threads by default: the cores but one (the training loop's), at least one, at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)).clamp(1, 8)
}

/// What the reader sends the training loop, in order.
enum Slot {
    /// A sample, ready when its worker is done.
    Sample(Receiver<Outcome>),
    /// A shard was damaged here (after the samples sent before): the rest of it is skipped.
    Damaged(String),
    /// The epoch is over.
    End,
}

type Work = (Record, SyncSender<Outcome>);

/// One epoch being read. Dropping it stops its threads (their queues close).
pub struct EpochStream {
    ordered: Receiver<Slot>,
    producer: Option<std::thread::JoinHandle<()>>,
    /// Samples of this epoch taken so far (including skipped ones, and those a resume replayed).
    pub taken: u64,
    /// The reader said the epoch is over (its threads are gone).
    ended: bool,
    /// Where damaged shards are counted as the consumer reaches them.
    skips: Arc<Mutex<SkipReport>>,
}

impl EpochStream {
    /// The next sample (or bad sample), `None` at the end of the epoch (and after it).
    pub fn recv(&mut self) -> Result<Option<Outcome>> {
        if self.ended {
            return Ok(None);
        }
        match self.ordered.recv() {
            Ok(Slot::Sample(rx)) => {
                self.taken += 1;
                rx.recv().map(Some).map_err(|_| Error::Invalid("a decoding thread of the data stream stopped".into()))
            }
            Ok(Slot::Damaged(line)) => {
                if let Ok(mut skips) = self.skips.lock() {
                    skips.shards += 1;
                    skips.note(line);
                }
                self.recv()
            }
            Ok(Slot::End) => {
                self.ended = true;
                Ok(None)
            }
            Err(_) => {
                let why = match self.producer.take().map(|h| h.join()) {
                    Some(Err(panic)) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                Err(Error::Invalid(format!("the shard reader stopped unexpectedly {why}")))
            }
        }
    }
}

/// The reader thread: shard order, listing, shuffle buffer; skips the first `skip` samples it would emit.
fn read_epoch(
    source: &StreamSource,
    epoch_seed: u64,
    skip: u64,
    buffer_size: usize,
    work: &SyncSender<Work>,
    ordered: &SyncSender<Slot>,
) {
    // 1. This epoch's shard order, from its own generator (the shuffle buffer draws from it next).
    let mut rng = TorchGenerator::new(epoch_seed);
    let order = randperm(source.shards.len(), &mut rng);
    let mut buffer = ShuffleBuffer::new(buffer_size);
    let emitted = std::cell::Cell::new(0u64);
    // 2. Hand a sample on (or only count it while replaying); false when the epoch's consumer is gone.
    let emit = |record: Record| -> bool {
        emitted.set(emitted.get() + 1);
        if emitted.get() <= skip {
            return true;
        }
        let (tx, rx) = sync_channel(1);
        ordered.send(Slot::Sample(rx)).is_ok() && work.send((record, tx)).is_ok()
    };
    // 3. Shards in order, each sample through the buffer.
    for &s in &order {
        let path = &source.shards[s];
        let mut alive = true;
        let mut each = |record: Record| -> bool {
            if let Some(out) = buffer.push(record, &mut rng) {
                alive = emit(out);
            }
            alive
        };
        let replaying = || emitted.get() < skip;
        let result = match source.kind {
            StreamKind::WebDataset | StreamKind::Latents => webdataset::scan(path, s, &source.fields, &mut each),
            StreamKind::Parquet => hf_parquet::scan(path, s, &source.fields, &|| !replaying(), &mut each),
        };
        if !alive {
            return;
        }
        // A damaged shard is reported in the sample order (where the consumer gets to it), not when the reader,
        // ahead of it, finds it; a replayed one was reported before the checkpoint.
        if let Err(why) = result {
            if !replaying() {
                tracing::warn!(shard = %path.display(), "skipping the rest of a shard: {why}");
                let line = format!("{}: {why} (rest of the shard skipped)", path.display());
                if ordered.send(Slot::Damaged(line)).is_err() {
                    return;
                }
            }
        }
    }
    // 4. What the buffer still holds, then the end.
    while let Some(out) = buffer.pop(&mut rng) {
        if !emit(out) {
            return;
        }
    }
    ordered.send(Slot::End).ok();
}

/// A worker thread: reads and decodes samples until the reader closes the queue.
fn decode_worker(queue: &Mutex<Receiver<Work>>, source: &StreamSource, resolution: u32) {
    let mut files = ShardFiles::default();
    loop {
        let next = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((record, reply)) = next else { return };
        let position = SamplePosition { shard: record.shard, index: record.index, key: record.key.clone() };
        let sample = decode(record, source, resolution, &mut files);
        // The training loop may have moved on (end of run): nothing to do then.
        reply.send(Outcome { position, sample }).ok();
    }
}

/// A worker's open shard (tar) or last row group read (parquet).
#[derive(Default)]
struct ShardFiles {
    tar: Option<(usize, File)>,
    rows: Option<((usize, usize), Rows)>,
}

fn decode(
    record: Record,
    source: &StreamSource,
    resolution: u32,
    files: &mut ShardFiles,
) -> std::result::Result<Decoded, String> {
    let path = &source.shards[record.shard];
    let name = |part: &str| PathBuf::from(format!("{}:{}.{part}", path.display(), record.key));
    let (image, condition, captions) = match record.body? {
        RecordBody::Tar(parts) => {
            let mut read = |m: &Member| -> std::result::Result<Vec<u8>, String> {
                // A URL's members came with the listing; a file's are read here.
                if let Some(bytes) = &m.bytes {
                    return Ok(bytes.to_vec());
                }
                if files.tar.as_ref().is_none_or(|(s, _)| *s != record.shard) {
                    files.tar = Some((record.shard, File::open(path).map_err(|e| e.to_string())?));
                }
                let (_, file) = files.tar.as_mut().expect("opened above");
                webdataset::read_member(file, m).map_err(|e| format!("cannot read .{}: {e}", m.ext))
            };
            let captions = captions_from(&read(&parts.caption)?, &parts.caption.ext)?;
            if source.kind == StreamKind::Latents {
                let sample = cached::CachedSample::from_bytes(&read(&parts.image)?, captions.len())?;
                return Ok(Decoded::Latents { sample, captions });
            }
            (read(&parts.image)?, read(&parts.condition)?, captions)
        }
        RecordBody::Row { data: Some(data), .. } => {
            let d = data?;
            (d.image, d.condition, d.captions)
        }
        RecordBody::Row { row_group, row, data: None } => {
            let key = (record.shard, row_group);
            if files.rows.as_ref().is_none_or(|(k, _)| *k != key) {
                let rows = hf_parquet::read_row_group(path, row_group, &source.fields)?;
                files.rows = Some((key, rows));
            }
            let (_, rows) = files.rows.as_ref().expect("read above");
            let d = rows.get(row).ok_or("row out of range")?.clone()?;
            (d.image, d.condition, d.captions)
        }
    };
    let target = decode_rgb(&image, &name("image")).map_err(|e| e.to_string())?;
    let condition = decode_rgb(&condition, &name("condition")).map_err(|e| e.to_string())?;
    Ok(Decoded::Images {
        target: resize_center_crop(&target, resolution),
        condition: resize_center_crop(&condition, resolution),
        captions,
    })
}

/// A caption file's captions: `.json` holds a string, a list of strings, or an object with a `caption`,
/// `text` or `prompt` field of either; anything else is UTF-8 text (surrounding whitespace dropped).
pub fn captions_from(bytes: &[u8], ext: &str) -> std::result::Result<Vec<String>, String> {
    if ext == "json" || ext.ends_with(".json") {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("caption .{ext} is not JSON: {e}"))?;
        let v = match &v {
            Value::Object(o) => ["caption", "text", "prompt"]
                .iter()
                .find_map(|k| o.get(*k))
                .ok_or_else(|| format!("caption .{ext} has no caption, text or prompt field"))?,
            other => other,
        };
        return caption_value(v).ok_or_else(|| format!("caption .{ext}: not a string or a non-empty list of strings"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| format!("caption .{ext} is not UTF-8 text"))?;
    Ok(vec![text.trim().to_string()])
}

/// A JSON caption: a string, or a non-empty list of strings.
pub fn caption_value(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => {
            items.iter().map(|c| c.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
