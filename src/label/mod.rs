//! `auto_label`: captions for a folder of pictures, written to the `metadata.csv` that `train`
//! reads.
//!
//! CLIP cannot write sentences; it ranks phrases. As clip-interrogator does, each picture is
//! scored against vocabularies of phrases ([`vocab`], `tools/labels/`) and the best ones are
//! composed into a caption ([`compose`]); with `--captioner blip` a BLIP sentence ([`blip`])
//! leads instead of the best subject phrase. Pictures are prepared exactly as transformers'
//! image processors do ([`preprocess`], [`resample`]); the CLIP model itself lives in
//! [`crate::models::clip_model`]. Vocabulary embeddings are cached on disk ([`embed_cache`]).
//! Existing rows of the CSV are never changed unless `--overwrite` is given, and the file is
//! replaced atomically ([`metadata_csv`]). [`run`] ties it together.

pub mod blip;
pub mod compose;
pub mod embed_cache;
pub mod metadata_csv;
pub mod model_files;
pub mod preprocess;
pub mod resample;
pub mod run;
pub mod scorer;
pub mod vocab;

pub use compose::ComposeRules;
pub use embed_cache::EmbeddingCache;
pub use run::{default_output, run, Captioner, LabelOptions, LabelSummary, Progress, Silent};
