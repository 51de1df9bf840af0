//! The check before training: every row and file of the dataset is validated and every image
//! decoded (in parallel), and all problems are gathered so the user fixes them in one go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::caption_files::{caption_name, caption_path, read_caption, CaptionText};
use super::decode::{decode_oriented_bytes, read_image_file};
use super::listing::{normalize_name, ImageFolder, IMAGE_EXTENSIONS};
use super::metadata::read_metadata;
use super::{CaptionSource, DatasetError, DatasetSpec};

/// How many names a warning lists before "and N more".
const NAMES_SHOWN: usize = 5;

/// An image that passed the checks, before bucketing.
#[derive(Debug, Clone)]
pub struct CheckedImage {
    pub name: String,
    pub path: PathBuf,
    pub row: Option<usize>,
    pub caption: String,
    /// Size after EXIF orientation.
    pub size: (u32, u32),
    /// SHA-256 of the file's bytes, hex.
    pub digest: String,
}

/// The result of a successful check.
#[derive(Debug)]
pub struct Checked {
    pub images: Vec<CheckedImage>,
    pub source: CaptionSource,
    pub warnings: Vec<String>,
}

/// What decoding an image file found: its size after EXIF orientation and the SHA-256 of its
/// bytes.
type Decoded = ((u32, u32), String);

/// An image to decode, with where it came from (a CSV row or a caption file).
struct Candidate {
    /// Sort key of messages: the CSV row, or the position in the sorted folder listing.
    order: usize,
    /// `row 7: ` or `` `sub/a.png`: ``.
    label: String,
    name: String,
    path: PathBuf,
    row: Option<usize>,
    caption: String,
}

/// Checks the dataset `spec` describes. Every problem found is listed in the error.
pub fn check(spec: &DatasetSpec) -> Result<Checked, DatasetError> {
    let folder = ImageFolder::scan(&spec.train_data_dir)?;
    if folder.images().is_empty() {
        return Err(DatasetError::Invalid(format!(
            "train_data_dir `{}` contains no images ({}); put the training images there",
            spec.train_data_dir.display(),
            IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
        )));
    }
    let mut warnings = Vec::new();
    let mut problems: Vec<(usize, String)> = Vec::new();
    let (candidates, source, origin, hint) = match &spec.metadata_path {
        Some(path) => {
            let (candidates, source) = from_metadata(path, &folder, &mut problems, &mut warnings)?;
            (candidates, source, path.display().to_string(), None)
        }
        None => {
            let candidates = from_caption_files(
                &folder,
                &spec.caption_extension,
                &mut problems,
                &mut warnings,
            );
            let csv = spec.train_data_dir.join("metadata.csv");
            let no_captions = problems.len() == candidates.len();
            let hint = (csv.is_file() && no_captions).then(|| {
                format!(
                    "`{}` exists but metadata_path is not set; set `metadata_path` to read captions from it",
                    csv.display()
                )
            });
            let extension = format!(".{}", spec.caption_extension.trim_start_matches('.'));
            let origin = format!(
                "train_data_dir `{}` (captions from *{extension} files)",
                spec.train_data_dir.display()
            );
            (
                candidates,
                CaptionSource::CaptionFiles { extension },
                origin,
                hint,
            )
        }
    };

    let decoded: Vec<Result<Decoded, String>> = candidates
        .par_iter()
        .map(|c| {
            let bytes = read_image_file(&c.path)?;
            let image = decode_oriented_bytes(&bytes)?;
            Ok(((image.width(), image.height()), sha256_hex(&bytes)))
        })
        .collect();
    let listed = candidates.len();
    let mut images = Vec::with_capacity(listed);
    let mut skipped = Vec::new();
    for (candidate, result) in candidates.into_iter().zip(decoded) {
        match result {
            Ok(found) => images.push((candidate.order, candidate, found)),
            Err(reason) => {
                let message = format!("{}`{}` {reason}", candidate.label, candidate.name);
                if spec.skip_invalid_images {
                    skipped.push(message);
                } else {
                    problems.push((candidate.order, message));
                }
            }
        }
    }

    if !problems.is_empty() {
        problems.sort_by_key(|(order, _)| *order);
        return Err(DatasetError::Problems {
            origin,
            problems: problems.into_iter().map(|(_, m)| m).collect(),
            hint,
        });
    }
    if !skipped.is_empty() {
        if images.is_empty() {
            return Err(DatasetError::Problems {
                origin,
                problems: skipped,
                hint: Some(
                    "skip_invalid_images is on, but none of the images can be decoded: nothing is left to train on"
                        .to_string(),
                ),
            });
        }
        warnings.push(format!(
            "SKIPPED {} of {listed} images (skip_invalid_images: true); training goes on without them:\n  {}",
            skipped.len(),
            skipped.join("\n  ")
        ));
    }
    images.sort_by_key(|(order, _, _)| *order);
    let images = images
        .into_iter()
        .map(|(_, c, (size, digest))| CheckedImage {
            name: c.name,
            path: c.path,
            row: c.row,
            caption: c.caption,
            size,
            digest,
        })
        .collect();
    Ok(Checked {
        images,
        source,
        warnings,
    })
}

