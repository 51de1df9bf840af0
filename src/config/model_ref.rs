//! How the config reads a model reference: a hub id (`org/name`) or a path, and the checkpoint
//! format a file name announces. The same rules decide the dry run's checks and the loading.

use std::path::Path;

/// How a single-file checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    /// A PyTorch pickle (`.ckpt`, `.pt`, `.pth`, `.bin`).
    Pickle,
}

/// `org/name`: two parts of letters, digits, `-`, `_`, `.`, and not a checkpoint file name.
pub fn is_hub_id(text: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match text.split_once('/') {
        Some((org, name)) => {
            part_ok(org) && part_ok(name) && weights_format(Path::new(name)).is_none()
        }
        None => false,
    }
}

/// The checkpoint format a file name announces, if any.
pub fn weights_format(path: &Path) -> Option<WeightsFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => Some(WeightsFormat::Safetensors),
        "ckpt" | "pt" | "pth" | "bin" => Some(WeightsFormat::Pickle),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_shape() {
        assert!(is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5"));
        assert!(is_hub_id("openai/clip-vit-large-patch14"));
        assert!(!is_hub_id("./models/demo-sd"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("models/v1-5.safetensors"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("name"));
    }
}
