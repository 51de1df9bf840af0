//! ResnetBlock2D and the up/down samplers shared by the UNet and the VAE.
