//! Stable Diffusion's components in our own code, with diffusers' module paths.

pub mod attention;
pub mod clip_text;
pub mod clip_text_config;
pub mod embeddings;
pub mod load;
pub mod noise;
pub mod resnet;
pub mod source;
pub mod tokenizer;
mod tokenizer_files;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
