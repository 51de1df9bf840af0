//! One optimizer step alone ([`Trainer::step`]) on the tiny SD1 fixture: deterministic, the
//! learning rate of the schedule reaches the optimizer, accumulated micro-batches average
//! their losses, and only the adapters change; the mixed-precision (CUDA) code path in f16 on
//! the CPU trains like f32.

use std::path::Path;

use candle_core::{DType, Device};

use lora_trainer::config::TrainPlan;
use lora_trainer::dataset::Dataset;
use lora_trainer::log::DisplayMode;
use lora_trainer::preflight::Preflight;
use lora_trainer::train::device::Compute;
use lora_trainer::train::setup::{set_up, Setup};
use lora_trainer::train::step::{diffusion_loss, Draws};
use lora_trainer::train::trainer::LatentSource;
use lora_trainer::train::Trainer;

fn setup(dir: &Path, extra: &str) -> (Trainer, Dataset, Preflight) {
    setup_in(dir, extra, None)
}

/// [`setup`] with the frozen weights in `half` (on the CPU) instead of the config's precision.
fn setup_in(dir: &Path, extra: &str, half: Option<DType>) -> (Trainer, Dataset, Preflight) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut csv = String::from("filename,prompt\n");
    for i in 0..4u32 {
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * i) as u8, 90])
        })
        .save(data.join(format!("{i}.png")))
        .unwrap();
        csv.push_str(&format!("{i}.png,picture {i}\n"));
    }
    std::fs::write(data.join("metadata.csv"), csv).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    let text = format!(
        "train_data_dir: {d}\nmetadata_path: {d}/metadata.csv\nresolution: 64\nbase_model: {m}\n\
         output_dir: {o}\nbatch_size: 1\nlearning_rate: 1e-2\ndevice: cpu\n\
         {te}{extra}",
        d = data.display(),
        m = model.display(),
        o = dir.join("out").display(),
        te = if extra.contains("train_text_encoder") {
            ""
        } else {
            "train_text_encoder: false\n"
        },
    );
    let plan = TrainPlan::from_yaml(&text, Path::new("c.yaml"), &[], dir).unwrap();
    let preflight = Preflight::check(plan).unwrap();
    let t = &preflight.plan.training;
    let mut compute = Compute::resolve(t.device, t.mixed_precision).unwrap();
    if let Some(dtype) = half {
        compute.dtype = dtype;
    }
    let dataset = Dataset::open(&preflight.plan.dataset_spec()).unwrap();
    let Setup { trainer, .. } = set_up(
        &preflight,
        &compute,
        &dataset,
        None,
        None,
        DisplayMode::Quiet,
    )
    .unwrap();
    (trainer, dataset, preflight)
}

fn weights(trainer: &Trainer) -> Vec<Vec<f32>> {
    trainer
        .networks
        .trainable_vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn a_step_is_deterministic_and_updates_only_through_the_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, dataset, _) = setup(dir.path(), "scheduler: linear\nepochs: 2\n");
    let (mut b, _, _) = setup(dir.path(), "scheduler: linear\nepochs: 2\n");
    let batches = dataset.epoch_batches(0, 1);
    let before = weights(&a);
    let ra = a.step(&dataset, 0, &batches[..2]).unwrap();
    let rb = b.step(&dataset, 0, &batches[..2]).unwrap();
    assert_eq!(ra, rb, "same step, same batches: the same report");
    assert_eq!(weights(&a), weights(&b), "and the same weights");
    assert_ne!(weights(&a), before, "the optimizer moved the adapters");
    assert_eq!(ra.samples, 2);
    assert!(ra.loss.is_finite() && ra.grad_norm > 0.0);
    // linear decay over 8 steps: 1e-2 at step 0, 1e-2 · 5/8 at step 3.
    assert_eq!(ra.lrs, vec![1e-2]);
    let r3 = a.step(&dataset, 3, &batches[2..3]).unwrap();
    assert!((r3.lrs[0] - 1e-2 * 5.0 / 8.0).abs() < 1e-12, "{:?}", r3.lrs);
}

