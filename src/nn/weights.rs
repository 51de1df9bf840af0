//! Where a model's frozen weights come from, and the bookkeeping that catches conversion bugs.
//!
//! A [`WeightStore`] holds one model component's tensors (the UNet's, say) under their diffusers
//! names, whatever layout the checkpoint on disk uses: the loader maps each diffusers key to a
//! tensor of a source file, optionally sliced (OpenCLIP's fused q/k/v) or reshaped (the VAE's 1×1
//! convolutions that diffusers stores as linear weights). Models read it through a [`Scope`],
//! whose path grows with the module tree. Every read is recorded, so that after a model is built
//! [`WeightStore::check_all_used`] can name any tensor of the checkpoint that nothing consumed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};

use super::adapter::{Adapter, AdapterProvider, LayerKind};
use super::tensor_file::TensorFile;
use crate::error::ModelError;
use crate::{Error, Result};

/// A file (or in-memory map) that tensors are read from.
pub enum TensorSource {
    /// A `.safetensors` file, read tensor by tensor ([`TensorFile`]).
    Safetensors { path: PathBuf, file: TensorFile },
    /// A PyTorch pickle checkpoint (`.ckpt`, `.bin`, `.pt`).
    Pickle {
        path: PathBuf,
        file: candle_core::pickle::PthTensors,
    },
    /// Tensors already in memory (tests, converted weights).
    Memory {
        name: String,
        tensors: HashMap<String, Tensor>,
    },
}

