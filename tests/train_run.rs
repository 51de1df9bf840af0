//! Whole training runs on the tiny SD1 fixture: the loss falls, the files appear under the
//! right names, TensorBoard events read back, `save_last_n` prunes, a resumed run ends
//! bit-identical to an uninterrupted one, a non-finite loss stops cleanly, and an output folder
//! holding a finished run is not overwritten. The CLI side (SIGINT, exit codes) is in
//! tests/train_cli.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora_trainer::config::TrainPlan;
use lora_trainer::log::event_reader::{event_files, read_event_file, scalar_series};
use lora_trainer::log::{DisplayMode, TrainSummary};
use lora_trainer::preflight::Preflight;
use lora_trainer::train::{train, RunEnd, RunOptions, RunReport};

/// A project in a temporary folder: 4 pictures with captions and a config using the tiny SD1
/// fixture, every path absolute.
fn project(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    project_in(dir.path(), &model, extra);
    dir
}

/// [`project`] in the folder `root`, with the base model `model`.
fn project_in(root: &Path, model: &Path, extra: &str) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut csv = String::from("filename,prompt\n");
    for i in 0..4u32 {
        let name = format!("img{i}.png");
        image::RgbImage::from_fn(64, 64, |x, y| {
            let stripe = ((x / 8 + y / 8 + i) % 2) as u8;
            image::Rgb([stripe * 200 + (i * 10) as u8, (y * 3) as u8, (i * 60) as u8])
        })
        .save(data.join(&name))
        .unwrap();
        csv.push_str(&format!("{name},\"striped picture {i}\"\n"));
    }
    std::fs::write(data.join("metadata.csv"), csv).unwrap();
    let base = format!(
        "train_data_dir: {data}\nmetadata_path: {data}/metadata.csv\nresolution: 64\n\
         base_model: {model}\noutput_dir: {out}\nlora_rank: 4\nbatch_size: 2\nepochs: 6\n\
         learning_rate: 1e-2\nseed: 7\ndevice: cpu\ntrain_text_encoder: false\n",
        data = data.display(),
        model = model.display(),
        out = root.join("out/tiny").display(),
    );
    // `extra` replaces the base lines of the keys it sets.
    let key = |line: &str| line.split(':').next().unwrap_or("").trim().to_string();
    let overridden: Vec<String> = extra.lines().map(key).collect();
    let mut config: String = base
        .lines()
        .filter(|l| !overridden.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    config.push_str(extra);
    std::fs::write(root.join("config.yaml"), config).unwrap();
}

fn run_with(dir: &Path, sets: &[&str], resume: Option<&str>) -> lora_trainer::Result<RunReport> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let plan = TrainPlan::load(&dir.join("config.yaml"), &sets)?;
    let preflight = Preflight::check(plan)?;
    let options = RunOptions {
        resume: resume.map(str::to_string),
        overwrite: false,
        display: DisplayMode::Quiet,
        stop: Arc::new(AtomicBool::new(false)),
    };
    train(preflight, &options)
}

fn out(dir: &Path) -> PathBuf {
    dir.join("out/tiny")
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Tensor name → raw bytes of a safetensors file, and its metadata.
fn tensors(path: &Path) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (tensors, meta)
}

