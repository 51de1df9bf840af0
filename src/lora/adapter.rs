//! One LoRA adapter: `y = layer(x) + (alpha / rank) · up(down(dropout(x)))`.
//!
//! `down` starts kaiming-uniform (a = √5, torch's default for nn.Linear/nn.Conv2d, as kohya and
//! PEFT use) and `up` at zero, so a fresh adapter changes nothing. Both are `Var`s kept in the
//! network's master dtype (f32); a layer input in another dtype (f16/bf16 under mixed precision)
//! is cast in and the result cast back. On a linear layer `down` is `[rank, in]` and `up`
//! `[out, rank]`; on a convolution (kohya's LoCon) `down` is a convolution with the layer's own
//! kernel, stride and padding, `[rank, in, k, k]`, and `up` a 1×1 convolution `[out, rank, 1, 1]`.
//!
//! In training mode three regularisers may be active: `dropout` on the adapter's input (PEFT's
//! `lora_dropout`), kohya's `rank_dropout` (drops ranks per sample, rescaling by 1/(1−p)) and
//! `module_dropout` (skips the whole adapter for a step). Their masks come from a generator
//! derived from the run's seed, the module's name and the current (step, micro-batch), see
//! [`super::random`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::random::{self, purpose};
use super::targets::ModuleSpec;
use crate::nn::{Adapter, LayerKind, LowRank};
use crate::Result;

/// Training mode and position of a network, shared by all its adapters.
#[derive(Debug, Default)]
pub struct TrainingState {
    training: AtomicBool,
    /// Inference outside the loss (previews): the adapters give their weights detached, so
    /// nothing computed with them builds a graph for backward.
    inference: AtomicBool,
    step: AtomicU64,
    micro_batch: AtomicU64,
}

impl TrainingState {
    /// Dropout is active only in training mode.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::SeqCst);
    }

    /// Selects the dropout masks of optimizer step `step`, micro-batch `micro_batch`.
    pub fn set_step(&self, step: u64, micro_batch: u64) {
        self.step.store(step, Ordering::SeqCst);
        self.micro_batch.store(micro_batch, Ordering::SeqCst);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }

    /// Inference mode on or off (see [`TrainingState`]'s `inference`).
    pub fn set_inference(&self, inference: bool) {
        self.inference.store(inference, Ordering::SeqCst);
    }

    pub fn is_inference(&self) -> bool {
        self.inference.load(Ordering::SeqCst)
    }

    fn position(&self) -> (u64, u64) {
        (
            self.step.load(Ordering::SeqCst),
            self.micro_batch.load(Ordering::SeqCst),
        )
    }
}

/// The three dropout probabilities of an adapter (each in [0, 1)).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dropout {
    /// On the adapter's input, element-wise.
    pub input: f64,
    /// On the adapter's rank dimension, per sample (kohya's `rank_dropout`).
    pub rank: f64,
    /// Skip the whole adapter (kohya's `module_dropout`).
    pub module: f64,
}

impl Dropout {
    fn any(&self) -> bool {
        self.input > 0.0 || self.rank > 0.0 || self.module > 0.0
    }
}

/// A LoRA adapter attached to one Linear or Conv2d layer.
#[derive(Debug)]
pub struct LoraAdapter {
    spec: ModuleSpec,
    down: Var,
    up: Var,
    dropout: Dropout,
    state: Arc<TrainingState>,
    /// The run's seed mixed with the module name: the root of this adapter's generators.
    stream: u64,
}

impl LoraAdapter {
    /// A fresh adapter: `down` kaiming-uniform from a generator seeded by `seed` and the module
    /// name, `up` zero, both `dtype` on `device`.
    pub fn new(
        spec: ModuleSpec,
        seed: u64,
        dropout: Dropout,
        state: Arc<TrainingState>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let stream = stream(seed, &spec.kohya_name());
        let mut rng = random::generator(&[stream, purpose::INIT]);
        let down = random::kaiming_uniform(&mut rng, &spec.down_shape(), dtype, device)?;
        let up = Tensor::zeros(spec.up_shape(), dtype, device)?;
        Ok(LoraAdapter {
            down: Var::from_tensor(&down)?,
            up: Var::from_tensor(&up)?,
            spec,
            dropout,
            state,
            stream,
        })
    }

