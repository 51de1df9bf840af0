//! Where a base model comes from: a diffusers folder, a single checkpoint file or a hub id.
