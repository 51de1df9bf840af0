//! Where a run computes and in which precision: `device: auto | cpu | cuda:N` and
//! `mixed_precision: no | fp16 | bf16` turned into a candle device and the dtype of the frozen
//! weights.
//!
//! Under mixed precision on CUDA the frozen base weights (and the activations through them) are
//! half precision; the LoRA master weights, the optimizer state, the gradients handed to the
//! optimizer and the loss stay f32. On the CPU, where candle's bf16 convolutions are missing and
//! f16 arithmetic is slower than f32, `fp16`/`bf16` keeps the frozen layers' weight matrices in
//! that dtype (half their memory: what lets an SDXL-size model train where its f32 weights
//! would not fit) and computes in f32, widening one layer's weight at a time.

use candle_core::{DType, Device};

use super::TrainError;
use crate::config::{DeviceChoice, MixedPrecision};

impl DeviceChoice {
    /// The candle device: `auto` takes CUDA device 0 when this build has CUDA and a GPU is
    /// present, else the CPU.
    pub fn device(self) -> crate::Result<candle_core::Device> {
        Ok(match self {
            DeviceChoice::Cpu => candle_core::Device::Cpu,
            DeviceChoice::Cuda(n) => candle_core::Device::new_cuda(n)?,
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    candle_core::Device::new_cuda(0).unwrap_or(candle_core::Device::Cpu)
                } else {
                    candle_core::Device::Cpu
                }
            }
        })
    }
}

/// The device and precision of a run.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    /// The dtype the frozen layers compute in (and keep their weights in unless
    /// `matrix_dtype` says otherwise).
    pub dtype: DType,
    /// The dtype the frozen layers' weight matrices are kept in when not `dtype` (the CPU under
    /// `fp16`/`bf16`).
    pub matrix_dtype: Option<DType>,
    /// `cpu`, `cuda:0`.
    pub device_name: String,
    /// `f32`, `f16 (mixed precision fp16)`.
    pub dtype_name: String,
    /// Settings that could not be honoured as written (printed, not fatal).
    pub warnings: Vec<String>,
}

impl Compute {
    /// Resolves the config's device and precision. `device: cuda:N` without CUDA (not built with
    /// `--features cuda`, or no such GPU) is an error naming the fix; `auto` falls back to the CPU.
    pub fn resolve(choice: DeviceChoice, precision: MixedPrecision) -> Result<Compute, TrainError> {
        let device = choice.device().map_err(|e| TrainError::Settings {
            key: "device".into(),
            message: format!(
                "`{choice}` is not usable ({}); build with `cargo build --release --features \
                 cuda` on a machine with that GPU, or set `device: cpu`",
                e.report()
            ),
        })?;
        let device_name = match (&device, choice) {
            (Device::Cpu, _) => "cpu".to_string(),
            (_, DeviceChoice::Cuda(n)) => format!("cuda:{n}"),
            _ => "cuda:0".to_string(),
        };
        let half = match precision {
            MixedPrecision::No => None,
            MixedPrecision::Fp16 => Some(DType::F16),
            MixedPrecision::Bf16 => Some(DType::BF16),
        };
        let (dtype, matrix_dtype) = match half {
            Some(dtype) if device.is_cuda() => (dtype, None),
            Some(dtype) => (DType::F32, Some(dtype)),
            None => (DType::F32, None),
        };
        let dtype_name = match (dtype, matrix_dtype) {
            (DType::F32, None) => "f32".to_string(),
            (DType::F32, Some(DType::BF16)) if crate::nn::bf16_matmul::available() => format!(
                "f32, frozen weights kept in bf16, linear layers multiplying in bf16 with \
                 AVX-512 BF16; mixed precision {precision} on the CPU"
            ),
            (DType::F32, Some(m)) => format!(
                "f32, frozen weights kept in {} (mixed precision {precision} on the CPU)",
                dtype_label(m)
            ),
            (d, _) => format!("{} (mixed precision {precision})", dtype_label(d)),
        };
        Ok(Compute {
            device,
            dtype,
            matrix_dtype,
            device_name,
            dtype_name,
            warnings: Vec::new(),
        })
    }
}

