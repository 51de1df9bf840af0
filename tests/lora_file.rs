//! The LoRA file: export → import round trips (kohya and diffusers keys, bit-exact in fp32), the
//! header (every value a string, the keys DESIGN.md §4 lists, kohya's hashes checked against
//! values computed by kohya's own algorithm in Python), precisions, and import errors that name
//! the key.

mod lora_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora_support::*;
use lora_trainer::config::{LoraSettings, SaveFormat, SavePrecision, TargetPreset, TrainPlan};
use lora_trainer::lora::hash::{addnet_hashes, model_hash};
use lora_trainer::lora::{save_lora, LoraBase, LoraFile, LoraFormat, LoraNetworks, NetworkOptions};
use lora_trainer::models::family::ModelFamily;
use lora_trainer::preflight::StepCounts;

fn header_metadata() -> BTreeMap<String, String> {
    let config = "train_data_dir: data/x\nbase_model: ./models/v1-5-pruned.safetensors\n\
                  output_dir: out/style_v1\nlora_rank: 4\nlora_alpha: 2\nlearning_rate: 2e-4\n\
                  text_encoder_lr: 5e-5\nseed: 7\nclip_skip: 2\nmin_snr_gamma: 5\n\
                  conv_lora: true\nconv_rank: 2\nconv_alpha: 4\n";
    let plan = TrainPlan::from_yaml(config, Path::new("c.yaml"), &[], Path::new("/p")).unwrap();
    let steps = StepCounts::new(10, &plan.training);
    let mut m = lora_trainer::train::outputs::plan_metadata(&plan, &steps);
    m.num_train_images = 20;
    m.epoch = 1;
    m.steps = 5;
    m.training_started_at = 1_700_000_000.25;
    m.training_finished_at = Some(1_700_000_060.5);
    m.tag_frequency = BTreeMap::from([(
        "5_x".to_string(),
        BTreeMap::from([("neon".to_string(), 3), ("rain".to_string(), 1)]),
    )]);
    m.to_header()
}

fn networks_for(settings: &LoraSettings) -> lora_trainer::Result<LoraNetworks> {
    LoraNetworks::new(
        settings,
        LoraBase::sd(ModelFamily::Sd1),
        NetworkOptions::new(5, &Device::Cpu),
    )
}

/// Tiny SD1 networks with kohya's LoCon targets (linear, 1×1 and 3×3 adapters at two ranks and
/// alphas), filled with values.
fn trained() -> (LoraNetworks, LoraSettings) {
    let mut s = settings(preset(TargetPreset::Kohya));
    s.conv_lora = true;
    let nets = networks_for(&s).unwrap();
    let _ = tiny_models(&nets, DType::F32);
    nets.check_built().unwrap();
    fill(&nets.adapters(), 1);
    (nets, s)
}

fn save(
    nets: &LoraNetworks,
    dir: &Path,
    name: &str,
    format: SaveFormat,
    precision: SavePrecision,
) -> PathBuf {
    let path = dir.join(name);
    save_lora(
        &nets.adapters(),
        None,
        &path,
        format,
        precision,
        &header_metadata(),
    )
    .unwrap();
    path
}

/// Loads `path` as `network_weights` into fresh tiny models.
fn import(path: &Path, mut s: LoraSettings) -> lora_trainer::Result<LoraNetworks> {
    s.network_weights = Some(path.to_path_buf());
    let nets = networks_for(&s)?;
    try_tiny_models(&nets, DType::F32)?;
    nets.check_built()?;
    Ok(nets)
}

fn assert_same_weights(a: &LoraNetworks, b: &LoraNetworks, round: impl Fn(&Tensor) -> Tensor) {
    let (a, b) = (a.adapters(), b.adapters());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.spec(), y.spec(), "path, layer, rank and alpha");
        assert_eq!(
            bits(&round(x.down().as_tensor())),
            bits(y.down().as_tensor()),
            "{}",
            x.spec().path
        );
        assert_eq!(
            bits(&round(x.up().as_tensor())),
            bits(y.up().as_tensor()),
            "{}",
            x.spec().path
        );
    }
}