#[test]
fn a_tiny_run_learns_and_writes_every_output() {
    let dir = project("save_steps: 4\nsave_last_n: 2\n");
    let report = run_with(dir.path(), &[], None).unwrap();
    let out = out(dir.path());
    assert_eq!(
        report.end,
        RunEnd::Finished {
            lora: out.join("tiny.safetensors")
        }
    );
    // 4 pictures, batch 2: 2 steps per epoch, 12 in all; checkpoints at 4 and 8, then 12 is
    // the final file. save_last_n: 2 keeps both.
    assert_eq!(
        names(&out),
        [
            "config.yaml",
            "logs",
            "state-step00000004",
            "state-step00000008",
            "tiny-step00000004.safetensors",
            "tiny-step00000008.safetensors",
            "tiny.safetensors",
            "train_summary.json"
        ]
    );
    assert_eq!(
        names(&out.join("state-step00000008")),
        [
            "adapters.safetensors",
            "checksums.sha256",
            "config.yaml",
            "optimizer.json",
            "optimizer.safetensors",
            "state.json"
        ]
    );
    let summary = TrainSummary::read(&out.join("train_summary.json")).unwrap();
    assert_eq!((summary.steps, summary.total_steps), (12, 12));
    assert!(!summary.interrupted);
    assert_eq!(summary.files_written.len(), 5);

    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(config.contains("learning_rate: 0.01\n") && config.contains("output_name: \"tiny\""));

    let (lora, meta) = tensors(&out.join("tiny.safetensors"));
    assert!(
        lora.keys().all(|k| k.starts_with("lora_unet_")),
        "{:?}",
        lora.keys()
    );
    assert!(lora.keys().any(|k| k.ends_with(".lora_up.weight")));
    assert_eq!(meta["ss_steps"], "12");
    assert_eq!(meta["ss_output_name"], "tiny");
    let (step8, meta8) = tensors(&out.join("tiny-step00000008.safetensors"));
    assert_eq!(meta8["ss_steps"], "8");
    assert_ne!(step8, lora, "the step checkpoint holds earlier weights");

    let files = event_files(&out.join("logs")).unwrap();
    assert_eq!(files.len(), 1);
    let events = read_event_file(&files[0]).unwrap();
    let current = scalar_series(&events, "loss/current");
    assert_eq!(current.len(), 12);
    assert_eq!(current.first().map(|p| p.0), Some(1));
    assert_eq!(scalar_series(&events, "lr/unet").len(), 12);
    assert_eq!(scalar_series(&events, "norm/grad").len(), 12);
    let epochs = scalar_series(&events, "loss/epoch_average");
    assert_eq!(
        epochs.iter().map(|p| p.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    // Timesteps are random, so single epochs are noisy: compare the first two with the last two.
    let early = (epochs[0].1 + epochs[1].1) / 2.0;
    let late = (epochs[4].1 + epochs[5].1) / 2.0;
    assert!(
        late < 0.95 * early,
        "the loss falls: epoch averages {epochs:?}"
    );
}

#[test]
fn save_last_n_prunes_older_checkpoints() {
    let dir = project("save_steps: 2\nsave_last_n: 2\nepochs: 4\n");
    run_with(dir.path(), &[], None).unwrap();
    // Checkpoints at 2, 4, 6 (8 is the final step): the newest two are kept.
    let out = out(dir.path());
    let kept: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| n.contains("step"))
        .collect();
    assert_eq!(
        kept,
        [
            "state-step00000004",
            "state-step00000006",
            "tiny-step00000004.safetensors",
            "tiny-step00000006.safetensors"
        ]
    );
}

#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    // Accumulation, dropout, min-SNR, noise offset, flips, a schedule and AdamW8bit: everything
    // that draws randomness or keeps state.
    let extra = "save_steps: 3\nepochs: 3\ngradient_accumulation_steps: 2\nbatch_size: 1\n\
                 lora_dropout: 0.1\nmin_snr_gamma: 5\nnoise_offset: 0.05\nflip_aug: true\n\
                 scheduler: cosine\nlr_warmup_steps: 2\noptimizer: AdamW8bit\n";
    let dir = project(extra);
    run_with(dir.path(), &[], None).unwrap();
    let out = out(dir.path());
    let (whole, whole_meta) = tensors(&out.join("tiny.safetensors"));
    let summary = TrainSummary::read(&out.join("train_summary.json")).unwrap();
    assert_eq!(summary.total_steps, 6);

    let report = run_with(dir.path(), &[], Some("latest")).unwrap();
    assert!(matches!(report.end, RunEnd::Finished { .. }));
    assert_eq!(report.summary.resumed_from_step, Some(3));
    let (resumed, resumed_meta) = tensors(&out.join("tiny.safetensors"));
    assert_eq!(whole.len(), resumed.len());
    assert!(
        whole == resumed,
        "every tensor byte is the same after resuming"
    );
    assert_eq!(
        whole_meta["sshs_model_hash"],
        resumed_meta["sshs_model_hash"]
    );
    assert_eq!(
        whole_meta["ss_training_started_at"],
        resumed_meta["ss_training_started_at"]
    );
}

