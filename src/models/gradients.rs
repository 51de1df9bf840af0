//! Finite-difference gradient checks of the UNet and the VAE encoder.
//!
//! candle silently drops gradients through some of its ops (DESIGN.md §7); LoRA training is only
//! correct if every path from a trainable tensor to the loss carries its gradient. These tests
//! build tiny random models in f64 (weights are `Var`s in a `WeightStore::from_tensors`) and
//! compare autograd with central differences for parameters of every block type, and for the
//! inputs. A dropped gradient shows as autograd 0 against a non-zero difference, which
//! [`GradCheck::failures`] reports.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::random_weights::{randn, random_model};
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use crate::nn::gradcheck::GradCheck;
use crate::nn::Scope;
use crate::Result;

/// The named parameters, failing on a name the model does not have (a renamed module would
/// otherwise silently drop out of the check).
fn pick(vars: &HashMap<String, Var>, names: &[&str]) -> Vec<(String, Var)> {
    names
        .iter()
        .map(|n| match vars.get(*n) {
            Some(v) => (n.to_string(), v.clone()),
            None => panic!("the model has no parameter `{n}`"),
        })
        .collect()
}

fn tiny_unet_config(linear_projection: bool) -> Result<UNetConfig> {
    let text = format!(
        r#"{{
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [2, 2], "cross_attention_dim": 6,
        "use_linear_projection": {linear_projection}, "upcast_attention": {linear_projection},
        "sample_size": 8
    }}"#
    );
    UNetConfig::from_json_str(&text, "tiny unet")
}

/// Every UNet parameter kind named in the task, across down, mid and up blocks.
const UNET_PARAMETERS: &[&str] = &[
    "conv_in.weight",
    "conv_in.bias",
    "time_embedding.linear_1.weight",
    "time_embedding.linear_2.weight",
    "time_embedding.linear_2.bias",
    "down_blocks.0.resnets.0.norm1.weight",
    "down_blocks.0.resnets.0.norm1.bias",
    "down_blocks.0.resnets.0.conv1.weight",
    "down_blocks.0.resnets.0.time_emb_proj.weight",
    "down_blocks.0.resnets.0.norm2.weight",
    "down_blocks.0.resnets.0.conv2.weight",
    "down_blocks.0.attentions.0.norm.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm2.bias",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm3.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
    "down_blocks.0.attentions.0.proj_out.weight",
    "down_blocks.0.downsamplers.0.conv.weight",
    "down_blocks.1.resnets.0.conv_shortcut.weight",
    "mid_block.resnets.0.conv1.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "mid_block.resnets.1.norm2.weight",
    "up_blocks.0.resnets.0.conv1.weight",
    "up_blocks.0.resnets.1.conv_shortcut.weight",
    "up_blocks.0.upsamplers.0.conv.weight",
    "up_blocks.1.resnets.1.time_emb_proj.weight",
    "up_blocks.1.attentions.1.proj_in.weight",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.bias",
    "up_blocks.1.attentions.1.proj_out.weight",
    "conv_norm_out.weight",
    "conv_out.weight",
    "conv_out.bias",
];

/// The parameters that differ between the two projection variants, plus attention around them.
const PROJECTION_PARAMETERS: &[&str] = &[
    "down_blocks.0.attentions.0.proj_in.weight",
    "down_blocks.0.attentions.0.proj_in.bias",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.proj_out.weight",
    "mid_block.attentions.0.proj_in.weight",
    "mid_block.attentions.0.proj_out.weight",
    "up_blocks.1.attentions.0.proj_in.weight",
    "up_blocks.1.attentions.0.proj_out.weight",
    "up_blocks.1.attentions.0.proj_out.bias",
];

