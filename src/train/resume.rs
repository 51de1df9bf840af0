//! `--resume DIR|latest`: finding the state to continue from and refusing one written with a
//! config whose differences would change the result, while letting a project that moved to
//! another folder or machine continue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::state::{list_states, read_state, SavedState, CONFIG_FILE};
use super::TrainError;
use crate::config::TrainPlan;
use crate::dataset::Dataset;
use crate::Result;

/// The state folder `arg` names: `latest` (the newest `state-step…` folder of `output_dir`) or
/// a path.
pub fn locate(arg: &str, output_dir: &Path) -> Result<PathBuf> {
    if arg == "latest" {
        return list_states(output_dir)
            .pop()
            .map(|(_, dir)| dir)
            .ok_or_else(|| {
                TrainError::Resume {
                    origin: "latest".into(),
                    message: format!(
                        "{} holds no `state-step…` folder to resume from; a run writes one at \
                         each checkpoint (`save_steps`, `save_every_n_epochs`) and when it is \
                         interrupted",
                        output_dir.display()
                    ),
                }
                .into()
            });
    }
    Ok(PathBuf::from(arg))
}

/// Keys naming where the images and captions are: a new value is fine when the dataset found
/// there is the one the state trained on (same [`Dataset::fingerprint`]): the project moved.
/// A language model's records likewise (`train_data`, same file bytes).
const DATA_LOCATIONS: &[&str] = &["train_data_dir", "metadata_path", "train_data"];
/// Keys naming model files: a new value is fine when nothing is left at the old (absolute)
/// path: the files moved, or the run continues on another machine. Resuming then assumes the
/// same files; a hub id that changed is a different model.
const MODEL_LOCATIONS: &[&str] = &[
    "base_model",
    "vae",
    "tokenizer",
    "tokenizer_2",
    "network_weights",
];

/// A state that `plan` continues, and what the user should know about it.
#[derive(Debug)]
pub struct Resumable {
    pub state: SavedState,
    /// Printed before training: moved folders, a changed dataset.
    pub notes: Vec<String>,
}

/// Reads the state at `dir` and checks that `plan` would continue it bit-identically: every
/// config key that changes the weights must be as it was (the error names each that is not),
/// except paths to the same data or to model files that moved.
pub fn open_for(
    dir: &Path,
    plan: &TrainPlan,
    dataset: &Dataset,
    total_steps: usize,
) -> Result<Resumable> {
    let state = read_state(dir)?;
    let changed = changed_images(&state.manifest.images, dataset);
    if !changed.is_empty() {
        const SHOWN: usize = 5;
        let mut names: Vec<String> = changed
            .iter()
            .take(SHOWN)
            .map(|n| format!("`{n}`"))
            .collect();
        if changed.len() > SHOWN {
            names.push(format!("and {} more", changed.len() - SHOWN));
        }
        return Err(TrainError::Resume {
            origin: dir.display().to_string(),
            message: format!(
                "{} image(s) of train_data_dir changed since the state was written (their bytes \
                 differ, under the same name): {}. Put the original files back to resume, or \
                 start a new run (a replaced picture should be a new file name, or a new run)",
                changed.len(),
                names.join(", ")
            ),
        }
        .into());
    }
    continue_with(dir, state, plan, &dataset.fingerprint(), total_steps)
}

/// [`open_for`] for a run whose data is one file of records (a language model's), identified
/// by `fingerprint`.
pub fn open_for_records(
    dir: &Path,
    plan: &TrainPlan,
    fingerprint: &str,
    total_steps: usize,
) -> Result<Resumable> {
    let state = read_state(dir)?;
    continue_with(dir, state, plan, fingerprint, total_steps)
}

/// The checks shared by both tasks: the config keys, the data's fingerprint, the step.
fn continue_with(
    dir: &Path,
    state: SavedState,
    plan: &TrainPlan,
    fingerprint: &str,
    total_steps: usize,
) -> Result<Resumable> {
    let origin = dir.display().to_string();
    let saved_config = dir.join(CONFIG_FILE);
    let parent = dir.parent().unwrap_or(Path::new("."));
    let saved =
        TrainPlan::from_yaml(&state.config_yaml, &saved_config, &[], parent).map_err(|e| {
            TrainError::Resume {
                origin: origin.clone(),
                message: format!("its {CONFIG_FILE} cannot be read: {e}"),
            }
        })?;
    let same_data = state.manifest.dataset.as_ref().map(|f| f == fingerprint);
    let data = if plan.llm().is_some() {
        "records of train_data"
    } else {
        "images and captions"
    };
    let mut notes = state.notes.clone();
    let mut differences = Vec::new();
    for difference in saved.differing_keys(plan) {
        let key = difference.key;
        if DATA_LOCATIONS.contains(&key) && same_data == Some(true) {
            notes.push(format!(
                "{difference}: the same {data} as the state's, in a new place"
            ));
        } else if MODEL_LOCATIONS.contains(&key) && moved_away(&saved, key) {
            notes.push(format!(
                "{difference}: nothing is left at the old path, so the files are taken to have \
                 moved; the run is only the same if they are the same files"
            ));
        } else {
            differences.push(difference.to_string());
        }
    }
    if !differences.is_empty() {
        let data_hint = if same_data == Some(false) {
            format!("; the {data} found differ from those the state trained on")
        } else {
            String::new()
        };
        return Err(TrainError::Resume {
            origin,
            message: format!(
                "the config differs from the one the state was written with in {}: {}{data_hint}; \
                 resuming would not give the run that was started. Put the old value(s) back \
                 (the state's {CONFIG_FILE} lists them all), or start a new run in another \
                 `output_dir`",
                if differences.len() == 1 {
                    "one key"
                } else {
                    "these keys"
                },
                differences.join("; ")
            ),
        }
        .into());
    }
    if same_data == Some(false) {
        notes.push(format!(
            "the {data} changed since the state was written: the run continues on the \
                 current ones, so it will not end as the uninterrupted run would have"
        ));
    }
    if state.manifest.step >= total_steps {
        return Err(TrainError::Resume {
            origin,
            message: format!(
                "the state is at step {}, and the run has only {total_steps} steps: it is \
                 finished",
                state.manifest.step
            ),
        }
        .into());
    }
    Ok(Resumable { state, notes })
}

/// The images present both in the state and in `dataset` whose bytes differ, by name.
fn changed_images(saved: &BTreeMap<String, String>, dataset: &Dataset) -> Vec<String> {
    dataset
        .images()
        .iter()
        .filter(|i| saved.get(&i.name).is_some_and(|d| *d != i.digest))
        .map(|i| i.name.clone())
        .collect()
}

/// Whether the saved plan's `key` names an absolute path where nothing is now.
fn moved_away(saved: &TrainPlan, key: &str) -> bool {
    let m = &saved.model;
    let old = match key {
        "base_model" => Some(m.base_model.clone()),
        "vae" => m.vae.clone(),
        "tokenizer" => m.tokenizer.clone(),
        "tokenizer_2" => m.tokenizer_2.clone(),
        "network_weights" => saved
            .lora
            .network_weights
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        _ => None,
    };
    old.is_some_and(|old| {
        let path = Path::new(&old);
        path.is_absolute() && !path.exists()
    })
}