#[test]
fn resuming_with_a_config_that_changes_the_result_is_refused_by_name() {
    let dir = project("save_steps: 2\nepochs: 2\n");
    run_with(dir.path(), &[], None).unwrap();
    let e = run_with(dir.path(), &["learning_rate=2e-2"], Some("latest")).unwrap_err();
    let text = e.report();
    assert!(text.contains("`learning_rate`: 0.01 → 0.02"), "{text}");
    assert_eq!(e.exit_code(), 2);
    // Keys that do not change the weights may differ.
    run_with(
        dir.path(),
        &["log_with=none", "save_steps=1"],
        Some("latest"),
    )
    .unwrap();
    let e = run_with(dir.path(), &[], Some("/no/such/state")).unwrap_err();
    assert!(e.report().contains("no such folder"), "{}", e.report());
}

/// Copies the folder `from` (files and subfolders) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_project_moved_elsewhere_resumes_bit_identical_unless_its_data_changed() {
    // A project folder holding the data, the base model and the outputs; its config names
    // them by absolute path, as the resolved config in every state does.
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    copy_tree(&fixture, &first.join("model"));
    project_in(&first, &first.join("model"), "save_steps: 2\nepochs: 2\n");
    run_with(&first, &[], None).unwrap();
    let (whole, _) = tensors(&out(&first).join("tiny.safetensors"));

    // Moved (as to another machine): every path in the config changes, nothing is at the old
    // ones. The run resumes from step 2 and ends as the uninterrupted one did.
    let moved = dir.path().join("moved");
    std::fs::rename(&first, &moved).unwrap();
    std::fs::remove_file(out(&moved).join("tiny.safetensors")).unwrap();
    let config = std::fs::read_to_string(moved.join("config.yaml")).unwrap();
    let first_text = first.display().to_string();
    let moved_text = moved.display().to_string();
    let config = config.replace(&first_text, &moved_text);
    std::fs::write(moved.join("config.yaml"), &config).unwrap();
    let report = run_with(&moved, &[], Some("latest")).unwrap();
    assert_eq!(report.summary.resumed_from_step, Some(2));
    let (resumed, _) = tensors(&out(&moved).join("tiny.safetensors"));
    assert!(whole == resumed, "the moved project ends bit-identical");

    // Moved again, with a caption edited on the way: that is other data, refused by name.
    let again = dir.path().join("again");
    std::fs::rename(&moved, &again).unwrap();
    std::fs::remove_file(out(&again).join("tiny.safetensors")).unwrap();
    let csv = again.join("data/metadata.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, text.replace("striped picture 1", "a striped picture")).unwrap();
    std::fs::write(
        again.join("config.yaml"),
        config.replace(&moved_text, &again.display().to_string()),
    )
    .unwrap();
    let e = run_with(&again, &[], Some("latest")).unwrap_err();
    let text = e.report();
    assert!(text.contains("`train_data_dir`"), "{text}");
    assert!(text.contains("images and captions found differ"), "{text}");
    assert!(!text.contains("`base_model`"), "the model moved: {text}");

    // Back in the state's own place with the edited caption: the user's edit is respected
    // (with a note), and the result is not the uninterrupted run's.
    std::fs::rename(&again, &first).unwrap();
    std::fs::write(
        first.join("config.yaml"),
        config.replace(&moved_text, &first_text),
    )
    .unwrap();
    run_with(&first, &[], Some("latest")).unwrap();
    let (edited, _) = tensors(&out(&first).join("tiny.safetensors"));
    assert!(whole != edited, "trained on the edited caption");
}

