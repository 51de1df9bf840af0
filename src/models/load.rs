//! Loading a whole Stable Diffusion model from any source.
