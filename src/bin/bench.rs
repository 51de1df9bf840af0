//! `bench`: seconds per LoRA training step, peak memory and GFLOP/s on an SD-shaped UNet with
//! random weights; with `--reference PYTHON`, diffusers + peft side by side.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use lora_trainer::bench::{self, BenchOptions, Preset};
use lora_trainer::config::{DeviceChoice, MixedPrecision};

/// Counts the heap, so that `--breakdown` can say what the graph holds after the forward pass.
#[global_allocator]
static ALLOCATOR: lora_trainer::nn::profile::CountingAlloc =
    lora_trainer::nn::profile::CountingAlloc;

fn parse_device(text: &str) -> Result<DeviceChoice, String> {
    DeviceChoice::parse(text)
}

fn parse_precision(text: &str) -> Result<MixedPrecision, String> {
    MixedPrecision::parse(text)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PresetArg {
    /// The SD 1.5 UNet architecture (860 M parameters).
    Sd15,
    /// The SDXL base UNet architecture (2.6 B parameters; about 10 GB of f32 weights).
    Sdxl,
    /// The bundled demo model's tiny UNet.
    Tiny,
    /// A causal language model: Qwen2.5-0.5B-Instruct's architecture (494 M parameters), or
    /// `--model DIR`'s config.json; LoRA on q_proj/v_proj; transformers + peft as reference.
    Llm,
}

/// Times LoRA training steps (forward, backward, AdamW) in the cached-latent setting: random
/// weights, latents and text context, LoRA on every UNet to_q/to_v.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(long, value_enum, default_value = "sd15")]
    preset: PresetArg,
    /// Image side in pixels (a multiple of 64); the latent side is an eighth of it.
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// LoRA rank (alpha = rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Recompute each transformer and resnet block in backward instead of keeping its activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Also print the seconds per step spent in each kind of op (frozen layers, attention, norms).
    #[arg(long)]
    breakdown: bool,
    /// Use candle's ordinary ops for the frozen layers instead of our custom ops (for
    /// before/after comparisons).
    #[arg(long)]
    plain_ops: bool,
    /// Run the layers' device-generic paths (the ones CUDA takes: candle's ops forward, our
    /// backward) instead of the CPU kernels, to see their cost and memory on the CPU.
    #[arg(long, conflicts_with = "plain_ops")]
    generic_ops: bool,
    /// Where to run: `cpu`, `cuda`, `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceChoice,
    /// The frozen weights' dtype, as the config's `mixed_precision`: `no` (f32), `fp16`,
    /// `bf16`. On the CPU, as in training, `fp16`/`bf16` keep the weights in that dtype and
    /// compute in f32.
    #[arg(long, default_value = "no", value_parser = parse_precision)]
    mixed_precision: MixedPrecision,
    /// Also run the reference (tools/bench_diffusers.py, or tools/bench_transformers.py for
    /// `--preset llm`) with this Python (one with torch, diffusers or transformers, peft).
    #[arg(long, value_name = "PYTHON")]
    reference: Option<PathBuf>,
    /// `--preset llm`: the model whose config.json to build (random weights); default
    /// Qwen2.5-0.5B-Instruct's.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// `--preset llm`: samples per step.
    #[arg(long, default_value_t = 4)]
    llm_batch: usize,
    /// `--preset llm`: tokens per sample.
    #[arg(long, default_value_t = 256)]
    seq: usize,
}

fn main() -> ExitCode {
    lora_trainer::nn::runtime::tune_process();
    let args = Args::parse();
    if args.plain_ops {
        lora_trainer::nn::frozen::set_enabled(false);
    }
    let preset = match args.preset {
        PresetArg::Sd15 => Preset::Sd15,
        PresetArg::Sdxl => Preset::Sdxl,
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Llm => return bench_llm(&args),
    };
    let options = BenchOptions {
        preset,
        resolution: args.resolution,
        batch: args.batch,
        rank: args.rank,
        steps: args.steps,
        warmup: args.warmup,
        gradient_checkpointing: args.gradient_checkpointing,
        breakdown: args.breakdown,
        device: args.device,
        mixed_precision: args.mixed_precision,
        ..BenchOptions::default()
    };
    let run = || bench::run(&options, args.reference.as_ref());
    let result = if args.generic_ops {
        lora_trainer::nn::frozen::with_generic_ops(run)
    } else {
        run()
    };
    match result {
        Ok(report) => {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `--preset llm`.
fn bench_llm(args: &Args) -> ExitCode {
    let run = || -> lora_trainer::Result<String> {
        let (config_json, config_origin) = match &args.model {
            Some(dir) => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| lora_trainer::Error::io(&path, e))?;
                (text, path.display().to_string())
            }
            None => (
                bench::llm::QWEN25_05B_CONFIG.to_string(),
                "Qwen2.5-0.5B-Instruct".to_string(),
            ),
        };
        let options = bench::llm::LlmBenchOptions {
            config_json,
            config_origin,
            batch: args.llm_batch,
            seq: args.seq,
            rank: args.rank,
            steps: args.steps,
            warmup: args.warmup,
            seed: 0,
            device: args.device,
            mixed_precision: args.mixed_precision,
            breakdown: args.breakdown,
            gradient_checkpointing: args.gradient_checkpointing,
        };
        Ok(bench::llm::run_llm(&options, args.reference.as_ref())?.table())
    };
    match run() {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
