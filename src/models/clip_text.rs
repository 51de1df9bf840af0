//! The CLIP text encoder.
//!
//! Our own implementation of transformers' `CLIPTextModel` (pre-LayerNorm transformer with a
//! causal mask), with the module paths of its checkpoints (`embeddings.token_embedding`,
//! `encoder.layers.N.self_attn.q_proj`, `final_layer_norm`) so that weights, layers and LoRA
//! names are the same words. Every projection is a [`Linear`] that may carry an adapter; the
//! adapter provider always sees paths under `text_model.` (kohya's `lora_te_text_model_...`),
//! whether the checkpoint's keys have that prefix (transformers < 5, single files) or not
//! (transformers 5). Norms and softmax are built from primitive ops so gradients reach LoRA
//! weights and the embedding table (DESIGN.md §7).

use std::sync::Arc;

use candle_core::{DType, Tensor};

pub use super::clip_text_config::{ClipActivation, ClipTextConfig};
use crate::error::ModelError;
use crate::nn::{activation, Adapter, AdapterProvider, LayerKind, LayerNorm, Linear, Scope};
use crate::Result;

/// The checkpoint key prefix of the text transformer inside `CLIPTextModel` and single files.
const TEXT_MODEL: &str = "text_model";

/// Token and position embeddings (`embeddings.*`).
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    /// `[vocab_size, hidden]`
    token_embedding: Tensor,
    /// `[max_position_embeddings, hidden]`
    position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn new(scope: Scope, config: &ClipTextConfig) -> Result<Self> {
        let token_embedding = scope
            .pp("token_embedding")
            .get("weight", (config.vocab_size, config.hidden_size))?;
        let position_embedding = scope.pp("position_embedding").get(
            "weight",
            (config.max_position_embeddings, config.hidden_size),
        )?;
        // A buffer (`arange(max_positions)`) that transformers recomputes; older checkpoints carry it.
        if scope.contains("position_ids") {
            scope.store().mark_used(&scope.key("position_ids"));
        }
        Ok(ClipTextEmbeddings {
            token_embedding,
            position_embedding,
        })
    }

    /// `input_ids: [B, T]` (u8/u32/i64) → `[B, T, hidden]`.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self.token_embedding.dim(1)?;
        let tokens = self
            .token_embedding
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, hidden))?;
        let positions = self.position_embedding.narrow(0, 0, t)?.unsqueeze(0)?;
        Ok(tokens.broadcast_add(&positions)?)
    }
}

/// Multi-head self-attention (`self_attn.{q,k,v,out}_proj`).
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(scope: Scope, shape: &ClipLayerShape) -> Result<Self> {
        let h = shape.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::new(scope.pp("q_proj"), h, h, true)?,
            k_proj: Linear::new(scope.pp("k_proj"), h, h, true)?,
            v_proj: Linear::new(scope.pp("v_proj"), h, h, true)?,
            out_proj: Linear::new(scope.pp("out_proj"), h, h, true)?,
            heads: shape.heads,
            head_dim: h / shape.heads,
        })
    }

    /// `x: [B, T, hidden]`, `mask: [T, T]` additive (`None`: every token sees every other) →
    /// `[B, T, hidden]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let split_heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split_heads(self.q_proj.forward(x)?)?;
        let k = split_heads(self.k_proj.forward(x)?)?;
        let v = split_heads(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = activation::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))?;
        self.out_proj.forward(&out)
    }
}

/// The feed-forward block (`mlp.fc1`, `mlp.fc2`).
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipMlp {
    fn new(scope: Scope, shape: &ClipLayerShape) -> Result<Self> {
        Ok(ClipMlp {
            fc1: Linear::new(
                scope.pp("fc1"),
                shape.hidden_size,
                shape.intermediate_size,
                true,
            )?,
            fc2: Linear::new(
                scope.pp("fc2"),
                shape.intermediate_size,
                shape.hidden_size,
                true,
            )?,
            activation: shape.activation,
        })
    }

    /// `[B, T, hidden]` → `[B, T, hidden]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = match self.activation {
            ClipActivation::QuickGelu => activation::quick_gelu(&h)?,
            ClipActivation::Gelu => activation::gelu(&h)?,
        };
        self.fc2.forward(&h)
    }
}

