//! The noise schedule against diffusers: `alphas_cumprod` of every supported beta schedule
//! (`tests/fixtures/noise_schedules.safetensors`, whose metadata holds each config), and
//! `add_noise`, `get_velocity`, `compute_snr` on the tiny models' schedulers
//! (`tiny-sd{1,2}.reference.safetensors`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lora_trainer::models::noise::{NoiseSchedule, PredictionType, SchedulerConfig};

fn fixture(path: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    assert!(
        path.exists(),
        "{} is missing (regenerate with tools/make_fixtures.py)",
        path.display()
    );
    path
}

fn load(path: &Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).expect("fixture tensors");
    let bytes = std::fs::read(path).expect("fixture file");
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).expect("fixture header");
    (tensors, metadata.metadata().clone().unwrap_or_default())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let ours = ours
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("ours");
    let reference = reference
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("reference");
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&ours, &reference);
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max |diff| {diff:e} > 1e-4 × max |ref| {scale:e}"
    );
}

#[test]
fn alphas_cumprod_of_every_beta_schedule_matches_diffusers() {
    let (tensors, metadata) = load(&fixture("noise_schedules.safetensors"));
    let configs: HashMap<String, serde_json::Value> =
        serde_json::from_str(metadata.get("configs").expect("`configs` in the metadata"))
            .expect("configs JSON");
    assert!(
        configs.len() >= 4,
        "linear, scaled_linear, squaredcos_cap_v2 and a zero-SNR schedule"
    );
    for (key, config) in &configs {
        let config: SchedulerConfig =
            serde_json::from_value(config.clone()).expect("scheduler config");
        let schedule = NoiseSchedule::from_config(&config, key).expect("schedule");
        let reference = tensors[key].to_vec1::<f32>().expect("reference");
        // Bit-exact except where the zero-SNR rescale goes through torch's sqrt, which is not
        // correctly rounded (1 ulp apart on some values).
        let diff = max_abs_diff(schedule.alphas_cumprod(), &reference);
        assert!(diff <= 2.5e-7, "{key}: max |diff| {diff:e}");
        if !config.rescale_betas_zero_snr {
            assert_eq!(
                schedule.alphas_cumprod(),
                reference.as_slice(),
                "{key}: not bit-exact"
            );
        } else {
            assert_eq!(schedule.alphas_cumprod()[999], 0.0, "{key}: terminal ᾱ");
        }
    }
}

fn check_variant(variant: &str, prediction: PredictionType) {
    let (r, _) = load(&fixture(&format!("{variant}.reference.safetensors")));
    let schedule = NoiseSchedule::from_file(&fixture(&format!(
        "{variant}/scheduler/scheduler_config.json"
    )))
    .expect("schedule");
    assert_eq!(schedule.prediction_type(), prediction);
    let reference = r["noise.alphas_cumprod"].to_vec1::<f32>().expect("ᾱ");
    assert_eq!(
        schedule.alphas_cumprod(),
        reference.as_slice(),
        "{variant}: alphas_cumprod"
    );
    let (x0, noise, t) = (&r["noise.x0"], &r["noise.noise"], &r["noise.timesteps"]);
    let steps = t.to_vec1::<i64>().expect("timesteps");
    assert_ne!(
        steps[0], steps[1],
        "the fixture should use two different timesteps"
    );
    let noisy = schedule.add_noise(x0, noise, t).expect("add_noise");
    assert_close(&noisy, &r["noise.noisy"], &format!("{variant}: add_noise"));
    let velocity = schedule.velocity(x0, noise, t).expect("velocity");
    assert_close(
        &velocity,
        &r["noise.velocity"],
        &format!("{variant}: get_velocity"),
    );
    let snr = schedule.snr(t).expect("snr");
    assert_close(&snr, &r["noise.snr"], &format!("{variant}: compute_snr"));

    let target = schedule.target(x0, noise, t).expect("target");
    let expected = match prediction {
        PredictionType::Epsilon => noise,
        PredictionType::VPrediction => &r["noise.velocity"],
    };
    assert_close(&target, expected, &format!("{variant}: target"));

    // Min-SNR-γ as diffusers' train_text_to_image computes it from `compute_snr`.
    let gamma = 5.0f32;
    let snr = r["noise.snr"].to_vec1::<f32>().expect("snr");
    let weights = schedule
        .min_snr_weight(t, gamma as f64)
        .expect("weights")
        .to_vec1::<f32>()
        .expect("weights");
    for (s, w) in snr.iter().zip(&weights) {
        let expected = match prediction {
            PredictionType::Epsilon => s.min(gamma) / s,
            PredictionType::VPrediction => s.min(gamma) / (s + 1.0),
        };
        assert!(
            (w - expected).abs() <= 1e-6 * expected.abs().max(1.0),
            "{variant}: weight {w} vs {expected} at snr {s}"
        );
    }
}

#[test]
fn tiny_sd1_epsilon_schedule_matches_diffusers() {
    check_variant("tiny-sd1", PredictionType::Epsilon);
}

#[test]
fn tiny_sd2_v_prediction_schedule_matches_diffusers() {
    check_variant("tiny-sd2", PredictionType::VPrediction);
}
