//! WebDataset shards: tar files whose members are grouped into samples by key, as the `webdataset` package
//! groups them (`tariterators.base_plus_ext` and `group_by_keys`):
//!
//! - a member's *key* is its path up to the first dot of its file name, the rest is its *extension*, lower-cased
//!   (`dir/0001.cond.PNG` → key `dir/0001`, extension `cond.png`); names without such a dot are ignored, and so
//!   are `__name__` metadata files at the top level and anything that is not a regular file;
//! - consecutive members with the same key form one sample; an extension seen twice in one sample makes it a
//!   bad sample (webdataset raises "duplicate file name").
//!
//! Scanning a local shard reads only the tar headers (seeking over the contents): a sample is a list of member
//! positions that the decoding workers read themselves, so neither a shuffle buffer nor a resumed run's replay
//! holds image bytes. A shard at a URL ([`super::remote`]) is read once, front to back, and its samples carry
//! their bytes (the shuffle buffer holds them then, as webdataset's does).
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use super::{Fields, Member, Record, RecordBody, TarParts};

/// webdataset's `base_plus_ext`: (key, extension) of a member path, `None` for names it skips. The same
/// regular expression, so the corner cases agree too (`dir/.x.jpg` is key `dir/`, extension `x.jpg`).
pub fn base_plus_ext(path: &str) -> Option<(&str, &str)> {
    static BASE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = BASE.get_or_init(|| regex::Regex::new(r"^((?:.*/|)[^.]+)[.]([^/]*)$").expect("a valid pattern"));
    let caps = re.captures(path)?;
    Some((caps.get(1)?.as_str(), caps.get(2)?.as_str()))
}

/// webdataset's `meta_prefix`/`meta_suffix` rule: `__key__`-style names at the top level are not sample parts.
fn is_metadata(path: &str) -> bool {
    !path.contains('/') && path.starts_with("__") && path.ends_with("__")
}

/// The samples of one shard, in tar order, handed to `each` until it returns false. Samples that lack a part
/// named by `fields` (or repeat one) are handed over as bad records, so they are counted where they are
/// consumed. An unreadable or truncated tar ends the shard with an error after the samples before the damage.
pub fn scan(
    path: &Path,
    shard: usize,
    fields: &Fields,
    each: &mut dyn FnMut(Record) -> bool,
) -> std::result::Result<(), String> {
    let mut index = 0u64;
    scan_groups(path, &mut |group| {
        let record = group.into_record(shard, index, fields);
        index += 1;
        each(record)
    })
}

/// The member groups of one shard, in tar order, handed to `each` until it returns false. A local shard is
/// listed from its headers (seeking over the contents); a URL's is read front to back, each member's bytes kept.
pub(crate) fn scan_groups(path: &Path, each: &mut dyn FnMut(Group) -> bool) -> std::result::Result<(), String> {
    if let Some(url) = super::url_of(path) {
        let mut archive = tar::Archive::new(super::remote::open(url)?);
        let entries = archive.entries().map_err(|e| e.to_string())?;
        return group_members(entries, None, each);
    }
    let file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| e.to_string())?;
    group_members(entries, Some(file_len), each)
}

/// Groups tar entries by key. With `file_len` (a local file) members are positions checked against the file's
/// end; without (a stream) each member's bytes are read.
fn group_members<R: Read>(
    entries: tar::Entries<'_, R>,
    file_len: Option<u64>,
    each: &mut dyn FnMut(Group) -> bool,
) -> std::result::Result<(), String> {
    let mut current: Option<Group> = None;
    let mut groups = 0usize;
    let mut flush = |group: Group, groups: &mut usize| -> bool {
        *groups += 1;
        each(group)
    };
    // The samples before a damaged header or a truncated member are still used.
    let damage = (|| {
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("bad tar header after sample {groups}: {e}"))?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                continue;
            }
            let name = entry.path().map_err(|e| format!("bad member name: {e}"))?.to_string_lossy().into_owned();
            let (offset, size) = (entry.raw_file_position(), entry.size());
            let bytes = match file_len {
                Some(len) if offset + size > len => {
                    return Err(format!(
                        "truncated: {name} ends {} bytes past the end of the file",
                        offset + size - len
                    ));
                }
                Some(_) => None,
                None => {
                    let mut bytes = Vec::with_capacity(size as usize);
                    entry.read_to_end(&mut bytes).map_err(|e| format!("truncated: {name}: {e}"))?;
                    Some(Arc::from(bytes))
                }
            };
            if is_metadata(&name) {
                continue;
            }
            let Some((key, ext)) = base_plus_ext(&name) else { continue };
            let ext = ext.to_lowercase();
            if current.as_ref().is_some_and(|g| g.key != key) {
                let done = current.take().expect("checked above");
                if !flush(done, &mut groups) {
                    return Ok(false);
                }
            }
            let group =
                current.get_or_insert_with(|| Group { key: key.to_string(), members: Vec::new(), duplicate: None });
            if group.members.iter().any(|m| m.ext == ext) {
                group.duplicate.get_or_insert(ext.clone());
            }
            group.members.push(Member { ext, offset, size, bytes });
        }
        Ok(true)
    })();
    if matches!(damage, Ok(false)) {
        return Ok(());
    }
    if let Some(done) = current {
        flush(done, &mut groups);
    }
    damage.map(|_| ())
}

/// The members of one key, as read.
pub(crate) struct Group {
    pub key: String,
    pub members: Vec<Member>,
    /// An extension seen twice.
    pub duplicate: Option<String>,
}

impl Group {
    fn into_record(self, shard: usize, index: u64, fields: &Fields) -> Record {
        let body = (|| {
            if let Some(ext) = &self.duplicate {
                return Err(format!("duplicate file name .{ext}"));
            }
            let find = |what: &str, wanted: &[String]| {
                wanted.iter().find_map(|w| self.members.iter().find(|m| &m.ext == w)).cloned().ok_or_else(|| {
                    let have: Vec<&str> = self.members.iter().map(|m| m.ext.as_str()).collect();
                    format!("no {what} (.{}; it has .{})", wanted.join(" or ."), have.join(", ."))
                })
            };
            Ok(RecordBody::Tar(TarParts {
                image: find("image", &fields.image)?,
                condition: find("condition image", &fields.conditioning_image)?,
                caption: find("caption", &fields.caption)?,
            }))
        })();
        Record { shard, index, key: self.key, body }
    }
}

/// The bytes of a member.
pub fn read_member(file: &mut File, member: &Member) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(member.offset))?;
    let mut bytes = vec![0u8; member.size as usize];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_extensions_split_as_webdataset_does() {
        assert_eq!(base_plus_ext("dir/0001.cond.png"), Some(("dir/0001", "cond.png")));
        assert_eq!(base_plus_ext("a.b/c.jpg"), Some(("a.b/c", "jpg")));
        assert_eq!(base_plus_ext("noext"), None);
        assert_eq!(base_plus_ext(".hidden"), None);
        assert_eq!(base_plus_ext("dir/.x.jpg"), Some(("dir/", "x.jpg")));
        assert_eq!(base_plus_ext("dir.d/x"), None);
        assert!(is_metadata("__key__") && !is_metadata("d/__key__"));
    }
}
