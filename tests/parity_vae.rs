//! Parity with diffusers: our AutoencoderKL, loaded from the tiny diffusers folders in
//! `tests/fixtures/`, must reproduce diffusers' latent distribution and decoded image
//! (`tests/fixtures/tiny-sd*.reference.safetensors`, made by `tools/make_fixtures.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_trainer::models::vae::{AutoencoderKL, VaeConfig};
use lora_trainer::nn::weights::TensorSource;
use lora_trainer::nn::{Scope, WeightStore};

fn fixture(path: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    assert!(
        p.exists(),
        "missing fixture {} (made by tools/make_fixtures.py)",
        p.display()
    );
    p
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_dtype(DType::F64))
        .and_then(|m| m.to_scalar::<f64>())
        .unwrap_or(f64::NAN)
}

/// max |got − want| / max |want|.
fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&diff) / max_abs(want)
}

fn check_vae(variant: &str) {
    let dir = fixture(&format!("{variant}/vae"));
    let config = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let source =
        TensorSource::safetensors(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let store = WeightStore::from_source(source, DType::F32, Device::Cpu);
    let vae = AutoencoderKL::new(Scope::root(&store), &config).unwrap();
    store.check_all_used().unwrap();

    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture(&format!("{variant}.reference.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let get = |k: &str| {
        refs.get(k)
            .unwrap_or_else(|| panic!("{variant}: reference tensor `{k}` missing"))
            .clone()
    };
    let image = get("vae.image");
    let latent = vae.encode(&image).unwrap();
    let (_, _, h, w) = image.dims4().unwrap();
    let f = config.downsampling_factor();
    assert_eq!(
        latent.mean.dims(),
        &[image.dim(0).unwrap(), config.latent_channels, h / f, w / f]
    );
    for (name, got, key) in [
        ("mean", &latent.mean, "vae.latent_mean"),
        ("logvar", &latent.logvar, "vae.latent_logvar"),
    ] {
        let err = relative_error(got, &get(key));
        eprintln!("{variant}: latent {name} relative error {err:.2e}");
        assert!(
            err <= 1e-4,
            "{variant}: latent {name} differs from diffusers by {err:.2e} of its scale"
        );
    }
    // Decode diffusers' own mean, so the decoder is checked on its own.
    let decoded = vae.decode(&get("vae.latent_mean")).unwrap();
    let err = relative_error(&decoded, &get("vae.decoded"));
    eprintln!("{variant}: decoded relative error {err:.2e}");
    assert!(
        err <= 1e-4,
        "{variant}: decoded image differs from diffusers by {err:.2e} of its scale"
    );
}

#[test]
fn tiny_sd1_vae_matches_diffusers() {
    check_vae("tiny-sd1");
}

#[test]
fn tiny_sd2_vae_matches_diffusers() {
    check_vae("tiny-sd2");
}
