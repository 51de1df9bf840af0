//! `gpu_check`: the checks a session lent a GPU runs first (see `tools/gpu_check.sh` and
//! `lora_trainer::bench::device_check`): device parity with diffusers' outputs and with the
//! CPU, the demo trained on the device, and the step benchmark beside diffusers + peft. Writes
//! `OUT/gpu_check.json`; exit status 0 when every check passed, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lora_trainer::bench::device_check::{run_checks, BenchShape, CheckOptions};
use lora_trainer::bench::Preset;
use lora_trainer::config::{DeviceChoice, MixedPrecision};

/// Checks the device path against diffusers and the CPU, trains the demo on it, benchmarks it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The device to check (`cuda`, `cuda:N`; `cpu` tries the checks without a GPU).
    #[arg(long, default_value = "cuda", value_parser = DeviceChoice::parse)]
    device: DeviceChoice,
    /// The half precision of the run: `bf16` on CUDA (`fp16` to try on a CPU).
    #[arg(long, default_value = "bf16", value_parser = MixedPrecision::parse)]
    mixed_precision: MixedPrecision,
    /// Where the report and the runs' outputs go.
    #[arg(long, default_value = "gpu-check")]
    out: PathBuf,
    /// The repository root (fixtures, demo, configs, tools).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// A Python with torch, diffusers and peft: the bench's reference side.
    #[arg(long, value_name = "PYTHON")]
    reference: Option<PathBuf>,
    /// The bench's UNet: `sd15` (the target) or `tiny` (seconds, to try the script).
    #[arg(long, default_value = "sd15")]
    bench_preset: String,
    #[arg(long, default_value_t = 512)]
    bench_resolution: usize,
    #[arg(long, default_value_t = 4)]
    bench_batch: usize,
    #[arg(long, default_value_t = 3)]
    bench_steps: usize,
    /// Skip the bench.
    #[arg(long)]
    no_bench: bool,
    /// Skip the demo training.
    #[arg(long)]
    no_demo: bool,
}

fn main() -> ExitCode {
    lora_trainer::nn::runtime::tune_process();
    let args = Args::parse();
    let preset = match args.bench_preset.as_str() {
        "sd15" => Preset::Sd15,
        "tiny" => Preset::Tiny,
        other => {
            eprintln!("error: --bench-preset {other}: use sd15 or tiny");
            return ExitCode::from(2);
        }
    };
    let options = CheckOptions {
        device: args.device,
        half: args.mixed_precision,
        root: args.root.clone(),
        out: args.out.clone(),
        python: args.reference.clone(),
        bench: (!args.no_bench).then_some(BenchShape {
            preset,
            resolution: args.bench_resolution,
            batch: args.bench_batch,
            steps: args.bench_steps,
        }),
        demo: !args.no_demo,
    };
    match run_checks(&options) {
        Ok(report) => {
            for section in &report.sections {
                let failed = section.checks.iter().filter(|c| !c.pass).count();
                let state = match (&section.error, failed) {
                    (Some(e), _) => format!("ERROR {e}"),
                    (None, 0) => format!("ok ({} checks)", section.checks.len()),
                    (None, n) => format!("{n} of {} checks FAILED", section.checks.len()),
                };
                eprintln!("{:<36} {:>8.1} s  {state}", section.name, section.seconds);
                for check in section.checks.iter().filter(|c| !c.pass) {
                    eprintln!(
                        "    {}: {:.3e} > {:.1e}",
                        check.name, check.value, check.tolerance
                    );
                }
            }
            eprintln!("report: {}", args.out.join("gpu_check.json").display());
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