/// Applies `change` to the file `name` of the state folder `state` and writes the checksums
/// again, as a state written that way would have them (damage that checksums cannot see).
fn rewrite_state_file(state: &Path, name: &str, change: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    use sha2::{Digest, Sha256};
    let path = state.join(name);
    std::fs::write(&path, change(std::fs::read(&path).unwrap())).unwrap();
    let sums_path = state.join("checksums.sha256");
    let sums: String = std::fs::read_to_string(&sums_path)
        .unwrap()
        .lines()
        .map(|line| {
            let (_, file) = line.split_once("  ").unwrap();
            let digest: String = Sha256::digest(std::fs::read(state.join(file)).unwrap())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{digest}  {file}\n")
        })
        .collect();
    std::fs::write(sums_path, sums).unwrap();
}

/// Replaces the first `from` in `bytes` with `to` (same length).
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(from)));
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

#[test]
fn a_damaged_state_is_refused_naming_the_file_and_a_sound_one_resumes() {
    let dir = project("save_steps: 2\nepochs: 2\n");
    run_with(dir.path(), &[], None).unwrap();
    let out = out(dir.path());
    let state = out.join("state-step00000002");
    let pristine = dir.path().join("pristine");
    copy_tree(&state, &pristine);
    let restore = || {
        std::fs::remove_dir_all(&state).unwrap();
        copy_tree(&pristine, &state);
    };
    let refused = |needles: &[&str]| {
        let e = run_with(dir.path(), &[], Some("latest")).unwrap_err();
        let text = e.report();
        for needle in needles {
            assert!(text.contains(needle), "{needle:?} not in: {text}");
        }
        assert_eq!(e.exit_code(), 2, "{text}");
        restore();
    };
    let last_byte_flipped = |mut bytes: Vec<u8>| {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        bytes
    };

    // Random damage inside the tensor files: the checksums see it.
    for name in [
        "adapters.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        let path = state.join(name);
        std::fs::write(&path, last_byte_flipped(std::fs::read(&path).unwrap())).unwrap();
        refused(&[name, "does not match its checksum"]);
    }
    std::fs::remove_file(state.join("checksums.sha256")).unwrap();
    refused(&["checksums.sha256: missing"]);

    // Damage with matching checksums (as if written so): each is still refused by name.
    rewrite_state_file(&state, "adapters.safetensors", |bytes| {
        let n = bytes.len();
        let mut bytes = bytes;
        bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        bytes
    });
    refused(&["adapters.safetensors", "NaN or infinite"]);
    rewrite_state_file(&state, "optimizer.json", |bytes| {
        let text = String::from_utf8(bytes).unwrap();
        let at = text.find(": 2").expect("a step count of 2");
        format!("{}: 0{}", &text[..at], &text[at + 3..]).into_bytes()
    });
    refused(&["optimizer.json", "step count of 0"]);
    rewrite_state_file(&state, "state.json", |b| {
        patch(b, b"\"step\": 2,", b"\"step\": 7,")
    });
    refused(&["state.json says step 7", "named for step 2"]);

    // An image whose pixels changed in place, under the same name.
    let image = dir.path().join("data/img2.png");
    let original = std::fs::read(&image).unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9]))
        .save(&image)
        .unwrap();
    refused(&["`img2.png`", "changed since the state was written"]);
    std::fs::write(&image, original).unwrap();

    // A state of the format before checksums is read with a note; a whole one resumes.
    std::fs::remove_file(state.join("checksums.sha256")).unwrap();
    let manifest = state.join("state.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"format\": 2", "\"format\": 1")).unwrap();
    let report = run_with(dir.path(), &[], Some("latest")).unwrap();
    assert_eq!(report.summary.resumed_from_step, Some(2));
    restore();
    let report = run_with(dir.path(), &[], Some("latest")).unwrap();
    assert_eq!(report.summary.resumed_from_step, Some(2));
}

