//! `bench --preset llm`: LoRA training steps on a causal language model with random weights
//! (Qwen2.5-0.5B-Instruct's config, or a folder's `config.json`), random tokens all learned,
//! and the same steps in transformers + peft through `tools/bench_transformers.py`, side by
//! side: seconds per step, tokens per second, peak resident memory.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;

use super::reference::{flags, reference_device, run_script, LLM_SCRIPT};
use super::{peak_rss_bytes, Measurement};
use crate::config::{
    DeviceChoice, LoraSettings, MixedPrecision, SaveFormat, SavePrecision, TargetModules,
};
use crate::llm::network::LmNetwork;
use crate::models::causal_lm::{CausalLm, CausalLmConfig};
use crate::nn::{profile, Scope, WeightStore};
use crate::train::device::Compute;
use crate::train::optim::{AdamW, AdamWSettings, ParamGroup, ParamOptimizer};
use crate::Result;

/// Qwen/Qwen2.5-0.5B-Instruct's `config.json` (494 M parameters).
pub const QWEN25_05B_CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
}"#;

/// What to measure.
#[derive(Debug, Clone)]
pub struct LlmBenchOptions {
    /// The model's `config.json` text, and where it came from (for the table).
    pub config_json: String,
    pub config_origin: String,
    pub batch: usize,
    /// Tokens per sample.
    pub seq: usize,
    /// LoRA rank (alpha = 2·rank) on every `q_proj` and `v_proj`.
    pub rank: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    pub mixed_precision: MixedPrecision,
    /// Time each kind of op during the timed steps ([`crate::nn::profile`]).
    pub breakdown: bool,
    /// Recompute each decoder layer in backward (both sides).
    pub gradient_checkpointing: bool,
}

/// Both sides' numbers.
#[derive(Debug, Clone)]
pub struct LlmBenchReport {
    pub options: LlmBenchOptions,
    pub ours: Measurement,
    pub reference: Option<Measurement>,
}

/// Runs our side, then the reference with `python` when given.
pub fn run_llm(options: &LlmBenchOptions, python: Option<&PathBuf>) -> Result<LlmBenchReport> {
    if options.batch == 0 || options.seq < 2 || options.rank == 0 || options.steps == 0 {
        return Err(candle_core::Error::Msg(
            "bench: --batch, --rank and --steps must be at least 1, --seq at least 2".into(),
        )
        .into());
    }
    let ours = run_ours(options)?;
    let reference = match python {
        Some(python) => {
            let mut args = flags(&[
                ("--config", options.config_json.clone()),
                ("--batch", options.batch.to_string()),
                ("--seq", options.seq.to_string()),
                ("--rank", options.rank.to_string()),
                ("--steps", options.steps.to_string()),
                ("--warmup", options.warmup.to_string()),
                ("--seed", options.seed.to_string()),
                ("--device", reference_device(options.device)),
                (
                    "--mixed-precision",
                    options.mixed_precision.as_str().to_string(),
                ),
            ]);
            if options.gradient_checkpointing {
                args.push("--gradient-checkpointing".into());
            }
            Some(run_script(python, LLM_SCRIPT, &args, "transformers+peft")?)
        }
        None => None,
    };
    Ok(LlmBenchReport {
        options: options.clone(),
        ours,
        reference,
    })
}

