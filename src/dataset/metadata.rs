//! `metadata.csv`: one row per image, a file name and its caption.
//!
//! The header names the columns: `filename,prompt` (ours) or `file_name,text` (the Hugging Face
//! image-folder convention); `caption` is accepted for the caption too, case and surrounding
//! spaces do not matter, other columns are ignored. Fields follow RFC 4180 (commas, quotes and
//! line breaks inside double quotes); the file is UTF-8 with or without a BOM, with CRLF or LF
//! line ends. Rows are numbered as a spreadsheet shows them: the header is row 1.
//!
//! Tag-style captions are full of commas and people write these files by hand, so a row with
//! more fields than the header is read as a caption with unquoted commas when the caption is the
//! last column (the extra fields can be nothing else); the rows read that way are counted for the
//! dry run. When the caption column is not the last, such a row is ambiguous and refused.

use std::path::Path;

use super::DatasetError;

/// Accepted names of the file-name column, in order of preference.
pub const FILE_COLUMNS: [&str; 2] = ["filename", "file_name"];
/// Accepted names of the caption column, in order of preference.
pub const CAPTION_COLUMNS: [&str; 3] = ["prompt", "text", "caption"];

/// One data row as written (the caption trimmed, nothing else checked yet).
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataRow {
    /// Spreadsheet row number (the header is row 1).
    pub row: usize,
    /// The file name exactly as the row writes it.
    pub file_name: String,
    /// The caption with surrounding white space removed (may be empty: checked by the caller).
    pub caption: String,
}

/// The parsed file: which columns were used, the rows, and the rows that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// The header's file-name column as written.
    pub file_column: String,
    /// The header's caption column as written.
    pub caption_column: String,
    /// Other header columns, ignored.
    pub ignored_columns: Vec<String>,
    pub rows: Vec<MetadataRow>,
    /// `(row, message)` for rows that cannot be used at all (bad UTF-8, wrong field count).
    pub problems: Vec<(usize, String)>,
    /// Rows whose caption held unquoted commas: the caption is the last column, so the fields
    /// past it were joined back into it (`img.png,neon city, rain, night`).
    pub rejoined_rows: Vec<usize>,
}

/// Reads and parses a metadata file. Problems with single rows are collected in
/// [`Metadata::problems`]; a missing or empty file, a header without the needed columns, or a
/// header without rows are errors.
pub fn read_metadata(path: &Path) -> Result<Metadata, DatasetError> {
    let bytes = crate::files::read(path).map_err(|e| {
        DatasetError::Invalid(format!(
            "metadata_path `{}` cannot be read: {e}; it should be a CSV file with a header `filename,prompt`",
            path.display()
        ))
    })?;
    parse_metadata(&bytes)
        .map_err(|message| DatasetError::Invalid(format!("{}: {message}", path.display())))
}

/// Line breaks in `bytes`: LF, CRLF and lone CR each count once.
fn line_breaks(bytes: &[u8]) -> usize {
    let lf = bytes.iter().filter(|&&b| b == b'\n').count();
    let lone_cr = bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\r' && bytes.get(i + 1) != Some(&b'\n'))
        .count();
    lf + lone_cr
}