/// The rows of `metadata.csv`, checked against the folder.
fn from_metadata(
    path: &Path,
    folder: &ImageFolder,
    problems: &mut Vec<(usize, String)>,
    warnings: &mut Vec<String>,
) -> Result<(Vec<Candidate>, CaptionSource), DatasetError> {
    let metadata = read_metadata(path)?;
    problems.extend(
        metadata
            .problems
            .iter()
            .map(|(row, m)| (*row, format!("row {row}: {m}"))),
    );
    let mut first_row: HashMap<String, usize> = HashMap::new();
    let mut candidates = Vec::new();
    for row in &metadata.rows {
        let n = row.row;
        let name = match normalize_name(&row.file_name) {
            Ok(name) if name.is_empty() => {
                problems.push((n, format!("row {n}: no file name")));
                continue;
            }
            Ok(name) => name,
            Err(message) => {
                problems.push((n, format!("row {n}: {message}")));
                continue;
            }
        };
        if let Some(first) = first_row.get(&name) {
            problems.push((
                n,
                format!(
                    "row {n}: `{name}` is listed again (first in row {first}); list each image once (use `repeats` to show images more often)"
                ),
            ));
            continue;
        }
        first_row.insert(name.clone(), n);
        if row.caption.is_empty() {
            problems.push((
                n,
                format!("row {n}: the caption of `{name}` is empty; write one"),
            ));
        }
        let image_path = folder.path_of(&name);
        if let Ok(metadata) = std::fs::metadata(&image_path) {
            if !metadata.is_file() {
                problems.push((
                    n,
                    format!(
                        "row {n}: `{name}` is {}, not an image file",
                        crate::files::kind_of(&metadata)
                    ),
                ));
                continue;
            }
        }
        if !image_path.is_file() {
            let message = match folder.suggest(&name) {
                Some(found) => {
                    format!("row {n}: `{name}` not found; did you mean `{found}`?")
                }
                None => format!("row {n}: `{name}` not found in train_data_dir"),
            };
            problems.push((n, message));
            continue;
        }
        candidates.push(Candidate {
            order: n,
            label: format!("row {n}: "),
            name,
            path: image_path,
            row: Some(n),
            caption: row.caption.clone(),
        });
    }

    let unlisted: Vec<&String> = folder
        .images()
        .iter()
        .filter(|i| !first_row.contains_key(*i))
        .collect();
    if !unlisted.is_empty() {
        let file = path
            .file_name()
            .map_or("the metadata".into(), |f| f.to_string_lossy());
        warnings.push(format!(
            "{} image(s) in train_data_dir are not listed in {file} and will not be used: {}",
            unlisted.len(),
            preview(&unlisted)
        ));
    }
    if !metadata.rejoined_rows.is_empty() {
        let rows = &metadata.rejoined_rows;
        let mut shown: Vec<String> = rows
            .iter()
            .take(NAMES_SHOWN)
            .map(usize::to_string)
            .collect();
        if rows.len() > NAMES_SHOWN {
            shown.push(format!("and {} more", rows.len() - NAMES_SHOWN));
        }
        warnings.push(format!(
            "{} row(s) of {} have commas outside double quotes in the caption (rows {}); the \
             caption is the last column, so each was read as one caption with its commas",
            rows.len(),
            path.display(),
            shown.join(", ")
        ));
    }
    let source = CaptionSource::Metadata {
        path: path.to_path_buf(),
        file_column: metadata.file_column,
        caption_column: metadata.caption_column,
        ignored_columns: metadata.ignored_columns,
    };
    Ok((candidates, source))
}

/// Every image of the folder with the caption file beside it.
fn from_caption_files(
    folder: &ImageFolder,
    extension: &str,
    problems: &mut Vec<(usize, String)>,
    warnings: &mut Vec<String>,
) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    let mut several_lines = Vec::new();
    for (order, name) in folder.images().iter().enumerate() {
        let path = folder.path_of(name);
        let shown = caption_name(name, extension);
        // An image without a usable caption is still decoded, so that all problems show at once.
        let caption = match read_caption(&caption_path(&path, extension), &shown) {
            CaptionText::Caption { text, extra_lines } => {
                if extra_lines {
                    several_lines.push(shown);
                }
                text
            }
            CaptionText::Problem(message) => {
                problems.push((order, format!("`{name}`: {message}")));
                String::new()
            }
        };
        candidates.push(Candidate {
            order,
            label: String::new(),
            name: name.clone(),
            path,
            row: None,
            caption,
        });
    }
    if !several_lines.is_empty() {
        let shown: Vec<&String> = several_lines.iter().collect();
        warnings.push(format!(
            "{} caption file(s) have more than one line; only the first line is used: {}",
            several_lines.len(),
            preview(&shown)
        ));
    }
    candidates
}

/// The SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `` `a`, `b`, `c` and 4 more ``.
fn preview(names: &[&String]) -> String {
    let mut text = names
        .iter()
        .take(NAMES_SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        text.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    text
}
