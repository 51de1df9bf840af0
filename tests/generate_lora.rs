//! LoRA application in `generate`: a file's modules (linear, 1×1 and 3×3 convolutions, alpha)
//! change the models exactly as merging `W + w·(alpha/rank)·up·down` would; weight 0 is the base
//! model; stacked files add up; diffusers-format files act as kohya ones; modules that match no
//! layer are errors naming the key (warnings when lenient).

mod generate_support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use generate_support::*;
use lora_trainer::config::SaveFormat;
use lora_trainer::generate::samplers::SamplerKind;
use lora_trainer::lora::{LoraFile, LoraModel};
use lora_trainer::models::clip_text::ClipTextModel;
use lora_trainer::models::unet::UNet2DConditionModel;
use lora_trainer::nn::{Scope, WeightStore};

#[test]
fn weight_zero_gives_the_base_picture_and_weight_one_does_not() {
    let ckpt = tiny();
    let dir = tempfile::tempdir().unwrap();
    let adapters: Vec<_> = mixed_layers(&ckpt)
        .iter()
        .enumerate()
        .map(|(i, l)| adapter(l, 4, 2.0, 10 + i as u64))
        .collect();
    let file = save(&adapters, dir.path(), "style", SaveFormat::Kohya);
    let request = request(3, SamplerKind::EulerAncestral);
    let base = latents(&ckpt, &[], &request);
    let zero = latents(&ckpt, &[uses(&file, 0.0)], &request);
    let one = latents(&ckpt, &[uses(&file, 1.0)], &request);
    assert_eq!(
        base.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        zero.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "weight 0 must give the base latents bit for bit"
    );
    assert!(
        relative_difference(&one, &base) > 1e-2,
        "the LoRA at weight 1 must change the picture"
    );
}

#[test]
fn two_stacked_loras_equal_their_merged_sum() {
    let ckpt = tiny();
    let dir = tempfile::tempdir().unwrap();
    let layers = mixed_layers(&ckpt);
    // A covers every layer (rank 4, alpha 2); B the first three and the text encoder's (rank 2,
    // alpha 8).
    let a: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| adapter(l, 4, 2.0, 100 + i as u64))
        .collect();
    let b: Vec<_> = [0, 1, 2, 4]
        .iter()
        .map(|&i| adapter(&layers[i], 2, 8.0, 200 + i as u64))
        .collect();
    let (wa, wb) = (0.7, -0.4);
    // The merged file: ranks concatenated, `up` pre-scaled so that alpha = rank (scale 1).
    let merged: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let pa = &a[i];
            let pb = b
                .iter()
                .find(|x| x.spec().path == l.1 && x.spec().model == l.0);
            let mut downs = vec![pa.down().as_tensor().clone()];
            let mut ups = vec![(pa.up().as_tensor() * (wa * pa.spec().scale())).unwrap()];
            if let Some(pb) = pb {
                downs.push(pb.down().as_tensor().clone());
                ups.push((pb.up().as_tensor() * (wb * pb.spec().scale())).unwrap());
            }
            let down = Tensor::cat(&downs, 0).unwrap();
            let up = Tensor::cat(&ups, 1).unwrap();
            let rank = down.dim(0).unwrap();
            let m = adapter(l, rank, rank as f64, 1);
            m.set_weights(&down, &up).unwrap();
            m
        })
        .collect();
    let fa = save(&a, dir.path(), "a", SaveFormat::Kohya);
    let fb = save(&b, dir.path(), "b", SaveFormat::Kohya);
    let fm = save(&merged, dir.path(), "merged", SaveFormat::Kohya);
    let request = request(11, SamplerKind::Ddim);
    let stacked = latents(&ckpt, &[uses(&fa, wa), uses(&fb, wb)], &request);
    let single = latents(&ckpt, &[uses(&fm, 1.0)], &request);
    let base = latents(&ckpt, &[], &request);
    let diff = relative_difference(&stacked, &single);
    assert!(
        diff < 1e-4,
        "stacked vs merged: relative difference {diff:e}"
    );
    assert!(
        relative_difference(&stacked, &base) > 1e-2,
        "the LoRAs do something"
    );
}