/// Parses metadata from bytes; the error is a message without the file name.
pub fn parse_metadata(bytes: &[u8]) -> Result<Metadata, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);

    let mut records = Vec::new();
    // Spreadsheet rows: the line breaks between the starts of two records, less those inside
    // the earlier record's quoted fields (a spreadsheet shows a blank line as an empty row, and
    // a caption spanning lines as one row).
    let mut row = 1usize;
    let mut previous: Option<(u64, usize)> = None; // (start byte, breaks inside its fields)
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                // The reader reports a record's start before the line ends that precede it.
                let reported = record.position().map_or(0, |p| p.byte()) as usize;
                let start = bytes
                    .get(reported..)
                    .and_then(|rest| rest.iter().position(|&b| b != b'\r' && b != b'\n'))
                    .map_or(reported, |skip| reported + skip) as u64;
                let (from, inside) = previous.unwrap_or((0, 0));
                let between = bytes.get(from as usize..start as usize).unwrap_or_default();
                row += line_breaks(between).saturating_sub(inside);
                let inside = record.iter().map(line_breaks).sum();
                previous = Some((start, inside));
                records.push((row, record.clone()));
            }
            Err(e) => return Err(format!("not a readable CSV file: {e}")),
        }
    }

    let Some((_, header)) = records.first() else {
        return Err(
            "the file is empty; write a header line `filename,prompt` and one row per image"
                .to_string(),
        );
    };
    let header: Vec<String> = header
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect();
    let find = |names: &[&str]| {
        names
            .iter()
            .find_map(|want| header.iter().position(|h| h.eq_ignore_ascii_case(want)))
    };
    let shown_header = header.join(",");
    let file_index = find(&FILE_COLUMNS).ok_or_else(|| {
        format!(
            "the header (row 1: `{shown_header}`) has no file-name column; the first line must name the columns, e.g. `filename,prompt` (or `file_name,text`)"
        )
    })?;
    let caption_index = find(&CAPTION_COLUMNS).ok_or_else(|| {
        format!(
            "the header (row 1: `{shown_header}`) has no caption column; name it `prompt` (or `text`, `caption`), e.g. `filename,prompt`"
        )
    })?;
    if records.len() == 1 {
        return Err(format!(
            "only a header (`{shown_header}`), no rows; add one row per image: `name.png,\"a caption\"`"
        ));
    }

    let mut metadata = Metadata {
        file_column: header[file_index].clone(),
        caption_column: header[caption_index].clone(),
        ignored_columns: header
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != file_index && *i != caption_index)
            .map(|(_, h)| h.clone())
            .collect(),
        rows: Vec::new(),
        problems: Vec::new(),
        rejoined_rows: Vec::new(),
    };
    let needed = file_index.max(caption_index) + 1;
    let caption_is_last = caption_index + 1 == header.len();
    for (row, record) in &records[1..] {
        let row = *row;
        if record.len() > header.len() && caption_is_last {
            let file_name = std::str::from_utf8(&record[file_index]);
            let parts: Result<Vec<&str>, _> = record
                .iter()
                .skip(caption_index)
                .map(std::str::from_utf8)
                .collect();
            match (file_name, parts) {
                (Ok(file_name), Ok(parts)) => {
                    metadata.rows.push(MetadataRow {
                        row,
                        file_name: file_name.to_string(),
                        caption: parts.join(",").trim().to_string(),
                    });
                    metadata.rejoined_rows.push(row);
                }
                _ => metadata.problems.push((row, NOT_UTF8.to_string())),
            }
            continue;
        }
        if record.len() != header.len() {
            let hint = if record.len() > header.len() {
                "; the caption column is not the last, so a caption containing commas must be \
                 in double quotes: `a.png,\"neon, city\"`"
            } else {
                ""
            };
            if record.len() < needed || record.len() > header.len() {
                metadata.problems.push((
                    row,
                    format!(
                        "{} field(s), but the header has {} column(s){hint}",
                        record.len(),
                        header.len()
                    ),
                ));
                continue;
            }
        }
        let field = |i: usize| std::str::from_utf8(&record[i]).map(str::to_string);
        match (field(file_index), field(caption_index)) {
            (Ok(file_name), Ok(caption)) => metadata.rows.push(MetadataRow {
                row,
                file_name,
                caption: caption.trim().to_string(),
            }),
            _ => metadata.problems.push((row, NOT_UTF8.to_string())),
        }
    }
    Ok(metadata)
}

