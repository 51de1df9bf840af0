//! Building a caption from ranked phrases, the way clip-interrogator does: a lead (the best
//! subject phrase, or BLIP's sentence) followed by the best phrases of the flavour lists.
//!
//! The rules, all deterministic for fixed scores:
//! - a flavour phrase qualifies when its score beats the median score of its own list by at
//!   least `margin` (CLIP has no opinion about a list when nothing stands out, and then the
//!   list adds nothing);
//! - at most `top_k` phrases per list, best first, ties broken by the list's order;
//! - a phrase that repeats what the caption already says is skipped (near-duplicate: all its
//!   content words are already there, or it shares most of them with one chosen phrase;
//!   "neon lights" after "neon lighting");
//! - the caption must fit the text encoder (75 tokens between BOS and EOS): a phrase that does
//!   not fit is skipped, and shorter ones later may still fit.
//!
//! The prefix (a trigger word) comes first, then the lead, then the flavours, joined by ", ".

use std::collections::BTreeSet;

use crate::Result;

/// How flavour phrases are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ComposeRules {
    /// At most this many phrases per flavour list.
    pub top_k: usize,
    /// Cosine similarity a phrase must have above its list's median.
    pub margin: f32,
}

impl Default for ComposeRules {
    fn default() -> Self {
        ComposeRules {
            top_k: 2,
            margin: 0.03,
        }
    }
}

/// One flavour list with each phrase's score for the picture (same order).
#[derive(Debug, Clone, Copy)]
pub struct RankedList<'a> {
    pub phrases: &'a [String],
    pub scores: &'a [f32],
}

