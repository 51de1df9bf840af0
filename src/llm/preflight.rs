//! Everything a language-model run checks before any heavy work, and the dry run's report: the
//! model folder (config, tokenizer, chat template), every record of `train_data` rendered,
//! tokenized and labelled (a bad record fails here, by line), the token-length distribution
//! and how many records `max_seq_length` cuts, the adapters `target_modules` selects (counted
//! on the model's shapes, no weight read), a PEFT adapter to continue, and the step plan.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::data::LmData;
use super::network::LmNetwork;
use super::peft::PeftAdapter;
use super::tokenizer::LmTokenizer;
use crate::config::{is_hub_id, LlmData, LogWith, MixedPrecision, SamplePrompts, TrainPlan};
use crate::error::ModelError;
use crate::log::thousands;
use crate::models::causal_lm::{CausalLm, CausalLmConfig};
use crate::models::hub::HubCache;
use crate::nn::{Scope, WeightStore};
use crate::preflight::report::{output_lines, section, step_lines};
use crate::preflight::{SavePoints, StepCounts};
use crate::train::outputs::unix_now;
use crate::train::TrainError;
use crate::Result;

/// A language-model run, checked.
#[derive(Debug)]
pub struct LmPreflight {
    pub plan: TrainPlan,
    /// The model folder (a hub id resolved to its cached snapshot).
    pub folder: PathBuf,
    pub config: CausalLmConfig,
    pub tokenizer: LmTokenizer,
    pub data: LmData,
    /// The validation records (`eval_data`, or those `val_split` held out of `data`).
    pub validation: Option<LmData>,
    /// The prompts answered during training (`sample_prompts`).
    pub sample_prompts: Vec<String>,
    pub steps: StepCounts,
    pub save_points: SavePoints,
    /// Adapted layers and trainable parameters.
    pub modules: usize,
    pub parameters: usize,
    /// `target_modules` as written into the adapter's config (after selection).
    pub target_modules: Vec<String>,
    /// The PEFT adapter `network_weights` continues.
    pub start: Option<PeftAdapter>,
    pub warnings: Vec<String>,
}

impl LmPreflight {
    /// Checks `plan` (a `task: llm` plan): reads files, writes nothing.
    pub fn check(plan: TrainPlan) -> Result<LmPreflight> {
        let Some(spec) = plan.llm().cloned() else {
            return Err(
                TrainError::Usage("not a language-model config (`task: llm`)".into()).into(),
            );
        };
        let folder = model_folder(&plan.model.base_model)?;
        let config = CausalLmConfig::from_file(&folder.join("config.json"))?;
        let tokenizer = LmTokenizer::open(&folder)?;
        let start = match &plan.lora.network_weights {
            Some(path) => Some(PeftAdapter::open(path, &Device::Cpu)?),
            None => None,
        };
        let now = unix_now();
        let (data, validation) = prepare_data(&spec, &tokenizer, plan.data.seed, now)?;
        let sample_prompts = read_prompts(plan.sampling.prompts.as_ref())?;
        // The adapters, selected on the model's shapes alone.
        let store = WeightStore::shape_only(DType::F32, Device::Cpu);
        let origin = plan
            .lora
            .network_weights
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let network = LmNetwork::new(
            &plan.lora,
            start.clone().map(|a| (a, origin)),
            plan.data.seed,
            &Device::Cpu,
        );
        CausalLm::new(Scope::root(&store).with_adapters(&network), &config)?;
        network.check_built()?;
        let target_modules = network.target_modules();
        let batches = data.samples.len().div_ceil(plan.training.batch_size.max(1));
        let steps = StepCounts::new(batches, &plan.training);
        let out = &plan.output;
        let save_points = SavePoints::new(out.save_steps, out.save_every_n_epochs, &steps);
        let mut warnings = plan.warnings.clone();
        if spec.max_seq_length > config.max_position_embeddings {
            warnings.push(format!(
                "max_seq_length ({}) is beyond the model's max_position_embeddings ({}): \
                 positions past it were never trained",
                spec.max_seq_length, config.max_position_embeddings
            ));
        }
        if !data.unlearned.is_empty() {
            warnings.push(format!(
                "{} record(s) have no answer token within max_seq_length ({}) and are left out: \
                 line(s) {}",
                data.unlearned.len(),
                spec.max_seq_length,
                shown(&data.unlearned)
            ));
        }
        Ok(LmPreflight {
            modules: network.adapters().len(),
            parameters: network.parameters(),
            target_modules,
            plan,
            folder,
            config,
            tokenizer,
            data,
            validation,
            sample_prompts,
            steps,
            save_points,
            start,
            warnings,
        })
    }
}

