//! Where a run computes and in which precision: `device: auto | cpu | cuda:N` and
//! `mixed_precision: no | fp16 | bf16` turned into a candle device and the dtype of the frozen
//! weights.
//!
//! Under mixed precision only the frozen base weights (and the activations through them) are
//! half precision; the LoRA master weights, the optimizer state, the gradients handed to the
//! optimizer and the loss stay f32. Half precision is a CUDA feature here: on the CPU candle's
//! bf16 convolutions are missing and f16 is slower than f32, so a CPU run with `fp16`/`bf16`
//! trains in f32 and says so.

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
    /// The frozen weights' dtype.
    pub dtype: DType,
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
        let mut warnings = Vec::new();
        let half = match precision {
            MixedPrecision::No => None,
            MixedPrecision::Fp16 => Some(DType::F16),
            MixedPrecision::Bf16 => Some(DType::BF16),
        };
        let dtype = match half {
            Some(dtype) if device.is_cuda() => dtype,
            Some(_) => {
                warnings.push(format!(
                    "`mixed_precision: {precision}` needs a CUDA device; this run trains on the \
                     CPU in f32 (set `mixed_precision: no` to silence this)"
                ));
                DType::F32
            }
            None => DType::F32,
        };
        let dtype_name = match (dtype, precision) {
            (DType::F32, _) => "f32".to_string(),
            (d, p) => format!("{} (mixed precision {p})", dtype_label(d)),
        };
        Ok(Compute {
            device,
            dtype,
            device_name,
            dtype_name,
            warnings,
        })
    }
}

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
    fn the_cpu_trains_in_f32_and_says_so_when_half_precision_was_asked() {
        let c = Compute::resolve(DeviceChoice::Cpu, MixedPrecision::No).unwrap();
        assert!(c.device.is_cpu() && c.dtype == DType::F32 && c.warnings.is_empty());
        let c = Compute::resolve(DeviceChoice::Cpu, MixedPrecision::Bf16).unwrap();
        assert_eq!(c.dtype, DType::F32);
        assert!(
            c.warnings[0].contains("mixed_precision: bf16"),
            "{:?}",
            c.warnings
        );
        assert_eq!(
            (c.device_name.as_str(), c.dtype_name.as_str()),
            ("cpu", "f32")
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_fix_and_auto_falls_back() {
        let e = Compute::resolve(DeviceChoice::Cuda(0), MixedPrecision::No).unwrap_err();
        assert!(e.to_string().contains("--features cuda"), "{e}");
        assert!(e.is_user_error());
        let auto = Compute::resolve(DeviceChoice::Auto, MixedPrecision::Fp16).unwrap();
        assert!(auto.device.is_cpu() && auto.dtype == DType::F32);
    }
}
