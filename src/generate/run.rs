//! The `generate` command: open the base model, read the LoRAs (from `--lora` and from the
//! prompt's `<lora:...>` tags), build the models with them attached, draw `count` pictures with
//! consecutive seeds and save each as `<out>/NNNNN-<seed>.png` with A1111's generation
//! parameters.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::GenerateError;
use super::lora_files::{LoadedLora, LoraUse};
use super::lora_stack::LoraStack;
use super::output::{image_file_name, next_sequence_number};
use super::pipeline::{ImageRequest, Pipeline};
use super::png_info::{schedule_type, version, write_png, GenerationParameters};
use super::prompt::parse_prompt;
use super::samplers::SamplerKind;
use super::schedule::{SamplerConfig, SamplingSchedule};
use crate::lora::{LoraBase, LoraModel};
use crate::models::load::{BaseModel, LoadOptions};
use crate::models::source::ModelSource;
use crate::{Error, Result};

/// Everything `generate` is asked to do.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// A diffusers folder, a single checkpoint file or a hub id.
    pub model: String,
    /// The prompt as written, `<lora:name:weight>` tags included.
    pub prompt: String,
    pub negative_prompt: String,
    /// `--lora FILE[:WEIGHT]`, applied before the prompt's tags.
    pub loras: Vec<LoraUse>,
    /// Where `<lora:name>` tags are looked up.
    pub lora_dir: Option<PathBuf>,
    pub steps: usize,
    pub cfg_scale: f64,
    /// The first picture's seed; picture `i` uses `seed + i`.
    pub seed: u64,
    /// The picture's size; `None`: the model family's (512, SDXL 1024).
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub sampler: SamplerKind,
    pub count: usize,
    pub out_dir: PathBuf,
    pub clip_skip: usize,
    /// Unmatched LoRA keys are warnings instead of errors.
    pub lenient: bool,
    /// dtype, device, VAE and tokenizer overrides, hub cache.
    pub load: LoadOptions,
}

/// What a run tells its user as it goes.
pub trait GenerateProgress {
    /// A line for the log (what was loaded, warnings).
    fn note(&mut self, text: &str);
    /// Picture `image` (0-based) of `count` reached sampler step `step` of `steps`.
    fn step(&mut self, image: usize, count: usize, step: usize, steps: usize);
    /// Picture `image` was written to `path`.
    fn saved(&mut self, image: usize, path: &Path);
}