impl Compute {
    /// On the CPU in f32, keeps the frozen weight matrices in f16 when the model's f32 weights
    /// (`elements` values) would take more than [`FIT_SHARE`] of the memory the system has
    /// `available`: an SDXL-size model (13 GiB in f32) then trains in about 7 GiB, computing in
    /// f32 as before, as `mixed_precision: fp16` does. Returns the line that says so.
    pub fn fit_weights(&mut self, elements: u64, available: Option<u64>) -> Option<String> {
        let available = available?;
        let f32_bytes = elements.saturating_mul(4);
        let fits = f32_bytes as f64 <= FIT_SHARE * available as f64;
        if fits || !self.device.is_cpu() || self.dtype != DType::F32 || self.matrix_dtype.is_some()
        {
            return None;
        }
        self.matrix_dtype = Some(DType::F16);
        let gib = crate::log::memory::gib;
        self.dtype_name = format!(
            "f32, frozen weights kept in f16 (the model's {} of f32 weights would not fit in the \
             {} available)",
            gib(f32_bytes),
            gib(available)
        );
        Some(format!(
            "the model's weights take {} in f32 and this machine has {} available: the frozen \
             weights are kept in f16 and computed in f32 (set `mixed_precision: fp16` to choose \
             this yourself)",
            gib(f32_bytes),
            gib(available)
        ))
    }
}

/// The share of the available memory the f32 weights may take before [`Compute::fit_weights`]
/// keeps them in f16: the rest is for activations, the optimizer and the latents.
pub const FIT_SHARE: f64 = 0.8;

fn dtype_label(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_computes_in_f32_and_keeps_the_weights_in_half_precision_when_asked() {
        let c = Compute::resolve(DeviceChoice::Cpu, MixedPrecision::No).unwrap();
        assert!(c.device.is_cpu() && c.dtype == DType::F32 && c.warnings.is_empty());
        assert_eq!((c.matrix_dtype, c.dtype_name.as_str()), (None, "f32"));
        let c = Compute::resolve(DeviceChoice::Cpu, MixedPrecision::Bf16).unwrap();
        assert_eq!((c.dtype, c.matrix_dtype), (DType::F32, Some(DType::BF16)));
        assert!(c.warnings.is_empty());
        let want = if crate::nn::bf16_matmul::available() {
            "f32, frozen weights kept in bf16, linear layers multiplying in bf16 with AVX-512 \
             BF16; mixed precision bf16 on the CPU"
        } else {
            "f32, frozen weights kept in bf16 (mixed precision bf16 on the CPU)"
        };
        assert_eq!(
            (c.device_name.as_str(), c.dtype_name.as_str()),
            ("cpu", want)
        );
    }

    #[test]
    fn weights_that_would_not_fit_in_f32_are_kept_in_f16_on_the_cpu() {
        let gib = 1u64 << 30;
        let base = Compute::resolve(DeviceChoice::Cpu, MixedPrecision::No).unwrap();
        // SDXL: 3.5 G values, 13 GiB in f32; 20 GiB available → fits, 14 GiB → f16.
        let sdxl = 3_500_000_000u64;
        let mut c = base.clone();
        assert_eq!(c.fit_weights(sdxl, Some(20 * gib)), None);
        assert_eq!(c.matrix_dtype, None);
        let note = c.fit_weights(sdxl, Some(14 * gib)).unwrap();
        assert_eq!((c.dtype, c.matrix_dtype), (DType::F32, Some(DType::F16)));
        assert!(
            note.contains("13.04 GiB") && note.contains("14.00 GiB"),
            "{note}"
        );
        assert!(c.dtype_name.starts_with("f32, frozen weights kept in f16"));
        // Unknown memory, or a precision the config chose, is left alone.
        let mut c = base.clone();
        assert_eq!(c.fit_weights(sdxl, None), None);
        let mut c = Compute::resolve(DeviceChoice::Cpu, MixedPrecision::Bf16).unwrap();
        assert_eq!(c.fit_weights(sdxl, Some(gib)), None);
        assert_eq!(c.matrix_dtype, Some(DType::BF16));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_fix_and_auto_falls_back() {
        let e = Compute::resolve(DeviceChoice::Cuda(0), MixedPrecision::No).unwrap_err();
        assert!(e.to_string().contains("--features cuda"), "{e}");
        assert!(e.is_user_error());
        let auto = Compute::resolve(DeviceChoice::Auto, MixedPrecision::Fp16).unwrap();
        assert!(auto.device.is_cpu() && auto.dtype == DType::F32);
        assert_eq!(auto.matrix_dtype, Some(DType::F16));
    }
}