#[test]
fn kohya_and_diffusers_round_trips_are_bit_exact_in_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let (nets, s) = trained();
    for format in [SaveFormat::Kohya, SaveFormat::Diffusers] {
        let path = save(
            &nets,
            dir.path(),
            &format!("{format}.safetensors"),
            format,
            SavePrecision::Fp32,
        );
        let file = LoraFile::read(&path).unwrap();
        assert_eq!(
            file.format,
            if format == SaveFormat::Kohya {
                LoraFormat::Kohya
            } else {
                LoraFormat::Diffusers
            }
        );
        // Only a kohya file says it is a kohya network; a diffusers file says what diffusers
        // writes (A1111 and kohya would misread the claim, ComfyUI skips its `unet.` keys).
        let module = file.metadata.get("ss_network_module").map(String::as_str);
        let marker = file.metadata.get("format").map(String::as_str);
        match format {
            SaveFormat::Kohya => assert_eq!((module, marker), (Some("networks.lora"), None)),
            SaveFormat::Diffusers => assert_eq!((module, marker), (None, Some("pt"))),
        }
        // The file decides: other settings (rank 8, attn targets) must not matter.
        let mut other = s.clone();
        (other.rank, other.alpha, other.target_modules) = (8, 8.0, preset(TargetPreset::Attn));
        let back = import(&path, other).unwrap();
        assert_same_weights(&nets, &back, |t| t.clone());
        assert!(back
            .adapters()
            .iter()
            .any(|a| a.spec().rank == 2 && a.spec().alpha == 4.0));
    }
}

#[test]
fn half_precision_saves_round_the_weights_and_alphas() {
    let dir = tempfile::tempdir().unwrap();
    let (nets, s) = trained();
    for (precision, dtype) in [
        (SavePrecision::Fp16, DType::F16),
        (SavePrecision::Bf16, DType::BF16),
    ] {
        let path = save(
            &nets,
            dir.path(),
            "half.safetensors",
            SaveFormat::Kohya,
            precision,
        );
        let file = LoraFile::read(&path).unwrap();
        assert!(file
            .modules
            .iter()
            .all(|m| m.dtype == dtype && m.up.dtype() == dtype));
        let raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert!(
            raw.values().all(|t| t.dtype() == dtype),
            "alphas too, as kohya saves them"
        );
        let back = import(&path, s.clone()).unwrap();
        assert_same_weights(&nets, &back, |t| {
            t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
        });
    }
}

/// The header as JSON.
fn header(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match serde_json::from_slice(&bytes[8..8 + n]).unwrap() {
        serde_json::Value::Object(m) => m,
        other => panic!("header is {other}"),
    }
}

#[test]
fn header_values_are_strings_with_the_kohya_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (nets, _) = trained();
    let path = save(
        &nets,
        dir.path(),
        "style_v1.safetensors",
        SaveFormat::Kohya,
        SavePrecision::Fp16,
    );
    let h = header(&path);
    let serde_json::Value::Object(meta) = &h["__metadata__"] else {
        panic!("no __metadata__")
    };
    for (k, v) in meta {
        assert!(v.is_string(), "{k} = {v} is not a string");
    }
    let get = |k: &str| {
        meta.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("missing {k}"))
            .to_string()
    };
    for key in [
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "ss_sd_model_name",
        "ss_output_name",
        "ss_learning_rate",
        "ss_unet_lr",
        "ss_text_encoder_lr",
        "ss_optimizer",
        "ss_lr_scheduler",
        "ss_lr_warmup_steps",
        "ss_gradient_accumulation_steps",
        "ss_batch_size_per_device",
        "ss_num_train_images",
        "ss_num_epochs",
        "ss_epoch",
        "ss_steps",
        "ss_max_train_steps",
        "ss_resolution",
        "ss_seed",
        "ss_clip_skip",
        "ss_mixed_precision",
        "ss_noise_offset",
        "ss_min_snr_gamma",
        "ss_training_started_at",
        "ss_training_finished_at",
        "ss_tag_frequency",
        "sshs_model_hash",
        "sshs_legacy_hash",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.resolution",
    ] {
        get(key);
    }
    assert_eq!(get("ss_network_module"), "networks.lora");
    assert_eq!(
        (get("ss_network_dim"), get("ss_network_alpha")),
        ("4".into(), "2.0".into())
    );
    assert_eq!(get("ss_base_model_version"), "sd_v1");
    assert_eq!(get("ss_sd_model_name"), "v1-5-pruned.safetensors");
    assert_eq!(get("ss_output_name"), "style_v1");
    assert_eq!(
        (get("ss_learning_rate"), get("ss_text_encoder_lr")),
        ("0.0002".into(), "5e-05".into())
    );
    assert_eq!(
        (get("ss_resolution"), get("ss_seed"), get("ss_clip_skip")),
        ("(512, 512)".into(), "7".into(), "2".into())
    );
    assert_eq!(get("ss_min_snr_gamma"), "5.0");
    assert_eq!(get("ss_training_started_at"), "1700000000.25");
    let tags: serde_json::Value = serde_json::from_str(&get("ss_tag_frequency")).unwrap();
    assert_eq!(tags["5_x"]["neon"], 3);
    let args: serde_json::Value = serde_json::from_str(&get("ss_network_args")).unwrap();
    assert_eq!(
        (args["conv_dim"].as_str(), args["conv_alpha"].as_str()),
        (Some("2"), Some("4.0"))
    );
    assert_eq!(get("modelspec.architecture"), "stable-diffusion-v1/lora");
    assert_eq!(get("modelspec.date"), "2023-11-14T22:14:20");

    // Only LoRA tensors: down, up, 0-dim alpha.
    for (key, info) in h.iter().filter(|(k, _)| *k != "__metadata__") {
        assert!(
            key.starts_with("lora_unet_") || key.starts_with("lora_te_"),
            "{key}"
        );
        assert!(
            key.ends_with(".lora_down.weight")
                || key.ends_with(".lora_up.weight")
                || key.ends_with(".alpha"),
            "{key}"
        );
        if key.ends_with(".alpha") {
            assert_eq!(info["shape"], serde_json::json!([]), "{key}");
        }
    }

    // The hashes are kohya's: recomputed from the tensors with only the ss_ keys, and the model
    // hash is the sha256 of the data section of the file itself (metadata does not enter it).
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let pairs: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let (m, l) = addnet_hashes(
        &pairs,
        &meta
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect(),
    )
    .unwrap();
    assert_eq!(
        (get("sshs_model_hash"), get("sshs_legacy_hash")),
        (m.clone(), l)
    );
    assert_eq!(model_hash(&std::fs::read(&path).unwrap()), m);
}