/// `W + w · (alpha / rank) · up · down` for every module of `file`, computed from the file's own
/// tensors (not through the adapter code), over the weights of `weights_file`.
fn merged_weights(
    weights_file: &str,
    file: &LoraFile,
    model: LoraModel,
    paths: &[(LoraModel, String)],
    weight: f64,
) -> HashMap<String, Tensor> {
    let mut tensors = candle_core::safetensors::load(fixture(weights_file), &Device::Cpu).unwrap();
    for m in file.modules_of(model) {
        let path = paths
            .iter()
            .find(|(pm, p)| *pm == model && model.kohya_name(p) == m.name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("{} has no layer", m.name));
        // transformers 5 saves the text encoder without the `text_model.` prefix.
        let key = [
            format!("{path}.weight"),
            format!("{}.weight", path.trim_start_matches("text_model.")),
        ]
        .into_iter()
        .find(|k| tensors.contains_key(k))
        .unwrap_or_else(|| panic!("no weight for {path}"));
        let w = &tensors[&key];
        let rank = m.rank();
        let up = m.up.to_dtype(DType::F32).unwrap();
        let down = m.down.to_dtype(DType::F32).unwrap();
        let up2 = up.reshape((up.dim(0).unwrap(), rank)).unwrap();
        let down2 = down.reshape((rank, down.elem_count() / rank)).unwrap();
        let delta = (up2.matmul(&down2).unwrap() * (weight * m.effective_alpha() / rank as f64))
            .unwrap()
            .reshape(w.shape())
            .unwrap();
        let merged = (w + delta).unwrap();
        tensors.insert(key, merged);
    }
    tensors
}

#[test]
fn a_third_party_kohya_file_acts_like_its_merged_weights() {
    // Written the way other trainers write them: fp16, alpha ≠ rank stored as fp16, the 1×1
    // conv's matrices squeezed to 2-D, a 3×3 LoCon conv.
    let ckpt = tiny();
    let dir = tempfile::tempdir().unwrap();
    let layers = mixed_layers(&ckpt);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, (model, path, kind)) in layers.iter().enumerate() {
        let a = adapter(&(*model, path.clone(), *kind), 4, 1.0, 300 + i as u64);
        let name = model.kohya_name(path);
        let squeeze = |t: &Tensor| -> Tensor {
            match t.dims() {
                [a, b, 1, 1] if path.ends_with("proj_in") => t.reshape((*a, *b)).unwrap(),
                _ => t.clone(),
            }
        };
        let f16 = |t: Tensor| t.to_dtype(DType::F16).unwrap();
        tensors.push((
            format!("{name}.lora_down.weight"),
            f16(squeeze(a.down().as_tensor())),
        ));
        tensors.push((
            format!("{name}.lora_up.weight"),
            f16(squeeze(a.up().as_tensor())),
        ));
        tensors.push((
            format!("{name}.alpha"),
            f16(Tensor::new(3.0f32, &Device::Cpu).unwrap()),
        ));
    }
    let path = dir.path().join("civitai_style.safetensors");
    candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
    let file = LoraFile::read(&path).unwrap();
    assert_eq!(file.modules.len(), 5);
    let weight = 0.8;
    let paths: Vec<(LoraModel, String)> = layers.iter().map(|(m, p, _)| (*m, p.clone())).collect();

    // UNet: the adapted model against one built from merged weights.
    let (out_lora, text_lora) = with_pipeline(&ckpt, &[uses(&path, weight)], false, |p| {
        let x = pseudo_random(&[1, 4, 16, 16], 1, 1.0);
        let ctx = pseudo_random(&[1, 77, 64], 2, 1.0);
        let t = Tensor::new(&[500f32], &Device::Cpu)?;
        let text = &p.text_encoders.encoders[0];
        let ids = text.tokenizer.input_ids(&["a red cube"], &Device::Cpu)?;
        Ok((
            p.unet.forward(&x, &t, &ctx)?,
            text.model.clip().forward(&ids)?,
        ))
    })
    .unwrap()
    .0;
    let unet_store = WeightStore::from_tensors(
        "merged unet",
        merged_weights(
            "tiny-sd1/unet/diffusion_pytorch_model.safetensors",
            &file,
            LoraModel::Unet,
            &paths,
            weight,
        ),
        DType::F32,
        Device::Cpu,
    );
    let unet = UNet2DConditionModel::new(Scope::root(&unet_store), ckpt.unet_config()).unwrap();
    let x = pseudo_random(&[1, 4, 16, 16], 1, 1.0);
    let ctx = pseudo_random(&[1, 77, 64], 2, 1.0);
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let out_merged = unet.forward(&x, &t, &ctx).unwrap();
    let diff = relative_difference(&out_lora, &out_merged);
    assert!(diff < 1e-4, "UNet: adapters vs merged weights {diff:e}");
    let base = ckpt.unet(None).unwrap().forward(&x, &t, &ctx).unwrap();
    assert!(relative_difference(&out_lora, &base) > 1e-3);

    // Text encoder.
    let te_store = WeightStore::from_tensors(
        "merged text encoder",
        merged_weights(
            "tiny-sd1/text_encoder/model.safetensors",
            &file,
            LoraModel::TextEncoder,
            &paths,
            weight,
        ),
        DType::F32,
        Device::Cpu,
    );
    let te = ClipTextModel::new(Scope::root(&te_store), ckpt.text_encoder_config()).unwrap();
    let ids = ckpt
        .tokenizer()
        .unwrap()
        .input_ids(&["a red cube"], &Device::Cpu)
        .unwrap();
    let text_merged = te.forward(&ids).unwrap();
    let diff = relative_difference(&text_lora, &text_merged);
    assert!(
        diff < 1e-4,
        "text encoder: adapters vs merged weights {diff:e}"
    );
}