/// The sizes of one CLIP transformer layer: the text and the vision towers share the layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ClipLayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Attention heads; `hidden_size` must be a multiple of it.
    pub heads: usize,
    pub layer_norm_eps: f64,
    pub activation: ClipActivation,
}

impl From<&ClipTextConfig> for ClipLayerShape {
    fn from(config: &ClipTextConfig) -> Self {
        ClipLayerShape {
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            heads: config.num_attention_heads,
            layer_norm_eps: config.layer_norm_eps,
            activation: config.hidden_act,
        }
    }
}

/// One pre-LayerNorm transformer layer (`encoder.layers.N`), causal in the text tower and not
/// in the vision tower (the caller's mask decides).
#[derive(Debug, Clone)]
pub(crate) struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    pub(crate) fn new(scope: Scope, shape: &ClipLayerShape) -> Result<Self> {
        let (h, eps) = (shape.hidden_size, shape.layer_norm_eps);
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::new(scope.pp("layer_norm1"), h, eps)?,
            self_attn: ClipAttention::new(scope.pp("self_attn"), shape)?,
            layer_norm2: LayerNorm::new(scope.pp("layer_norm2"), h, eps)?,
            mlp: ClipMlp::new(scope.pp("mlp"), shape)?,
        })
    }

    /// `x: [B, T, hidden]`, `mask: [T, T]` additive or `None` → `[B, T, hidden]`.
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        Ok((&h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?)?)
    }
}

/// Asks the model's adapter provider with `text_model.`-prefixed paths when the checkpoint's
/// keys lack that prefix, so LoRA names do not depend on the transformers version that saved it.
struct TextModelPaths<'a> {
    /// The scope the caller built the model in (its path and its adapter provider).
    outer: Scope<'a>,
}

impl AdapterProvider for TextModelPaths<'_> {
    fn adapter_for(&self, module_path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>> {
        let relative = match self.outer.path() {
            "" => module_path,
            outer => module_path
                .strip_prefix(outer)
                .map(|p| p.trim_start_matches('.'))
                .unwrap_or(module_path),
        };
        self.outer.pp(TEXT_MODEL).pp(relative).adapter(kind)
    }
}

