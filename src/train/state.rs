//! The resumable state of a run on disk (the writer; *when* to write is
//! [`crate::preflight::SavePoints`]'s business).
//!
//! ```text
//! <output_dir>/state-step00000100/
//!     state.json             step, epoch, position in the epoch, loss curves, seed, optimizer,
//!                            the digest of every training image
//!     adapters.safetensors   every lora_down / lora_up in f32, under its kohya key
//!     optimizer.safetensors  the optimizer's tensors (moments, 8-bit codes and scales)
//!     optimizer.json         the optimizer's scalars (per-parameter step counts)
//!     config.yaml            the resolved config the run trained with
//!     checksums.sha256       the SHA-256 of each file above (`sha256sum -c` reads it)
//! ```
//!
//! A state is trusted only whole: [`read_state`] checks every file against `checksums.sha256`,
//! the step against the folder's name, every weight and moment for NaN and infinity, and the
//! optimizer's step counts against the step, and refuses the state naming the file at fault.
//!
//! The folder is written as `.state-step00000100.<pid>.tmp/` and renamed when complete, so a
//! `state-step…` folder is always whole (a killed run's temporary is removed by the next run). The random draws of a step are keyed by the step
//! ([`crate::rng`]) and the data order by the epoch, so these files are all a run needs to
//! continue bit-identically. [`prune`] keeps the newest `save_last_n` step LoRA files and state
//! folders.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{OptimizerState, ParamOptimizer, StateScalars};
use super::TrainError;
use crate::config::OutputSettings;
use crate::log::LossTracker;
use crate::{Error, Result};

/// The version of the state folder's layout (2: with `checksums.sha256` and image digests).
pub const STATE_FORMAT: u32 = 2;
/// States of this format (written before checksums) are still read, unverified, with a note.
const UNVERIFIED_FORMAT: u32 = 1;
const MANIFEST: &str = "state.json";
const CHECKSUMS: &str = "checksums.sha256";
const ADAPTERS: &str = "adapters.safetensors";
const OPTIMIZER_TENSORS: &str = "optimizer.safetensors";
const OPTIMIZER_SCALARS: &str = "optimizer.json";
/// The resolved config inside a state folder (and in `output_dir`).
pub const CONFIG_FILE: &str = "config.yaml";

/// `state-step00000100`.
pub fn state_dir_name(step: usize) -> String {
    format!("state-step{step:08}")
}

/// Where a run stands after an optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateManifest {
    pub format: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// The 0-based epoch the next step belongs to.
    pub epoch: usize,
    /// Batches of that epoch already trained on.
    pub batch_in_epoch: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// The optimizer's name as the config spells it.
    pub optimizer: String,
    /// The loss curves' state, so a resumed run continues its averages.
    pub loss: LossTracker,
    /// Unix seconds when the run first started (kept across resumes for the LoRA metadata).
    pub training_started_at: f64,
    /// [`crate::dataset::Dataset::fingerprint`] of the images and captions trained on (absent
    /// from states written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Each training image's name (relative to `train_data_dir`) with the SHA-256 of its bytes
    /// ([`crate::dataset::Dataset::image_digests`]); empty in states written before format 2.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, String>,
    /// The program that wrote it.
    pub written_by: String,
}

/// A state folder read back.
#[derive(Debug)]
pub struct SavedState {
    pub dir: PathBuf,
    pub manifest: StateManifest,
    /// Kohya key → f32 tensor on the CPU.
    pub adapters: HashMap<String, Tensor>,
    pub optimizer: OptimizerState,
    /// The text of the resolved config it was written with.
    pub config_yaml: String,
    /// What the user should know about the state (an older format that cannot be verified).
    pub notes: Vec<String>,
}

