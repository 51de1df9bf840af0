//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`), with diffusers' module paths:
//! `resnets.{j}`, `attentions.{j}`, `downsamplers.0`, `upsamplers.0`.

use candle_core::Tensor;

use super::attention::{Transformer2DConfig, Transformer2DModel};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::nn::Scope;
use crate::Result;

/// Which parts of a block gradient checkpointing recomputes in backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpointing {
    pub resnets: bool,
    pub transformers: bool,
}

/// Settings of the Transformer2DModels inside one block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    pub heads: usize,
    /// `transformer_layers_per_block` for this block.
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl TransformerSettings {
    fn build(&self, scope: Scope, channels: usize, groups: usize) -> Result<Transformer2DModel> {
        Transformer2DModel::new(
            scope,
            Transformer2DConfig {
                in_channels: channels,
                heads: self.heads,
                head_dim: channels / self.heads.max(1),
                layers: self.layers,
                cross_attention_dim: self.cross_attention_dim,
                norm_groups: groups,
                use_linear_projection: self.use_linear_projection,
                upcast_attention: self.upcast_attention,
            },
        )
    }
}

/// Shape of a down block.
#[derive(Debug, Clone, Copy)]
pub struct DownBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    /// Number of resnets (`layers_per_block`).
    pub layers: usize,
    pub groups: usize,
    pub eps: f64,
    /// Every block but the last halves the resolution.
    pub add_downsample: bool,
    pub downsample_padding: usize,
}

impl DownBlockConfig {
    fn resnet(&self, j: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels: if j == 0 {
                self.in_channels
            } else {
                self.out_channels
            },
            out_channels: self.out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn downsampler(&self, scope: Scope) -> Result<Option<Downsample2D>> {
        if self.add_downsample {
            Ok(Some(Downsample2D::new(
                scope.pp("downsamplers").pp(0),
                self.out_channels,
                self.out_channels,
                self.downsample_padding,
            )?))
        } else {
            Ok(None)
        }
    }
}

/// Resnets, each followed by a Transformer2DModel, then an optional downsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsamplers: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    pub fn new(scope: Scope, c: DownBlockConfig, t: TransformerSettings) -> Result<Self> {
        let mut resnets = Vec::with_capacity(c.layers);
        let mut attentions = Vec::with_capacity(c.layers);
        for j in 0..c.layers {
            resnets.push(ResnetBlock2D::new(scope.pp("resnets").pp(j), c.resnet(j))?);
            attentions.push(t.build(scope.pp("attentions").pp(j), c.out_channels, c.groups)?);
        }
        Ok(CrossAttnDownBlock2D {
            resnets,
            attentions,
            downsamplers: c.downsampler(scope)?,
        })
    }

    /// Turns gradient checkpointing of every resnet and transformer on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on.resnets));
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_gradient_checkpointing(on.transformers));
    }

    /// `x: [B, in, H, W]`, `temb: [B, temb]`, `context: [B, T, cross]` → the block output
    /// `[B, out, H', W']` and the states kept for the skip connections (each resnet+attention
    /// output, then the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (resnet, attention) in self.resnets.iter().zip(&self.attentions) {
            h = resnet.forward(&h, Some(temb))?;
            h = attention.forward(&h, context)?;
            states.push(h.clone());
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

/// Resnets, then an optional downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsamplers: Option<Downsample2D>,
}

impl DownBlock2D {
    pub fn new(scope: Scope, c: DownBlockConfig) -> Result<Self> {
        let resnets = (0..c.layers)
            .map(|j| ResnetBlock2D::new(scope.pp("resnets").pp(j), c.resnet(j)))
            .collect::<Result<Vec<_>>>()?;
        Ok(DownBlock2D {
            resnets,
            downsamplers: c.downsampler(scope)?,
        })
    }

    /// Turns gradient checkpointing of every resnet on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on.resnets));
    }

    /// Like [`CrossAttnDownBlock2D::forward`] without the context.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for resnet in &self.resnets {
            h = resnet.forward(&h, Some(temb))?;
            states.push(h.clone());
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

/// One of the down block types.
#[derive(Debug, Clone)]
pub enum DownBlock {
    CrossAttn(CrossAttnDownBlock2D),
    Plain(DownBlock2D),
}

