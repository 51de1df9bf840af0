//! Decoder-only language models of the Llama family — Llama (2, 3, 3.x), Mistral, Qwen2 (2.5)
//! and Qwen3 — as transformers builds them, for LoRA training with a real backward (the LLM
//! task, issue 16).
//!
//! Module paths mirror transformers' (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
//! `model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`), so a weight key, a PEFT key and an
//! adapter's module path are one word. Every linear layer is [`crate::nn::Linear`] (frozen
//! custom ops on the CPU, LoRA through the scope's adapter provider). On the CPU in f32 the
//! norms, rotary embeddings, SwiGLU, causal attention and the loss are fused ops with their own
//! backward ([`crate::nn::fused_norm`], [`crate::nn::rotary`], [`crate::nn::swiglu`],
//! [`crate::nn::mem_attention`], [`crate::nn::cross_entropy`]), which keep no score matrix and
//! few intermediates; elsewhere (CUDA, half precision) they are composed from candle ops whose
//! backward candle implements. Heads stay in the projections' `[B, T, heads·d]` layout.
//! What differs between the architectures is in [`CausalLmConfig`]: biases, Qwen3's q/k norms,
//! Llama 3's rotary scaling, grouped key/value heads, tied embeddings.

pub mod config;
pub mod folder;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

pub use config::{CausalLmConfig, LmArchitecture, RopeScaling, SUPPORTED};
pub use folder::LmFolder;

use crate::nn::cross_entropy::cross_entropy;
use crate::nn::recompute::recompute;
use crate::nn::rotary::RotaryTable;
use crate::nn::{activation, fused_norm, mem_attention, swiglu, Linear, Scope};
use crate::Result;

