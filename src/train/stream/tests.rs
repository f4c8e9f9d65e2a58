//! Streams over small generated shards: every sample once per epoch, a seeded order that neither the worker
//! count nor a mid-epoch restart changes, bad samples and damaged shards skipped and reported; and the parquet
//! layout read from a file `datasets`/pyarrow wrote (tools/fixtures/gen_shards.py).
use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};

use super::*;

/// Target and condition of example `i`: a disc of one of four colours (target) and its ring (condition),
/// 40×32 px so resizing and cropping both act.
pub(crate) fn example_images(i: usize) -> (RgbImage, RgbImage) {
    let (cx, cy, r) = (12.0 + 4.0 * (i % 5) as f32, 14.0 + 2.0 * (i % 3) as f32, 7.0 + (i % 2) as f32 * 2.0);
    let colour = [[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 200, 30]][i % 4];
    let dist = |x: u32, y: u32| ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
    let target = RgbImage::from_fn(40, 32, |x, y| image::Rgb(if dist(x, y) < r { colour } else { [235, 235, 235] }));
    let condition =
        RgbImage::from_fn(40, 32, |x, y| image::Rgb(if (dist(x, y) - r).abs() < 1.0 { [255; 3] } else { [0; 3] }));
    (target, condition)
}

pub(crate) fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

pub(crate) fn caption(i: usize) -> String {
    format!("a {} circle", ["red", "green", "blue", "yellow"][i % 4])
}

/// Writes a tar of (member name, bytes).
pub(crate) fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
    }
    builder.finish().unwrap();
}

/// The members of example `i` under `key`: `.png` target, `.cond.png` condition, `.txt` caption.
pub(crate) fn sample_members(key: &str, i: usize) -> Vec<(String, Vec<u8>)> {
    let (target, condition) = example_images(i);
    vec![
        (format!("{key}.png"), png(&target)),
        (format!("{key}.cond.png"), png(&condition)),
        (format!("{key}.txt"), format!("{}\n", caption(i)).into_bytes()),
    ]
}

/// `shards` WebDataset shards of `per_shard` good samples each in `dir`; returns their brace pattern.
pub(crate) fn write_shards(dir: &Path, shards: usize, per_shard: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for s in 0..shards {
        let members: Vec<(String, Vec<u8>)> = (0..per_shard)
            .flat_map(|j| {
                let i = s * per_shard + j;
                sample_members(&format!("{i:06}"), i)
            })
            .collect();
        write_tar(&dir.join(format!("train-{s:05}.tar")), &members);
    }
    format!("{}/train-{{00000..{:05}}}.tar", dir.display(), shards - 1)
}

fn options(buffer: usize, workers: usize) -> StreamOptions {
    StreamOptions { shuffle_buffer: buffer, workers, resolution: 32 }
}

/// What a consumer sees of one sample: its key and the sum of its target's pixels, or why it was skipped.
type Seen = (String, std::result::Result<(u64, String), String>);

fn read_all(source: &StreamSource, seed: u64, skip: u64, opts: &StreamOptions) -> Vec<Seen> {
    let mut stream = source.epoch(seed, skip, opts);
    let mut out = Vec::new();
    while let Some(o) = stream.recv().unwrap() {
        let seen = o.sample.map(|d| match d {
            Decoded::Images { target, captions, .. } => {
                (target.as_raw().iter().map(|&v| u64::from(v)).sum(), captions[0].clone())
            }
            Decoded::Latents { .. } => unreachable!("image shards"),
        });
        out.push((o.position.key, seen));
    }
    assert_eq!(stream.recv().unwrap().map(|o| o.position), None, "after the end, the end again");
    out
}

#[test]
fn every_sample_once_per_epoch_in_a_seeded_order() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = write_shards(dir.path(), 3, 5);
    let source = StreamSource::open(&pattern, Fields::defaults).unwrap();
    assert_eq!((source.kind, source.shards.len()), (StreamKind::WebDataset, 3));
    let a = read_all(&source, 7, 0, &options(4, 3));
    let keys: Vec<&str> = a.iter().map(|(k, _)| k.as_str()).collect();
    let unique: BTreeSet<&str> = keys.iter().copied().collect();
    let all: BTreeSet<String> = (0..15).map(|i| format!("{i:06}")).collect();
    assert_eq!(unique, all.iter().map(|s| s.as_str()).collect(), "each sample once: {keys:?}");
    assert_eq!(keys.len(), 15);
    let mut sorted = keys.clone();
    sorted.sort();
    assert_ne!(keys, sorted, "not shuffled");
    // Captions and pixels belong to their key (the caption file's newline dropped).
    for (key, seen) in &a {
        let i: usize = key.parse().unwrap();
        let (sum, text) = seen.as_ref().unwrap();
        assert_eq!(text, &caption(i));
        let want: u64 = crate::train::dataset::resize_center_crop(&example_images(i).0, 32)
            .as_raw()
            .iter()
            .map(|&v| u64::from(v))
            .sum();
        assert_eq!(*sum, want, "{key}");
    }
    // The order depends on the seed only: not on the number of decoding threads.
    assert_eq!(read_all(&source, 7, 0, &options(4, 1)), a);
    assert_ne!(read_all(&source, 8, 0, &options(4, 2)), a);
    // A buffer of 1 keeps each shard's order (the shards are still shuffled).
    let in_order = read_all(&source, 7, 0, &options(1, 2));
    for w in in_order.windows(2) {
        let (x, y): (usize, usize) = (w[0].0.parse().unwrap(), w[1].0.parse().unwrap());
        assert!(y == x + 1 || y % 5 == 0, "{x} then {y}");
    }
}