#[test]
fn continuing_from_a_file_reports_the_layout_the_file_decides() {
    // A kohya-style file: every attention and feed-forward layer, rank 2, alpha 1.
    let first = project("lora_rank: 2\nlora_alpha: 1\ntarget_modules: kohya\nepochs: 1\n");
    run_with(first.path(), &[], None).unwrap();
    let file = out(first.path()).join("tiny.safetensors");
    // Continued under a config that says rank 4, alpha 4 (default targets q/v).
    let second = project(&format!(
        "network_weights: {}\nlora_alpha: 4\nepochs: 1\n",
        file.display()
    ));
    let plan = TrainPlan::load(&second.path().join("config.yaml"), &[]).unwrap();
    let plan_text = Preflight::check(plan).unwrap().to_string();
    assert!(
        plan_text.contains("rank 2, alpha 1, dropout 0: the file decides"),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("to_out.0") && !plan_text.contains("rank 4"),
        "{plan_text}"
    );
    run_with(second.path(), &[], None).unwrap();
    let (_, meta) = tensors(&out(second.path()).join("tiny.safetensors"));
    assert_eq!(meta["ss_network_dim"], "2");
    assert_eq!(meta["ss_network_alpha"], "1.0");
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    let targets = args["target_modules"].as_str().unwrap();
    assert!(
        targets.contains("to_k") && targets.contains("proj_in"),
        "{targets}"
    );
    let config = std::fs::read_to_string(out(second.path()).join("config.yaml")).unwrap();
    assert!(
        config.contains("# network_weights (") && config.contains("rank 2, alpha 1 on"),
        "{config}"
    );
}

#[test]
fn a_non_finite_loss_stops_and_keeps_the_checkpoints_before_it() {
    let dir = project("save_steps: 1\nlearning_rate: 1e30\nmax_grad_norm: 0\n");
    let e = run_with(dir.path(), &[], None).unwrap_err();
    let text = e.report();
    assert!(text.contains("not a finite number"), "{text}");
    assert!(text.contains("Lower `learning_rate`"), "{text}");
    assert_eq!(e.exit_code(), 1);
    let out = out(dir.path());
    let states: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| n.starts_with("state-step"))
        .collect();
    assert!(
        !states.is_empty(),
        "the steps before the failure were saved"
    );
    assert!(
        text.contains(&format!("step {}", states.len() + 1)),
        "{text} {states:?}"
    );
    assert!(!out.join("tiny.safetensors").exists());
    assert!(!out.join("train_summary.json").exists());
}

