//! The training-speed benchmark behind `cargo run --release --bin bench`: optimizer steps of a
//! LoRA on an SD-shaped UNet with random weights, in the cached-latent setting (random latents
//! and text context stand in for the VAE and the text encoder, which a cached run does not
//! call), and the same steps in diffusers + peft through `tools/bench_diffusers.py` for a
//! side-by-side table.
//!
//! Reported per side: seconds per step (min and median over the timed steps, after warm-up),
//! peak resident memory (the process's `VmHWM`) and achieved GFLOP/s. The FLOPs are those our
//! layers count while running one forward ([`crate::nn::flops`]), turned into a training step's
//! with [`TrainingFlops`]; both sides run the same model, so the same count serves both.

pub mod device_check;
mod gpu_memory;
pub mod llm;
mod reference;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::{
    DeviceChoice, LoraSettings, MixedPrecision, SaveFormat, SavePrecision, TargetModules,
};
use crate::lora::{LoraNetworks, NetworkOptions};
use crate::models::conditioning::Conditioning;
use crate::models::noise::{NoiseSchedule, SchedulerConfig};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::nn::flops::{self, TrainingFlops};
use crate::nn::profile;
use crate::nn::{Scope, WeightStore};
use crate::train::device::Compute;
use crate::train::optim::{AdamW, AdamWSettings, ParamGroup, ParamOptimizer};
use crate::train::step::{diffusion_loss, Draws};
use crate::Result;

use gpu_memory::DeviceMemory;
pub use reference::run_reference;

/// The SD 1.5 UNet's `config.json` (diffusers' `stable-diffusion-v1-5/unet`).
pub const SD15_UNET_CONFIG: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// The SDXL base 1.0 UNet's `config.json` (diffusers' `stable-diffusion-xl-base-1.0/unet`).
pub const SDXL_UNET_CONFIG: &str = r#"{
  "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "center_input_sample": false, "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "use_linear_projection": true
}"#;

/// The bundled demo model's UNet config.
pub const TINY_UNET_CONFIG: &str = include_str!("../../models/demo-sd/unet/config.json");

/// Which UNet to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The SD 1.5 architecture (860 M parameters), random weights.
    Sd15,
    /// The SDXL base architecture (2.6 B parameters), random weights; the added conditioning
    /// (pooled text embedding, size ids) is random too.
    Sdxl,
    /// The bundled demo model's architecture, random weights (seconds, for smoke tests).
    Tiny,
}

impl Preset {
    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15",
            Preset::Sdxl => "sdxl",
            Preset::Tiny => "tiny",
        }
    }

    /// The UNet's diffusers config as JSON.
    pub fn unet_config_json(self) -> &'static str {
        match self {
            Preset::Sd15 => SD15_UNET_CONFIG,
            Preset::Sdxl => SDXL_UNET_CONFIG,
            Preset::Tiny => TINY_UNET_CONFIG,
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: Preset,
    /// Image side in pixels; the latent side is an eighth of it.
    pub resolution: usize,
    pub batch: usize,
    /// LoRA rank (alpha = rank) on every UNet `to_q` and `to_v`.
    pub rank: usize,
    /// Timed optimizer steps.
    pub steps: usize,
    /// Untimed steps first (allocator and caches warm up).
    pub warmup: usize,
    pub gradient_checkpointing: bool,
    /// Time each kind of op during the timed steps ([`crate::nn::profile`]).
    pub breakdown: bool,
    /// Text-context tokens (77 for CLIP).
    pub tokens: usize,
    pub seed: u64,
    /// Where to run our side (`cpu`, `cuda:N`); the reference runs on the same kind of device.
    pub device: DeviceChoice,
    /// The frozen weights' dtype, as in the config (`bf16`/`fp16` on CUDA only).
    pub mixed_precision: MixedPrecision,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            preset: Preset::Sd15,
            resolution: 256,
            batch: 1,
            rank: 8,
            steps: 3,
            warmup: 1,
            gradient_checkpointing: false,
            breakdown: false,
            tokens: 77,
            seed: 0,
            device: DeviceChoice::Cpu,
            mixed_precision: MixedPrecision::No,
        }
    }
}

impl BenchOptions {
    /// `[B, 4, resolution/8, resolution/8]`.
    pub fn latent_dims(&self, in_channels: usize) -> Vec<usize> {
        let side = self.resolution / 8;
        vec![self.batch, in_channels, side, side]
    }

