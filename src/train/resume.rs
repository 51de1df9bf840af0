//! `--resume DIR|latest`: finding the state to continue from and refusing one written with a
//! config whose differences would change the result.

use std::path::{Path, PathBuf};

use super::checkpoint::{list_states, read_state, SavedState, CONFIG_FILE};
use super::TrainError;
use crate::config::TrainPlan;
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

/// Reads the state at `dir` and checks that `plan` would continue it bit-identically: every
/// config key that changes the weights must be as it was (the error names each that is not).
pub fn open_for(dir: &Path, plan: &TrainPlan, total_steps: usize) -> Result<SavedState> {
    let state = read_state(dir)?;
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
    let differences = saved.differences_that_matter(plan);
    if !differences.is_empty() {
        return Err(TrainError::Resume {
            origin,
            message: format!(
                "the config differs from the one the state was written with in {}: {}; \
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
    Ok(state)
}
