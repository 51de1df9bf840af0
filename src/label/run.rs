//! One `auto_label` run: list the pictures, keep the rows that exist, caption the rest in
//! batches, merge and write the CSV, count what happened.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::blip::BlipCaptioner;
use super::compose::{best, compose, ComposeRules, RankedList};
use super::embed_cache::{CacheOutcome, EmbeddingCache};
use super::metadata_csv::{merged_text, verify, Captions, ExistingMetadata};
use super::model_files::{resolve_model_folder, ModelRole};
use super::scorer::ClipScorer;
use super::vocab::Vocabulary;
use crate::dataset::{decode_oriented, to_rgb_on_white, DatasetError, ImageFolder};
use crate::files::write_atomically;
use crate::Result;

/// One decoded picture ready for the models (CLIP's pixels, BLIP's if used), or why not.
type Prepared = std::result::Result<(Tensor, Option<Tensor>), String>;

/// Who writes the leading part of each caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captioner {
    /// The best phrase of the subjects list.
    Clip,
    /// A BLIP sentence (the subjects list is then not used).
    Blip,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct LabelOptions {
    /// The image folder.
    pub input: PathBuf,
    /// The CSV to write (default `input/metadata.csv`).
    pub output: PathBuf,
    /// CLIP: a folder or a hub id.
    pub model: String,
    /// BLIP (with `--captioner blip`): a folder or a hub id.
    pub blip_model: String,
    /// Phrase lists; `None` uses the built-in ones.
    pub vocab: Option<PathBuf>,
    /// Put first in every new caption (a trigger word).
    pub prefix: Option<String>,
    pub rules: ComposeRules,
    pub captioner: Captioner,
    /// Caption every picture again, replacing existing captions.
    pub overwrite: bool,
    /// Include pictures in subfolders.
    pub recursive: bool,
    /// Pictures per forward pass.
    pub batch_size: usize,
    pub device: Device,
    /// Where vocabulary embeddings are cached.
    pub cache: EmbeddingCache,
    /// The Hugging Face cache hub ids are read from (and downloaded into).
    pub hub_cache: crate::models::hub::HubCache,
}

/// What the run reports while it works.
pub trait Progress {
    /// A line of information (model loaded, cache used...).
    fn note(&self, text: &str);
    /// Captioning starts: `total` pictures.
    fn start(&self, total: usize);
    /// `n` more pictures are done.
    fn advance(&self, n: usize);
    /// Captioning is over.
    fn finish(&self);
}

/// Progress that reports nothing (tests, library use).
pub struct Silent;

impl Progress for Silent {
    fn note(&self, _: &str) {}
    fn start(&self, _: usize) {}
    fn advance(&self, _: usize) {}
    fn finish(&self) {}
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSummary {
    /// The CSV (written only when something changed).
    pub output: PathBuf,
    pub written: bool,
    /// Rows added for pictures that had none.
    pub new: usize,
    /// Existing rows left as they were.
    pub kept: usize,
    /// Existing rows whose caption was replaced (`--overwrite`).
    pub replaced: usize,
    /// Pictures that could not be read: (name, reason).
    pub failed: Vec<(String, String)>,
    /// Things to fix by hand (empty captions kept, rows naming missing pictures).
    pub warnings: Vec<String>,
    /// Pictures captioned (or failed) and the time that took, model loading excluded.
    pub processed: usize,
    pub elapsed: Duration,
}

impl LabelSummary {
    /// Pictures captioned per second over the captioning phase.
    pub fn images_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        let captioned = self.processed.saturating_sub(self.failed.len());
        if secs > 0.0 {
            captioned as f64 / secs
        } else {
            0.0
        }
    }
}

