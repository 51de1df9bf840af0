//! The reference side of the benchmark: `tools/bench_diffusers.py` (diffusers + peft) run as a
//! child process on the same shapes, answering with one JSON line.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::{BenchOptions, Measurement};
use crate::config::DeviceChoice;
use crate::Result;

/// The image script, relative to the repository root (the bench runs from there with `cargo run`).
pub const SCRIPT: &str = "tools/bench_diffusers.py";
/// The language-model script, likewise.
pub const LLM_SCRIPT: &str = "tools/bench_transformers.py";

/// What the script prints as its last line.
#[derive(Debug, Deserialize)]
struct ScriptReport {
    step_seconds: Vec<f64>,
    peak_rss_bytes: Option<u64>,
    #[serde(default)]
    peak_device_bytes: Option<u64>,
    lora_parameters: usize,
    last_loss: f32,
    versions: String,
}

fn failure(message: String) -> crate::Error {
    candle_core::Error::Msg(format!("bench --reference: {message}")).into()
}

/// The reference's device (PyTorch numbers CUDA devices as we do; `auto` is CUDA device 0 when
/// this build has CUDA and one is present).
pub(super) fn reference_device(device: DeviceChoice) -> String {
    match device {
        DeviceChoice::Cpu => "cpu".to_string(),
        DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        DeviceChoice::Auto if candle_core::utils::cuda_is_available() => "cuda:0".to_string(),
        DeviceChoice::Auto => "cpu".to_string(),
    }
}

/// The script: under the current folder (a copy of the repository on another machine, where the
/// binary was carried), else in the repository this binary was built from.
fn script_path(script: &str) -> PathBuf {
    let here = Path::new(script);
    if here.is_file() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(script)
    }
}

/// Runs `python tools/bench_diffusers.py` with `options` and reads its measurement.
pub fn run_reference(python: &PathBuf, options: &BenchOptions) -> Result<Measurement> {
    let mut args = flags(&[
        ("--preset", options.preset.name().to_string()),
        ("--resolution", options.resolution.to_string()),
        ("--batch", options.batch.to_string()),
        ("--rank", options.rank.to_string()),
        ("--steps", options.steps.to_string()),
        ("--warmup", options.warmup.to_string()),
        ("--tokens", options.tokens.to_string()),
        ("--seed", options.seed.to_string()),
        ("--device", reference_device(options.device)),
        (
            "--mixed-precision",
            options.mixed_precision.as_str().to_string(),
        ),
    ]);
    if options.gradient_checkpointing {
        args.push("--gradient-checkpointing".into());
    }
    run_script(python, SCRIPT, &args, "diffusers+peft")
}

/// `--flag value` pairs as a script's arguments.
pub(super) fn flags(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.clone()])
        .collect()
}

/// Runs `python SCRIPT ARGS` (a reference script that prints one JSON line last) and reads its
/// measurement under `name`.
pub fn run_script(
    python: &PathBuf,
    script: &str,
    args: &[String],
    name: &str,
) -> Result<Measurement> {
    let script = script_path(script);
    let output = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| {
            failure(format!(
                "cannot start `{}`: {e}; give the Python that has torch and the reference \
                 libraries (for example /work/venv/bin/python)",
                python.display()
            ))
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(failure(format!(
            "`{} {}` failed ({}):\n{}",
            python.display(),
            script.display(),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    let report: ScriptReport = last
        .ok_or_else(|| failure(format!("{} printed no JSON line", script.display())))
        .and_then(|l| {
            serde_json::from_str(l).map_err(|e| failure(format!("unreadable JSON line `{l}`: {e}")))
        })?;
    Ok(Measurement {
        name: name.to_string(),
        step_seconds: report.step_seconds,
        peak_rss_bytes: report.peak_rss_bytes,
        peak_device_bytes: report.peak_device_bytes,
        lora_parameters: report.lora_parameters,
        last_loss: report.last_loss,
        versions: Some(report.versions),
        breakdown: Vec::new(),
    })
}
