//! Writing `metadata.csv` without ever losing a hand edit.
//!
//! An existing file is read with the dataset's own rules (the header names the columns,
//! `filename,prompt` or `file_name,text`, BOM and CRLF allowed), so what `auto_label` sees is
//! what `train` sees. Without `--overwrite` the existing bytes are kept exactly and rows for the
//! new images are appended; with it the captions of the images captioned in this run are
//! replaced and every other row stays. Before anything is written, the new text is parsed back
//! with the dataset's reader and must list every captioned image with its caption; then it
//! goes to a temporary file that is renamed over the old one, so a crash never leaves half a
//! file.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::dataset::{normalize_name, parse_metadata, DatasetError, CAPTION_COLUMNS, FILE_COLUMNS};
use crate::{Error, Result};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A metadata file as found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingMetadata {
    /// The file's bytes, as read.
    bytes: Vec<u8>,
    /// The header's fields, as written.
    header: Vec<String>,
    file_index: usize,
    caption_index: usize,
    /// Image names (normalised as `train` does) that have a row.
    names: HashSet<String>,
    /// `(row, name)` of rows with an empty caption.
    empty_captions: Vec<(usize, String)>,
    /// `(row, name)` of every row, in file order.
    rows: Vec<(usize, String)>,
    crlf: bool,
}

impl ExistingMetadata {
    /// Reads `path`; `None` when it does not exist or is empty. A file `train` would refuse
    /// (unreadable rows, no file-name or caption column) is an error listing the problems: it
    /// must be fixed by hand first, because rewriting it could lose rows.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        Self::parse(bytes, &path.display().to_string())
    }

    /// [`ExistingMetadata::read`] on bytes; `origin` names the file in errors.
    pub fn parse(bytes: Vec<u8>, origin: &str) -> Result<Option<Self>> {
        let body = bytes.strip_prefix(BOM).unwrap_or(&bytes);
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(None);
        }
        let invalid = |message: String| -> Error {
            DatasetError::Invalid(format!(
                "{origin}: {message}; fix it (or move it away) and run auto_label again — it was not changed"
            ))
            .into()
        };
        let header = first_record(body).map_err(&invalid)?;
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|want| header.iter().position(|h| h.eq_ignore_ascii_case(want)))
        };
        let (Some(file_index), Some(caption_index)) = (find(&FILE_COLUMNS), find(&CAPTION_COLUMNS))
        else {
            return Err(invalid(format!(
                "the header `{}` does not name a file-name column ({}) and a caption column ({})",
                header.join(","),
                FILE_COLUMNS.join(" or "),
                CAPTION_COLUMNS.join(" or ")
            )));
        };
        let crlf = body
            .iter()
            .position(|&b| b == b'\n')
            .is_some_and(|i| i > 0 && body[i - 1] == b'\r');
        let mut existing = ExistingMetadata {
            bytes: bytes.clone(),
            header,
            file_index,
            caption_index,
            names: HashSet::new(),
            empty_captions: Vec::new(),
            rows: Vec::new(),
            crlf,
        };
        match parse_metadata(&bytes) {
            Ok(metadata) => {
                if !metadata.problems.is_empty() {
                    let lines: Vec<String> = metadata
                        .problems
                        .iter()
                        .map(|(row, m)| format!("row {row}: {m}"))
                        .collect();
                    return Err(invalid(format!(
                        "{} row(s) cannot be read:\n  {}\n",
                        lines.len(),
                        lines.join("\n  ")
                    )));
                }
                for row in metadata.rows {
                    let name = normalize_name(&row.file_name).unwrap_or(row.file_name.clone());
                    if row.caption.is_empty() {
                        existing.empty_captions.push((row.row, name.clone()));
                    }
                    existing.names.insert(name.clone());
                    existing.rows.push((row.row, name));
                }
            }
            // A header without rows: nothing to keep but the header.
            Err(_) if record_count(body) == 1 => {}
            Err(message) => return Err(invalid(message)),
        }
        Ok(Some(existing))
    }

    /// Whether `name` (relative to the image folder, `/`-separated) has a row.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Number of data rows.
    pub fn row_count(&self) -> usize {
        self.rows.len()
    }

    /// Things the user should fix by hand: rows with an empty caption and rows naming images
    /// that are not among `images`.
    pub fn warnings(&self, images: &HashSet<String>) -> Vec<String> {
        let mut warnings: Vec<String> = self
            .empty_captions
            .iter()
            .map(|(row, name)| {
                format!("row {row}: the caption of `{name}` is empty and was kept; write one (train refuses empty captions), or delete the row and run auto_label again")
            })
            .collect();
        warnings.extend(
            self.rows
                .iter()
                .filter(|(_, name)| !images.contains(name))
                .map(|(row, name)| {
                    format!("row {row}: `{name}` is not an image of this run's folder (kept; train will report it if the file is missing)")
                }),
        );
        warnings
    }
}