    /// Replaces both matrices (converted to the adapter's dtype and device).
    pub fn set_weights(&self, down: &Tensor, up: &Tensor) -> Result<()> {
        let (dtype, device) = (self.down.dtype(), self.down.device().clone());
        self.down.set(&down.to_dtype(dtype)?.to_device(&device)?)?;
        self.up.set(&up.to_dtype(dtype)?.to_device(&device)?)?;
        Ok(())
    }

    /// Where the adapter sits, its rank and alpha.
    pub fn spec(&self) -> &ModuleSpec {
        &self.spec
    }

    /// `lora_down`.
    pub fn down(&self) -> &Var {
        &self.down
    }

    /// `lora_up`.
    pub fn up(&self) -> &Var {
        &self.up
    }

    /// The change the adapter makes to the layer's weight, `(alpha / rank) · up · down`, in the
    /// weight's shape (`[out, in]` or `[out, in, k, k]`): what merging it into the layer adds.
    pub fn weight_delta(&self) -> Result<Tensor> {
        let down = self.down.as_tensor();
        let up = self.up.as_tensor();
        let rank = self.spec.rank;
        let up2 = up.reshape((up.dim(0)?, rank))?;
        let down2 = down.reshape((rank, down.elem_count() / rank))?;
        let delta = (up2.matmul(&down2)? * self.spec.scale())?;
        let mut dims = vec![up.dim(0)?];
        dims.extend_from_slice(&down.dims()[1..]);
        Ok(delta.reshape(dims)?)
    }

    /// `(down, up)` as the forward pass uses them: the trainable variables, or in inference
    /// mode detached views of them (same storage, no graph).
    fn weights(&self) -> (Tensor, Tensor) {
        let (down, up) = (self.down.as_tensor(), self.up.as_tensor());
        if self.state.is_inference() {
            (down.detach(), up.detach())
        } else {
            (down.clone(), up.clone())
        }
    }

    /// `down` applied to `h`: `[..., in]` → `[..., rank]`, or `[B, in, H, W]` →
    /// `[B, rank, H', W']`.
    fn down_forward(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self.spec.layer {
            LayerKind::Linear { .. } => linear(h, w),
            LayerKind::Conv2d {
                kernel: 1,
                stride: 1,
                padding: 0,
                ..
            } => pointwise(h, w),
            LayerKind::Conv2d {
                stride, padding, ..
            } => Ok(h.conv2d(w, padding, stride, 1, 1)?),
        }
    }

    /// `up` applied to the hidden state: `[..., rank]` → `[..., out]`, or `[B, rank, H', W']` →
    /// `[B, out, H', W']`.
    fn up_forward(&self, hidden: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self.spec.layer {
            LayerKind::Linear { .. } => linear(hidden, w),
            LayerKind::Conv2d { .. } => pointwise(hidden, w),
        }
    }