/// Writes `state-stepNNNNNNNN/` into `output_dir` atomically; returns the folder.
pub fn write_state(
    output_dir: &Path,
    manifest: &StateManifest,
    adapters: &[(String, Var)],
    optimizer: &dyn ParamOptimizer,
    config_yaml: &str,
) -> Result<PathBuf> {
    let dir = output_dir.join(state_dir_name(manifest.step));
    let tmp = crate::files::temporary_path(&dir);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| -> Result<()> {
        let adapters: HashMap<String, Tensor> = adapters
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(&adapters, &tmp.join(ADAPTERS))?;
        let state = optimizer.state_tensors()?;
        save_tensors(&state.tensors, &tmp.join(OPTIMIZER_TENSORS))?;
        write_file(&tmp.join(OPTIMIZER_SCALARS), &to_json(&state.scalars)?)?;
        write_file(&tmp.join(CONFIG_FILE), config_yaml.as_bytes())?;
        write_file(&tmp.join(MANIFEST), &to_json(manifest)?)?;
        let mut sums = String::new();
        for name in CHECKED_FILES {
            let path = tmp.join(name);
            let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
            sums.push_str(&format!("{}  {name}\n", sha256_hex(&bytes)));
        }
        write_file(&tmp.join(CHECKSUMS), sums.as_bytes())?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    replace_dir(&tmp, &dir)?;
    Ok(dir)
}

/// The files `checksums.sha256` covers, in the order it lists them.
const CHECKED_FILES: [&str; 5] = [
    MANIFEST,
    ADAPTERS,
    OPTIMIZER_TENSORS,
    OPTIMIZER_SCALARS,
    CONFIG_FILE,
];

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `checksums.sha256` read: file name → hex digest.
fn parse_checksums(text: &str) -> std::result::Result<HashMap<String, String>, String> {
    let mut sums = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let (digest, name) = line
            .split_once("  ")
            .filter(|(d, _)| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("line {} is not `<sha256>  <file>`", i + 1))?;
        sums.insert(name.to_string(), digest.to_ascii_lowercase());
    }
    Ok(sums)
}

/// Reads a state folder written by [`write_state`], refusing it unless it is whole and sound
/// (see the module docs).
pub fn read_state(dir: &Path) -> Result<SavedState> {
    let origin = dir.display().to_string();
    let damaged = |what: String| -> Error {
        TrainError::Resume {
            origin: origin.clone(),
            message: format!(
                "{what}; the folder is not a whole state written by `train` (use another \
                 `state-step…` folder, or start a new run)"
            ),
        }
        .into()
    };
    if !dir.is_dir() {
        return Err(TrainError::Resume {
            origin: origin.clone(),
            message: "no such folder; give a `state-step…` folder of the output folder, or \
                      `latest`"
                .into(),
        }
        .into());
    }
    let read = |name: &str| {
        crate::files::read(&dir.join(name)).map_err(|e| damaged(format!("{name}: {e}")))
    };
    let mut files: HashMap<&str, Vec<u8>> = HashMap::new();
    for name in CHECKED_FILES {
        files.insert(name, read(name)?);
    }
    let file = |name: &str| files.get(name).map_or(&[][..], Vec::as_slice);
    let mut notes = Vec::new();
    match crate::files::read(&dir.join(CHECKSUMS)) {
        Ok(text) => {
            let sums = parse_checksums(&String::from_utf8_lossy(&text))
                .map_err(|e| damaged(format!("{CHECKSUMS}: {e}")))?;
            for name in CHECKED_FILES {
                let expected = sums
                    .get(name)
                    .ok_or_else(|| damaged(format!("{CHECKSUMS} does not list {name}")))?;
                if sha256_hex(file(name)) != *expected {
                    return Err(damaged(format!(
                        "{name} does not match its checksum in {CHECKSUMS}: it was changed or \
                         damaged after the state was written"
                    )));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Only a state of the format before checksums may lack them.
            let format = serde_json::from_slice::<serde_json::Value>(file(MANIFEST))
                .ok()
                .and_then(|v| v.get("format").and_then(serde_json::Value::as_u64));
            if format != Some(u64::from(UNVERIFIED_FORMAT)) {
                return Err(damaged(format!("{CHECKSUMS}: missing")));
            }
            notes.push(format!(
                "{} was written by an earlier version of this program, without checksums: its \
                 files cannot be verified",
                dir.display()
            ));
        }
        Err(e) => return Err(damaged(format!("{CHECKSUMS}: {e}"))),
    }

    let manifest: StateManifest =
        serde_json::from_slice(file(MANIFEST)).map_err(|e| damaged(format!("{MANIFEST}: {e}")))?;
    if manifest.format != STATE_FORMAT && manifest.format != UNVERIFIED_FORMAT {
        return Err(damaged(format!(
            "its format is {}, this program reads {UNVERIFIED_FORMAT} and {STATE_FORMAT}",
            manifest.format
        )));
    }
    if let Some(named) = step_of_folder(dir) {
        if named != manifest.step {
            return Err(damaged(format!(
                "{MANIFEST} says step {}, but the folder is named for step {named}",
                manifest.step
            )));
        }
    }
    let load = |name: &str| {
        candle_core::safetensors::load_buffer(file(name), &Device::Cpu)
            .map_err(|e| damaged(format!("{name}: {e}")))
    };
    let adapters = load(ADAPTERS)?;
    let tensors = load(OPTIMIZER_TENSORS)?;
    for (name, tensors) in [(ADAPTERS, &adapters), (OPTIMIZER_TENSORS, &tensors)] {
        if let Some(key) = first_non_finite(tensors)? {
            return Err(damaged(format!(
                "{name}: `{key}` holds NaN or infinite values (a state is only written after a \
                 step whose loss was finite)"
            )));
        }
    }
    let scalars: StateScalars = serde_json::from_slice(file(OPTIMIZER_SCALARS))
        .map_err(|e| damaged(format!("{OPTIMIZER_SCALARS}: {e}")))?;
    if let Some((key, n)) = scalars
        .steps
        .iter()
        .find(|(_, &n)| n == 0 || n > manifest.step as u64)
    {
        return Err(damaged(format!(
            "{OPTIMIZER_SCALARS}: `{key}` has a step count of {n}; after step {} it must be \
             from 1 to {}",
            manifest.step, manifest.step
        )));
    }
    let config_yaml = String::from_utf8(file(CONFIG_FILE).to_vec())
        .map_err(|e| damaged(format!("{CONFIG_FILE}: {e}")))?;
    Ok(SavedState {
        dir: dir.to_path_buf(),
        manifest,
        adapters,
        optimizer: OptimizerState { tensors, scalars },
        config_yaml,
        notes,
    })
}

/// The step in a folder name `state-stepNNNNNNNN` (`None` for another name: a folder the user
/// renamed is not checked against it).
fn step_of_folder(dir: &Path) -> Option<usize> {
    let name = dir.file_name()?.to_str()?;
    let digits = name.strip_prefix("state-step")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The key of the first floating-point tensor holding a NaN or an infinity.
fn first_non_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        let t = &tensors[key];
        if !t.dtype().is_float() {
            continue;
        }
        let values = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Ok(Some(key.clone()));
        }
    }
    Ok(None)
}

