//! The checks a session lent a GPU runs first (`gpu_check`, DESIGN.md §11): is the device path
//! right, and how fast and lean is it next to diffusers + peft on the same card.
//!
//! - **forward**: the tiny SD1 fixture's UNet, text encoder and VAE on the device, in f32 and in
//!   the half precision of the run, against diffusers' outputs for the same inputs
//!   (`tests/fixtures/tiny-sd1.reference.safetensors`);
//! - **train step**: three optimizer steps of the real trainer (SGD, so that an update is its
//!   gradient; text encoder trained, gradient checkpointing on) on the device against the same
//!   steps on the CPU in f32: loss, gradient norm and every adapter's update;
//! - **demo**: `configs/demo.yaml` trained on the device in half precision and on the CPU in f32:
//!   the loss curves side by side, the average losses compared, seconds per step;
//! - **bench**: [`super::run`] at the GPU target shape (SD 1.5, 512 px, batch 4) with and without
//!   gradient checkpointing, with diffusers + peft beside it when a Python is given.
//!
//! Every figure goes into one JSON report, written again after each section, so a run cut short
//! keeps what it measured. A section that fails records its error and the next one runs. On a
//! CPU the same checks run with f16 as the half precision (the path CUDA takes, see
//! `tests/train_step.rs`), which is how this code is tried without a GPU.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{BenchOptions, Preset};
use crate::config::{DeviceChoice, MixedPrecision, TrainPlan};
use crate::dataset::Dataset;
use crate::log::event_reader::{event_files, read_event_file, scalar_series};
use crate::log::DisplayMode;
use crate::models::load::{BaseModel, LoadOptions};
use crate::preflight::Preflight;
use crate::train::device::Compute;
use crate::train::setup::{set_up, Setup};
use crate::train::{train, RunOptions};
use crate::Result;

/// One comparison: a measured error (or ratio) against its bound.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    /// The check passes when `value <= tolerance`.
    pub tolerance: f64,
    pub pass: bool,
}

impl Check {
    fn new(name: impl Into<String>, value: f64, tolerance: f64) -> Check {
        Check {
            name: name.into(),
            value,
            tolerance,
            pass: value <= tolerance,
        }
    }
}

/// One part of the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Section {
    pub name: String,
    pub seconds: f64,
    pub checks: Vec<Check>,
    /// Figures that are measured, not judged (seconds per step, memory, loss curves).
    pub figures: serde_json::Map<String, serde_json::Value>,
    /// Why the section stopped, if it did.
    pub error: Option<String>,
}

/// The whole report (`gpu_check.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub device: String,
    pub half_precision: String,
    pub program: String,
    pub sections: Vec<Section>,
    /// Every check of every section passed and no section failed.
    pub passed: bool,
}

/// What to check, and where.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub device: DeviceChoice,
    /// The run's half precision: bf16 on CUDA; fp16 to try the checks on a CPU.
    pub half: MixedPrecision,
    /// The repository root (fixtures, demo model and data, configs, tools).
    pub root: PathBuf,
    /// Where the report and the runs' outputs go.
    pub out: PathBuf,
    /// A Python with torch, diffusers and peft for the bench's reference side.
    pub python: Option<PathBuf>,
    /// The bench's shape; `None` skips the bench.
    pub bench: Option<BenchShape>,
    /// Whether to train the demo.
    pub demo: bool,
}

/// The bench section's shape.
#[derive(Debug, Clone, Copy)]
pub struct BenchShape {
    pub preset: Preset,
    pub resolution: usize,
    pub batch: usize,
    pub steps: usize,
}