/// The first CSV record's fields, trimmed.
fn first_record(body: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let mut record = csv::ByteRecord::new();
    match reader.read_byte_record(&mut record) {
        Ok(true) => Ok(record
            .iter()
            .map(|f| String::from_utf8_lossy(f).trim().to_string())
            .collect()),
        Ok(false) => Err("the file has no header line".to_string()),
        Err(e) => Err(format!("not a readable CSV file: {e}")),
    }
}

fn record_count(body: &[u8]) -> usize {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    reader.byte_records().take_while(|r| r.is_ok()).count()
}

/// The rows of one run: captions by image name (`/`-separated, relative to the image folder).
pub type Captions = BTreeMap<String, String>;

/// What [`merged_text`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeCounts {
    /// Rows added for images that had none.
    pub added: usize,
    /// Existing rows whose caption was replaced (`--overwrite`).
    pub replaced: usize,
    /// Existing rows left exactly as they were.
    pub kept: usize,
}

/// The new file's bytes: `existing` (if any) merged with `captions`. Without `overwrite`,
/// captions of images that already have a row are ignored.
pub fn merged_text(
    existing: Option<&ExistingMetadata>,
    captions: &Captions,
    overwrite: bool,
) -> Result<(Vec<u8>, MergeCounts)> {
    let mut counts = MergeCounts::default();
    let Some(existing) = existing else {
        let mut out = Vec::new();
        write_records(&mut out, &[vec!["filename".into(), "prompt".into()]], false)?;
        let rows: Vec<Vec<String>> = captions
            .iter()
            .map(|(name, caption)| vec![name.clone(), caption.clone()])
            .collect();
        write_records(&mut out, &rows, false)?;
        counts.added = rows.len();
        return Ok((out, counts));
    };
    let new_rows: Vec<Vec<String>> = captions
        .iter()
        .filter(|(name, _)| !existing.contains(name))
        .map(|(name, caption)| existing.row_for(name, caption))
        .collect();
    counts.added = new_rows.len();
    if !overwrite {
        counts.kept = existing.row_count();
        let mut out = existing.bytes.clone();
        if !out.is_empty() && !out.ends_with(b"\n") && !out.ends_with(b"\r") {
            out.extend_from_slice(if existing.crlf { b"\r\n" } else { b"\n" });
        }
        write_records(&mut out, &new_rows, existing.crlf)?;
        return Ok((out, counts));
    }
    // Rewrite every record, replacing the captions of this run's images.
    let body = existing.bytes.strip_prefix(BOM).unwrap_or(&existing.bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let mut records: Vec<Vec<String>> = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| {
            DatasetError::Invalid(format!("the existing metadata cannot be re-read: {e}"))
        })?;
        let mut fields: Vec<String> = record.iter().map(str::to_string).collect();
        if i > 0 {
            let name = fields
                .get(existing.file_index)
                .and_then(|f| normalize_name(f).ok());
            match name.and_then(|n| captions.get(&n)) {
                Some(caption) => {
                    if fields.len() <= existing.caption_index {
                        fields.resize(existing.caption_index + 1, String::new());
                    }
                    fields[existing.caption_index] = caption.clone();
                    counts.replaced += 1;
                }
                None => counts.kept += 1,
            }
        }
        records.push(fields);
    }
    records.extend(new_rows);
    let mut out = Vec::new();
    if existing.bytes.starts_with(BOM) {
        out.extend_from_slice(BOM);
    }
    write_records(&mut out, &records, existing.crlf)?;
    Ok((out, counts))
}

