//! Train LoRA adapters for Stable Diffusion 1.x/2.x from a YAML config.
//!
//! Data flows one way: [`config`] (YAML → validated [`config::TrainPlan`]) → [`dataset`]
//! (metadata.csv, images, buckets, captions) and [`models`] (UNet, CLIP text encoder, VAE,
//! tokenizer, noise schedule, all built on the layers of [`nn`]) → training → checkpoints and the
//! exported `.safetensors` LoRA. The binaries in `src/bin/` only parse arguments and print errors.

pub mod bench;
pub mod config;
pub mod dataset;
pub mod error;
pub mod files;
#[doc(hidden)]
pub mod fixtures;
pub mod generate;
pub mod label;
pub mod llm;
pub mod log;
pub mod lora;
pub mod models;
pub mod nn;
pub mod preflight;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