/// Stated tolerances: relative errors (max |a − b| / max |b|), as DESIGN.md §6 gives them for f32
/// and what bfloat16's 8-bit mantissa allows after a few dozen layers.
mod tolerance {
    pub const UNET_F32: f64 = 1e-3;
    pub const TEXT_F32: f64 = 1e-4;
    pub const VAE_F32: f64 = 1e-3;
    pub const HALF: f64 = 5e-2;
    /// Trainer steps on the device against the CPU's, f32: loss, gradient norm, updates.
    pub const STEP_F32: [f64; 3] = [1e-4, 1e-3, 1e-3];
    /// The same in half precision (the f16 CPU test allows 1 %, 3 %, 5 %; bf16 has 3 fewer
    /// mantissa bits).
    pub const STEP_HALF: [f64; 3] = [2e-2, 6e-2, 1e-1];
    /// The demo's average loss, half precision on the device against f32 on the CPU.
    pub const DEMO_AVERAGE: f64 = 5e-2;
}

/// Runs every section, writing `<out>/gpu_check.json` after each; returns the report.
pub fn run_checks(options: &CheckOptions) -> Result<DeviceReport> {
    std::fs::create_dir_all(&options.out).map_err(|e| crate::Error::io(&options.out, e))?;
    // The runs' configs name files by absolute path, wherever they are started from.
    let absolute = |p: &Path| p.canonicalize().map_err(|e| crate::Error::io(p, e));
    let options = &CheckOptions {
        root: absolute(&options.root)?,
        out: absolute(&options.out)?,
        ..options.clone()
    };
    let mut report = DeviceReport {
        device: options.device.to_string(),
        half_precision: options.half.to_string(),
        program: concat!("lora-trainer ", env!("CARGO_PKG_VERSION")).to_string(),
        sections: Vec::new(),
        passed: false,
    };
    // A device that cannot be opened is the report's first finding, not a lost run.
    let compute = match Compute::resolve(options.device, options.half) {
        Ok(compute) => compute,
        Err(e) => {
            report.sections.push(Section {
                name: "open the device".into(),
                error: Some(crate::Error::from(e).report()),
                ..Section::default()
            });
            write_report(&options.out, &report)?;
            return Ok(report);
        }
    };
    report.device = compute.device_name.clone();
    let half = half_dtype(options.half);
    let device = &compute.device;
    let mut sections: Vec<(String, Box<SectionRun<'_>>)> = vec![
        (
            "forward f32".into(),
            Box::new(|s: &mut Section| forward(options, device, DType::F32, s)),
        ),
        (
            format!("forward {}", options.half),
            Box::new(move |s: &mut Section| forward(options, device, half, s)),
        ),
        (
            "train step f32".into(),
            Box::new(|s: &mut Section| train_steps(options, device, DType::F32, s)),
        ),
        (
            format!("train step {}", options.half),
            Box::new(move |s: &mut Section| train_steps(options, device, half, s)),
        ),
    ];
    if options.demo {
        sections.push(("demo".into(), Box::new(|s: &mut Section| demo(options, s))));
    }
    if let Some(shape) = options.bench {
        for checkpointing in [false, true] {
            let name = if checkpointing {
                "bench, gradient checkpointing"
            } else {
                "bench"
            };
            sections.push((
                name.into(),
                Box::new(move |s: &mut Section| bench(options, shape, checkpointing, s)),
            ));
        }
    }
    for (name, run) in sections {
        let started = Instant::now();
        let mut section = Section {
            name,
            ..Section::default()
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut section)));
        section.error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.report()),
            Err(panic) => Some(format!("panicked: {}", panic_text(&panic))),
        };
        section.seconds = round3(started.elapsed().as_secs_f64());
        report.sections.push(section);
        report.passed = report
            .sections
            .iter()
            .all(|s| s.error.is_none() && s.checks.iter().all(|c| c.pass));
        write_report(&options.out, &report)?;
    }
    Ok(report)
}

/// What a section does, filling in its checks and figures.
type SectionRun<'a> = dyn Fn(&mut Section) -> Result<()> + 'a;

fn half_dtype(half: MixedPrecision) -> DType {
    match half {
        MixedPrecision::Bf16 => DType::BF16,
        MixedPrecision::Fp16 | MixedPrecision::No => DType::F16,
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "?".to_string())
}

