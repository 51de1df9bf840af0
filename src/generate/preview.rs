//! Preview pictures during training, as kohya's `sample_prompts` makes them: one prompt per
//! line with per-line options, rendered every `sample_every_n_steps` into
//! `<output_dir>/samples/<output_name>_<step:06>_<index:02>_<seed>.png` and TensorBoard's
//! Images tab (tag `samples/<index:02>`).
//!
//! A prompt line is `prompt --n negative --w 512 --h 512 --d seed --s steps --l cfg --ss sampler`
//! (options in any order, each introduced by ` --`; lines that are empty or start with `#` are
//! skipped). Without `--d`, prompt `i` gets the seed `base seed + i`: the same prompt is drawn
//! from the same noise at every step, so the pictures compare across checkpoints.

use std::path::{Path, PathBuf};

use super::error::GenerateError;
use super::output::preview_path;
use super::pipeline::{ImageRequest, Pipeline};
use super::png_info::{encode_png, schedule_type, version, GenerationParameters};
use super::prompt::parse_prompt;
pub use crate::config::SamplePrompt;
use crate::config::SamplerKind;
use crate::log::EventWriter;
use crate::{Error, Result};

impl SamplePrompt {
    /// Every prompt of a prompt file's text; `origin` (the file) names errors with the line.
    pub fn parse_lines(text: &str, origin: &str) -> Result<Vec<Self>> {
        let mut prompts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let prompt = SamplePrompt::parse_line(line)
                .map_err(|e| GenerateError::new(format!("{origin} line {}", i + 1), e))?;
            prompts.push(prompt);
        }
        Ok(prompts)
    }

    /// The prompts of a `sample_prompts` file (`.txt`, one per line); a file that cannot be
    /// read is the user's to fix (exit status 2), named with the key.
    pub fn read_file(path: &Path) -> Result<Vec<Self>> {
        let text = crate::files::read_text(path, crate::files::TEXT_LIMIT, "a prompt file")
            .map_err(|e| {
                GenerateError::new(
                    format!("sample_prompts `{}`", path.display()),
                    format!("cannot be read: {e}; give a text file with one prompt per line"),
                )
            })?;
        SamplePrompt::parse_lines(&text, &path.display().to_string())
    }

    /// The prompts `sample_prompts` gives: a file's lines or the config's own list.
    pub fn from_config(source: &crate::config::SamplePrompts) -> Result<Vec<Self>> {
        match source {
            crate::config::SamplePrompts::File(path) => SamplePrompt::read_file(path),
            crate::config::SamplePrompts::Lines(lines) => {
                SamplePrompt::parse_lines(&lines.join("\n"), "sample_prompts")
            }
        }
    }
}

/// How and where a run's previews are made.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewSettings {
    /// The run's output folder; pictures go to its `samples/`.
    pub output_dir: PathBuf,
    /// The first part of each file name (the run's `output_name`).
    pub output_name: String,
    /// The sampler of prompts without `--ss` (`sample_sampler`).
    pub sampler: SamplerKind,
    /// Prompt `i` without `--d` is drawn with seed `seed + i`.
    pub seed: u64,
    /// The base model's name for the pictures' generation parameters.
    pub model_name: Option<String>,
}

/// Renders every prompt with the models as they are at optimizer step `step` (put LoRA dropout
/// in evaluation mode first), writes the PNGs (with their generation parameters) and, when a
/// writer is given, logs each one to TensorBoard as `samples/<index:02>`. Returns the files
/// written, in prompt order. Sizes are rounded down to the model's multiple (64 at least), as
/// kohya does.
pub fn render_previews(
    pipeline: &Pipeline<'_>,
    prompts: &[SamplePrompt],
    settings: &PreviewSettings,
    step: u64,
    mut tensorboard: Option<&mut EventWriter>,
) -> Result<Vec<PathBuf>> {
    let dir = settings.output_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let m = pipeline.size_multiple();
    let fit = |side: usize| (side - side % m).max(64.max(m));
    let mut written = Vec::new();
    for (index, sample) in prompts.iter().enumerate() {
        let seed = sample
            .seed
            .unwrap_or_else(|| settings.seed.wrapping_add(index as u64));
        let sampler = sample.sampler.unwrap_or(settings.sampler);
        let request = ImageRequest {
            prompt: parse_prompt(&sample.prompt)?.text,
            negative_prompt: sample.negative_prompt.clone(),
            width: fit(sample.width),
            height: fit(sample.height),
            steps: sample.steps,
            cfg_scale: sample.cfg_scale,
            seed,
            sampler,
        };
        let image = pipeline.generate(&request, &mut |_, _| {})?;
        let parameters = GenerationParameters {
            prompt: sample.prompt.clone(),
            negative_prompt: sample.negative_prompt.clone(),
            steps: request.steps,
            sampler,
            schedule_type: schedule_type(sampler, sampler.spacing(pipeline.schedule)).to_string(),
            cfg_scale: request.cfg_scale,
            seed,
            width: request.width,
            height: request.height,
            model_hash: None,
            model: settings.model_name.clone(),
            clip_skip: pipeline.text_encoders.clip_skip(),
            lora_hashes: Vec::new(),
            version: version(),
        };
        let png = encode_png(&image, Some(&parameters.to_infotext()))?;
        let path = preview_path(&dir, &settings.output_name, step, index, seed);
        std::fs::write(&path, &png).map_err(|e| Error::io(&path, e))?;
        written.push(path);
        if let Some(writer) = tensorboard.as_deref_mut() {
            let tag = format!("samples/{index:02}");
            writer.add_image_png(&tag, &png, image.width(), image.height(), step)?;
        }
    }
    if let Some(writer) = tensorboard {
        writer.flush()?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_lines_with_every_option() {
        let p = SamplePrompt::parse_line(
            "a neon city at night --n blurry, low quality --w 640 --h 384 --d 42 --s 20 --l 6.5 --ss euler_a",
        )
        .unwrap();
        assert_eq!(p.prompt, "a neon city at night");
        assert_eq!(p.negative_prompt, "blurry, low quality");
        assert_eq!(
            (p.width, p.height, p.seed, p.steps),
            (640, 384, Some(42), 20)
        );
        assert_eq!(p.cfg_scale, 6.5);
        assert_eq!(p.sampler, Some(SamplerKind::EulerAncestral));
        let plain = SamplePrompt::parse_line("just a prompt").unwrap();
        assert_eq!(plain, SamplePrompt::new("just a prompt"));
        assert_eq!(SamplePrompt::parse_line("x --s 5000").unwrap().steps, 1000);
        assert_eq!(SamplePrompt::parse_line("x --W 256").unwrap().width, 256);
    }

    #[test]
    fn bad_lines_name_the_line_and_the_option() {
        let text = "# comment\n\na cat --w 512\na dog --w wide\n";
        let err = SamplePrompt::parse_lines(text, "prompts.txt")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("prompts.txt line 4: `--w wide`"), "{err}");
        let err = SamplePrompt::parse_line("x --cn image.png").unwrap_err();
        assert!(err.contains("`--cn`"), "{err}");
        let err = SamplePrompt::parse_line("x --ss lms").unwrap_err();
        assert!(err.contains("`lms`"), "{err}");
        let ok = SamplePrompt::parse_lines("# c\n a --d 1 \n\nb\n", "p").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].seed, Some(1));
    }
}
