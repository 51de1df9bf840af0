//! The YAML training config: parsed, checked key by key, and turned into one validated
//! [`TrainPlan`].
//!
//! `train --config FILE [--set key=value]...` reads FILE, applies the overrides (each value is
//! YAML too: `--set target_modules=[q_proj,v_proj]`) and validates everything at once: unknown
//! keys (with the closest valid one), wrong types, values out of range, keys given twice (also as
//! a kohya alias), missing required keys. Each problem names the file and line, or the `--set`
//! argument. Relative paths are resolved against the current directory, as kohya does.

mod build;
mod choices;
pub(crate) mod error;
mod fields;
mod model_ref;
mod plan;
mod resolved;
mod sampling;
mod yaml;

use std::path::Path;

pub use build::{MAX_STEPS, STEPS_WHY};
pub use choices::{
    DataFormat, DeviceChoice, LogWith, LrScheduler, MixedPrecision, Optimizer, PredictionType,
    SaveFormat, SavePrecision, TargetModules, TargetPreset, TaskKind, Warmup,
};
pub use error::{ConfigError, Location, Problem};
pub use model_ref::{is_hub_id, weights_format, WeightsFormat};
pub use plan::{
    DatasetSpec, LlmData, LoraSettings, ModelSettings, OutputSettings, SamplePrompts,
    SamplingSettings, Task, TrainPlan, TrainingSettings,
};
pub use resolved::KeyDifference;
pub use sampling::{SamplePrompt, SamplerKind};

use fields::{Entry, Fields};
use yaml::Value;

impl TrainPlan {
    /// Reads the config file and applies `--set key=value` overrides; relative paths start at the
    /// current directory.
    pub fn load(config_path: &Path, overrides: &[String]) -> Result<TrainPlan, ConfigError> {
        let text = crate::files::read_text(config_path, crate::files::TEXT_LIMIT, "a config file")
            .map_err(|source| ConfigError::Read {
                path: config_path.to_path_buf(),
                source,
            })?;
        let cwd =
            std::env::current_dir().map_err(|source| ConfigError::WorkingDirectory { source })?;
        TrainPlan::from_yaml(&text, config_path, overrides, &cwd)
    }

    /// Validates a config's text; `config_path` names it in messages, `cwd` anchors relative
    /// paths.
    pub fn from_yaml(
        text: &str,
        config_path: &Path,
        overrides: &[String],
        cwd: &Path,
    ) -> Result<TrainPlan, ConfigError> {
        let file_at = |line| Location::File {
            path: config_path.to_path_buf(),
            line,
        };
        let root = yaml::parse(text).map_err(|e| ConfigError::Syntax {
            at: file_at(Some(e.line)),
            column: Some(e.column),
            message: e.message,
        })?;
        let file_entries = match root {
            Value::Map(entries) => entries
                .into_iter()
                .map(|e| Entry {
                    key: e.key,
                    value: e.value,
                    at: file_at(Some(e.line)),
                })
                .collect(),
            v if v.is_null() => Vec::new(),
            other => {
                let message = format!(
                    "a config is a list of `key: value` lines, but this file holds {}",
                    other.describe()
                );
                return Err(ConfigError::Invalid {
                    problems: vec![Problem {
                        at: file_at(None),
                        message,
                    }],
                });
            }
        };
        let mut bad_overrides = Vec::new();
        let mut set_entries = Vec::new();
        for (index, arg) in overrides.iter().enumerate() {
            match parse_override(index, arg) {
                Ok(entry) => set_entries.push(entry),
                Err(problem) => bad_overrides.push(problem),
            }
        }
        let mut fields = Fields::new(config_path, file_entries, set_entries);
        for p in bad_overrides {
            fields.problem(p.at, p.message);
        }
        let plan = build::build(&mut fields, config_path, cwd);
        let problems = fields.finish();
        match plan {
            Some(plan) if problems.is_empty() => Ok(plan),
            _ => Err(ConfigError::Invalid { problems }),
        }
    }
}

/// `key=value`, the value read as YAML.
fn parse_override(index: usize, arg: &str) -> Result<Entry, Problem> {
    let at = Location::Set {
        index,
        arg: arg.to_string(),
    };
    let fail = |message: String| Problem {
        at: at.clone(),
        message,
    };
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| fail("expected KEY=VALUE, e.g. `--set learning_rate=1e-4`".into()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(fail("the key before `=` is empty".into()));
    }
    let value = yaml::parse(value)
        .map_err(|e| fail(format!("the value is not valid YAML: {}", e.message)))?;
    Ok(Entry {
        key: key.to_string(),
        value,
        at,
    })
}

#[cfg(test)]
mod tests;
