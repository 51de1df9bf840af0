//! `chat --model BASE [--adapter DIR] --prompt "..."`: a language model's greedy answer, with a
//! trained PEFT adapter, for checking a LoRA by hand. Without `--prompt` it answers each line
//! read from standard input. Exit status: 0 done, 1 failure, 2 bad input.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::DType;
use clap::Parser;
use lora_trainer::config::DeviceChoice;
use lora_trainer::llm::generate::{AdaptedModel, Generator};

/// Answer prompts with a language model (a transformers folder or a cached hub id) and a PEFT
/// LoRA adapter folder, greedily, as the model's chat template frames a user turn.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The base model: a folder with config.json, model.safetensors and tokenizer.json.
    #[arg(long, value_name = "BASE")]
    model: String,
    /// A PEFT adapter folder (adapter_config.json, adapter_model.safetensors), e.g. what
    /// `train` wrote into output_dir/output_name.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// A prompt to answer; repeat for several. Without it, each line of standard input is one.
    #[arg(long)]
    prompt: Vec<String>,
    /// A system message put before each prompt.
    #[arg(long)]
    system: Option<String>,
    /// The longest answer, in tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = DeviceChoice::parse)]
    device: DeviceChoice,
}

fn main() -> ExitCode {
    lora_trainer::nn::runtime::tune_process();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(args: &Args) -> lora_trainer::Result<()> {
    let device = args.device.device()?;
    let loaded = AdaptedModel::open(&args.model, args.adapter.as_deref(), DType::F32, &device)?;
    let _inference = loaded.network.as_ref().map(|n| n.inference());
    let generator = Generator::new(&loaded.model, &loaded.tokenizer, &device)?;
    let answer = |prompt: &str| -> lora_trainer::Result<()> {
        let text = generator.answer(prompt, args.system.as_deref(), args.max_new_tokens)?;
        println!("{text}");
        Ok(())
    };
    if args.prompt.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| lora_trainer::Error::io("standard input", e))?;
            if !line.trim().is_empty() {
                answer(line.trim())?;
            }
        }
    } else {
        for prompt in &args.prompt {
            answer(prompt)?;
        }
    }
    Ok(())
}