/// Runs `auto_label`. Unreadable pictures do not stop the run; they are listed in
/// [`LabelSummary::failed`] (the binary then exits with status 1).
pub fn run(options: &LabelOptions, progress: &dyn Progress) -> Result<LabelSummary> {
    if options.batch_size == 0 {
        return Err(DatasetError::Invalid("--batch-size must be at least 1".to_string()).into());
    }
    let folder = ImageFolder::scan(&options.input).map_err(|e| match e {
        DatasetError::Invalid(message) => DatasetError::Invalid(message.replace(
            "set `train_data_dir` to the folder holding the training images",
            "--input must be a folder of images",
        )),
        other => other,
    })?;
    let images: Vec<String> = folder
        .images()
        .iter()
        .filter(|name| options.recursive || !name.contains('/'))
        .cloned()
        .collect();
    if images.is_empty() {
        let hint = if !options.recursive && !folder.images().is_empty() {
            format!(
                " at its top level ({} in subfolders: add --recursive)",
                folder.images().len()
            )
        } else {
            String::new()
        };
        return Err(DatasetError::Invalid(format!(
            "`{}` contains no images{hint} (.png, .jpg, .jpeg, .webp, .bmp)",
            options.input.display()
        ))
        .into());
    }
    let existing = ExistingMetadata::read(&options.output)?;
    let image_set: HashSet<String> = images.iter().cloned().collect();
    let warnings = existing
        .as_ref()
        .map(|e| e.warnings(&image_set))
        .unwrap_or_default();
    let todo: Vec<String> = images
        .iter()
        .filter(|name| options.overwrite || !existing.as_ref().is_some_and(|e| e.contains(name)))
        .cloned()
        .collect();
    let mut summary = LabelSummary {
        output: options.output.clone(),
        written: false,
        new: 0,
        kept: existing.as_ref().map_or(0, ExistingMetadata::row_count),
        replaced: 0,
        failed: Vec::new(),
        warnings,
        processed: 0,
        elapsed: Duration::ZERO,
    };
    if todo.is_empty() {
        progress.note(
            "every image already has a caption; nothing to do (--overwrite captions them again)",
        );
        return Ok(summary);
    }

    let vocabulary = match &options.vocab {
        Some(dir) => Vocabulary::from_dir(dir)?,
        None => Vocabulary::built_in()?,
    };
    let clip_folder = resolve_model_folder(&options.model, &options.hub_cache, ModelRole::Clip)?;
    let scorer = ClipScorer::from_folder(&clip_folder, &options.device)?;
    progress.note(&format!("CLIP model: {}", clip_folder.display()));
    let mut blip = match options.captioner {
        Captioner::Clip => None,
        Captioner::Blip => {
            let folder =
                resolve_model_folder(&options.blip_model, &options.hub_cache, ModelRole::Blip)?;
            let captioner = BlipCaptioner::from_folder(&folder, &options.device)?;
            progress.note(&format!("BLIP model: {}", folder.display()));
            Some(captioner)
        }
    };
    let phrases = vocabulary.all_phrases();
    let (phrase_embeds, outcome) =
        options
            .cache
            .get_or_compute(scorer.fingerprint(), &phrases, &options.device, || {
                progress.note(&format!(
                    "embedding {} vocabulary phrases (cached for next time)",
                    phrases.len()
                ));
                scorer.text_embeds(&phrases)
            })?;
    match outcome {
        CacheOutcome::Hit(path) => progress.note(&format!(
            "vocabulary embeddings from the cache {}",
            path.display()
        )),
        CacheOutcome::Stored(_) => {}
        CacheOutcome::Unavailable(reason) if reason != "disabled" => {
            progress.note(&format!("warning: {reason}"))
        }
        CacheOutcome::Unavailable(_) => {}
    }
    // [D, phrases] so that image_embeds [B, D] × it = cosines [B, phrases].
    let phrase_embeds_t = phrase_embeds.t()?.contiguous()?;

    let started = Instant::now();
    progress.start(todo.len());
    let mut captions = Captions::new();
    for chunk in todo.chunks(options.batch_size) {
        // Decode and preprocess in parallel; failures are collected, not fatal.
        let prepared: Vec<(String, Prepared)> = chunk
            .par_iter()
            .map(|name| {
                let result = decode_oriented(&folder.path_of(name))
                    .map(to_rgb_on_white)
                    .and_then(|rgb| {
                        let clip = scorer.pixel_values(&rgb).map_err(|e| e.to_string())?;
                        let blip_pixels = match &blip {
                            Some(b) => Some(b.pixel_values(&rgb).map_err(|e| e.to_string())?),
                            None => None,
                        };
                        Ok((clip, blip_pixels))
                    });
                (name.clone(), result)
            })
            .collect();
        let mut names = Vec::new();
        let mut clip_pixels = Vec::new();
        let mut blip_pixels = Vec::new();
        for (name, result) in prepared {
            match result {
                Ok((clip, blip_px)) => {
                    names.push(name);
                    clip_pixels.push(clip);
                    blip_pixels.extend(blip_px);
                }
                Err(reason) => summary.failed.push((name, reason)),
            }
        }
        if !names.is_empty() {
            let image_embeds = scorer.image_embeds(&Tensor::stack(&clip_pixels, 0)?)?;
            let scores = image_embeds
                .matmul(&phrase_embeds_t.to_device(image_embeds.device())?)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?;
            let leads: Vec<Option<String>> = match blip.as_mut() {
                Some(b) => b
                    .captions(&Tensor::stack(&blip_pixels, 0)?)?
                    .into_iter()
                    .map(Some)
                    .collect(),
                None => vec![None; names.len()],
            };
            for ((name, row), lead) in names.into_iter().zip(&scores).zip(leads) {
                let caption = caption_for(&vocabulary, row, lead, options, &scorer)?;
                captions.insert(name, caption);
            }
        }
        summary.processed += chunk.len();
        progress.advance(chunk.len());
    }
    progress.finish();
    summary.elapsed = started.elapsed();

    if !captions.is_empty() {
        let (text, counts) = merged_text(existing.as_ref(), &captions, options.overwrite)?;
        verify(&text, existing.as_ref(), &captions, options.overwrite)?;
        write_atomically(&options.output, &text)?;
        summary.written = true;
        summary.new = counts.added;
        summary.kept = counts.kept;
        summary.replaced = counts.replaced;
    }
    Ok(summary)
}

/// The caption of one picture from its scores against every phrase (vocabulary order).
fn caption_for(
    vocabulary: &Vocabulary,
    scores: &[f32],
    blip_sentence: Option<String>,
    options: &LabelOptions,
    scorer: &ClipScorer,
) -> Result<String> {
    let n_subjects = vocabulary.subjects.phrases.len();
    let lead = match blip_sentence {
        Some(sentence) => sentence,
        None => best(&scores[..n_subjects])
            .map(|i| vocabulary.subjects.phrases[i].clone())
            .unwrap_or_default(),
    };
    let mut offset = n_subjects;
    let ranked: Vec<RankedList> = vocabulary
        .flavours
        .iter()
        .map(|list| {
            let n = list.phrases.len();
            let r = RankedList {
                phrases: &list.phrases,
                scores: &scores[offset..offset + n],
            };
            offset += n;
            r
        })
        .collect();
    compose(
        options.prefix.as_deref(),
        &lead,
        &ranked,
        &options.rules,
        &|text| scorer.fits(text),
    )
}

/// The default output: `metadata.csv` inside the input folder.
pub fn default_output(input: &Path) -> PathBuf {
    input.join("metadata.csv")
}
