//! LoRA: the adapters trained on the UNet and the text encoder, which layers get them, and the
//! file they are saved to and loaded from.
//!
//! - [`adapter`]: [`LoraAdapter`], `y = layer(x) + (alpha/rank) · up(down(dropout(x)))`, the only
//!   trainable tensors (f32 `Var`s), with seeded dropout;
//! - [`targets`]: presets (`default`, `attn`, `kohya`), module-name lists and globs, `conv_lora`;
//! - [`network`]: [`LoraNetworks`], one [`LoraNetwork`] per model, each the
//!   [`crate::nn::AdapterProvider`] its model is built with;
//! - [`report`]: modules and parameters per model, from the configs alone or the live networks;
//! - [`export`], [`metadata`], [`hash`]: the kohya (default) or diffusers file with `ss_*`,
//!   `modelspec.*` and `sshs_*` metadata, written atomically;
//! - [`file`](mod@file), [`import`]: reading any kohya/diffusers LoRA file and starting training from it;
//! - [`inspect`]: what `lora inspect FILE` prints.

pub mod adapter;
pub(crate) mod error;
pub mod export;
pub mod file;
mod file_keys;
pub mod hash;
pub mod import;
pub mod inspect;
pub mod metadata;
pub mod names;
pub mod network;
pub mod random;
pub mod report;
pub mod targets;

pub use adapter::{Dropout, LoraAdapter, TrainingState};
pub use error::{LoraError, LoraProblem};
pub use export::{save_lora, SavedLora};
pub use file::{FileModule, LoraFile};
pub use file_keys::LoraFormat;
pub use inspect::Inspection;
pub use metadata::{NetworkMetadata, TrainingMetadata};
pub use names::{LoraBase, LoraModel};
pub use network::{InferenceMode, LoraNetwork, LoraNetworks, NetworkOptions, ParamGroup};
pub use report::{Layout, LoraReport, ModelReport};
pub use targets::{ModuleSpec, TargetSelector};
