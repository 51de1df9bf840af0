//! The resolved config: a [`TrainPlan`] written back as YAML, every key under its canonical
//! name with its effective value (defaults filled, aliases resolved, paths absolute).
//!
//! A run writes it to `<output_dir>/config.yaml` and into each resumable state, so that what a
//! LoRA was trained with can be read back exactly, and so that `--resume` can name the keys that
//! differ between the state and the config it is resumed with. Reading the text back with
//! [`TrainPlan::from_yaml`] gives the same plan (tested below).

use std::path::Path;

use super::build::IMAGE_ONLY;
use super::choices::{TargetModules, Warmup};
use super::plan::{SamplePrompts, Task, TrainPlan};

/// Keys whose change does not change the trained weights: a run may be resumed with another
/// value (more checkpoints, another log folder, another device...).
const FREE_ON_RESUME: &[&str] = &[
    "output_dir",
    "output_name",
    "save_steps",
    "save_every_n_epochs",
    "save_last_n",
    "log_with",
    "log_dir",
    "save_precision",
    "save_format",
    "cache_latents_to_disk",
    "device",
    "skip_invalid_images",
    "gradient_checkpointing",
    "sample_prompts",
    "sample_every_n_steps",
    "sample_at_first",
    "sample_sampler",
    "sample_max_new_tokens",
    "eval_data",
    "eval_steps",
];

