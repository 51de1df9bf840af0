//! Loading a whole Stable Diffusion model from any source: a diffusers folder, a single LDM
//! checkpoint (`.safetensors` / `.ckpt`) or a hub id.
//!
//! [`BaseModel::open`] resolves every config (from the files, an LDM yaml, or the tensor
//! shapes) and maps every weight key of the UNet, the text encoder and the VAE into its own
//! [`WeightStore`] under diffusers names, without reading a weight (files are memory-mapped).
//! Each component is then built on demand, and separately: the trainer drops the VAE once the
//! latents are cached. Every build checks that the model consumed every tensor mapped to it, so
//! a conversion bug or a mismatched config is an error that names the key, never a silently
//! half-loaded model.
//!
//! - `diffusers`: the folder layout, weight-file choice (fp16 variants, shards, `.bin`).
//! - `single_file`: the LDM checkpoint, split by component, with the keys every loader ignores.
//! - `ldm_unet`, `ldm_vae`, `ldm_text`: LDM → diffusers key conversion and configs
//!   inferred from tensor shapes; `ldm_yaml`: the LDM inference yaml beside a checkpoint.
//! - `bundled_tokenizer`: the CLIP tokenizer compiled into the binary.

mod bundled_tokenizer;
mod diffusers;
mod ldm_text;
mod ldm_unet;
mod ldm_vae;
mod ldm_yaml;
mod single_file;

pub use ldm_unet::ldm_path;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::clip_text::ClipTextModel;
use super::clip_text_config::ClipTextConfig;
use super::clip_text_projection::ClipTextModelWithProjection;
use super::conditioning::{ConditioningRule, TextEncoder, TextEncoders, TextModel};
use super::family::{Architecture, ModelFamily};
use super::hub::HubCache;
use super::noise::{NoiseSchedule, PredictionType};
use super::source::ModelSource;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::unet_config::UNetConfig;
use super::vae::AutoencoderKL;
use super::vae_config::VaeConfig;
use crate::error::ModelError;
use crate::nn::weights::{Entry, TensorSource, Transform};
use crate::nn::{AdapterProvider, Scope, WeightStore};
use crate::{Error, Result};

/// How to load a base model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype weights are converted to: f32 on the CPU; f16/bf16 for CUDA.
    pub dtype: DType,
    /// The dtype the frozen layers' weight matrices are kept in, when not `dtype` (f16/bf16 on
    /// the CPU: half their memory, computed in `dtype`; [`WeightStore::set_matrix_dtype`]).
    pub matrix_dtype: Option<DType>,
    pub device: Device,
    /// A diffusers weight variant (`fp16` reads `*.fp16.safetensors`). Without it the default
    /// files are read, or the only variant a folder holds.
    pub variant: Option<String>,
    /// A tokenizer folder or hub id instead of the model's (single files carry none).
    pub tokenizer: Option<String>,
    /// The same for the second text encoder (SDXL's `tokenizer_2`).
    pub tokenizer_2: Option<String>,
    /// A VAE instead of the model's: a diffusers VAE folder (or a whole diffusers model), a
    /// single VAE checkpoint file (LDM layout), or a hub id.
    pub vae: Option<String>,
    /// Overrides the prediction type the model's scheduler config (or yaml) gives.
    pub prediction_type: Option<PredictionType>,
    /// Where hub ids are looked up and downloaded to.
    pub hub_cache: HubCache,
}

impl Default for LoadOptions {
    /// f32 on the CPU, the model's own files, the Hugging Face cache of the environment.
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            matrix_dtype: None,
            device: Device::Cpu,
            variant: None,
            tokenizer: None,
            tokenizer_2: None,
            vae: None,
            prediction_type: None,
            hub_cache: HubCache::from_env(),
        }
    }
}

/// One component's weights under diffusers keys, ready to build the model from.
pub(crate) struct ComponentWeights {
    store: WeightStore,
    /// Diffusers key → the key in the file, where they differ (for messages).
    renamed: BTreeMap<String, String>,
}

/// A diffusers key and where its tensor lives in a file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MappedKey {
    pub target: String,
    pub file_key: String,
    pub transform: Transform,
}

impl MappedKey {
    /// `target` read from `file_key` as stored.
    pub(crate) fn new(target: String, file_key: String) -> Self {
        MappedKey {
            target,
            file_key,
            transform: Transform::None,
        }
    }
}

