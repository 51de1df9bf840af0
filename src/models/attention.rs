//! Attention, the transformer blocks and Transformer2DModel.
//!
//! [`scaled_dot_product_attention`] is the single place where attention is computed: on the CPU
//! in f32/f64 by the memory-efficient kernel of [`crate::nn::mem_attention`], otherwise naively
//! from matmul and our own softmax (`candle_nn`'s softmax and `sdpa` have no backward,
//! DESIGN.md §7).

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use crate::nn::recompute::{recompute, Segment};
use crate::nn::{activation, Conv2d, ConvConfig, GroupNorm, LayerNorm, Linear, Scope};
use crate::Result;

/// `softmax(q kᵀ / √d) v` per head.
///
/// `q: [B, Nq, heads·d]`, `k, v: [B, Nk, heads·d]` → `[B, Nq, heads·d]`. When `upcast` is set
/// (diffusers' `upcast_attention`), the scores are computed in f32 even for f16/bf16 inputs; the
/// softmax is always computed in f32 at least.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = inner / heads;
    crate::nn::flops::add_attention(4 * (b * nq * nk * inner) as u64);
    let scale = (d as f64).powf(-0.5);
    if crate::nn::mem_attention::applies(q) {
        return crate::nn::mem_attention::attention(q, k, v, heads, scale);
    }
    if crate::nn::chunked_attention::applies(q) {
        return crate::nn::chunked_attention::attention(q, k, v, heads, scale, upcast);
    }
    let split = |t: &Tensor, n: usize| -> Result<Tensor> {
        Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
    let dtype = q.dtype();
    let (q, k) = if upcast && !matches!(dtype, DType::F32 | DType::F64) {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q, k)
    };
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let probs = activation::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    let out = probs.matmul(&v)?;
    Ok(out.transpose(1, 2)?.reshape((b, nq, inner))?)
}

/// diffusers' `Attention` as the UNet's transformer blocks use it: `to_q`, `to_k`, `to_v`,
/// `to_out.0`, self-attention when no context is given.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

/// Shape of an [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    /// Width of the queries (and of the output).
    pub query_dim: usize,
    /// Width of the keys/values' source; `None` for self-attention.
    pub context_dim: Option<usize>,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether `to_q`, `to_k`, `to_v` have a bias (`to_out.0` always has one).
    pub qkv_bias: bool,
    pub upcast: bool,
}

impl Attention {
    /// Reads `to_q`, `to_k`, `to_v` and `to_out.0` from `scope`.
    pub fn new(scope: Scope, c: AttentionConfig) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let context = c.context_dim.unwrap_or(c.query_dim);
        Ok(Attention {
            to_q: Linear::new(scope.pp("to_q"), c.query_dim, inner, c.qkv_bias)?,
            to_k: Linear::new(scope.pp("to_k"), context, inner, c.qkv_bias)?,
            to_v: Linear::new(scope.pp("to_v"), context, inner, c.qkv_bias)?,
            to_out: Linear::new(scope.pp("to_out").pp(0), inner, c.query_dim, true)?,
            heads: c.heads,
            upcast: c.upcast,
        })
    }

    /// The trainable tensors of the adapters on the four projections.
    pub fn trainable_vars(&self) -> Vec<Var> {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
            .iter()
            .flat_map(|l| l.trainable_vars())
            .collect()
    }

    /// `x: [B, N, query_dim]`, `context: [B, T, context_dim]` (or `None`: attend to `x`) →
    /// `[B, N, query_dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let h = self.attend(x, context)?;
        self.to_out.forward(&h)
    }

    /// `forward(x, context) + residual`, the output projection and the sum in one op where the
    /// layers allow it.
    pub fn forward_add(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let h = self.attend(x, context)?;
        self.to_out.forward_add(&h, residual)
    }

    /// The attention's output before `to_out`, `[B, N, heads·head_dim]`.
    fn attend(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        scaled_dot_product_attention(&q, &k, &v, self.heads, self.upcast)
    }
}