/// `((i·mult + off) mod 61 − 30) / 32`: exact in f16.
fn fixture_values(n: usize, mult: usize, off: usize, dims: &[usize]) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * mult + off) % 61) as f32 - 30.0) / 32.0)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
}

/// Values computed by kohya's algorithm (`train_util.precalculate_safetensors_hashes`) with
/// torch 2.15 / safetensors 0.8.0 on the same tensors and metadata:
///
/// ```python
/// vals = lambda n, mult, off: ((((np.arange(n) * mult + off) % 61) - 30) / 32.0).astype(np.float32)
/// tensors = {"lora_unet_a_to_q.lora_down.weight": vals(256*1024, 7, 3).reshape(256, 1024) → f16, ...}
/// md = {k: v for k, v in metadata.items() if k.startswith("ss_")}
/// b = BytesIO(safetensors.torch.save(tensors, md)); sha256 after the header; sha256(b[0x100000:0x110000])[:8]
/// ```
#[test]
fn hashes_match_kohyas_algorithm_on_a_fixed_file() {
    let tensors = vec![
        (
            "lora_unet_a_to_q.lora_down.weight".to_string(),
            fixture_values(256 * 1024, 7, 3, &[256, 1024]),
        ),
        (
            "lora_unet_a_to_q.lora_up.weight".to_string(),
            fixture_values(1024 * 256, 11, 5, &[1024, 256]),
        ),
        (
            "lora_unet_a_to_q.alpha".to_string(),
            Tensor::new(4f32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        ),
        (
            "lora_te_text_model_b.lora_down.weight".to_string(),
            fixture_values(128 * 1024, 13, 1, &[128, 1024]),
        ),
        (
            "lora_te_text_model_b.lora_up.weight".to_string(),
            fixture_values(64 * 128, 17, 2, &[64, 128]),
        ),
    ];
    let metadata: BTreeMap<String, String> = [
        ("ss_network_dim", "8"),
        ("ss_output_name", "hash_fixture"),
        ("ss_tag_frequency", "{\"10_x\": {\"a\": 1}}"),
        ("modelspec.title", "not hashed"),
        ("sshs_model_hash", "not hashed either"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (model, legacy) = addnet_hashes(&tensors, &metadata).unwrap();
    assert_eq!(
        model,
        "8167a26c72bd9fe0677e35eacb5fac666bd1d9b8a201aa352893baa0b42292c0"
    );
    assert_eq!(legacy, "b165968a");
}

/// Writes a kohya file with `tensors`.
fn write(
    dir: &Path,
    name: &str,
    tensors: Vec<(&str, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> PathBuf {
    let path = dir.join(name);
    let bytes = safetensors::serialize(tensors, metadata).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn f32s(dims: &[usize]) -> Tensor {
    pseudo_random(dims, 3, 0.1, DType::F32)
}

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

#[test]
fn import_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(preset(TargetPreset::Default));
    let err = |path: &Path, s: LoraSettings| import(path, s).map(|_| ()).unwrap_err().to_string();
    let q = |suffix: &str| format!("{Q}.{suffix}");

    // A module the model does not have.
    let (qd, qu, ka) = (q("lora_down.weight"), q("lora_up.weight"), q("alpha"));
    let path = write(dir.path(), "extra.safetensors", vec![
        (qd.as_str(), f32s(&[4, 32])),
        (qu.as_str(), f32s(&[32, 4])),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q.lora_down.weight", f32s(&[4, 32])),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q.lora_up.weight", f32s(&[32, 4])),
    ], None);
    let e = err(&path, s.clone());
    assert!(e.contains("`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q.lora_down.weight` matches no module of the UNet"), "{e}");

    // A shape that does not fit the layer (to_q is 32 → 32 in the tiny UNet).
    let path = write(
        dir.path(),
        "shape.safetensors",
        vec![(qd.as_str(), f32s(&[4, 48])), (qu.as_str(), f32s(&[32, 4]))],
        None,
    );
    let e = err(&path, s.clone());
    assert!(
        e.contains(&format!("`{qd}` has shape [4, 48]")) && e.contains("needs [4, 32]"),
        "{e}"
    );

    // An SD 2.x file (1024-wide cross-attention) on an SD 1.x model.
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    let (kd, ku) = (
        format!("{k}.lora_down.weight"),
        format!("{k}.lora_up.weight"),
    );
    let path = write(
        dir.path(),
        "sd2.safetensors",
        vec![
            (kd.as_str(), f32s(&[4, 1024])),
            (ku.as_str(), f32s(&[320, 4])),
        ],
        None,
    );
    let e = err(&path, s.clone());
    assert!(
        e.contains("trained on SD 2.x")
            && e.contains("the base model is SD 1.x")
            && e.contains(&kd),
        "{e}"
    );
    // An SDXL file (two text encoders).
    let path = write(
        dir.path(),
        "sdxl.safetensors",
        vec![
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                f32s(&[4, 768]),
            ),
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                f32s(&[768, 4]),
            ),
        ],
        None,
    );
    assert!(err(&path, s.clone()).contains("trained on SDXL"));

    // Another algorithm.
    let path = write(
        dir.path(),
        "loha.safetensors",
        vec![(format!("{Q}.hada_w1_a").as_str(), f32s(&[4, 32]))],
        None,
    );
    let e = err(&path, s.clone());
    assert!(
        e.contains(&format!("`{Q}.hada_w1_a`")) && e.contains("LoHa"),
        "{e}"
    );

    // Text-encoder modules while the text encoder is not trained.
    let te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let (td, tu) = (
        format!("{te}.lora_down.weight"),
        format!("{te}.lora_up.weight"),
    );
    let path = write(
        dir.path(),
        "te.safetensors",
        vec![(td.as_str(), f32s(&[4, 64])), (tu.as_str(), f32s(&[64, 4]))],
        None,
    );
    let mut unet_only = s.clone();
    unet_only.train_text_encoder = false;
    let e = err(&path, unet_only);
    assert!(
        e.contains(&td) && e.contains("train_text_encoder: true"),
        "{e}"
    );

    // A file that is not a LoRA at all: exit status 2 with the reason.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x10\0\0\0\0\0\0\0{not json}").unwrap();
    let mut with_file = s.clone();
    with_file.network_weights = Some(bad);
    let e = networks_for(&with_file).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(
        e.to_string().contains("bad.safetensors: not a LoRA file"),
        "{e}"
    );

    // Alpha missing or 0 means alpha = rank.
    let path = write(
        dir.path(),
        "alpha.safetensors",
        vec![
            (qd.as_str(), f32s(&[4, 32])),
            (qu.as_str(), f32s(&[32, 4])),
            (ka.as_str(), Tensor::new(0f32, &Device::Cpu).unwrap()),
            (td.as_str(), f32s(&[2, 64])),
            (tu.as_str(), f32s(&[64, 2])),
        ],
        None,
    );
    let nets = import(&path, s.clone()).unwrap();
    let specs: Vec<(usize, f64)> = nets
        .adapters()
        .iter()
        .map(|a| (a.spec().rank, a.spec().alpha))
        .collect();
    assert_eq!(specs, [(4, 4.0), (2, 2.0)]);
}

#[test]
fn squeezed_1x1_convolution_matrices_are_accepted() {
    // Some trainers store a 1×1 convolution's LoRA as plain matrices; A1111 reshapes them.
    let dir = tempfile::tempdir().unwrap();
    let name = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let (d, u) = (
        format!("{name}.lora_down.weight"),
        format!("{name}.lora_up.weight"),
    );
    let path = write(
        dir.path(),
        "flat.safetensors",
        vec![(d.as_str(), f32s(&[4, 32])), (u.as_str(), f32s(&[32, 4]))],
        None,
    );
    let nets = import(&path, settings(preset(TargetPreset::Default))).unwrap();
    let adapter = &nets.adapters()[0];
    assert_eq!(
        (adapter.down().dims(), adapter.up().dims()),
        (&[4, 32, 1, 1][..], &[32, 4, 1, 1][..])
    );
    assert_eq!(bits(adapter.down().as_tensor()), bits(&f32s(&[4, 32])));
}
