//! `train --config FILE [--set key=value]... [--dry-run] [--resume DIR|latest] [--overwrite]`:
//! parse arguments, run, print errors. Exit status: 0 done, 1 failure, 2 bad input, 130 stopped
//! by Ctrl-C / SIGTERM (with a resumable state).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lora_trainer::config::{Task, TrainPlan};
use lora_trainer::llm::LmPreflight;
use lora_trainer::log::memory::gib;
use lora_trainer::log::DisplayMode;
use lora_trainer::preflight::Preflight;
use lora_trainer::train::interrupt::install_stop_handler;
use lora_trainer::train::{train, RunEnd, RunOptions};

/// Train a LoRA adapter from a YAML config: Stable Diffusion (a kohya-format file) or a
/// language model (`task: llm`, a PEFT adapter folder).
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
    /// Continue a stopped run: a `state-step…` folder of the output folder, or `latest`.
    #[arg(long, value_name = "DIR|latest", conflicts_with = "overwrite")]
    resume: Option<String>,
    /// Replace a finished run found in `output_dir` (its LoRA files, states and summary).
    #[arg(long)]
    overwrite: bool,
    /// No progress bar or progress lines.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    lora_trainer::nn::runtime::tune_process();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(args: &Args) -> lora_trainer::Result<ExitCode> {
    let plan = TrainPlan::load(&args.config, &args.overrides)?;
    let options = || -> lora_trainer::Result<RunOptions> {
        Ok(RunOptions {
            resume: args.resume.clone(),
            overwrite: args.overwrite,
            display: DisplayMode::detect(args.quiet),
            stop: install_stop_handler()?,
        })
    };
    let report = match plan.task {
        Task::Image => {
            let preflight = Preflight::check(plan)?;
            if args.dry_run {
                print!("{preflight}");
                return Ok(ExitCode::SUCCESS);
            }
            for warning in preflight.warnings() {
                eprintln!("warning: {warning}");
            }
            train(preflight, &options()?)?
        }
        Task::Llm(_) => {
            let preflight = LmPreflight::check(plan)?;
            if args.dry_run {
                print!("{preflight}");
                return Ok(ExitCode::SUCCESS);
            }
            for warning in &preflight.warnings {
                eprintln!("warning: {warning}");
            }
            lora_trainer::llm::train(preflight, &options()?)?
        }
    };
    match report.end {
        RunEnd::Finished { lora } => {
            let peak = report
                .summary
                .peak_memory_bytes
                .map(|b| format!(" (peak memory {})", gib(b)))
                .unwrap_or_default();
            eprintln!("done: {}{peak}", lora.display());
            Ok(ExitCode::SUCCESS)
        }
        RunEnd::Interrupted { state: Some(state) } => {
            eprintln!(
                "stopped after step {}; the state is in {}\nresume with:\n  {}",
                report.summary.steps,
                state.display(),
                resume_command(args, &state)
            );
            Ok(ExitCode::from(130))
        }
        RunEnd::Interrupted { state: None } => {
            eprintln!("stopped before the first step; nothing to resume");
            Ok(ExitCode::from(130))
        }
    }
}

/// The command that continues the run from `state`, with this run's config and overrides.
fn resume_command(args: &Args, state: &std::path::Path) -> String {
    let mut words = vec![
        "cargo run --release --bin train --".to_string(),
        "--config".to_string(),
        shell_word(&args.config.to_string_lossy()),
    ];
    for set in &args.overrides {
        words.push("--set".into());
        words.push(shell_word(set));
    }
    words.push("--resume".into());
    words.push(shell_word(&state.to_string_lossy()));
    words.join(" ")
}

/// `word`, quoted for a POSIX shell when it needs to be.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