impl TensorSource {
    /// Opens a `.safetensors` file (its header only; tensors are read as they are asked for).
    pub fn safetensors(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path).map_err(|reason| ModelError::Unreadable {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(TensorSource::Safetensors {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Opens a PyTorch pickle checkpoint; `key` selects a nested dict (`state_dict`).
    pub fn pickle(path: &Path, key: Option<&str>) -> Result<Self> {
        let file = candle_core::pickle::PthTensors::new(path, key).map_err(|e| {
            ModelError::Unreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(TensorSource::Pickle {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Wraps tensors already in memory.
    pub fn memory(name: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        TensorSource::Memory {
            name: name.into(),
            tensors,
        }
    }

    /// Every key with its shape.
    pub fn keys_and_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            TensorSource::Safetensors { file, .. } => file.keys_and_shapes(),
            TensorSource::Pickle { file, .. } => file
                .tensor_infos()
                .iter()
                .map(|(k, info)| (k.clone(), info.layout.shape().dims().to_vec()))
                .collect(),
            TensorSource::Memory { tensors, .. } => tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect(),
        }
    }

    /// A name for messages: the file path or the in-memory map's name.
    pub fn describe(&self) -> String {
        match self {
            TensorSource::Safetensors { path, .. } | TensorSource::Pickle { path, .. } => {
                path.display().to_string()
            }
            TensorSource::Memory { name, .. } => name.clone(),
        }
    }

    fn load(&self, key: &str) -> Result<Tensor> {
        let missing = || ModelError::MissingWeight {
            key: key.to_string(),
            origin: self.describe(),
        };
        match self {
            TensorSource::Safetensors { file, .. } => Ok(file.load(key)?.ok_or_else(missing)?),
            TensorSource::Pickle { file, .. } => Ok(file.get(key)?.ok_or_else(missing)?),
            TensorSource::Memory { tensors, .. } => {
                Ok(tensors.get(key).cloned().ok_or_else(missing)?)
            }
        }
    }
}

/// How a stored tensor becomes the tensor a layer wants.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Used as stored.
    None,
    /// `narrow(dim, start, len)`: one part of a fused tensor (OpenCLIP's `in_proj_weight`).
    Slice {
        dim: usize,
        start: usize,
        len: usize,
    },
    /// Same elements, another shape (a `[C, C, 1, 1]` convolution used as a `[C, C]` linear).
    Reshape(Vec<usize>),
    /// A matrix stored the other way round (OpenCLIP's `text_projection` is `x @ P`, a Linear's
    /// weight is `Pᵀ`).
    Transpose,
}

/// Where the tensor behind one key lives.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Index into the store's sources.
    pub source: usize,
    /// The key inside that source.
    pub key: String,
    pub transform: Transform,
}

/// One model component's weights, addressed by diffusers key. See the module docs.
pub struct WeightStore {
    sources: Vec<TensorSource>,
    entries: BTreeMap<String, Entry>,
    used: Mutex<BTreeSet<String>>,
    dtype: DType,
    /// The dtype the frozen layers' weight matrices are kept in when it differs from `dtype`
    /// ([`WeightStore::set_matrix_dtype`]).
    matrix_dtype: Option<DType>,
    device: Device,
    /// Every read returns zeros of the requested shape without touching memory (see
    /// [`WeightStore::shape_only`]).
    shape_only: bool,
    /// Every read returns fresh random values drawn from this seed and the key (see
    /// [`WeightStore::random`]).
    random_seed: Option<u64>,
}

impl WeightStore {
    /// An empty store whose tensors will be converted to `dtype` on `device`.
    pub fn new(dtype: DType, device: Device) -> Self {
        WeightStore {
            sources: Vec::new(),
            entries: BTreeMap::new(),
            used: Mutex::new(BTreeSet::new()),
            dtype,
            matrix_dtype: None,
            device,
            shape_only: false,
            random_seed: None,
        }
    }

    /// A store that answers every read with zeros of the requested shape, as a stride-0 view
    /// that allocates nothing. Building a model on it costs no memory: it lists the model's
    /// layers (and the LoRA modules a config selects) from the configs alone, before any weight
    /// is read. Its models must not be run.
    pub fn shape_only(dtype: DType, device: Device) -> Self {
        WeightStore {
            shape_only: true,
            ..WeightStore::new(dtype, device)
        }
    }

    /// A store that answers every read with random values of the requested shape, drawn from a
    /// generator seeded by `seed` and the key (so a weight does not depend on the order of
    /// reads): matrices and kernels uniform with variance 1/fan_in, norm scales 1, other vectors
    /// (biases) uniform in ±0.05. For benchmarks: an SD-sized model with no checkpoint on disk.
    pub fn random(seed: u64, dtype: DType, device: Device) -> Self {
        WeightStore {
            random_seed: Some(seed),
            ..WeightStore::new(dtype, device)
        }
    }

    /// A store holding every tensor of `source` under its own key.
    pub fn from_source(source: TensorSource, dtype: DType, device: Device) -> Self {
        let mut store = WeightStore::new(dtype, device);
        let keys = source.keys_and_shapes();
        let index = store.add_source(source);
        for (key, _) in keys {
            store.insert(
                key.clone(),
                Entry {
                    source: index,
                    key,
                    transform: Transform::None,
                },
            );
        }
        store
    }

    /// A store over tensors already in memory, each under its own key.
    pub fn from_tensors(
        name: &str,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: Device,
    ) -> Self {
        WeightStore::from_source(TensorSource::memory(name, tensors), dtype, device)
    }

    /// Adds a source and returns its index for [`Entry::source`].
    pub fn add_source(&mut self, source: TensorSource) -> usize {
        self.sources.push(source);
        self.sources.len() - 1
    }

    /// The sources, in the order they were added.
    pub fn sources(&self) -> &[TensorSource] {
        &self.sources
    }

    /// Makes `key` read the tensor described by `entry`.
    pub fn insert(&mut self, key: String, entry: Entry) {
        self.entries.insert(key, entry);
    }

    /// Whether a tensor is stored under `key` (always true for a shape-only store).
    pub fn contains(&self, key: &str) -> bool {
        self.shape_only || self.random_seed.is_some() || self.entries.contains_key(key)
    }

    /// Every key of the store, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Converts the tensors read from now on to `dtype` instead.
    pub fn set_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Keeps the weight matrices of the frozen linear and convolution layers read from now on
    /// ([`WeightStore::get_matrix`]) in `dtype` (f16 or bf16 on the CPU: half the memory; the
    /// layers widen each one to the computing dtype while they use it). `None`: the store's
    /// dtype, like every other tensor.
    pub fn set_matrix_dtype(&mut self, dtype: Option<DType>) {
        self.matrix_dtype = dtype;
    }

    /// The tensor stored under `key` as a frozen layer's weight matrix: as [`WeightStore::get`],
    /// in the matrix dtype when one is set.
    pub fn get_matrix(&self, key: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.get_as(key, shape, self.matrix_dtype.unwrap_or(self.dtype))
    }

    /// The device tensors are moved to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tensor stored under `key`, converted to the store's dtype and device; it must have
    /// exactly `shape`. The key is marked as used.
    pub fn get(&self, key: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.get_as(key, shape, self.dtype)
    }

    fn get_as(&self, key: &str, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        if self.shape_only {
            let zero = Tensor::zeros((), dtype, &self.device)?;
            return Ok(zero.broadcast_as(shape)?);
        }
        if let Some(seed) = self.random_seed {
            self.mark_used(key);
            return random_weight(seed, key, &shape, dtype, &self.device);
        }
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| ModelError::MissingWeight {
                key: key.to_string(),
                origin: self.describe(),
            })?;
        let source = &self.sources[entry.source];
        let mut tensor = source.load(&entry.key)?;
        tensor = match &entry.transform {
            Transform::None => tensor,
            Transform::Slice { dim, start, len } => tensor.narrow(*dim, *start, *len)?,
            Transform::Reshape(dims) => {
                if tensor.elem_count() != dims.iter().product::<usize>() {
                    return Err(self.shape_error(key, &shape, tensor.dims()));
                }
                tensor.reshape(dims.as_slice())?
            }
            Transform::Transpose => tensor.t()?.contiguous()?,
        };
        if tensor.shape() != &shape {
            return Err(self.shape_error(key, &shape, tensor.dims()));
        }
        let tensor = tensor.to_dtype(dtype)?.to_device(&self.device)?;
        self.mark_used(key);
        Ok(tensor)
    }

    /// How many values the store's tensors hold (each stored tensor once, however many keys
    /// read parts of it): the model's size before any weight is read.
    pub fn element_count(&self) -> u64 {
        let mut shapes: Vec<HashMap<String, u64>> = Vec::new();
        for source in &self.sources {
            let sizes = source
                .keys_and_shapes()
                .into_iter()
                .map(|(k, s)| (k, s.iter().product::<usize>() as u64))
                .collect();
            shapes.push(sizes);
        }
        let stored: BTreeSet<(usize, &str)> = self
            .entries
            .values()
            .map(|e| (e.source, e.key.as_str()))
            .collect();
        stored
            .into_iter()
            .filter_map(|(source, key)| shapes.get(source)?.get(key))
            .sum()
    }

    /// Marks `key` as consumed without reading it (a buffer the model recomputes, say).
    pub fn mark_used(&self, key: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(key.to_string());
        }
    }

    /// The keys nothing has read yet, sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = match self.used.lock() {
            Ok(used) => used.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        self.entries
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Fails, naming the keys, when some tensor of the checkpoint was not consumed by the model:
    /// the model and the checkpoint disagree, and silently ignoring weights hides the bug.
    pub fn check_all_used(&self) -> Result<()> {
        let unused = self.unused_keys();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(ModelError::UnusedWeights {
                origin: self.describe(),
                keys: unused,
            }
            .into())
        }
    }

    /// A name for messages: the files behind this store.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.sources.iter().map(TensorSource::describe).collect();
        if names.is_empty() {
            "an empty weight store".to_string()
        } else {
            names.join(", ")
        }
    }

    fn shape_error(&self, key: &str, expected: &Shape, found: &[usize]) -> Error {
        ModelError::WeightShape {
            key: key.to_string(),
            origin: self.describe(),
            expected: expected.dims().to_vec(),
            found: found.to_vec(),
        }
        .into()
    }
}

/// The value [`WeightStore::random`] gives the weight `key` of `shape`.
fn random_weight(
    seed: u64,
    key: &str,
    shape: &Shape,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    // FNV-1a of the key, mixed with the seed: one independent stream per weight.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ hash);
    let dims = shape.dims();
    let n = shape.elem_count();
    let is_norm = key.rsplit('.').nth(1).is_some_and(|m| m.contains("norm"));
    let values: Vec<f32> = if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        let bound = (3.0 / fan_in.max(1) as f32).sqrt();
        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
    } else if is_norm && key.ends_with(".weight") {
        vec![1.0; n]
    } else {
        (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect()
    };
    Ok(Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?)
}

/// A view of a [`WeightStore`] at one module path, plus the adapter provider of the model being
/// built. `scope.pp("to_q").get("weight", (320, 320))` reads `<path>.to_q.weight`.
#[derive(Clone)]
pub struct Scope<'a> {
    store: &'a WeightStore,
    adapters: Option<&'a dyn AdapterProvider>,
    path: String,
}

