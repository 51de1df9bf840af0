//! The UNet2DConditionModel, built from diffusers' unet/config.json.
//!
//! Fields and weight paths mirror diffusers' module tree (`conv_in`, `time_embedding`,
//! `down_blocks`, `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`), because LoRA adapters
//! are named by those paths. Every shape comes from the [`UNetConfig`].

use candle_core::{DType, Tensor};

use super::embeddings::{timestep_features, TimestepEmbedding};
use super::unet_blocks::{
    Checkpointing, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock, DownBlock2D,
    DownBlockConfig, TransformerSettings, UNetMidBlock2DCrossAttn, UpBlock, UpBlock2D,
    UpBlockConfig,
};
use crate::nn::{Conv2d, ConvConfig, GroupNorm, Scope};
use crate::Result;

pub use super::unet_config::{DownBlockType, TextTimeEmbedding, UNetConfig, UpBlockType};

/// SDXL's added conditioning of a batch (diffusers' `added_cond_kwargs`), for a UNet whose config
/// has `addition_embed_type: "text_time"`.
#[derive(Debug, Clone)]
pub struct TextTimeInputs {
    /// `[B, pooled]`: the pooled, projected output of the last text encoder.
    pub text_embeds: Tensor,
    /// `[B, n]` (n = 6 for SDXL): original height and width, crop top and left, target height
    /// and width, in pixels.
    pub time_ids: Tensor,
}

/// Stable Diffusion's noise-prediction network (diffusers' `UNet2DConditionModel`).
/// How many resolution levels, from the full latent size down, have their transformers
/// (`CHECKPOINTED_TRANSFORMER_LEVELS`) and their resnets (`CHECKPOINTED_RESNET_LEVELS`)
/// recomputed under gradient checkpointing. A level's activations halve from one level to the
/// next while its FLOPs stay about equal, and a transformer block keeps about four times the
/// activations of a resnet for the same work, so the recomputation is spent where it frees the
/// most memory. Measured on SD 1.5 at 512 px (`bench`, README "Performance"): this policy cuts
/// what a step keeps for backward about 2× for about 1.25× the step time; recomputing every
/// block cut it 3× for 1.43×, and both kinds at two levels 2.2× for 1.31×.
pub const CHECKPOINTED_TRANSFORMER_LEVELS: usize = 2;
/// See [`CHECKPOINTED_TRANSFORMER_LEVELS`].
pub const CHECKPOINTED_RESNET_LEVELS: usize = 1;

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    dtype: DType,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    /// SDXL's embedding of the pooled text and the time ids (`add_embedding`), with the width
    /// of each time id's sinusoidal features.
    add_embedding: Option<(TimestepEmbedding, usize)>,
    down_blocks: Vec<DownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    gradient_checkpointing: bool,
}

