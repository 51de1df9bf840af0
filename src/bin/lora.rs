//! `lora inspect FILE`: look into a LoRA file (format, base model, metadata, modules). Exit
//! status 2 when the file is not a usable LoRA, with the reason.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lora_trainer::lora::Inspection;

/// Work with LoRA files (kohya/A1111 or diffusers format).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a LoRA file's format, base model, metadata and modules (rank, alpha, dtype, norms).
    Inspect {
        /// The `.safetensors` LoRA file.
        file: PathBuf,
    },
}

/// Prints to stdout; a closed pipe (`lora inspect F | head`) ends the output quietly.
fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.command {
        Command::Inspect { file } => Inspection::read(file).map(|i| print_text(&i.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