fn write_report(out: &Path, report: &DeviceReport) -> Result<()> {
    let path = out.join("gpu_check.json");
    let mut json = serde_json::to_vec_pretty(report)
        .map_err(|e| crate::Error::io(&path, std::io::Error::other(e.to_string())))?;
    json.push(b'\n');
    crate::files::write_atomically(&path, &json)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// max |got − want| / max |want|, both taken to f64 on the CPU.
fn relative_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let want = want.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f64>()?;
    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// The tiny SD1 fixture's modules on `device` in `dtype` against diffusers' outputs.
fn forward(options: &CheckOptions, device: &Device, dtype: DType, s: &mut Section) -> Result<()> {
    let fixtures = options.root.join("tests/fixtures");
    let load = LoadOptions {
        dtype,
        device: device.clone(),
        ..LoadOptions::default()
    };
    let model = fixtures.join("tiny-sd1");
    let checkpoint = BaseModel::open_path(&model.to_string_lossy(), &load)?;
    let refs = candle_core::safetensors::load(
        fixtures.join("tiny-sd1.reference.safetensors"),
        &Device::Cpu,
    )?;
    let get = |key: &str| -> Result<Tensor> {
        refs.get(key).cloned().ok_or_else(|| {
            candle_core::Error::Msg(format!("reference tensor `{key}` missing")).into()
        })
    };
    let input = |key: &str| -> Result<Tensor> { Ok(get(key)?.to_dtype(dtype)?.to_device(device)?) };
    let f32_run = dtype == DType::F32;
    let bound = |f32_bound: f64| if f32_run { f32_bound } else { tolerance::HALF };

    let unet = checkpoint.unet(None)?;
    let out = unet.forward(
        &input("unet.sample")?,
        &get("unet.timesteps")?.to_device(device)?,
        &input("unet.encoder_hidden_states")?,
    )?;
    s.checks.push(Check::new(
        "unet.out",
        relative_error(&out, &get("unet.out")?)?,
        bound(tolerance::UNET_F32),
    ));

    let text = checkpoint.text_encoder(None)?;
    let ids = get("text.input_ids")?.to_device(device)?;
    s.checks.push(Check::new(
        "text.last_hidden_state",
        relative_error(&text.forward(&ids)?, &get("text.last_hidden_state")?)?,
        bound(tolerance::TEXT_F32),
    ));
    s.checks.push(Check::new(
        "text.clip_skip_2",
        relative_error(
            &text.forward_with_clip_skip(&ids, 2)?,
            &get("text.clip_skip_2")?,
        )?,
        bound(tolerance::TEXT_F32),
    ));

    let vae = checkpoint.vae()?;
    let latents = vae.encode(&input("vae.image")?)?;
    s.checks.push(Check::new(
        "vae.latent_mean",
        relative_error(&latents.mean, &get("vae.latent_mean")?)?,
        bound(tolerance::VAE_F32),
    ));
    s.checks.push(Check::new(
        "vae.decoded",
        relative_error(
            &vae.decode(&input("vae.latent_mean")?)?,
            &get("vae.decoded")?,
        )?,
        bound(tolerance::VAE_F32),
    ));
    Ok(())
}

/// A project in `dir`: six 64 px pictures with captions (three batches of two) and a config
/// training the tiny SD1 fixture with SGD, the text encoder and gradient checkpointing on.
fn step_project(root: &Path, dir: &Path, device: &str) -> Result<TrainPlan> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| crate::Error::io(&data, e))?;
    let mut csv = String::from("filename,prompt\n");
    for i in 0..6u32 {
        let path = data.join(format!("{i}.png"));
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * i) as u8, (90 + 30 * i) as u8])
        })
        .save(&path)
        .map_err(|e| crate::Error::io(&path, std::io::Error::other(e.to_string())))?;
        csv.push_str(&format!("{i}.png,picture {i} of a striped square\n"));
    }
    let csv_path = data.join("metadata.csv");
    std::fs::write(&csv_path, csv).map_err(|e| crate::Error::io(&csv_path, e))?;
    let text = format!(
        "train_data_dir: {d}\nmetadata_path: {d}/metadata.csv\nresolution: 64\nbase_model: {m}\n\
         output_dir: {o}\nbatch_size: 2\nlearning_rate: 1e-2\noptimizer: SGD\ndevice: {device}\n\
         train_text_encoder: true\ngradient_checkpointing: true\nmin_snr_gamma: 5\n",
        d = data.display(),
        m = root.join("tests/fixtures/tiny-sd1").display(),
        o = dir.join("out").display(),
    );
    Ok(TrainPlan::from_yaml(
        &text,
        &dir.join("config.yaml"),
        &[],
        dir,
    )?)
}

