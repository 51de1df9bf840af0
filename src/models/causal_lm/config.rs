//! A causal language model's `config.json` (transformers' `LlamaConfig`, `MistralConfig`,
//! `Qwen2Config`, `Qwen3Config`), read as transformers 4 and 5 write it: the rotary settings at
//! the top (`rope_theta`, `rope_scaling`) or inside `rope_parameters`.

use std::path::Path;

use serde_json::Value;

use crate::models::config_json::ConfigJson;
use crate::Result;

/// The architectures this program builds, by their `architectures` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmArchitecture {
    /// `LlamaForCausalLM` (Llama 2, 3, 3.x; optional attention and MLP biases).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): biases on q, k and v.
    Qwen2,
    /// `Qwen3ForCausalLM`: an RMSNorm over each head of q and k.
    Qwen3,
}

/// Every `architectures` name we build, for the message that refuses the others.
pub const SUPPORTED: [&str; 4] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

impl LmArchitecture {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => LmArchitecture::Llama,
            "MistralForCausalLM" => LmArchitecture::Mistral,
            "Qwen2ForCausalLM" => LmArchitecture::Qwen2,
            "Qwen3ForCausalLM" => LmArchitecture::Qwen3,
            _ => return None,
        })
    }

    /// The class name, as `config.json` writes it.
    pub fn class_name(self) -> &'static str {
        match self {
            LmArchitecture::Llama => "LlamaForCausalLM",
            LmArchitecture::Mistral => "MistralForCausalLM",
            LmArchitecture::Qwen2 => "Qwen2ForCausalLM",
            LmArchitecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// How the rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: default` (or no scaling).
    None,
    /// Llama 3's `rope_type: llama3`: low frequencies divided by `factor`, high ones kept, a
    /// smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The settings the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalLmConfig {
    pub architecture: LmArchitecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Each head's width (`head_dim`, else `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// `lm_head` is `model.embed_tokens` (no `lm_head.weight` of its own).
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2 always; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on `o_proj` (Llama/Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP's projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral's and Qwen2's sliding attention window, when one applies: sequences longer than
    /// it are refused (full attention over them would differ from the model's).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl CausalLmConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(ConfigJson::from_file(path)?)
    }

    /// Parses config text; `origin` names it in messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        Self::from_config(ConfigJson::from_str(text, origin)?)
    }

    fn from_config(mut c: ConfigJson) -> Result<Self> {
        let classes = c.strings("architectures", &[])?;
        let architecture = classes
            .iter()
            .find_map(|n| LmArchitecture::from_class(n))
            .ok_or_else(|| {
                let found = if classes.is_empty() {
                    "no `architectures` entry".to_string()
                } else {
                    format!("`{}`", classes.join("`, `"))
                };
                c.error(
                    "architectures",
                    format!(
                        "{found} is not a causal language model this program trains; it builds {}",
                        SUPPORTED.join(", ")
                    ),
                )
            })?;
        let hidden_size = c.usize("hidden_size", 0)?;
        let heads = c.usize("num_attention_heads", 0)?;
        if hidden_size == 0 || heads == 0 {
            return Err(c.error(
                "hidden_size",
                "`hidden_size` and `num_attention_heads` must be given and above zero",
            ));
        }
        let kv_heads = c.usize("num_key_value_heads", heads)?;
        let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden_size / heads);
        if kv_heads == 0 || heads % kv_heads != 0 || head_dim == 0 || head_dim % 2 != 0 {
            return Err(c.error(
                "num_key_value_heads",
                format!(
                    "{heads} attention heads, {kv_heads} key/value heads of width {head_dim}: the \
                     heads must be a multiple of the key/value heads, the width even"
                ),
            ));
        }
        let (rope_theta, rope_scaling) = rope(&mut c)?;
        let attention_bias = c.bool("attention_bias", false)?;
        let (qkv_bias, o_bias) = match architecture {
            LmArchitecture::Qwen2 => (true, false),
            LmArchitecture::Mistral => (false, false),
            _ => (attention_bias, attention_bias),
        };
        let mlp_bias = c.bool("mlp_bias", false)?;
        let sliding_window = match architecture {
            LmArchitecture::Mistral => c.opt_usize("sliding_window")?,
            _ => {
                let used = c.bool("use_sliding_window", false)?;
                let window = c.opt_usize("sliding_window")?;
                used.then_some(window).flatten()
            }
        };
        let act = c.string("hidden_act", "silu")?;
        if act != "silu" {
            return Err(c.error(
                "hidden_act",
                format!("`{act}` is not supported (these models use `silu`)"),
            ));
        }
        let config = CausalLmConfig {
            architecture,
            vocab_size: c.usize("vocab_size", 0)?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size", 0)?,
            num_hidden_layers: c.usize("num_hidden_layers", 0)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: c.f64("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.usize("max_position_embeddings", 2048)?,
            tie_word_embeddings: c.bool("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: token_id(&mut c, "bos_token_id")?.first().copied(),
            eos_token_ids: token_id(&mut c, "eos_token_id")?,
        };
        if config.vocab_size == 0 || config.intermediate_size == 0 || config.num_hidden_layers == 0
        {
            return Err(c.error(
                "vocab_size",
                "`vocab_size`, `intermediate_size` and `num_hidden_layers` must be given",
            ));
        }
        // Off in every model we build, or informational.
        c.require("pretraining_tp", "1", |v| v.as_u64() == Some(1))?;
        c.require("partial_rotary_factor", "1.0", |v| v.as_f64() == Some(1.0))?;
        c.require("use_mrope", "false", |v| v == &Value::Bool(false))?;
        c.require("layer_types", "full attention in every layer", |v| {
            v.as_array()
                .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")))
                || sliding_window.is_some()
        })?;
        for key in [
            "attention_dropout",
            "initializer_range",
            "use_cache",
            "torch_dtype",
            "dtype",
            "transformers_version",
            "pad_token_id",
            "max_window_layers",
            "model_type",
        ] {
            c.ignore(key);
        }
        c.finish()?;
        Ok(config)
    }

    /// Key/value heads per query head group.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5) or from `rope_theta` and
/// `rope_scaling` (transformers 4).
fn rope(c: &mut ConfigJson) -> Result<(f64, RopeScaling)> {
    let parameters = match c.peek("rope_parameters").cloned() {
        Some(Value::Object(map)) => {
            c.ignore("rope_parameters");
            Some(map)
        }
        Some(Value::Null) | None => None,
        Some(other) => {
            return Err(c.error(
                "rope_parameters",
                format!("expected an object, found {other}"),
            ))
        }
    };
    let (theta, scaling) = match parameters {
        Some(p) => (p.get("rope_theta").and_then(Value::as_f64), Some(p)),
        None => {
            let theta = c.opt_f64("rope_theta")?;
            let scaling = match c.peek("rope_scaling").cloned() {
                Some(Value::Object(map)) => Some(map),
                _ => None,
            };
            c.ignore("rope_scaling");
            (theta, scaling)
        }
    };
    let theta = theta.unwrap_or(10000.0);
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| -> Result<f64> {
        s.get(key).and_then(Value::as_f64).ok_or_else(|| {
            c.error(
                "rope_scaling",
                format!("`{kind}` scaling needs a number `{key}`"),
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        },
        other => {
            return Err(c.error(
                "rope_scaling",
                format!(
                    "rope scaling `{other}` is not supported (this program implements `default` \
                     and `llama3`)"
                ),
            ))
        }
    };
    Ok((theta, scaling))
}

/// A token id or a list of them (`eos_token_id` is a list in Llama 3's config); none when
/// absent or `null`.
fn token_id(c: &mut ConfigJson, key: &str) -> Result<Vec<u32>> {
    let ids = match c.peek(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| c.error(key, "expected token ids"))?,
        Some(v) => vec![v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| c.error(key, format!("expected a token id, found {v}")))?],
    };
    c.ignore(key);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSFORMERS_4_LLAMA: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
      "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
      "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-05, "vocab_size": 128256,
      "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1, "hidden_act": "silu",
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
      "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": true
    }"#;

    const TRANSFORMERS_4_QWEN2: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
      "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "vocab_size": 151936,
      "rope_theta": 1000000.0, "max_position_embeddings": 32768, "max_window_layers": 21,
      "sliding_window": 32768, "use_sliding_window": false, "tie_word_embeddings": true,
      "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
      "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1", "use_cache": true
    }"#;

    #[test]
    fn transformers_4_configs_read_their_top_level_rope_keys() {
        let c = CausalLmConfig::from_json_str(TRANSFORMERS_4_LLAMA, "llama-3.2-1b").unwrap();
        assert_eq!(c.architecture, LmArchitecture::Llama);
        assert_eq!((c.head_dim, c.group_size()), (64, 4));
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            }
        );
        assert_eq!(c.eos_token_ids, [128001, 128008, 128009]);
        assert!(c.tie_word_embeddings && !c.qkv_bias);

        let c = CausalLmConfig::from_json_str(TRANSFORMERS_4_QWEN2, "qwen2.5-0.5b").unwrap();
        assert_eq!(c.architecture, LmArchitecture::Qwen2);
        assert_eq!((c.head_dim, c.num_key_value_heads), (64, 2));
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!((c.rope_theta, c.sliding_window), (1e6, None));
        assert_eq!(c.eos_token_ids, [151645]);
    }

    #[test]
    fn transformers_5_configs_read_rope_parameters() {
        let path = crate::fixtures::root().join("llm/llama/config.json");
        let c = CausalLmConfig::from_file(&path).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let c = CausalLmConfig::from_file(&crate::fixtures::root().join("llm/qwen3/config.json"))
            .unwrap();
        assert_eq!((c.architecture, c.head_dim), (LmArchitecture::Qwen3, 16));
    }

    #[test]
    fn an_unsupported_model_is_refused_naming_the_supported_ones() {
        let text = TRANSFORMERS_4_QWEN2.replace("Qwen2ForCausalLM", "GPT2LMHeadModel");
        let e = CausalLmConfig::from_json_str(&text, "gpt2/config.json").unwrap_err();
        let message = e.to_string();
        assert!(message.contains("`GPT2LMHeadModel`"), "{message}");
        assert!(message.contains("Qwen3ForCausalLM"), "{message}");
        // A switched-on feature we do not build is refused by name, not ignored.
        let text = TRANSFORMERS_4_QWEN2.replace(
            "\"use_cache\": true",
            "\"use_cache\": true, \"quantization_config\": {\"bits\": 4}",
        );
        let e = CausalLmConfig::from_json_str(&text, "q/config.json").unwrap_err();
        assert!(e.to_string().contains("quantization_config"), "{e}");
        let text = TRANSFORMERS_4_LLAMA.replace("\"llama3\"", "\"yarn\"");
        let e = CausalLmConfig::from_json_str(&text, "l/config.json").unwrap_err();
        assert!(e.to_string().contains("`yarn`"), "{e}");
    }
}
