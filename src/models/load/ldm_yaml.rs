//! The LDM inference yaml A1111 reads beside a checkpoint (`<stem>.yaml`, in the layout of
//! stable-diffusion's `v1-inference.yaml` / `v2-inference-v.yaml`), turned into diffusers
//! configs with the semantics of the LDM code that reads it:
//!
//! - `unet_config.params`: `model_channels` × `channel_mult` = block widths; a level has
//!   attention when its downsampling factor (1, 2, 4, ...) is in `attention_resolutions`; heads
//!   are `channels / num_head_channels` when that is set, else `num_heads`;
//!   `use_linear_in_transformer` = linear projections; `context_dim` = cross-attention width.
//! - `first_stage_config.params.ddconfig`: `ch` × `ch_mult`, `num_res_blocks`, `z_channels`;
//!   `model.params.scale_factor` = the VAE's scaling factor.
//! - `parameterization: v` = v-prediction; `linear_start`/`linear_end`/`timesteps` = the DDPM
//!   schedule (LDM's "linear" is diffusers' `scaled_linear`).
//! - `cond_stage_config.target`: `FrozenCLIPEmbedder` (SD 1.x) or `FrozenOpenCLIPEmbedder`
//!   (SD 2.x) with its `layer` (`penultimate` drops the last block; the class default is `last`).

use std::path::Path;

use serde_json::{json, Value as Json};
use serde_yaml::Value;

use crate::error::ModelError;
use crate::models::family::ModelFamily;
use crate::models::noise::SchedulerConfig;
use crate::{Error, Result};

/// The VAE's latent scaling factor of every SD 1.x/2.x model, when a yaml does not say
/// (diffusers' default for single files too).
pub(crate) const SD_SCALE_FACTOR: f64 = 0.18215;

/// The text encoder the yaml names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct YamlText {
    pub family: ModelFamily,
    /// Condition on the penultimate layer (drop the last block).
    pub penultimate: bool,
}

/// What an LDM yaml says, as diffusers configs.
#[derive(Debug, Clone)]
pub(crate) struct LdmYaml {
    /// The file name, for notes and messages.
    pub name: String,
    pub unet: Json,
    pub vae: Json,
    pub text: YamlText,
    /// The DDPM schedule and prediction type (`parameterization`, LDM's default `eps`).
    pub scheduler: SchedulerConfig,
}

/// Reads `key.path` of a yaml mapping.
fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

struct Reader<'a> {
    origin: &'a str,
}

impl Reader<'_> {
    fn error(&self, path: &str, message: impl std::fmt::Display) -> Error {
        ModelError::InvalidConfig {
            origin: self.origin.to_string(),
            message: format!("`{path}`: {message}"),
        }
        .into()
    }

    fn section<'v>(&self, root: &'v Value, path: &str) -> Result<&'v Value> {
        at(root, path).ok_or_else(|| {
            self.error(
                path,
                "is missing; this is not an LDM inference config of a Stable Diffusion model",
            )
        })
    }

    fn usize(
        &self,
        section: &Value,
        base: &str,
        key: &str,
        default: Option<usize>,
    ) -> Result<usize> {
        match section.get(key) {
            None | Some(Value::Null) => {
                default.ok_or_else(|| self.error(&format!("{base}.{key}"), "is missing"))
            }
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.error(
                    &format!("{base}.{key}"),
                    format!("expected a non-negative integer, found {v:?}"),
                )
            }),
        }
    }

    fn i64(&self, section: &Value, base: &str, key: &str, default: i64) -> Result<i64> {
        match section.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| {
                self.error(
                    &format!("{base}.{key}"),
                    format!("expected an integer, found {v:?}"),
                )
            }),
        }
    }

    fn f64(&self, section: &Value, base: &str, key: &str, default: f64) -> Result<f64> {
        match section.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                self.error(
                    &format!("{base}.{key}"),
                    format!("expected a number, found {v:?}"),
                )
            }),
        }
    }

    fn bool(&self, section: &Value, base: &str, key: &str, default: bool) -> Result<bool> {
        match section.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                self.error(
                    &format!("{base}.{key}"),
                    format!("expected true or false, found {v:?}"),
                )
            }),
        }
    }

    fn usizes(&self, section: &Value, base: &str, key: &str) -> Result<Vec<usize>> {
        match section.get(key) {
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        self.error(
                            &format!("{base}.{key}"),
                            format!("{v:?} is not a non-negative integer"),
                        )
                    })
                })
                .collect(),
            Some(v) => Err(self.error(
                &format!("{base}.{key}"),
                format!("expected a list of integers, found {v:?}"),
            )),
            None => Err(self.error(&format!("{base}.{key}"), "is missing")),
        }
    }

    /// An integer for every level, or a list of one per level.
    fn per_level(
        &self,
        section: &Value,
        base: &str,
        key: &str,
        levels: usize,
        default: usize,
    ) -> Result<Vec<usize>> {
        match section.get(key) {
            Some(Value::Sequence(_)) => {
                let values = self.usizes(section, base, key)?;
                if values.len() != levels {
                    return Err(self.error(
                        &format!("{base}.{key}"),
                        format!("has {} entries for {levels} levels", values.len()),
                    ));
                }
                Ok(values)
            }
            _ => Ok(vec![self.usize(section, base, key, Some(default))?; levels]),
        }
    }
}

