//! Where pictures go: WebUI's `00000-<seed>.png` numbering in an output folder (the next number
//! after the highest one already there, so runs never overwrite each other), and the trainer's
//! kohya-like preview names `<name>_<step:06>_<index:02>_<seed>.png`.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The number the next picture in `dir` gets: one more than the largest leading number of a
/// file name there (`00012-42.png` → 13), or 0 (A1111's `get_next_sequence_number`).
pub fn next_sequence_number(dir: &Path) -> Result<usize> {
    if !dir.is_dir() {
        return Ok(0);
    }
    let mut next = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
        let name = name.to_string_lossy();
        let stem = name.split('.').next().unwrap_or("");
        if let Ok(n) = stem.split('-').next().unwrap_or("").parse::<usize>() {
            next = next.max(n + 1);
        }
    }
    Ok(next)
}

/// `00042-<seed>.png`.
pub fn image_file_name(number: usize, seed: u64) -> String {
    format!("{number:05}-{seed}.png")
}

/// `<dir>/<name>_<step:06>_<index:02>_<seed>.png`.
pub fn preview_path(dir: &Path, name: &str, step: u64, index: usize, seed: u64) -> PathBuf {
    dir.join(format!("{name}_{step:06}_{index:02}_{seed}.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_continues_after_the_highest_file() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_sequence_number(&dir.path().join("missing"))?, 0);
        assert_eq!(next_sequence_number(dir.path())?, 0);
        for name in ["00000-1.png", "00007-99.png", "notes.txt", "grid-0003.png"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(next_sequence_number(dir.path())?, 8);
        assert_eq!(image_file_name(8, 42), "00008-42.png");
        assert_eq!(
            preview_path(Path::new("out/samples"), "demo", 200, 1, 7),
            Path::new("out/samples/demo_000200_01_7.png")
        );
        Ok(())
    }
}