impl ComponentWeights {
    /// A store over `sources` holding each of their keys under `rename(key)`.
    pub(crate) fn renamed(
        sources: Vec<TensorSource>,
        rename: &dyn Fn(&str) -> String,
        options: &LoadOptions,
    ) -> Self {
        let mut store = WeightStore::new(options.dtype, options.device.clone());
        store.set_matrix_dtype(options.matrix_dtype);
        let mut renamed = BTreeMap::new();
        for source in sources {
            let keys = source.keys_and_shapes();
            let index = store.add_source(source);
            for (key, _) in keys {
                let target = rename(&key);
                if target != key {
                    renamed.insert(target.clone(), key.clone());
                }
                store.insert(
                    target,
                    Entry {
                        source: index,
                        key,
                        transform: Transform::None,
                    },
                );
            }
        }
        ComponentWeights { store, renamed }
    }

    /// A store over one source whose tensors are read under the given diffusers keys.
    pub(crate) fn mapped(
        source: TensorSource,
        keys: Vec<MappedKey>,
        options: &LoadOptions,
    ) -> Self {
        let mut store = WeightStore::new(options.dtype, options.device.clone());
        store.set_matrix_dtype(options.matrix_dtype);
        let index = store.add_source(source);
        let mut renamed = BTreeMap::new();
        for key in keys {
            if key.target != key.file_key {
                renamed.insert(key.target.clone(), key.file_key.clone());
            }
            store.insert(
                key.target,
                Entry {
                    source: index,
                    key: key.file_key,
                    transform: key.transform,
                },
            );
        }
        ComponentWeights { store, renamed }
    }

    /// The store the component is built from.
    pub(crate) fn store(&self) -> &WeightStore {
        &self.store
    }

    fn scope<'a>(&'a self, adapters: Option<&'a dyn AdapterProvider>) -> Scope<'a> {
        let root = Scope::root(&self.store);
        match adapters {
            Some(provider) => root.with_adapters(provider),
            None => root,
        }
    }

    /// Builds a model with `build`, then insists every tensor was consumed; errors name the
    /// key in the file too where it differs from the diffusers key.
    fn build<T>(
        &self,
        adapters: Option<&dyn AdapterProvider>,
        build: impl FnOnce(Scope) -> Result<T>,
    ) -> Result<T> {
        let model = build(self.scope(adapters)).map_err(|e| self.explain(e))?;
        self.store.check_all_used().map_err(|e| self.explain(e))?;
        Ok(model)
    }

    /// `key`, followed by the key it is read from when that differs; messages quote the whole
    /// as `` `key` from `file key` ``.
    fn in_file(&self, key: String) -> String {
        match self.renamed.get(&key) {
            Some(file_key) => format!("{key}` from `{file_key}"),
            None => key,
        }
    }

    fn explain(&self, error: Error) -> Error {
        match error {
            Error::Model(ModelError::WeightShape {
                key,
                origin,
                expected,
                found,
            }) => ModelError::WeightShape {
                key: self.in_file(key),
                origin,
                expected,
                found,
            }
            .into(),
            Error::Model(ModelError::UnusedWeights { origin, keys }) => ModelError::UnusedWeights {
                origin,
                keys: keys.into_iter().map(|k| self.in_file(k)).collect(),
            }
            .into(),
            other => other,
        }
    }
}

/// Where the tokenizer comes from.
#[derive(Debug, Clone, PartialEq)]
enum TokenizerChoice {
    /// A CLIP tokenizer folder.
    Folder(PathBuf),
    /// The copy of `models/clip-tokenizer` compiled into the binary.
    Bundled,
}

/// One text encoder of a base model: config, weights, and where its tokenizer comes from.
struct TextParts {
    config: ClipTextConfig,
    weights: ComponentWeights,
    tokenizer: TokenizerChoice,
    /// The pad token to use instead of the tokenizer files' (`!` for SD 2.x when bundled).
    pad_token: Option<&'static str>,
}

/// A Stable Diffusion model (1.x, 2.x, SDXL) opened from any source: configs resolved, every
/// weight mapped (not read). Build its components with [`BaseModel::unet`],
/// [`BaseModel::text_encoders`], [`BaseModel::vae`]; see the module docs.
pub struct BaseModel {
    description: String,
    architecture: Architecture,
    unet_config: UNetConfig,
    vae_config: VaeConfig,
    unet: ComponentWeights,
    /// In the order their hidden states are joined (SDXL: CLIP ViT-L, then OpenCLIP bigG).
    text_encoders: Vec<TextParts>,
    vae: ComponentWeights,
    noise: NoiseSchedule,
    notes: Vec<String>,
}