impl UNet2DConditionModel {
    /// Builds the model from `config`, reading every weight through `scope` (the root of the
    /// UNet's weight store) and asking the scope's adapter provider about every Linear/Conv2d.
    pub fn new(scope: Scope, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let n = c.block_out_channels.len();
        let groups = c.norm_num_groups;
        let temb = c.time_embed_dim();
        let ch0 = c.block_out_channels[0];
        let heads = c.num_attention_heads();
        let settings = |i: usize, heads: usize, layers: usize| TransformerSettings {
            heads,
            layers,
            cross_attention_dim: c.cross_attention_dim[i],
            use_linear_projection: c.use_linear_projection,
            upcast_attention: c.upcast_attention,
        };

        let conv_in = Conv2d::new(
            scope.pp("conv_in"),
            c.in_channels,
            ch0,
            c.conv_in_kernel,
            ConvConfig::same(c.conv_in_kernel),
            true,
        )?;
        let time_embedding = TimestepEmbedding::new(scope.pp("time_embedding"), ch0, temb)?;
        let add_embedding = match c.addition {
            Some(a) => Some((
                TimestepEmbedding::new(scope.pp("add_embedding"), a.input_dim, temb)?,
                a.time_ids_dim,
            )),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channels = ch0;
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let input_channels = output_channels;
            output_channels = c.block_out_channels[i];
            let bc = DownBlockConfig {
                in_channels: input_channels,
                out_channels: output_channels,
                temb_channels: temb,
                layers: c.layers_per_block[i],
                groups,
                eps: c.norm_eps,
                add_downsample: i + 1 < n,
                downsample_padding: c.downsample_padding,
            };
            let s = scope.pp("down_blocks").pp(i);
            down_blocks.push(match kind {
                DownBlockType::CrossAttnDownBlock2D => {
                    DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                        s,
                        bc,
                        settings(i, heads[i], c.transformer_layers_per_block[i]),
                    )?)
                }
                DownBlockType::DownBlock2D => DownBlock::Plain(DownBlock2D::new(s, bc)?),
            });
        }

        let last = n - 1;
        let mid_block = UNetMidBlock2DCrossAttn::new(
            scope.pp("mid_block"),
            c.block_out_channels[last],
            temb,
            groups,
            c.norm_eps,
            c.mid_block_scale_factor,
            settings(last, heads[last], c.transformer_layers_per_block[last]),
        )?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channels = c.block_out_channels[last];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            // Up block i mirrors down block r = n − 1 − i (diffusers reverses every per-block list).
            let r = last - i;
            let prev_output_channels = output_channels;
            output_channels = c.block_out_channels[r];
            let bc = UpBlockConfig {
                in_channels: c.block_out_channels[r.saturating_sub(1)],
                prev_output_channels,
                out_channels: output_channels,
                temb_channels: temb,
                layers: c.layers_per_block[r] + 1,
                groups,
                eps: c.norm_eps,
                add_upsample: i < last,
            };
            let s = scope.pp("up_blocks").pp(i);
            up_blocks.push(match kind {
                UpBlockType::CrossAttnUpBlock2D => UpBlock::CrossAttn(CrossAttnUpBlock2D::new(
                    s,
                    bc,
                    settings(r, heads[r], c.transformer_layers_per_block[r]),
                )?),
                UpBlockType::UpBlock2D => UpBlock::Plain(UpBlock2D::new(s, bc)?),
            });
        }

        let conv_norm_out = GroupNorm::new(scope.pp("conv_norm_out"), groups, ch0, c.norm_eps)?;
        let conv_out = Conv2d::new(
            scope.pp("conv_out"),
            ch0,
            c.out_channels,
            c.conv_out_kernel,
            ConvConfig::same(c.conv_out_kernel),
            true,
        )?;
        Ok(UNet2DConditionModel {
            config: config.clone(),
            dtype: scope.store().dtype(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            gradient_checkpointing: false,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Turns gradient checkpointing on or off (off after [`UNet2DConditionModel::new`]): the
    /// Transformer2DModels and ResnetBlock2Ds at the highest resolutions (see
    /// [`CHECKPOINTED_TRANSFORMER_LEVELS`]) then keep only their input and recompute their
    /// activations in backward (exact same gradients, less memory, more time). The training loop
    /// sets it from `training.gradient_checkpointing`.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
        let levels = self.down_blocks.len();
        let at = |level: usize| Checkpointing {
            resnets: on && level < CHECKPOINTED_RESNET_LEVELS,
            transformers: on && level < CHECKPOINTED_TRANSFORMER_LEVELS,
        };
        for (level, block) in self.down_blocks.iter_mut().enumerate() {
            block.set_gradient_checkpointing(at(level));
        }
        self.mid_block
            .set_gradient_checkpointing(at(levels.saturating_sub(1)));
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            block.set_gradient_checkpointing(at(levels.saturating_sub(1 + i)));
        }
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The dtype of the weights (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `sample: [B, in_channels, H, W]`, `timesteps: [B]` (or one value for all samples; any
    /// numeric dtype), `encoder_hidden_states: [B, T, cross_attention_dim]` → the noise (or v)
    /// prediction `[B, out_channels, H, W]`.
    ///
    /// Any H and W work forward (as in diffusers, the upsamplers follow the skip connections'
    /// sizes). For gradients, keep H and W of equal parity at every level (sides that are
    /// multiples of 2^(blocks−1), i.e. multiples of 8 latents for SD): candle's stride-2
    /// convolution fails in backward otherwise (DESIGN.md §7).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            timesteps,
            encoder_hidden_states,
            None,
            &mut |_, _| Ok(()),
        )
    }

    /// [`UNet2DConditionModel::forward`] with SDXL's added conditioning, which a UNet with
    /// `addition_embed_type: "text_time"` needs (and any other refuses), calling
    /// `trace(module_path, output)` with the output of each top-level module: `time_proj` (the
    /// sinusoidal features), `time_embedding`, `add_embedding` (SDXL), `conv_in`,
    /// `down_blocks.{i}` (the hidden states), `mid_block`, `up_blocks.{i}`, `conv_out` (for
    /// comparisons with diffusers' hooks).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&TextTimeInputs>,
        trace: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (b, c, _, _) = sample.dims4()?;
        if c != self.config.in_channels {
            return Err(shape_error(format!(
                "sample has {c} channels, the UNet's config says in_channels = {}",
                self.config.in_channels
            )));
        }
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let (cb, _, cd) = context.dims3()?;
        if cb != b || !self.config.cross_attention_dim.contains(&cd) {
            return Err(shape_error(format!(
                "encoder_hidden_states has shape {:?}; it needs [{b}, tokens, {}]",
                context.dims(),
                self.config.cross_attention_dim[0]
            )));
        }
        let timesteps = per_sample_timesteps(timesteps, b)?;

        let mut sample = sample.to_dtype(self.dtype)?;
        if self.config.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }
        let features = timestep_features(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        trace("time_proj", &features)?;
        let temb = self
            .time_embedding
            .forward(&features.to_dtype(self.dtype)?)?;
        trace("time_embedding", &temb)?;
        let temb =
            match (&self.add_embedding, added) {
                (Some((embedding, time_ids_dim)), Some(inputs)) => {
                    let aug = self.text_time_embedding(embedding, *time_ids_dim, inputs, b)?;
                    trace("add_embedding", &aug)?;
                    (temb + aug)?
                }
                (Some(_), None) => {
                    return Err(shape_error(
                        "this UNet (SDXL's) needs the pooled text embedding and the size and crop \
                     numbers (`add_time_ids`)"
                            .to_string(),
                    ))
                }
                (None, Some(_)) => return Err(shape_error(
                    "this UNet takes no pooled text embedding or size numbers (only SDXL's does)"
                        .to_string(),
                )),
                (None, None) => temb,
            };

        let mut h = self.conv_in.forward(&sample)?;
        trace("conv_in", &h)?;
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, states) = block.forward(&h, &temb, &context)?;
            h = out;
            skips.extend(states);
            trace(&format!("down_blocks.{i}"), &h)?;
        }
        h = self.mid_block.forward(&h, &temb, &context)?;
        trace("mid_block", &h)?;
        for (i, block) in self.up_blocks.iter().enumerate() {
            // The upsampler must produce the size of the skip state the next block concatenates
            // (not always 2× when a side is not a multiple of 2^(blocks−1)).
            let n = block.resnet_count();
            let upsample_size = match skips.len().checked_sub(n + 1).and_then(|k| skips.get(k)) {
                Some(next) if i + 1 < self.up_blocks.len() => Some((next.dim(2)?, next.dim(3)?)),
                _ => None,
            };
            h = block.forward(&h, &mut skips, &temb, &context, upsample_size)?;
            trace(&format!("up_blocks.{i}"), &h)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        let out = self.conv_out.forward(&h)?;
        trace("conv_out", &out)?;
        Ok(out)
    }

    /// `add_embedding(cat(text_embeds, features(time_ids)))`: `[B, time_embed_dim]`.
    fn text_time_embedding(
        &self,
        embedding: &TimestepEmbedding,
        time_ids_dim: usize,
        inputs: &TextTimeInputs,
        batch: usize,
    ) -> Result<Tensor> {
        let (tb, _) = inputs.text_embeds.dims2()?;
        let (ib, n) = inputs.time_ids.dims2()?;
        if tb != batch || ib != batch {
            return Err(shape_error(format!(
                "text_embeds {:?} and time_ids {:?} need {batch} rows, one per sample",
                inputs.text_embeds.dims(),
                inputs.time_ids.dims()
            )));
        }
        let features = timestep_features(
            &inputs.time_ids.flatten_all()?,
            time_ids_dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .reshape((batch, n * time_ids_dim))?;
        let joined = Tensor::cat(
            &[
                &inputs.text_embeds.to_dtype(DType::F32)?,
                &features.to_dtype(DType::F32)?,
            ],
            1,
        )?;
        embedding.forward(&joined.to_dtype(self.dtype)?)
    }
}

