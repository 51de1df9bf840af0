//! Turning a decoded picture into the tensor a CLIP or BLIP vision tower takes, as transformers'
//! image processors do: resize (the short side to `size.shortest_edge`, or to exactly
//! `height` × `width`), centre crop, rescale by 1/255, normalise with the model's mean and std.
//!
//! The settings come from the model folder's `preprocessor_config.json` (both the current
//! `{"shortest_edge": 224}` form and the old `"size": 224` integers of the OpenAI repositories);
//! the resize is [`resample::resize_bicubic`](super::resample::resize_bicubic).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;

use super::resample::resize_bicubic;
use crate::error::ModelError;
use crate::{Error, Result};

/// OpenAI CLIP's per-channel mean (transformers' `OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`), digits as transformers
/// writes them.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The target of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The short side becomes this long, the aspect ratio is kept (the long side is truncated).
    ShortestEdge(u32),
    /// Exactly this size, whatever the aspect ratio.
    Exact { width: u32, height: u32 },
}

/// What a `preprocessor_config.json` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// `None` when `do_resize` is false.
    pub resize: Option<ResizeTo>,
    /// `(width, height)` of the centre crop; `None` when `do_center_crop` is false.
    pub crop: Option<(u32, u32)>,
    /// Multiplier of the 8-bit values (1/255); `None` when `do_rescale` is false.
    pub rescale_factor: Option<f64>,
    /// `(mean, std)` per channel; `None` when `do_normalize` is false.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl ImageProcessor {
    /// transformers' `CLIPImageProcessor()` defaults: short side 224, crop 224, CLIP's statistics.
    pub fn clip_default() -> Self {
        ImageProcessor {
            resize: Some(ResizeTo::ShortestEdge(224)),
            crop: Some((224, 224)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// transformers' `BlipImageProcessor()` defaults: 384 × 384, no crop, CLIP's statistics.
    pub fn blip_default() -> Self {
        ImageProcessor {
            resize: Some(ResizeTo::Exact {
                width: 384,
                height: 384,
            }),
            crop: None,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// Reads `preprocessor_config.json`; keys it lacks keep the values of `defaults` (the
    /// processor class's own defaults).
    pub fn from_file(path: &Path, defaults: ImageProcessor) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string(), defaults)
    }

    /// Parses the JSON text of a `preprocessor_config.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str, defaults: ImageProcessor) -> Result<Self> {
        let invalid = |key: &str, message: String| -> Error {
            ModelError::InvalidConfig {
                origin: origin.to_string(),
                message: format!("`{key}`: {message}"),
            }
            .into()
        };
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig {
            origin: origin.to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::InvalidConfig {
                origin: origin.to_string(),
                message: "expected a JSON object".to_string(),
            }
            .into());
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(invalid(
                    key,
                    format!("expected true or false, found {other}"),
                )),
            }
        };
        let mut processor = defaults.clone();

        // transformers' `get_size_dict`: an integer `size` is the shortest edge for CLIP
        // (`default_to_square=False`) and a square for BLIP.
        let square_default = matches!(defaults.resize, Some(ResizeTo::Exact { .. }));
        let default_to_square = match map.get("default_to_square") {
            Some(Value::Bool(b)) => *b,
            _ => square_default,
        };
        if let Some(size) = map.get("size").filter(|v| !v.is_null()) {
            processor.resize =
                Some(parse_size(size, default_to_square).map_err(|m| invalid("size", m))?);
        }
        if !flag("do_resize", defaults.resize.is_some())? {
            processor.resize = None;
        } else if processor.resize.is_none() {
            return Err(invalid(
                "size",
                "do_resize is true but no size is given".to_string(),
            ));
        }
        if let Some(crop) = map.get("crop_size").filter(|v| !v.is_null()) {
            processor.crop = Some(
                match parse_size(crop, true).map_err(|m| invalid("crop_size", m))? {
                    ResizeTo::Exact { width, height } => (width, height),
                    ResizeTo::ShortestEdge(side) => (side, side),
                },
            );
        }
        if !flag("do_center_crop", defaults.crop.is_some())? {
            processor.crop = None;
        } else if processor.crop.is_none() {
            processor.crop = Some((224, 224));
        }
        if let Some(resample) = map.get("resample").filter(|v| !v.is_null()) {
            // PIL's numbering: 3 = BICUBIC, the only filter CLIP and BLIP use.
            if resample.as_u64() != Some(3) {
                return Err(invalid(
                    "resample",
                    format!("{resample} is not supported; only 3 (bicubic) is implemented"),
                ));
            }
        }
        let factor = match map.get("rescale_factor") {
            None | Some(Value::Null) => 1.0 / 255.0,
            Some(v) => v.as_f64().filter(|f| *f > 0.0).ok_or_else(|| {
                invalid(
                    "rescale_factor",
                    format!("expected a positive number, found {v}"),
                )
            })?,
        };
        processor.rescale_factor =
            flag("do_rescale", defaults.rescale_factor.is_some())?.then_some(factor);
        let (mut mean, mut std) = defaults.normalize.unwrap_or((CLIP_MEAN, CLIP_STD));
        if let Some(v) = map.get("image_mean").filter(|v| !v.is_null()) {
            mean = three_numbers(v).map_err(|m| invalid("image_mean", m))?;
        }
        if let Some(v) = map.get("image_std").filter(|v| !v.is_null()) {
            std = three_numbers(v).map_err(|m| invalid("image_std", m))?;
            if std.contains(&0.0) {
                return Err(invalid(
                    "image_std",
                    "a standard deviation of 0".to_string(),
                ));
            }
        }
        processor.normalize =
            flag("do_normalize", defaults.normalize.is_some())?.then_some((mean, std));
        Ok(processor)
    }

    /// The size after the resize step, before cropping: `(width, height)`.
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (width, height),
            Some(ResizeTo::Exact { width, height }) => (width, height),
            Some(ResizeTo::ShortestEdge(short)) => {
                // transformers' `get_resize_output_image_size`: int(short * long / short_side).
                let (s, l) = (width.min(height), width.max(height));
                let long = (f64::from(short) * f64::from(l) / f64::from(s)) as u32;
                if width <= height {
                    (short, long)
                } else {
                    (long, short)
                }
            }
        }
    }

    /// Resize and centre crop, in 8 bits (what transformers feeds the normalisation).
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (w, h) = self.resized_size(image.width(), image.height());
        let resized = if (w, h) == image.dimensions() {
            image.clone()
        } else {
            resize_bicubic(image, w, h)
        };
        match self.crop {
            Some((cw, ch)) => center_crop(&resized, cw, ch),
            None => resized,
        }
    }

    /// The full pipeline: `[3, height, width]` f32 on `device`.
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let cropped = self.resize_and_crop(image);
        let (w, h) = cropped.dimensions();
        let plane = (w * h) as usize;
        let mut values = vec![0f32; 3 * plane];
        // transformers fuses rescale and normalise: (x − mean/factor) / (std/factor) in f32.
        let (scale, mean, std) = match (self.rescale_factor, self.normalize) {
            (Some(f), Some((mean, std))) => {
                let k = (1.0 / f) as f32;
                (1.0f32, mean.map(|m| m * k), std.map(|s| s * k))
            }
            (Some(f), None) => (f as f32, [0.0; 3], [1.0; 3]),
            (None, Some((mean, std))) => (1.0, mean, std),
            (None, None) => (1.0, [0.0; 3], [1.0; 3]),
        };
        for (i, pixel) in cropped.pixels().enumerate() {
            for c in 0..3 {
                values[c * plane + i] = (f32::from(pixel[c]) * scale - mean[c]) / std[c];
            }
        }
        Ok(Tensor::from_vec(
            values,
            (3, h as usize, w as usize),
            device,
        )?)
    }
}