/// One text encoder as a source-specific opener found it.
pub(crate) struct OpenedText {
    pub config: ClipTextConfig,
    pub weights: ComponentWeights,
    /// A tokenizer folder, or `None` for the bundled tokenizer.
    pub tokenizer: Option<PathBuf>,
}

/// What a source-specific opener hands back.
pub(crate) struct Opened {
    pub description: String,
    pub architecture: Architecture,
    pub unet_config: UNetConfig,
    pub unet: ComponentWeights,
    /// As many as the family has, in order.
    pub text_encoders: Vec<OpenedText>,
    /// The VAE; `None` only when the file has none and `vae:` names one.
    pub vae: Option<(VaeConfig, ComponentWeights)>,
    /// The scheduler config, and where it came from (for the notes).
    pub scheduler: super::noise::SchedulerConfig,
    pub scheduler_origin: String,
    /// Where the prediction type came from ("scheduler_config.json", "tiny-sd2.yaml", ...),
    /// or `None` when it is a default the user may need to override.
    pub prediction_origin: Option<String>,
    pub notes: Vec<String>,
}

impl BaseModel {
    /// Opens the model `source` names: configs resolved and weights mapped, nothing read.
    pub fn open(source: &ModelSource, options: &LoadOptions) -> Result<Self> {
        let opened = match source {
            ModelSource::Diffusers { root, .. } => diffusers::open(root, options)?,
            ModelSource::SingleFile { path, format, .. } => {
                single_file::open(path, *format, options)?
            }
            ModelSource::Hub { id, .. } => {
                let folder = diffusers::hub_snapshot(id, options)?;
                let mut opened = diffusers::open(&folder, options)?;
                opened.description = format!("hub model {id} ({})", folder.display());
                opened
            }
        };
        Self::finish(opened, options)
    }

    /// [`ModelSource::detect`] then [`BaseModel::open`]: `base_model` is a folder, a
    /// checkpoint file or a hub id.
    pub fn open_path(base_model: &str, options: &LoadOptions) -> Result<Self> {
        let source = ModelSource::detect_with(base_model, &options.hub_cache)?;
        Self::open(&source, options)
    }

    fn finish(mut opened: Opened, options: &LoadOptions) -> Result<Self> {
        let architecture = opened.architecture;
        let mut notes = vec![format!(
            "{architecture} ({})",
            architecture.family.text_encoder_name()
        )];

        // The VAE override replaces the model's before anything is built.
        let (vae_config, mut vae) = match (&options.vae, opened.vae.take()) {
            (Some(given), own) => {
                let base = own.map(|(c, _)| c).unwrap_or_default();
                let (config, weights, note) = open_vae_override(given, &base, options)?;
                opened.notes.push(note);
                (config, weights)
            }
            (None, Some(own)) => own,
            (None, None) => {
                return Err(ModelError::InvalidConfig {
                    origin: opened.description,
                    message: "the model has no VAE; set `vae:` to one".to_string(),
                }
                .into())
            }
        };

        // Prediction type: the user's override, else the files', else epsilon with a hint.
        let mut scheduler = opened.scheduler.clone();
        let prediction_note = match options.prediction_type {
            Some(p) => {
                scheduler.prediction_type = p.as_str().to_string();
                format!("{} (set in the config)", p.as_str())
            }
            None => match &opened.prediction_origin {
                Some(origin) => format!("{} (from {origin})", scheduler.prediction_type),
                None => {
                    let hint = if architecture.family == ModelFamily::Sd2 {
                        "; SD 2.x 768-v models predict v: set `prediction_type: v_prediction` for them"
                    } else {
                        ""
                    };
                    format!("{} (the default{hint})", scheduler.prediction_type)
                }
            },
        };
        let noise = NoiseSchedule::from_config(&scheduler, &opened.scheduler_origin)?;
        // SDXL's VAE overflows in f16: with `force_upcast` (its config's) it stays in f32, as
        // diffusers' SDXL pipelines keep it; the fp16-fix VAEs say `force_upcast: false`.
        if architecture.family == ModelFamily::Sdxl
            && vae_config.force_upcast
            && options.dtype != DType::F32
        {
            vae.store.set_dtype(DType::F32);
            opened
                .notes
                .push("VAE: kept in f32 (its config's `force_upcast`)".to_string());
        }
        notes.push(format!("prediction type: {prediction_note}"));

        let family = architecture.family;
        if opened.text_encoders.len() != family.text_encoder_count() {
            return Err(ModelError::InvalidConfig {
                origin: opened.description,
                message: format!(
                    "{family} has {} text encoder(s), this model {}",
                    family.text_encoder_count(),
                    opened.text_encoders.len()
                ),
            }
            .into());
        }
        let overrides = [&options.tokenizer, &options.tokenizer_2];
        let mut text_encoders = Vec::new();
        for (index, text) in opened.text_encoders.into_iter().enumerate() {
            let given = overrides.get(index).copied().and_then(Option::as_ref);
            let (tokenizer, pad_token) = match (given, text.tokenizer) {
                (Some(given), _) => (
                    TokenizerChoice::Folder(resolve_tokenizer(given, index, options)?),
                    None,
                ),
                (None, Some(folder)) => (TokenizerChoice::Folder(folder), None),
                (None, None) => {
                    // SD 2.x's and SDXL's OpenCLIP tokenizers pad with `!`.
                    let open_clip = family == ModelFamily::Sd2 || index == 1;
                    (TokenizerChoice::Bundled, open_clip.then_some("!"))
                }
            };
            let which = match family.text_encoder_count() {
                1 => "tokenizer".to_string(),
                _ => format!("tokenizer {}", index + 1),
            };
            notes.push(match (&tokenizer, pad_token) {
                (TokenizerChoice::Folder(folder), _) => format!("{which}: {}", folder.display()),
                (TokenizerChoice::Bundled, Some(pad)) => format!(
                    "{which}: bundled CLIP tokenizer, padding with `{pad}` as OpenCLIP does"
                ),
                (TokenizerChoice::Bundled, None) => format!("{which}: bundled CLIP tokenizer"),
            });
            text_encoders.push(TextParts {
                config: text.config,
                weights: text.weights,
                tokenizer,
                pad_token,
            });
        }
        notes.append(&mut opened.notes);

        Ok(BaseModel {
            description: opened.description,
            architecture,
            unet_config: opened.unet_config,
            vae_config,
            unet: opened.unet,
            text_encoders,
            vae,
            noise,
            notes,
        })
    }

