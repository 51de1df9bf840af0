//! The image files found in `train_data_dir`: what is there, and what the user probably meant
//! when a name in the metadata does not match any file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::DatasetError;

/// File extensions read as images (lower case, without the dot).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Whether a file name has one of the [`IMAGE_EXTENSIONS`] (any case).
pub fn is_image_name(name: &str) -> bool {
    extension_of(name)
        .is_some_and(|ext| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// The extension of the last path component, without the dot.
fn extension_of(name: &str) -> Option<&str> {
    let file = name.rsplit('/').next().unwrap_or(name);
    let dot = file.rfind('.')?;
    (dot > 0).then(|| &file[dot + 1..])
}

/// `name` without the extension of its last component.
fn without_extension(name: &str) -> &str {
    match extension_of(name) {
        Some(ext) => &name[..name.len() - ext.len() - 1],
        None => name,
    }
}

/// Every image file below a dataset folder, by its path relative to the folder with `/`
/// separators (`sub/city_01.png`). Hidden files and folders (starting with `.`) are skipped, and
/// symbolic links to folders are not followed.
#[derive(Debug, Clone, Default)]
pub struct ImageFolder {
    root: PathBuf,
    images: BTreeSet<String>,
}

impl ImageFolder {
    /// Lists the images below `root`, which must be a folder.
    pub fn scan(root: &Path) -> Result<Self, DatasetError> {
        if !root.is_dir() {
            let what = if root.exists() {
                "is not a folder"
            } else {
                "does not exist"
            };
            return Err(DatasetError::Invalid(format!(
                "train_data_dir `{}` {what}; set `train_data_dir` to the folder holding the training images",
                root.display()
            )));
        }
        let mut images = BTreeSet::new();
        let mut pending = vec![(root.to_path_buf(), String::new())];
        while let Some((dir, prefix)) = pending.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| {
                DatasetError::Invalid(format!("cannot list the folder `{}`: {e}", dir.display()))
            })?;
            for entry in entries.flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let relative = format!("{prefix}{name}");
                if kind.is_dir() {
                    pending.push((entry.path(), format!("{relative}/")));
                } else if is_image_name(&name) && entry.path().is_file() {
                    images.insert(relative);
                }
            }
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            images,
        })
    }

    /// Relative names of all images, sorted.
    pub fn images(&self) -> &BTreeSet<String> {
        &self.images
    }

    /// The path of a relative name (`sub/a.png`) inside the folder.
    pub fn path_of(&self, name: &str) -> PathBuf {
        let mut path = self.root.clone();
        path.extend(name.split('/'));
        path
    }

    /// The image the user most likely meant by a `name` that does not exist: the same name in
    /// another case, else the same name with another image extension, else the same file name
    /// in another folder, else a close spelling in the same folder.
    pub fn suggest(&self, name: &str) -> Option<&str> {
        let lower = name.to_lowercase();
        let find = |matches: &dyn Fn(&str) -> bool| {
            self.images
                .iter()
                .find(|i| matches(&i.to_lowercase()))
                .map(String::as_str)
        };
        let stem = without_extension(&lower);
        let file = file_of(&lower);
        let dir = parent_of(&lower);
        find(&|i| i == lower)
            .or_else(|| find(&|i| without_extension(i) == stem))
            .or_else(|| find(&|i| file_of(i) == file))
            .or_else(|| {
                self.images
                    .iter()
                    .filter(|i| parent_of(&i.to_lowercase()) == dir)
                    .map(|i| {
                        (
                            strsim::normalized_damerau_levenshtein(&i.to_lowercase(), &lower),
                            i,
                        )
                    })
                    .filter(|(score, _)| *score >= 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, i)| i.as_str())
            })
    }
}

/// The last component of a relative name (`a.png` for `sub/a.png`).
fn file_of(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The folder part of a relative name (`sub` for `sub/a.png`, empty for `a.png`).
fn parent_of(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
}

/// A file name as written in the metadata, made comparable with [`ImageFolder`] names:
/// backslashes become `/`, `./` and empty components are dropped. Absolute names and names that
/// climb out of the folder (`..`) are refused with the reason.
pub fn normalize_name(raw: &str) -> Result<String, String> {
    let unified = raw.trim().replace('\\', "/");
    if unified.starts_with('/') || (unified.len() > 1 && unified.as_bytes()[1] == b':') {
        return Err(format!(
            "`{raw}` is an absolute path; file names must be relative to train_data_dir"
        ));
    }
    let mut parts = Vec::new();
    for part in unified.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                "`{raw}` points outside train_data_dir (`..`); file names must be relative to it"
            ))
            }
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(names: &[&str]) -> ImageFolder {
        ImageFolder {
            root: PathBuf::from("data"),
            images: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn image_names_by_extension() {
        assert!(is_image_name("a.PNG"));
        assert!(is_image_name("sub/a.jpeg"));
        assert!(is_image_name("a.webp") && is_image_name("a.bmp") && is_image_name("a.jpg"));
        assert!(!is_image_name("a.txt"));
        assert!(!is_image_name(".png"));
        assert!(!is_image_name("png"));
    }

    #[test]
    fn suggests_case_then_extension_then_spelling() {
        let f = folder(&[
            "city_01.png",
            "sub/night.jpg",
            "tower_12.png",
            "dup.png",
            "sub/deep.png",
        ]);
        assert_eq!(f.suggest("City_01.PNG"), Some("city_01.png"));
        assert_eq!(f.suggest("deep.png"), Some("sub/deep.png"));
        assert_eq!(f.suggest("other/Night.JPG"), Some("sub/night.jpg"));
        assert_eq!(f.suggest("sub/Night.png"), Some("sub/night.jpg"));
        assert_eq!(f.suggest("tower_13.png"), Some("tower_12.png"));
        assert_eq!(f.suggest("completely_else.png"), None);
        // Spelling suggestions stay in the same folder.
        assert_eq!(f.suggest("other/tower_13.png"), None);
    }

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize_name("sub\\a.png").unwrap(), "sub/a.png");
        assert_eq!(normalize_name("./sub//a.png ").unwrap(), "sub/a.png");
        assert!(normalize_name("/abs/a.png")
            .unwrap_err()
            .contains("absolute"));
        assert!(normalize_name("C:\\a.png")
            .unwrap_err()
            .contains("absolute"));
        assert!(normalize_name("../a.png").unwrap_err().contains("outside"));
    }

    #[test]
    fn scan_lists_nested_images_and_skips_hidden() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
        std::fs::create_dir_all(dir.path().join(".cache")).unwrap();
        for name in [
            "a.png",
            "sub/b.JPG",
            "sub/deeper/c.webp",
            "notes.txt",
            ".hidden.png",
            ".cache/d.png",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let f = ImageFolder::scan(dir.path()).unwrap();
        let names: Vec<_> = f.images().iter().cloned().collect();
        assert_eq!(names, ["a.png", "sub/b.JPG", "sub/deeper/c.webp"]);
        assert_eq!(f.path_of("sub/b.JPG"), dir.path().join("sub").join("b.JPG"));
    }

    #[test]
    fn scan_of_missing_folder_is_an_error() {
        let err = ImageFolder::scan(Path::new("/definitely/not/here")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