    fn check(&self) -> Result<()> {
        let problem = if self.resolution == 0 || !self.resolution.is_multiple_of(64) {
            Some(format!(
                "--resolution {} must be a positive multiple of 64",
                self.resolution
            ))
        } else if self.batch == 0 || self.rank == 0 || self.steps == 0 {
            Some("--batch, --rank and --steps must be at least 1".to_string())
        } else {
            None
        };
        match problem {
            Some(p) => Err(candle_core::Error::Msg(format!("bench: {p}")).into()),
            None => Ok(()),
        }
    }
}

/// The numbers of one side of the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Who ran: `lora-trainer` or `diffusers+peft`.
    pub name: String,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Peak resident set size of the process, bytes (`None` when it cannot be read).
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory the run took, bytes (`None` on the CPU): for us the driver's used memory
    /// (total − free, sampled every few milliseconds) above what was in use before the model
    /// was built; for PyTorch `torch.cuda.max_memory_reserved()`.
    pub peak_device_bytes: Option<u64>,
    /// Trainable LoRA parameters.
    pub lora_parameters: usize,
    /// The last step's loss (a sanity check: finite, of order one).
    pub last_loss: f32,
    /// Library versions and settings of the reference run, printed under the table.
    pub versions: Option<String>,
    /// Seconds per kind of op over the timed steps, when asked for (`--breakdown`).
    pub breakdown: Vec<profile::Entry>,
}

impl Measurement {
    /// The fastest step.
    pub fn min_seconds(&self) -> f64 {
        self.step_seconds
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    /// The median step.
    pub fn median_seconds(&self) -> f64 {
        let mut s = self.step_seconds.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }
}

/// Everything the bench binary prints.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub options: BenchOptions,
    pub flops: TrainingFlops,
    pub ours: Measurement,
    pub reference: Option<Measurement>,
}

impl BenchReport {
    /// A plain-text table, one row per side.
    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = format!(
            "preset {}, {} px (latent {}×{}), batch {}, LoRA r={} on to_q/to_v, {} timed steps after {} warm-up{}, device {}, mixed precision {}\n\
             model FLOPs per step: {:.1} GFLOP (2×dense + 3×attention forward, counted)\n\n",
            o.preset.name(),
            o.resolution,
            o.resolution / 8,
            o.resolution / 8,
            o.batch,
            o.rank,
            o.steps,
            o.warmup,
            if o.gradient_checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            },
            o.device,
            o.mixed_precision,
            self.flops.0 as f64 / 1e9,
        );
        let sides: Vec<&Measurement> = std::iter::once(&self.ours)
            .chain(self.reference.as_ref())
            .collect();
        let gpu = sides.iter().any(|m| m.peak_device_bytes.is_some());
        let gib = |b: Option<u64>| {
            b.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_else(|| "?".to_string())
        };
        out.push_str(&format!(
            "{:<16} {:>10} {:>10} {:>8} {:>12}{} {:>10} {:>12} {:>10}\n",
            "",
            "min s/step",
            "median s",
            "img/s",
            "peak RSS",
            if gpu {
                format!(" {:>12}", "GPU memory")
            } else {
                String::new()
            },
            "GFLOP/s",
            "LoRA params",
            "loss"
        ));
        for m in sides {
            out.push_str(&format!(
                "{:<16} {:>10.3} {:>10.3} {:>8.2} {:>12}{} {:>10.1} {:>12} {:>10.4}\n",
                m.name,
                m.min_seconds(),
                m.median_seconds(),
                o.batch as f64 / m.min_seconds(),
                gib(m.peak_rss_bytes),
                if gpu {
                    format!(" {:>12}", gib(m.peak_device_bytes))
                } else {
                    String::new()
                },
                self.flops.0 as f64 / 1e9 / m.min_seconds(),
                m.lora_parameters,
                m.last_loss
            ));
        }
        out.push_str(&breakdown_table(&self.ours));
        if let Some(r) = &self.reference {
            if let Some(v) = &r.versions {
                out.push_str(&format!("({}: {v})\n", r.name));
            }
            out.push_str(&format!(
                "\nspeed-up (min over min): {:.2}×\n",
                r.min_seconds() / self.ours.min_seconds()
            ));
        }
        out
    }
}