/// Runs the UNet check of `parameters` and of both inputs (`sample`, `encoder_hidden_states`)
/// for one projection variant; returns the failures. With `detach_context`, the loss cuts the
/// gradient path to `encoder_hidden_states` (to prove that the check notices).
fn check_unet(
    linear_projection: bool,
    detach_context: bool,
    parameters: &[&str],
) -> Result<Vec<String>> {
    let config = tiny_unet_config(linear_projection)?;
    let (unet, vars) = random_model(7, |store| {
        UNet2DConditionModel::new(Scope::root(store), &config)
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let sample = Var::from_tensor(&randn(&mut rng, &[2, 4, 8, 8], 1.0, 0.0)?)?;
    let context = Var::from_tensor(&randn(&mut rng, &[2, 5, 6], 1.0, 0.0)?)?;
    let projection = randn(&mut rng, &[2, 4, 8, 8], 0.1, 0.0)?;
    let timesteps = Tensor::new(&[3u32, 600], &Device::Cpu)?;
    let loss = || -> Result<Tensor> {
        let context = if detach_context {
            context.as_tensor().detach()
        } else {
            context.as_tensor().clone()
        };
        let out = unet.forward(sample.as_tensor(), &timesteps, &context)?;
        Ok((out * &projection)?.sum_all()?)
    };
    let mut checked = pick(&vars, parameters);
    checked.push(("sample".into(), sample.clone()));
    checked.push(("encoder_hidden_states".into(), context.clone()));
    // Two elements per tensor (its largest gradient and a random one) keep the test fast; a
    // dropped or wrong path shows on either.
    GradCheck {
        samples: 2,
        ..GradCheck::default()
    }
    .failures(loss, &checked)
}

#[test]
fn unet_gradients_match_finite_differences_with_conv_projections() -> Result<()> {
    let failures = check_unet(false, false, UNET_PARAMETERS)?;
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

#[test]
fn unet_gradients_match_finite_differences_with_linear_projections() -> Result<()> {
    let failures = check_unet(true, false, PROJECTION_PARAMETERS)?;
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

#[test]
fn a_dropped_gradient_fails_the_check() -> Result<()> {
    // Detaching the context inside the loss drops exactly the gradient of the cross-attention
    // input: the check must report it, and only it.
    let failures = check_unet(false, true, &PROJECTION_PARAMETERS[..2])?;
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(
        failures[0].starts_with("encoder_hidden_states"),
        "{failures:#?}"
    );
    Ok(())
}

#[test]
fn vae_encoder_gradients_match_finite_differences() -> Result<()> {
    let config = VaeConfig::from_json_str(
        r#"{"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 2,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        "tiny vae",
    )?;
    let (vae, vars) = random_model(5, |store| AutoencoderKL::new(Scope::root(store), &config))?;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let image = Var::from_tensor(&randn(&mut rng, &[1, 3, 8, 8], 0.5, 0.0)?)?;
    let (p_mean, p_logvar) = (
        randn(&mut rng, &[1, 2, 4, 4], 0.1, 0.0)?,
        randn(&mut rng, &[1, 2, 4, 4], 0.1, 0.0)?,
    );
    let loss = || -> Result<Tensor> {
        let latent = vae.encode(image.as_tensor())?;
        Ok(((&latent.mean * &p_mean)?.sum_all()? + (&latent.logvar * &p_logvar)?.sum_all()?)?)
    };
    let mut checked = pick(
        &vars,
        &[
            "encoder.conv_in.weight",
            "encoder.down_blocks.0.resnets.0.norm1.weight",
            "encoder.down_blocks.0.resnets.0.conv2.weight",
            "encoder.down_blocks.0.downsamplers.0.conv.weight",
            "encoder.mid_block.attentions.0.group_norm.weight",
            "encoder.mid_block.attentions.0.to_q.weight",
            "encoder.mid_block.attentions.0.to_k.weight",
            "encoder.mid_block.attentions.0.to_v.bias",
            "encoder.mid_block.attentions.0.to_v.weight",
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "encoder.mid_block.resnets.1.conv1.weight",
            "encoder.conv_norm_out.bias",
            "encoder.conv_out.weight",
            "quant_conv.weight",
        ],
    );
    checked.push(("image".into(), image.clone()));
    let failures = GradCheck {
        samples: 2,
        ..GradCheck::default()
    }
    .failures(loss, &checked)?;
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}
