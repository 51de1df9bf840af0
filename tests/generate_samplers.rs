//! The samplers' step maths against diffusers' schedulers: both are driven by the same
//! deterministic fake model (and, for Euler ancestral, the same recorded noise) and must follow
//! the same latent trajectory. Fixtures: `tools/make_sampler_fixtures.py`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use lora_trainer::generate::samplers::{SamplerKind, StepNoise};
use lora_trainer::generate::schedule::{SamplerConfig, SamplingSchedule};
use lora_trainer::models::noise::{NoiseSchedule, SchedulerConfig};
use lora_trainer::Result;
use serde::Deserialize;

const FIXTURE: &str = "tests/fixtures/samplers/trajectories.safetensors";

#[derive(Deserialize)]
struct Case {
    sampler: String,
    steps: usize,
    config: String,
    init_noise_sigma: f64,
}

struct Recorded {
    noise: Option<Tensor>,
}

impl StepNoise for Recorded {
    fn noise(&mut self, step: usize, like: &Tensor) -> Result<Tensor> {
        let all = self
            .noise
            .as_ref()
            .expect("only the ancestral sampler draws noise");
        Ok(all.get(step)?.unsqueeze(0)?.reshape(like.shape())?)
    }
}

fn fixture() -> (HashMap<String, Tensor>, HashMap<String, Case>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases = header.metadata().as_ref().unwrap()["cases"].clone();
    let cases: HashMap<String, Case> = serde_json::from_str(&cases).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    (tensors, cases)
}

/// `0.8 · x + (0.1 + t / 2000) · pattern`, as the fixture script's fake model.
fn fake_model(x: &Tensor, t: f64, pattern: &Tensor) -> Result<Tensor> {
    Ok((x.affine(0.8, 0.0)? + pattern.affine(0.1 + t / 2000.0, 0.0)?)?)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs one case; the worst step's max |ours − diffusers| relative to the scale of that step
/// (the larger of the max |x| before and after it: a step from σ = 4096 down to σ ≈ 3, as on a
/// zero-terminal-SNR schedule, loses f32 digits at the input's scale, in diffusers too).
fn run_case(name: &str, case: &Case, tensors: &HashMap<String, Tensor>) -> Result<f32> {
    let kind: SamplerKind = case.sampler.parse().unwrap();
    let scheduler: SchedulerConfig = serde_json::from_str(&case.config).unwrap();
    let noise = NoiseSchedule::from_config(&scheduler, name)?;
    let keys = SamplerConfig::from_json_str(&case.config, name)?;
    let schedule = SamplingSchedule::new(&noise, keys);
    let mut sampler = kind.build(&schedule, case.steps)?;

    let expected_t = tensors[&format!("{name}.timesteps")].to_vec1::<f64>()?;
    assert_eq!(
        sampler.timesteps(),
        expected_t.as_slice(),
        "{name}: timesteps"
    );
    let sigma = sampler.init_noise_sigma();
    assert!(
        (sigma - case.init_noise_sigma).abs() <= 1e-6 * case.init_noise_sigma.max(1.0),
        "{name}: init_noise_sigma {sigma} vs {}",
        case.init_noise_sigma
    );

    let pattern = &tensors["pattern"];
    let trajectory = &tensors[&format!("{name}.trajectory")];
    let mut noise = Recorded {
        noise: tensors.get(&format!("{name}.noise")).cloned(),
    };
    let mut x = (&tensors["x_T"] * sigma)?;
    let mut scale_before = max_abs(&x);
    let mut worst = 0f32;
    for (i, &t) in expected_t.iter().enumerate() {
        let input = sampler.scale_model_input(&x, i)?;
        let out = fake_model(&input, t, pattern)?;
        x = sampler.step(i, &out, &x, &mut noise)?;
        let reference = trajectory.get(i)?.unsqueeze(0)?;
        let scale_after = max_abs(&reference);
        let diff = max_abs(&(&x - &reference)?) / scale_before.max(scale_after).max(1e-6);
        worst = worst.max(diff);
        scale_before = scale_after;
    }
    Ok(worst)
}

#[test]
fn every_sampler_follows_diffusers_trajectories() -> Result<()> {
    let (tensors, cases) = fixture();
    assert_eq!(cases.len(), 72, "the fixture's cases");
    let mut names: Vec<&String> = cases.keys().collect();
    names.sort();
    let mut failures = Vec::new();
    for name in names {
        let worst = run_case(name, &cases[name], &tensors)?;
        if worst.is_nan() || worst > 1e-5 {
            failures.push(format!("{name}: relative difference {worst:e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn the_comparison_catches_a_wrong_step() -> Result<()> {
    // A sampler fed another prediction type must leave the reference trajectory: the tolerance
    // is tight enough to see it.
    let (tensors, cases) = fixture();
    let name = "dpmpp_2m.sd15.7";
    let original = &cases[name];
    let mut config = serde_json::from_str::<serde_json::Value>(&original.config).unwrap();
    config["prediction_type"] = "v_prediction".into();
    let altered = Case {
        sampler: original.sampler.clone(),
        steps: original.steps,
        config: config.to_string(),
        init_noise_sigma: original.init_noise_sigma,
    };
    assert!(run_case(name, &altered, &tensors)? > 1e-3);
    Ok(())
}