/// Runs `generate`; returns the files written.
pub fn run(options: &GenerateOptions, progress: &mut dyn GenerateProgress) -> Result<Vec<PathBuf>> {
    if !options.cfg_scale.is_finite() {
        return Err(GenerateError::new(
            "--cfg",
            format!(
                "`{}` is not a finite number; the guidance scale is usually 5 to 9 (1 = none)",
                options.cfg_scale
            ),
        )
        .into());
    }
    let parsed = parse_prompt(&options.prompt)?;
    for tag in &parsed.ignored {
        progress.note(&format!(
            "warning: {tag}: only <lora:...> tags are applied; this one is ignored"
        ));
    }
    let mut uses = options.loras.clone();
    for tag in &parsed.loras {
        uses.push(LoraUse::from_tag(tag, options.lora_dir.as_deref())?);
    }
    let loras = uses
        .iter()
        .map(LoadedLora::read)
        .collect::<Result<Vec<_>>>()?;

    // The model is found once; what it is decides the loading, the sampler keys and the name.
    let source = ModelSource::detect_with(&options.model, &options.load.hub_cache)?;
    let checkpoint = BaseModel::open(&source, &options.load)?;
    progress.note(&format!("model: {}", checkpoint.description()));
    for note in checkpoint.notes() {
        progress.note(&format!("  {note}"));
    }
    let lora_hashes: Vec<(String, String)> = loras
        .iter()
        .map(|l| (l.usage.name.clone(), l.short_hash.clone()))
        .collect();
    for l in &loras {
        progress.note(&format!(
            "LoRA: {} ({} modules, {} format) at weight {}{}",
            l.usage.path.display(),
            l.file.modules.len(),
            l.file.format,
            l.usage.unet_weight,
            if l.usage.text_encoder_weight != l.usage.unet_weight {
                format!(" (text encoder {})", l.usage.text_encoder_weight)
            } else {
                String::new()
            }
        ));
    }
    let base = LoraBase::new(checkpoint.family(), checkpoint.unet_config());
    let stack = LoraStack::new(loras, &base, &options.load.device)?;
    let unet_provider = stack.provider(LoraModel::Unet);
    let text_provider = stack.provider(LoraModel::TextEncoder);
    let text_provider_2 = stack.provider(LoraModel::TextEncoder2);
    let with = |p| (!stack.is_empty()).then_some(p);
    let unet = checkpoint.unet(with(&unet_provider as &dyn crate::nn::AdapterProvider))?;
    let text_encoders = checkpoint.text_encoders(
        &[
            with(&text_provider as &dyn crate::nn::AdapterProvider),
            with(&text_provider_2 as &dyn crate::nn::AdapterProvider),
        ],
        options.clip_skip,
    )?;
    for warning in stack.check_all_matched(options.lenient)? {
        progress.note(&format!("warning: {warning}"));
    }
    let vae = checkpoint.vae()?;

    let keys = SamplerConfig::for_model(&source, &options.load.hub_cache)?;
    progress.note(&format!(
        "sampler: {} with {} timesteps (from {})",
        options.sampler,
        options.sampler.spacing_for(&keys),
        keys.origin
    ));
    for key in &keys.ignored {
        progress.note(&format!(
            "warning: {}: `{key}` is set, but the samplers here do not implement it; it is ignored",
            keys.origin
        ));
    }
    let schedule = SamplingSchedule::new(checkpoint.noise_schedule(), keys);
    let pipeline = Pipeline {
        unet: &unet,
        text_encoders: &text_encoders,
        vae: &vae,
        schedule: &schedule,
        device: options.load.device.clone(),
    };
    let side = checkpoint.family().default_resolution() as usize;
    let (width, height) = (
        options.width.unwrap_or(side),
        options.height.unwrap_or(side),
    );
    pipeline.check_size(width, height)?;
    let (dropped, read) = text_encoders.truncation(&parsed.text)?;
    if dropped > 0 {
        progress.note(&format!(
            "warning: the prompt is {dropped} token(s) longer than the text encoder reads \
             ({read}); the end is cut off"
        ));
    }

    let (model_name, model_hash) = model_identity(&options.model, &source)?;
    // The parameters show the LoRAs of `--lora` as the tags that apply them in WebUI.
    let mut shown_prompt = options.prompt.clone();
    for lora in &options.loras {
        if !shown_prompt.is_empty() {
            shown_prompt.push(' ');
        }
        shown_prompt.push_str(&lora.webui_tag());
    }

    std::fs::create_dir_all(&options.out_dir).map_err(|e| Error::io(&options.out_dir, e))?;
    let first_number = next_sequence_number(&options.out_dir)?;
    let mut written = Vec::new();
    for image_index in 0..options.count {
        let seed = options.seed.wrapping_add(image_index as u64);
        let request = ImageRequest {
            prompt: parsed.text.clone(),
            negative_prompt: options.negative_prompt.clone(),
            width,
            height,
            steps: options.steps,
            cfg_scale: options.cfg_scale,
            seed,
            sampler: options.sampler,
        };
        let image = pipeline.generate(&request, &mut |step, steps| {
            progress.step(image_index, options.count, step, steps)
        })?;
        let parameters = GenerationParameters {
            prompt: shown_prompt.clone(),
            negative_prompt: options.negative_prompt.clone(),
            steps: options.steps,
            sampler: options.sampler,
            schedule_type: schedule_type(options.sampler, options.sampler.spacing(&schedule))
                .to_string(),
            cfg_scale: options.cfg_scale,
            seed,
            width,
            height,
            model_hash: model_hash.clone(),
            model: Some(model_name.clone()),
            clip_skip: options.clip_skip,
            lora_hashes: lora_hashes.clone(),
            version: version(),
        };
        let path = options
            .out_dir
            .join(image_file_name(first_number + image_index, seed));
        write_png(&path, &image, Some(&parameters.to_infotext()))?;
        progress.saved(image_index, &path);
        written.push(path);
    }
    Ok(written)
}

/// The model's name and A1111 short hash: a checkpoint file's stem and the first 10 hex digits
/// of its sha256; a folder's name or the hub id, with no hash (A1111 hashes single files only).
fn model_identity(model: &str, source: &ModelSource) -> Result<(String, Option<String>)> {
    Ok(match source.clone() {
        ModelSource::SingleFile { path, .. } => {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.to_string());
            (name, Some(file_sha256(&path)?[..10].to_string()))
        }
        ModelSource::Diffusers { root, .. } => {
            let name = root
                .canonicalize()
                .unwrap_or(root.clone())
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.to_string());
            (name, None)
        }
        ModelSource::Hub { id, .. } => (id, None),
    })
}

/// The sha256 (hex) of a file, read in blocks.
fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = crate::files::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