impl SavedState {
    /// Puts the saved adapter weights and optimizer state into this run's networks and
    /// optimizer; every adapter of the run must be in the state and nothing else.
    pub fn restore(
        &self,
        vars: &[(String, Var)],
        optimizer: &mut dyn ParamOptimizer,
    ) -> Result<()> {
        let origin = self.dir.display().to_string();
        let mismatch = |message: String| -> Error {
            TrainError::Resume {
                origin: origin.clone(),
                message: format!("{message}; resume with the config the state was written with"),
            }
            .into()
        };
        if vars.len() != self.adapters.len() {
            return Err(mismatch(format!(
                "it holds {} adapter tensors, this run has {}",
                self.adapters.len(),
                vars.len()
            )));
        }
        for (name, var) in vars {
            let saved = self
                .adapters
                .get(name)
                .ok_or_else(|| mismatch(format!("it has no weights for `{name}`")))?;
            if saved.dims() != var.dims() {
                return Err(mismatch(format!(
                    "`{name}` is {:?} in the state, {:?} in this run",
                    saved.dims(),
                    var.dims()
                )));
            }
            var.set(&saved.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        optimizer.load_state(&self.optimizer, &origin)?;
        Ok(())
    }
}

/// Every `state-stepNNNNNNNN` folder of `output_dir`, by step (folders still `.tmp` are not).
pub fn list_states(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    list_numbered(output_dir, "state-step", "")
}

/// Every step checkpoint of a run's adapters (`<output_name>-stepNNNNNNNN.safetensors`, or
/// the folder of that name without the extension for adapter folders), by step.
pub fn list_step_files(output: &OutputSettings) -> Vec<(usize, PathBuf)> {
    list_numbered(
        &output.output_dir,
        &format!("{}-step", output.output_name),
        output.step_suffix(),
    )
}

fn list_numbered(dir: &Path, prefix: &str, suffix: &str) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.parse().ok().map(|n| (n, e.path())))
                .flatten()
        })
        .collect();
    found.sort();
    found
}

