//! The phrase lists CLIP ranks for each picture (`tools/labels/*.txt`).
//!
//! A list is a text file, one phrase per line; blank lines and lines starting with `#` are
//! ignored. `subjects.txt` (what the picture shows) leads the caption; the other lists add
//! flavour in a fixed order: media, styles, lighting, colours, moods, quality, then any other
//! `*.txt` of a `--vocab` folder in name order. The lists of `tools/labels/` are compiled into
//! the binary, so `auto_label` works from anywhere.

use std::path::Path;

use crate::dataset::DatasetError;
use crate::Result;

/// The file stem of the list that leads the caption.
pub const SUBJECTS: &str = "subjects";
/// The flavour lists, in the order their phrases follow the subject.
pub const FLAVOUR_ORDER: [&str; 6] = ["media", "styles", "lighting", "colours", "moods", "quality"];

/// The lists of `tools/labels/`, compiled in.
const BUILT_IN: [(&str, &str); 7] = [
    (SUBJECTS, include_str!("../../tools/labels/subjects.txt")),
    ("media", include_str!("../../tools/labels/media.txt")),
    ("styles", include_str!("../../tools/labels/styles.txt")),
    ("lighting", include_str!("../../tools/labels/lighting.txt")),
    ("colours", include_str!("../../tools/labels/colours.txt")),
    ("moods", include_str!("../../tools/labels/moods.txt")),
    ("quality", include_str!("../../tools/labels/quality.txt")),
];

/// One named list of phrases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhraseList {
    /// The file stem (`lighting`).
    pub name: String,
    pub phrases: Vec<String>,
}

/// The subjects and the flavour lists, in caption order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocabulary {
    pub subjects: PhraseList,
    pub flavours: Vec<PhraseList>,
}

impl Vocabulary {
    /// The lists compiled from `tools/labels/`.
    pub fn built_in() -> Result<Self> {
        let lists = BUILT_IN
            .iter()
            .map(|(name, text)| parse_list(name, text, &format!("tools/labels/{name}.txt")))
            .collect::<Result<Vec<_>>>()?;
        Self::from_lists(lists, "tools/labels")
    }

    /// Reads every `*.txt` of `dir`; `subjects.txt` is required.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let invalid = |message: String| DatasetError::Invalid(message);
        let entries = std::fs::read_dir(dir).map_err(|e| {
            invalid(format!(
                "--vocab `{}` cannot be read as a folder: {e}; point it at a folder of phrase lists like tools/labels",
                dir.display()
            ))
        })?;
        let mut files: Vec<(String, std::path::PathBuf)> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "txt"))
            .filter_map(|path| {
                let stem = path.file_stem()?.to_str()?.to_string();
                Some((stem, path))
            })
            .collect();
        files.sort();
        let lists = files
            .iter()
            .map(|(name, path)| {
                let bytes = std::fs::read(path)
                    .map_err(|e| invalid(format!("{}: cannot be read: {e}", path.display())))?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    invalid(format!(
                        "{}: not valid UTF-8; save it as UTF-8",
                        path.display()
                    ))
                })?;
                parse_list(name, &text, &path.display().to_string())
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_lists(lists, &dir.display().to_string())
    }

    /// Orders named lists: subjects first, then [`FLAVOUR_ORDER`], then the rest by name.
    fn from_lists(mut lists: Vec<PhraseList>, origin: &str) -> Result<Self> {
        let Some(at) = lists.iter().position(|l| l.name == SUBJECTS) else {
            return Err(DatasetError::Invalid(format!(
                "{origin}: no `{SUBJECTS}.txt`; the caption starts with the best phrase of that list, so it is required"
            ))
            .into());
        };
        let subjects = lists.remove(at);
        lists.sort_by_key(|l| {
            let rank = FLAVOUR_ORDER
                .iter()
                .position(|n| *n == l.name)
                .unwrap_or(FLAVOUR_ORDER.len());
            (rank, l.name.clone())
        });
        Ok(Vocabulary {
            subjects,
            flavours: lists,
        })
    }

    /// Every list, subjects first.
    pub fn lists(&self) -> impl Iterator<Item = &PhraseList> {
        std::iter::once(&self.subjects).chain(&self.flavours)
    }

    /// Every phrase of every list, subjects first, in list order (the rows of the embedding
    /// matrix).
    pub fn all_phrases(&self) -> Vec<String> {
        self.lists()
            .flat_map(|l| l.phrases.iter().cloned())
            .collect()
    }
}