/// transformers' `center_crop`: top-left at `int((size − crop) / 2)`, zero padding (black)
/// when the picture is smaller than the crop.
pub fn center_crop(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image.clone();
    }
    // After padding to at least the crop size (left/top get the smaller half).
    let pad_left = width.saturating_sub(w) / 2;
    let pad_top = height.saturating_sub(h) / 2;
    let padded_w = w.max(width);
    let padded_h = h.max(height);
    let left = (padded_w - width) / 2;
    let top = (padded_h - height) / 2;
    let mut out = RgbImage::new(width, height);
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        // Position in the padded picture, then in the original.
        let (px, py) = (x + left, y + top);
        if px >= pad_left && py >= pad_top && px - pad_left < w && py - pad_top < h {
            *pixel = *image.get_pixel(px - pad_left, py - pad_top);
        }
    }
    out
}

fn parse_size(value: &Value, default_to_square: bool) -> std::result::Result<ResizeTo, String> {
    let side = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
    };
    match value {
        Value::Number(_) => {
            let n = side(value).ok_or_else(|| format!("{value} is not a positive size"))?;
            Ok(if default_to_square {
                ResizeTo::Exact {
                    width: n,
                    height: n,
                }
            } else {
                ResizeTo::ShortestEdge(n)
            })
        }
        Value::Object(map) => {
            if let Some(short) = map.get("shortest_edge") {
                if map.get("longest_edge").is_some_and(|v| !v.is_null()) {
                    return Err("`longest_edge` is not supported".to_string());
                }
                side(short)
                    .map(ResizeTo::ShortestEdge)
                    .ok_or_else(|| format!("shortest_edge {short} is not a positive size"))
            } else {
                match (
                    map.get("width").and_then(side),
                    map.get("height").and_then(side),
                ) {
                    (Some(width), Some(height)) => Ok(ResizeTo::Exact { width, height }),
                    _ => Err(format!(
                        "{value} needs `shortest_edge`, or `height` and `width`"
                    )),
                }
            }
        }
        other => Err(format!("{other} is not a size")),
    }
}

