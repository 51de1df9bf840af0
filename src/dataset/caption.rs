//! What a caption becomes for one training sample: the trigger-word prefix, tag shuffling with
//! `keep_tokens` fixed tags, and caption dropout.

use rand::seq::SliceRandom;
use rand::Rng;

/// The caption options of the dataset spec.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionOptions {
    /// Put before every caption, joined with ", "; always stays first.
    pub prefix: Option<String>,
    /// Shuffle the comma-separated tags (after the first `keep_tokens`).
    pub shuffle: bool,
    /// Number of leading tags of the caption (not counting the prefix) kept in place.
    pub keep_tokens: usize,
    /// Probability that a sample trains with an empty caption.
    pub dropout_rate: f32,
}

impl CaptionOptions {
    /// The caption of one sample. `shuffle_rng` orders the tags and `dropout_rng` decides the
    /// dropout; they are separate streams so that one option does not change the other's draws.
    pub fn apply(
        &self,
        caption: &str,
        shuffle_rng: &mut impl Rng,
        dropout_rng: &mut impl Rng,
    ) -> String {
        if self.dropout_rate > 0.0 && dropout_rng.random::<f32>() < self.dropout_rate {
            return String::new();
        }
        let caption = caption.trim();
        let body = if self.shuffle {
            let mut tags = split_tags(caption);
            let keep = self.keep_tokens.min(tags.len());
            tags[keep..].shuffle(shuffle_rng);
            tags.join(", ")
        } else {
            caption.to_string()
        };
        match self
            .prefix
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            Some(prefix) if body.is_empty() => prefix.to_string(),
            Some(prefix) => format!("{prefix}, {body}"),
            None => body,
        }
    }
}

/// The tags of a caption: split on commas, trimmed, empty ones dropped.
pub fn split_tags(caption: &str) -> Vec<&str> {
    caption
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn options() -> CaptionOptions {
        CaptionOptions {
            prefix: None,
            shuffle: false,
            keep_tokens: 0,
            dropout_rate: 0.0,
        }
    }

    #[test]
    fn prefix_is_joined_with_comma() {
        let o = CaptionOptions {
            prefix: Some("cybrpnk".into()),
            ..options()
        };
        assert_eq!(
            o.apply(" neon city ", &mut rng(1), &mut rng(2)),
            "cybrpnk, neon city"
        );
        assert_eq!(
            options().apply("neon city", &mut rng(1), &mut rng(2)),
            "neon city"
        );
    }

    #[test]
    fn shuffle_keeps_the_first_tokens_and_the_prefix() {
        let o = CaptionOptions {
            prefix: Some("trigger".into()),
            shuffle: true,
            keep_tokens: 2,
            ..options()
        };
        let caption = "a, b, c, d, e, f, g, h";
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let out = o.apply(caption, &mut rng(seed), &mut rng(0));
            let tags: Vec<&str> = out.split(", ").collect();
            assert_eq!(&tags[..3], ["trigger", "a", "b"], "{out}");
            let mut rest: Vec<&str> = tags[3..].to_vec();
            seen.insert(rest.join(","));
            rest.sort();
            assert_eq!(rest, ["c", "d", "e", "f", "g", "h"]);
        }
        assert!(seen.len() > 10, "the tail is not really shuffled: {seen:?}");
    }

    #[test]
    fn shuffle_is_deterministic_per_rng_seed() {
        let o = CaptionOptions {
            shuffle: true,
            ..options()
        };
        let caption = "one, two, three, four, five, six";
        let a = o.apply(caption, &mut rng(7), &mut rng(0));
        assert_eq!(a, o.apply(caption, &mut rng(7), &mut rng(0)));
        assert!((8..40).any(|s| o.apply(caption, &mut rng(s), &mut rng(0)) != a));
    }

    #[test]
    fn dropout_rate_empties_about_that_share() {
        let o = CaptionOptions {
            prefix: Some("p".into()),
            dropout_rate: 0.25,
            ..options()
        };
        let dropped = (0..2000)
            .filter(|&s| o.apply("x", &mut rng(0), &mut rng(s)).is_empty())
            .count();
        assert!((400..600).contains(&dropped), "{dropped} of 2000 dropped");
        let never = CaptionOptions {
            dropout_rate: 0.0,
            ..options()
        };
        assert!((0..200).all(|s| !never.apply("x", &mut rng(0), &mut rng(s)).is_empty()));
    }

    #[test]
    fn tags_are_trimmed_and_empty_ones_dropped() {
        assert_eq!(split_tags(" a ,, b,  c , "), ["a", "b", "c"]);
    }
}
