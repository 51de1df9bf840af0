//! `generate --model BASE --prompt "..."`: text to image with any number of LoRAs, saved as PNGs
//! that carry A1111's generation parameters. Parses arguments, shows progress, prints errors
//! (exit status 2 when the input is at fault).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::DType;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora_trainer::config::DeviceChoice;
use lora_trainer::generate::error::GenerateError;
use lora_trainer::generate::lora_files::LoraUse;
use lora_trainer::generate::run::{run, GenerateOptions, GenerateProgress};
use lora_trainer::generate::samplers::SamplerKind;
use lora_trainer::models::load::LoadOptions;
use lora_trainer::models::noise::PredictionType;

/// Draw pictures from a Stable Diffusion 1.x/2.x or SDXL model with LoRAs: `<lora:name:0.8>` in the
/// prompt (found in --lora-dir) or --lora FILE:WEIGHT. Each picture is saved as
/// OUT/NNNNN-SEED.png with its generation parameters (A1111's PNG Info).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base model: a diffusers folder, a .safetensors/.ckpt checkpoint or a hub id.
    #[arg(long, value_name = "BASE")]
    model: String,
    /// What to draw; `<lora:name:weight>` tags apply LoRAs from --lora-dir.
    #[arg(long)]
    prompt: String,
    /// What to steer away from.
    #[arg(long, value_name = "TEXT", default_value = "")]
    negative_prompt: String,
    /// A LoRA file to apply, optionally at a weight (default 1); repeat to stack several.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    lora: Vec<String>,
    /// Where `<lora:name>` tags are looked up (name.safetensors, also in subfolders).
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// Sampling steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (1 = no guidance).
    #[arg(long, value_name = "SCALE", default_value_t = 7.5)]
    cfg: f64,
    /// Seed of the first picture (the others count up from it) [default: random].
    #[arg(long)]
    seed: Option<u64>,
    /// Picture width [default: the model family's: 512, SDXL 1024].
    #[arg(long)]
    width: Option<usize>,
    /// Picture height [default: as the width's].
    #[arg(long)]
    height: Option<usize>,
    /// ddim, euler_a (Euler ancestral) or dpmpp_2m (DPM++ 2M).
    #[arg(long, default_value = "euler_a", value_parser = parse_sampler)]
    sampler: SamplerKind,
    /// How many pictures.
    #[arg(long = "n", value_name = "COUNT", default_value_t = 1)]
    count: usize,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "output/images")]
    out: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = DeviceChoice::parse)]
    device: DeviceChoice,
    /// Weights' precision: f32, or f16/bf16 (CUDA).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Use the text encoder's N-th layer from the end (A1111's "Clip skip").
    #[arg(long, value_name = "N", default_value_t = 1)]
    clip_skip: usize,
    /// A VAE to use instead of the model's (folder, file or hub id).
    #[arg(long, value_name = "VAE")]
    vae: Option<String>,
    /// A tokenizer folder or hub id (single-file models carry none).
    #[arg(long, value_name = "TOKENIZER")]
    tokenizer: Option<String>,
    /// The second tokenizer of an SDXL single file (folder or hub id; by default the bundled CLIP
    /// tokenizer, padding with `!`).
    #[arg(long, value_name = "TOKENIZER")]
    tokenizer_2: Option<String>,
    /// What the model predicts, when its files do not say (SD 2.x 768-v single files:
    /// v_prediction).
    #[arg(long, value_enum)]
    prediction_type: Option<Prediction>,
    /// LoRA modules that match no layer of the model are warnings, not errors.
    #[arg(long)]
    lenient: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Prediction {
    Epsilon,
    #[value(name = "v_prediction")]
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    F16,
    Bf16,
}

fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    s.parse()
}

fn main() -> ExitCode {
    lora_trainer::nn::runtime::tune_process();
    let args = Args::parse();
    match run_args(&args) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run_args(args: &Args) -> lora_trainer::Result<Vec<PathBuf>> {
    let loras = args
        .lora
        .iter()
        .map(|a| LoraUse::from_arg(a))
        .collect::<lora_trainer::Result<Vec<_>>>()?;
    let device = args.device.device()?;
    let dtype = match args.precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    };
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(GenerateError::new(
            "--precision bf16",
            "the CPU has no bf16 convolutions; use f32 (or f16) on the CPU, bf16 on CUDA",
        )
        .into());
    }
    let options = GenerateOptions {
        model: args.model.clone(),
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        loras,
        lora_dir: args.lora_dir.clone(),
        steps: args.steps,
        cfg_scale: args.cfg,
        seed: args
            .seed
            .unwrap_or_else(|| u64::from(rand::random::<u32>())),
        width: args.width,
        height: args.height,
        sampler: args.sampler,
        count: args.count,
        out_dir: args.out.clone(),
        clip_skip: args.clip_skip,
        lenient: args.lenient,
        load: LoadOptions {
            dtype,
            device,
            vae: args.vae.clone(),
            tokenizer: args.tokenizer.clone(),
            tokenizer_2: args.tokenizer_2.clone(),
            prediction_type: args.prediction_type.map(|p| match p {
                Prediction::Epsilon => PredictionType::Epsilon,
                Prediction::VPrediction => PredictionType::VPrediction,
            }),
            ..LoadOptions::default()
        },
    };
    run(&options, &mut Bar::new())
}

/// An indicatif bar on stderr over all pictures' steps.
struct Bar {
    bar: ProgressBar,
    started: bool,
}

impl Bar {
    fn new() -> Self {
        Bar {
            bar: ProgressBar::hidden(),
            started: false,
        }
    }
}

impl GenerateProgress for Bar {
    fn note(&mut self, text: &str) {
        self.bar.suspend(|| eprintln!("{text}"));
    }

    fn step(&mut self, image: usize, count: usize, step: usize, steps: usize) {
        if !self.started {
            self.started = true;
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.set_length((count * steps) as u64);
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
        }
        self.bar
            .set_message(format!("picture {}/{count}", image + 1));
        self.bar.set_position((image * steps + step) as u64);
        if image + 1 == count && step == steps {
            self.bar.finish_and_clear();
        }
    }

    fn saved(&mut self, _image: usize, path: &Path) {
        self.bar.suspend(|| eprintln!("saved {}", path.display()));
    }
}