impl<'a> Scope<'a> {
    /// The root scope of a model component.
    pub fn root(store: &'a WeightStore) -> Self {
        Scope {
            store,
            adapters: None,
            path: String::new(),
        }
    }

    /// The same scope, with `provider` asked for an adapter by every adaptable layer.
    pub fn with_adapters(mut self, provider: &'a dyn AdapterProvider) -> Self {
        self.adapters = Some(provider);
        self
    }

    /// The scope of a child module.
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope<'a> {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        Scope {
            store: self.store,
            adapters: self.adapters,
            path,
        }
    }

    /// This scope's module path (empty at the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The key of tensor `name` in this scope.
    pub fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The tensor `name` of this module, which must have `shape`.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.store.get(&self.key(name), shape)
    }

    /// Reads `<path>.<name>` as a frozen layer's weight matrix ([`WeightStore::get_matrix`]).
    pub fn get_matrix(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.store.get_matrix(&self.key(name), shape)
    }

    /// Whether this module has a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    /// The store behind this scope.
    pub fn store(&self) -> &'a WeightStore {
        self.store
    }

    /// The adapter for the layer at this path, if the provider wants one there.
    pub fn adapter(&self, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>> {
        match self.adapters {
            Some(provider) => provider.adapter_for(&self.path, kind),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> WeightStore {
        let mut tensors = HashMap::new();
        let dev = Device::Cpu;
        tensors.insert(
            "a.weight".to_string(),
            Tensor::ones((2, 3), DType::F32, &dev).unwrap(),
        );
        tensors.insert(
            "b.fused".to_string(),
            Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((6, 2))
                .unwrap(),
        );
        tensors.insert(
            "c.conv".to_string(),
            Tensor::zeros((2, 2, 1, 1), DType::F16, &dev).unwrap(),
        );
        WeightStore::from_tensors("test", tensors, DType::F32, dev)
    }

    #[test]
    fn reads_by_scope_path_and_tracks_use() -> Result<()> {
        let store = store();
        let root = Scope::root(&store);
        let w = root.pp("a").get("weight", (2, 3))?;
        assert_eq!(w.dims(), &[2, 3]);
        assert_eq!(
            store.unused_keys(),
            vec!["b.fused".to_string(), "c.conv".to_string()]
        );
        let err = store.check_all_used().unwrap_err().to_string();
        assert!(err.contains("b.fused") && err.contains("c.conv"), "{err}");
        Ok(())
    }

    #[test]
    fn wrong_shape_and_missing_key_name_the_key() {
        let store = store();
        let err = store.get("a.weight", (3, 2)).unwrap_err().to_string();
        assert!(
            err.contains("a.weight") && err.contains("[3, 2]") && err.contains("[2, 3]"),
            "{err}"
        );
        let err = Scope::root(&store)
            .pp("x")
            .get("bias", 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.bias"), "{err}");
    }

    #[test]
    fn slices_reshapes_and_converts_dtype() -> Result<()> {
        let mut store = store();
        store.insert(
            "q".into(),
            Entry {
                source: 0,
                key: "b.fused".into(),
                transform: Transform::Slice {
                    dim: 0,
                    start: 2,
                    len: 2,
                },
            },
        );
        store.insert(
            "lin".into(),
            Entry {
                source: 0,
                key: "c.conv".into(),
                transform: Transform::Reshape(vec![2, 2]),
            },
        );
        let q = store.get("q", (2, 2))?.to_vec2::<f32>()?;
        assert_eq!(q, vec![vec![4.0, 5.0], vec![6.0, 7.0]]);
        let lin = store.get("lin", (2, 2))?;
        assert_eq!(lin.dtype(), DType::F32);
        Ok(())
    }

    #[test]
    fn a_shape_only_store_answers_any_key_without_allocating() -> Result<()> {
        let store = WeightStore::shape_only(DType::F32, Device::Cpu);
        let w = Scope::root(&store)
            .pp("any")
            .get("weight", (1280, 1280, 3, 3))?;
        assert_eq!(w.dims(), &[1280, 1280, 3, 3]);
        assert_eq!(
            w.stride(),
            &[0, 0, 0, 0],
            "a view of one zero, not an allocation"
        );
        assert!(store.contains("whatever") && store.check_all_used().is_ok());
        Ok(())
    }
}
