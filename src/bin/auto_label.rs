//! `auto_label --input DIR [...]`: caption a folder of pictures with CLIP into the metadata.csv
//! that `train` reads. Parses arguments, shows progress, prints the summary and errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lora_trainer::config::DeviceChoice;
use lora_trainer::label::model_files::{DEFAULT_BLIP_MODEL, DEFAULT_CLIP_MODEL};
use lora_trainer::label::{
    default_output, run, Captioner, ComposeRules, EmbeddingCache, LabelOptions, LabelSummary,
    Progress,
};
use lora_trainer::models::hub::HubCache;

/// Caption a folder of images with CLIP (and BLIP on request), writing a metadata.csv that
/// keeps every hand-edited caption.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The folder of images to caption.
    #[arg(long, value_name = "DIR")]
    input: PathBuf,
    /// The CSV to write [default: DIR/metadata.csv]. Existing rows are kept as they are; file
    /// names in it are relative to --input (use that folder as train_data_dir).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// CLIP model: a local folder, or a hub id (read from the Hugging Face cache, downloaded into it when missing; HF_HUB_OFFLINE=1 forbids downloads).
    #[arg(long, value_name = "ID_OR_DIR", default_value = DEFAULT_CLIP_MODEL)]
    model: String,
    /// A folder of phrase lists (subjects.txt, media.txt, ...) instead of the built-in ones
    /// (tools/labels).
    #[arg(long, value_name = "DIR")]
    vocab: Option<PathBuf>,
    /// Text put first in every new caption (a trigger word).
    #[arg(long, value_name = "TEXT")]
    prefix: Option<String>,
    /// At most this many phrases from each list after the subject.
    #[arg(long, value_name = "N", default_value_t = ComposeRules::default().top_k)]
    top_k: usize,
    /// How much a phrase's cosine similarity must exceed its list's median to be used.
    #[arg(long, value_name = "COSINE", default_value_t = ComposeRules::default().margin)]
    margin: f32,
    /// Who writes the start of each caption: CLIP's best subject phrase, or a BLIP sentence.
    #[arg(long, value_enum, default_value_t = CaptionerArg::Clip)]
    captioner: CaptionerArg,
    /// BLIP model for `--captioner blip`: a local folder or a hub id.
    #[arg(long, value_name = "ID_OR_DIR", default_value = DEFAULT_BLIP_MODEL)]
    blip_model: String,
    /// Caption every image again, replacing the captions of existing rows.
    #[arg(long)]
    overwrite: bool,
    /// Include images in subfolders (their names keep the folder: `sub/a.png`).
    #[arg(long)]
    recursive: bool,
    /// Images per forward pass.
    #[arg(long, value_name = "N", default_value_t = 8)]
    batch_size: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = DeviceChoice::parse)]
    device: DeviceChoice,
    /// Where vocabulary embeddings are cached [default: ~/.cache/lora-trainer/...].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the vocabulary embedding cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CaptionerArg {
    Clip,
    Blip,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run_args(&args) {
        Ok(summary) => {
            print_summary(&summary);
            if summary.failed.is_empty() {
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

fn run_args(args: &Args) -> lora_trainer::Result<LabelSummary> {
    let device = args.device.device()?;
    let cache = if args.no_cache {
        EmbeddingCache::disabled()
    } else {
        match &args.cache_dir {
            Some(dir) => EmbeddingCache::at(dir),
            None => EmbeddingCache::from_env(),
        }
    };
    let options = LabelOptions {
        output: args
            .output
            .clone()
            .unwrap_or_else(|| default_output(&args.input)),
        input: args.input.clone(),
        model: args.model.clone(),
        blip_model: args.blip_model.clone(),
        vocab: args.vocab.clone(),
        prefix: args.prefix.clone(),
        rules: ComposeRules {
            top_k: args.top_k,
            margin: args.margin,
        },
        captioner: match args.captioner {
            CaptionerArg::Clip => Captioner::Clip,
            CaptionerArg::Blip => Captioner::Blip,
        },
        overwrite: args.overwrite,
        recursive: args.recursive,
        batch_size: args.batch_size,
        device,
        cache,
        hub_cache: HubCache::from_env(),
    };
    run(&options, &Bar::new())
}

/// An indicatif bar on stderr (hidden when stderr is not a terminal).
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::hidden();
        Bar { bar }
    }
}

impl Progress for Bar {
    fn note(&self, text: &str) {
        self.bar.suspend(|| eprintln!("{text}"));
    }

    fn start(&self, total: usize) {
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar.set_length(total as u64);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{spinner} captioning [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.bar.enable_steady_tick(Duration::from_millis(200));
    }

    fn advance(&self, n: usize) {
        self.bar.inc(n as u64);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn print_summary(summary: &LabelSummary) {
    for warning in &summary.warnings {
        eprintln!("warning: {warning}");
    }
    if !summary.failed.is_empty() {
        eprintln!(
            "{} image(s) could not be read and were skipped:",
            summary.failed.len()
        );
        for (name, reason) in &summary.failed {
            eprintln!("  {name}: {reason}");
        }
    }
    let captioned = summary.processed.saturating_sub(summary.failed.len());
    if captioned > 0 {
        println!(
            "captioned {captioned} image(s) in {:.1} s ({:.2} images/s)",
            summary.elapsed.as_secs_f64(),
            summary.images_per_second()
        );
    }
    let mut line = format!(
        "{}: {} new, {} kept",
        summary.output.display(),
        summary.new,
        summary.kept
    );
    if summary.replaced > 0 {
        line.push_str(&format!(", {} rewritten", summary.replaced));
    }
    line.push_str(&format!(", {} failed", summary.failed.len()));
    if !summary.written {
        line.push_str(" (file unchanged)");
    }
    println!("{line}");
}
