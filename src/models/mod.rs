//! Stable Diffusion's components in our own code, with diffusers' module paths.
