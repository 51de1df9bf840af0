//! Hub ids: a model already in the Hugging Face cache (as Python's huggingface_hub leaves it) is
//! used without any network; a model that is not there, offline or with a download that fails,
//! gives a message naming the files and where they go. No test touches the network: failing
//! downloads go to a closed port on this machine.

mod load_support;

use std::path::Path;

use load_support::*;
use lora_trainer::models::hub::HubCache;
use lora_trainer::models::load::{BaseModel, LoadOptions};
use lora_trainer::models::source::ModelSource;

/// A cache holding `org/tiny-sd1` = the tiny-sd1 folder, the way huggingface_hub lays it out.
fn filled_cache(root: &Path) -> std::path::PathBuf {
    let repo = root.join("models--org--tiny-sd1");
    let snapshot = repo.join("snapshots").join("0123456789abcdef");
    copy_tree(&fixture("tiny-sd1"), &snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    snapshot
}

/// Online, but every download goes to a closed local port.
fn unreachable_cache(root: &Path) -> HubCache {
    HubCache::at(root).with_endpoint("http://127.0.0.1:9")
}

#[test]
fn a_cached_model_loads_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = filled_cache(dir.path());
    let refs = references("tiny-sd1");
    for cache in [
        HubCache::at(dir.path()).with_offline(true),
        unreachable_cache(dir.path()),
    ] {
        let options = LoadOptions {
            hub_cache: cache.clone(),
            ..LoadOptions::default()
        };
        let source = ModelSource::detect_with("org/tiny-sd1", &cache).unwrap();
        assert!(matches!(&source, ModelSource::Hub { snapshot: Some(s), .. } if *s == snapshot));
        let ckpt = BaseModel::open(&source, &options).unwrap();
        assert!(ckpt.description().contains("org/tiny-sd1"));
        assert_matches_references(&outputs(&ckpt, &refs), &refs);
    }
    // A tokenizer given as a hub id comes from the same cache (here: the pipeline's tokenizer/).
    let options = LoadOptions {
        tokenizer: Some("org/tiny-sd1".into()),
        hub_cache: HubCache::at(dir.path()).with_offline(true),
        ..LoadOptions::default()
    };
    let ckpt =
        BaseModel::open_path(fixture("tiny-sd1.safetensors").to_str().unwrap(), &options).unwrap();
    assert_eq!(ckpt.tokenizer().unwrap().vocab_size(), 1000);
    assert!(ckpt
        .notes()
        .iter()
        .any(|n| n.contains("snapshots/0123456789abcdef/tokenizer")));
    // So does a VAE given as a hub id (here: the pipeline's vae/ folder).
    let options = LoadOptions {
        vae: Some("org/tiny-sd1".into()),
        hub_cache: HubCache::at(dir.path()).with_offline(true),
        ..LoadOptions::default()
    };
    let ckpt = BaseModel::open_path(fixture("tiny-sd2").to_str().unwrap(), &options).unwrap();
    assert!(ckpt
        .notes()
        .iter()
        .any(|n| n.starts_with("VAE: hub model org/tiny-sd1")));
    let decoded = ckpt
        .vae()
        .unwrap()
        .decode(&refs["vae.latent_mean"])
        .unwrap();
    assert_close("decoded", &decoded, &refs["vae.decoded"], 1e-4);
}

#[test]
fn an_absent_model_offline_lists_the_files_and_where_they_go() {
    let dir = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        hub_cache: HubCache::at(dir.path()).with_offline(true),
        ..LoadOptions::default()
    };
    let err = BaseModel::open_path("org/absent", &options)
        .err()
        .expect("absent")
        .to_string();
    for needle in [
        "org/absent",
        "HF_HUB_OFFLINE",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "huggingface-cli download org/absent",
        "models--org--absent/refs/main",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn an_incomplete_cached_model_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = filled_cache(dir.path());
    std::fs::remove_file(snapshot.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(snapshot.join("vae/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let options = LoadOptions {
        hub_cache: HubCache::at(dir.path()).with_offline(true),
        ..LoadOptions::default()
    };
    let err = BaseModel::open_path("org/tiny-sd1", &options)
        .err()
        .expect("incomplete")
        .to_string();
    assert!(
        err.contains("lacks some of its files")
            && err.contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    assert!(
        !err.contains("unet/config.json"),
        "present files are not listed: {err}"
    );
}

#[test]
fn a_failed_download_says_what_to_download() {
    let dir = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        hub_cache: unreachable_cache(dir.path()),
        ..LoadOptions::default()
    };
    let err = BaseModel::open_path("org/absent", &options)
        .err()
        .expect("no server")
        .to_string();
    assert!(err.contains("cannot list the repository's files"), "{err}");
    assert!(
        err.contains("unet/config.json") && err.contains("models--org--absent"),
        "{err}"
    );
}
