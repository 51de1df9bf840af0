//! The causal language models (issue 16) against transformers on the tiny random models of
//! `tools/make_llm_fixtures.py`, one per architecture (Llama with GQA and Llama 3 rope scaling,
//! Qwen2 with q/k/v biases and tied embeddings, Qwen3 with q/k norms and a wider head, Mistral):
//! logits, the causal-LM loss over the labelled tokens, and with a PEFT LoRA on q_proj/v_proj
//! the loss and every adapter matrix's gradient; generation with the key/value cache gives the
//! logits of the whole sequence's forward.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lora_trainer::models::causal_lm::{causal_lm_loss, CausalLm, KvCache, LmFolder};
use lora_trainer::nn::frozen::with_generic_ops;
use lora_trainer::nn::{Adapter, AdapterProvider, LayerKind, LowRank, Scope, WeightStore};

const MODELS: [&str; 4] = ["llama", "qwen2", "qwen3", "mistral"];

struct Fixture {
    model: CausalLm,
    store: WeightStore,
    reference: HashMap<String, Tensor>,
    ids: Tensor,
    labels: Vec<Vec<i64>>,
}

fn fixture(name: &str, adapters: Option<&dyn AdapterProvider>) -> Fixture {
    let folder = lora_trainer::fixtures::root().join("llm").join(name);
    let LmFolder {
        config,
        weights: store,
        ..
    } = LmFolder::open(&folder, DType::F32, &Device::Cpu).unwrap();
    let mut scope = Scope::root(&store);
    if let Some(provider) = adapters {
        scope = scope.with_adapters(provider);
    }
    let model = CausalLm::new(scope, &config).unwrap();
    let reference = reference(name);
    let ids = reference["ids"].to_dtype(DType::U32).unwrap();
    let labels: Vec<Vec<i64>> = reference["labels"].to_vec2().unwrap();
    Fixture {
        model,
        store,
        reference,
        ids,
        labels,
    }
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = lora_trainer::fixtures::root().join(format!("llm/{name}.reference.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn relative_difference(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

#[test]
fn logits_and_loss_match_transformers_for_every_architecture() {
    check_logits_and_loss();
}

/// The path a CUDA device takes (attention, norms, rotary and SwiGLU from candle ops), run on
/// the CPU.
#[test]
fn the_device_generic_path_matches_transformers_too() {
    with_generic_ops(|| {
        check_logits_and_loss();
        check_lora_gradients();
        check_key_value_cache();
    });
}

fn check_logits_and_loss() {
    for name in MODELS {
        let f = fixture(name, None);
        // Every tensor of the file is a weight of the model (tied models have no lm_head).
        f.store.check_all_used().unwrap();
        let logits = f.model.forward(&f.ids).unwrap();
        let diff = relative_difference(&logits, &f.reference["logits"]);
        assert!(diff < 1e-5, "{name}: logits differ by {diff:e}");
        let loss = causal_lm_loss(&logits, &f.labels).unwrap().unwrap();
        let (ours, theirs) = (scalar(&loss), scalar(&f.reference["loss"]));
        assert!(
            (ours - theirs).abs() < 1e-5 * theirs,
            "{name}: loss {ours} vs {theirs}"
        );
        let direct = scalar(&f.model.loss(&f.ids, &f.labels).unwrap().unwrap());
        assert!(
            (direct - theirs).abs() < 1e-5 * theirs,
            "{name}: loss on the labelled rows {direct} vs {theirs}"
        );
    }
}

/// A LoRA with given matrices (PEFT's `lora_A` = down `[r, in]`, `lora_B` = up `[out, r]`).
#[derive(Debug)]
struct GivenLora {
    down: Var,
    up: Var,
    scale: f64,
}

impl Adapter for GivenLora {
    fn forward(&self, x: &Tensor) -> lora_trainer::Result<Tensor> {
        let h = x.broadcast_matmul(&self.down.as_tensor().t()?)?;
        Ok((h.broadcast_matmul(&self.up.as_tensor().t()?)? * self.scale)?)
    }

    fn trainable_vars(&self) -> Vec<Var> {
        vec![self.down.clone(), self.up.clone()]
    }

    fn low_rank(&self) -> Option<LowRank> {
        Some(LowRank {
            down: self.down.as_tensor().clone(),
            up: self.up.as_tensor().clone(),
            scale: self.scale,
        })
    }
}

/// PEFT's matrices from the reference, by module path.
struct PeftLoras(HashMap<String, Arc<GivenLora>>);

impl AdapterProvider for PeftLoras {
    fn adapter_for(
        &self,
        module_path: &str,
        _kind: LayerKind,
    ) -> lora_trainer::Result<Option<Arc<dyn Adapter>>> {
        Ok(self
            .0
            .get(module_path)
            .map(|a| a.clone() as Arc<dyn Adapter>))
    }
}

/// The reference's PEFT LoRA (r=4, alpha=8) of fixture `name`, by module path.
fn peft_loras(name: &str) -> PeftLoras {
    let reference = reference(name);
    let mut loras = HashMap::new();
    for key in reference.keys() {
        let Some(path) = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let b_key = format!("base_model.model.{path}.lora_B.weight");
        loras.insert(
            path.to_string(),
            Arc::new(GivenLora {
                down: Var::from_tensor(&reference[key]).unwrap(),
                up: Var::from_tensor(&reference[&b_key]).unwrap(),
                scale: 8.0 / 4.0,
            }),
        );
    }
    PeftLoras(loras)
}

#[test]
fn lora_gradients_match_peft_for_every_architecture() {
    check_lora_gradients();
}

fn check_lora_gradients() {
    for name in MODELS {
        let provider = peft_loras(name);
        assert_eq!(provider.0.len(), 4, "{name}: q and v of two layers");
        let f = fixture(name, Some(&provider));
        // The training path: lm_head on the labelled positions only.
        let loss = f.model.loss(&f.ids, &f.labels).unwrap().unwrap();
        let (ours, theirs) = (scalar(&loss), scalar(&f.reference["lora.loss"]));
        assert!(
            (ours - theirs).abs() < 1e-5 * theirs,
            "{name}: loss {ours} vs {theirs}"
        );
        let grads = loss.backward().unwrap();
        for (path, lora) in &provider.0 {
            for (which, var) in [("lora_A", &lora.down), ("lora_B", &lora.up)] {
                let key = format!("grad.base_model.model.{path}.{which}.weight");
                let got = grads.get(var.as_tensor()).expect("a gradient");
                let diff = relative_difference(got, &f.reference[&key]);
                assert!(diff < 1e-4, "{name}: {key} differs by {diff:e}");
            }
        }
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_lora_gradients() {
    for name in MODELS {
        let provider = peft_loras(name);
        let mut f = fixture(name, Some(&provider));
        let run = |model: &CausalLm| {
            let loss = model.loss(&f.ids, &f.labels).unwrap().unwrap();
            let grads = loss.backward().unwrap();
            let mut out = Vec::new();
            for lora in provider.0.values() {
                for var in [&lora.down, &lora.up] {
                    out.push(grads.get(var.as_tensor()).unwrap().clone());
                }
            }
            (scalar(&loss), out)
        };
        let (plain_loss, plain) = run(&f.model);
        f.model.set_gradient_checkpointing(true);
        let (loss, recomputed) = run(&f.model);
        assert_eq!(loss, plain_loss, "{name}");
        for (a, b) in plain.iter().zip(&recomputed) {
            let diff = relative_difference(a, b);
            assert!(diff < 1e-6, "{name}: {diff:e}");
        }
    }
}

/// A prompt run at once, then one token at a time against the key/value cache: the logits after
/// each token are those of the whole sequence's forward at that position (the fused causal
/// attention with queries after the cached keys, and the rotary angles of later positions).
#[test]
fn the_key_value_cache_gives_the_forward_logits() {
    check_key_value_cache();
}

fn check_key_value_cache() {
    for name in MODELS {
        let f = fixture(name, None);
        let ids = f.ids.narrow(0, 0, 1).unwrap();
        let t = ids.dim(1).unwrap();
        assert!(t > 4, "{name}: a longer sequence is needed");
        let want = f.model.forward(&ids).unwrap();
        let mut cache = KvCache::default();
        let prompt = 3;
        let first = f
            .model
            .next_logits(&ids.narrow(1, 0, prompt).unwrap(), &mut cache)
            .unwrap();
        let mut got = vec![first];
        for i in prompt..t {
            let token = ids.narrow(1, i, 1).unwrap();
            got.push(f.model.next_logits(&token, &mut cache).unwrap());
        }
        assert_eq!(cache.len(), t, "{name}");
        for (k, logits) in got.iter().enumerate() {
            let position = prompt - 1 + k;
            let expected = want.narrow(1, position, 1).unwrap().squeeze(1).unwrap();
            let diff = relative_difference(logits, &expected);
            assert!(
                diff < 1e-5,
                "{name}: position {position} differs by {diff:e}"
            );
        }
    }
}