/// Three trainer steps on `device` in `dtype` against the same steps on the CPU in f32.
fn train_steps(
    options: &CheckOptions,
    device: &Device,
    dtype: DType,
    s: &mut Section,
) -> Result<()> {
    let dir = options.out.join(format!("train-step-{}", dtype.as_str()));
    let _ = std::fs::remove_dir_all(&dir);
    let plan = step_project(&options.root, &dir, "cpu")?;
    let preflight = Preflight::check(plan)?;
    let dataset = Dataset::open(&preflight.plan.dataset_spec())?;
    let trainer_on = |device: &Device, dtype: DType| -> Result<crate::train::Trainer> {
        let t = &preflight.plan.training;
        let mut compute = Compute::resolve(t.device, t.mixed_precision)?;
        compute.device = device.clone();
        compute.dtype = dtype;
        compute.matrix_dtype = None;
        let Setup { trainer, .. } = set_up(
            &preflight,
            &compute,
            &dataset,
            None,
            None,
            DisplayMode::Quiet,
        )?;
        Ok(trainer)
    };
    let mut reference = trainer_on(&Device::Cpu, DType::F32)?;
    let mut checked = trainer_on(device, dtype)?;
    let weights = |t: &crate::train::Trainer| -> Result<Vec<Vec<f32>>> {
        t.networks
            .trainable_vars()
            .iter()
            .map(|v| {
                Ok(v.as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1()?)
            })
            .collect()
    };
    let before = weights(&reference)?;
    let batches = dataset.epoch_batches(0, preflight.plan.training.batch_size);
    let [loss_tol, norm_tol, update_tol] = if dtype == DType::F32 {
        tolerance::STEP_F32
    } else {
        tolerance::STEP_HALF
    };
    let steps = 3.min(batches.len());
    let mut timings = (0f64, 0f64);
    for step in 0..steps {
        let started = Instant::now();
        let r = reference.step(&dataset, step, &batches[step..step + 1])?;
        timings.0 += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let c = checked.step(&dataset, step, &batches[step..step + 1])?;
        timings.1 += started.elapsed().as_secs_f64();
        s.checks.push(Check::new(
            format!("step {step} loss"),
            (c.loss - r.loss).abs() as f64 / r.loss.abs().max(1e-12) as f64,
            loss_tol,
        ));
        s.checks.push(Check::new(
            format!("step {step} gradient norm"),
            (c.grad_norm - r.grad_norm).abs() / r.grad_norm.max(1e-12),
            norm_tol,
        ));
    }
    // Each adapter's distance from the reference run, next to how far the reference moved it.
    let (after_ref, after_checked) = (weights(&reference)?, weights(&checked)?);
    let mut worst = 0f64;
    for ((b, r), c) in before.iter().zip(&after_ref).zip(&after_checked) {
        let moved: f64 = b.iter().zip(r).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let apart: f64 = r.iter().zip(c).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        if moved > 0.0 {
            worst = worst.max((apart / moved).sqrt());
        }
    }
    s.checks.push(Check::new(
        "adapter updates (worst distance / movement)",
        worst,
        update_tol,
    ));
    s.figures.insert("steps".into(), steps.into());
    s.figures
        .insert("cpu_f32_seconds".into(), round3(timings.0).into());
    s.figures
        .insert("device_seconds".into(), round3(timings.1).into());
    Ok(())
}

