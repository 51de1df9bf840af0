//! Starting from an existing LoRA file (`network_weights`): the file decides which layers get
//! adapters, with each module's rank and alpha (alpha missing or 0 → rank), and its matrices are
//! the adapters' starting weights.
//!
//! Checked, each failure naming the key: the file is made for this model family (an SDXL or
//! SD 2.x file on an SD 1.x model is refused with the evidence), each module's matrices fit the
//! layer of the same name, and every module of the file found its layer.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::Tensor;

use super::error::{LoraError, LoraProblem};
use super::file::{FileBase, LoraFile};
use super::names::{LoraBase, LoraModel};
use super::targets::ModuleSpec;
use crate::models::family::ModelFamily;
use crate::nn::LayerKind;
use crate::Result;

/// The modules of a LoRA file, waiting for the layers they adapt.
#[derive(Debug)]
pub struct FileTargets {
    file: LoraFile,
    by_name: HashMap<String, usize>,
    used: Mutex<Vec<bool>>,
    base: Option<LoraBase>,
}

impl FileTargets {
    /// Checks that `file` was made for `base` (when known; an unknown base is an SD 1.x or 2.x
    /// one).
    pub fn new(file: LoraFile, base: Option<&LoraBase>) -> Result<Self> {
        let family = base.map(|b| b.family);
        if let Some((found, evidence)) = file.base_model() {
            let fits = match (&found, family) {
                (FileBase::Sdxl, None) => false,
                (_, None) => true,
                (FileBase::Sd1, Some(v)) => v == ModelFamily::Sd1,
                (FileBase::Sd2, Some(v)) => v == ModelFamily::Sd2,
                (FileBase::Sdxl, Some(v)) => v == ModelFamily::Sdxl,
            };
            if !fits {
                let expected = family.map_or("SD 1.x or SD 2.x".to_string(), |v| v.to_string());
                return Err(LoraError::file(
                    &file.path,
                    LoraProblem::WrongBaseModel {
                        found: found.to_string(),
                        expected,
                        evidence,
                    },
                )
                .into());
            }
        }
        let by_name = file
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let used = Mutex::new(vec![false; file.modules.len()]);
        Ok(FileTargets {
            file,
            by_name,
            used,
            base: base.cloned(),
        })
    }

    /// The file.
    pub fn file(&self) -> &LoraFile {
        &self.file
    }

    /// The file's module for the layer of `model` at `path`, checked against the layer's shape:
    /// its spec and its `(down, up)` matrices.
    pub fn select(
        &self,
        model: LoraModel,
        path: &str,
        layer: LayerKind,
    ) -> Result<Option<(ModuleSpec, Tensor, Tensor)>> {
        let Some(index) = self.index_of(model, path) else {
            return Ok(None);
        };
        let module = &self.file.modules[index];
        let spec = ModuleSpec {
            model,
            path: path.to_string(),
            layer,
            rank: module.rank(),
            alpha: module.effective_alpha(),
        };
        let down = self.fit(&module.down_key, &module.down, &spec.down_shape(), &spec)?;
        let up = self.fit(&module.up_key, &module.up, &spec.up_shape(), &spec)?;
        if let Ok(mut used) = self.used.lock() {
            used[index] = true;
        }
        Ok(Some((spec, down, up)))
    }

    /// The name of the file's module for the layer of `model` at `path`, if it has one.
    pub fn name_of(&self, model: LoraModel, path: &str) -> Option<&str> {
        self.index_of(model, path)
            .map(|i| self.file.modules[i].name.as_str())
    }

    /// The file's module for a layer: by the base's kohya name (SDXL's LDM names), else by the
    /// diffusers path's (what a diffusers-format file's modules are named by).
    fn index_of(&self, model: LoraModel, path: &str) -> Option<usize> {
        let own = self.base.as_ref().map(|b| b.kohya_name(model, path));
        own.and_then(|name| self.by_name.get(&name))
            .or_else(|| self.by_name.get(&model.kohya_name(path)))
            .copied()
    }

    /// Fails, naming the key, if a module of the file found no layer. Call it once every model
    /// that gets adapters has been built.
    pub fn check_all_used(&self, text_encoder_built: bool) -> Result<()> {
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let Some(module) = self
            .file
            .modules
            .iter()
            .zip(&used)
            .find_map(|(m, hit)| (!hit).then_some(m))
        else {
            return Ok(());
        };
        let hint = if module.model.is_text_encoder() && !text_encoder_built {
            " (the text encoder is not trained: set `train_text_encoder: true` to go on training \
             the file's text-encoder modules)"
        } else {
            "; the file was made for a model with other layers (another base model, or a UNet \
             with another config)"
        };
        Err(LoraError::file(
            &self.file.path,
            LoraProblem::UnmatchedKey {
                key: module.down_key.clone(),
                model: module.model.to_string(),
                hint: hint.to_string(),
            },
        )
        .into())
    }

    /// The tensor in the `expected` shape. A 1×1 convolution's matrices stored without their
    /// trailing 1×1 (or a linear layer's with one) are reshaped, as A1111 does; anything else
    /// that differs is an error naming the key.
    fn fit(
        &self,
        key: &str,
        tensor: &Tensor,
        expected: &[usize],
        spec: &ModuleSpec,
    ) -> Result<Tensor> {
        let found = tensor.dims();
        if found == expected {
            return Ok(tensor.clone());
        }
        let squeezed = |dims: &[usize]| -> Vec<usize> {
            match dims {
                [a, b, 1, 1] => vec![*a, *b],
                other => other.to_vec(),
            }
        };
        if squeezed(found) == squeezed(expected) {
            return Ok(tensor.reshape(expected)?);
        }
        Err(LoraError::file(
            &self.file.path,
            LoraProblem::KeyShape {
                key: key.to_string(),
                layer: spec.path.clone(),
                rank: spec.rank,
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
        )
        .into())
    }
}
