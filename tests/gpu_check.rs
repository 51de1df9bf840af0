//! The GPU check (`gpu_check`, tools/gpu_check.sh) run on the CPU, where f16 takes the device
//! path: its sections run, its comparisons pass, and its report is written, so the script a GPU
//! session runs first does not rot between the sessions that have a GPU.

use std::path::Path;

use lora_trainer::bench::device_check::{run_checks, BenchShape, CheckOptions};
use lora_trainer::bench::Preset;
use lora_trainer::config::{DeviceChoice, MixedPrecision};

#[test]
fn the_device_checks_pass_on_the_cpu_path_and_write_their_report() {
    let out = tempfile::tempdir().unwrap();
    let options = CheckOptions {
        device: DeviceChoice::Cpu,
        half: MixedPrecision::Fp16,
        root: Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        out: out.path().to_path_buf(),
        python: None,
        bench: Some(BenchShape {
            preset: Preset::Tiny,
            resolution: 64,
            batch: 1,
            steps: 1,
        }),
        demo: false,
    };
    let report = run_checks(&options).unwrap();
    let names: Vec<&str> = report.sections.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "forward f32",
            "forward fp16",
            "train step f32",
            "train step fp16",
            "bench",
            "bench, gradient checkpointing"
        ]
    );
    for section in &report.sections {
        assert!(
            section.error.is_none(),
            "{}: {:?}",
            section.name,
            section.error
        );
    }
    let steps = &report.sections[3];
    assert_eq!(
        steps.checks.len(),
        7,
        "three steps' loss and norm, and the updates"
    );
    assert!(report.passed, "{report:#?}");
    // Half precision is really used: its forward differs from diffusers' f32 outputs.
    assert!(report.sections[1].checks.iter().all(|c| c.value > 1e-5));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("gpu_check.json")).unwrap()).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["sections"].as_array().unwrap().len(), 6);
}

/// A device that cannot be opened (here: CUDA in a build without it) is the report's first
/// finding, written where the script collects it, not an error that leaves nothing behind.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_device_that_cannot_be_opened_is_reported_not_lost() {
    let out = tempfile::tempdir().unwrap();
    let options = CheckOptions {
        device: DeviceChoice::Cuda(0),
        half: MixedPrecision::Bf16,
        root: Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        out: out.path().to_path_buf(),
        python: None,
        bench: None,
        demo: false,
    };
    let report = run_checks(&options).unwrap();
    assert!(!report.passed);
    assert_eq!(report.sections.len(), 1);
    assert_eq!(report.sections[0].name, "open the device");
    let error = report.sections[0].error.as_deref().unwrap();
    assert!(error.contains("cuda"), "{error}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("gpu_check.json")).unwrap()).unwrap();
    assert_eq!(json["passed"], false);
}
