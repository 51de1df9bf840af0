//! Attention, the transformer blocks and Transformer2DModel.
