//! The `sshs_model_hash` and `sshs_legacy_hash` of a LoRA file, computed as kohya's
//! `train_util.precalculate_safetensors_hashes` does for sd-webui-additional-networks and A1111.
//!
//! kohya serialises the tensors with only the training metadata (keys starting `ss_`), so that
//! editing other metadata later does not change the hashes, and hashes that buffer:
//! - model hash: sha256 (hex) of every byte after the header (`8 + header length`);
//! - legacy hash: the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (of nothing
//!   when the buffer is shorter, as Python's `read` past the end returns no bytes).

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::Result;

/// `(sshs_model_hash, sshs_legacy_hash)` of `tensors` saved with `metadata`.
pub fn addnet_hashes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(String, String)> {
    let training: HashMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let pairs = tensors.iter().map(|(k, t)| (k.as_str(), t));
    let bytes = safetensors::serialize(pairs, Some(training)).map_err(candle_core::Error::from)?;
    Ok((model_hash(&bytes), legacy_hash(&bytes)))
}

/// sha256 (hex) of the bytes after a safetensors header.
pub fn model_hash(file: &[u8]) -> String {
    let header = file
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let start = usize::try_from(header)
        .ok()
        .and_then(|n| n.checked_add(8))
        .unwrap_or(usize::MAX)
        .min(file.len());
    hex(&Sha256::digest(&file[start..]))
}

/// The first 8 hex digits of the sha256 of `file[0x100000..0x110000]` (clipped to the file).
pub fn legacy_hash(file: &[u8]) -> String {
    let start = 0x10_0000.min(file.len());
    let end = 0x11_0000.min(file.len());
    hex(&Sha256::digest(&file[start..end]))[..8].to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_buffers_hash_the_empty_window() {
        // sha256("") = e3b0c442…: what kohya gets for files under 1 MiB.
        assert_eq!(legacy_hash(&[0u8; 100]), "e3b0c442");
        let mut file = 4u64.to_le_bytes().to_vec();
        file.extend_from_slice(b"{}  abc");
        assert_eq!(model_hash(&file), hex(&Sha256::digest(b"abc")));
    }
}