/// What the graph of `loss` keeps alive for backward: the distinct CPU buffers of its tensors
/// (views count once), in total and by shape (the largest eight).
fn kept_for_backward(loss: &Tensor) -> String {
    use std::collections::HashMap;
    let mut buffers: HashMap<usize, (usize, Vec<usize>)> = HashMap::new();
    for t in loss.sorted_nodes() {
        let (storage, _) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let (key, bytes) = match cpu {
                candle_core::CpuStorage::F32(v) => (v.as_ptr() as usize, v.len() * 4),
                candle_core::CpuStorage::F64(v) => (v.as_ptr() as usize, v.len() * 8),
                candle_core::CpuStorage::F16(v) => (v.as_ptr() as usize, v.len() * 2),
                candle_core::CpuStorage::BF16(v) => (v.as_ptr() as usize, v.len() * 2),
                _ => continue,
            };
            buffers.entry(key).or_insert((bytes, t.dims().to_vec()));
        }
    }
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let total: usize = buffers.values().map(|(b, _)| b).sum();
    let mut by_shape: HashMap<Vec<usize>, (usize, usize)> = HashMap::new();
    for (bytes, dims) in buffers.values() {
        let e = by_shape.entry(dims.clone()).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    let mut shapes: Vec<_> = by_shape.into_iter().collect();
    shapes.sort_by_key(|(_, (_, bytes))| std::cmp::Reverse(*bytes));
    let mut out = format!(
        "kept for backward: {} buffers, {:.1} MiB; largest by shape:\n",
        buffers.len(),
        mib(total)
    );
    for (dims, (n, bytes)) in shapes.iter().take(8) {
        out.push_str(&format!("  {:>8.1} MiB  {n:>4} × {dims:?}\n", mib(*bytes)));
    }
    out
}

/// Seconds per timed step for each kind of op (empty without `--breakdown`).
fn breakdown_table(m: &Measurement) -> String {
    if m.breakdown.is_empty() {
        return String::new();
    }
    let steps = m.step_seconds.len().max(1) as f64;
    let step = m.step_seconds.iter().sum::<f64>() / steps;
    let mut out = format!(
        "\n{} per step (of {step:.3} s):\n{:<28} {:>8} {:>8} {:>6} {:>8}\n",
        m.name, "op", "calls", "seconds", "share", "GFLOP/s"
    );
    for e in &m.breakdown {
        let rate = if e.flops > 0 {
            format!("{:.1}", e.flops as f64 / e.seconds / 1e9)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{:<28} {:>8} {:>8.3} {:>5.1}% {:>8}\n",
            e.name,
            (e.calls as f64 / steps).round(),
            e.seconds / steps,
            100.0 * e.seconds / steps / step,
            rate
        ));
    }
    out
}

/// The UNet of `preset` with random weights and LoRA adapters (rank `rank`, alpha = rank) on
/// every `to_q` and `to_v`, plus its networks.
pub fn build_unet(
    preset: Preset,
    rank: usize,
    seed: u64,
    device: &Device,
    dtype: DType,
    matrix_dtype: Option<DType>,
) -> Result<(UNet2DConditionModel, LoraNetworks)> {
    let config = UNetConfig::from_json_str(preset.unet_config_json(), preset.name())?;
    let settings = LoraSettings {
        rank: rank as u32,
        alpha: rank as f64,
        dropout: 0.0,
        rank_dropout: 0.0,
        module_dropout: 0.0,
        conv_lora: false,
        conv_rank: rank as u32,
        conv_alpha: rank as f64,
        target_modules: TargetModules::Names(vec!["to_q".into(), "to_v".into()]),
        train_text_encoder: false,
        network_weights: None,
        save_precision: SavePrecision::Fp16,
        save_format: SaveFormat::Kohya,
    };
    let networks = LoraNetworks::new(&settings, None, NetworkOptions::new(seed, device))?;
    let mut store = WeightStore::random(seed, dtype, device.clone());
    store.set_matrix_dtype(matrix_dtype);
    let unet =
        UNet2DConditionModel::new(Scope::root(&store).with_adapters(&networks.unet), &config)?;
    networks.check_built()?;
    Ok((unet, networks))
}

pub use crate::log::memory::peak_rss_bytes;

