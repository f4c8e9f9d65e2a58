//! The recipe inside a JPEG or WebP: a minimal EXIF (TIFF) block, written and read here.
//!
//! A1111 puts its `parameters` text in the Exif sub-IFD's `UserComment` (tag 0x9286, "UNICODE" header then
//! UTF-16); we do the same, so A1111's PNG Info tab and exiftool show it. Every other text entry (our JSON recipe)
//! goes, as a JSON list of `[key, value]` pairs, into IFD0's `XPComment` (tag 0x9C9C, UTF-16LE bytes, the field
//! Windows shows as "Comments"). Reading accepts either byte order.

/// Tags used (TIFF 6.0, Exif 2.32, Windows XP tags).
const TAG_EXIF_IFD: u16 = 0x8769;
const TAG_XP_COMMENT: u16 = 0x9C9C;
const TAG_USER_COMMENT: u16 = 0x9286;
/// Field types.
const TYPE_BYTE: u16 = 1;
const TYPE_LONG: u16 = 4;
const TYPE_UNDEFINED: u16 = 7;
/// `UserComment`'s 8-byte character-code header for UTF-16 text.
const UNICODE_HEADER: &[u8; 8] = b"UNICODE\0";
/// The TIFF header ("II", 42, offset of IFD0 = 8).
const TIFF_HEADER: [u8; 8] = [b'I', b'I', 42, 0, 8, 0, 0, 0];
/// Bytes of one IFD entry, and of an IFD holding `n` entries (count, entries, next-IFD offset).
const ENTRY_BYTES: usize = 12;
fn ifd_bytes(n: usize) -> usize {
    2 + n * ENTRY_BYTES + 4
}

/// The key A1111 keeps in `UserComment`.
pub const PARAMETERS_KEY: &str = "parameters";

/// The EXIF block (a little-endian TIFF, without JPEG's "Exif\0\0" prefix) for these text entries.
pub fn build(text: &[(String, String)]) -> Vec<u8> {
    let parameters = text.iter().find(|(k, _)| k == PARAMETERS_KEY).map(|(_, v)| v.as_str());
    let others: Vec<&(String, String)> = text.iter().filter(|(k, _)| k != PARAMETERS_KEY).collect();
    let mut user_comment = UNICODE_HEADER.to_vec();
    user_comment.extend(utf16le(parameters.unwrap_or_default()));
    let mut xp_comment = utf16le(&serde_json::to_string(&others).unwrap_or_default());
    xp_comment.extend([0, 0]);

    // Layout: header, IFD0 (XPComment, Exif pointer), Exif IFD (UserComment), then the two values.
    let ifd0 = TIFF_HEADER.len();
    let exif_ifd = ifd0 + ifd_bytes(2);
    let xp_at = exif_ifd + ifd_bytes(1);
    let user_at = xp_at + xp_comment.len();
    let mut out = TIFF_HEADER.to_vec();
    // Entries of an IFD are sorted by tag.
    push_ifd(
        &mut out,
        &[
            (TAG_EXIF_IFD, TYPE_LONG, 1, exif_ifd as u32),
            (TAG_XP_COMMENT, TYPE_BYTE, xp_comment.len() as u32, xp_at as u32),
        ],
    );
    push_ifd(&mut out, &[(TAG_USER_COMMENT, TYPE_UNDEFINED, user_comment.len() as u32, user_at as u32)]);
    out.extend(xp_comment);
    out.extend(user_comment);
    out
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// One IFD of (tag, type, count, value-or-offset) entries, with no next IFD.
fn push_ifd(out: &mut Vec<u8>, entries: &[(u16, u16, u32, u32)]) {
    out.extend((entries.len() as u16).to_le_bytes());
    for &(tag, kind, count, value) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(count.to_le_bytes());
        out.extend(value.to_le_bytes());
    }
    out.extend(0u32.to_le_bytes());
}

/// The text entries [`build`] wrote (`parameters` first), from an EXIF block with or without the "Exif\0\0"
/// prefix; `None` when it is not a TIFF block. Unknown tags are skipped.
pub fn read(block: &[u8]) -> Option<Vec<(String, String)>> {
    let tiff = block.strip_prefix(b"Exif\0\0").unwrap_or(block);
    let t = Tiff::new(tiff)?;
    let ifd0 = t.u32(4)? as usize;
    let mut text = Vec::new();
    let mut others = Vec::new();
    for (tag, kind, count, at) in t.entries(ifd0)? {
        match tag {
            TAG_EXIF_IFD if kind == TYPE_LONG => {
                let sub = t.u32(at)? as usize;
                for (tag, _, count, at) in t.entries(sub)? {
                    if tag == TAG_USER_COMMENT {
                        let bytes = t.value(at, count)?;
                        text.insert(0, (PARAMETERS_KEY.to_string(), user_comment(&t, bytes)));
                    }
                }
            }
            TAG_XP_COMMENT => {
                let bytes = t.value(at, count)?;
                let s = decode_utf16(bytes, true);
                others = serde_json::from_str::<Vec<(String, String)>>(s.trim_end_matches('\0')).unwrap_or_default();
            }
            _ => {}
        }
    }
    text.extend(others);
    Some(text)
}

