//! Which LoRA files a generation uses and at what weights: `--lora FILE[:WEIGHT]` arguments and
//! `<lora:name:weight>` prompt tags, the latter found by name in `--lora-dir` as WebUI finds
//! them (the file name without `.safetensors`, in the folder or any subfolder; else a file whose
//! `ss_output_name` metadata is that name).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::GenerateError;
use super::prompt::LoraTag;
use crate::lora::hash::model_hash;
use crate::lora::LoraFile;
use crate::{Error, Result};

/// One LoRA to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraUse {
    pub path: PathBuf,
    /// The name the generation parameters give it (the tag's name, or the file's stem).
    pub name: String,
    pub text_encoder_weight: f64,
    pub unet_weight: f64,
}

impl LoraUse {
    /// `FILE` or `FILE:WEIGHT` from the command line (weight 1 when absent). A suffix that is
    /// not a number stays part of the path (`C:\loras\x.safetensors`).
    pub fn from_arg(arg: &str) -> Result<LoraUse> {
        let (path, weight) = match arg.rsplit_once(':') {
            Some((path, w)) if !path.is_empty() => match w.trim().parse::<f64>() {
                Ok(weight) if weight.is_finite() => (path, weight),
                Ok(_) => {
                    return Err(GenerateError::new(
                        format!("--lora {arg}"),
                        format!("the weight `{w}` is not a finite number; write FILE:0.8"),
                    )
                    .into())
                }
                Err(_) => (arg, 1.0),
            },
            _ => (arg, 1.0),
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(GenerateError::new(
                format!("--lora {arg}"),
                format!(
                    "{} does not exist; give a LoRA .safetensors file, optionally with :WEIGHT",
                    path.display()
                ),
            )
            .into());
        }
        Ok(LoraUse {
            name: file_stem(&path),
            path,
            text_encoder_weight: weight,
            unet_weight: weight,
        })
    }

    /// The LoRA a prompt tag names, found in `dir`.
    pub fn from_tag(tag: &LoraTag, dir: Option<&Path>) -> Result<LoraUse> {
        let Some(dir) = dir else {
            return Err(GenerateError::new(
                &tag.text,
                "the prompt names a LoRA but no --lora-dir was given to find it in",
            )
            .into());
        };
        Ok(LoraUse {
            path: find_lora(dir, &tag.name, &tag.text)?,
            name: tag.name.clone(),
            text_encoder_weight: tag.text_encoder_weight,
            unet_weight: tag.unet_weight,
        })
    }

    /// The tag that applies this LoRA in WebUI (`<lora:name:0.8>`, or with both weights when
    /// they differ).
    pub fn webui_tag(&self) -> String {
        let w = |x: f64| format_weight(x);
        if self.text_encoder_weight == self.unet_weight {
            format!("<lora:{}:{}>", self.name, w(self.unet_weight))
        } else {
            format!(
                "<lora:{}:{}:{}>",
                self.name,
                w(self.text_encoder_weight),
                w(self.unet_weight)
            )
        }
    }
}

/// A LoRA file read for generation, with WebUI's short hash.
#[derive(Debug, Clone)]
pub struct LoadedLora {
    pub usage: LoraUse,
    pub file: LoraFile,
    /// WebUI's `shorthash`: the first 12 hex digits of `sshs_model_hash`, or of the sha256 of the
    /// bytes after the header when the file has none.
    pub short_hash: String,
}