/// The training records and the validation records of `spec`, rendered as of `started_at`.
pub fn prepare_data(
    spec: &LlmData,
    tokenizer: &LmTokenizer,
    seed: u64,
    started_at: f64,
) -> Result<(LmData, Option<LmData>)> {
    let mut data = LmData::prepare(spec, tokenizer, started_at)?;
    let validation = match (&spec.eval_data, spec.val_split) {
        (Some(path), _) => Some(LmData::prepare_file(path, spec, tokenizer, started_at)?),
        (None, Some(share)) => {
            if data.samples.len() < 2 {
                return Err(TrainError::Usage(format!(
                    "val_split needs at least two records to hold one out; {} has {}",
                    spec.train_data.display(),
                    data.samples.len()
                ))
                .into());
            }
            Some(data.split_off(share, seed))
        }
        (None, None) => None,
    };
    if spec.packing {
        data.pack(spec.max_seq_length);
    }
    Ok((data, validation))
}

/// The prompts of `sample_prompts`: the list, or the file's non-empty lines.
pub fn read_prompts(source: Option<&SamplePrompts>) -> Result<Vec<String>> {
    Ok(match source {
        None => Vec::new(),
        Some(SamplePrompts::Lines(lines)) => lines.clone(),
        Some(SamplePrompts::File(path)) => {
            let text = crate::files::read_text(path, crate::files::TEXT_LIMIT, "a prompt file")
                .map_err(|e| crate::Error::io(path, e))?;
            let prompts: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            if prompts.is_empty() {
                return Err(TrainError::Usage(format!(
                    "{} holds no prompt (one per line; # starts a comment)",
                    path.display()
                ))
                .into());
            }
            prompts
        }
    })
}

/// The folder `base_model` names: a local folder, or a hub id's snapshot in the Hugging Face
/// cache (this program does not download language models).
pub fn model_folder(base_model: &str) -> Result<PathBuf> {
    let path = Path::new(base_model);
    if path.exists() || path.is_absolute() || !is_hub_id(base_model) {
        return Ok(path.to_path_buf());
    }
    HubCache::from_env().snapshot(base_model).ok_or_else(|| {
        ModelError::NotFound {
            path: PathBuf::from(base_model),
            hint: format!(
                "`{base_model}` is not in the Hugging Face cache; download it first with \
                 `huggingface-cli download {base_model}` (or point `base_model` at its folder)"
            ),
        }
        .into()
    })
}

/// Up to eight numbers, then how many more.
fn shown(lines: &[usize]) -> String {
    const SHOWN: usize = 8;
    let mut text: Vec<String> = lines.iter().take(SHOWN).map(|l| l.to_string()).collect();
    if lines.len() > SHOWN {
        text.push(format!("and {} more", lines.len() - SHOWN));
    }
    text.join(", ")
}

