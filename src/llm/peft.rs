//! PEFT LoRA adapters as peft's `save_pretrained` writes them and `PeftModel.from_pretrained`,
//! vLLM's `--lora-modules` and llama.cpp's `convert_lora_to_gguf.py` read them: a folder with
//! `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`, `target_modules`, `task_type:
//! CAUSAL_LM`, ...) and `adapter_model.safetensors` whose keys are
//! `base_model.model.<module path>.lora_A.weight` `[r, in]` and `…lora_B.weight` `[out, r]`
//! (no adapter name in the keys).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::ModelError;
use crate::Result;

/// What `adapter_config.json` says, as far as a LoRA needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module names (`q_proj`) the adapter targets, as written.
    pub target_modules: Vec<String>,
    /// rsLoRA's scale `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
}

impl PeftConfig {
    /// The factor the adapter's product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// One adapted layer: `lora_A` (down, `[r, in]`) and `lora_B` (up, `[out, r]`).
#[derive(Debug, Clone)]
pub struct PeftModule {
    pub down: Tensor,
    pub up: Tensor,
}

/// A PEFT adapter: its config and its modules by module path (`model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    pub modules: BTreeMap<String, PeftModule>,
}

const PREFIX: &str = "base_model.model.";
const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

impl PeftAdapter {
    /// Writes `folder/adapter_config.json` and `folder/adapter_model.safetensors` (f32 tensors),
    /// each file written whole or not at all.
    pub fn save(&self, folder: &Path) -> Result<()> {
        std::fs::create_dir_all(folder).map_err(|e| crate::Error::io(folder, e))?;
        let c = &self.config;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "target_modules": c.target_modules,
            "use_rslora": c.use_rslora,
            "use_dora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "base_model_name_or_path": c.base_model_name_or_path,
        });
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (path, m) in &self.modules {
            tensors.insert(
                format!("{PREFIX}{path}.lora_A.weight"),
                m.down.to_dtype(DType::F32)?,
            );
            tensors.insert(
                format!("{PREFIX}{path}.lora_B.weight"),
                m.up.to_dtype(DType::F32)?,
            );
        }
        let weights = folder.join(WEIGHTS);
        let temporary = crate::files::temporary_path(&weights);
        candle_core::safetensors::save(&tensors, &temporary)?;
        std::fs::rename(&temporary, &weights).map_err(|e| crate::Error::io(&weights, e))?;
        let text = serde_json::to_string_pretty(&config).map_err(|e| {
            candle_core::Error::Msg(format!("adapter_config.json cannot be written: {e}"))
        })?;
        crate::files::write_atomically(&folder.join(CONFIG), format!("{text}\n").as_bytes())
    }

    /// Reads a PEFT LoRA folder. Features this program does not train on top of (DoRA, bias
    /// training, extra saved modules, embedding LoRA) are refused by name.
    pub fn open(folder: &Path, device: &Device) -> Result<Self> {
        let bad = |message: String| -> crate::Error {
            ModelError::InvalidConfig {
                origin: folder.display().to_string(),
                message,
            }
            .into()
        };
        let config_path = folder.join(CONFIG);
        let text = crate::files::read_text(&config_path, crate::files::TEXT_LIMIT, "a file")
            .map_err(|e| crate::Error::io(&config_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{CONFIG} is not valid JSON: {e}")))?;
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            return Err(bad(format!(
                "`peft_type` is `{peft_type}`; this program reads LORA adapters"
            )));
        }
        for (key, off) in [("use_dora", false), ("fan_in_fan_out", false)] {
            if v.get(key).and_then(Value::as_bool).unwrap_or(off) != off {
                return Err(bad(format!("`{key}: true` is not supported")));
            }
        }
        if let Some(bias) = v
            .get("bias")
            .and_then(Value::as_str)
            .filter(|b| *b != "none")
        {
            return Err(bad(format!(
                "`bias: {bias}` is not supported (only `none`)"
            )));
        }
        if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
            return Err(bad(
                "`modules_to_save` (whole trained layers besides the LoRA) is not supported"
                    .to_string(),
            ));
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer".to_string()))?
            as usize;
        let targets = match v.get("target_modules") {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let config = PeftConfig {
            r,
            lora_alpha: v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            target_modules: targets,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        let weights = folder.join(WEIGHTS);
        let tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| bad(format!("{WEIGHTS} cannot be read: {e}")))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, tensor) in tensors {
            let rest = key.strip_prefix(PREFIX).unwrap_or(&key);
            let (path, slot) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
                (p, 0)
            } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
                (p, 1)
            } else {
                return Err(bad(format!(
                    "`{key}` is not a LoRA matrix of a linear layer (lora_A/lora_B); embedding \
                     LoRAs and other tensors are not supported"
                )));
            };
            let entry = halves.entry(path.to_string()).or_default();
            if slot == 0 {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let mut modules = BTreeMap::new();
        for (path, pair) in halves {
            let (Some(down), Some(up)) = pair else {
                return Err(bad(format!("`{path}` has only one of lora_A and lora_B")));
            };
            let (rank_down, _) = down.dims2()?;
            let (_, rank_up) = up.dims2()?;
            if rank_down != r || rank_up != r {
                return Err(bad(format!(
                    "`{path}`: lora_A {:?} and lora_B {:?} do not have the config's rank {r}",
                    down.dims(),
                    up.dims()
                )));
            }
            modules.insert(path, PeftModule { down, up });
        }
        Ok(PeftAdapter { config, modules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PEFT matrices of the llama fixture's reference, as an adapter.
    fn reference_adapter() -> PeftAdapter {
        let path = crate::fixtures::root().join("llm/llama.reference.safetensors");
        let reference = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let mut modules = BTreeMap::new();
        for (key, down) in &reference {
            if let Some(path) = key
                .strip_prefix(PREFIX)
                .and_then(|k| k.strip_suffix(".lora_A.weight"))
            {
                let up = reference[&format!("{PREFIX}{path}.lora_B.weight")].clone();
                modules.insert(
                    path.to_string(),
                    PeftModule {
                        down: down.clone(),
                        up,
                    },
                );
            }
        }
        PeftAdapter {
            config: PeftConfig {
                r: 4,
                lora_alpha: 8.0,
                lora_dropout: 0.0,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                use_rslora: false,
                base_model_name_or_path: Some("tests/fixtures/llm/llama".into()),
            },
            modules,
        }
    }

    #[test]
    fn an_adapter_round_trips_with_peft_keys() {
        let adapter = reference_adapter();
        assert_eq!(adapter.modules.len(), 4);
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path()).unwrap();
        let bytes = std::fs::read(dir.path().join(WEIGHTS)).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = file.names();
        names.sort();
        assert_eq!(
            names[0],
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        let back = PeftAdapter::open(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.config, adapter.config);
        assert_eq!(back.config.scale(), 2.0);
        for (path, m) in &adapter.modules {
            let b = &back.modules[path];
            for (x, y) in [(&m.down, &b.down), (&m.up, &b.up)] {
                let same = (x - y).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{path}");
            }
        }
        // Written for a client to check: LORA_TRAINER_PEFT_DIR=DIR keeps a copy there
        // (`python tools/check_peft_adapter.py DIR`).
        if let Some(keep) = std::env::var_os("LORA_TRAINER_PEFT_DIR") {
            adapter.save(Path::new(&keep)).unwrap();
        }
    }

    #[test]
    fn unsupported_adapters_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        reference_adapter().save(dir.path()).unwrap();
        let config = dir.path().join(CONFIG);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("\"use_dora\": false", "\"use_dora\": true"),
        )
        .unwrap();
        let e = PeftAdapter::open(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_dora"), "{e}");
        std::fs::write(&config, text.replace("\"LORA\"", "\"IA3\"")).unwrap();
        let e = PeftAdapter::open(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IA3"), "{e}");
    }
}
