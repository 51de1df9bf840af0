//! Saving and restoring the per-parameter state the f32 optimizers share in shape: a step count
//! and a few tensors shaped like the parameter (AdamW's two moments, Lion's momentum, SGD's
//! momentum buffer), stored as `<param>.<name>` in an [`OptimizerState`]. Written once here so
//! that every optimizer checks a saved state the same way.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::{check_saved, saved_tensor, steps_of, OptimizerState, ParamGroup, StateScalars};
use crate::config::Optimizer;
use crate::train::TrainError;

/// The state of every parameter, group by group; `None` before a parameter's first update.
pub(super) type Slots<S> = Vec<Vec<Option<S>>>;

/// The state of `slots` as saved tensors and scalars. `parts` gives a slot's step and its
/// tensors, in the order of `names`.
pub(super) fn save_slots<S>(
    kind: Optimizer,
    groups: &[ParamGroup],
    slots: &Slots<S>,
    names: &[&str],
    parts: impl Fn(&S) -> (u64, Vec<&Tensor>),
) -> Result<OptimizerState, TrainError> {
    let mut tensors = HashMap::new();
    let mut steps = Vec::new();
    for (group, group_slots) in groups.iter().zip(slots) {
        for (param, slot) in group.params.iter().zip(group_slots) {
            let Some(slot) = slot else { continue };
            let (step, values) = parts(slot);
            for (name, value) in names.iter().zip(values) {
                tensors.insert(format!("{}.{name}", param.name), value.copy()?);
            }
            steps.push((param.name.as_str(), step));
        }
    }
    Ok(OptimizerState {
        tensors,
        scalars: StateScalars {
            optimizer: kind.as_str().to_string(),
            steps: steps_of(steps.into_iter()),
        },
    })
}

/// The slots of a saved `state` for `groups`, after checking it was written by `kind` for
/// these parameters; `build` makes a slot from its step and its tensors (in the order of
/// `names`, f32 on the parameter's device).
pub(super) fn load_slots<S>(
    kind: Optimizer,
    groups: &[ParamGroup],
    state: &OptimizerState,
    origin: &str,
    names: &[&str],
    build: impl Fn(u64, Vec<Tensor>) -> S,
) -> Result<Slots<S>, TrainError> {
    let expected: HashSet<String> = state
        .scalars
        .steps
        .keys()
        .flat_map(|n| names.iter().map(move |name| format!("{n}.{name}")))
        .collect();
    check_saved(state, origin, kind, groups, &expected)?;
    let mut restored = Vec::with_capacity(groups.len());
    for group in groups {
        let mut group_slots = Vec::with_capacity(group.params.len());
        for param in &group.params {
            let Some(&step) = state.scalars.steps.get(&param.name) else {
                group_slots.push(None);
                continue;
            };
            let (shape, device) = (param.var.dims(), param.var.device());
            let values = names
                .iter()
                .map(|name| {
                    let key = format!("{}.{name}", param.name);
                    saved_tensor(state, origin, &key, DType::F32, shape, device)
                })
                .collect::<Result<Vec<_>, _>>()?;
            group_slots.push(Some(build(step, values)));
        }
        restored.push(group_slots);
    }
    Ok(restored)
}
