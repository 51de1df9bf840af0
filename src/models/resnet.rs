//! ResnetBlock2D and the up/down samplers shared by the UNet and the VAE.
//!
//! candle facts this file works around (DESIGN.md §7): `upsample_nearest2d` overwrites instead of
//! accumulating in backward, so nearest upsampling is built from `broadcast_as` + `reshape` (or
//! `index_select` for sizes that are not an exact doubling), both of which have exact gradients.
//! candle's conv2d with stride 2 fails in backward when H and W differ in parity; latents whose
//! sides are multiples of 8 (images that are multiples of 64 px) never hit it.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use crate::nn::recompute::{recompute, Segment};
use crate::nn::{activation, Conv2d, ConvConfig, GroupNorm, Linear, Scope};
use crate::Result;

/// Shape of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for blocks without one (the VAE's).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The output is divided by this (diffusers' `output_scale_factor`).
    pub output_scale_factor: f64,
}

/// diffusers' `ResnetBlock2D` (pre-norm, `time_embedding_norm = "default"`, SiLU):
/// `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    /// Recompute this block in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl ResnetBlock2D {
    /// Reads `norm1`, `conv1`, `time_emb_proj` (when `temb_channels` is set), `norm2`, `conv2`
    /// and, when the channel count changes, the 1×1 `conv_shortcut`.
    pub fn new(scope: Scope, c: ResnetConfig) -> Result<Self> {
        let same = ConvConfig::same(3);
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(Linear::new(
                scope.pp("time_emb_proj"),
                t,
                c.out_channels,
                true,
            )?),
            None => None,
        };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(Conv2d::new(
                scope.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                ConvConfig::same(1),
                true,
            )?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(scope.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: Conv2d::new(
                scope.pp("conv1"),
                c.in_channels,
                c.out_channels,
                3,
                same,
                true,
            )?,
            time_emb_proj,
            norm2: GroupNorm::new(scope.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: Conv2d::new(
                scope.pp("conv2"),
                c.out_channels,
                c.out_channels,
                3,
                same,
                true,
            )?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
            gradient_checkpointing: false,
        })
    }

    /// Turns gradient checkpointing of this block on or off.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// The trainable tensors of the adapters inside this block.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut vars = self.conv1.trainable_vars();
        vars.extend(self.conv2.trainable_vars());
        if let Some(c) = &self.conv_shortcut {
            vars.extend(c.trainable_vars());
        }
        if let Some(p) = &self.time_emb_proj {
            vars.extend(p.trainable_vars());
        }
        vars
    }

    /// `x: [B, in, H, W]`, `temb: [B, temb_channels]` (ignored by blocks without a time
    /// projection) → `[B, out, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        match temb {
            Some(temb) if self.gradient_checkpointing => {
                let block = self.clone();
                let f: Arc<Segment> = Arc::new(move |x: &Tensor, t: &Tensor| block.run(x, Some(t)));
                recompute(x, temb, &self.trainable_vars(), f)
            }
            _ => self.run(x, temb),
        }
    }

    fn run(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let mut h = self.conv1.forward(&h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&activation::silu(temb)?)?;
            let (b, c) = t.dims2()?;
            h = h.broadcast_add(&t.reshape((b, c, 1, 1))?)?;
        }
        let h = self.norm2.forward_silu(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        if self.output_scale_factor == 1.0 {
            return self.conv2.forward_add(&h, &shortcut);
        }
        let out = (shortcut + self.conv2.forward(&h)?)?;
        Ok((out / self.output_scale_factor)?)
    }
}

/// diffusers' `Downsample2D` with a convolution (`downsamplers.0.conv`): 3×3, stride 2. With
/// `padding = 0` the input is first padded by one zero row/column at the bottom/right only
/// (the VAE's asymmetric padding).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric: bool,
}

impl Downsample2D {
    /// Reads `conv` (the module's `conv` child) from `scope`.
    pub fn new(
        scope: Scope,
        in_channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let conv = Conv2d::new(
            scope.pp("conv"),
            in_channels,
            out_channels,
            3,
            ConvConfig { stride: 2, padding },
            true,
        )?;
        Ok(Downsample2D {
            conv,
            asymmetric: padding == 0,
        })
    }