impl TrainPlan {
    /// Every key and its effective value as YAML text, in config order. Unset optional keys are
    /// left out.
    pub fn resolved_entries(&self) -> Vec<(&'static str, String)> {
        let d = &self.data;
        let m = &self.model;
        let l = &self.lora;
        let t = &self.training;
        let o = &self.output;
        let mut e: Vec<(&'static str, Option<String>)> = vec![
            ("train_data_dir", Some(path(&d.train_data_dir))),
            ("metadata_path", d.metadata_path.as_deref().map(path)),
            ("caption_extension", Some(quoted(&d.caption_extension))),
            ("resolution", Some(d.resolution.to_string())),
            ("enable_bucket", Some(d.enable_bucket.to_string())),
            ("min_bucket_reso", Some(d.min_bucket_reso.to_string())),
            ("max_bucket_reso", Some(d.max_bucket_reso.to_string())),
            ("bucket_reso_steps", Some(d.bucket_reso_steps.to_string())),
            ("random_crop", Some(d.random_crop.to_string())),
            ("flip_aug", Some(d.flip_aug.to_string())),
            ("repeats", Some(d.repeats.to_string())),
            ("caption_prefix", d.caption_prefix.as_deref().map(quoted)),
            ("shuffle_caption", Some(d.shuffle_caption.to_string())),
            ("keep_tokens", Some(d.keep_tokens.to_string())),
            (
                "caption_dropout_rate",
                Some(d.caption_dropout_rate.to_string()),
            ),
            (
                "skip_invalid_images",
                Some(d.skip_invalid_images.to_string()),
            ),
            ("seed", Some(d.seed.to_string())),
            ("base_model", Some(quoted(&m.base_model))),
            ("tokenizer", m.tokenizer.as_deref().map(quoted)),
            ("tokenizer_2", m.tokenizer_2.as_deref().map(quoted)),
            ("vae", m.vae.as_deref().map(quoted)),
            ("clip_skip", Some(m.clip_skip.to_string())),
            (
                "prediction_type",
                m.prediction_type.map(|p| quoted(p.as_str())),
            ),
            ("lora_rank", Some(l.rank.to_string())),
            ("lora_alpha", Some(float(l.alpha))),
            ("lora_dropout", Some(float(l.dropout))),
            ("rank_dropout", Some(float(l.rank_dropout))),
            ("module_dropout", Some(float(l.module_dropout))),
            ("conv_lora", Some(l.conv_lora.to_string())),
            ("conv_rank", Some(l.conv_rank.to_string())),
            ("conv_alpha", Some(float(l.conv_alpha))),
            ("target_modules", Some(target_modules(&l.target_modules))),
            ("train_text_encoder", Some(l.train_text_encoder.to_string())),
            ("network_weights", l.network_weights.as_deref().map(path)),
            ("save_precision", Some(quoted(l.save_precision.as_str()))),
            ("save_format", Some(quoted(l.save_format.as_str()))),
            ("batch_size", Some(t.batch_size.to_string())),
            (
                "gradient_accumulation_steps",
                Some(t.gradient_accumulation_steps.to_string()),
            ),
            ("epochs", Some(t.epochs.to_string())),
            ("max_train_steps", t.max_train_steps.map(|n| n.to_string())),
            ("learning_rate", Some(float(t.learning_rate))),
            ("unet_lr", Some(float(t.unet_lr))),
            ("text_encoder_lr", Some(float(t.text_encoder_lr))),
            ("optimizer", Some(quoted(t.optimizer.as_str()))),
            ("weight_decay", Some(float(t.weight_decay))),
            ("adam_beta1", Some(float(t.adam_beta1))),
            ("adam_beta2", Some(float(t.adam_beta2))),
            ("adam_epsilon", Some(float(t.adam_epsilon))),
            ("scheduler", Some(quoted(t.scheduler.as_str()))),
            (
                "lr_warmup_steps",
                Some(match t.warmup {
                    Warmup::Steps(n) => n.to_string(),
                    Warmup::Ratio(r) => float(r),
                }),
            ),
            (
                "lr_scheduler_num_cycles",
                Some(t.lr_scheduler_num_cycles.to_string()),
            ),
            ("lr_scheduler_power", Some(float(t.lr_scheduler_power))),
            ("max_grad_norm", Some(float(t.max_grad_norm))),
            ("min_snr_gamma", t.min_snr_gamma.map(float)),
            ("noise_offset", Some(float(t.noise_offset))),
            ("mixed_precision", Some(quoted(t.mixed_precision.as_str()))),
            ("device", Some(quoted(&t.device.to_string()))),
            ("cache_latents", Some(t.cache_latents.to_string())),
            (
                "cache_latents_to_disk",
                Some(t.cache_latents_to_disk.to_string()),
            ),
            (
                "gradient_checkpointing",
                Some(t.gradient_checkpointing.to_string()),
            ),
            ("output_dir", Some(path(&o.output_dir))),
            ("output_name", Some(quoted(&o.output_name))),
            ("save_steps", o.save_steps.map(|n| n.to_string())),
            (
                "save_every_n_epochs",
                o.save_every_n_epochs.map(|n| n.to_string()),
            ),
            ("save_last_n", o.save_last_n.map(|n| n.to_string())),
            ("log_with", Some(quoted(o.log_with.as_str()))),
            ("log_dir", Some(path(&o.log_dir))),
        ];
        e.extend(self.sampling_entries());
        if let Task::Llm(llm) = &self.task {
            e.retain(|(key, _)| !IMAGE_ONLY.iter().any(|(name, _)| name == key));
            let llm_entries = [
                ("task", Some(quoted("llm"))),
                ("train_data", Some(path(&llm.train_data))),
                ("data_format", Some(quoted(llm.data_format.as_str()))),
                ("max_seq_length", Some(llm.max_seq_length.to_string())),
                ("train_on_prompt", Some(llm.train_on_prompt.to_string())),
                ("packing", Some(llm.packing.to_string())),
                ("eval_data", llm.eval_data.as_deref().map(path)),
                ("val_split", llm.val_split.map(float)),
                ("eval_steps", llm.eval_steps.map(|n| n.to_string())),
            ];
            e.splice(0..0, llm_entries);
            e.push((
                "sample_max_new_tokens",
                Some(self.sampling.max_new_tokens.to_string()),
            ));
        }
        e.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    /// The resolved config as a YAML document (see the module docs).
    pub fn to_resolved_yaml(&self) -> String {
        let mut text = String::from(
            "# The resolved config of this run: every key with the value it trained with\n\
             # (defaults filled in, aliases resolved, paths absolute). It can be passed to\n\
             # `train --config` as it is.\n",
        );
        for (key, value) in self.resolved_entries() {
            text.push_str(key);
            text.push_str(": ");
            text.push_str(&value);
            text.push('\n');
        }
        text
    }

    /// The keys whose values differ from `other`'s and change the trained weights (all but
    /// output, logging, device and sampling keys), each as "`key`: A → B"; set or unset on one
    /// side only counts as a difference.
    pub fn differences_that_matter(&self, other: &TrainPlan) -> Vec<String> {
        self.differing_keys(other)
            .iter()
            .map(KeyDifference::to_string)
            .collect()
    }

    /// [`TrainPlan::differences_that_matter`], key by key.
    pub fn differing_keys(&self, other: &TrainPlan) -> Vec<KeyDifference> {
        let mine: Vec<_> = self.resolved_entries();
        let theirs: Vec<_> = other.resolved_entries();
        let value = |list: &[(&'static str, String)], key: &str| {
            list.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
        };
        let mut keys: Vec<&'static str> = mine.iter().chain(&theirs).map(|(k, _)| *k).collect();
        keys.dedup();
        let mut seen = std::collections::HashSet::new();
        keys.into_iter()
            .filter(|k| seen.insert(*k) && !FREE_ON_RESUME.contains(k))
            .filter_map(|key| {
                let (mine, theirs) = (value(&mine, key), value(&theirs, key));
                (mine != theirs).then_some(KeyDifference { key, mine, theirs })
            })
            .collect()
    }
}

/// A config key whose resolved value differs between two plans (`None`: not set).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyDifference {
    pub key: &'static str,
    /// The value in the plan the comparison was called on.
    pub mine: Option<String>,
    /// The value in the other plan.
    pub theirs: Option<String>,
}

impl std::fmt::Display for KeyDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not set)".into());
        write!(
            f,
            "`{}`: {} → {}",
            self.key,
            show(&self.mine),
            show(&self.theirs)
        )
    }
}

