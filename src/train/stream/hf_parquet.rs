//! Parquet files in the Hugging Face `datasets` layout (what `Dataset.to_parquet` and the Hub's
//! `refs/convert/parquet` write): one row per sample, an `Image` feature as a struct column
//! `{bytes: binary, path: string}` (a plain binary column is read too), the caption a string column (or a list of
//! strings, one picked per use). Column names come from [`Fields`], as diffusers' `train_controlnet.py` takes
//! `--image_column`, `--conditioning_image_column` and `--caption_column`.
//!
//! Rows are read one row group at a time with only the three columns projected; row counts come from the
//! footer, so a resumed run replays an epoch without reading any data.
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;

use super::{Fields, Record, RecordBody, RowData, Rows};

fn open(path: &Path) -> std::result::Result<SerializedFileReader<File>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    SerializedFileReader::new(file).map_err(|e| format!("not a readable parquet file: {e}"))
}

/// The file's schema with only the three columns (checked present), for projection.
fn projection(reader: &SerializedFileReader<File>, fields: &Fields) -> std::result::Result<Type, String> {
    let schema = reader.metadata().file_metadata().schema();
    let all = schema.get_fields();
    let mut picked: Vec<Arc<Type>> = Vec::new();
    for (what, name) in [
        ("image", &fields.image[0]),
        ("condition image", &fields.conditioning_image[0]),
        ("caption", &fields.caption[0]),
    ] {
        let Some(col) = all.iter().find(|f| f.name() == name) else {
            let names: Vec<&str> = all.iter().map(|f| f.name()).collect();
            return Err(format!("no {what} column {name:?} (its columns: {})", names.join(", ")));
        };
        if !picked.iter().any(|p| p.name() == name) {
            picked.push(col.clone());
        }
    }
    Type::group_type_builder(schema.name()).with_fields(picked).build().map_err(|e| e.to_string())
}

/// The file reads as parquet and has the columns `fields` names.
pub fn check_columns(path: &Path, fields: &Fields) -> std::result::Result<(), String> {
    projection(&open(path)?, fields).map(|_| ())
}

/// The rows of one shard, in file order, handed to `each` until it returns false. With `needs_data()` false
/// (a resumed run replaying its epoch) a row group's cells are not read; workers read them if the row is used.
/// A row group that cannot be read makes each of its rows a bad sample (the listing stays the same either way).
pub fn scan(
    path: &Path,
    shard: usize,
    fields: &Fields,
    needs_data: &dyn Fn() -> bool,
    each: &mut dyn FnMut(Record) -> bool,
) -> std::result::Result<(), String> {
    let reader = open(path)?;
    let projection = projection(&reader, fields)?;
    let mut index = 0u64;
    for row_group in 0..reader.metadata().num_row_groups() {
        let n = reader.metadata().row_group(row_group).num_rows().max(0) as usize;
        let mut data: Option<Rows> = None;
        if needs_data() {
            data = Some(match rows_of(&reader, row_group, &projection, fields) {
                Ok(rows) if rows.len() == n => rows,
                Ok(rows) => vec![Err(format!("row group {row_group} has {} rows, its footer says {n}", rows.len())); n],
                Err(e) => vec![Err(format!("row group {row_group} unreadable: {e}")); n],
            });
        }
        let mut data = data.map(|d| d.into_iter());
        for row in 0..n {
            let cells = data.as_mut().and_then(|d| d.next());
            let record = Record {
                shard,
                index,
                key: format!("row {index}"),
                body: Ok(RecordBody::Row { row_group, row, data: cells }),
            };
            index += 1;
            if !each(record) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The cells of every row of one row group (a worker's read when a replayed row is used).
pub fn read_row_group(path: &Path, row_group: usize, fields: &Fields) -> std::result::Result<Rows, String> {
    let reader = open(path)?;
    let projection = projection(&reader, fields)?;
    rows_of(&reader, row_group, &projection, fields)
}

fn rows_of(
    reader: &SerializedFileReader<File>,
    row_group: usize,
    projection: &Type,
    fields: &Fields,
) -> std::result::Result<Rows, String> {
    let group = reader.get_row_group(row_group).map_err(|e| e.to_string())?;
    let rows = group.get_row_iter(Some(projection.clone())).map_err(|e| e.to_string())?;
    Ok(rows.map(|row| row.map_err(|e| e.to_string()).and_then(|row| cells(&row, fields))).collect())
}

fn cells(row: &Row, fields: &Fields) -> std::result::Result<RowData, String> {
    let column = |name: &str| row.get_column_iter().find(|(n, _)| n.as_str() == name).map(|(_, f)| f);
    let image = |name: &str| -> std::result::Result<Vec<u8>, String> {
        match column(name) {
            Some(Field::Bytes(b)) => Ok(b.data().to_vec()),
            Some(Field::Group(g)) => match g.get_column_iter().find(|(n, _)| n.as_str() == "bytes") {
                Some((_, Field::Bytes(b))) => Ok(b.data().to_vec()),
                _ => {
                    let path = g.get_column_iter().find(|(n, _)| n.as_str() == "path").map(|(_, f)| f.to_string());
                    Err(format!("{name}: no image bytes in the row (path {})", path.unwrap_or_default()))
                }
            },
            Some(Field::Null) | None => Err(format!("{name} is empty")),
            Some(other) => Err(format!("{name}: not an image cell ({other})")),
        }
    };
    let caption = &fields.caption[0];
    let captions = match column(caption) {
        Some(Field::Str(s)) => vec![s.clone()],
        Some(Field::ListInternal(list)) if !list.elements().is_empty() => list
            .elements()
            .iter()
            .map(|f| match f {
                Field::Str(s) => Ok(s.clone()),
                other => Err(format!("{caption}: a caption list holds {other}, not text")),
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(Field::Null) | None => return Err(format!("{caption} is empty")),
        Some(other) => return Err(format!("{caption}: not text ({other})")),
    };
    Ok(RowData { image: image(&fields.image[0])?, condition: image(&fields.conditioning_image[0])?, captions })
}
