//! The UNet2DConditionModel, built from diffusers' unet/config.json.
