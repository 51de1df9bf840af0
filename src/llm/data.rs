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
            if cut.learned() == 0 {
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

    /// Packs the samples, in order, into sequences of at most `max_len` tokens: each sample
    /// goes after the previous one when it fits, else starts the next sequence (none is split).
    /// A sample's first token is not learned from the one before it (another sample's), and
    /// attention across the samples of a sequence is causal as usual (TRL's and LLaMA-Factory's
    /// plain packing). Returns how many sequences there are; `lines` then names each sequence
    /// by its first sample's line.
    pub fn pack(&mut self, max_len: usize) -> usize {
        let mut packed: Vec<Tokenized> = Vec::new();
        let mut lines = Vec::new();
        for (sample, line) in self.samples.drain(..).zip(self.lines.drain(..)) {
            let fits = packed
                .last()
                .is_some_and(|p| p.ids.len() + sample.ids.len() <= max_len);
            if fits {
                if let Some(p) = packed.last_mut() {
                    p.ids.extend_from_slice(&sample.ids);
                    let mut labels = sample.labels;
                    if let Some(first) = labels.first_mut() {
                        *first = super::labels::IGNORED;
                    }
                    p.labels.extend(labels);
                }
            } else {
                packed.push(sample);
                lines.push(line);
            }
        }
        self.samples = packed;
        self.lines = lines;
        self.samples.len()
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
        let learned = self.samples.iter().map(Tokenized::learned).sum();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, first: u32) -> Tokenized {
        let ids: Vec<u32> = (first..first + n as u32).collect();
        Tokenized {
            labels: ids.iter().map(|&i| i64::from(i)).collect(),
            ids,
        }
    }

    fn data(samples: Vec<Tokenized>) -> LmData {
        LmData {
            lines: (1..=samples.len()).collect(),
            lengths: samples.iter().map(|s| s.ids.len()).collect(),
            samples,
            format: DataFormat::Text,
            truncated: 0,
            unlearned: Vec::new(),
            model_template: false,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn packing_fills_sequences_in_order_without_splitting_or_crossing_labels() {
        let mut d = data(vec![
            sample(3, 10),
            sample(3, 20),
            sample(5, 30),
            sample(1, 40),
        ]);
        assert_eq!(d.pack(6), 2);
        assert_eq!(d.samples[0].ids, [10, 11, 12, 20, 21, 22]);
        // The second sample's first token is not predicted from the first sample's last.
        assert_eq!(d.samples[0].labels, [10, 11, 12, -100, 21, 22]);
        assert_eq!(d.samples[1].ids, [30, 31, 32, 33, 34, 40]);
        assert_eq!(d.lines, [1, 3]);
    }

    #[test]
    fn a_split_holds_out_the_same_records_for_the_same_seed() {
        let all: Vec<Tokenized> = (0..10).map(|i| sample(2, i * 10)).collect();
        let (mut a, mut b) = (data(all.clone()), data(all));
        let (va, vb) = (a.split_off(0.2, 7), b.split_off(0.2, 7));
        assert_eq!(va.lines, vb.lines);
        assert_eq!((va.samples.len(), a.samples.len()), (2, 8));
        let mut every: Vec<usize> = a.lines.iter().chain(&va.lines).copied().collect();
        every.sort();
        assert_eq!(every, (1..=10).collect::<Vec<_>>());
        let mut c = data((0..10).map(|i| sample(2, i * 10)).collect());
        assert_ne!(c.split_off(0.2, 8).lines, va.lines);
    }
}