/// A `UserComment` value: "UNICODE" (UTF-16 in the file's byte order; A1111 writes big-endian), "ASCII", or none.
fn user_comment(t: &Tiff, bytes: &[u8]) -> String {
    let (header, body) = bytes.split_at(8.min(bytes.len()));
    let s = if header == UNICODE_HEADER { decode_utf16(body, t.little) } else { String::from_utf8_lossy(body).into() };
    s.trim_end_matches('\0').to_string()
}

fn decode_utf16(bytes: &[u8], little: bool) -> String {
    let units = bytes.chunks_exact(2).map(|b| {
        if little {
            u16::from_le_bytes([b[0], b[1]])
        } else {
            u16::from_be_bytes([b[0], b[1]])
        }
    });
    char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
}

/// A TIFF block and its byte order.
struct Tiff<'a> {
    data: &'a [u8],
    little: bool,
}

impl<'a> Tiff<'a> {
    fn new(data: &'a [u8]) -> Option<Self> {
        let little = match data.get(..2)? {
            b"II" => true,
            b"MM" => false,
            _ => return None,
        };
        Some(Self { data, little })
    }

    fn u16(&self, at: usize) -> Option<u16> {
        let b: [u8; 2] = self.data.get(at..at + 2)?.try_into().ok()?;
        Some(if self.little { u16::from_le_bytes(b) } else { u16::from_be_bytes(b) })
    }

    fn u32(&self, at: usize) -> Option<u32> {
        let b: [u8; 4] = self.data.get(at..at + 4)?.try_into().ok()?;
        Some(if self.little { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) })
    }

    /// An IFD's entries as (tag, type, count, offset of the value field).
    fn entries(&self, ifd: usize) -> Option<Vec<(u16, u16, u32, usize)>> {
        let n = self.u16(ifd)? as usize;
        (0..n)
            .map(|i| {
                let e = ifd + 2 + i * ENTRY_BYTES;
                Some((self.u16(e)?, self.u16(e + 2)?, self.u32(e + 4)?, e + 8))
            })
            .collect()
    }

    /// The bytes of a one-byte-per-item value (BYTE, UNDEFINED, ASCII): inline up to 4 bytes, else at its offset.
    fn value(&self, field: usize, count: u32) -> Option<&'a [u8]> {
        let count = count as usize;
        let at = if count <= 4 { field } else { self.u32(field)? as usize };
        self.data.get(at..at.checked_add(count)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn text_round_trips_through_the_block() {
        let text = pairs(&[
            ("parameters", "a cat \u{1f408}, caf\u{e9}\nSteps: 20, Seed: 7"),
            ("controlnet-rs", "{\"prompt\":\"\u{732b}\",\"seed\":7}"),
        ]);
        let block = build(&text);
        assert_eq!(read(&block).unwrap(), text);
        let mut jpeg_style = b"Exif\0\0".to_vec();
        jpeg_style.extend(&block);
        assert_eq!(read(&jpeg_style).unwrap(), text);
        assert!(read(b"not tiff").is_none());
    }

    #[test]
    fn reads_a1111s_big_endian_user_comment() {
        // As piexif writes A1111's: "MM", IFD0 with only the Exif pointer, UserComment in UTF-16BE.
        let comment: Vec<u8> =
            UNICODE_HEADER.iter().copied().chain("hi".encode_utf16().flat_map(u16::to_be_bytes)).collect();
        let mut b = vec![b'M', b'M', 0, 42, 0, 0, 0, 8];
        b.extend([0, 1, 0x87, 0x69, 0, 4, 0, 0, 0, 1, 0, 0, 0, 26, 0, 0, 0, 0]);
        b.extend([0, 1, 0x92, 0x86, 0, 7, 0, 0, 0, comment.len() as u8, 0, 0, 0, 44, 0, 0, 0, 0]);
        b.extend(comment);
        assert_eq!(read(&b).unwrap(), pairs(&[("parameters", "hi")]));
    }
}
