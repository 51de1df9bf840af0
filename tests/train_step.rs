//! One optimizer step alone ([`Trainer::step`]) on the tiny SD1 fixture: deterministic, the
//! learning rate of the schedule reaches the optimizer, accumulated micro-batches average
//! their losses, and only the adapters change.

use std::path::Path;

use candle_core::Device;

use lora_trainer::config::TrainPlan;
use lora_trainer::dataset::Dataset;
use lora_trainer::log::DisplayMode;
use lora_trainer::plan::Preflight;
use lora_trainer::train::device::Compute;
use lora_trainer::train::setup::{set_up, Setup};
use lora_trainer::train::step::{diffusion_loss, Draws};
use lora_trainer::train::trainer::LatentSource;
use lora_trainer::train::Trainer;

fn setup(dir: &Path, extra: &str) -> (Trainer, Dataset, Preflight) {
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
         train_text_encoder: false\n{extra}",
        d = data.display(),
        m = model.display(),
        o = dir.join("out").display()
    );
    let plan = TrainPlan::from_yaml(&text, Path::new("c.yaml"), &[], dir).unwrap();
    let preflight = Preflight::check(plan).unwrap();
    let t = &preflight.plan.training;
    let compute = Compute::resolve(t.device, t.mixed_precision).unwrap();
    let dataset = Dataset::open(&preflight.plan.dataset_spec()).unwrap();
    let Setup { trainer, .. } = set_up(
        &preflight.plan,
        &preflight.steps,
        &compute,
        &dataset,
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