#[test]
fn a_restart_mid_epoch_continues_the_same_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = write_shards(dir.path(), 2, 6);
    let source = StreamSource::open(&pattern, Fields::defaults).unwrap();
    let opts = options(5, 2);
    let full = read_all(&source, 11, 0, &opts);
    for k in [1usize, 4, 7, 11, 12] {
        assert_eq!(read_all(&source, 11, k as u64, &opts), full[k..], "restart after {k}");
    }
}

/// A damaged image, a missing condition, a repeated member and a shard cut short: each is skipped and reported,
/// the good samples around them are read.
#[test]
fn bad_samples_and_damaged_shards_are_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = sample_members("000000", 0);
    let mut bad_image = sample_members("000001", 1);
    bad_image[0].1 = b"\x89PNG but not really".to_vec();
    members.extend(bad_image);
    let mut no_condition = sample_members("000002", 2);
    no_condition.remove(1);
    members.extend(no_condition);
    let mut twice = sample_members("000003", 3);
    twice.push(twice[2].clone());
    members.extend(twice);
    members.extend(sample_members("000004", 4));
    members.push(("__meta__".into(), b"ignored".to_vec()));
    write_tar(&dir.path().join("a.tar"), &members);
    // The second shard is cut in the middle of its third sample's target image.
    let cut_members: Vec<(String, Vec<u8>)> = (5..9).flat_map(|i| sample_members(&format!("{i:06}"), i)).collect();
    write_tar(&dir.path().join("b.tar"), &cut_members);
    let b = std::fs::read(dir.path().join("b.tar")).unwrap();
    let third = b.windows(10).position(|w| w == b"000007.png").unwrap();
    std::fs::write(dir.path().join("b.tar"), &b[..third + 512 + 100]).unwrap();

    let source = StreamSource::open(&format!("{}/*.tar", dir.path().display()), Fields::defaults).unwrap();
    let seen = read_all(&source, 3, 0, &options(3, 2));
    let mut good: Vec<&str> = seen.iter().filter(|(_, s)| s.is_ok()).map(|(k, _)| k.as_str()).collect();
    good.sort();
    assert_eq!(good, ["000000", "000004", "000005", "000006"]);
    let why = |key: &str| seen.iter().find(|(k, _)| k == key).unwrap().1.clone().unwrap_err();
    assert!(why("000001").contains("not an image"), "{}", why("000001"));
    assert!(why("000002").contains("no condition image"), "{}", why("000002"));
    assert!(why("000003").contains("duplicate file name .txt"), "{}", why("000003"));
    // The consumer records what it skips; the reader records the damaged shard.
    for (key, s) in &seen {
        if let Err(w) = s {
            source.note_skipped(&SamplePosition { shard: 0, index: 0, key: key.clone() }, w);
        }
    }
    let report = source.skipped();
    assert_eq!((report.samples, report.shards), (3, 1), "{:?}", report.lines);
    assert!(report.lines.iter().any(|l| l.contains("b.tar") && l.contains("truncated")), "{:?}", report.lines);
}

#[test]
fn source_problems_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let err = StreamSource::open(&format!("{d}/x-{{0..1}}.tar"), Fields::defaults).unwrap_err().to_string();
    assert!(err.contains("x-0.tar: no such file") && err.contains("x-1.tar"), "{err}");
    std::fs::write(dir.path().join("a.tar"), b"").unwrap();
    std::fs::write(dir.path().join("b.parquet"), b"").unwrap();
    let err = StreamSource::open(&format!("{d}/*"), Fields::defaults).unwrap_err().to_string();
    assert!(err.contains("all .tar") && err.contains("b.parquet"), "{err}");
    let err = StreamSource::open(&format!("{d}/b.parquet"), Fields::defaults).unwrap_err().to_string();
    assert!(err.contains("b.parquet: not a readable parquet file"), "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn fixture(rel: &str) -> PathBuf {
    crate::test_support::fixture_path("shards").join(rel)
}

