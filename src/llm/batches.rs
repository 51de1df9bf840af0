//! Tokenized records into batches: cut to `max_seq_length`, grouped by length so that a batch
//! pads little (transformers' `group_by_length`: shuffled, then sorted by length within
//! mega-batches of 50 batches), and right-padded into one `[B, T]` tensor.
//!
//! Right padding needs no attention mask in a causal model: a position never attends to the
//! positions after it, so the padding changes no real position's logits, and its labels are
//! ignored by the loss.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;

use super::labels::{Tokenized, IGNORED};
use crate::rng::{stream, Purpose};
use crate::Result;

/// Batches per mega-batch, as transformers' `LengthGroupedSampler`.
const MEGA_BATCH: usize = 50;

/// `t` cut to its first `max_len` tokens; whether anything was cut.
pub fn truncate(t: &Tokenized, max_len: usize) -> (Tokenized, bool) {
    let n = t.ids.len().min(max_len);
    (
        Tokenized {
            ids: t.ids[..n].to_vec(),
            labels: t.labels[..n].to_vec(),
        },
        n < t.ids.len(),
    )
}

/// The order of epoch `epoch`'s batches over records of the given `lengths`: each batch a
/// list of record indices of similar length; the batches themselves shuffled. The same seed
/// and epoch give the same batches.
pub fn length_grouped(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut stream(seed, epoch, 0, 0, Purpose::RecordOrder));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in order.chunks(batch_size * MEGA_BATCH) {
        let mut mega = mega.to_vec();
        // Longest first, ties in shuffled order.
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut stream(seed, epoch, 0, 0, Purpose::RecordBatchOrder));
    batches
}

/// Records right-padded with `pad_id` into ids `[B, T]` (u32, `T` the longest) and labels
/// (`[B][T]`, the padding [`IGNORED`]).
pub fn collate(
    records: &[&Tokenized],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Vec<Vec<i64>>)> {
    let width = records.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(records.len() * width);
    let mut labels = Vec::with_capacity(records.len());
    for r in records {
        ids.extend_from_slice(&r.ids);
        ids.extend(std::iter::repeat_n(pad_id, width - r.ids.len()));
        let mut row = r.labels.clone();
        row.resize(width, IGNORED);
        labels.push(row);
    }
    Ok((
        Tensor::from_vec(ids, (records.len(), width), device)?,
        labels,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::causal_lm::{causal_lm_loss, CausalLm, LmFolder};
    use crate::nn::Scope;
    use candle_core::DType;

    #[test]
    fn batches_group_lengths_cover_every_record_once_and_repeat_with_the_seed() {
        let lengths: Vec<usize> = (0..23).map(|i| (i * 7) % 31 + 1).collect();
        let batches = length_grouped(&lengths, 4, 9, 0);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
        assert_eq!(batches.len(), 6);
        for b in &batches {
            // Within a batch, longest first.
            assert!(b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        assert_eq!(batches, length_grouped(&lengths, 4, 9, 0));
        assert_ne!(batches, length_grouped(&lengths, 4, 9, 1));
        let (cut, was_cut) = truncate(
            &Tokenized {
                ids: vec![1, 2, 3],
                labels: vec![-100, 2, 3],
            },
            2,
        );
        assert!(was_cut);
        assert_eq!((cut.ids, cut.labels), (vec![1, 2], vec![-100, 2]));
    }

    /// Two records of different lengths, right-padded into one batch: the loss is the mean of
    /// every labelled token's loss as if each record ran alone (the padding changes nothing).
    #[test]
    fn right_padding_changes_no_token_loss() {
        let folder = LmFolder::open(
            &crate::fixtures::root().join("llm/llama"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let model = CausalLm::new(Scope::root(&folder.weights), &folder.config).unwrap();
        let a = Tokenized {
            ids: vec![5, 9, 200, 3, 17, 40, 41],
            labels: vec![-100, -100, -100, 3, 17, 40, 41],
        };
        let b = Tokenized {
            ids: vec![8, 12, 99],
            labels: vec![-100, 12, 99],
        };
        let (ids, labels) = collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(ids.dims(), [2, 7]);
        let batch = causal_lm_loss(&model.forward(&ids).unwrap(), &labels)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Each alone: mean loss × labelled tokens (4 and 2), summed, over 6.
        let alone = |t: &Tokenized, n: f32| -> f32 {
            let ids = Tensor::new(t.ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let loss = causal_lm_loss(
                &model.forward(&ids).unwrap(),
                std::slice::from_ref(&t.labels),
            )
            .unwrap()
            .unwrap();
            loss.to_scalar::<f32>().unwrap() * n
        };
        let want = (alone(&a, 4.0) + alone(&b, 2.0)) / 6.0;
        assert!((batch - want).abs() < 1e-5, "{batch} vs {want}");
    }
}
