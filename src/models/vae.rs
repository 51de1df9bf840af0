//! AutoencoderKL: encodes images to latents and decodes them back.