/// transformers' `CLIPTextModel`: embeddings, `num_hidden_layers` encoder layers, final norm.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from `scope`, whose store holds the text encoder's weights with or
    /// without the `text_model.` prefix (detected from the keys). Adapters are requested for
    /// `text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj` and `...mlp.fc{1,2}`.
    pub fn new(scope: Scope, config: &ClipTextConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|message| ModelError::InvalidConfig {
                origin: scope.store().describe(),
                message,
            })?;
        const PROBE: &str = "embeddings.token_embedding.weight";
        let already_text_model = scope.path().rsplit('.').next() == Some(TEXT_MODEL);
        if scope.contains(PROBE) && !already_text_model {
            // transformers 5 layout: keys start at `embeddings.`; adapters still see `text_model.`.
            let paths = TextModelPaths {
                outer: scope.clone(),
            };
            let root = Scope::root(scope.store()).with_adapters(&paths);
            let inner = if scope.path().is_empty() {
                root
            } else {
                root.pp(scope.path())
            };
            Self::build(inner, config)
        } else if already_text_model {
            Self::build(scope, config)
        } else {
            // `text_model.embeddings...`; a missing key is reported under this conventional name.
            Self::build(scope.pp(TEXT_MODEL), config)
        }
    }

    fn build(scope: Scope, config: &ClipTextConfig) -> Result<Self> {
        let embeddings = ClipTextEmbeddings::new(scope.pp("embeddings"), config)?;
        let shape = ClipLayerShape::from(config);
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(scope.pp("encoder").pp("layers").pp(i), &shape))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            scope.pp("final_layer_norm"),
            config.hidden_size,
            config.layer_norm_eps,
        )?;
        Ok(ClipTextModel {
            embeddings,
            layers,
            final_layer_norm,
            config: config.clone(),
        })
    }

    /// The config the model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids: [B, T]` (u32 or i64, `T ≤ max_position_embeddings`) → `last_hidden_state`
    /// `[B, T, hidden]`, final layer norm applied.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_clip_skip(input_ids, 1)
    }

    /// The hidden state `clip_skip − 1` layers before the last, then the final layer norm
    /// (kohya / A1111 `clip_skip`: 1 = the last layer, 2 = the one before, ...). Only the layers
    /// needed are computed. `input_ids: [B, T]` → `[B, T, hidden]`.
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.layers.len();
        if clip_skip == 0 || clip_skip > layers {
            return Err(ModelError::InvalidConfig {
                origin: "the CLIP text encoder".to_string(),
                message: format!(
                    "clip_skip {clip_skip} is out of range: this text encoder has {layers} layers, so clip_skip must be 1..={layers}"
                ),
            }
            .into());
        }
        self.check_ids(input_ids)?;
        let mut h = self.embeddings.forward(input_ids)?;
        let mask = causal_mask(input_ids.dim(1)?, h.dtype(), h.device())?;
        for layer in &self.layers[..layers + 1 - clip_skip] {
            h = layer.forward(&h, Some(&mask))?;
        }
        self.final_layer_norm.forward(&h)
    }

    /// One pass that gives what SDXL reads: the hidden state before the last layer, without the
    /// final layer norm (transformers' `hidden_states[-2]`, the conditioning), and
    /// `last_hidden_state` (final layer norm applied; the pooled output is taken from it).
    /// `input_ids: [B, T]` → (`[B, T, hidden]`, `[B, T, hidden]`).
    pub fn forward_penultimate(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_ids(input_ids)?;
        let mut h = self.embeddings.forward(input_ids)?;
        let mask = causal_mask(input_ids.dim(1)?, h.dtype(), h.device())?;
        let Some((last, before)) = self.layers.split_last() else {
            return Err(ModelError::InvalidConfig {
                origin: "the CLIP text encoder".to_string(),
                message: "it has no layers; SDXL conditions on the one before the last".to_string(),
            }
            .into());
        };
        for layer in before {
            h = layer.forward(&h, Some(&mask))?;
        }
        let penultimate = h.clone();
        let h = last.forward(&h, Some(&mask))?;
        Ok((penultimate, self.final_layer_norm.forward(&h)?))
    }

    /// transformers' `pooler_output`: `last_hidden_state [B, T, hidden]` at the first EOS of each
    /// row of `input_ids [B, T]` (position 0 if a row has none), or at the row's largest id when
    /// the config's `eos_token_id` is the legacy 2 → `[B, hidden]`.
    pub fn pooled(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t, hidden) = last_hidden_state.dims3()?;
        let rows = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        if rows.len() != b {
            return Err(candle_core::Error::Msg(format!(
                "pooled: {} rows of input ids for {b} hidden states",
                rows.len()
            ))
            .into());
        }
        let positions: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(row, ids)| (row * t + pool_position(ids, &self.config)) as u32)
            .collect();
        let index = Tensor::from_vec(positions, b, last_hidden_state.device())?;
        Ok(last_hidden_state
            .reshape((b * t, hidden))?
            .index_select(&index, 0)?)
    }

    /// Token ids must index the embedding table and fit the position table.
    fn check_ids(&self, input_ids: &Tensor) -> Result<()> {
        let (_, t) = input_ids.dims2()?;
        let max_t = self.config.max_position_embeddings;
        if t > max_t {
            return Err(candle_core::Error::Msg(format!(
                "CLIP text encoder: {t} tokens per prompt, but it has only {max_t} positions"
            ))
            .into());
        }
        let ids = input_ids
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        if let Some(bad) = ids
            .iter()
            .find(|&&id| id < 0 || id as usize >= self.config.vocab_size)
        {
            return Err(candle_core::Error::Msg(format!(
                "CLIP text encoder: token id {bad} is outside its vocabulary of {} (wrong tokenizer for this model?)",
                self.config.vocab_size
            ))
            .into());
        }
        Ok(())
    }
}

/// Where transformers takes the pooled output in one row of ids.
fn pool_position(ids: &[i64], config: &ClipTextConfig) -> usize {
    if config.pools_at_largest_id() {
        // torch.argmax: the first position of the largest value.
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&id| id == max).unwrap_or(0)
    } else {
        ids.iter()
            .position(|&id| id >= 0 && config.eos_token_ids.contains(&(id as u32)))
            .unwrap_or(0)
    }
}