const NOT_UTF8: &str =
    "not valid UTF-8; save the file as UTF-8 (\"CSV UTF-8\" in spreadsheet programs)";

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(m: &Metadata) -> Vec<(usize, &str, &str)> {
        m.rows
            .iter()
            .map(|r| (r.row, r.file_name.as_str(), r.caption.as_str()))
            .collect()
    }

    #[test]
    fn quoted_commas_and_quotes() {
        let m = parse_metadata(
            b"filename,prompt\na.png,\"neon, city, night\"\nb.png,\"a \"\"quoted\"\" word\"\n",
        )
        .unwrap();
        assert_eq!(
            rows(&m),
            [
                (2, "a.png", "neon, city, night"),
                (3, "b.png", "a \"quoted\" word")
            ]
        );
        assert!(m.problems.is_empty());
    }

    #[test]
    fn bom_and_crlf() {
        let m =
            parse_metadata(b"\xEF\xBB\xBFfilename,prompt\r\na.png,one\r\nb.png,two\r\n").unwrap();
        assert_eq!(m.file_column, "filename");
        assert_eq!(rows(&m), [(2, "a.png", "one"), (3, "b.png", "two")]);
    }

    #[test]
    fn hugging_face_header_and_extra_columns() {
        let m = parse_metadata(b"id,file_name,score,text\n1,a.png,0.5,hello\n").unwrap();
        assert_eq!(
            (m.file_column.as_str(), m.caption_column.as_str()),
            ("file_name", "text")
        );
        assert_eq!(m.ignored_columns, ["id", "score"]);
        assert_eq!(rows(&m), [(2, "a.png", "hello")]);
    }

    #[test]
    fn header_case_and_spaces_do_not_matter() {
        let m = parse_metadata(b" FileName , Prompt \na.png, hi \n").unwrap();
        assert_eq!(rows(&m), [(2, "a.png", "hi")]);
    }

    #[test]
    fn row_numbers_count_spreadsheet_rows() {
        // A caption spanning two lines is one row; a blank line is a row in a spreadsheet.
        let m =
            parse_metadata(b"filename,prompt\na.png,\"two\nlines\"\n\nb.png,x\nc.png,y\n").unwrap();
        assert_eq!(
            rows(&m),
            [
                (2, "a.png", "two\nlines"),
                (4, "b.png", "x"),
                (5, "c.png", "y")
            ]
        );
        assert!(m.problems.is_empty());
    }

    #[test]
    fn unquoted_commas_in_a_last_caption_column_are_the_caption_s_own() {
        let m = parse_metadata(
            b"filename,prompt\nimg01.jpg,neon city, rain, night\nimg02.jpg,\"quoted, tags\"\nimg03.jpg,a,\"b, c\",d\n",
        )
        .unwrap();
        assert_eq!(
            rows(&m),
            [
                (2, "img01.jpg", "neon city, rain, night"),
                (3, "img02.jpg", "quoted, tags"),
                (4, "img03.jpg", "a,b, c,d"),
            ]
        );
        assert_eq!(m.rejoined_rows, [2, 4]);
        assert!(m.problems.is_empty());
        let m = parse_metadata(b"id,file_name,text\n1,a.png,one, two\n").unwrap();
        assert_eq!(rows(&m), [(2, "a.png", "one, two")]);
        let m = parse_metadata(b"filename,prompt\na.png,x,\xFF\n").unwrap();
        assert!(m.rows.is_empty() && m.problems[0].1.contains("UTF-8"));
    }

    #[test]
    fn extra_fields_are_refused_when_the_caption_is_not_the_last_column() {
        let m = parse_metadata(b"prompt,filename\nneon city, rain,a.png\n").unwrap();
        assert!(m.rows.is_empty());
        assert_eq!(m.problems.len(), 1);
        assert_eq!(m.problems[0].0, 2);
        assert!(
            m.problems[0].1.contains("double quotes") && m.problems[0].1.contains("not the last"),
            "{}",
            m.problems[0].1
        );
    }

    #[test]
    fn row_numbers_with_crlf_leading_blank_lines_and_lone_cr() {
        let m = parse_metadata(
            b"\r\nfilename,prompt\r\na.png,\"x\r\ny\r\nz\"\r\n\r\n\r\nb.png,w\r\nc.png,v",
        )
        .unwrap();
        let numbers: Vec<usize> = m.rows.iter().map(|r| r.row).collect();
        // header at row 2 (after a blank line), a.png at 3 (spanning 3 lines), two blank rows.
        assert_eq!(numbers, [3, 6, 7]);
        let m = parse_metadata(b"filename,prompt\ra.png,x\rb.png,y\r").unwrap();
        let numbers: Vec<usize> = m.rows.iter().map(|r| r.row).collect();
        assert_eq!(numbers, [2, 3]);
    }

    #[test]
    fn header_only_missing_columns_and_empty_file() {
        let e = parse_metadata(b"filename,prompt\n").unwrap_err();
        assert!(e.contains("only a header"), "{e}");
        let e = parse_metadata(b"filename,prompt\r\n\r\n").unwrap_err();
        assert!(e.contains("only a header"), "{e}");
        let e = parse_metadata(b"filename,tags\na.png,x\n").unwrap_err();
        assert!(e.contains("no caption column"), "{e}");
        let e = parse_metadata(b"a.png,a cat\n").unwrap_err();
        assert!(
            e.contains("no file-name column") && e.contains("a.png,a cat"),
            "{e}"
        );
        let e = parse_metadata(b"").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_metadata(b"\xEF\xBB\xBF").unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn short_rows_and_bad_utf8_are_row_problems() {
        let m = parse_metadata(b"filename,prompt\na.png\nb.png,\xFF\xFE\nc.png,ok\n").unwrap();
        assert_eq!(rows(&m), [(4, "c.png", "ok")]);
        let problems: Vec<usize> = m.problems.iter().map(|p| p.0).collect();
        assert_eq!(problems, [2, 3]);
        assert!(m.problems[1].1.contains("UTF-8"));
    }

    #[test]
    fn rows_may_omit_trailing_ignored_columns() {
        let m = parse_metadata(b"filename,prompt,notes\na.png,x\n").unwrap();
        assert_eq!(rows(&m), [(2, "a.png", "x")]);
        assert!(m.problems.is_empty());
    }
}
