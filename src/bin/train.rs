//! `train --config FILE [--set key=value]... [--dry-run]`: parse arguments, run, print errors.

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lora_trainer::config::TrainPlan;
use lora_trainer::plan::Preflight;

/// Train a Stable Diffusion LoRA adapter from a YAML config.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The YAML training config (see configs/ for commented examples).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Override one config key; the value is YAML (`--set target_modules=[q_proj,v_proj]`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Check the config, dataset and base model, print the plan, and write nothing.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(args: &Args) -> lora_trainer::Result<ExitCode> {
    let plan = TrainPlan::load(&args.config, &args.overrides)?;
    let preflight = Preflight::check(plan)?;
    if args.dry_run {
        print!("{preflight}");
        return Ok(ExitCode::SUCCESS);
    }
    for warning in preflight.warnings() {
        eprintln!("warning: {warning}");
    }
    eprintln!(
        "error: training is not implemented yet in this build; run with --dry-run to check the \
         config, the dataset and the base model"
    );
    Ok(ExitCode::from(1))
}

/// The error and its causes, each said once ("a: b: c"), as ripgrep prints them.
fn chain(e: &lora_trainer::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