fn three_numbers(value: &Value) -> std::result::Result<[f32; 3], String> {
    let numbers: Option<Vec<f32>> = match value {
        Value::Array(items) => items.iter().map(|v| v.as_f64().map(|f| f as f32)).collect(),
        Value::Number(n) => n.as_f64().map(|f| vec![f as f32; 3]),
        _ => None,
    };
    match numbers.as_deref() {
        Some([a, b, c]) => Ok([*a, *b, *c]),
        _ => Err(format!(
            "{value} is not three numbers (one per RGB channel)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_old_and_new_config_forms() -> Result<()> {
        // openai/clip-vit-large-patch14's file (transformers 4.x feature extractor).
        let old = ImageProcessor::from_json(
            r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
            "p.json",
            ImageProcessor::clip_default(),
        )?;
        assert_eq!(old, ImageProcessor::clip_default());
        let new = ImageProcessor::from_json(
            r#"{"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 30}, "do_normalize": false}"#,
            "p.json",
            ImageProcessor::clip_default(),
        )?;
        assert_eq!(new.resize, Some(ResizeTo::ShortestEdge(32)));
        assert_eq!(new.crop, Some((30, 32)));
        assert_eq!(new.normalize, None);
        let blip = ImageProcessor::from_json(
            r#"{"size": 384}"#,
            "p.json",
            ImageProcessor::blip_default(),
        )?;
        assert_eq!(blip, ImageProcessor::blip_default());
        Ok(())
    }

    #[test]
    fn bad_settings_are_named() {
        for (json, needle) in [
            (r#"{"resample": 2}"#, "`resample`"),
            (r#"{"size": {"shortest_edge": 0}}"#, "`size`"),
            (
                r#"{"size": {"shortest_edge": 224, "longest_edge": 300}}"#,
                "longest_edge",
            ),
            (r#"{"image_mean": [0.5, 0.5]}"#, "`image_mean`"),
            (r#"{"image_std": [0.5, 0, 0.5]}"#, "`image_std`"),
            (r#"{"do_resize": "yes"}"#, "`do_resize`"),
            (r#"[1]"#, "JSON object"),
        ] {
            let err = ImageProcessor::from_json(json, "pre.json", ImageProcessor::clip_default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("pre.json") && err.contains(needle),
                "{json}: {err}"
            );
        }
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_and_truncates() {
        let p = ImageProcessor::clip_default();
        assert_eq!(p.resized_size(300, 200), (336, 224));
        assert_eq!(p.resized_size(150, 260), (224, 388));
        assert_eq!(p.resized_size(333, 250), (298, 224));
        assert_eq!(p.resized_size(224, 224), (224, 224));
        assert_eq!(p.resized_size(1000, 3), (74666, 224));
    }

    #[test]
    fn center_crop_offsets_round_down_and_pad_with_black() {
        let mut img = RgbImage::new(5, 4);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8, y as u8, 1]);
        }
        let c = center_crop(&img, 2, 3);
        // left = int((5 − 2) / 2) = 1, top = int((4 − 3) / 2) = 0
        assert_eq!(c.get_pixel(0, 0).0, [1, 0, 1]);
        assert_eq!(c.get_pixel(1, 2).0, [2, 2, 1]);
        let padded = center_crop(&img, 8, 4);
        // padding (8 − 5) / 2 = 1 on the left
        assert_eq!(padded.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(1, 3).0, [0, 3, 1]);
        assert_eq!(padded.get_pixel(7, 0).0, [0, 0, 0]);
    }

    #[test]
    fn normalisation_uses_the_mean_and_std_per_channel() -> Result<()> {
        let img = RgbImage::from_pixel(224, 224, image::Rgb([255, 0, 128]));
        let t = ImageProcessor::clip_default().pixel_values(&img, &Device::Cpu)?;
        assert_eq!(t.dims(), &[3, 224, 224]);
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let plane = 224 * 224;
        let expect = |c: usize, x: f32| (x / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        assert!((v[0] - expect(0, 255.0)).abs() < 1e-5);
        assert!((v[plane + 5] - expect(1, 0.0)).abs() < 1e-5);
        assert!((v[2 * plane + 7] - expect(2, 128.0)).abs() < 1e-5);
        Ok(())
    }
}