#[test]
fn a_finished_run_is_not_overwritten() {
    let dir = project("epochs: 1\n");
    run_with(dir.path(), &[], None).unwrap();
    let e = run_with(dir.path(), &[], None).unwrap_err();
    assert!(
        e.report().contains("already holds a finished run"),
        "{}",
        e.report()
    );
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn a_trained_text_encoder_and_live_latents_also_train() {
    let dir = project(
        "epochs: 1\ntrain_text_encoder: true\ncache_latents: false\nshuffle_caption: true\n\
         clip_skip: 2\ntext_encoder_lr: 5e-3\n",
    );
    run_with(dir.path(), &[], None).unwrap();
    let (lora, _) = tensors(&out(dir.path()).join("tiny.safetensors"));
    assert!(
        lora.keys().any(|k| k.starts_with("lora_te_")),
        "{:?}",
        lora.keys()
    );
    let events = read_event_file(&event_files(&out(dir.path()).join("logs")).unwrap()[0]).unwrap();
    let lr_te = scalar_series(&events, "lr/textencoder");
    assert_eq!(lr_te.len(), 2);
    assert!((lr_te[0].1 - 5e-3).abs() < 1e-9);
}

#[test]
fn latents_cached_to_disk_are_reused_and_give_the_same_result() {
    let dir = project("epochs: 1\ncache_latents_to_disk: true\nflip_aug: true\n");
    run_with(dir.path(), &[], None).unwrap();
    let out = out(dir.path());
    let cached = names(&out.join("latent_cache"));
    assert!(!cached.is_empty());
    let (first, _) = tensors(&out.join("tiny.safetensors"));
    std::fs::remove_file(out.join("tiny.safetensors")).unwrap();
    std::fs::remove_file(out.join("train_summary.json")).unwrap();
    run_with(dir.path(), &[], None).unwrap();
    assert_eq!(
        names(&out.join("latent_cache")),
        cached,
        "no new file: all were reused"
    );
    let (second, _) = tensors(&out.join("tiny.safetensors"));
    assert!(first == second);
}

#[test]
fn previews_are_drawn_at_first_and_every_n_steps() {
    let dir = project(
        "epochs: 2\nsample_prompts: [\"striped picture --w 64 --h 64 --s 2\", \"a dot --s 2 --w 64 --h 64 --d 3\"]\n\
         sample_every_n_steps: 3\nsample_at_first: true\nsample_sampler: euler_a\n",
    );
    run_with(dir.path(), &[], None).unwrap();
    let out = out(dir.path());
    // 4 steps: previews before step 1, after step 3 and after the last step.
    assert_eq!(
        names(&out.join("samples")),
        [
            "tiny_000000_00_7.png",
            "tiny_000000_01_3.png",
            "tiny_000003_00_7.png",
            "tiny_000003_01_3.png",
            "tiny_000004_00_7.png",
            "tiny_000004_01_3.png"
        ]
    );
    let events = read_event_file(&event_files(&out.join("logs")).unwrap()[0]).unwrap();
    let images = events
        .iter()
        .filter(|e| format!("{:?}", e.kind).contains("samples/0"))
        .count();
    assert_eq!(images, 6);
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(config.contains("sample_sampler: \"euler_a\""), "{config}");
}

#[test]
fn gradient_checkpointing_trains_the_same_lora() {
    let floats = |dir: &Path| -> BTreeMap<String, Vec<f32>> {
        let (tensors, _) = tensors(&out(dir).join("tiny.safetensors"));
        tensors
            .into_iter()
            .map(|(name, bytes)| {
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (name, values)
            })
            .collect()
    };
    // SGD: its update is linear in the gradient, so the float-rounding differences of the
    // recomputed forward stay at rounding size. (Adam divides by √v, which turns the ~1e-9
    // differences of near-zero early gradients into visible ones.)
    let extra = "epochs: 2\nsave_precision: fp32\nlora_dropout: 0.1\noptimizer: SGD\n\
                 learning_rate: 1.0\n";
    let plain = project(extra);
    run_with(plain.path(), &[], None).unwrap();
    let checkpointed = project(&format!("{extra}gradient_checkpointing: true\n"));
    run_with(checkpointed.path(), &[], None).unwrap();
    let (a, b) = (floats(plain.path()), floats(checkpointed.path()));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut moved = 0;
    for (name, x) in &a {
        let y = &b[name];
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                "{name}: {p} without checkpointing, {q} with"
            );
        }
        moved += usize::from(name.ends_with("lora_up.weight") && x.iter().any(|v| *v != 0.0));
    }
    assert!(moved > 0, "the LoRA trained at all");
}

#[test]
fn fp16_weights_kept_in_f16_on_the_cpu_train_bit_identically_to_f32() {
    // The demo model's files are fp16: widening each weight as it is used computes with
    // exactly the values an f32 copy holds, so the LoRA is the same, bit for bit, in half the
    // weight memory.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-sd");
    let mut loras = Vec::new();
    for precision in ["no", "fp16"] {
        let dir = tempfile::tempdir().unwrap();
        project_in(
            dir.path(),
            &model,
            &format!("epochs: 1\ntrain_text_encoder: true\nmixed_precision: {precision}\n"),
        );
        run_with(dir.path(), &[], None).unwrap();
        let (lora, _) = tensors(&out(dir.path()).join("tiny.safetensors"));
        assert!(lora.keys().any(|k| k.starts_with("lora_te_")));
        loras.push(lora);
    }
    assert!(loras[0] == loras[1], "f16-kept weights trained differently");
}
