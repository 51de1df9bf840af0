//! The generation parameters A1111 (stable-diffusion-webui) writes into every PNG, in a `tEXt`
//! chunk named `parameters`, so that its "PNG Info" tab, ComfyUI, Civitai and the other tools
//! that read that text see how a picture was made:
//!
//! ```text
//! a neon city <lora:cyberpunk_v1:0.8>
//! Negative prompt: blurry
//! Steps: 30, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "cyberpunk_v1: 0123456789ab", Version: lora-trainer 0.1.0
//! ```
//!
//! As in A1111's `create_infotext`: the prompt (with its LoRA tags, which WebUI keeps), the
//! negative prompt line only when there is one, then `key: value` pairs in its field order
//! (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model, Clip skip when > 1,
//! the extra parameters such as Lora hashes, Version), values quoted as JSON strings when they
//! hold `,`, `:` or a newline, numbers as Python prints them (`7.0`, not `7`). Text that is not
//! Latin-1 goes into an `iTXt` chunk instead, as PIL (which A1111 saves with) does.
//!
//! "Schedule type" names the A1111 scheduler closest to our timestep spacing: `leading` with
//! offset 1 is exactly WebUI's `DDIM` schedule for its k-diffusion samplers (and what its DDIM
//! sampler always uses, reported there as `Automatic`); `linspace` ≈ `Uniform`; `trailing` ≈
//! `SGM Uniform`.

use std::path::Path;

use image::RgbImage;

use super::samplers::{SamplerKind, TimestepSpacing};
use crate::{Error, Result};

/// The key of the text chunk.
pub const PARAMETERS_KEY: &str = "parameters";

/// What a picture was made with, as A1111 records it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    /// The prompt as the user wrote it, LoRA tags included.
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// A1111's scheduler label, see [`schedule_type`].
    pub schedule_type: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// The first 10 hex digits of the sha256 of the checkpoint file (A1111's short hash).
    pub model_hash: Option<String>,
    pub model: Option<String>,
    pub clip_skip: usize,
    /// `(name, short hash)` of each LoRA.
    pub lora_hashes: Vec<(String, String)>,
    pub version: String,
}

/// A1111's scheduler label for `sampler` with `spacing` (see the module docs).
pub fn schedule_type(sampler: SamplerKind, spacing: TimestepSpacing) -> &'static str {
    match (sampler, spacing) {
        (SamplerKind::Ddim, TimestepSpacing::Leading) => "Automatic",
        (_, TimestepSpacing::Leading) => "DDIM",
        (_, TimestepSpacing::Linspace) => "Uniform",
        (_, TimestepSpacing::Trailing) => "SGM Uniform",
    }
}

/// This program's `Version` value.
pub fn version() -> String {
    format!("lora-trainer {}", env!("CARGO_PKG_VERSION"))
}

impl GenerationParameters {
    /// The text A1111 stores under `parameters`.
    pub fn to_infotext(&self) -> String {
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.a1111_name().to_string()),
            ("Schedule type", self.schedule_type.clone()),
            ("CFG scale", python_float(self.cfg_scale)),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
        ];
        if let Some(hash) = &self.model_hash {
            fields.push(("Model hash", hash.clone()));
        }
        if let Some(model) = &self.model {
            fields.push(("Model", model.clone()));
        }
        if self.clip_skip > 1 {
            fields.push(("Clip skip", self.clip_skip.to_string()));
        }
        if !self.lora_hashes.is_empty() {
            let list: Vec<String> = self
                .lora_hashes
                .iter()
                .map(|(name, hash)| format!("{}: {hash}", name.replace([':', ','], "")))
                .collect();
            fields.push(("Lora hashes", list.join(", ")));
        }
        fields.push(("Version", self.version.clone()));
        let params: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("{k}: {}", quote(&v)))
            .collect();
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{}", self.prompt, params.join(", "))
            .trim()
            .to_string()
    }
}

/// A1111's `quote`: the value itself, or a JSON string when it holds `,`, `:` or a newline.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// A float as Python's `str` prints it: `7.0`, `7.5`, `0.1`.
fn python_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Infotext read back: the prompt, the negative prompt and the `key: value` pairs in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedInfotext {
    pub prompt: String,
    pub negative_prompt: String,
    pub fields: Vec<(String, String)>,
}

impl ParsedInfotext {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads infotext as A1111's `parse_generation_parameters` does: the last line holds the
/// parameters when it has at least three `key: value` pairs; lines from `Negative prompt:` on are
/// the negative prompt; quoted values are JSON strings.
pub fn parse_infotext(text: &str) -> ParsedInfotext {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let last = lines.pop().unwrap_or("");
    let fields = parse_fields(last);
    if fields.len() < 3 {
        lines.push(last);
    }
    let mut parsed = ParsedInfotext {
        fields: if fields.len() < 3 { Vec::new() } else { fields },
        ..Default::default()
    };
    let mut in_negative = false;
    for line in lines {
        let line = line.trim();
        let line = match line.strip_prefix("Negative prompt:") {
            Some(rest) => {
                in_negative = true;
                rest.trim()
            }
            None => line,
        };
        let target = if in_negative {
            &mut parsed.negative_prompt
        } else {
            &mut parsed.prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    parsed
}

/// `key: value, key: "quoted, value", ...`.
fn parse_fields(line: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else { break };
        let key = rest[..colon].trim();
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | '-' | '/'));
        if !valid_key {
            break;
        }
        let after = rest[colon + 1..].trim_start();
        let (value, remaining) = if after.starts_with('"') {
            match json_string_end(after) {
                Some(end) => {
                    let value: String =
                        serde_json::from_str(&after[..end]).unwrap_or_else(|_| after[..end].into());
                    (value, &after[end..])
                }
                None => break,
            }
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        fields.push((key.to_string(), value));
        rest = remaining.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    fields
}

/// The byte length of the JSON string at the start of `s` (which starts with `"`).
fn json_string_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// A PNG of `image` with `parameters` in a `tEXt` chunk (`iTXt` when not Latin-1).
pub fn encode_png(image: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let fail = |e: png::EncodingError| -> Error {
        candle_core::Error::Msg(format!("cannot encode the PNG: {e}")).into()
    };
    {
        let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            if text.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk(PARAMETERS_KEY.to_string(), text.to_string())
                    .map_err(fail)?;
            } else {
                encoder
                    .add_itxt_chunk(PARAMETERS_KEY.to_string(), text.to_string())
                    .map_err(fail)?;
            }
        }
        let mut writer = encoder.write_header().map_err(fail)?;
        writer.write_image_data(image.as_raw()).map_err(fail)?;
        writer.finish().map_err(fail)?;
    }
    Ok(bytes)
}