#[test]
fn accumulated_micro_batches_average_their_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (mut trainer, dataset, _) = setup(dir.path(), "unet_lr: 1e-30\n");
    let batches = dataset.epoch_batches(0, 1);
    // With a negligible learning rate the weights stay put (within f32), so each micro-batch's
    // loss can be measured alone. Micro-batch 0 of step 5 is a one-batch step 5.
    let both = trainer.step(&dataset, 5, &batches[..2]).unwrap();
    let first = trainer.step(&dataset, 5, &batches[..1]).unwrap();
    // Micro-batch 1 of step 5, computed by hand with its own draws.
    let cpu = Device::Cpu;
    let items = &batches[1].items;
    let views: Vec<_> = items.iter().map(|i| i.view()).collect();
    let LatentSource::Cached(cache) = &trainer.latents else {
        panic!("latents are cached by default")
    };
    let latents = cache.batch(&views, &cpu).unwrap();
    let captions: Vec<&str> = items.iter().map(|i| i.caption.as_str()).collect();
    let context = trainer
        .text_cache
        .as_ref()
        .unwrap()
        .batch(&captions, &cpu)
        .unwrap();
    let draws = Draws::sample(
        trainer.settings.seed,
        5,
        1,
        latents.dims(),
        trainer.noise.num_train_timesteps(),
        0.0,
        &cpu,
    )
    .unwrap();
    let second = diffusion_loss(
        &trainer.unet,
        &trainer.noise,
        &latents,
        &context,
        None,
        &draws,
        None,
    )
    .unwrap()
    .value;
    let mean = (first.loss + second) / 2.0;
    assert!(
        (both.loss - mean).abs() <= 1e-5 * mean,
        "step loss {} vs mean of micro-batches {mean} ({} and {second})",
        both.loss,
        first.loss
    );
    assert!(
        (first.loss - second).abs() > 1e-4,
        "two different micro-batches"
    );
}

#[test]
fn fp16_frozen_weights_train_like_f32_through_the_device_generic_path() {
    // `mixed_precision: fp16` is CUDA-only for users, but the CUDA code path (frozen weights
    // and activations in half, candle's ops with our own backward, adapters, optimizer state
    // and loss in f32) runs on the CPU too: the half-precision weights turn the CPU kernels
    // off. bf16 cannot be run here (candle has no CPU bf16 matmul); fp16 takes the same code.
    let dir = tempfile::tempdir().unwrap();
    // SGD: a weight's change is its gradient (AdamW's first steps are about its sign).
    for extra in [
        "optimizer: SGD\n",
        "optimizer: SGD\ntrain_text_encoder: true\ngradient_checkpointing: true\nmin_snr_gamma: 5\n",
    ] {
        let (mut full, dataset, _) = setup_in(dir.path(), extra, None);
        let (mut half, _, _) = setup_in(dir.path(), extra, Some(DType::F16));
        assert!(half
            .networks
            .trainable_vars()
            .iter()
            .all(|v| v.dtype() == DType::F32));
        let before = weights(&full);
        let batches = dataset.epoch_batches(0, 1);
        for step in 0..3 {
            let rf = full.step(&dataset, step, &batches[step..step + 1]).unwrap();
            let rh = half.step(&dataset, step, &batches[step..step + 1]).unwrap();
            assert!(
                (rf.loss - rh.loss).abs() <= 1e-2 * rf.loss,
                "{extra:?} step {step}: loss f32 {} vs f16 {}",
                rf.loss,
                rh.loss
            );
            assert_ne!(rf.loss, rh.loss, "the half run computes in half precision");
            assert!(
                (rf.grad_norm - rh.grad_norm).abs() <= 3e-2 * rf.grad_norm,
                "{extra:?} step {step}: gradient norm f32 {} vs f16 {}",
                rf.grad_norm,
                rh.grad_norm
            );
        }
        // Every adapter moved the same way: the f16 run's distance from the f32 run is small
        // next to how far the f32 run moved it (an adapter without a gradient in half precision
        // would be as far apart as it moved).
        let mut worst = 0f64;
        for ((b, f), h) in before.iter().zip(weights(&full)).zip(weights(&half)) {
            let (mut moved, mut apart) = (0f64, 0f64);
            for ((b, f), h) in b.iter().zip(&f).zip(&h) {
                moved += f64::from(f - b).powi(2);
                apart += f64::from(f - h).powi(2);
            }
            assert!(moved > 0.0, "{extra:?}: an adapter did not move");
            worst = worst.max((apart / moved).sqrt());
        }
        assert!(
            worst <= 0.05,
            "{extra:?}: an adapter of the f16 run is {worst} of its move from the f32 run"
        );
    }
}

#[test]
fn text_encoders_are_freed_once_every_caption_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    // Fixed captions, frozen encoders, no previews: the cache answers, the encoders go.
    let (trainer, _, _) = setup(dir.path(), "");
    assert!(trainer.text_cache.is_some());
    assert!(trainer.text_encoders.is_none());
    // Shuffled captions change between epochs: encoded at each step, so kept.
    let (trainer, _, _) = setup(dir.path(), "shuffle_caption: true\n");
    assert!(trainer.text_cache.is_none());
    assert!(trainer.text_encoders.is_some());
}
