//! The DDPM noise schedule: alphas, add_noise, v targets, SNR.
