//! Reading the config's keys one by one: aliases, duplicates, `--set` overrides, type and range
//! checks, and unknown keys with the closest valid name. Every problem is collected, so that a
//! user sees all of them at once.

use std::path::{Path, PathBuf};

use super::error::{Location, Problem};
use super::yaml::Value;

/// One `key: value` as given, in the file or on the command line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub at: Location,
}

/// The keys of one config file plus its `--set` overrides, consumed key by key.
pub struct Fields {
    origin: PathBuf,
    file: Vec<(Entry, bool)>,
    sets: Vec<(Entry, bool)>,
    /// Every canonical name and alias asked for so far: the candidates for "did you mean".
    known: Vec<&'static str>,
    problems: Vec<Problem>,
}

impl Fields {
    pub fn new(origin: &Path, file: Vec<Entry>, sets: Vec<Entry>) -> Self {
        Fields {
            origin: origin.to_path_buf(),
            file: file.into_iter().map(|e| (e, false)).collect(),
            sets: sets.into_iter().map(|e| (e, false)).collect(),
            known: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// The config file as a whole (for a missing key).
    pub fn file_level(&self) -> Location {
        Location::File {
            path: self.origin.clone(),
            line: None,
        }
    }

    pub fn problem(&mut self, at: Location, message: impl Into<String>) {
        self.problems.push(Problem {
            at,
            message: message.into(),
        });
    }

    /// The entry that sets `name` (or one of its aliases): a `--set` wins over the file. A key
    /// given twice in the file, or twice on the command line, is a problem.
    pub fn entry(&mut self, name: &'static str, aliases: &'static [&'static str]) -> Option<Entry> {
        self.known.push(name);
        self.known.extend_from_slice(aliases);
        let matches = |e: &Entry| e.key == name || aliases.contains(&e.key.as_str());
        let from_file = take_matching(&mut self.file, matches, &mut self.problems);
        let from_sets = take_matching(&mut self.sets, matches, &mut self.problems);
        from_sets.or(from_file)
    }

    /// Where `name` was set (the file as a whole when it was not): for cross-key messages.
    pub fn location_of(&self, name: &str, aliases: &[&str]) -> Location {
        let matches = |e: &&(Entry, bool)| e.0.key == name || aliases.contains(&e.0.key.as_str());
        self.sets
            .iter()
            .rev()
            .find(matches)
            .or_else(|| self.file.iter().find(matches))
            .map(|(e, _)| e.at.clone())
            .unwrap_or_else(|| self.file_level())
    }

    /// Whether `name` (or an alias) appears in the file or a `--set`.
    pub fn was_given(&self, name: &str, aliases: &[&str]) -> bool {
        let matches = |e: &(Entry, bool)| e.0.key == name || aliases.contains(&e.0.key.as_str());
        self.file.iter().chain(&self.sets).any(matches)
    }

    /// Removes every entry of `name` (or an alias), each a problem saying `why` it does not
    /// apply; later reads find the key unset.
    pub fn refuse(&mut self, name: &'static str, aliases: &'static [&'static str], why: &str) {
        self.known.push(name);
        let matches = |e: &Entry| e.key == name || aliases.contains(&e.key.as_str());
        let mut refused = Vec::new();
        for list in [&mut self.file, &mut self.sets] {
            list.retain(|(e, _)| {
                let hit = matches(e);
                if hit {
                    refused.push(e.clone());
                }
                !hit
            });
        }
        for e in refused {
            self.problem(e.at.clone(), format!("`{}` {why}", e.key));
        }
    }

    /// Reads `name` with `read`; `None` when it is absent or null (use the default), or when it
    /// is invalid (the problem is recorded, naming the key as the user wrote it).
    pub fn get<T>(
        &mut self,
        name: &'static str,
        aliases: &'static [&'static str],
        read: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let entry = self.entry(name, aliases)?;
        self.read_entry(&entry, read)
    }

    /// Reads one entry already found with [`Fields::entry`].
    pub fn read_entry<T>(
        &mut self,
        entry: &Entry,
        read: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        if entry.value.is_null() {
            return None;
        }
        match read(&entry.value) {
            Ok(value) => Some(value),
            Err(message) => {
                self.problem(entry.at.clone(), format!("`{}`: {message}", entry.key));
                None
            }
        }
    }

    /// Reports the keys nobody asked for, then returns every problem in file order (file lines
    /// first, then the `--set` arguments in the order given).
    pub fn finish(mut self) -> Vec<Problem> {
        let unused = self.file.iter().chain(&self.sets).filter(|(_, used)| !used);
        let unknown: Vec<Problem> = unused
            .map(|(e, _)| Problem {
                at: e.at.clone(),
                message: unknown_key(&e.key, &self.known),
            })
            .collect();
        self.problems.extend(unknown);
        // A stable sort keeps the order of problems found on the same line.
        self.problems.sort_by_key(|p| order(&p.at));
        self.problems
    }
}

/// Sort key: file-level problems first, then by line, then the `--set` arguments as given.
fn order(at: &Location) -> (u8, usize) {
    match at {
        Location::File { line, .. } => (0, line.unwrap_or(0)),
        Location::Set { index, .. } => (1, *index),
    }
}

/// Marks the entries matching a key as used; returns the first one and reports the others.
fn take_matching(
    entries: &mut [(Entry, bool)],
    matches: impl Fn(&Entry) -> bool,
    problems: &mut Vec<Problem>,
) -> Option<Entry> {
    let mut first: Option<Entry> = None;
    for (entry, used) in entries.iter_mut().filter(|(e, _)| matches(e)) {
        *used = true;
        match &first {
            None => first = Some(entry.clone()),
            Some(earlier) => problems.push(Problem {
                at: entry.at.clone(),
                message: duplicate(entry, earlier),
            }),
        }
    }
    first
}

fn duplicate(entry: &Entry, earlier: &Entry) -> String {
    let same = if earlier.key == entry.key {
        format!("`{}` is given twice", entry.key)
    } else {
        format!("`{}` and `{}` are the same key", entry.key, earlier.key)
    };
    let where_ = match &earlier.at {
        Location::File {
            line: Some(line), ..
        } => format!("line {line}"),
        other => other.to_string(),
    };
    format!("{same} (also at {where_}); keep one")
}

fn unknown_key(key: &str, known: &[&'static str]) -> String {
    match closest(key, known) {
        Some(best) => format!("unknown key `{key}`; did you mean `{best}`?"),
        None => format!(
            "unknown key `{key}`; the valid keys are listed in the config reference (README.md)"
        ),
    }
}

/// The known key closest to `key` by edit distance (transpositions count once), if close enough
/// to be a typo.
pub fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let key = key.to_ascii_lowercase();
    let (best, distance) = known
        .iter()
        .map(|k| (*k, strsim::damerau_levenshtein(&key, k)))
        .min_by_key(|(_, d)| *d)?;
    let allowed = (key.chars().count() / 3).max(2);
    (distance <= allowed).then_some(best)
}

// ---- readers: one per kind of value; each error says what was expected ----

/// `true` or `false`.
pub fn flag(v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", v.describe()))
}

/// An integer ≥ `min`.
pub fn int_at_least(min: i64) -> impl Fn(&Value) -> Result<i64, String> {
    move |v| {
        let n = v
            .as_i64()
            .ok_or_else(|| format!("expected an integer, found {}", v.describe()))?;
        if n < min {
            return Err(format!("must be at least {min}, found {n}"));
        }
        Ok(n)
    }
}

/// A count ≥ `min` (step counts, batch sizes, ranks...).
pub fn count(min: usize) -> impl Fn(&Value) -> Result<usize, String> {
    move |v| {
        let n = int_at_least(min as i64)(v)?;
        usize::try_from(n).map_err(|_| format!("{n} is too large"))
    }
}

/// A count from `min` to `max` (`max` said in the message with its reason).
pub fn count_up_to(
    min: usize,
    max: usize,
    why: &'static str,
) -> impl Fn(&Value) -> Result<usize, String> {
    move |v| {
        let n = count(min)(v)?;
        if n > max {
            return Err(format!("{n} is more than {max}: {why}"));
        }
        Ok(n)
    }
}

/// Like [`count`], for values the dataset keeps as `u32` (pixels, repeats, ranks).
pub fn small_count(min: u32) -> impl Fn(&Value) -> Result<u32, String> {
    move |v| {
        let n = int_at_least(i64::from(min))(v)?;
        u32::try_from(n).map_err(|_| format!("{n} is too large"))
    }
}

/// A number (integer or float) that passes `check`, described by `range` ("> 0", "in [0, 1)").
pub fn number(
    range: &'static str,
    check: fn(f64) -> bool,
) -> impl Fn(&Value) -> Result<f64, String> {
    move |v| {
        let x = v
            .as_f64()
            .ok_or_else(|| format!("expected a number, found {}", v.describe()))?;
        if !check(x) {
            return Err(format!("must be {range}, found {x}"));
        }
        Ok(x)
    }
}

pub fn positive(v: &Value) -> Result<f64, String> {
    number("greater than 0", |x| x > 0.0)(v)
}

pub fn non_negative(v: &Value) -> Result<f64, String> {
    number("at least 0", |x| x >= 0.0)(v)
}

/// A probability of dropping something: 0 ≤ p < 1.
pub fn rate(v: &Value) -> Result<f64, String> {
    number("in [0, 1) (a probability; 1 would drop everything)", |x| {
        (0.0..1.0).contains(&x)
    })(v)
}

/// Any scalar, as text.
pub fn text(v: &Value) -> Result<String, String> {
    v.as_text()
        .map(str::to_string)
        .ok_or_else(|| format!("expected text, found {}", v.describe()))
}

/// A scalar read by a choice's parser (`Optimizer::parse`...).
pub fn choice<T>(parse: fn(&str) -> Result<T, String>) -> impl Fn(&Value) -> Result<T, String> {
    move |v| parse(&text(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize) -> Location {
        Location::File {
            path: "c.yaml".into(),
            line: Some(line),
        }
    }

    fn entry(key: &str, value: &str, at: Location) -> Entry {
        Entry {
            key: key.into(),
            value: Value::Scalar {
                text: value.into(),
                quoted: false,
            },
            at,
        }
    }

    #[test]
    fn closest_key_catches_typos_only() {
        let known = ["lora_rank", "learning_rate", "batch_size", "optimizer"];
        assert_eq!(closest("lora_rnak", &known), Some("lora_rank"));
        assert_eq!(closest("learnig_rate", &known), Some("learning_rate"));
        assert_eq!(closest("Batch_Size", &known), Some("batch_size"));
        assert_eq!(closest("optimiser", &known), Some("optimizer"));
        assert_eq!(closest("xformers", &known), None);
    }

    #[test]
    fn set_wins_over_the_file_and_aliases_count_as_the_key() {
        let file = vec![entry("network_dim", "4", at(1))];
        let sets = vec![entry(
            "lora_rank",
            "16",
            Location::Set {
                index: 0,
                arg: "lora_rank=16".into(),
            },
        )];
        let mut f = Fields::new(Path::new("c.yaml"), file, sets);
        assert_eq!(f.get("lora_rank", &["network_dim"], count(1)), Some(16));
        assert!(f.finish().is_empty());
    }

    #[test]
    fn duplicates_unknown_keys_and_bad_values_are_all_reported_in_line_order() {
        let file = vec![
            entry("lora_rnak", "4", at(1)),
            entry("lora_rank", "0", at(2)),
            entry("network_dim", "8", at(3)),
        ];
        let mut f = Fields::new(Path::new("c.yaml"), file, vec![]);
        assert_eq!(f.get("lora_rank", &["network_dim"], count(1)), None);
        let problems: Vec<String> = f.finish().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            problems,
            [
                "c.yaml:1: unknown key `lora_rnak`; did you mean `lora_rank`?",
                "c.yaml:2: `lora_rank`: must be at least 1, found 0",
                "c.yaml:3: `network_dim` and `lora_rank` are the same key (also at line 2); keep one",
            ]
        );
    }

    #[test]
    fn readers_name_the_expected_type() {
        let v = |s: &str| Value::Scalar {
            text: s.into(),
            quoted: false,
        };
        assert_eq!(
            count(1)(&v("eight")).unwrap_err(),
            "expected an integer, found the text `eight`"
        );
        assert_eq!(
            flag(&v("yes")).unwrap_err(),
            "expected true or false, found the text `yes`"
        );
        assert_eq!(
            positive(&v("0")).unwrap_err(),
            "must be greater than 0, found 0"
        );
        assert!(rate(&v("1")).is_err() && rate(&v("0")).is_ok() && rate(&v("-0.1")).is_err());
        assert_eq!(
            text(&Value::Seq(vec![])).unwrap_err(),
            "expected text, found a list"
        );
        assert_eq!(
            count(1)(&v("2.5")).unwrap_err(),
            "expected an integer, found the number `2.5`"
        );
    }
}
