//! The CLIP text encoder.