impl ExistingMetadata {
    /// A new record in this file's column layout.
    fn row_for(&self, name: &str, caption: &str) -> Vec<String> {
        let mut fields = vec![String::new(); self.header.len().max(2)];
        fields[self.file_index] = name.to_string();
        fields[self.caption_index] = caption.to_string();
        fields
    }
}

fn write_records(out: &mut Vec<u8>, records: &[Vec<String>], crlf: bool) -> Result<()> {
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .terminator(if crlf {
            csv::Terminator::CRLF
        } else {
            csv::Terminator::Any(b'\n')
        })
        .from_writer(Vec::new());
    for record in records {
        writer.write_record(record).map_err(csv_error)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| DatasetError::Invalid(format!("cannot write the CSV text: {e}")))?;
    out.extend_from_slice(&bytes);
    Ok(())
}

fn csv_error(e: csv::Error) -> Error {
    DatasetError::Invalid(format!("cannot write the CSV text: {e}")).into()
}

/// Checks that `text` is read by `train` with every caption of `captions` that must be there
/// (all of them with `overwrite`; otherwise those of images that had no row).
pub fn verify(
    text: &[u8],
    existing: Option<&ExistingMetadata>,
    captions: &Captions,
    overwrite: bool,
) -> Result<()> {
    let metadata = parse_metadata(text).map_err(|m| {
        DatasetError::Invalid(format!("internal error: the metadata about to be written does not parse ({m}); nothing was written"))
    })?;
    let found: BTreeMap<String, String> = metadata
        .rows
        .iter()
        .filter_map(|r| {
            normalize_name(&r.file_name)
                .ok()
                .map(|n| (n, r.caption.clone()))
        })
        .collect();
    for (name, caption) in captions {
        let must_match = overwrite || existing.is_none_or(|e| !e.contains(name));
        if must_match && found.get(name) != Some(&caption.trim().to_string()) {
            return Err(DatasetError::Invalid(format!(
                "internal error: the metadata about to be written does not read back `{name}` with its caption; nothing was written"
            ))
            .into());
        }
    }
    if !metadata.problems.is_empty() {
        return Err(DatasetError::Invalid(format!(
            "internal error: the metadata about to be written has unreadable rows ({:?}); nothing was written",
            metadata.problems
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captions(items: &[(&str, &str)]) -> Captions {
        items
            .iter()
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect()
    }

    fn existing(text: &[u8]) -> ExistingMetadata {
        ExistingMetadata::parse(text.to_vec(), "m.csv")
            .expect("parses")
            .expect("not empty")
    }

    fn rows(text: &[u8]) -> Vec<(String, String)> {
        parse_metadata(text)
            .expect("parses")
            .rows
            .into_iter()
            .map(|r| (r.file_name, r.caption))
            .collect()
    }

    #[test]
    fn a_new_file_has_our_header_and_quotes_commas_and_quotes() -> Result<()> {
        let c = captions(&[
            ("b.png", "neon city, night"),
            ("a.png", "a \"quoted\" word"),
            ("sub/c.png", "plain"),
        ]);
        let (text, counts) = merged_text(None, &c, false)?;
        assert_eq!(
            String::from_utf8_lossy(&text),
            "filename,prompt\na.png,\"a \"\"quoted\"\" word\"\nb.png,\"neon city, night\"\nsub/c.png,plain\n"
        );
        assert_eq!(counts.added, 3);
        verify(&text, None, &c, false)?;
        Ok(())
    }

    #[test]
    fn existing_rows_are_kept_byte_for_byte_and_new_ones_appended() -> Result<()> {
        let original = b"\xEF\xBB\xBFfile_name , Text,notes\r\n\"a.png\",\"my own, edit\",x\r\nb.png,,\r\ngone.png,old,y";
        let e = existing(original);
        assert!(e.contains("a.png") && e.contains("gone.png"));
        let c = captions(&[
            ("a.png", "generated"),
            ("b.png", "generated b"),
            ("c.png", "new, one"),
        ]);
        let (text, counts) = merged_text(Some(&e), &c, false)?;
        assert!(text.starts_with(original), "the old bytes are a prefix");
        assert_eq!(&text[original.len()..], b"\r\nc.png,\"new, one\",\r\n");
        assert_eq!(
            counts,
            MergeCounts {
                added: 1,
                replaced: 0,
                kept: 3
            }
        );
        assert_eq!(
            rows(&text),
            [
                ("a.png".into(), "my own, edit".into()),
                ("b.png".into(), String::new()),
                ("gone.png".into(), "old".into()),
                ("c.png".into(), "new, one".into())
            ]
        );
        verify(&text, Some(&e), &c, false)?;
        let images: HashSet<String> = ["a.png", "b.png", "c.png"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let warnings = e.warnings(&images);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("row 3") && warnings[0].contains("empty"));
        assert!(warnings[1].contains("row 4") && warnings[1].contains("gone.png"));
        Ok(())
    }

    #[test]
    fn overwrite_replaces_only_this_runs_captions_and_keeps_the_layout() -> Result<()> {
        let original = b"\xEF\xBB\xBFid,file_name,text\r\n1,a.png,\"hand, edit\"\r\n2,./sub\\b.png,old\r\n3,keep.png,mine\r\n";
        let e = existing(original);
        assert!(e.contains("sub/b.png"));
        let c = captions(&[("a.png", "new a"), ("sub/b.png", "new, b"), ("z.png", "z")]);
        let (text, counts) = merged_text(Some(&e), &c, true)?;
        assert_eq!(
            String::from_utf8_lossy(&text),
            "\u{feff}id,file_name,text\r\n1,a.png,new a\r\n2,./sub\\b.png,\"new, b\"\r\n3,keep.png,mine\r\n,z.png,z\r\n"
        );
        assert_eq!(
            counts,
            MergeCounts {
                added: 1,
                replaced: 2,
                kept: 1
            }
        );
        verify(&text, Some(&e), &c, true)?;
        Ok(())
    }

    #[test]
    fn header_only_and_empty_files() -> Result<()> {
        assert!(ExistingMetadata::parse(b"".to_vec(), "m.csv")?.is_none());
        assert!(ExistingMetadata::parse(b"\xEF\xBB\xBF \n".to_vec(), "m.csv")?.is_none());
        let e = existing(b"filename,prompt\n");
        assert_eq!(e.row_count(), 0);
        let c = captions(&[("a.png", "x")]);
        let (text, _) = merged_text(Some(&e), &c, false)?;
        assert_eq!(text, b"filename,prompt\na.png,x\n");
        Ok(())
    }

    #[test]
    fn files_train_would_refuse_are_not_touched() {
        for (text, needle) in [
            (
                &b"name,caption\na.png,x\n"[..],
                "does not name a file-name column",
            ),
            (&b"prompt,filename\nx,extra,a.png\n"[..], "row 2"),
            (&b"filename,prompt\na.png,\xFF\n"[..], "UTF-8"),
        ] {
            let err = ExistingMetadata::parse(text.to_vec(), "data/m.csv")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("data/m.csv") && err.contains(needle) && err.contains("not changed"),
                "{err}"
            );
        }
    }
}