/// `[T, T]` additive mask: 0 on and below the diagonal, −∞ above (a token sees only earlier ones).
fn causal_mask(t: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (t, t), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::nn::gradcheck::GradCheck;
    use crate::nn::WeightStore;

    fn config(layers: usize) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 12,
            hidden_size: 8,
            intermediate_size: 16,
            projection_dim: None,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_ids: vec![11],
        }
    }

    /// Every parameter of a `CLIPTextModel` with `config`, keyed as transformers 5 saves them
    /// (no `text_model.` prefix), random in f64.
    fn random_weights(config: &ClipTextConfig, seed: u64) -> Result<Vec<(String, Var)>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (h, m) = (config.hidden_size, config.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.token_embedding.weight".into(),
                vec![config.vocab_size, h],
            ),
            (
                "embeddings.position_embedding.weight".into(),
                vec![config.max_position_embeddings, h],
            ),
            ("final_layer_norm.weight".into(), vec![h]),
            ("final_layer_norm.bias".into(), vec![h]),
        ];
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            for name in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                shapes.push((format!("{p}.self_attn.{name}.weight"), vec![h, h]));
                shapes.push((format!("{p}.self_attn.{name}.bias"), vec![h]));
            }
            for name in ["layer_norm1", "layer_norm2"] {
                shapes.push((format!("{p}.{name}.weight"), vec![h]));
                shapes.push((format!("{p}.{name}.bias"), vec![h]));
            }
            shapes.push((format!("{p}.mlp.fc1.weight"), vec![m, h]));
            shapes.push((format!("{p}.mlp.fc1.bias"), vec![m]));
            shapes.push((format!("{p}.mlp.fc2.weight"), vec![h, m]));
            shapes.push((format!("{p}.mlp.fc2.bias"), vec![h]));
        }
        shapes
            .into_iter()
            .map(|(name, dims)| {
                let n: usize = dims.iter().product();
                // Norm weights near 1, everything else small, as in a trained model.
                let offset = if name.ends_with("norm1.weight")
                    || name.ends_with("norm2.weight")
                    || name.starts_with("final_layer_norm.weight")
                {
                    1.0
                } else {
                    0.0
                };
                let values: Vec<f64> = (0..n)
                    .map(|_| offset + rng.random_range(-0.5..0.5))
                    .collect();
                Ok((
                    name,
                    Var::from_tensor(&Tensor::from_vec(values, dims, &Device::Cpu)?)?,
                ))
            })
            .collect()
    }

    fn store(weights: &[(String, Var)], prefix: &str, with_position_ids: bool) -> WeightStore {
        let mut tensors: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.as_tensor().clone()))
            .collect();
        if with_position_ids {
            let ids = Tensor::arange(0i64, 6, &Device::Cpu).and_then(|t| t.unsqueeze(0));
            tensors.insert(
                format!("{prefix}embeddings.position_ids"),
                ids.expect("arange"),
            );
        }
        WeightStore::from_tensors("tiny clip", tensors, DType::F64, Device::Cpu)
    }

    fn ids() -> Result<Tensor> {
        Ok(Tensor::new(
            &[[10u32, 3, 4, 11, 11], [10, 7, 11, 0, 0]],
            &Device::Cpu,
        )?)
    }

    /// Records every path it is asked about; attaches `adapter` at `target`.
    #[derive(Default)]
    struct Recorder {
        paths: Mutex<Vec<String>>,
        target: Option<String>,
    }

    #[derive(Debug)]
    struct AddOne;
    impl Adapter for AddOne {
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            Ok(x.ones_like()?)
        }
    }

    impl AdapterProvider for Recorder {
        fn adapter_for(
            &self,
            module_path: &str,
            _kind: LayerKind,
        ) -> Result<Option<Arc<dyn Adapter>>> {
            self.paths
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
                .push(module_path.to_string());
            Ok(if self.target.as_deref() == Some(module_path) {
                Some(Arc::new(AddOne))
            } else {
                None
            })
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let config = config(2);
        let weights = random_weights(&config, 1)?;
        let store = store(&weights, "", false);
        let model = ClipTextModel::new(Scope::root(&store), &config)?;
        let ids = ids()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let proj: Vec<f64> = (0..2 * 5 * 8)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let proj = Tensor::from_vec(proj, (2, 5, 8), &Device::Cpu)?;
        let loss = || -> Result<Tensor> {
            let h = model.forward(&ids)?;
            let pooled = model.pooled(&h, &ids)?;
            Ok(((&h * &proj)?.sum_all()? + pooled.sqr()?.sum_all()?)?)
        };
        // k_proj.bias adds the same amount to every score of a row, which softmax cancels: its
        // true gradient is exactly zero, so it cannot be told apart from a dropped one.
        let vars: Vec<(String, Var)> = weights
            .into_iter()
            .filter(|(k, _)| !k.ends_with("k_proj.bias"))
            .collect();
        assert_eq!(vars.len(), 4 + 2 * 15);
        let failures = GradCheck::default().failures(loss, &vars)?;
        assert!(failures.is_empty(), "{failures:#?}");
        Ok(())
    }

    #[test]
    fn keys_with_or_without_the_prefix_build_the_same_model_and_adapter_paths() -> Result<()> {
        let config = config(2);
        let weights = random_weights(&config, 2)?;
        let mut outputs = Vec::new();
        let mut all_paths = Vec::new();
        for (prefix, outer) in [
            ("", ""),
            ("text_model.", ""),
            ("text_model.", "text_model"),
            ("te.", "te"),
        ] {
            let store = store(&weights, prefix, true);
            let recorder = Recorder::default();
            let root = Scope::root(&store).with_adapters(&recorder);
            let scope = if outer.is_empty() {
                root
            } else {
                root.pp(outer)
            };
            let model = ClipTextModel::new(scope, &config)?;
            store.check_all_used()?;
            outputs.push(model.forward(&ids()?)?);
            let paths = recorder.paths.lock().map(|p| p.clone()).unwrap_or_default();
            all_paths.push(paths);
        }
        for (paths, out) in all_paths.iter().zip(&outputs).skip(1).take(2) {
            assert_eq!(paths, &all_paths[0]);
            assert_eq!(max_diff(out, &outputs[0])?, 0.0);
        }
        // Built inside a scope of its own, the model's paths continue the caller's.
        let nested: Vec<String> = all_paths[0].iter().map(|p| format!("te.{p}")).collect();
        assert_eq!(all_paths[3], nested);
        assert_eq!(max_diff(&outputs[3], &outputs[0])?, 0.0);
        let expected: Vec<String> = (0..2)
            .flat_map(|i| {
                [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                    "mlp.fc1",
                    "mlp.fc2",
                ]
                .map(|m| format!("text_model.encoder.layers.{i}.{m}"))
            })
            .collect();
        assert_eq!(all_paths[0], expected);
        Ok(())
    }

    #[test]
    fn adapters_change_the_output_only_in_computed_layers() -> Result<()> {
        let config = config(2);
        let weights = random_weights(&config, 3)?;
        let store = store(&weights, "", false);
        let plain = ClipTextModel::new(Scope::root(&store), &config)?;
        let recorder = Recorder {
            target: Some("text_model.encoder.layers.1.self_attn.q_proj".into()),
            ..Default::default()
        };
        let adapted = ClipTextModel::new(Scope::root(&store).with_adapters(&recorder), &config)?;
        let ids = ids()?;
        assert!(max_diff(&plain.forward(&ids)?, &adapted.forward(&ids)?)? > 1e-3);
        // clip_skip 2 stops before layer 1: its adapter cannot matter.
        let skip_plain = plain.forward_with_clip_skip(&ids, 2)?;
        assert_eq!(
            max_diff(&skip_plain, &adapted.forward_with_clip_skip(&ids, 2)?)?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn clip_skip_is_the_output_of_fewer_layers_then_the_final_norm() -> Result<()> {
        let weights = random_weights(&config(3), 4)?;
        let store = store(&weights, "", false);
        let full = ClipTextModel::new(Scope::root(&store), &config(3))?;
        let ids = ids()?;
        for (skip, layers) in [(1, 3), (2, 2), (3, 1)] {
            let shorter = ClipTextModel::new(Scope::root(&store), &config(layers))?;
            assert_eq!(
                max_diff(
                    &full.forward_with_clip_skip(&ids, skip)?,
                    &shorter.forward(&ids)?
                )?,
                0.0
            );
        }
        assert!(max_diff(&full.forward_with_clip_skip(&ids, 2)?, &full.forward(&ids)?)? > 1e-3);
        for bad in [0, 4] {
            let err = full
                .forward_with_clip_skip(&ids, bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("clip_skip {bad}")) && err.contains("1..=3"),
                "{err}"
            );
        }
        Ok(())
    }

    #[test]
    fn attention_is_causal() -> Result<()> {
        let config = config(2);
        let store = store(&random_weights(&config, 5)?, "", false);
        let model = ClipTextModel::new(Scope::root(&store), &config)?;
        let a = model.forward(&Tensor::new(&[[10u32, 3, 4, 5, 11]], &Device::Cpu)?)?;
        let b = model.forward(&Tensor::new(&[[10u32, 3, 4, 5, 2]], &Device::Cpu)?)?;
        assert_eq!(max_diff(&a.narrow(1, 0, 4)?, &b.narrow(1, 0, 4)?)?, 0.0);
        assert!(max_diff(&a.narrow(1, 4, 1)?, &b.narrow(1, 4, 1)?)? > 1e-3);
        // And a token does see the ones before it.
        let c = model.forward(&Tensor::new(&[[10u32, 9, 4, 5, 11]], &Device::Cpu)?)?;
        assert!(max_diff(&a.narrow(1, 2, 1)?, &c.narrow(1, 2, 1)?)? > 1e-3);
        Ok(())
    }

    #[test]
    fn pooled_output_is_taken_at_the_first_eos_or_the_largest_id() -> Result<()> {
        let mut config = config(1);
        let store = store(&random_weights(&config, 6)?, "", false);
        let ids = Tensor::new(&[[10i64, 3, 4, 11, 11], [10, 11, 5, 0, 0]], &Device::Cpu)?;
        let model = ClipTextModel::new(Scope::root(&store), &config)?;
        let h = model.forward(&ids)?;
        let pooled = model.pooled(&h, &ids)?;
        assert_eq!(max_diff(&pooled.get(0)?, &h.get(0)?.get(3)?)?, 0.0);
        assert_eq!(max_diff(&pooled.get(1)?, &h.get(1)?.get(1)?)?, 0.0);
        config.eos_token_ids = vec![2];
        let legacy = ClipTextModel::new(Scope::root(&store), &config)?;
        let pooled = legacy.pooled(&h, &ids)?;
        assert_eq!(max_diff(&pooled.get(0)?, &h.get(0)?.get(3)?)?, 0.0);
        assert_eq!(max_diff(&pooled.get(1)?, &h.get(1)?.get(1)?)?, 0.0);
        let ids = Tensor::new(&[[10i64, 3, 4, 5, 5]], &Device::Cpu)?;
        let h = model.forward(&ids)?;
        assert_eq!(
            max_diff(&model.pooled(&h, &ids)?.get(0)?, &h.get(0)?.get(0)?)?,
            0.0,
            "no EOS: position 0"
        );
        assert_eq!(
            max_diff(&legacy.pooled(&h, &ids)?.get(0)?, &h.get(0)?.get(0)?)?,
            0.0,
            "largest id 10 at 0"
        );
        Ok(())
    }

    #[test]
    fn bad_inputs_and_checkpoints_are_named() -> Result<()> {
        let config = config(1);
        let weights = random_weights(&config, 8)?;
        let store = store(&weights, "", false);
        let model = ClipTextModel::new(Scope::root(&store), &config)?;
        let err = model
            .forward(&Tensor::new(&[[10u32, 12]], &Device::Cpu)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token id 12") && err.contains("12"), "{err}");
        let err = model
            .forward(&Tensor::zeros((1, 7), DType::U32, &Device::Cpu)?)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("7 tokens") && err.contains("6 positions"),
            "{err}"
        );
        let empty =
            WeightStore::from_tensors("te.safetensors", HashMap::new(), DType::F32, Device::Cpu);
        let err = ClipTextModel::new(Scope::root(&empty), &config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("te.safetensors")
                && err.contains("text_model.embeddings.token_embedding.weight"),
            "{err}"
        );
        let mut wide = config.clone();
        wide.hidden_size = 16;
        let err = ClipTextModel::new(Scope::root(&store), &wide)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embeddings.token_embedding.weight") && err.contains("[12, 16]"),
            "{err}"
        );
        Ok(())
    }
}
