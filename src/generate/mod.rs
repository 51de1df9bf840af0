//! Pictures from a base model and LoRAs: the `generate` command and the preview samples the
//! trainer renders.
//!
//! - [`pipeline`]: [`pipeline::Pipeline`] borrows the models and turns an
//!   [`pipeline::ImageRequest`] into a picture (prompt encoding, guided sampling, VAE decode);
//! - [`samplers`]: DDIM, Euler ancestral, DPM++ 2M (diffusers' step maths) and timestep spacing;
//!   [`schedule`]: what they read from the model (`ᾱ`, prediction type, the sampling keys of
//!   `scheduler_config.json`); [`noise`]: seeded starting and step noise;
//! - [`prompt`]: `<lora:name:weight>` tags; [`lora_files`]: `--lora FILE:W` and finding tagged
//!   names in `--lora-dir`; [`lora_stack`]: several LoRAs attached at build time, summed;
//! - [`png_info`]: A1111's `parameters` text (write, read back) in PNG chunks; [`output`]: file
//!   names;
//! - [`preview`]: kohya's `sample_prompts` lines and [`preview::render_previews`] for the
//!   training loop; [`run`]: the `generate` command; [`error`]: its messages.

pub mod error;
pub mod lora_files;
pub mod lora_stack;
pub mod noise;
pub mod output;
pub mod pipeline;
pub mod png_info;
pub mod preview;
pub mod prompt;
pub mod run;
pub mod samplers;
pub mod schedule;
