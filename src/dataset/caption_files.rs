//! Captions from text files beside the images (`city_01.png` → `city_01.txt`), the kohya way of
//! captioning, used when no `metadata_path` is given.

use std::path::{Path, PathBuf};

/// The caption file of an image: the image path with its extension replaced by `extension`
/// (`.txt`; a missing leading dot is added).
pub fn caption_path(image: &Path, extension: &str) -> PathBuf {
    let extension = extension.trim_start_matches('.');
    image.with_extension(extension)
}

/// The relative name of the caption file of a relative image name, for messages.
pub fn caption_name(image_name: &str, extension: &str) -> String {
    let extension = extension.trim_start_matches('.');
    let file_start = image_name.rfind('/').map_or(0, |i| i + 1);
    let stem_end = image_name[file_start..]
        .rfind('.')
        .filter(|&i| i > 0)
        .map_or(image_name.len(), |i| file_start + i);
    format!("{}.{extension}", &image_name[..stem_end])
}

/// What a caption file says.
#[derive(Debug, Clone, PartialEq)]
pub enum CaptionText {
    /// The caption (trimmed, first non-empty line).
    Caption { text: String, extra_lines: bool },
    /// The file is missing, unreadable, not UTF-8 or empty; the message says which.
    Problem(String),
}

/// Reads one caption file: UTF-8 with or without BOM; the first non-empty line is the caption
/// (kohya reads only the first line too; `extra_lines` reports whether more followed).
pub fn read_caption(path: &Path, shown_name: &str) -> CaptionText {
    let bytes = match crate::files::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return CaptionText::Problem(format!("no caption file `{shown_name}`"))
        }
        Err(e) => {
            return CaptionText::Problem(format!("caption file `{shown_name}` cannot be read: {e}"))
        }
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let Ok(text) = std::str::from_utf8(bytes) else {
        return CaptionText::Problem(format!(
            "caption file `{shown_name}` is not valid UTF-8; save it as UTF-8"
        ));
    };
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        Some(first) => CaptionText::Caption {
            text: first.to_string(),
            extra_lines: lines.next().is_some(),
        },
        None => CaptionText::Problem(format!(
            "caption file `{shown_name}` is empty; write a caption in it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_names_replace_the_extension() {
        assert_eq!(caption_name("a.png", ".txt"), "a.txt");
        assert_eq!(caption_name("sub/a.b.JPG", "caption"), "sub/a.b.caption");
        assert_eq!(caption_name("sub.d/noext", ".txt"), "sub.d/noext.txt");
        assert_eq!(
            caption_path(Path::new("d/a.png"), ".txt"),
            Path::new("d/a.txt")
        );
    }

    #[test]
    fn reads_first_line_with_bom_and_reports_problems() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, b"\xEF\xBB\xBF\r\n  neon, city \r\nsecond\r\n").unwrap();
        assert_eq!(
            read_caption(&p, "a.txt"),
            CaptionText::Caption {
                text: "neon, city".into(),
                extra_lines: true
            }
        );
        std::fs::write(&p, b" \n\n").unwrap();
        assert!(
            matches!(read_caption(&p, "a.txt"), CaptionText::Problem(m) if m.contains("empty"))
        );
        std::fs::write(&p, b"\xFF\xFE").unwrap();
        assert!(
            matches!(read_caption(&p, "a.txt"), CaptionText::Problem(m) if m.contains("UTF-8"))
        );
        let missing = dir.path().join("b.txt");
        assert!(
            matches!(read_caption(&missing, "b.txt"), CaptionText::Problem(m) if m == "no caption file `b.txt`")
        );
    }
}
