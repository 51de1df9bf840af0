//! Pictures from a base model and LoRAs: the `generate` command and the preview samples the
//! trainer renders.
//!
//! - [`samplers`]: DDIM, Euler ancestral, DPM++ 2M (diffusers' step maths) and timestep spacing;
//! - [`schedule`]: what the samplers read from the model (`ᾱ`, prediction type, the sampling
//!   keys of `scheduler_config.json`);

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