/// transformers' `LlamaRMSNorm` (and its twins): `weight · x / √(mean(x²) + ε)`, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(scope: Scope, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: scope.get("weight", dim)?,
            eps,
        })
    }

    /// `x: [..., dim]` → the same shape and dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _t = crate::nn::profile::scope("rms norm");
        if fused_norm::rms_applies(x, &self.weight) {
            return fused_norm::rms_norm(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_mul(&(mean_square + self.eps)?.sqrt()?.recip()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// The rotary position embedding's frequencies (`inv_freq`), per pair of a head's channels.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    fn new(config: &CausalLmConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta;
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } = config.rope_scaling
        {
            // transformers' `_compute_llama3_parameters`.
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_freq_wavelen {
                    *f /= factor;
                } else if wavelen >= high_freq_wavelen {
                    let smooth = (old_len / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        Rotary {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// The angles of positions `start..start + len`.
    fn table(&self, start: usize, len: usize) -> RotaryTable {
        RotaryTable::new(&self.inv_freq, start, len)
    }
}

/// `[Tq, Tk]` for the last `Tq` of `Tk` positions: 0 where a query may attend (its own
/// position and earlier ones), −∞ after it.
fn causal_mask(tq: usize, tk: usize, device: &Device) -> Result<Tensor> {
    let past = tk - tq;
    let values: Vec<f32> = (0..tq)
        .flat_map(|i| {
            (0..tk).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(values, (tq, tk), device)?)
}

/// The keys and values of the tokens generated so far, per layer (rotated keys and values,
/// `[B, T, kv_heads·d]`), so that each new token runs through the model alone: what
/// transformers' `DynamicCache` holds.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// The number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `self_attn`: q/k/v projections (grouped key/value heads), rotary positions, causal softmax
/// attention, `o_proj`.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head norms.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(scope: Scope, c: &CausalLmConfig) -> Result<Self> {
        let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let hidden = c.hidden_size;
        let norms = c.architecture == LmArchitecture::Qwen3;
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            norms
                .then(|| RmsNorm::new(scope.pp(name), d, c.rms_norm_eps))
                .transpose()
        };
        Ok(Attention {
            q_proj: Linear::new(scope.pp("q_proj"), hidden, h * d, c.qkv_bias)?,
            k_proj: Linear::new(scope.pp("k_proj"), hidden, kv * d, c.qkv_bias)?,
            v_proj: Linear::new(scope.pp("v_proj"), hidden, kv * d, c.qkv_bias)?,
            o_proj: Linear::new(scope.pp("o_proj"), h * d, hidden, c.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x: [B, T, hidden]` → `[B, T, hidden]`; `rope` holds the T positions' angles. With a
    /// `cache` slot, the keys and values held there come first (the T tokens follow them) and
    /// the slot gets the new ones.
    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryTable,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        // `[B, T, n·d]`, through the per-head norm when there is one.
        let project = |proj: &Linear, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = proj.forward(x)?;
            match norm {
                Some(norm) => {
                    Ok(norm
                        .forward(&y.reshape((b, t, n, d))?)?
                        .reshape((b, t, n * d))?)
                }
                None => Ok(y),
            }
        };
        let q = rope.apply(&project(&self.q_proj, self.heads, &self.q_norm)?)?;
        let k = rope.apply(&project(&self.k_proj, self.kv_heads, &self.k_norm)?)?;
        let v = self.v_proj.forward(x)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((past_k, past_v)) => (
                        Tensor::cat(&[&past_k, &k], 1)?,
                        Tensor::cat(&[&past_v, &v], 1)?,
                    ),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let scale = 1.0 / (d as f64).sqrt();
        let out = if mem_attention::applies(&q) {
            let (h, kv) = (self.heads, self.kv_heads);
            mem_attention::causal_attention(&q, &k, &v, h, kv, scale)?
        } else {
            self.attend_with_candle_ops(&q, &k, &v, scale)?
        };
        self.o_proj.forward(&out)
    }

    /// Causal attention from candle ops (CUDA, half precision): `q: [B, Tq, heads·d]` (the last
    /// Tq positions), `k, v: [B, Tk, kv_heads·d]` → `[B, Tq, heads·d]`, the scores soft-maxed
    /// in f32.
    fn attend_with_candle_ops(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let _t = crate::nn::profile::scope("attention");
        let (b, t, _) = q.dims3()?;
        let tk = k.dim(1)?;
        let d = self.head_dim;
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            let len = y.dim(1)?;
            Ok(y.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        // Each key/value head serves `heads / kv_heads` query heads.
        let group = self.heads / self.kv_heads;
        let repeat = |y: Tensor| -> Result<Tensor> {
            if group == 1 {
                return Ok(y);
            }
            Ok(y.unsqueeze(2)?
                .broadcast_as((b, self.kv_heads, group, tk, d))?
                .reshape((b, self.heads, tk, d))?)
        };
        let q = heads(q, self.heads)?;
        let k = repeat(heads(k, self.kv_heads)?)?;
        let v = repeat(heads(v, self.kv_heads)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores =
            scores
                .to_dtype(DType::F32)?
                .broadcast_add(&causal_mask(t, tk, q.device())?)?;
        let probs = activation::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?;
        Ok(out.transpose(1, 2)?.reshape((b, t, self.heads * d))?)
    }
}

/// `mlp`: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(scope: Scope, c: &CausalLmConfig) -> Result<Self> {
        let (hidden, inner, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Mlp {
            gate_proj: Linear::new(scope.pp("gate_proj"), hidden, inner, bias)?,
            up_proj: Linear::new(scope.pp("up_proj"), hidden, inner, bias)?,
            down_proj: Linear::new(scope.pp("down_proj"), inner, hidden, bias)?,
        })
    }

    /// `x: [B, T, hidden]` → `[B, T, hidden]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        self.down_proj.forward(&swiglu::swiglu(&gate, &up)?)
    }
}

/// `model.layers.N`: pre-norm attention and MLP, each added to the residual stream.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// The LoRA matrices of the layer's projections.
    fn trainable_vars(&self) -> Vec<Var> {
        let a = &self.self_attn;
        let m = &self.mlp;
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
        .iter()
        .flat_map(|l| l.trainable_vars())
        .collect()
    }

    fn new(scope: Scope, c: &CausalLmConfig) -> Result<Self> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::new(
                scope.pp("input_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            self_attn: Attention::new(scope.pp("self_attn"), c)?,
            post_attention_layernorm: RmsNorm::new(
                scope.pp("post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            mlp: Mlp::new(scope.pp("mlp"), c)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryTable,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, cache)?;
        let x = (x + attended)?;
        let fed = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + fed)?)
    }
}

/// A `…ForCausalLM`: token embeddings, decoder layers, final norm, `lm_head`.
#[derive(Debug, Clone)]
pub struct CausalLm {
    /// Kept as a weight matrix (in bf16 under `mixed_precision: bf16` on the CPU): it is also
    /// the tied `lm_head`, the largest product of the step.
    embed_tokens: Tensor,
    /// The dtype activations are computed in.
    dtype: DType,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head`, or the token embeddings again when they are tied.
    lm_head: Linear,
    rotary: Rotary,
    config: CausalLmConfig,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl CausalLm {
    /// Builds the model from the weights under `scope` (the checkpoint's root: `model.…`,
    /// `lm_head.weight`); the scope's adapter provider decides which linear layers get LoRA.
    pub fn new(scope: Scope, config: &CausalLmConfig) -> Result<Self> {
        let model = scope.pp("model");
        let embed_tokens = model
            .pp("embed_tokens")
            .get_matrix("weight", (config.vocab_size, config.hidden_size))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(model.pp("layers").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(model.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            Linear::from_weights(embed_tokens.clone(), None)
        } else {
            Linear::new(
                scope.pp("lm_head"),
                config.hidden_size,
                config.vocab_size,
                false,
            )?
        };
        Ok(CausalLm {
            embed_tokens,
            dtype: scope.store().dtype(),
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config),
            config: config.clone(),
            gradient_checkpointing: false,
        })
    }

    /// `gradient_checkpointing`: each decoder layer keeps only its input for backward and runs
    /// again there (about a third more compute, a fraction of the activation memory).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn config(&self) -> &CausalLmConfig {
        &self.config
    }

    /// Token ids `[B, T]` (u32) → logits `[B, T, vocab]` in f32; position `t` sees tokens `0..=t`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.hidden_states(ids)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Logits `[B, vocab]` (f32) after the last of `ids: [B, T]`, the tokens that follow those
    /// held in `cache` (which then holds these too): generation one token at a time without
    /// running the earlier ones again. `lm_head` runs on the last position only.
    pub fn next_logits(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let mut x = self.embed(ids)?;
        let rope = self.rotary.table(cache.len, t);
        cache.layers.resize(self.layers.len(), None);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &rope, Some(slot))?;
        }
        cache.len += t;
        let last = self.norm.forward(&x.narrow(1, t - 1, 1)?)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }

    /// [`causal_lm_loss`] of [`CausalLm::forward`]'s logits, computed with `lm_head` applied to
    /// the labelled positions only: the same value, without the `[B, T, vocab]` logits (151,936
    /// columns for Qwen2.5) of the prompt and padding positions. `None` when nothing is labelled.
    pub fn loss(&self, ids: &Tensor, labels: &[Vec<i64>]) -> Result<Option<Tensor>> {
        let x = self.hidden_states(ids)?;
        let (b, t, hidden) = x.dims3()?;
        let vocab = self.config.vocab_size;
        let Some((rows, targets)) = labelled_rows(labels, b, t, vocab, x.device())? else {
            return Ok(None);
        };
        let picked = x.reshape((b * t, hidden))?.index_select(&rows, 0)?;
        let logits = self.lm_head.forward(&picked)?;
        let _t = crate::nn::profile::scope("cross entropy");
        Ok(Some(cross_entropy(&logits, &targets)?))
    }

    /// The token embeddings `[B, T, hidden]` of ids `[B, T]`, in the compute dtype.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.dtype)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// The final norm's output `[B, T, hidden]` for token ids `[B, T]`.
    fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let device = ids.device();
        let mut x = self.embed(ids)?;
        let rope = self.rotary.table(0, t);
        // The recomputed segment's side input: nothing the layer reads (the angles are captured).
        let side = Tensor::zeros(1, x.dtype(), device)?;
        for layer in &self.layers {
            x = if self.gradient_checkpointing {
                let params = layer.trainable_vars();
                let (layer, rope) = (layer.clone(), rope.clone());
                let segment = move |x: &Tensor, _: &Tensor| -> Result<Tensor> {
                    layer.forward(x, &rope, None)
                };
                recompute(&x, &side, &params, Arc::new(segment))?
            } else {
                layer.forward(&x, &rope, None)?
            };
        }
        self.norm.forward(&x)
    }
}

/// transformers' causal-LM loss: the logits at position `t` predict the label at `t + 1`;
/// positions labelled −100 (prompt, padding) do not count; the mean over the labelled tokens of
/// the whole batch. `logits: [B, T, V]`, `labels: [B][T]`. `None` when no token is labelled.
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<Option<Tensor>> {
    let (b, t, v) = logits.dims3()?;
    let Some((rows, targets)) = labelled_rows(labels, b, t, v, logits.device())? else {
        return Ok(None);
    };
    let picked = logits.reshape((b * t, v))?.index_select(&rows, 0)?;
    Ok(Some(cross_entropy(&picked, &targets)?))
}

/// The flat rows `i·T + t − 1` whose logits predict a labelled token `labels[i][t]` (t ≥ 1), and
/// those tokens; `None` when no token is labelled. A label outside the vocabulary of
/// `vocab` tokens is an error.
fn labelled_rows(
    labels: &[Vec<i64>],
    b: usize,
    t: usize,
    vocab: usize,
    device: &Device,
) -> Result<Option<(Tensor, Vec<u32>)>> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate().take(b) {
        for (j, &label) in row.iter().enumerate().take(t).skip(1) {
            if label >= 0 {
                if label as usize >= vocab {
                    return Err(candle_core::Error::Msg(format!(
                        "label {label} is outside the vocabulary of {vocab} tokens"
                    ))
                    .into());
                }
                rows.push((i * t + j - 1) as u32);
                targets.push(label as u32);
            }
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let n = rows.len();
    Ok(Some((Tensor::from_vec(rows, n, device)?, targets)))
}