/// Writes `image` with `parameters` to `path`.
pub fn write_png(path: &Path, image: &RgbImage, parameters: Option<&str>) -> Result<()> {
    let bytes = encode_png(image, parameters)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The `parameters` text of a PNG (from `tEXt`, `zTXt` or `iTXt`), if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::from(candle_core::Error::Msg(format!("not a readable PNG: {e}"))))?;
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
        .map(|c| c.text.clone());
    if latin1.is_some() {
        return Ok(latin1);
    }
    if let Some(chunk) = info
        .compressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return Ok(chunk.get_text().ok());
    }
    Ok(info
        .utf8_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
        .and_then(|c| c.get_text().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GenerationParameters {
        GenerationParameters {
            prompt: "a neon city <lora:cyberpunk_v1:0.8>".to_string(),
            negative_prompt: "blurry".to_string(),
            steps: 30,
            sampler: SamplerKind::EulerAncestral,
            schedule_type: "Uniform".to_string(),
            cfg_scale: 7.0,
            seed: 42,
            width: 512,
            height: 768,
            model_hash: Some("6ce0161689".to_string()),
            model: Some("v1-5-pruned-emaonly".to_string()),
            clip_skip: 2,
            lora_hashes: vec![
                ("cyberpunk_v1".to_string(), "0123456789ab".to_string()),
                ("a:b,c".to_string(), "ffffffffffff".to_string()),
            ],
            version: "lora-trainer 0.1.0".to_string(),
        }
    }

    #[test]
    fn infotext_is_written_as_a1111_writes_it() {
        assert_eq!(
            sample().to_infotext(),
            "a neon city <lora:cyberpunk_v1:0.8>\nNegative prompt: blurry\nSteps: 30, Sampler: \
             Euler a, Schedule type: Uniform, CFG scale: 7.0, Seed: 42, Size: 512x768, Model \
             hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: \
             \"cyberpunk_v1: 0123456789ab, abc: ffffffffffff\", Version: lora-trainer 0.1.0"
        );
        let mut p = sample();
        p.negative_prompt.clear();
        p.clip_skip = 1;
        p.model_hash = None;
        p.lora_hashes.clear();
        p.cfg_scale = 7.5;
        assert_eq!(
            p.to_infotext(),
            "a neon city <lora:cyberpunk_v1:0.8>\nSteps: 30, Sampler: Euler a, Schedule type: \
             Uniform, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: v1-5-pruned-emaonly, \
             Version: lora-trainer 0.1.0"
        );
    }

    #[test]
    fn infotext_reads_back() {
        let mut p = sample();
        p.prompt = "line one\nline two, with: colons".to_string();
        p.negative_prompt = "bad\nworse".to_string();
        let parsed = parse_infotext(&p.to_infotext());
        assert_eq!(parsed.prompt, p.prompt);
        assert_eq!(parsed.negative_prompt, p.negative_prompt);
        assert_eq!(parsed.get("Sampler"), Some("Euler a"));
        assert_eq!(parsed.get("Size"), Some("512x768"));
        assert_eq!(
            parsed.get("Lora hashes"),
            Some("cyberpunk_v1: 0123456789ab, abc: ffffffffffff")
        );
        assert_eq!(parsed.get("Version"), Some("lora-trainer 0.1.0"));
        assert_eq!(parsed.fields.len(), 11);
    }

    #[test]
    fn png_chunks_hold_the_text_latin1_or_not() -> Result<()> {
        let image = RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        for text in ["plain café text", "城市 neon"] {
            let bytes = encode_png(&image, Some(text))?;
            assert_eq!(read_parameters(&bytes)?.as_deref(), Some(text));
            let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(decoded, image);
        }
        let latin1 = encode_png(&image, Some("abc"))?;
        assert!(latin1.windows(4).any(|w| w == b"tEXt"));
        let utf8 = encode_png(&image, Some("城市"))?;
        assert!(utf8.windows(4).any(|w| w == b"iTXt"));
        assert_eq!(read_parameters(&encode_png(&image, None)?)?, None);
        Ok(())
    }

    #[test]
    fn schedule_labels() {
        assert_eq!(
            schedule_type(SamplerKind::Ddim, TimestepSpacing::Leading),
            "Automatic"
        );
        assert_eq!(
            schedule_type(SamplerKind::DpmPp2m, TimestepSpacing::Leading),
            "DDIM"
        );
        assert_eq!(
            schedule_type(SamplerKind::EulerAncestral, TimestepSpacing::Linspace),
            "Uniform"
        );
    }
}