impl DownBlock {
    /// Turns gradient checkpointing of the block's resnets and transformers on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        match self {
            DownBlock::CrossAttn(b) => b.set_gradient_checkpointing(on),
            DownBlock::Plain(b) => b.set_gradient_checkpointing(on),
        }
    }

    /// See [`CrossAttnDownBlock2D::forward`].
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        match self {
            DownBlock::CrossAttn(b) => b.forward(x, temb, context),
            DownBlock::Plain(b) => b.forward(x, temb),
        }
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn` (one layer): resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    /// `output_scale_factor` is the config's `mid_block_scale_factor`.
    pub fn new(
        scope: Scope,
        channels: usize,
        temb_channels: usize,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
        t: TransformerSettings,
    ) -> Result<Self> {
        let rc = ResnetConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: Some(temb_channels),
            groups,
            eps,
            output_scale_factor,
        };
        let resnets = vec![
            ResnetBlock2D::new(scope.pp("resnets").pp(0), rc)?,
            ResnetBlock2D::new(scope.pp("resnets").pp(1), rc)?,
        ];
        let attentions = vec![t.build(scope.pp("attentions").pp(0), channels, groups)?];
        Ok(UNetMidBlock2DCrossAttn {
            resnets,
            attentions,
        })
    }

    /// Turns gradient checkpointing of every resnet and transformer on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on.resnets));
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_gradient_checkpointing(on.transformers));
    }

    /// `x: [B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attention.forward(&h, context)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// Shape of an up block.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockConfig {
    /// Channels of the skip connection consumed by the last resnet (the matching down block's
    /// input channels).
    pub in_channels: usize,
    /// Channels coming from the previous up block (or the mid block).
    pub prev_output_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    /// Number of resnets (`layers_per_block + 1`).
    pub layers: usize,
    pub groups: usize,
    pub eps: f64,
    /// Every block but the last doubles the resolution.
    pub add_upsample: bool,
}

impl UpBlockConfig {
    fn resnet(&self, j: usize) -> ResnetConfig {
        let skip = if j == self.layers - 1 {
            self.in_channels
        } else {
            self.out_channels
        };
        let input = if j == 0 {
            self.prev_output_channels
        } else {
            self.out_channels
        };
        ResnetConfig {
            in_channels: input + skip,
            out_channels: self.out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn upsampler(&self, scope: Scope) -> Result<Option<Upsample2D>> {
        if self.add_upsample {
            Ok(Some(Upsample2D::new(
                scope.pp("upsamplers").pp(0),
                self.out_channels,
                self.out_channels,
            )?))
        } else {
            Ok(None)
        }
    }
}

/// Pops the last skip state, or explains that the caller gave too few.
fn pop_skip(skips: &mut Vec<Tensor>) -> Result<Tensor> {
    skips.pop().ok_or_else(|| {
        candle_core::Error::Msg(
            "up block: no skip connection left (fewer down states than resnets)".into(),
        )
        .into()
    })
}

/// Resnets on `[h | skip]`, each followed by a Transformer2DModel, then an optional upsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsamplers: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    pub fn new(scope: Scope, c: UpBlockConfig, t: TransformerSettings) -> Result<Self> {
        let mut resnets = Vec::with_capacity(c.layers);
        let mut attentions = Vec::with_capacity(c.layers);
        for j in 0..c.layers {
            resnets.push(ResnetBlock2D::new(scope.pp("resnets").pp(j), c.resnet(j))?);
            attentions.push(t.build(scope.pp("attentions").pp(j), c.out_channels, c.groups)?);
        }
        Ok(CrossAttnUpBlock2D {
            resnets,
            attentions,
            upsamplers: c.upsampler(scope)?,
        })
    }

    /// Turns gradient checkpointing of every resnet and transformer on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on.resnets));
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_gradient_checkpointing(on.transformers));
    }

    /// `x: [B, prev, H, W]`; each resnet concatenates the last of `skips` (which it removes) on
    /// the channel axis. The upsampler doubles the size, or resizes to `upsample_size`.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (resnet, attention) in self.resnets.iter().zip(&self.attentions) {
            let skip = pop_skip(skips)?;
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(temb))?;
            h = attention.forward(&h, context)?;
        }
        match &self.upsamplers {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}

/// Resnets on `[h | skip]`, then an optional upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsamplers: Option<Upsample2D>,
}

impl UpBlock2D {
    pub fn new(scope: Scope, c: UpBlockConfig) -> Result<Self> {
        let resnets = (0..c.layers)
            .map(|j| ResnetBlock2D::new(scope.pp("resnets").pp(j), c.resnet(j)))
            .collect::<Result<Vec<_>>>()?;
        Ok(UpBlock2D {
            resnets,
            upsamplers: c.upsampler(scope)?,
        })
    }

    /// Turns gradient checkpointing of every resnet on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on.resnets));
    }

    /// Like [`CrossAttnUpBlock2D::forward`] without the context.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            let skip = pop_skip(skips)?;
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(temb))?;
        }
        match &self.upsamplers {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}

/// One of the up block types.
#[derive(Debug, Clone)]
pub enum UpBlock {
    CrossAttn(CrossAttnUpBlock2D),
    Plain(UpBlock2D),
}

impl UpBlock {
    /// Turns gradient checkpointing of the block's resnets and transformers on or off.
    pub fn set_gradient_checkpointing(&mut self, on: Checkpointing) {
        match self {
            UpBlock::CrossAttn(b) => b.set_gradient_checkpointing(on),
            UpBlock::Plain(b) => b.set_gradient_checkpointing(on),
        }
    }

    /// See [`CrossAttnUpBlock2D::forward`].
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        match self {
            UpBlock::CrossAttn(b) => b.forward(x, skips, temb, context, upsample_size),
            UpBlock::Plain(b) => b.forward(x, skips, temb, upsample_size),
        }
    }

    /// Number of skip states this block consumes.
    pub fn resnet_count(&self) -> usize {
        match self {
            UpBlock::CrossAttn(b) => b.resnets.len(),
            UpBlock::Plain(b) => b.resnets.len(),
        }
    }
}