fn shape_error(message: String) -> crate::Error {
    candle_core::Error::Msg(format!("UNet input: {message}")).into()
}

/// `timesteps` as a `[B]` tensor: one value per sample, or a single value repeated.
fn per_sample_timesteps(timesteps: &Tensor, batch: usize) -> Result<Tensor> {
    let flat = timesteps.flatten_all()?;
    match flat.dim(0)? {
        n if n == batch => Ok(flat),
        1 => Ok(flat.broadcast_as(batch)?.contiguous()?),
        n => Err(shape_error(format!(
            "{n} timesteps for a batch of {batch}; give one per sample or a single one"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::models::random_weights::{randn, random_model};
    use crate::nn::{Adapter, AdapterProvider, LayerKind, WeightStore};

    /// Three blocks, so a 12×10 latent goes 12×10 → 6×5 → 3×3 and back through a 3 → 5 resize.
    fn tiny_config() -> Result<UNetConfig> {
        UNetConfig::from_json_str(
            r#"{"block_out_channels": [8, 8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "attention_head_dim": 2, "cross_attention_dim": 6}"#,
            "tiny unet",
        )
    }

    fn tiny_unet() -> Result<UNet2DConditionModel> {
        let config = tiny_config()?;
        Ok(random_model(3, |store| {
            UNet2DConditionModel::new(Scope::root(store), &config)
        })?
        .0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
    }

    #[test]
    fn sides_that_are_not_multiples_of_the_downsampling_come_back_at_their_size() -> Result<()> {
        let unet = tiny_unet()?;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let sample = randn(&mut rng, &[1, 4, 12, 10], 1.0, 0.0)?;
        let context = randn(&mut rng, &[1, 3, 6], 1.0, 0.0)?;
        let out = unet.forward(&sample, &Tensor::new(&[5u32], &Device::Cpu)?, &context)?;
        assert_eq!(out.dims(), &[1, 4, 12, 10]);
        Ok(())
    }

    #[test]
    fn each_sample_uses_its_own_timestep() -> Result<()> {
        let unet = tiny_unet()?;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let sample = randn(&mut rng, &[2, 4, 8, 8], 1.0, 0.0)?;
        let context = randn(&mut rng, &[2, 3, 6], 1.0, 0.0)?;
        let both = unet.forward(
            &sample,
            &Tensor::new(&[10i64, 700], &Device::Cpu)?,
            &context,
        )?;
        for (i, t) in [10i64, 700].into_iter().enumerate() {
            let alone = unet.forward(
                &sample.narrow(0, i, 1)?,
                &Tensor::new(&[t], &Device::Cpu)?,
                &context.narrow(0, i, 1)?,
            )?;
            assert!(
                max_diff(&both.narrow(0, i, 1)?, &alone)? < 1e-10,
                "sample {i}"
            );
        }
        // One timestep for the whole batch is repeated; it changes sample 1's prediction.
        let shared = unet.forward(&sample, &Tensor::new(&[10f32], &Device::Cpu)?, &context)?;
        let repeated = unet.forward(&sample, &Tensor::new(&[10u8, 10], &Device::Cpu)?, &context)?;
        assert!(max_diff(&shared, &repeated)? < 1e-12);
        assert!(max_diff(&shared.narrow(0, 1, 1)?, &both.narrow(0, 1, 1)?)? > 1e-3);
        Ok(())
    }

    #[test]
    fn wrong_inputs_are_explained() -> Result<()> {
        let unet = tiny_unet()?;
        let dev = Device::Cpu;
        let sample = Tensor::zeros((2, 4, 8, 8), DType::F64, &dev)?;
        let context = Tensor::zeros((2, 3, 6), DType::F64, &dev)?;
        let t = Tensor::new(&[1u32, 2], &dev)?;
        let err = unet
            .forward(
                &Tensor::zeros((2, 3, 8, 8), DType::F64, &dev)?,
                &t,
                &context,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("in_channels = 4"), "{err}");
        let err = unet
            .forward(&sample, &t, &Tensor::zeros((2, 3, 5), DType::F64, &dev)?)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("encoder_hidden_states") && err.contains("[2, tokens, 6]"),
            "{err}"
        );
        let err = unet
            .forward(&sample, &Tensor::new(&[1u32, 2, 3], &dev)?, &context)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 timesteps for a batch of 2"), "{err}");
        Ok(())
    }

    /// Records every layer that asks for an adapter.
    #[derive(Default)]
    struct Recorder(Mutex<BTreeMap<String, LayerKind>>);

    impl AdapterProvider for Recorder {
        fn adapter_for(
            &self,
            module_path: &str,
            kind: LayerKind,
        ) -> Result<Option<Arc<dyn Adapter>>> {
            if let Ok(mut seen) = self.0.lock() {
                seen.insert(module_path.to_string(), kind);
            }
            Ok(None)
        }
    }

    #[test]
    fn every_linear_and_conv_asks_for_an_adapter_under_its_diffusers_path() -> Result<()> {
        let config = tiny_config()?;
        let recorder = Recorder::default();
        let keys: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
        let build = |store: &WeightStore| {
            let unet =
                UNet2DConditionModel::new(Scope::root(store).with_adapters(&recorder), &config)?;
            if let Ok(mut k) = keys.lock() {
                *k = store
                    .sources()
                    .iter()
                    .flat_map(|s| s.keys_and_shapes())
                    .map(|(key, dims)| (key, dims.len()))
                    .collect();
            }
            Ok(unet)
        };
        random_model(4, build)?;
        let seen = recorder.0.lock().map(|s| s.clone()).unwrap_or_default();
        // Every weight matrix or kernel (rank ≥ 2) belongs to a layer that asked, by its own path.
        let keys = keys.lock().map(|k| k.clone()).unwrap_or_default();
        for (key, rank) in &keys {
            if let (Some(path), true) = (key.strip_suffix(".weight"), *rank >= 2) {
                assert!(seen.contains_key(path), "{path} did not ask for an adapter");
            }
        }
        assert!(seen
            .keys()
            .all(|p| keys.iter().any(|(k, _)| k == &format!("{p}.weight"))));
        let block = "down_blocks.1.attentions.0.transformer_blocks.0";
        assert_eq!(
            seen[&format!("{block}.attn2.to_k")],
            LayerKind::Linear {
                in_features: 6,
                out_features: 8
            }
        );
        assert_eq!(
            seen[&format!("{block}.ff.net.0.proj")],
            LayerKind::Linear {
                in_features: 8,
                out_features: 64
            }
        );
        assert_eq!(
            seen[&format!("{block}.attn1.to_out.0")],
            LayerKind::Linear {
                in_features: 8,
                out_features: 8
            }
        );
        assert_eq!(
            seen["down_blocks.0.downsamplers.0.conv"],
            LayerKind::Conv2d {
                in_channels: 8,
                out_channels: 8,
                kernel: 3,
                stride: 2,
                padding: 1
            }
        );
        assert_eq!(
            seen["up_blocks.0.resnets.0.conv_shortcut"],
            LayerKind::Conv2d {
                in_channels: 32,
                out_channels: 16,
                kernel: 1,
                stride: 1,
                padding: 0
            }
        );
        for path in [
            "conv_in",
            "conv_out",
            "time_embedding.linear_1",
            "mid_block.attentions.0.proj_in",
            "up_blocks.1.upsamplers.0.conv",
        ] {
            assert!(seen.contains_key(path), "{path}");
        }
        Ok(())
    }

    /// The LoRA (and text-context) gradients of a tiny UNet with frozen base weights are the same
    /// with candle's ops, with our frozen-layer custom ops, and with gradient checkpointing on
    /// top (dropout active: the recomputation must draw the forward's masks).
    #[test]
    fn frozen_ops_and_checkpointing_keep_the_lora_gradients() -> Result<()> {
        use crate::config::{LoraSettings, SaveFormat, SavePrecision, TargetModules};
        use crate::lora::{LoraNetworks, NetworkOptions};
        use candle_core::Var;

        let config = tiny_config()?;
        let settings = LoraSettings {
            rank: 2,
            alpha: 2.0,
            dropout: 0.2,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            conv_lora: true,
            conv_rank: 2,
            conv_alpha: 1.0,
            target_modules: TargetModules::Names(
                [
                    "to_q",
                    "to_v",
                    "ff.net.2",
                    "conv1",
                    "conv_shortcut",
                    "proj_in",
                ]
                .map(String::from)
                .to_vec(),
            ),
            train_text_encoder: false,
            network_weights: None,
            save_precision: SavePrecision::Fp16,
            save_format: SaveFormat::Kohya,
        };
        let options = NetworkOptions {
            dtype: DType::F64,
            ..NetworkOptions::new(5, &Device::Cpu)
        };
        let networks = LoraNetworks::new(&settings, None, options)?;
        let store = WeightStore::random(9, DType::F64, Device::Cpu);
        let unet =
            UNet2DConditionModel::new(Scope::root(&store).with_adapters(&networks.unet), &config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        // A fresh adapter has up = 0 and so no gradient for down: start from random matrices.
        for adapter in networks.unet.adapters() {
            let up = randn(&mut rng, adapter.up().dims(), 0.5, 0.0)?;
            adapter.up().set(&up)?;
        }
        networks.set_training(true);
        networks.set_step(3, 1);
        let vars = networks.unet.named_vars();
        assert!(vars.len() >= 20, "{} LoRA tensors", vars.len());
        let sample = randn(&mut rng, &[2, 4, 8, 8], 1.0, 0.0)?;
        let context = Var::from_tensor(&randn(&mut rng, &[2, 3, 6], 1.0, 0.0)?)?;
        let weights = randn(&mut rng, &[2, 4, 8, 8], 1.0, 0.0)?;
        let t = Tensor::new(&[10u32, 600], &Device::Cpu)?;

        // Which implementation of the layers: the CPU kernels, the device-generic paths CUDA
        // takes, or candle's plain ops (the reference).
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Ops {
            Cpu,
            Generic,
            Plain,
        }
        let gradients = |checkpointing: bool, ops: Ops| -> Result<Vec<Tensor>> {
            let mut model = unet.clone();
            model.set_gradient_checkpointing(checkpointing);
            let run = || -> Result<Vec<Tensor>> {
                let out = model.forward(&sample, &t, context.as_tensor())?;
                let grads = (out * &weights)?.sum_all()?.backward()?;
                let mut all = Vec::new();
                for (name, v) in vars
                    .iter()
                    .map(|(n, v)| (n.as_str(), v))
                    .chain([("context", &context)])
                {
                    match grads.get(v.as_tensor()) {
                        Some(g) => all.push(g.clone()),
                        None => panic!("{name}: no gradient"),
                    }
                }
                Ok(all)
            };
            match ops {
                Ops::Cpu => run(),
                Ops::Generic => crate::nn::frozen::with_generic_ops(run),
                Ops::Plain => crate::nn::frozen::with_plain_ops(run),
            }
        };
        let reference = gradients(false, Ops::Plain)?;
        for (checkpointing, plain) in [
            (false, Ops::Cpu),
            (true, Ops::Cpu),
            (true, Ops::Plain),
            (false, Ops::Generic),
            (true, Ops::Generic),
        ] {
            let got = gradients(checkpointing, plain)?;
            for ((name, _), (a, b)) in vars.iter().zip(got.iter().zip(&reference)) {
                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                let diff = max_diff(a, b)? / scale;
                assert!(
                    diff < 1e-9,
                    "{name} (checkpointing {checkpointing}, {plain:?} ops): {diff}"
                );
            }
            let n = reference.len() - 1;
            assert!(max_diff(&got[n], &reference[n])? < 1e-9, "context gradient");
        }
        Ok(())
    }
}