#[test]
fn a_diffusers_format_file_gives_the_kohya_picture() {
    let ckpt = tiny();
    let dir = tempfile::tempdir().unwrap();
    let adapters: Vec<_> = mixed_layers(&ckpt)
        .iter()
        .enumerate()
        .map(|(i, l)| adapter(l, 4, 2.0, 400 + i as u64))
        .collect();
    let kohya = save(&adapters, dir.path(), "k", SaveFormat::Kohya);
    let peft = save(&adapters, dir.path(), "d", SaveFormat::Diffusers);
    assert_eq!(
        LoraFile::read(&peft).unwrap().format,
        lora_trainer::lora::LoraFormat::Diffusers
    );
    let request = request(5, SamplerKind::EulerAncestral);
    let a = latents(&ckpt, &[uses(&kohya, 0.9)], &request);
    let b = latents(&ckpt, &[uses(&peft, 0.9)], &request);
    assert!(relative_difference(&a, &b) < 1e-6);
}

#[test]
fn modules_that_match_no_layer_are_named_or_skipped_when_lenient() {
    let ckpt = tiny();
    let dir = tempfile::tempdir().unwrap();
    let layers = mixed_layers(&ckpt);
    let good = adapter(&layers[0], 4, 4.0, 7);
    let name = LoraModel::Unet.kohya_name(&layers[0].1);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        format!("{name}.lora_down.weight"),
        good.down().as_tensor().clone(),
    );
    tensors.insert(
        format!("{name}.lora_up.weight"),
        good.up().as_tensor().clone(),
    );
    let stray = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q";
    tensors.insert(
        format!("{stray}.lora_down.weight"),
        pseudo_random(&[4, 32], 1, 0.1),
    );
    tensors.insert(
        format!("{stray}.lora_up.weight"),
        pseudo_random(&[32, 4], 2, 0.1),
    );
    let path = dir.path().join("other_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let err = with_pipeline(&ckpt, &[uses(&path, 1.0)], false, |_| Ok(())).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(
        text.contains("other_model.safetensors")
            && text.contains(&format!("`{stray}.lora_down.weight`"))
            && text.contains("--lenient"),
        "{text}"
    );
    let ((), warnings) = with_pipeline(&ckpt, &[uses(&path, 1.0)], true, |_| Ok(())).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains(stray), "{}", warnings[0]);
    // The matching module is still applied.
    let request = request(1, SamplerKind::Ddim);
    let with_lora = with_pipeline(&ckpt, &[uses(&path, 1.0)], true, |p| {
        p.denoise(&request, &mut |_, _| {})
    })
    .unwrap()
    .0;
    assert!(relative_difference(&with_lora, &latents(&ckpt, &[], &request)) > 1e-3);
}

#[test]
fn a_file_for_another_model_family_is_refused_with_the_evidence() {
    let ckpt = tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".to_string(),
        pseudo_random(&[4, 1280], 1, 0.1),
    );
    tensors.insert(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".to_string(),
        pseudo_random(&[1280, 4], 2, 0.1),
    );
    let path = dir.path().join("sdxl.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = with_pipeline(&ckpt, &[uses(&path, 1.0)], true, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("SDXL"), "{err}");
}
