//! The adapter's maths: a fresh adapter changes nothing; the adapter path equals the merged
//! weight `W + (alpha/rank)·up·down` (linear, 1×1 and 3×3 convolutions); gradients of the adapter
//! weights through the tiny UNet agree with finite differences; dropout is off in evaluation
//! and, in training, a function of the seed and the step only.

mod lora_support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use lora_support::*;
use lora_trainer::config::{LoraSettings, TargetPreset};
use lora_trainer::lora::{LoraBase, LoraNetworks, NetworkOptions};
use lora_trainer::models::family::ModelFamily;
use lora_trainer::nn::gradcheck::GradCheck;
use lora_trainer::nn::{Conv2d, ConvConfig, Linear, Scope, WeightStore};

fn networks(settings: &LoraSettings, seed: u64, dtype: DType) -> LoraNetworks {
    let mut options = NetworkOptions::new(seed, &Device::Cpu);
    options.dtype = dtype;
    LoraNetworks::new(settings, LoraBase::sd(ModelFamily::Sd1), options).unwrap()
}

fn layer_store(weight: Tensor, bias: Tensor) -> WeightStore {
    let dtype = weight.dtype();
    let tensors = HashMap::from([
        ("layer.weight".to_string(), weight),
        ("layer.bias".to_string(), bias),
    ]);
    WeightStore::from_tensors("test", tensors, dtype, Device::Cpu)
}

#[test]
fn a_linear_adapter_equals_its_merged_weight() {
    let (w, b) = (
        pseudo_random(&[6, 5], 1, 1.0, DType::F64),
        pseudo_random(&[6], 2, 1.0, DType::F64),
    );
    let store = layer_store(w.clone(), b.clone());
    let nets = networks(&settings(names(&["layer"])), 7, DType::F64);
    let layer = Linear::new(
        Scope::root(&store).with_adapters(&nets.unet).pp("layer"),
        5,
        6,
        true,
    )
    .unwrap();
    let x = pseudo_random(&[2, 3, 5], 3, 1.0, DType::F64);
    let plain = Linear::from_weights(w.clone(), Some(b.clone()))
        .forward(&x)
        .unwrap();
    // Fresh: up is zero, the output is the layer's own, bit for bit.
    assert_eq!(bits(&layer.forward(&x).unwrap()), bits(&plain));

    fill(&nets.adapters(), 11);
    let adapter = &nets.adapters()[0];
    assert_eq!((adapter.spec().rank, adapter.spec().scale()), (4, 0.5));
    let delta = adapter.weight_delta().unwrap();
    // The merge written out: W + (alpha/rank) · up · down.
    let by_hand = (adapter
        .up()
        .as_tensor()
        .matmul(adapter.down().as_tensor())
        .unwrap()
        * 0.5)
        .unwrap();
    assert!(max_diff(&delta, &by_hand) < 1e-15);
    let merged = Linear::from_weights((w + delta).unwrap(), Some(b))
        .forward(&x)
        .unwrap();
    let got = layer.forward(&x).unwrap();
    assert!(
        max_diff(&got, &merged) < 1e-12,
        "{}",
        max_diff(&got, &merged)
    );
    assert!(
        max_diff(&got, &plain) > 0.1,
        "the filled adapter must change the output"
    );
}

