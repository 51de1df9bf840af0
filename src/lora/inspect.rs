//! `lora inspect FILE`: what a LoRA file holds — its format, the base model it was trained on,
//! its metadata, and every module with rank, alpha, dtype and weight norms.

use std::fmt;
use std::path::Path;

use candle_core::DType;

use super::file::{FileModule, LoraFile};
use super::file_keys::LoraFormat;
use super::names::LoraModel;
use crate::log::thousands;
use crate::Result;

/// Metadata values longer than this are shortened.
const VALUE_WIDTH: usize = 100;

/// One module's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSummary {
    pub label: String,
    pub rank: usize,
    pub alpha: f64,
    /// Whether the alpha came from the file (else it is the rank).
    pub alpha_given: bool,
    pub dtype: DType,
    /// `[out, in]` or `[out, in, k, k]` of the adapted layer.
    pub layer_shape: Vec<usize>,
    /// Frobenius norms of `lora_down`, `lora_up` and of the weight change `(alpha/rank)·up·down`.
    pub down_norm: f64,
    pub up_norm: f64,
    pub delta_norm: f64,
    pub parameters: usize,
}

/// A file, read and summarised.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub file: LoraFile,
    pub modules: Vec<(LoraModel, ModuleSummary)>,
}

impl Inspection {
    /// Reads and summarises `path`; a file that is not a usable LoRA is an error saying why.
    pub fn read(path: &Path) -> Result<Inspection> {
        let file = LoraFile::read(path)?;
        let modules = file
            .modules
            .iter()
            .map(|m| Ok((m.model, summarise(m)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Inspection { file, modules })
    }
}

fn summarise(m: &FileModule) -> Result<ModuleSummary> {
    let rank = m.rank();
    let down = m.down.to_dtype(DType::F64)?;
    let up = m.up.to_dtype(DType::F64)?;
    let norm = |t: &candle_core::Tensor| -> Result<f64> {
        Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
    };
    let alpha = m.effective_alpha();
    let out = up.dim(0)?;
    let up2 = up.reshape((out, up.elem_count() / out.max(1)))?;
    let down2 = down.reshape((rank, down.elem_count() / rank.max(1)))?;
    let delta_norm = if up2.dim(1)? == rank {
        norm(&up2.matmul(&down2)?)? * alpha / rank.max(1) as f64
    } else {
        f64::NAN
    };
    let mut layer_shape = vec![out];
    layer_shape.extend_from_slice(&m.down.dims()[1..]);
    Ok(ModuleSummary {
        label: m.label.clone(),
        rank,
        alpha,
        alpha_given: matches!(m.alpha, Some(a) if a != 0.0),
        dtype: m.dtype,
        layer_shape,
        down_norm: norm(&down)?,
        up_norm: norm(&up)?,
        delta_norm,
        parameters: m.down.elem_count() + m.up.elem_count(),
    })
}

/// A metadata value on one line, shortened past [`VALUE_WIDTH`] characters.
fn shorten(value: &str) -> String {
    let one_line = value.replace('\n', "\\n");
    let count = one_line.chars().count();
    if count <= VALUE_WIDTH {
        return one_line;
    }
    let head: String = one_line.chars().take(VALUE_WIDTH - 1).collect();
    format!("{head}… ({count} characters)")
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "other",
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = &self.file;
        writeln!(
            f,
            "file: {} ({} bytes)",
            file.path.display(),
            thousands(file.file_size as usize)
        )?;
        let format = match file.format {
            LoraFormat::Kohya => "kohya (lora_unet_…/lora_te_… keys: A1111, ComfyUI, kohya)",
            LoraFormat::Diffusers => "diffusers (unet.…/text_encoder.… lora_A/lora_B keys)",
        };
        writeln!(f, "format: {format}")?;

        writeln!(f, "base model:")?;
        let meta = |k: &str| {
            file.metadata
                .get(k)
                .map(String::as_str)
                .unwrap_or("(not recorded)")
        };
        for key in [
            "ss_base_model_version",
            "ss_sd_model_name",
            "sshs_model_hash",
            "sshs_legacy_hash",
        ] {
            writeln!(f, "  {key}: {}", shorten(meta(key)))?;
        }
        match file.base_model() {
            Some((base, evidence)) => writeln!(f, "  trained for: {base} ({evidence})")?,
            None => writeln!(
                f,
                "  trained for: unknown (no metadata, no layer that tells)"
            )?,
        }

        writeln!(f, "metadata ({} keys):", file.metadata.len())?;
        for (key, value) in &file.metadata {
            writeln!(f, "  {key}: {}", shorten(value))?;
        }

        for model in LoraModel::ALL {
            let modules: Vec<&ModuleSummary> = self
                .modules
                .iter()
                .filter(|(m, _)| *m == model)
                .map(|(_, s)| s)
                .collect();
            let parameters: usize = modules.iter().map(|m| m.parameters).sum();
            writeln!(
                f,
                "{model}: {} modules, {} parameters",
                modules.len(),
                thousands(parameters)
            )?;
            for m in modules {
                let alpha_note = if m.alpha_given { "" } else { " (= rank)" };
                writeln!(
                    f,
                    "  {}  rank {}  alpha {}{alpha_note}  {}  layer {:?}  |down| {:.4}  |up| {:.4}  |Δw| {:.4}",
                    m.label,
                    m.rank,
                    m.alpha,
                    dtype_name(m.dtype),
                    m.layer_shape,
                    m.down_norm,
                    m.up_norm,
                    m.delta_norm
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_shortened_on_one_line() {
        assert_eq!(shorten("a\nb"), "a\\nb");
        let long = "x".repeat(250);
        let s = shorten(&long);
        assert!(
            s.ends_with("… (250 characters)") && s.chars().count() < 130,
            "{s}"
        );
    }
}