impl TrainPlan {
    /// The preview-sampling keys.
    fn sampling_entries(&self) -> Vec<(&'static str, Option<String>)> {
        let s = &self.sampling;
        let prompts = s.prompts.as_ref().map(|p| match p {
            SamplePrompts::File(file) => path(file),
            SamplePrompts::Lines(lines) => {
                let items: Vec<String> = lines.iter().map(|l| quoted(l)).collect();
                format!("[{}]", items.join(", "))
            }
        });
        vec![
            ("sample_prompts", prompts),
            (
                "sample_every_n_steps",
                s.every_n_steps.map(|n| n.to_string()),
            ),
            ("sample_at_first", Some(s.at_first.to_string())),
            ("sample_sampler", Some(quoted(s.sampler.as_str()))),
        ]
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"))
}

fn path(p: &Path) -> String {
    quoted(&p.to_string_lossy())
}

/// The shortest text that reads back as the same f64 (`0.0001`, `1e-8`, `2.0`).
fn float(x: f64) -> String {
    format!("{x:?}")
}

fn target_modules(t: &TargetModules) -> String {
    match t {
        TargetModules::Preset(p) => quoted(p.as_str()),
        TargetModules::Names(names) => {
            let items: Vec<String> = names.iter().map(|n| quoted(n)).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(extra: &str) -> TrainPlan {
        let text = format!("train_data_dir: d\nbase_model: ./m\noutput_dir: out/run\n{extra}");
        TrainPlan::from_yaml(&text, Path::new("c.yaml"), &[], Path::new("/work")).unwrap()
    }

    fn read_back(plan: &TrainPlan) -> TrainPlan {
        let text = plan.to_resolved_yaml();
        TrainPlan::from_yaml(&text, &plan.config_path, &[], Path::new("/elsewhere"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_resolved_yaml_reads_back_as_the_same_plan() {
        for extra in [
            "",
            "learning_rate: 3e-4\nlr_warmup_steps: 0.05\nscheduler: cosine\nmin_snr_gamma: 5\n\
             max_train_steps: 17\ncaption_prefix: 'a \"b\": c'\nlora_alpha: 0\nconv_lora: true\n\
             target_modules: [q_proj, \"to_*\"]\noptimizer: AdamW8bit\nsave_last_n: 2\n\
             caption_dropout_rate: 0.1\nmixed_precision: bf16\ndevice: cuda:1\n\
             prediction_type: v_prediction\nadam_epsilon: 1e-8\n\
             sample_prompts: [\"a cat --w 64 --d 3\", 'a \\\\ dog']\nsample_every_n_steps: 5\n\
             sample_sampler: k_euler_a\nsample_at_first: true\n",
            "sample_prompts: prompts.txt\n",
        ] {
            let mut plan = plan(extra);
            let back = read_back(&plan);
            // The resolved file always states the resolution the run used.
            plan.data.resolution_given = true;
            assert_eq!(
                back,
                TrainPlan {
                    warnings: back.warnings.clone(),
                    ..plan
                }
            );
        }
    }

    #[test]
    fn differences_name_the_keys_that_change_the_weights() {
        let a = plan("learning_rate: 1e-4\nsave_steps: 10\n");
        let b = plan("learning_rate: 2e-4\nsave_steps: 20\nlog_with: none\nseed: 7\n");
        let diffs = a.differences_that_matter(&b);
        assert_eq!(diffs.len(), 4, "{diffs:?}"); // learning_rate, unet_lr, text_encoder_lr, seed
        assert!(
            diffs
                .iter()
                .any(|d| d == "`learning_rate`: 0.0001 → 0.0002"),
            "{diffs:?}"
        );
        assert!(diffs.iter().any(|d| d.starts_with("`seed`")));
        assert!(a.differences_that_matter(&a.clone()).is_empty());
        let c = plan("max_train_steps: 5\n");
        assert_eq!(
            a.differences_that_matter(&c),
            ["`max_train_steps`: (not set) → 5"]
        );
    }
}