    /// Builds the UNet; `adapters` is asked for an adapter at every Linear/Conv2d.
    pub fn unet(&self, adapters: Option<&dyn AdapterProvider>) -> Result<UNet2DConditionModel> {
        self.unet.build(adapters, |scope| {
            UNet2DConditionModel::new(scope, &self.unet_config)
        })
    }

    /// How many text encoders the model has (1, SDXL 2).
    pub fn text_encoder_count(&self) -> usize {
        self.text_encoders.len()
    }

    /// Builds the first text encoder (SD 1.x/2.x's only one) without its projection; adapters
    /// are asked with `text_model.`-prefixed paths.
    pub fn text_encoder(&self, adapters: Option<&dyn AdapterProvider>) -> Result<ClipTextModel> {
        let parts = &self.text_encoders[0];
        parts
            .weights
            .build(adapters, |scope| ClipTextModel::new(scope, &parts.config))
    }

    /// Builds text encoder `index` as the family uses it: SDXL's last one with the projection
    /// of its pooled output (`text_projection`).
    pub fn text_model(
        &self,
        index: usize,
        adapters: Option<&dyn AdapterProvider>,
    ) -> Result<TextModel> {
        let parts = self.text_parts(index)?;
        let projected =
            self.architecture.family == ModelFamily::Sdxl && index + 1 == self.text_encoders.len();
        parts.weights.build(adapters, |scope| {
            Ok(match projected {
                true => TextModel::WithProjection(ClipTextModelWithProjection::new(
                    scope,
                    &parts.config,
                )?),
                false => TextModel::Clip(ClipTextModel::new(scope, &parts.config)?),
            })
        })
    }

    /// Builds every text encoder with its tokenizer, `adapters[i]` asked for encoder `i`'s
    /// layers, read as the family conditions (`clip_skip` for SD 1.x/2.x; SDXL's penultimate
    /// layers and pooled output).
    pub fn text_encoders(
        &self,
        adapters: &[Option<&dyn AdapterProvider>],
        clip_skip: usize,
    ) -> Result<TextEncoders> {
        let mut encoders = Vec::with_capacity(self.text_encoders.len());
        for index in 0..self.text_encoders.len() {
            let provider = adapters.get(index).copied().flatten();
            encoders.push(TextEncoder {
                tokenizer: self.tokenizer_at(index)?,
                model: self.text_model(index, provider)?,
            });
        }
        let rule = match self.architecture.family {
            ModelFamily::Sdxl => ConditioningRule::PenultimateAndPooled,
            ModelFamily::Sd1 | ModelFamily::Sd2 => ConditioningRule::ClipSkip(clip_skip),
        };
        Ok(TextEncoders { encoders, rule })
    }