impl fmt::Display for LmPreflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = &self.plan;
        let Some(spec) = plan.llm() else {
            return Ok(());
        };
        writeln!(
            f,
            "Dry run of {}: checked, nothing written.",
            plan.config_path.display()
        )?;
        writeln!(f)?;
        let c = &self.config;
        section(
            f,
            "Base model",
            &[
                self.folder.display().to_string(),
                format!(
                    "{} ({} layers, hidden {}, {} heads / {} key-value heads, vocabulary {})",
                    c.architecture.class_name(),
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    thousands(c.vocab_size)
                ),
                if self.data.model_template {
                    "prompts: the model's chat template".to_string()
                } else {
                    "prompts: the plain template (### Instruction / ### Response; the model has \
                     no chat template)"
                        .to_string()
                },
            ],
        )?;
        let d = &self.data;
        let lengths = d.length_summary();
        let (tokens, learned) = d.token_counts();
        let mut data_lines = vec![
            spec.train_data.display().to_string(),
            if spec.packing {
                format!(
                    "{} records ({}), packed into {} sequences of at most {} tokens",
                    lengths.records,
                    d.format,
                    d.samples.len(),
                    spec.max_seq_length
                )
            } else {
                format!(
                    "{} records ({}), {} trained on",
                    lengths.records,
                    d.format,
                    d.samples.len()
                )
            },
            format!(
                "tokens per record: min {}, median {}, 95% {}, max {} (mean {:.0})",
                lengths.min, lengths.median, lengths.p95, lengths.max, lengths.mean
            ),
            format!(
                "max_seq_length {}: {} record(s) longer are cut to it",
                spec.max_seq_length, d.truncated
            ),
            format!(
                "{} tokens per epoch, {} of them learned ({})",
                thousands(tokens),
                thousands(learned),
                if spec.train_on_prompt {
                    "prompts and answers: train_on_prompt"
                } else {
                    "the answers and their end-of-turn tokens"
                }
            ),
        ];
        if !d.unlearned.is_empty() {
            data_lines.push(format!(
                "left out (no answer token within max_seq_length): line(s) {}",
                shown(&d.unlearned)
            ));
        }
        if let Some(v) = &self.validation {
            let (tokens, learned) = v.token_counts();
            let source = match &spec.eval_data {
                Some(path) => format!("from {}", path.display()),
                None => format!(
                    "held out of train_data by val_split {} (seed {})",
                    spec.val_split.unwrap_or(0.0),
                    plan.data.seed
                ),
            };
            let when = match spec.eval_steps {
                Some(n) => format!("every {n} steps and after the last"),
                None => "at each epoch's end".to_string(),
            };
            data_lines.push(format!(
                "validation: {} records {source}, {} tokens ({} learned); loss/validation {when}",
                v.samples.len(),
                thousands(tokens),
                thousands(learned)
            ));
        }
        section(f, "Data", &data_lines)?;
        section(f, "Steps", &step_lines(plan, &self.steps))?;
        let t = &plan.training;
        section(
            f,
            "Optimizer",
            &[
                format!(
                    "{}, learning rate {}, scheduler {}, weight decay {}",
                    t.optimizer, t.learning_rate, t.scheduler, t.weight_decay
                ),
                format!(
                    "gradient clipping {}, mixed precision {}, device {}",
                    if t.max_grad_norm > 0.0 {
                        format!("at norm {}", t.max_grad_norm)
                    } else {
                        "off".into()
                    },
                    match t.mixed_precision {
                        MixedPrecision::No => "no (f32)",
                        other => other.as_str(),
                    },
                    t.device
                ),
            ],
        )?;
        let l = &plan.lora;
        let mut lora_lines = match (&self.start, &l.network_weights) {
            (Some(start), Some(path)) => vec![
                format!("starts from {}", path.display()),
                format!(
                    "rank {}, alpha {} from its adapter_config.json (lora_rank, lora_alpha and \
                     target_modules are not used), dropout {}",
                    start.config.r, start.config.lora_alpha, l.dropout
                ),
            ],
            _ => vec![format!(
                "rank {}, alpha {} (scale {}), dropout {}",
                l.rank,
                l.alpha,
                l.scale(),
                l.dropout
            )],
        };
        lora_lines.push(format!(
            "targets: {}: {} modules, {} trainable parameters",
            self.target_modules.join(", "),
            self.modules,
            thousands(self.parameters)
        ));
        lora_lines.push(
            "saved as a PEFT adapter folder (peft/transformers, vLLM, llama.cpp's \
             convert_lora_to_gguf.py)"
                .to_string(),
        );
        section(f, "LoRA", &lora_lines)?;
        if !self.sample_prompts.is_empty() {
            let s = &plan.sampling;
            let when = match (s.every_n_steps, s.at_first) {
                (Some(n), true) => format!("before the first step, every {n} steps"),
                (Some(n), false) => format!("every {n} steps"),
                (None, true) => "before the first step".to_string(),
                (None, false) => "never (set sample_every_n_steps)".to_string(),
            };
            section(
                f,
                "Samples",
                &[format!(
                    "{} prompt(s) answered greedily (at most {} tokens) {when}, into {}",
                    self.sample_prompts.len(),
                    s.max_new_tokens,
                    plan.output.output_dir.join("samples").display()
                )],
            )?;
        }
        let mut output = output_lines(plan, &self.save_points);
        if plan.output.log_with == LogWith::Tensorboard {
            let mut tags = "loss/current, loss/average, lr/lora, perf/tokens_per_sec".to_string();
            if self.validation.is_some() {
                tags.push_str(", loss/validation");
            }
            if !self.sample_prompts.is_empty() {
                tags.push_str(", the samples' answers (Text tab)");
            }
            output.push(format!("logged: {tags}"));
        }
        section(f, "Output", &output)?;
        if !self.warnings.is_empty() {
            section(f, "Warnings", &self.warnings)?;
        }
        Ok(())
    }
}