fn check_conv(kernel: usize, stride: usize, padding: usize) {
    let (cin, cout) = (3, 5);
    let w = pseudo_random(&[cout, cin, kernel, kernel], 4, 1.0, DType::F64);
    let b = pseudo_random(&[cout], 5, 1.0, DType::F64);
    let store = layer_store(w.clone(), b.clone());
    let mut s = settings(names(&["layer"]));
    s.conv_lora = kernel > 1;
    let nets = networks(&s, 8, DType::F64);
    let config = ConvConfig { stride, padding };
    let layer = Conv2d::new(
        Scope::root(&store).with_adapters(&nets.unet).pp("layer"),
        cin,
        cout,
        kernel,
        config,
        true,
    )
    .unwrap();
    let adapter = nets.adapters()[0].clone();
    let rank = if kernel > 1 { 2 } else { 4 };
    assert_eq!(adapter.down().dims(), &[rank, cin, kernel, kernel]);
    assert_eq!(adapter.up().dims(), &[cout, rank, 1, 1]);
    let x = pseudo_random(&[2, cin, 8, 6], 6, 1.0, DType::F64);
    let conv = |w: &Tensor| {
        x.conv2d(w, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
            .unwrap()
    };
    // A fresh adapter changes nothing, bit for bit: the layer equals the same layer built
    // without adapters (both run our frozen-convolution op, whose im2col products round
    // differently from candle's conv2d: that one is only equal within rounding).
    let bare = Conv2d::new(
        Scope::root(&store).pp("layer"),
        cin,
        cout,
        kernel,
        config,
        true,
    )
    .unwrap();
    let fresh = layer.forward(&x).unwrap();
    assert_eq!(
        bits(&fresh),
        bits(&bare.forward(&x).unwrap()),
        "fresh adapter, k={kernel}"
    );
    assert!(max_diff(&fresh, &conv(&w)) < 1e-12, "k={kernel}");
    fill(std::slice::from_ref(&adapter), 21);
    let merged = conv(&(w.clone() + adapter.weight_delta().unwrap()).unwrap());
    let got = layer.forward(&x).unwrap();
    assert!(
        max_diff(&got, &merged) < 1e-12,
        "k={kernel} s={stride}: {}",
        max_diff(&got, &merged)
    );
    assert!(max_diff(&got, &conv(&w)) > 0.1);
}

#[test]
fn conv_adapters_equal_their_merged_weights() {
    check_conv(1, 1, 0);
    check_conv(3, 1, 1);
    check_conv(3, 2, 1);
}

#[test]
fn half_precision_inputs_are_cast_in_and_out() {
    let (w, b) = (
        pseudo_random(&[6, 5], 1, 1.0, DType::F16),
        pseudo_random(&[6], 2, 1.0, DType::F16),
    );
    let store = layer_store(w, b);
    let nets = networks(&settings(names(&["layer"])), 7, DType::F32);
    let layer = Linear::new(
        Scope::root(&store).with_adapters(&nets.unet).pp("layer"),
        5,
        6,
        true,
    )
    .unwrap();
    fill(&nets.adapters(), 3);
    assert_eq!(
        nets.adapters()[0].down().dtype(),
        DType::F32,
        "master weights stay f32"
    );
    let x = pseudo_random(&[4, 5], 9, 1.0, DType::F16);
    let y = layer.forward(&x).unwrap();
    assert_eq!(y.dtype(), DType::F16);
}

fn tiny_inputs(dtype: DType) -> (Tensor, Tensor, Tensor) {
    let sample = pseudo_random(&[1, 4, 8, 8], 31, 1.0, dtype);
    let timesteps = Tensor::new(&[500u32], &Device::Cpu).unwrap();
    let context = pseudo_random(&[1, 5, 64], 32, 1.0, dtype);
    (sample, timesteps, context)
}

#[test]
fn fresh_adapters_leave_the_tiny_models_unchanged() {
    let mut s = settings(preset(TargetPreset::Kohya));
    s.conv_lora = true;
    let with = networks(&s, 1, DType::F32);
    let (unet, text) = tiny_models(&with, DType::F32);
    let unet_store = store(
        "tiny-sd1/unet/diffusion_pytorch_model.safetensors",
        DType::F32,
    );
    let plain_unet = lora_trainer::models::unet::UNet2DConditionModel::new(
        Scope::root(&unet_store),
        &tiny_unet_config(),
    )
    .unwrap();
    let te_store = store("tiny-sd1/text_encoder/model.safetensors", DType::F32);
    let plain_text = lora_trainer::models::clip_text::ClipTextModel::new(
        Scope::root(&te_store),
        &tiny_text_config(),
    )
    .unwrap();
    assert!(with.adapters().len() > 50);

    let (sample, t, ctx) = tiny_inputs(DType::F32);
    let ids = Tensor::new(&[[998u32, 5, 17, 999, 999]], &Device::Cpu).unwrap();
    assert_eq!(
        bits(&unet.forward(&sample, &t, &ctx).unwrap()),
        bits(&plain_unet.forward(&sample, &t, &ctx).unwrap())
    );
    assert_eq!(
        bits(&text.forward(&ids).unwrap()),
        bits(&plain_text.forward(&ids).unwrap())
    );
    fill(&with.adapters(), 5);
    assert!(
        max_diff(
            &unet.forward(&sample, &t, &ctx).unwrap(),
            &plain_unet.forward(&sample, &t, &ctx).unwrap()
        ) > 1e-3
    );
    assert!(
        max_diff(
            &text.forward(&ids).unwrap(),
            &plain_text.forward(&ids).unwrap()
        ) > 1e-3
    );
}

#[test]
fn inference_mode_builds_no_graph_and_changes_no_value() {
    // Previews run the trained model outside the loss: with trainable adapters every sampler
    // step's output kept the graph of all earlier steps (a 40-step preview grew to gigabytes).
    let mut s = settings(preset(TargetPreset::Kohya));
    s.conv_lora = true;
    s.dropout = 0.3;
    let nets = networks(&s, 1, DType::F32);
    let (mut unet, text) = tiny_models(&nets, DType::F32);
    fill(&nets.adapters(), 5);
    let (sample, t, ctx) = tiny_inputs(DType::F32);
    let ids = Tensor::new(&[[998u32, 5, 17, 999, 999]], &Device::Cpu).unwrap();
    for checkpointing in [false, true] {
        unet.set_gradient_checkpointing(checkpointing);
        nets.set_training(true);
        let trained = unet.forward(&sample, &t, &ctx).unwrap();
        assert!(
            trained.track_op(),
            "training builds the graph backward needs"
        );
        assert!(text.forward(&ids).unwrap().track_op());
        nets.set_training(false);
        let evaluated = unet.forward(&sample, &t, &ctx).unwrap();
        {
            let _inference = nets.inference();
            let y = unet.forward(&sample, &t, &ctx).unwrap();
            assert!(
                !y.track_op(),
                "checkpointing {checkpointing}: a graph was built"
            );
            assert!(!text.forward(&ids).unwrap().track_op());
            assert_eq!(
                bits(&y),
                bits(&evaluated),
                "the same values, without dropout"
            );
        }
        assert!(unet.forward(&sample, &t, &ctx).unwrap().track_op());
    }
    // The guard restores the mode it found (training, here: dropout on again).
    nets.set_training(true);
    drop(nets.inference());
    nets.set_step(1, 0);
    let dropped = unet.forward(&sample, &t, &ctx).unwrap();
    nets.set_training(false);
    let clean = unet.forward(&sample, &t, &ctx).unwrap();
    assert!(
        max_diff(&dropped, &clean) > 1e-4,
        "dropout is on again after the guard"
    );
}

#[test]
fn adapter_gradients_through_the_tiny_unet_match_finite_differences() {
    let mut s = settings(preset(TargetPreset::Default));
    s.conv_lora = true;
    s.train_text_encoder = false;
    let nets = networks(&s, 3, DType::F64);
    let (unet, _) = tiny_models(&nets, DType::F64);
    let adapters = nets.adapters();
    for (i, a) in adapters.iter().enumerate() {
        let down = pseudo_random(a.down().dims(), 100 + 2 * i as u64, 0.3, DType::F64);
        let up = pseudo_random(a.up().dims(), 101 + 2 * i as u64, 0.3, DType::F64);
        a.set_weights(&down, &up).unwrap();
    }
    let (sample, t, ctx) = tiny_inputs(DType::F64);
    let projection = pseudo_random(&[1, 4, 8, 8], 40, 1.0, DType::F64);
    let loss = || -> lora_trainer::Result<Tensor> {
        Ok((unet.forward(&sample, &t, &ctx)? * &projection)?.sum_all()?)
    };
    let picked = [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
        "lora_unet_up_blocks_2_attentions_2_transformer_blocks_0_attn2_to_q",
        "lora_unet_down_blocks_1_resnets_0_conv1",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ];
    let mut vars: Vec<(String, Var)> = Vec::new();
    for name in picked {
        let a = adapters
            .iter()
            .find(|a| a.spec().kohya_name() == name)
            .unwrap_or_else(|| panic!("no adapter {name}"));
        vars.push((format!("{name}.lora_down"), a.down().clone()));
        vars.push((format!("{name}.lora_up"), a.up().clone()));
    }
    // Every adapter weight is a trainable var of the network, and gets a gradient.
    let trainable = nets.trainable_vars();
    assert_eq!(trainable.len(), 2 * adapters.len());
    let grads = loss().unwrap().backward().unwrap();
    let without_grad: Vec<String> = nets
        .unet
        .named_vars()
        .into_iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(n, _)| n)
        .collect();
    assert!(without_grad.is_empty(), "no gradient for {without_grad:?}");

    let check = GradCheck {
        samples: 4,
        ..GradCheck::default()
    };
    let failures = check.failures(loss, &vars).unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A single linear layer with an adapter, the given dropouts, and filled weights.
fn dropout_layer(input: f64, rank: f64, module: f64, seed: u64) -> (Linear, LoraNetworks) {
    let store = layer_store(
        pseudo_random(&[8, 6], 1, 1.0, DType::F32),
        pseudo_random(&[8], 2, 1.0, DType::F32),
    );
    let mut s = settings(names(&["layer"]));
    (s.dropout, s.rank_dropout, s.module_dropout) = (input, rank, module);
    let nets = networks(&s, seed, DType::F32);
    let layer = Linear::new(
        Scope::root(&store).with_adapters(&nets.unet).pp("layer"),
        6,
        8,
        true,
    )
    .unwrap();
    fill(&nets.adapters(), 77);
    (layer, nets)
}

#[test]
fn dropout_is_off_in_evaluation_and_seeded_by_step_in_training() {
    let x = pseudo_random(&[3, 4, 6], 5, 1.0, DType::F32);
    let (layer, nets) = dropout_layer(0.5, 0.5, 0.0, 42);
    let (clean, _) = dropout_layer(0.0, 0.0, 0.0, 42);
    let reference = clean.forward(&x).unwrap();
    // Evaluation (the default): no dropout at all.
    assert_eq!(bits(&layer.forward(&x).unwrap()), bits(&reference));

    nets.set_training(true);
    nets.set_step(3, 1);
    let a = layer.forward(&x).unwrap();
    let again = layer.forward(&x).unwrap();
    assert_eq!(
        bits(&a),
        bits(&again),
        "same step, same masks (a recomputed forward matches)"
    );
    assert!(
        max_diff(&a, &reference) > 1e-3,
        "masks are applied in training"
    );
    nets.set_step(3, 2);
    assert!(
        max_diff(&layer.forward(&x).unwrap(), &a) > 1e-3,
        "another micro-batch, other masks"
    );
    nets.set_step(4, 1);
    assert!(
        max_diff(&layer.forward(&x).unwrap(), &a) > 1e-3,
        "another step, other masks"
    );

    // A "resumed" run: new network, same seed, same weights, same step → the same masks.
    let (resumed, resumed_nets) = dropout_layer(0.5, 0.5, 0.0, 42);
    resumed_nets.set_training(true);
    resumed_nets.set_step(3, 1);
    assert_eq!(bits(&resumed.forward(&x).unwrap()), bits(&a));
    // Another seed draws other masks.
    let (other, other_nets) = dropout_layer(0.5, 0.5, 0.0, 43);
    other_nets.set_training(true);
    other_nets.set_step(3, 1);
    assert!(max_diff(&other.forward(&x).unwrap(), &a) > 1e-3);

    nets.set_training(false);
    assert_eq!(bits(&layer.forward(&x).unwrap()), bits(&reference));
}

#[test]
fn module_dropout_skips_the_whole_adapter_on_some_steps() {
    let x = pseudo_random(&[2, 6], 5, 1.0, DType::F32);
    let (layer, nets) = dropout_layer(0.0, 0.0, 0.5, 9);
    let base = Linear::from_weights(
        pseudo_random(&[8, 6], 1, 1.0, DType::F32),
        Some(pseudo_random(&[8], 2, 1.0, DType::F32)),
    )
    .forward(&x)
    .unwrap();
    let (clean, _) = dropout_layer(0.0, 0.0, 0.0, 9);
    let full = clean.forward(&x).unwrap();
    nets.set_training(true);
    let mut skipped = 0;
    for step in 0..40 {
        nets.set_step(step, 0);
        let y = layer.forward(&x).unwrap();
        if bits(&y) == bits(&base) {
            skipped += 1;
        } else {
            assert_eq!(
                bits(&y),
                bits(&full),
                "step {step}: either skipped or the whole adapter"
            );
        }
    }
    assert!(
        (8..=32).contains(&skipped),
        "{skipped} of 40 steps skipped at p = 0.5"
    );
}