    fn text_parts(&self, index: usize) -> Result<&TextParts> {
        self.text_encoders.get(index).ok_or_else(|| {
            ModelError::InvalidConfig {
                origin: self.description.clone(),
                message: format!(
                    "the model has {} text encoder(s), not {}",
                    self.text_encoders.len(),
                    index + 1
                ),
            }
            .into()
        })
    }

    /// Builds the VAE (never adapted).
    pub fn vae(&self) -> Result<AutoencoderKL> {
        self.vae
            .build(None, |scope| AutoencoderKL::new(scope, &self.vae_config))
    }

    /// Reads the first text encoder's tokenizer (SD 1.x/2.x's only one); see
    /// [`BaseModel::tokenizer_at`].
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        self.tokenizer_at(0)
    }

    /// Reads text encoder `index`'s tokenizer (a folder, or the bundled one) and checks that its
    /// ids fit the encoder's vocabulary.
    pub fn tokenizer_at(&self, index: usize) -> Result<ClipTokenizer> {
        let parts = self.text_parts(index)?;
        let mut tokenizer = match &parts.tokenizer {
            TokenizerChoice::Folder(folder) => ClipTokenizer::from_dir(folder)?,
            TokenizerChoice::Bundled => bundled_tokenizer::load()?,
        };
        if let Some(pad) = parts.pad_token {
            tokenizer = tokenizer.with_pad_token(pad)?;
        }
        let (tokens, vocab) = (tokenizer.vocab_size(), parts.config.vocab_size);
        if tokens > vocab {
            let origin = match &parts.tokenizer {
                TokenizerChoice::Folder(folder) => folder.display().to_string(),
                TokenizerChoice::Bundled => "the bundled CLIP tokenizer".to_string(),
            };
            let key = match index {
                0 => "tokenizer",
                _ => "tokenizer_2",
            };
            return Err(ModelError::InvalidConfig {
                origin,
                message: format!(
                    "the tokenizer has {tokens} tokens but the text encoder of {} only {vocab}: \
                     they do not belong together; set `{key}:` to this model's tokenizer",
                    self.description
                ),
            }
            .into());
        }
        Ok(tokenizer)
    }

    /// The training noise schedule (with the prediction type override applied).
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.noise
    }

    /// SD 1.x or 2.x.
    pub fn family(&self) -> ModelFamily {
        self.architecture.family
    }

    /// The version and the cross-attention width.
    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// What was opened, in words (the folder, the file, the hub id).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// What was found or inferred, one line each, for the run's log.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The UNet's config.
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet_config
    }

    /// The first text encoder's config (SD 1.x/2.x's only one).
    pub fn text_encoder_config(&self) -> &ClipTextConfig {
        &self.text_encoders[0].config
    }

    /// Every text encoder's config, in order.
    pub fn text_encoder_configs(&self) -> Vec<&ClipTextConfig> {
        self.text_encoders.iter().map(|t| &t.config).collect()
    }

    /// The VAE's config (its `scaling_factor` scales latents).
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_config
    }

    /// The weights the UNet is built from (to list them, or to build with a custom scope).
    pub fn unet_weights(&self) -> &WeightStore {
        self.unet.store()
    }

    /// The weights the first text encoder is built from.
    pub fn text_encoder_weights(&self) -> &WeightStore {
        self.text_encoders[0].weights.store()
    }

    /// The weights text encoder `index` is built from.
    pub fn text_encoder_weights_at(&self, index: usize) -> Result<&WeightStore> {
        Ok(self.text_parts(index)?.weights.store())
    }

    /// The weights the VAE is built from.
    pub fn vae_weights(&self) -> &WeightStore {
        self.vae.store()
    }

    /// How many values the model's weights hold (UNet, text encoders and VAE), from the files'
    /// headers: 3.5 G for SDXL, 1.07 G for SD 1.5.
    pub fn weight_elements(&self) -> u64 {
        self.stores().map(WeightStore::element_count).sum()
    }

    /// Keeps the frozen layers' weight matrices of every component built from now on in
    /// `dtype` ([`WeightStore::set_matrix_dtype`]), as [`LoadOptions::matrix_dtype`] does.
    pub fn set_matrix_dtype(&mut self, dtype: Option<DType>) {
        self.unet.store.set_matrix_dtype(dtype);
        self.vae.store.set_matrix_dtype(dtype);
        for text in &mut self.text_encoders {
            text.weights.store.set_matrix_dtype(dtype);
        }
    }

    fn stores(&self) -> impl Iterator<Item = &WeightStore> {
        [self.unet.store(), self.vae.store()]
            .into_iter()
            .chain(self.text_encoders.iter().map(|t| t.weights.store()))
    }
}

