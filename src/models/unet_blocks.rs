//! The UNet's down, mid and up blocks.
