//! Shards named by `http://` or `https://` URLs, as webdataset takes them: read front to back over one blocking
//! HTTP GET each (ureq; no async runtime), never stored on disk.
//!
//! - `--dataset` brace ranges apply to URLs too (`https://host/train-{00000..00127}.tar`); globs do not (a `?` is
//!   a URL's query). `pipe:` commands are refused.
//! - When the run opens its data, every URL gets a `HEAD` request: a shard that is not there is listed with the
//!   missing local files, before anything loads; its `Content-Length` is the size that a resumed run's shard
//!   check compares (with the file name: the URL's last path segment, the query left out).
//! - A failed connection or a body cut short is retried [`RETRIES`] times with a growing pause, continuing at
//!   the byte where it broke (a `Range` request; a server that ignores it sends the whole body again and the
//!   bytes already read are passed over). After that, the shard is damaged: its samples before the failure
//!   are used, the rest is skipped, warned about and counted like a truncated local shard (webdataset's
//!   `warn_and_continue` handling, which long runs use so that one bad shard does not end them).
//! - Only tar shards: parquet needs random access and is refused with the URL named.
use std::io::{self, Read};
use std::time::Duration;

/// Reconnections per shard after a network error, before the rest of the shard is skipped.
pub const RETRIES: u32 = 3;
/// The first pause before a reconnection; each next one doubles.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The bytes as stored: sizes and `Range` offsets then count the shard's own bytes, not a compressed transfer's.
const IDENTITY: &str = "identity";

/// An `http://` or `https://` URL.
pub fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// A URL or a `pipe:` command (names shards that are not local files).
pub fn is_remote(s: &str) -> bool {
    is_url(s) || s.starts_with("pipe:")
}

/// The URL's file name: its last path segment without query or fragment.
pub fn file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout_read(READ_TIMEOUT).build()
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => format!("HTTP {code} {}", r.status_text()),
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// The shard's size from a `HEAD` request (`None`: the server does not say); an error when it is not there.
pub fn content_length(url: &str) -> std::result::Result<Option<u64>, String> {
    let agent = agent();
    let response = match agent.head(url).set("Accept-Encoding", IDENTITY).call() {
        // Some servers answer HEAD with 405; the headers of a GET (its body not read) say the same.
        Err(ureq::Error::Status(405 | 501, _)) => agent.get(url).set("Accept-Encoding", IDENTITY).call(),
        other => other,
    }
    .map_err(describe)?;
    Ok(response.header("Content-Length").and_then(|v| v.trim().parse().ok()))
}

/// A shard's bytes, front to back, reconnecting where a transfer broke.
pub struct HttpReader {
    url: String,
    agent: ureq::Agent,
    body: Option<Box<dyn Read + Send + Sync>>,
    /// Bytes handed out so far.
    position: u64,
    /// Reconnections left.
    retries: u32,
}

/// Opens `url` for reading (retrying the first request too).
pub fn open(url: &str) -> std::result::Result<HttpReader, String> {
    let mut reader = HttpReader { url: url.to_string(), agent: agent(), body: None, position: 0, retries: RETRIES };
    reader.connect().map_err(|e| e.to_string())?;
    Ok(reader)
}

impl HttpReader {
    /// A GET from `position` on; retried (with pauses) while reconnections are left.
    fn connect(&mut self) -> io::Result<()> {
        loop {
            match self.request() {
                Ok(()) => return Ok(()),
                Err(e) if self.retries == 0 => return Err(e),
                Err(e) => self.pause(&e),
            }
        }
    }

    fn pause(&mut self, why: &io::Error) {
        let pause = FIRST_PAUSE * 2u32.pow(RETRIES - self.retries);
        self.retries -= 1;
        tracing::warn!(url = %self.url, "reading at byte {} failed ({why}); retrying in {pause:?}", self.position);
        std::thread::sleep(pause);
    }

    fn request(&mut self) -> io::Result<()> {
        let mut request = self.agent.get(&self.url).set("Accept-Encoding", IDENTITY);
        if self.position > 0 {
            request = request.set("Range", &format!("bytes={}-", self.position));
        }
        let response = request.call().map_err(|e| io::Error::other(describe(e)))?;
        let partial = response.status() == 206;
        let mut body = response.into_reader();
        if self.position > 0 && !partial {
            // The whole body again: pass over what was read.
            let skipped = io::copy(&mut (&mut body).take(self.position), &mut io::sink())?;
            if skipped < self.position {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the body is shorter than before"));
            }
        }
        self.body = Some(body);
        Ok(())
    }
}

impl Read for HttpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let result = match self.body.as_mut() {
                Some(body) => body.read(buf),
                None => Err(io::Error::other("not connected")),
            };
            match result {
                Ok(n) => {
                    self.position += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if self.retries == 0 => {
                    return Err(io::Error::new(e.kind(), format!("{} (after {RETRIES} retries)", e)));
                }
                Err(e) => {
                    self.body = None;
                    self.pause(&e);
                    self.connect()?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_their_file_names() {
        assert!(is_url("http://h/a.tar") && is_url("HTTPS://h/a.tar") && !is_url("./http/a.tar"));
        assert!(is_remote("pipe:curl -s x") && !is_remote("a.tar"));
        assert_eq!(file_name("https://h/d/train-00001.tar?sig=a/b#x"), "train-00001.tar");
    }
}