/// The parquet fixture: the `datasets` Image feature's {bytes, path} struct, a text column, two row groups; its
/// cells equal what the generator put in (image bytes by SHA-256), a row with no image is a bad sample.
#[test]
fn parquet_rows_in_the_datasets_layout() {
    let expected: Value = serde_json::from_slice(&std::fs::read(fixture("train.parquet.json")).unwrap()).unwrap();
    let rows = expected["rows"].as_array().unwrap();
    let path = fixture("train.parquet");
    let fields = Fields::defaults(StreamKind::Parquet);
    let source = StreamSource::open(path.to_str().unwrap(), Fields::defaults).unwrap();
    assert_eq!(source.kind, StreamKind::Parquet);
    let mut listed = Vec::new();
    hf_parquet::scan(&path, 0, &fields, &|| true, &mut |r| {
        listed.push(r);
        true
    })
    .unwrap();
    assert_eq!(listed.len(), rows.len());
    let groups: BTreeSet<usize> = listed
        .iter()
        .map(|r| match r.body.as_ref().unwrap() {
            RecordBody::Row { row_group, .. } => *row_group,
            RecordBody::Tar(_) => unreachable!(),
        })
        .collect();
    assert!(groups.len() >= 2, "the fixture has several row groups");
    for (record, want) in listed.iter().zip(rows) {
        let RecordBody::Row { data: Some(cells), .. } = record.body.as_ref().unwrap() else { panic!("no cells") };
        match want["image_sha256"].as_str() {
            Some(sha) => {
                let cells = cells.as_ref().unwrap();
                assert_eq!(sha256_hex(&cells.image), sha);
                assert_eq!(sha256_hex(&cells.condition), want["conditioning_image_sha256"]);
                assert_eq!(cells.captions, [want["text"].as_str().unwrap()]);
            }
            None => assert!(cells.as_ref().unwrap_err().contains("image"), "{:?}", cells.as_ref().err()),
        }
    }
    // Through the stream: every good row decodes; the bad one is reported; a restart continues exactly.
    let opts = options(3, 2);
    let all = read_all(&source, 5, 0, &opts);
    let bad = rows.iter().filter(|r| r["image_sha256"].is_null()).count();
    assert_eq!(all.iter().filter(|(_, s)| s.is_err()).count(), bad);
    assert_eq!(all.len(), rows.len());
    assert_eq!(read_all(&source, 5, 4, &opts), all[4..]);

    let missing = Fields::defaults(StreamKind::Parquet).with(StreamKind::Parquet, None, None, Some("caption"));
    let err = StreamSource::open(path.to_str().unwrap(), |_| missing.clone()).unwrap_err().to_string();
    assert!(err.contains("no caption column \"caption\"") && err.contains("text"), "{err}");
}

/// A shard written by webdataset's own `TarWriter` groups into the samples its own reader yields, and reads with
/// either caption file.
#[test]
fn webdatasets_own_shards_group_as_its_reader_groups_them() {
    let expected: Value = serde_json::from_slice(&std::fs::read(fixture("wds-000000.tar.json")).unwrap()).unwrap();
    let path = fixture("wds-000000.tar");
    let mut groups = Vec::new();
    webdataset::scan_groups(&path, &mut |g| {
        let mut exts: Vec<String> = g.members.iter().map(|m| m.ext.clone()).collect();
        exts.sort();
        groups.push(serde_json::json!({ "key": g.key, "exts": exts }));
        true
    })
    .unwrap();
    assert_eq!(Value::Array(groups), expected["samples"]);
    let texts = expected["texts"].as_array().unwrap();
    for caption in ["txt", "json"] {
        let fields = |k| Fields::defaults(k).with(k, None, None, Some(caption));
        let source = StreamSource::open(path.to_str().unwrap(), fields).unwrap();
        let seen = read_all(&source, 1, 0, &options(2, 2));
        assert_eq!(seen.len(), expected["samples"].as_array().unwrap().len());
        for (key, s) in seen {
            let i: usize = key.trim_start_matches("sample").parse().unwrap();
            assert_eq!(s.unwrap().1, texts[i].as_str().unwrap(), "{key} .{caption}");
        }
    }
}