/// The tokenizer of text encoder `index` given as a folder or a hub id.
fn resolve_tokenizer(given: &str, index: usize, options: &LoadOptions) -> Result<PathBuf> {
    let path = Path::new(given);
    let (key, folder) = match index {
        0 => ("tokenizer", "tokenizer"),
        _ => ("tokenizer_2", "tokenizer_2"),
    };
    if path.is_dir() {
        // A whole diffusers model folder has its tokenizer in `tokenizer/` (`tokenizer_2/`).
        let nested = path.join(folder);
        return Ok(if nested.is_dir() && !has_tokenizer_files(path) {
            nested
        } else {
            path.to_path_buf()
        });
    }
    if crate::config::is_hub_id(given) {
        return diffusers::hub_tokenizer(given, folder, options);
    }
    Err(ModelError::NotFound {
        path: path.to_path_buf(),
        hint: format!(
            "check `{key}` in the config: it names a CLIP tokenizer folder (tokenizer.json, or \
             vocab.json + merges.txt) or a hub id such as `openai/clip-vit-large-patch14`"
        ),
    }
    .into())
}

fn has_tokenizer_files(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file() || dir.join("vocab.json").is_file()
}

/// The VAE named by `vae:` with its config and a note; `base` is the model's own VAE config,
/// whose scaling factor a single VAE file (which records none) keeps.
fn open_vae_override(
    given: &str,
    base: &VaeConfig,
    options: &LoadOptions,
) -> Result<(VaeConfig, ComponentWeights, String)> {
    let path = Path::new(given);
    if path.is_dir() {
        let folder = if path.join("config.json").is_file() {
            path.to_path_buf()
        } else if path.join("vae").join("config.json").is_file() {
            path.join("vae")
        } else {
            return Err(ModelError::Unreadable {
                path: path.to_path_buf(),
                reason: "a VAE folder holds config.json and the weights (diffusers layout); \
                         this one has no config.json (nor vae/config.json)"
                    .to_string(),
            }
            .into());
        };
        let (config, weights, note) = diffusers::open_vae_folder(&folder, options)?;
        return Ok((
            config,
            weights,
            format!("VAE: {} ({note})", folder.display()),
        ));
    }
    if path.is_file() {
        let (config, weights) = single_file::open_vae_file(path, base, options)?;
        return Ok((
            config,
            weights,
            format!(
                "VAE: {} (LDM layout, config inferred from the tensor shapes, scaling factor {} \
                 kept from the base model)",
                path.display(),
                base.scaling_factor
            ),
        ));
    }
    if crate::config::is_hub_id(given) {
        let folder = diffusers::hub_vae(given, options)?;
        let (config, weights, note) = diffusers::open_vae_folder(&folder, options)?;
        return Ok((config, weights, format!("VAE: hub model {given} ({note})")));
    }
    Err(ModelError::NotFound {
        path: path.to_path_buf(),
        hint: "check `vae` in the config: it names a diffusers VAE folder, a VAE checkpoint file \
               or a hub id such as `stabilityai/sd-vae-ft-mse`"
            .to_string(),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_keeps_its_vae_in_f32_when_the_rest_is_half() -> Result<()> {
        let half = LoadOptions {
            dtype: DType::F16,
            ..LoadOptions::default()
        };
        let open = |name: &str| {
            let path = crate::fixtures::path(name);
            BaseModel::open_path(path.to_str().unwrap_or_default(), &half)
        };
        let xl = open("tiny-sdxl")?;
        assert_eq!(xl.vae()?.dtype(), DType::F32);
        assert_eq!(xl.unet_weights().dtype(), DType::F16);
        assert!(xl.notes().iter().any(|n| n.contains("force_upcast")));
        // SD 1.x's VAE follows the run's precision, as in diffusers' SD pipelines.
        assert_eq!(open("tiny-sd1")?.vae()?.dtype(), DType::F16);
        Ok(())
    }
}
