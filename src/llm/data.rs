//! A language-model run's training data, ready for batches: every record of `train_data` read,
//! rendered with the model's chat template (or the plain one), tokenized and labelled, then cut
//! to `max_seq_length`; with the token-length facts the dry run reports and the fingerprint a
//! resumable state records.
//!
//! Nothing is dropped silently: a record the template cannot label is an error naming its line;
//! a record left with no learned token by the cut is left out, and said.

use std::path::Path;

use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use super::chat_template::ChatTemplate;
use super::labels::{tokenize, Tokenized, PLAIN_TEMPLATE};
use super::records::read_records;
use super::tokenizer::LmTokenizer;
use crate::config::{DataFormat, LlmData};
use crate::dataset::DatasetError;
use crate::rng::{stream, Purpose};
use crate::Result;

/// The tokenized records of a run.
#[derive(Debug, Clone)]
pub struct LmData {
    /// The samples trained on, cut to `max_seq_length`.
    pub samples: Vec<Tokenized>,
    /// The line (JSON Lines, CSV) or item number (JSON array) of each sample's record.
    pub lines: Vec<usize>,
    /// The format the records were read as (`auto` resolved).
    pub format: DataFormat,
    /// Every record's token count before the cut.
    pub lengths: Vec<usize>,
    /// Records longer than `max_seq_length`.
    pub truncated: usize,
    /// Lines of records that kept no learned token after the cut (left out).
    pub unlearned: Vec<usize>,
    /// Whether the model's own chat template rendered the records (else the plain one).
    pub model_template: bool,
    /// SHA-256 of the data file's bytes: what a state checks on resume.
    pub fingerprint: String,
}

impl LmData {
    /// Reads, renders and tokenizes `spec.train_data` with `tokenizer`; `started_at` (Unix
    /// seconds) is the date templates see.
    pub fn prepare(spec: &LlmData, tokenizer: &LmTokenizer, started_at: f64) -> Result<LmData> {
        LmData::prepare_file(&spec.train_data, spec, tokenizer, started_at)
    }

    /// [`LmData::prepare`] for the records of `path` (`eval_data`), read as `spec` says.
    pub fn prepare_file(
        path: &Path,
        spec: &LlmData,
        tokenizer: &LmTokenizer,
        started_at: f64,
    ) -> Result<LmData> {
        let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
        let fingerprint = hex(&Sha256::digest(&bytes));
        let records = read_records(path, spec.data_format)?;
        let plain;
        let template: &ChatTemplate = match &tokenizer.template {
            Some(t) => t,
            None => {
                plain = ChatTemplate::new(
                    PLAIN_TEMPLATE,
                    tokenizer.bos_token.clone(),
                    tokenizer.eos_token.clone(),
                )
                .map_err(|e| candle_core::Error::Msg(format!("the plain template: {e}")))?;
                &plain
            }
        };
        let mut template = template.clone();
        template.fix_date(started_at);
        let mut data = LmData {
            samples: Vec::new(),
            lines: Vec::new(),
            format: records.format,
            lengths: Vec::new(),
            truncated: 0,
            unlearned: Vec::new(),
            model_template: tokenizer.template.is_some(),
            fingerprint,
        };
        let mut problems = Vec::new();
        for record in &records.records {
            let tokenized = match tokenize(
                &record.sample,
                &template,
                tokenizer,
                spec.train_on_prompt,
                &[],
            ) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("line {}: {}", record.line, e.report()));
                    continue;
                }
            };
            data.lengths.push(tokenized.ids.len());
            let (cut, was_cut) = super::batches::truncate(&tokenized, spec.max_seq_length);
            if was_cut {
                data.truncated += 1;
            }
            // The first label is never predicted (nothing comes before it).
            if cut.labels.iter().skip(1).all(|&l| l < 0) {
                data.unlearned.push(record.line);
                continue;
            }
            data.samples.push(cut);
            data.lines.push(record.line);
        }
        let origin = path.display().to_string();
        if !problems.is_empty() {
            return Err(DatasetError::Problems {
                origin,
                problems,
                hint: Some(
                    "each record must render with the model's chat template with its answers \
                     written as given"
                        .to_string(),
                ),
            }
            .into());
        }
        if data.samples.is_empty() {
            return Err(DatasetError::Invalid(format!(
                "{origin}: no record has a token to learn within max_seq_length ({}): every \
                 answer lies beyond it; raise `max_seq_length`",
                spec.max_seq_length
            ))
            .into());
        }
        Ok(data)
    }

    /// Holds out `share` of the samples (at least one, at most all but one), chosen by `seed`:
    /// returns them; the rest stay. The same seed and share pick the same samples.
    pub fn split_off(&mut self, share: f64, seed: u64) -> LmData {
        let n = self.samples.len();
        let held = ((n as f64 * share).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut stream(seed, 0, 0, 0, Purpose::ValidationSplit));
        let mut chosen: Vec<usize> = order[..held.min(n)].to_vec();
        chosen.sort_unstable();
        let mut validation = LmData {
            samples: Vec::new(),
            lines: Vec::new(),
            format: self.format,
            lengths: Vec::new(),
            truncated: 0,
            unlearned: Vec::new(),
            model_template: self.model_template,
            fingerprint: self.fingerprint.clone(),
        };
        let (mut samples, mut lines) = (Vec::new(), Vec::new());
        for (i, (sample, line)) in self.samples.drain(..).zip(self.lines.drain(..)).enumerate() {
            if chosen.binary_search(&i).is_ok() {
                validation.samples.push(sample);
                validation.lines.push(line);
            } else {
                samples.push(sample);
                lines.push(line);
            }
        }
        self.samples = samples;
        self.lines = lines;
        validation
    }

    /// The token lengths before the cut: (min, median, 95th percentile, max, mean).
    pub fn length_summary(&self) -> LengthSummary {
        let mut sorted = self.lengths.clone();
        sorted.sort_unstable();
        let at = |q: f64| {
            let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            sorted.get(i).copied().unwrap_or(0)
        };
        let total: usize = sorted.iter().sum();
        LengthSummary {
            records: sorted.len(),
            min: sorted.first().copied().unwrap_or(0),
            median: at(0.5),
            p95: at(0.95),
            max: sorted.last().copied().unwrap_or(0),
            mean: total as f64 / sorted.len().max(1) as f64,
        }
    }

    /// Tokens trained on and tokens learned (labelled), over all samples.
    pub fn token_counts(&self) -> (usize, usize) {
        let tokens = self.samples.iter().map(|s| s.ids.len()).sum();
        let learned = self
            .samples
            .iter()
            .map(|s| s.labels.iter().skip(1).filter(|&&l| l >= 0).count())
            .sum();
        (tokens, learned)
    }
}

/// Token lengths of the records, before `max_seq_length` cuts them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthSummary {
    pub records: usize,
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
    pub mean: f64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