/// A bounded HTTP/1.1 server on 127.0.0.1 for the tests: serves the files of `dir` by name (HEAD and GET, a
/// `Range: bytes=N-` answered with 206), 404 for anything else; the files named in `cut` are announced whole but
/// only their first half is sent. It stops when dropped, or after five minutes.
pub(crate) struct Server {
    pub base: String,
    /// GET requests of the cut files.
    pub cut_gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

pub(crate) fn serve(dir: &Path, cut: &[&str]) -> Server {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let cut_gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (dir, cut, flag) = (dir.to_path_buf(), cut.iter().map(|s| s.to_string()).collect::<Vec<_>>(), stop.clone());
    let gets = cut_gets.clone();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            };
            stream.set_nonblocking(false).ok();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut request, mut from) = (String::new(), 0usize);
            reader.read_line(&mut request).ok();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    from = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                }
            }
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
            let name = path.trim_start_matches('/').split('?').next().unwrap_or("");
            let mut out = stream;
            let Ok(body) =
                std::fs::read(dir.join(name)).map_err(|_| ()).and_then(
                    |b| {
                        if name.is_empty() {
                            Err(())
                        } else {
                            Ok(b)
                        }
                    },
                )
            else {
                out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found")
                    .ok();
                continue;
            };
            let from = from.min(body.len());
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            let head =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len() - from);
            out.write_all(head.as_bytes()).ok();
            if method == "GET" {
                let is_cut = cut.iter().any(|c| c == name);
                if is_cut {
                    gets.fetch_add(1, Ordering::SeqCst);
                }
                let end = if is_cut { body.len() / 2 } else { body.len() };
                out.write_all(&body[from.min(end)..end]).ok();
            }
        }
    });
    Server { base, cut_gets, stop }
}

/// Shards at http:// URLs stream as the same files do locally: the same samples in the same order for a seed,
/// the same restart mid-epoch, the same names and sizes for a resumed run's check.
#[test]
fn shards_at_urls_stream_as_local_files_do() {
    let dir = tempfile::tempdir().unwrap();
    let local = write_shards(dir.path(), 2, 5);
    let server = serve(dir.path(), &[]);
    let url = format!("{}/train-{{00000..00001}}.tar", server.base);
    let here = StreamSource::open(&local, Fields::defaults).unwrap();
    let there = StreamSource::open(&url, Fields::defaults).unwrap();
    assert_eq!((there.kind, there.shards.len()), (StreamKind::WebDataset, 2));
    assert_eq!(there.fingerprint(), here.fingerprint(), "names and sizes (Content-Length)");
    let opts = options(4, 2);
    let want = read_all(&here, 9, 0, &opts);
    assert_eq!(read_all(&there, 9, 0, &opts), want);
    for k in [3u64, 7] {
        assert_eq!(read_all(&there, 9, k, &opts), want[k as usize..], "restart after {k}");
    }
    assert_eq!(there.skipped(), SkipReport::default());
}

/// A URL that answers 404 is listed when the source opens, with the status; a body cut short is retried, then the
/// rest of its shard is skipped and counted, naming the URL, while the samples before the cut are used; parquet
/// URLs and `pipe:` commands are refused by name.
#[test]
fn missing_and_cut_shards_at_urls() {
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path(), 2, 4);
    let server = serve(dir.path(), &["train-00001.tar"]);
    let b = &server.base;

    let err = StreamSource::open(&format!("{b}/train-{{00000..00003}}.tar"), Fields::defaults).unwrap_err().to_string();
    assert!(err.contains("2 shards cannot be used") && err.contains("train-00002.tar: HTTP 404"), "{err}");
    assert!(err.contains(&format!("{b}/train-00003.tar")), "{err}");

    let source = StreamSource::open(&format!("{b}/train-{{00000..00001}}.tar"), Fields::defaults).unwrap();
    let seen = read_all(&source, 4, 0, &options(2, 2));
    let good: Vec<&str> = seen.iter().filter(|(_, s)| s.is_ok()).map(|(k, _)| k.as_str()).collect();
    assert!(good.len() >= 4 && good.len() < 8, "the whole first shard and the start of the cut one: {good:?}");
    for i in 0..4 {
        assert!(good.contains(&format!("{i:06}").as_str()), "{good:?}");
    }
    let report = source.skipped();
    assert_eq!(report.shards, 1, "{:?}", report.lines);
    assert!(report.lines[0].contains(&format!("{b}/train-00001.tar: ")), "{:?}", report.lines);
    let gets = server.cut_gets.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(gets, 1 + remote::RETRIES as usize, "the cut shard is fetched once and retried");

    let parquet = std::fs::copy(fixture("train.parquet"), dir.path().join("train.parquet")).map(|_| ());
    parquet.unwrap();
    let err = StreamSource::open(&format!("{b}/train.parquet"), Fields::defaults).unwrap_err().to_string();
    assert!(err.contains(&format!("{b}/train.parquet")) && err.contains("random access"), "{err}");
    let err = StreamSource::open("pipe:curl -s http://x/a.tar", Fields::defaults).unwrap_err().to_string();
    assert!(err.starts_with("dataset") && err.contains("pipe:"), "{err}");
}
