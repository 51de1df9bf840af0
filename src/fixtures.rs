//! The test fixtures under `tests/fixtures/`, for this crate's tests (not part of the product).
//!
//! The tiny models' single files (`tiny-sd1.safetensors`, `tiny-sd2.safetensors`, the original
//! LDM layout) hold the same tensors as their diffusers folders, renamed, fused or reshaped.
//! Committing both doubled the fixtures; the repository holds instead each one's layout
//! (`<name>.layout.json`: every tensor of the file with its shape and the folder tensors it is
//! made of, found by value by `tools/make_fixtures.py`, independently of our loader's key
//! mapping) and the tensors that are in no folder file (`<name>.extra.safetensors`: the LDM
//! schedule buffers, SD 2's extra text layer and projection). [`path`] assembles the file (with
//! its `<name>.yaml` beside it, as users keep it) the
//! first time a test asks for it, byte by byte from those, into a folder of the system's
//! temporary directory named by a digest of the inputs, so the test processes that run at once
//! share one copy and a changed fixture gets a new one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// `tests/fixtures/` of this repository.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture `name` (a path under `tests/fixtures/`): the committed file, or for a single
/// file with a layout, the assembled one.
pub fn path(name: &str) -> PathBuf {
    let committed = root().join(name);
    match name.strip_suffix(".safetensors") {
        Some(stem)
            if !committed.exists() && root().join(format!("{stem}.layout.json")).is_file() =>
        {
            single_file(stem).unwrap_or_else(|e| panic!("fixture {name}: {}", e.report()))
        }
        _ => committed,
    }
}

/// `<name>.layout.json`.
#[derive(Debug, Deserialize)]
struct Layout {
    metadata: HashMap<String, String>,
    tensors: Vec<LayoutEntry>,
}

/// `[key, shape, [[component, key in that component's file], ...]]`.
type LayoutEntry = (String, Vec<usize>, Vec<(String, String)>);

/// The folder files a layout's components name (`text_encoder_2` only in SDXL folders).
const COMPONENTS: [(&str, &str); 4] = [
    ("unet", "unet/diffusion_pytorch_model.safetensors"),
    ("vae", "vae/diffusion_pytorch_model.safetensors"),
    ("text_encoder", "text_encoder/model.safetensors"),
    ("text_encoder_2", "text_encoder_2/model.safetensors"),
];

/// The single file `<name>.safetensors` assembled from the folder `<name>/`, the layout and the
/// extras; returns its path.
pub fn single_file(name: &str) -> Result<PathBuf> {
    let fixtures = root();
    let read = |p: PathBuf| std::fs::read(&p).map_err(|e| Error::io(&p, e));
    let layout_bytes = read(fixtures.join(format!("{name}.layout.json")))?;
    let extra_bytes = read(fixtures.join(format!("{name}.extra.safetensors")))?;
    let mut sources: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut digest = Sha256::new();
    digest.update(&layout_bytes);
    digest.update(&extra_bytes);
    for (component, file) in COMPONENTS {
        let path = fixtures.join(name).join(file);
        if component == "text_encoder_2" && !path.is_file() {
            continue;
        }
        let bytes = read(path)?;
        digest.update(&bytes);
        sources.insert(component, bytes);
    }
    let tag: String = digest.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = std::env::temp_dir().join(format!("lora-trainer-fixtures-{tag}"));
    let out = dir.join(format!("{name}.safetensors"));
    if out.is_file() {
        return Ok(out);
    }

    let bad = |message: String| -> Error {
        candle_core::Error::Msg(format!("fixture {name}: {message}")).into()
    };
    let layout: Layout = serde_json::from_slice(&layout_bytes)
        .map_err(|e| bad(format!("{name}.layout.json: {e}")))?;
    sources.insert("extra", extra_bytes);
    let files: HashMap<&str, SafeTensors> = sources
        .iter()
        .map(|(c, bytes)| {
            SafeTensors::deserialize(bytes)
                .map(|f| (*c, f))
                .map_err(|e| bad(format!("{c}: {e}")))
        })
        .collect::<Result<_>>()?;
    // Each tensor: its parts' bytes one after another (a concatenation along the first axis),
    // under the layout's shape.
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (key, shape, parts) in &layout.tensors {
        let mut data = Vec::new();
        let mut dtype = None;
        for (component, source_key) in parts {
            let file = files
                .get(component.as_str())
                .ok_or_else(|| bad(format!("`{key}`: unknown component {component}")))?;
            let view = file
                .tensor(source_key)
                .map_err(|e| bad(format!("`{key}`: {component} `{source_key}`: {e}")))?;
            dtype = Some(view.dtype());
            data.extend_from_slice(view.data());
        }
        let dtype = dtype.ok_or_else(|| bad(format!("`{key}` is made of nothing")))?;
        tensors.push((key.clone(), dtype, shape.clone(), data));
    }
    let views = tensors
        .iter()
        .map(|(key, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (key.as_str(), v))
                .map_err(|e| bad(format!("`{key}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(layout.metadata.clone()))
        .map_err(|e| bad(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // The LDM yaml lives beside the file, as it does for users.
    let yaml = fixtures.join(format!("{name}.yaml"));
    if yaml.is_file() {
        crate::files::write_atomically(&dir.join(format!("{name}.yaml")), &read(yaml)?)?;
    }
    crate::files::write_atomically(&out, &bytes)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assembled_single_files_hold_every_tensor_of_their_layout() {
        for (name, tensors) in [("tiny-sd1", 707), ("tiny-sd2", 664), ("tiny-sdxl", 867)] {
            let file = path(&format!("{name}.safetensors"));
            let bytes = std::fs::read(&file).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.len(), tensors, "{name}");
            // OpenCLIP's fused q/k/v: the three projections of the folder, stacked.
            if name == "tiny-sd2" {
                let fused = st
                    .tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
                    .unwrap();
                assert_eq!(fused.shape(), [384, 128]);
            }
            // A second call reuses the file.
            assert_eq!(path(&format!("{name}.safetensors")), file);
        }
        assert_eq!(path("tiny-sd1.ckpt"), root().join("tiny-sd1.ckpt"));
    }
}