    /// The layer output's shape for input `x` (what a skipped adapter adds zeros of).
    fn output_dims(&self, x: &Tensor) -> Result<Vec<usize>> {
        let mut dims = x.dims().to_vec();
        match self.spec.layer {
            LayerKind::Linear { out_features, .. } => {
                if let Some(last) = dims.last_mut() {
                    *last = out_features;
                }
            }
            LayerKind::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } => {
                let (b, _, h, w) = x.dims4()?;
                let size = |n: usize| (n + 2 * padding).saturating_sub(kernel) / stride + 1;
                dims = vec![b, out_channels, size(h), size(w)];
            }
        }
        Ok(dims)
    }

    /// The rank-dropout mask for `hidden`: one keep/drop per (sample, rank), broadcast over the
    /// tokens or pixels.
    fn rank_mask(&self, rng: &mut ChaCha8Rng, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims();
        let rank = self.spec.rank;
        let mask_dims: Vec<usize> = match self.spec.layer {
            LayerKind::Linear { .. } if dims.len() >= 2 => {
                let mut m = vec![1; dims.len()];
                m[0] = dims[0];
                m[dims.len() - 1] = rank;
                m
            }
            LayerKind::Linear { .. } => vec![rank],
            LayerKind::Conv2d { .. } => vec![dims[0], rank, 1, 1],
        };
        let p = self.dropout.rank;
        let mask = random::keep_mask(rng, mask_dims, p, hidden.dtype(), hidden.device())?;
        // keep_mask rescales by 1/(1−p); kohya folds that factor into the scale instead, which
        // is the same product.
        Ok(mask)
    }
}

impl Adapter for LoraAdapter {
    /// `lora_down` and `lora_up` (none in inference mode: nothing is trained then).
    fn trainable_vars(&self) -> Vec<Var> {
        if self.state.is_inference() {
            return Vec::new();
        }
        vec![self.down.clone(), self.up.clone()]
    }

    /// A linear adapter whose dropouts are all off (or not in training) is a plain low-rank
    /// product; the layer fuses it (same maths, fewer tensors kept for backward).
    fn low_rank(&self) -> Option<LowRank> {
        let dropping = self.state.is_training() && self.dropout.any();
        match self.spec.layer {
            LayerKind::Linear { .. } if !dropping => {
                let (down, up) = self.weights();
                Some(LowRank {
                    down,
                    up,
                    scale: self.spec.scale(),
                })
            }
            _ => None,
        }
    }

    /// `x`: the layer's input (`[..., in]` or `[B, in, H, W]`, any float dtype) → the adapter's
    /// contribution in the layer output's shape and `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _t = crate::nn::profile::scope("lora adapter");
        let d = self.dropout;
        let mut rng = (self.state.is_training() && d.any()).then(|| {
            let (step, micro_batch) = self.state.position();
            random::generator(&[self.stream, purpose::DROPOUT, step, micro_batch])
        });
        if let Some(rng) = rng.as_mut() {
            if d.module > 0.0 && rng.random::<f64>() < d.module {
                return Ok(Tensor::zeros(self.output_dims(x)?, x.dtype(), x.device())?);
            }
        }
        let dtype = self.down.dtype();
        let mut h = x.to_dtype(dtype)?;
        if let (Some(rng), true) = (rng.as_mut(), d.input > 0.0) {
            let mask = random::keep_mask(rng, h.shape().clone(), d.input, dtype, h.device())?;
            h = (h * mask)?;
        }
        let (down, up) = self.weights();
        let mut hidden = self.down_forward(&h, &down)?;
        if let (Some(rng), true) = (rng.as_mut(), d.rank > 0.0) {
            let mask = self.rank_mask(rng, &hidden)?;
            hidden = hidden.broadcast_mul(&mask)?;
        }
        let out = self.up_forward(&hidden, &up)?;
        Ok((out * self.spec.scale())?.to_dtype(x.dtype())?)
    }
}

/// The root of a module's generators: the run's seed and the module's kohya name.
fn stream(seed: u64, name: &str) -> u64 {
    random::name_hash(name) ^ seed.rotate_left(17)
}

/// `x: [..., in]`, `w: [n, in]` → `x wᵀ: [..., n]`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    Ok(y.reshape(out_dims)?)
}

/// A 1×1 convolution as a matrix product: `x: [B, in, H, W]`, `w: [n, in, 1, 1]` →
/// `[B, n, H, W]`.
fn pointwise(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let n = w.dim(0)?;
    let w2 = w.reshape((n, c))?;
    let y = w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?;
    Ok(y.reshape((b, n, h, wd))?)
}