/// diffusers' `FeedForward` with GEGLU: `net.2(a · gelu(g))` where `[a | g] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    /// `dim → 2·(4·dim)` (`net.0.proj`) and `4·dim → dim` (`net.2`).
    pub fn new(scope: Scope, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let net = scope.pp("net");
        Ok(FeedForward {
            proj: Linear::new(net.pp(0).pp("proj"), dim, 2 * inner, true)?,
            out: Linear::new(net.pp(2), inner, dim, true)?,
            inner,
        })
    }

    /// The trainable tensors of the adapters on both layers.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut vars = self.proj.trainable_vars();
        vars.extend(self.out.trainable_vars());
        vars
    }

    /// `x: [B, N, dim]` → `[B, N, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `forward(x) + residual`, the sum fused into the last op where the layers allow it.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Some(residual))
    }

    fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let add = |y: Tensor| -> Result<Tensor> {
            Ok(match residual {
                Some(r) => (y + r)?,
                None => y,
            })
        };
        if crate::nn::geglu::applies(&h) {
            let (w, b) = (self.out.weight(), self.out.bias());
            if self.out.adapter().is_none() && crate::nn::frozen::applies_to(&h, w, b) {
                crate::nn::flops::add_dense(2 * (h.elem_count() / 2 * w.dim(0)?) as u64);
                return crate::nn::geglu::geglu_linear(&h, w, b, residual);
            }
            let g = crate::nn::geglu::geglu(&h)?;
            return match residual {
                Some(r) => self.out.forward_add(&g, r),
                None => self.out.forward(&g),
            };
        }
        if crate::nn::geglu::generic_applies(&h) {
            let (w, b) = (self.out.weight(), self.out.bias());
            if self.out.adapter().is_none() && crate::nn::frozen_generic::applies_to(&h, w, b) {
                crate::nn::flops::add_dense(2 * (h.elem_count() / 2 * w.dim(0)?) as u64);
                return crate::nn::geglu::geglu_linear_generic(&h, w, b, residual);
            }
            let g = crate::nn::geglu::geglu_generic(&h)?;
            return match residual {
                Some(r) => self.out.forward_add(&g, r),
                None => self.out.forward(&g),
            };
        }
        let last = h.rank() - 1;
        let (value, gate) = (
            h.narrow(last, 0, self.inner)?,
            h.narrow(last, self.inner, self.inner)?,
        );
        let hidden = {
            let _t = crate::nn::profile::scope("geglu");
            (value * activation::gelu(&gate)?)?
        };
        add(self.out.forward(&hidden)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU
/// feed-forward, each with a residual).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// A block of width `dim = heads · head_dim` attending to a context of `cross_attention_dim`.
    pub fn new(
        scope: Scope,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let dim = heads * head_dim;
        let attn = |name: &str, context_dim| {
            Attention::new(
                scope.pp(name),
                AttentionConfig {
                    query_dim: dim,
                    context_dim,
                    heads,
                    head_dim,
                    qkv_bias: false,
                    upcast,
                },
            )
        };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(scope.pp("norm1"), dim, 1e-5)?,
            attn1: attn("attn1", None)?,
            norm2: LayerNorm::new(scope.pp("norm2"), dim, 1e-5)?,
            attn2: attn("attn2", Some(cross_attention_dim))?,
            norm3: LayerNorm::new(scope.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(scope.pp("ff"), dim)?,
        })
    }

    /// The trainable tensors of the adapters inside the block.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut vars = self.attn1.trainable_vars();
        vars.extend(self.attn2.trainable_vars());
        vars.extend(self.ff.trainable_vars());
        vars
    }

    /// `x: [B, N, dim]`, `context: [B, T, cross_attention_dim]` → `[B, N, dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward_add(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_add(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward_add(&self.norm3.forward(&x)?, &x)
    }
}

/// `proj_in`/`proj_out` of a [`Transformer2DModel`]: a 1×1 convolution (SD1) or a linear layer
/// (`use_linear_projection`, SD2).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn trainable_vars(&self) -> Vec<Var> {
        match self {
            Projection::Conv(c) => c.trainable_vars(),
            Projection::Linear(l) => l.trainable_vars(),
        }
    }

    fn new(scope: Scope, in_dim: usize, out_dim: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(scope, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(Conv2d::new(
                scope,
                in_dim,
                out_dim,
                1,
                ConvConfig::same(1),
                true,
            )?)
        })
    }
}