/// Keeps the newest `keep` step checkpoints and state folders; returns what was removed.
pub fn prune(output: &OutputSettings, keep: usize) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for list in [list_step_files(output), list_states(&output.output_dir)] {
        let excess = list.len().saturating_sub(keep);
        for (_, path) in list.into_iter().take(excess) {
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, path).map_err(|e| match e {
        candle_core::Error::Io(io) => Error::io(path, io),
        other => Error::io(path, std::io::Error::other(other.to_string())),
    })?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::io("state.json", std::io::Error::other(e.to_string())))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Moves the finished `tmp` folder to `dir`, replacing an older folder of that name.
fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        let old = crate::files::temporary_path(dir).with_extension("old");
        let _ = fs::remove_dir_all(&old);
        fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    if let Some(parent) = dir.parent() {
        crate::files::sync_folder(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_step_files_and_states() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let d = dir.path();
        for step in [10, 20, 30] {
            fs::write(d.join(format!("run-step{step:08}.safetensors")), b"x").unwrap();
            fs::create_dir(d.join(state_dir_name(step))).unwrap();
        }
        fs::write(d.join("run.safetensors"), b"final").unwrap();
        fs::write(d.join("other-step00000010.safetensors"), b"x").unwrap();
        fs::create_dir(d.join("state-step00000040.tmp")).unwrap();
        let mut output = OutputSettings {
            output_dir: d.to_path_buf(),
            output_name: "run".into(),
            save_steps: None,
            save_every_n_epochs: None,
            save_last_n: None,
            log_with: crate::config::LogWith::None,
            log_dir: d.join("logs"),
            adapter_folders: false,
        };
        let removed = prune(&output, 2)?;
        assert_eq!(removed.len(), 2);
        let steps = |l: Vec<(usize, PathBuf)>| l.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(steps(list_step_files(&output)), [20, 30]);
        // Adapter folders (a language model's) are pruned the same way.
        output.adapter_folders = true;
        for step in [40, 50] {
            fs::create_dir(d.join(format!("run-step{step:08}"))).unwrap();
        }
        assert_eq!(steps(list_step_files(&output)), [40, 50]);
        prune(&output, 1)?;
        assert_eq!(steps(list_step_files(&output)), [50]);
        output.adapter_folders = false;
        assert_eq!(steps(list_step_files(&output)), [20, 30]);
        assert_eq!(steps(list_states(d)), [30]);
        assert!(d.join("run.safetensors").exists());
        assert!(d.join("other-step00000010.safetensors").exists());
        assert!(d.join("state-step00000040.tmp").exists());
        Ok(())
    }

    #[test]
    fn a_missing_or_partial_state_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_state(&dir.path().join("state-step00000001")).unwrap_err();
        assert!(e.to_string().contains("no such folder"), "{e}");
        let partial = dir.path().join("state-step00000002");
        fs::create_dir(&partial).unwrap();
        let e = read_state(&partial).unwrap_err();
        assert!(e.to_string().contains("state.json"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn every_f64_in_a_state_file_reads_back_bit_identical() {
        // The default serde_json parser can be one ulp off (this start time was, in CI); a
        // resumed run must see exactly the numbers the interrupted one wrote.
        let values = [
            1_795_277_467.439_784_5_f64,
            0.1,
            1.0 / 3.0,
            2.220_446_049_250_313e-16,
            9_007_199_254_740_993.0,
            123_456_789.123_456_78,
        ];
        let mut x = 0.987_654_321_012_345_6_f64;
        let mut all: Vec<f64> = values.to_vec();
        for _ in 0..2000 {
            x = (x * 1_103_515_245.0 + 12_345.0) % 2_147_483_648.0 + x.fract() / 7.0;
            all.push(x);
            all.push(x * 1e-7);
        }
        let bytes = to_json(&all).unwrap();
        let back: Vec<f64> = serde_json::from_slice(&bytes).unwrap();
        for (a, b) in all.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} read back as {b}");
        }
    }
}