    /// `x: [B, C, H, W]` → `[B, out, ⌈H/2⌉, ⌈W/2⌉]` (padding 1) or `[B, out, ⌊H/2⌋, ⌊W/2⌋]`
    /// (padding 0).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric {
            let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution (`upsamplers.0.conv`): nearest upsampling, then a
/// 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Reads `conv` from `scope`.
    pub fn new(scope: Scope, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::new(
                scope.pp("conv"),
                in_channels,
                out_channels,
                3,
                ConvConfig::same(3),
                true,
            )?,
        })
    }

    /// `x: [B, C, H, W]` → `[B, out, 2H, 2W]`, or `[B, out, h, w]` when `size = Some((h, w))`
    /// (the UNet passes the size of the skip connection it will be concatenated with).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let up = match size {
            Some(size) => resize_nearest(x, size)?,
            None => upsample_nearest_2x(x)?,
        };
        self.conv.forward(&up)
    }
}

/// Nearest-neighbour doubling, `[B, C, H, W]` → `[B, C, 2H, 2W]`, from `broadcast_as` and
/// `reshape`, whose backward (a sum over each 2×2 block) is exact.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let spread = x
        .reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?;
    Ok(spread.reshape((b, c, 2 * h, 2 * w))?)
}

/// Nearest-neighbour resize to `(h, w)` with PyTorch's index rule
/// `src = min(⌊dst · in/out⌋, in − 1)` (f32 scale), as `F.interpolate(size=…, mode="nearest")`.
/// Exact doublings go through [`upsample_nearest_2x`]; other sizes through `index_select`.
pub fn resize_nearest(x: &Tensor, (out_h, out_w): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (out_h, out_w) == (2 * h, 2 * w) {
        return upsample_nearest_2x(x);
    }
    if (out_h, out_w) == (h, w) {
        return Ok(x.clone());
    }
    let rows = nearest_indices(h, out_h, x.device())?;
    let cols = nearest_indices(w, out_w, x.device())?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

fn nearest_indices(input: usize, output: usize, device: &Device) -> Result<Tensor> {
    let scale = input as f32 / output as f32;
    let idx: Vec<u32> = (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input.saturating_sub(1)) as u32)
        .collect();
    Ok(Tensor::new(idx, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn grad_of(loss: &Tensor, x: &Var) -> Result<Vec<f64>> {
        let grads = loss.backward()?;
        match grads.get(x.as_tensor()) {
            Some(g) => Ok(g.flatten_all()?.to_vec1()?),
            None => Ok(Vec::new()),
        }
    }

    #[test]
    fn nearest_doubling_copies_each_pixel_into_a_2x2_block() -> Result<()> {
        let x = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((1, 1, 2, 3))?;
        let y = upsample_nearest_2x(&x)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        assert_eq!(y[0], vec![0., 0., 1., 1., 2., 2.]);
        assert_eq!(y[1], y[0]);
        assert_eq!(y[3], vec![3., 3., 4., 4., 5., 5.]);
        Ok(())
    }

    #[test]
    fn nearest_resize_matches_torch_index_rule_and_accumulates_gradients() -> Result<()> {
        // 3 → 5 rows: torch picks rows 0,0,1,1,2 (floor(i·0.6)).
        let x = Var::from_tensor(&Tensor::arange(0f64, 6., &Device::Cpu)?.reshape((1, 1, 3, 2))?)?;
        let y = resize_nearest(x.as_tensor(), (5, 4))?;
        let first_column: Vec<f64> = y.narrow(3, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(first_column, vec![0., 0., 2., 2., 4.]);
        // Each source pixel receives the sum over its copies: rows 0 and 1 have 2×2 copies, row 2 1×2.
        assert_eq!(grad_of(&y.sum_all()?, &x)?, vec![4., 4., 4., 4., 2., 2.]);
        assert_eq!(
            grad_of(&upsample_nearest_2x(x.as_tensor())?.sum_all()?, &x)?,
            vec![4.0; 6]
        );
        Ok(())
    }
}
