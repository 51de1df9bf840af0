//! Stable Diffusion's components in our own code, with diffusers' module paths.

pub mod attention;
pub mod causal_lm;
pub mod clip_model;
pub mod clip_text;
pub mod clip_text_config;
pub mod clip_text_projection;
pub mod clip_vision;
pub mod conditioning;
pub(crate) mod config_json;
pub mod embeddings;
pub mod family;
#[cfg(test)]
mod gradients;
pub mod hub;
pub mod load;
pub mod noise;
#[cfg(test)]
pub(crate) mod random_weights;
pub mod resnet;
pub mod source;
pub mod tokenizer;
mod tokenizer_files;
pub mod unet;
pub mod unet_blocks;
pub mod unet_config;
pub mod vae;
pub mod vae_config;