/// Shape of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub norm_groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// diffusers' `Transformer2DModel` on continuous input: group norm, `proj_in`, the
/// `transformer_blocks`, `proj_out`, plus the input as residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    /// Recompute this model in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl Transformer2DModel {
    /// Reads `norm`, `proj_in`, `transformer_blocks.{i}`, `proj_out` from `scope`.
    pub fn new(scope: Scope, c: Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let blocks = scope.pp("transformer_blocks");
        let transformer_blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    blocks.pp(i),
                    c.heads,
                    c.head_dim,
                    c.cross_attention_dim,
                    c.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: GroupNorm::new(scope.pp("norm"), c.norm_groups, c.in_channels, 1e-6)?,
            proj_in: Projection::new(
                scope.pp("proj_in"),
                c.in_channels,
                inner,
                c.use_linear_projection,
            )?,
            transformer_blocks,
            proj_out: Projection::new(
                scope.pp("proj_out"),
                inner,
                c.in_channels,
                c.use_linear_projection,
            )?,
            gradient_checkpointing: false,
        })
    }

    /// Turns gradient checkpointing of this model on or off.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// The trainable tensors of the adapters inside this model.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut vars = self.proj_in.trainable_vars();
        for block in &self.transformer_blocks {
            vars.extend(block.trainable_vars());
        }
        vars.extend(self.proj_out.trainable_vars());
        vars
    }

    /// `x: [B, C, H, W]`, `context: [B, T, cross_attention_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        if self.gradient_checkpointing {
            let model = self.clone();
            let f: Arc<Segment> = Arc::new(move |x: &Tensor, c: &Tensor| model.run(x, c));
            recompute(x, context, &self.trainable_vars(), f)
        } else {
            self.run(x, context)
        }
    }

    fn run(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            Ok(t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => return conv.forward_add(&to_image(&tokens)?, x),
            Projection::Linear(linear) => to_image(&linear.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}

/// The VAE's single-head self-attention over pixels (diffusers' `Attention` built with
/// `_from_deprecated_attn_block`): `group_norm`, `to_q/k/v` and `to_out.0` with biases, the input
/// as residual, and the sum divided by `rescale_output_factor`.
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attention: Attention,
    rescale_output_factor: f64,
}

impl SpatialSelfAttention {
    /// One head of width `channels` (the VAE's `attention_head_dim` is its channel count).
    pub fn new(
        scope: Scope,
        channels: usize,
        groups: usize,
        eps: f64,
        rescale_output_factor: f64,
    ) -> Result<Self> {
        let c = AttentionConfig {
            query_dim: channels,
            context_dim: None,
            heads: 1,
            head_dim: channels,
            qkv_bias: true,
            upcast: false,
        };
        Ok(SpatialSelfAttention {
            group_norm: GroupNorm::new(scope.pp("group_norm"), groups, channels, eps)?,
            attention: Attention::new(scope, c)?,
            rescale_output_factor,
        })
    }

    /// `x: [B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let out = self.attention.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        let out = (out + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.rescale_output_factor)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Attention written out naively, one head at a time, in f64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let d = q.dim(2)? / heads;
        let mut outs = Vec::new();
        for head in 0..heads {
            let (qh, kh, vh) = (
                q.narrow(2, head * d, d)?,
                k.narrow(2, head * d, d)?,
                v.narrow(2, head * d, d)?,
            );
            let s = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?;
            let e = s.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            outs.push(p.matmul(&vh)?);
        }
        Ok(Tensor::cat(&outs, 2)?)
    }

    #[test]
    fn attention_matches_the_per_head_definition() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f64, 1., (2, 5, 6), &dev)?;
        let k = Tensor::randn(0f64, 1., (2, 7, 6), &dev)?;
        let v = Tensor::randn(0f64, 1., (2, 7, 6), &dev)?;
        for heads in [1, 2, 3] {
            let got = scaled_dot_product_attention(&q, &k, &v, heads, false)?;
            let want = reference(&q, &k, &v, heads)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{heads} heads: {diff}");
        }
        // Upcasting f16 inputs gives the f32 result up to f16 rounding of the output.
        let (qh, kh, vh) = (
            q.to_dtype(DType::F16)?,
            k.to_dtype(DType::F16)?,
            v.to_dtype(DType::F16)?,
        );
        let up = scaled_dot_product_attention(&qh, &kh, &vh, 2, true)?;
        assert_eq!(up.dtype(), DType::F16);
        let want = reference(&q, &k, &v, 2)?;
        let diff = (up.to_dtype(DType::F64)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-2, "{diff}");
        Ok(())
    }
}