impl LoadedLora {
    pub fn read(usage: &LoraUse) -> Result<LoadedLora> {
        let bytes = crate::files::read(&usage.path).map_err(|e| Error::io(&usage.path, e))?;
        let file = LoraFile::from_bytes(&usage.path, &bytes)?;
        let hash = file
            .metadata
            .get("sshs_model_hash")
            .filter(|h| !h.is_empty())
            .cloned()
            .unwrap_or_else(|| model_hash(&bytes));
        Ok(LoadedLora {
            usage: usage.clone(),
            file,
            short_hash: hash.chars().take(12).collect(),
        })
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `0.8` → `0.8`, `1.0` → `1`.
fn format_weight(x: f64) -> String {
    format!("{x}")
}

/// The `.safetensors` file called `name` in `dir` (or a subfolder, or by `ss_output_name`).
fn find_lora(dir: &Path, name: &str, tag: &str) -> Result<PathBuf> {
    let direct = dir.join(format!("{name}.safetensors"));
    if direct.is_file() {
        return Ok(direct);
    }
    if !dir.is_dir() {
        return Err(
            GenerateError::new("--lora-dir", format!("{} is not a folder", dir.display())).into(),
        );
    }
    let mut files = Vec::new();
    collect_safetensors(dir, &mut files)?;
    files.sort();
    let by_stem: Vec<&PathBuf> = files.iter().filter(|p| file_stem(p) == name).collect();
    let by_stem = if by_stem.is_empty() {
        files
            .iter()
            .filter(|p| file_stem(p).eq_ignore_ascii_case(name))
            .collect()
    } else {
        by_stem
    };
    let found = if by_stem.is_empty() {
        files
            .iter()
            .filter(|p| output_name(p).as_deref() == Some(name))
            .collect()
    } else {
        by_stem
    };
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let names: BTreeMap<String, ()> = files.iter().map(|p| (file_stem(p), ())).collect();
            let mut hint = match names
                .keys()
                .map(|n| (strsim::jaro_winkler(n, name), n))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
            {
                Some((_, close)) => format!("; did you mean `{close}`?"),
                None => String::new(),
            };
            if names.is_empty() {
                hint.push_str(" (the folder holds no .safetensors files)");
            } else {
                let list: Vec<&String> = names.keys().take(20).collect();
                hint.push_str(&format!(
                    " LoRAs there: {}{}",
                    list.iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if names.len() > 20 { ", ..." } else { "" }
                ));
            }
            Err(GenerateError::new(
                tag,
                format!(
                    "no LoRA named `{name}` in {} (looked for {name}.safetensors, also in \
                     subfolders){hint}",
                    dir.display()
                ),
            )
            .into())
        }
        many => Err(GenerateError::new(
            tag,
            format!(
                "{} files in {} are called `{name}`: {}; rename one, or use --lora FILE:WEIGHT",
                many.len(),
                dir.display(),
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .into()),
    }
}

fn collect_safetensors(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect_safetensors(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The `ss_output_name` in a safetensors header, read without reading the tensors.
fn output_name(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = crate::files::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&header).ok()?;
    json.get("__metadata__")?
        .get("ss_output_name")?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::prompt::parse_prompt;

    fn touch(path: &Path, metadata: Option<(&str, &str)>) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let t = candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let meta = metadata
            .map(|(k, v)| std::collections::HashMap::from([(k.to_string(), v.to_string())]));
        let bytes = safetensors::serialize([("a", &t)], meta).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn tags_find_files_by_name_in_subfolders_and_by_output_name() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("style.safetensors"), None);
        touch(&dir.path().join("chars/hero.safetensors"), None);
        touch(
            &dir.path().join("renamed.safetensors"),
            Some(("ss_output_name", "cyberpunk_v1")),
        );
        let tags = parse_prompt("<lora:style:0.5> <lora:hero> <lora:cyberpunk_v1:2>")?.loras;
        let found: Vec<LoraUse> = tags
            .iter()
            .map(|t| LoraUse::from_tag(t, Some(dir.path())))
            .collect::<Result<_>>()?;
        assert_eq!(found[0].path, dir.path().join("style.safetensors"));
        assert_eq!(found[1].path, dir.path().join("chars/hero.safetensors"));
        assert_eq!(found[2].path, dir.path().join("renamed.safetensors"));
        assert_eq!(
            (found[0].unet_weight, found[2].name.as_str()),
            (0.5, "cyberpunk_v1")
        );
        Ok(())
    }

    #[test]
    fn missing_names_say_what_is_there() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("cyberpunk.safetensors"), None);
        let tag = &parse_prompt("<lora:cyberpunc:1>")?.loras[0];
        let err = LoraUse::from_tag(tag, Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("<lora:cyberpunc:1>: no LoRA named `cyberpunc`")
                && err.contains("did you mean `cyberpunk`?"),
            "{err}"
        );
        let err = LoraUse::from_tag(tag, None).unwrap_err().to_string();
        assert!(err.contains("no --lora-dir"), "{err}");
        Ok(())
    }

    #[test]
    fn lora_arguments_with_and_without_weights() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.safetensors");
        touch(&file, None);
        let arg = format!("{}:0.75", file.display());
        let u = LoraUse::from_arg(&arg)?;
        assert_eq!(
            (u.path.clone(), u.unet_weight, u.name.as_str()),
            (file.clone(), 0.75, "a")
        );
        assert_eq!(u.webui_tag(), "<lora:a:0.75>");
        let u = LoraUse::from_arg(&file.display().to_string())?;
        assert_eq!(
            (u.unet_weight, u.webui_tag()),
            (1.0, "<lora:a:1>".to_string())
        );
        let err = LoraUse::from_arg("missing.safetensors:0.5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.safetensors does not exist"), "{err}");
        Ok(())
    }
}
