//! The `auto_label` command on the tiny CLIP (and BLIP) fixtures: a new metadata.csv that
//! `train`'s dataset reader accepts, hand edits kept on the next run, `--overwrite`,
//! `--prefix`, `--recursive`, unreadable images, the embedding cache, the offline message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_trainer::dataset::{parse_metadata, Dataset, DatasetSpec};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

/// A temporary folder with the three fixture pictures (renamed a/b/c) and a cache folder.
struct Workspace {
    root: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let images = root.path().join("images");
        std::fs::create_dir_all(&images).expect("mkdir");
        for (from, to) in [
            ("landscape", "a.png"),
            ("portrait", "b.png"),
            ("large", "c.png"),
        ] {
            std::fs::copy(
                fixtures().join("images").join(format!("{from}.png")),
                images.join(to),
            )
            .expect("copy");
        }
        Workspace { root }
    }

    fn images(&self) -> PathBuf {
        self.root.path().join("images")
    }

    fn csv(&self) -> PathBuf {
        self.images().join("metadata.csv")
    }

    fn read_csv(&self) -> String {
        std::fs::read_to_string(self.csv()).expect("metadata.csv")
    }

    fn rows(&self) -> Vec<(String, String)> {
        parse_metadata(self.read_csv().as_bytes())
            .expect("parses")
            .rows
            .into_iter()
            .map(|r| (r.file_name, r.caption))
            .collect()
    }

    fn run(&self, extra: &[&str]) -> Output {
        let model = fixtures().join("tiny-clip");
        self.run_model(model.to_str().expect("utf-8"), extra)
    }

    fn run_model(&self, model: &str, extra: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_auto_label"));
        command
            .arg("--input")
            .arg(self.images())
            .args(["--model", model])
            .arg("--cache-dir")
            .arg(self.root.path().join("cache"))
            .args(["--device", "cpu"])
            .args(extra)
            .env("HF_HUB_CACHE", self.root.path().join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HOME");
        command.output().expect("runs")
    }
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Opens the dataset exactly as `train` does.
fn train_accepts(folder: &Path, csv: &Path) -> Dataset {
    let spec = DatasetSpec {
        train_data_dir: folder.to_path_buf(),
        metadata_path: Some(csv.to_path_buf()),
        caption_extension: ".txt".to_string(),
        resolution: 64,
        resolution_given: true,
        enable_bucket: false,
        min_bucket_reso: 64,
        max_bucket_reso: 64,
        bucket_reso_steps: 64,
        random_crop: false,
        flip_aug: false,
        repeats: 1,
        caption_prefix: None,
        shuffle_caption: false,
        keep_tokens: 0,
        caption_dropout_rate: 0.0,
        skip_invalid_images: false,
        seed: 0,
    };
    Dataset::open(&spec).unwrap_or_else(|e| panic!("train refuses the CSV: {e}"))
}

#[test]
fn a_new_folder_gets_a_csv_train_accepts_and_a_second_run_keeps_hand_edits() {
    let ws = Workspace::new();
    let first = ws.run(&[]);
    assert!(first.status.success(), "{}", text(&first));
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains("3 new, 0 kept, 0 failed"),
        "{}",
        text(&first)
    );
    assert!(stdout.contains("images/s"), "{}", text(&first));
    let csv = ws.read_csv();
    assert!(csv.starts_with("filename,prompt\n"), "{csv}");
    let rows = ws.rows();
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["a.png", "b.png", "c.png"]
    );
    assert!(rows.iter().all(|(_, caption)| !caption.is_empty()));
    let dataset = train_accepts(&ws.images(), &ws.csv());
    assert_eq!(dataset.len(), 3);

    // The same pictures give the same captions (a fresh run, no cache).
    let again = Workspace::new();
    assert!(again.run(&["--no-cache"]).status.success());
    assert_eq!(again.read_csv(), csv);

    // Hand edits survive; nothing is rewritten when nothing is new.
    let edited: String = csv
        .lines()
        .map(|line| {
            if line.starts_with("b.png,") {
                "b.png,\"my own caption, with a comma\"\n".to_string()
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert_ne!(edited, csv);
    std::fs::write(ws.csv(), &edited).expect("edit");
    let second = ws.run(&[]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        String::from_utf8_lossy(&second.stdout)
            .contains("0 new, 3 kept, 0 failed (file unchanged)"),
        "{}",
        text(&second)
    );
    assert_eq!(ws.read_csv(), edited);

    // A new picture gets a row; the old bytes stay exactly as they were.
    std::fs::copy(ws.images().join("a.png"), ws.images().join("d.png")).expect("copy");
    let third = ws.run(&[]);
    assert!(third.status.success(), "{}", text(&third));
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("1 new, 3 kept"),
        "{}",
        text(&third)
    );
    let after = ws.read_csv();
    assert!(after.starts_with(&edited), "{after}");
    let rows = ws.rows();
    assert_eq!(
        rows[1],
        (
            "b.png".to_string(),
            "my own caption, with a comma".to_string()
        )
    );
    assert_eq!(rows[3].0, "d.png");
    assert_eq!(
        rows[3].1, rows[0].1,
        "the same picture gets the same caption"
    );
    train_accepts(&ws.images(), &ws.csv());
}

#[test]
fn overwrite_rewrites_captions_and_prefix_comes_first() {
    let ws = Workspace::new();
    std::fs::write(
        ws.csv(),
        "\u{feff}file_name,text,notes\r\na.png,hand written,keep me\r\n",
    )
    .expect("write");
    let keep = ws.run(&["--prefix", "zkw style"]);
    assert!(keep.status.success(), "{}", text(&keep));
    let rows = ws.rows();
    assert_eq!(rows[0], ("a.png".to_string(), "hand written".to_string()));
    assert!(rows[1].1.starts_with("zkw style, "), "{rows:?}");
    assert!(ws
        .read_csv()
        .starts_with("\u{feff}file_name,text,notes\r\na.png,hand written,keep me\r\n"));

    let over = ws.run(&["--overwrite", "--prefix", "zkw style"]);
    assert!(over.status.success(), "{}", text(&over));
    assert!(
        String::from_utf8_lossy(&over.stdout).contains("0 new, 0 kept, 3 rewritten"),
        "{}",
        text(&over)
    );
    let rows = ws.rows();
    assert!(
        rows.iter().all(|(_, c)| c.starts_with("zkw style, ")),
        "{rows:?}"
    );
    let csv = ws.read_csv();
    assert!(
        csv.starts_with("\u{feff}file_name,text,notes\r\na.png,"),
        "{csv}"
    );
    assert!(csv.contains(",keep me\r\n"), "other columns stay: {csv}");
    train_accepts(&ws.images(), &ws.csv());
}

#[test]
fn unreadable_images_are_listed_skipped_and_make_the_exit_status_1() {
    let ws = Workspace::new();
    std::fs::write(ws.images().join("broken.png"), b"not a picture at all").expect("write");
    let out = ws.run(&["--batch-size", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.png") && stderr.contains("skipped"),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 new, 0 kept, 1 failed"),
        "{}",
        text(&out)
    );
    let names: Vec<String> = ws.rows().into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["a.png", "b.png", "c.png"]);
    train_accepts(&ws.images(), &ws.csv());
}