/// The demo config trained on the device in half precision and on the CPU in f32.
fn demo(options: &CheckOptions, s: &mut Section) -> Result<()> {
    let config = options.root.join("configs/demo.yaml");
    let mut averages = Vec::new();
    for (label, device, precision) in [
        (
            "device",
            options.device.to_string(),
            options.half.to_string(),
        ),
        ("cpu", "cpu".to_string(), "no".to_string()),
    ] {
        let out = options.out.join(format!("demo-{label}"));
        let _ = std::fs::remove_dir_all(&out);
        let sets = vec![
            format!("device={device}"),
            format!("mixed_precision={precision}"),
            format!("output_dir={}", out.display()),
        ];
        let plan = crate::files::read_text(&config, crate::files::TEXT_LIMIT, "a config file")
            .map_err(|e| crate::Error::io(&config, e))
            .and_then(|text| Ok(TrainPlan::from_yaml(&text, &config, &sets, &options.root)?))?;
        let preflight = Preflight::check(plan)?;
        let run = RunOptions {
            resume: None,
            overwrite: true,
            display: DisplayMode::Quiet,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let report = train(preflight, &run)?;
        let summary = &report.summary;
        let curve = loss_curve(&out.join("logs"))?;
        s.figures.insert(
            format!("{label}_seconds_per_step"),
            summary.seconds_per_step.into(),
        );
        s.figures
            .insert(format!("{label}_average_loss"), summary.average_loss.into());
        s.figures
            .insert(format!("{label}_final_loss"), summary.final_loss.into());
        s.figures
            .insert(format!("{label}_loss_curve"), curve.into());
        averages.push(summary.average_loss.unwrap_or(f32::NAN) as f64);
    }
    s.checks.push(Check::new(
        "average loss, device against CPU (relative)",
        (averages[0] - averages[1]).abs() / averages[1].abs(),
        tolerance::DEMO_AVERAGE,
    ));
    Ok(())
}

/// `loss/current` of the run's TensorBoard files, in step order.
fn loss_curve(logs: &Path) -> Result<Vec<f32>> {
    let mut points = Vec::new();
    for file in event_files(logs)? {
        let events = read_event_file(&file)?;
        points.extend(scalar_series(&events, "loss/current"));
    }
    points.sort_by_key(|(step, _)| *step);
    Ok(points.into_iter().map(|(_, v)| v).collect())
}

/// The step benchmark at `shape`, with the reference beside it when a Python is given.
fn bench(
    options: &CheckOptions,
    shape: BenchShape,
    checkpointing: bool,
    s: &mut Section,
) -> Result<()> {
    let bench_options = BenchOptions {
        preset: shape.preset,
        resolution: shape.resolution,
        batch: shape.batch,
        steps: shape.steps,
        gradient_checkpointing: checkpointing,
        device: options.device,
        mixed_precision: options.half,
        ..BenchOptions::default()
    };
    let report = super::run(&bench_options, options.python.as_ref())?;
    s.figures.insert("table".into(), report.table().into());
    let mut side = |name: &str, m: &super::Measurement| {
        s.figures.insert(
            format!("{name}_step_seconds"),
            m.step_seconds.clone().into(),
        );
        s.figures.insert(
            format!("{name}_images_per_second"),
            (shape.batch as f64 / m.min_seconds()).into(),
        );
        s.figures.insert(
            format!("{name}_peak_device_bytes"),
            m.peak_device_bytes.into(),
        );
        s.figures
            .insert(format!("{name}_peak_rss_bytes"), m.peak_rss_bytes.into());
        s.figures
            .insert(format!("{name}_last_loss"), (m.last_loss as f64).into());
    };
    side("ours", &report.ours);
    if let Some(reference) = &report.reference {
        side("reference", reference);
        s.figures.insert(
            "time_ratio_ours_over_reference".into(),
            (report.ours.min_seconds() / reference.min_seconds()).into(),
        );
        if let (Some(a), Some(b)) = (report.ours.peak_device_bytes, reference.peak_device_bytes) {
            s.figures.insert(
                "memory_ratio_ours_over_reference".into(),
                (a as f64 / b as f64).into(),
            );
        }
    }
    Ok(())
}