/// Runs our side: builds the model, counts one forward's FLOPs, then `warmup + steps` optimizer
/// steps (forward, loss, backward, AdamW), timing the last `steps`.
pub fn run_ours(options: &BenchOptions) -> Result<(Measurement, TrainingFlops)> {
    options.check()?;
    // As training: on the CPU `fp16`/`bf16` keeps the weights in half precision, computing in f32.
    let compute = Compute::resolve(options.device, options.mixed_precision)?;
    for warning in &compute.warnings {
        eprintln!("warning: {warning}");
    }
    let device = compute.device.clone();
    let gpu_memory = DeviceMemory::watch(&device);
    let (mut unet, networks) = build_unet(
        options.preset,
        options.rank,
        options.seed,
        &device,
        compute.dtype,
        compute.matrix_dtype,
    )?;
    if options.breakdown {
        if let Some(rss) = peak_rss_bytes() {
            eprintln!(
                "peak resident memory after building the model: {:.2} GiB",
                rss as f64 / (1u64 << 30) as f64
            );
        }
    }
    unet.set_gradient_checkpointing(options.gradient_checkpointing);
    networks.set_training(true);
    let config = unet.config().clone();
    let schedule = NoiseSchedule::from_config(
        &SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            ..SchedulerConfig::default()
        },
        "bench",
    )?;
    let latent_dims = options.latent_dims(config.in_channels);
    let mut rng = crate::rng::stream(options.seed, 0, 0, 0, crate::rng::Purpose::Noise);
    let n: usize = latent_dims.iter().product();
    let latents = Tensor::from_vec(
        crate::rng::normal_f32(&mut rng, n),
        latent_dims.as_slice(),
        &device,
    )?;
    let context_dims = (options.batch, options.tokens, config.cross_attention_dim[0]);
    let m = context_dims.0 * context_dims.1 * context_dims.2;
    let context = Tensor::from_vec(crate::rng::normal_f32(&mut rng, m), context_dims, &device)?;
    // SDXL's added conditioning: a pooled text embedding and each sample's size ids (the
    // picture uncropped at the bench's resolution).
    let (pooled, size_ids) = match &config.addition {
        Some(addition) => {
            let width = addition.input_dim - 6 * addition.time_ids_dim;
            let pooled = Tensor::from_vec(
                crate::rng::normal_f32(&mut rng, options.batch * width),
                (options.batch, width),
                &device,
            )?;
            let side = options.resolution as f32;
            let ids = [side, side, 0.0, 0.0, side, side].repeat(options.batch);
            let ids = Tensor::from_vec(ids, (options.batch, 6), &device)?;
            (Some(pooled), Some(ids))
        }
        None => (None, None),
    };
    let conditioning = Conditioning {
        context: context.clone(),
        pooled,
    };

    // One forward without gradients, to count the model's FLOPs.
    let draws = Draws::sample(options.seed, 0, 0, &latent_dims, 1000, 0.0, &device)?;
    flops::take();
    {
        let noisy = schedule.add_noise(&latents, &draws.noise, &draws.timesteps)?;
        let added = conditioning.text_time(size_ids.as_ref());
        unet.forward_with(
            &noisy.detach(),
            &draws.timesteps,
            &conditioning.context,
            added.as_ref(),
            &mut |_, _| Ok(()),
        )?;
    }
    let training_flops = TrainingFlops::from(flops::take());

    let named = networks.unet.named_vars();
    let lora_parameters = named.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = AdamW::new(
        vec![ParamGroup::new("unet", 1e-2, named)],
        AdamWSettings::default(),
    )?;
    let mut step_seconds = Vec::with_capacity(options.steps);
    let mut last_loss = f32::NAN;
    for step in 0..options.warmup + options.steps {
        if step == options.warmup && options.breakdown {
            profile::take();
            profile::enable(true);
        }
        let start = Instant::now();
        networks.set_step(step as u64, 0);
        let draws = Draws::sample(
            options.seed,
            step as u64,
            0,
            &latent_dims,
            1000,
            0.0,
            &device,
        )?;
        let heap_before = profile::heap_bytes();
        let loss = {
            let _t = profile::scope("step: forward and loss");
            diffusion_loss(
                &unet,
                &schedule,
                &latents,
                &conditioning,
                size_ids.as_ref(),
                &draws,
                None,
            )?
        };
        if options.breakdown && step == options.warmup {
            eprint!("{}", kept_for_backward(&loss.loss));
            if let (Some(before), Some(after)) = (heap_before, profile::heap_bytes()) {
                eprintln!(
                    "heap held by the graph after forward (custom ops' saved tensors \
                     included): {:.1} MiB",
                    after.saturating_sub(before) as f64 / (1u64 << 20) as f64
                );
            }
        }
        let heap_after_forward = profile::heap_bytes();
        let _ = profile::take_heap_peak();
        let grads = {
            let _t = profile::scope("step: backward");
            loss.loss.backward()?
        };
        if options.breakdown && step == options.warmup {
            if let (Some(before), Some(peak)) = (heap_after_forward, profile::take_heap_peak()) {
                eprintln!(
                    "heap peak during backward above the heap after forward: {:.1} MiB",
                    peak.saturating_sub(before) as f64 / (1u64 << 20) as f64
                );
            }
        }
        {
            let _t = profile::scope("step: optimizer");
            optimizer.step(&grads, &[1e-4])?;
            drop(grads);
        }
        last_loss = loss.value;
        device.synchronize()?;
        if step >= options.warmup {
            step_seconds.push(start.elapsed().as_secs_f64());
        }
    }
    profile::enable(false);
    let breakdown = if options.breakdown {
        profile::take()
    } else {
        Vec::new()
    };
    Ok((
        Measurement {
            name: "lora-trainer".into(),
            step_seconds,
            peak_rss_bytes: peak_rss_bytes(),
            peak_device_bytes: gpu_memory.peak(),
            lora_parameters,
            last_loss,
            versions: None,
            breakdown,
        },
        training_flops,
    ))
}