impl LdmYaml {
    /// Reads the yaml at `path`.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let origin = path.display().to_string();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| origin.clone());
        Self::parse(&text, &origin, name)
    }

    fn parse(text: &str, origin: &str, name: String) -> Result<Self> {
        let r = Reader { origin };
        let root: Value = serde_yaml::from_str(text).map_err(|e| ModelError::InvalidConfig {
            origin: origin.to_string(),
            message: format!("not valid YAML: {e}"),
        })?;
        let model = r.section(&root, "model.params")?;
        let text_config = Self::text(&r, model)?;
        let unet = Self::unet(
            &r,
            r.section(model, "unet_config.params")?,
            text_config.family,
        )?;
        let scale = r.f64(model, "model.params", "scale_factor", SD_SCALE_FACTOR)?;
        let vae = Self::vae(&r, r.section(model, "first_stage_config.params")?, scale)?;

        let parameterization = model.get("parameterization").and_then(Value::as_str);
        let prediction_type = match parameterization {
            None | Some("eps") => "epsilon",
            Some("v") => "v_prediction",
            Some(other) => {
                return Err(r.error(
                    "model.params.parameterization",
                    format!("\"{other}\" is not supported for training (only eps and v)"),
                ))
            }
        };
        let schedule = model
            .get("beta_schedule")
            .and_then(Value::as_str)
            .unwrap_or("linear");
        if schedule != "linear" {
            return Err(r.error(
                "model.params.beta_schedule",
                format!("\"{schedule}\" is not supported (only LDM's \"linear\", diffusers' scaled_linear)"),
            ));
        }
        let scheduler = SchedulerConfig {
            class_name: None,
            num_train_timesteps: r.usize(model, "model.params", "timesteps", Some(1000))?,
            beta_start: r.f64(model, "model.params", "linear_start", 0.00085)?,
            beta_end: r.f64(model, "model.params", "linear_end", 0.012)?,
            beta_schedule: "scaled_linear".to_string(),
            trained_betas: None,
            prediction_type: prediction_type.to_string(),
            rescale_betas_zero_snr: false,
        };
        Ok(LdmYaml {
            name,
            unet,
            vae,
            text: text_config,
            scheduler,
        })
    }

    fn text(r: &Reader, model: &Value) -> Result<YamlText> {
        let target = at(model, "cond_stage_config.target")
            .and_then(Value::as_str)
            .ok_or_else(|| r.error("model.params.cond_stage_config.target", "is missing"))?;
        let class = target.rsplit('.').next().unwrap_or(target);
        match class {
            "FrozenCLIPEmbedder" => Ok(YamlText {
                family: ModelFamily::Sd1,
                penultimate: false,
            }),
            "FrozenOpenCLIPEmbedder" => {
                let layer = at(model, "cond_stage_config.params.layer")
                    .and_then(Value::as_str)
                    .unwrap_or("last");
                let penultimate = match layer {
                    "penultimate" => true,
                    "last" => false,
                    other => {
                        return Err(r.error(
                            "model.params.cond_stage_config.params.layer",
                            format!("\"{other}\" is not a text-encoder layer (penultimate or last)"),
                        ))
                    }
                };
                Ok(YamlText {
                    family: ModelFamily::Sd2,
                    penultimate,
                })
            }
            _ => Err(ModelError::Unsupported {
                origin: r.origin.to_string(),
                message: format!(
                    "the text encoder `{target}` is not Stable Diffusion 1.x's FrozenCLIPEmbedder \
                     nor 2.x's FrozenOpenCLIPEmbedder (SDXL, unCLIP and depth models are not supported)"
                ),
            }
            .into()),
        }
    }

    fn unet(r: &Reader, p: &Value, family: ModelFamily) -> Result<Json> {
        let base = "model.params.unet_config.params";
        for refused in ["num_classes", "adm_in_channels"] {
            if p.get(refused).is_some_and(|v| !v.is_null()) {
                return Err(ModelError::Unsupported {
                    origin: r.origin.to_string(),
                    message: format!(
                        "`{base}.{refused}` conditions the UNet on classes or image sizes (SDXL, \
                         unCLIP); this trainer supports Stable Diffusion 1.x and 2.x"
                    ),
                }
                .into());
            }
        }
        if !r.bool(p, base, "use_spatial_transformer", false)? {
            return Err(r.error(
                &format!("{base}.use_spatial_transformer"),
                "must be true: Stable Diffusion's UNet cross-attends to the text",
            ));
        }
        let model_channels = r.usize(p, base, "model_channels", None)?;
        let mult = r.usizes(p, base, "channel_mult")?;
        let levels = mult.len();
        if levels == 0 {
            return Err(r.error(&format!("{base}.channel_mult"), "is empty"));
        }
        let channels: Vec<usize> = mult.iter().map(|m| m * model_channels).collect();
        let resolutions = r.usizes(p, base, "attention_resolutions")?;
        let attention: Vec<bool> = (0..levels)
            .map(|i| resolutions.contains(&(1 << i)))
            .collect();
        let layers = r.per_level(p, base, "num_res_blocks", levels, 2)?;
        let depth = r.per_level(p, base, "transformer_depth", levels, 1)?;
        let context = match p.get("context_dim") {
            Some(Value::Sequence(items)) => {
                items.first().and_then(Value::as_u64).map(|n| n as usize)
            }
            Some(v) => v.as_u64().map(|n| n as usize),
            None => None,
        }
        .ok_or_else(|| {
            r.error(
                &format!("{base}.context_dim"),
                "is missing or not an integer",
            )
        })?;
        let head_channels = r.i64(p, base, "num_head_channels", -1)?;
        let num_heads = r.i64(p, base, "num_heads", -1)?;
        let heads = channels
            .iter()
            .map(|&c| {
                if head_channels > 0 {
                    let h = head_channels as usize;
                    if c % h == 0 {
                        Ok(c / h)
                    } else {
                        Err(r.error(
                            &format!("{base}.num_head_channels"),
                            format!("{h} does not divide a level's {c} channels"),
                        ))
                    }
                } else if num_heads > 0 {
                    Ok(num_heads as usize)
                } else {
                    Err(r.error(
                        &format!("{base}.num_heads"),
                        "neither num_heads nor num_head_channels is set",
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let down: Vec<&str> = attention
            .iter()
            .map(|&a| {
                if a {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = attention
            .iter()
            .rev()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect();
        let mut config = json!({
            "in_channels": r.usize(p, base, "in_channels", None)?,
            "out_channels": r.usize(p, base, "out_channels", None)?,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": channels,
            "layers_per_block": layers,
            "transformer_layers_per_block": depth,
            "cross_attention_dim": context,
            "attention_head_dim": heads,
            "use_linear_projection": r.bool(p, base, "use_linear_in_transformer", false)?,
            "upcast_attention": family == ModelFamily::Sd2,
            "norm_num_groups": 32,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
        });
        if let Some(size) = p.get("image_size").and_then(Value::as_u64) {
            config["sample_size"] = json!(size);
        }
        Ok(config)
    }

    fn vae(r: &Reader, p: &Value, scaling_factor: f64) -> Result<Json> {
        let base = "model.params.first_stage_config.params.ddconfig";
        let dd = r.section(p, "ddconfig")?;
        let attn = dd.get("attn_resolutions").and_then(Value::as_sequence);
        if attn.is_some_and(|a| !a.is_empty()) {
            return Err(r.error(
                &format!("{base}.attn_resolutions"),
                "must be empty: Stable Diffusion's VAE (diffusers' AutoencoderKL) has attention only in its mid block",
            ));
        }
        let ch = r.usize(dd, base, "ch", None)?;
        let mult = r.usizes(dd, base, "ch_mult")?;
        let z = r.usize(dd, base, "z_channels", None)?;
        let embed = r.usize(
            p,
            "model.params.first_stage_config.params",
            "embed_dim",
            Some(z),
        )?;
        if embed != z {
            return Err(r.error(
                "model.params.first_stage_config.params.embed_dim",
                format!("{embed} differs from ddconfig.z_channels {z}; diffusers' AutoencoderKL needs them equal"),
            ));
        }
        let mut config = json!({
            "in_channels": r.usize(dd, base, "in_channels", Some(3))?,
            "out_channels": r.usize(dd, base, "out_ch", Some(3))?,
            "down_block_types": vec!["DownEncoderBlock2D"; mult.len()],
            "up_block_types": vec!["UpDecoderBlock2D"; mult.len()],
            "block_out_channels": mult.iter().map(|m| m * ch).collect::<Vec<_>>(),
            "layers_per_block": r.usize(dd, base, "num_res_blocks", None)?,
            "latent_channels": z,
            "norm_num_groups": 32,
            "scaling_factor": scaling_factor,
        });
        if let Some(size) = dd.get("resolution").and_then(Value::as_u64) {
            config["sample_size"] = json!(size);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> LdmYaml {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        LdmYaml::read(&path).unwrap()
    }

    #[test]
    fn reads_the_sd1_yaml_as_diffusers_would() {
        let y = fixture("tiny-sd1.yaml");
        assert_eq!(
            y.text,
            YamlText {
                family: ModelFamily::Sd1,
                penultimate: false
            }
        );
        assert_eq!(y.unet["block_out_channels"], json!([32, 32, 32]));
        assert_eq!(
            y.unet["down_block_types"],
            json!([
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D"
            ])
        );
        assert_eq!(
            y.unet["up_block_types"],
            json!(["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
        );
        assert_eq!(y.unet["attention_head_dim"], json!([8, 8, 8]));
        assert_eq!(y.unet["cross_attention_dim"], json!(64));
        assert_eq!(y.vae["block_out_channels"], json!([32, 32, 32]));
        assert_eq!(y.scheduler.prediction_type, "epsilon");
        assert_eq!(
            (y.scheduler.beta_start, y.scheduler.beta_end),
            (0.00085, 0.012)
        );
    }

    #[test]
    fn reads_the_sd2_v_yaml() {
        let y = fixture("tiny-sd2.yaml");
        assert_eq!(
            y.text,
            YamlText {
                family: ModelFamily::Sd2,
                penultimate: true
            }
        );
        assert_eq!(y.unet["attention_head_dim"], json!([2, 2, 2, 4]));
        assert_eq!(y.unet["use_linear_projection"], json!(true));
        assert_eq!(y.scheduler.prediction_type, "v_prediction");
        assert_eq!(y.vae["layers_per_block"], json!(2));
    }

    #[test]
    fn unsupported_yamls_name_the_key() {
        let sd1 = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1.yaml"),
        )
        .unwrap();
        let cases = [
            (
                sd1.replace(
                    "num_heads: 8",
                    "num_heads: 8\n        num_classes: sequential",
                ),
                "num_classes",
            ),
            (
                sd1.replace("FrozenCLIPEmbedder", "FrozenT5Embedder"),
                "FrozenT5Embedder",
            ),
            (
                sd1.replace(
                    "linear_end: 0.012",
                    "linear_end: 0.012\n    parameterization: x0",
                ),
                "x0",
            ),
            (
                sd1.replace("model_channels: 32", "model_channels: many"),
                "model_channels",
            ),
            ("model: {}".to_string(), "model.params"),
        ];
        for (text, needle) in cases {
            let err = LdmYaml::parse(&text, "x.yaml", "x.yaml".into())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("x.yaml") && err.contains(needle),
                "{needle}: {err}"
            );
        }
    }
}