#[test]
fn subfolders_need_recursive() {
    let ws = Workspace::new();
    let sub = ws.images().join("sub");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::rename(ws.images().join("c.png"), sub.join("c.png")).expect("move");
    assert!(ws.run(&[]).status.success());
    assert_eq!(ws.rows().len(), 2);
    let out = ws.run(&["--recursive"]);
    assert!(out.status.success(), "{}", text(&out));
    let names: Vec<String> = ws.rows().into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["a.png", "b.png", "sub/c.png"]);
    train_accepts(&ws.images(), &ws.csv());
}

#[test]
fn vocabulary_embeddings_are_cached_per_model_and_vocabulary() {
    let ws = Workspace::new();
    let first = ws.run(&[]);
    assert!(first.status.success(), "{}", text(&first));
    let cached: Vec<_> = std::fs::read_dir(ws.root.path().join("cache"))
        .expect("cache folder")
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1);
    let second = ws.run(&["--overwrite"]);
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("from the cache"),
        "{}",
        text(&second)
    );
    // Another vocabulary is another cache entry, and its phrases are what captions are made of.
    let vocab = ws.root.path().join("vocab");
    std::fs::create_dir_all(&vocab).expect("mkdir");
    std::fs::write(vocab.join("subjects.txt"), "a red square\na blue circle\n").expect("write");
    let third = ws.run(&["--overwrite", "--vocab", vocab.to_str().expect("utf-8")]);
    assert!(third.status.success(), "{}", text(&third));
    assert!(!String::from_utf8_lossy(&third.stderr).contains("from the cache"));
    assert!(ws
        .rows()
        .iter()
        .all(|(_, c)| c == "a red square" || c == "a blue circle"));
    assert_eq!(
        std::fs::read_dir(ws.root.path().join("cache"))
            .expect("cache")
            .count(),
        2
    );
}

#[test]
fn blip_writes_the_leading_sentence() {
    let ws = Workspace::new();
    let out = ws.run(&[
        "--captioner",
        "blip",
        "--blip-model",
        fixtures().join("tiny-blip").to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // transformers' greedy sentences for the three pictures (12 tokens; ours may go on).
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).expect("read");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let sentences: Vec<String> = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("blip.captions"))
            .expect("captions"),
    )
    .expect("json");
    for ((_, caption), sentence) in ws.rows().iter().zip(&sentences) {
        assert!(
            caption.starts_with(sentence.as_str()),
            "{caption:?} vs {sentence:?}"
        );
    }
}

#[test]
fn user_errors_exit_with_2_and_say_what_to_do() {
    let ws = Workspace::new();
    let out = ws.run_model("openai/clip-vit-large-patch14", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("download openai/clip-vit-large-patch14") && stderr.contains("--model"),
        "{stderr}"
    );
    assert!(!ws.csv().exists(), "nothing written");

    let empty = tempfile::tempdir().expect("dir");
    let out = Command::new(env!("CARGO_BIN_EXE_auto_label"))
        .arg("--input")
        .arg(empty.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contains no images"));

    std::fs::write(ws.csv(), "name,caption\na.png,x\n").expect("write");
    let out = ws.run(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not changed"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.read_csv(), "name,caption\na.png,x\n");
}