/// The index of the best score (the first of equal ones); `None` for an empty list.
pub fn best(scores: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|b| s > scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// The median of `scores` (the mean of the two middle values for an even count).
fn median(scores: &[f32]) -> f32 {
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Words that carry no content for duplicate detection.
const FILLER: [&str; 16] = [
    "a", "an", "the", "of", "with", "and", "in", "on", "at", "by", "to", "for", "from", "style",
    "styled", "looking",
];

/// The content words of a phrase, lower case, crudely stemmed ("lighting", "lights" → "light").
fn content_words(phrase: &str) -> BTreeSet<String> {
    phrase
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !FILLER.contains(&w.as_str()))
        .map(|w| stem(&w))
        .collect()
}

fn stem(word: &str) -> String {
    for suffix in ["ing", "ed", "es", "s"] {
        if let Some(root) = word.strip_suffix(suffix) {
            if root.chars().count() >= 3 {
                return root.to_string();
            }
        }
    }
    word.to_string()
}

/// Whether `candidate` adds nothing to the chosen phrases: every content word of it is already
/// in the caption, or it shares at least 60 % of the content words with one chosen phrase.
fn is_near_duplicate(candidate: &str, chosen: &[String]) -> bool {
    let words = content_words(candidate);
    if words.is_empty() {
        return true;
    }
    let said: BTreeSet<String> = chosen.iter().flat_map(|c| content_words(c)).collect();
    if words.is_subset(&said) {
        return true;
    }
    chosen.iter().any(|c| {
        let other = content_words(c);
        let shared = words.intersection(&other).count();
        let union = words.union(&other).count();
        union > 0 && shared * 10 >= union * 6
    })
}

/// Composes the caption. `fits` says whether a whole caption fits the text encoder.
pub fn compose(
    prefix: Option<&str>,
    lead: &str,
    flavours: &[RankedList],
    rules: &ComposeRules,
    fits: &dyn Fn(&str) -> Result<bool>,
) -> Result<String> {
    let mut parts: Vec<String> = Vec::new();
    if let Some(prefix) = prefix.map(str::trim).filter(|p| !p.is_empty()) {
        parts.push(prefix.to_string());
    }
    let lead = lead.trim();
    if !lead.is_empty() {
        parts.push(lead.to_string());
    }
    let mut chosen: Vec<String> = if lead.is_empty() {
        Vec::new()
    } else {
        vec![lead.to_string()]
    };
    for list in flavours {
        let n = list.phrases.len().min(list.scores.len());
        if n == 0 || rules.top_k == 0 {
            continue;
        }
        let threshold = median(&list.scores[..n]) + rules.margin;
        let mut order: Vec<usize> = (0..n).collect();
        // Best first; equal scores keep the list's order (a stable sort).
        order.sort_by(|&a, &b| list.scores[b].total_cmp(&list.scores[a]));
        let mut taken = 0;
        for i in order {
            if taken == rules.top_k || list.scores[i] < threshold {
                break;
            }
            let phrase = &list.phrases[i];
            if is_near_duplicate(phrase, &chosen) {
                continue;
            }
            let mut candidate = parts.clone();
            candidate.push(phrase.clone());
            if !fits(&candidate.join(", "))? {
                continue;
            }
            parts = candidate;
            chosen.push(phrase.clone());
            taken += 1;
        }
    }
    Ok(parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn always(_: &str) -> Result<bool> {
        Ok(true)
    }

    #[test]
    fn best_takes_the_first_of_equal_scores() {
        assert_eq!(best(&[0.1, 0.3, 0.3, 0.2]), Some(1));
        assert_eq!(best(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn lead_then_flavours_above_the_margin_in_list_order() -> Result<()> {
        let media = strings(&["photograph", "oil painting", "pixel art", "3d render"]);
        let lighting = strings(&["neon lighting", "candlelight", "moonlight", "soft light"]);
        let moods = strings(&["calm", "eerie", "festive"]);
        let flavours = [
            // median 0.20; 0.26 qualifies, 0.22 does not
            RankedList {
                phrases: &media,
                scores: &[0.26, 0.22, 0.18, 0.15],
            },
            // two above the margin
            RankedList {
                phrases: &lighting,
                scores: &[0.30, 0.20, 0.21, 0.29],
            },
            // nothing stands out: the list adds nothing
            RankedList {
                phrases: &moods,
                scores: &[0.20, 0.21, 0.205],
            },
        ];
        let caption = compose(
            Some("  mytoken "),
            "neon-lit city street at night",
            &flavours,
            &ComposeRules::default(),
            &always,
        )?;
        assert_eq!(
            caption,
            "mytoken, neon-lit city street at night, photograph, neon lighting, soft light"
        );
        let one = compose(
            None,
            "a cat",
            &flavours,
            &ComposeRules {
                top_k: 1,
                margin: 0.03,
            },
            &always,
        )?;
        assert_eq!(one, "a cat, photograph, neon lighting");
        let none = compose(
            None,
            "a cat",
            &flavours,
            &ComposeRules {
                top_k: 0,
                margin: 0.0,
            },
            &always,
        )?;
        assert_eq!(none, "a cat");
        Ok(())
    }

    #[test]
    fn equal_scores_keep_the_list_order_so_the_result_is_deterministic() -> Result<()> {
        let phrases = strings(&["rim lighting", "backlit", "candlelight", "w", "x", "y", "z"]);
        let list = [RankedList {
            phrases: &phrases,
            scores: &[0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
        }];
        let rules = ComposeRules {
            top_k: 2,
            margin: 0.1,
        };
        let first = compose(None, "a", &list, &rules, &always)?;
        assert_eq!(first, "a, rim lighting, backlit");
        for _ in 0..5 {
            assert_eq!(compose(None, "a", &list, &rules, &always)?, first);
        }
        Ok(())
    }

    #[test]
    fn near_duplicates_are_skipped() -> Result<()> {
        assert!(is_near_duplicate(
            "neon lights",
            &strings(&["neon lighting"])
        ));
        assert!(is_near_duplicate(
            "city street",
            &strings(&["neon-lit city street at night"])
        ));
        assert!(is_near_duplicate(
            "black and white",
            &strings(&["black and white photograph"])
        ));
        assert!(is_near_duplicate(
            "anime style",
            &strings(&["anime screenshot"])
        ));
        assert!(!is_near_duplicate(
            "portrait photography",
            &strings(&["portrait of a woman"])
        ));
        assert!(!is_near_duplicate(
            "glowing signs",
            &strings(&["neon lights"])
        ));
        let lighting = strings(&[
            "neon lights",
            "neon lighting",
            "moonlight",
            "a",
            "b",
            "c",
            "d",
        ]);
        let caption = compose(
            None,
            "city at night",
            &[RankedList {
                phrases: &lighting,
                scores: &[0.9, 0.8, 0.7, 0.0, 0.0, 0.0, 0.0],
            }],
            &ComposeRules {
                top_k: 2,
                margin: 0.1,
            },
            &always,
        )?;
        assert_eq!(caption, "city at night, neon lights, moonlight");
        Ok(())
    }

    #[test]
    fn phrases_that_overflow_the_token_budget_are_skipped() -> Result<()> {
        let phrases = strings(&["a very long phrase that will not fit", "short", "x", "y"]);
        let list = [RankedList {
            phrases: &phrases,
            scores: &[0.9, 0.8, 0.0, 0.0],
        }];
        // "fits" when at most 5 words.
        let fits = |text: &str| -> Result<bool> { Ok(text.split_whitespace().count() <= 5) };
        let rules = ComposeRules {
            top_k: 2,
            margin: 0.1,
        };
        assert_eq!(
            compose(None, "a cat", &list, &rules, &fits)?,
            "a cat, short"
        );
        Ok(())
    }
}
