//! Timestep embeddings.