/// Runs our side and, when `reference_python` is given, diffusers + peft on the same shapes.
pub fn run(options: &BenchOptions, reference_python: Option<&PathBuf>) -> Result<BenchReport> {
    let (ours, flops) = run_ours(options)?;
    let reference = match reference_python {
        Some(python) => Some(run_reference(python, options)?),
        None => None,
    };
    Ok(BenchReport {
        options: options.clone(),
        flops,
        ours,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_min_of_step_times() {
        let m = Measurement {
            name: "x".into(),
            step_seconds: vec![3.0, 1.0, 2.0, 10.0],
            peak_rss_bytes: None,
            peak_device_bytes: None,
            lora_parameters: 0,
            last_loss: 0.0,
            versions: None,
            breakdown: Vec::new(),
        };
        assert_eq!(m.min_seconds(), 1.0);
        assert_eq!(m.median_seconds(), 2.5);
    }

    #[test]
    fn the_tiny_preset_trains_and_counts_flops() -> Result<()> {
        let options = BenchOptions {
            preset: Preset::Tiny,
            resolution: 64,
            steps: 2,
            warmup: 0,
            ..BenchOptions::default()
        };
        let (m, flops) = run_ours(&options)?;
        assert_eq!(m.step_seconds.len(), 2);
        assert!(m.last_loss.is_finite() && m.last_loss > 0.0);
        // 2 down/up CrossAttn blocks + mid, to_q and to_v each: r·(in + out) parameters.
        assert!(m.lora_parameters > 0 && m.lora_parameters % 8 == 0);
        assert!(flops.0 > 1_000_000, "{flops:?}");
        assert!(BenchOptions {
            resolution: 100,
            ..options
        }
        .check()
        .is_err());
        Ok(())
    }

    #[test]
    fn sd15_has_its_parameter_count_and_lora_size() -> Result<()> {
        // Shape-only: no memory, no compute. 859.5 M parameters; PEFT r=8 on to_q/to_v: 797,184.
        let config = UNetConfig::from_json_str(SD15_UNET_CONFIG, "sd15")?;
        let settings_rank = 8;
        let store = WeightStore::shape_only(DType::F32, Device::Cpu);
        let (_, networks) = {
            let networks = LoraNetworks::plan_only(
                &LoraSettings {
                    rank: settings_rank,
                    alpha: 8.0,
                    dropout: 0.0,
                    rank_dropout: 0.0,
                    module_dropout: 0.0,
                    conv_lora: false,
                    conv_rank: 8,
                    conv_alpha: 8.0,
                    target_modules: TargetModules::Names(vec!["to_q".into(), "to_v".into()]),
                    train_text_encoder: false,
                    network_weights: None,
                    save_precision: SavePrecision::Fp16,
                    save_format: SaveFormat::Kohya,
                },
                None,
            )?;
            let unet = UNet2DConditionModel::new(
                Scope::root(&store).with_adapters(&networks.unet),
                &config,
            )?;
            (unet, networks)
        };
        let params: usize = networks.unet.modules().iter().map(|m| m.parameters()).sum();
        assert_eq!(params, 797_184);
        Ok(())
    }
}