/// Parses one list; `origin` names the file in errors (with the line number).
fn parse_list(name: &str, text: &str, origin: &str) -> Result<PhraseList> {
    let mut phrases: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let phrase = line.trim().trim_start_matches('\u{feff}').trim();
        if phrase.is_empty() || phrase.starts_with('#') {
            continue;
        }
        if phrase.contains(',') {
            return Err(DatasetError::Invalid(format!(
                "{origin}, line {line_no}: `{phrase}` contains a comma; captions are comma-separated tags, so write one phrase per line without commas"
            ))
            .into());
        }
        let phrase = phrase.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some(first) = phrases.iter().position(|p| p.eq_ignore_ascii_case(&phrase)) {
            return Err(DatasetError::Invalid(format!(
                "{origin}, line {line_no}: `{phrase}` is already in the list (`{}`); remove the duplicate",
                phrases[first]
            ))
            .into());
        }
        phrases.push(phrase);
    }
    if phrases.is_empty() {
        return Err(DatasetError::Invalid(format!(
            "{origin}: the list `{name}` has no phrases; write one per line (or remove the file)"
        ))
        .into());
    }
    Ok(PhraseList {
        name: name.to_string(),
        phrases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_lists_are_a_few_hundred_phrases_in_caption_order() -> Result<()> {
        let v = Vocabulary::built_in()?;
        let names: Vec<&str> = v.lists().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["subjects", "media", "styles", "lighting", "colours", "moods", "quality"]
        );
        let total = v.all_phrases().len();
        assert!((250..=600).contains(&total), "{total} phrases");
        assert!(v.subjects.phrases.len() >= 100);
        assert!(v
            .subjects
            .phrases
            .iter()
            .any(|p| p == "neon-lit city street at night"));
        Ok(())
    }

    #[test]
    fn comments_blank_lines_and_spacing_are_ignored() -> Result<()> {
        let list = parse_list(
            "moods",
            "\u{feff}# a comment\n\n  quiet   night \r\n#another\nwarm glow\n",
            "m.txt",
        )?;
        assert_eq!(list.phrases, ["quiet night", "warm glow"]);
        Ok(())
    }

    #[test]
    fn commas_duplicates_and_empty_lists_are_refused_with_the_line() {
        let err = parse_list("x", "a\nneon, rain\n", "x.txt")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.txt, line 2") && err.contains("comma"),
            "{err}"
        );
        let err = parse_list("x", "Neon\n# c\nneon\n", "x.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3") && err.contains("already"), "{err}");
        let err = parse_list("x", "# only comments\n", "x.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no phrases"), "{err}");
    }

    #[test]
    fn a_folder_needs_subjects_and_orders_extra_lists_last() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("zebra.txt"), "stripes\n").expect("write");
        std::fs::write(dir.path().join("lighting.txt"), "rim light\n").expect("write");
        std::fs::write(dir.path().join("notes.md"), "not a list\n").expect("write");
        let err = Vocabulary::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("subjects.txt") && err.contains("required"),
            "{err}"
        );
        std::fs::write(dir.path().join("subjects.txt"), "a cat\n").expect("write");
        std::fs::write(dir.path().join("artists.txt"), "someone\n").expect("write");
        let v = Vocabulary::from_dir(dir.path())?;
        let names: Vec<&str> = v.lists().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["subjects", "lighting", "artists", "zebra"]);
        assert_eq!(
            v.all_phrases(),
            ["a cat", "rim light", "someone", "stripes"]
        );
        let err = Vocabulary::from_dir(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--vocab"), "{err}");
        Ok(())
    }
}