fn run_ours(options: &LlmBenchOptions) -> Result<Measurement> {
    let compute = Compute::resolve(options.device, options.mixed_precision)?;
    for warning in &compute.warnings {
        eprintln!("warning: {warning}");
    }
    let device = compute.device.clone();
    let config = CausalLmConfig::from_json_str(&options.config_json, &options.config_origin)?;
    let mut store = WeightStore::random(options.seed, compute.dtype, device.clone());
    store.set_matrix_dtype(compute.matrix_dtype);
    let rank = options.rank as u32;
    let settings = LoraSettings {
        rank,
        alpha: 2.0 * f64::from(rank),
        dropout: 0.0,
        rank_dropout: 0.0,
        module_dropout: 0.0,
        conv_lora: false,
        conv_rank: rank,
        conv_alpha: f64::from(rank),
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        train_text_encoder: false,
        network_weights: None,
        save_precision: SavePrecision::Fp32,
        save_format: SaveFormat::Kohya,
    };
    let network = LmNetwork::new(&settings, None, options.seed, &device);
    let mut model = CausalLm::new(Scope::root(&store).with_adapters(&network), &config)?;
    model.set_gradient_checkpointing(options.gradient_checkpointing);
    network.check_built()?;
    network.set_training(true);
    let mut rng = crate::rng::stream(options.seed, 0, 0, 0, crate::rng::Purpose::Noise);
    let n = options.batch * options.seq;
    let ids: Vec<u32> = (0..n)
        .map(|_| rand::Rng::random_range(&mut rng, 0..config.vocab_size as u32))
        .collect();
    let labels: Vec<Vec<i64>> = ids
        .chunks(options.seq)
        .map(|row| row.iter().map(|&i| i64::from(i)).collect())
        .collect();
    let ids = Tensor::from_vec(ids, (options.batch, options.seq), &device)?;
    let named = network.named_vars();
    let lora_parameters = named.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = AdamW::new(
        vec![ParamGroup::new("lora", 1e-2, named)],
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
        network.set_step(step as u64, 0);
        let loss = {
            let _t = profile::scope("step: forward and loss");
            model
                .loss(&ids, &labels)?
                .ok_or_else(|| candle_core::Error::Msg("bench: no labelled token".into()))?
        };
        let grads = {
            let _t = profile::scope("step: backward");
            loss.backward()?
        };
        {
            let _t = profile::scope("step: optimizer");
            optimizer.step(&grads, &[1e-4])?;
            drop(grads);
        }
        last_loss = loss.to_scalar::<f32>()?;
        let elapsed = start.elapsed().as_secs_f64();
        eprintln!("step {step}: {elapsed:.3} s, loss {last_loss:.4}");
        if step >= options.warmup {
            step_seconds.push(elapsed);
        }
    }
    Ok(Measurement {
        name: "lora-trainer".to_string(),
        step_seconds,
        peak_rss_bytes: peak_rss_bytes(),
        peak_device_bytes: None,
        lora_parameters,
        last_loss,
        versions: None,
        breakdown: if options.breakdown {
            profile::enable(false);
            profile::take()
        } else {
            Vec::new()
        },
    })
}

impl LlmBenchReport {
    /// A plain-text table, one row per side.
    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = format!(
            "preset llm ({}), batch {} × {} tokens (all learned), LoRA r={} alpha={} on \
             q_proj/v_proj, {} timed steps after {} warm-up{}, device {}, mixed precision {}\n\n",
            o.config_origin,
            o.batch,
            o.seq,
            o.rank,
            2 * o.rank,
            o.steps,
            o.warmup,
            if o.gradient_checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            },
            o.device,
            o.mixed_precision
        );
        let gib = |b: Option<u64>| {
            b.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_else(|| "?".to_string())
        };
        out.push_str(&format!(
            "{:<18} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}\n",
            "", "min s/step", "median s", "tokens/s", "peak RSS", "LoRA params", "loss"
        ));
        let sides: Vec<&Measurement> = std::iter::once(&self.ours)
            .chain(self.reference.as_ref())
            .collect();
        for m in sides {
            out.push_str(&format!(
                "{:<18} {:>10.3} {:>10.3} {:>10.1} {:>12} {:>12} {:>10.4}\n",
                m.name,
                m.min_seconds(),
                m.median_seconds(),
                (o.batch * o.seq) as f64 / m.min_seconds(),
                gib(m.peak_rss_bytes),
                m.lora_parameters,
                m.last_loss
            ));
        }
        out.push_str(&super::breakdown_table(&self.ours));
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
