//! A small YAML reader that keeps line numbers: serde_yaml does not expose where a key was
//! written, and every config message must name its line.
//!
//! The text is read with `saphyr-parser`'s event stream into a plain [`Value`] tree. Scalars keep
//! their text; their type (null, bool, integer, float, string) is decided by the YAML 1.2 core
//! schema when a key asks for one, so `1e-4` is a float and `"512,512"` stays text.

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};
use std::collections::HashMap;

/// The deepest nesting of lists and mappings a config may have (a real one has three levels).
pub const MAX_DEPTH: usize = 64;
/// The most values (scalars, lists, mappings) a config may hold once its `*alias` references
/// are expanded: an alias copies its anchor's value, so a few lines of nested aliases can stand
/// for billions of values ("billion laughs").
pub const MAX_VALUES: usize = 100_000;

/// One YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written; `quoted` is true for `'…'`, `"…"` and block scalars (`|`, `>`).
    Scalar { text: String, quoted: bool },
    /// A sequence, block (`- a`) or flow (`[a, b]`).
    Seq(Vec<Value>),
    /// A mapping: each key (as text) with the line it was written on (1-based) and its value.
    Map(Vec<MapEntry>),
}

/// One `key: value` pair of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct MapEntry {
    pub key: String,
    /// 1-based line of the key.
    pub line: usize,
    pub value: Value,
}

/// A syntax error: message plus 1-based line and column.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl Value {
    fn plain(text: &str) -> Value {
        Value::Scalar {
            text: text.to_string(),
            quoted: false,
        }
    }

    /// `~`, `null`, an empty plain scalar: "no value", which means "use the default".
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Scalar { text, quoted: false }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The scalar's text (any non-null scalar: `512`, `true` and `"abc"` all have one).
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Scalar { text, .. } if !self.is_null() => Some(text),
            _ => None,
        }
    }

    /// `true`/`false` (also `True`, `TRUE`, ...), as the core schema reads them.
    pub fn as_bool(&self) -> Option<bool> {
        match self.as_text()? {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => None,
        }
    }

    /// A decimal integer (`512`, `-3`, `+7`).
    pub fn as_i64(&self) -> Option<i64> {
        let text = self.as_text()?.trim();
        let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }

    /// A finite number, integer or float (`1e-4`, `0.5`, `3`).
    pub fn as_f64(&self) -> Option<f64> {
        let text = self.as_text()?.trim();
        // Rust also reads `inf`, `NaN` and `infinity`: no config value may be one of those.
        let looks_numeric = text.bytes().any(|b| b.is_ascii_digit())
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
        if !looks_numeric {
            return None;
        }
        text.parse::<f64>().ok().filter(|x| x.is_finite())
    }

    /// What this value is, for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping (nested `key: value` lines)".to_string(),
            _ if self.is_null() => "no value".to_string(),
            Value::Scalar { text, .. } => {
                if self.as_bool().is_some() {
                    format!("the boolean `{text}`")
                } else if self.as_f64().is_some() {
                    format!("the number `{text}`")
                } else {
                    format!("the text `{text}`")
                }
            }
        }
    }
}

/// Reads one YAML document. An empty text is a null value.
pub fn parse(text: &str) -> Result<Value, SyntaxError> {
    let mut builder = Builder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| syntax_error(text, &e))?;
        builder.on_event(event, span)?;
    }
    Ok(builder.root.unwrap_or_else(|| Value::plain("")))
}

/// Prefers serde_yaml's wording and position for a syntax error (it is what YAML users know from
/// other tools); falls back on saphyr's when serde_yaml accepts the text.
fn syntax_error(text: &str, e: &ScanError) -> SyntaxError {
    if e.info().contains("recursion limit") {
        // Both parsers stop deep nesting at their own limit, with a message about their code.
        return SyntaxError {
            message: too_deep(),
            line: e.marker().line(),
            column: e.marker().col() + 1,
        };
    }
    if let Err(serde_err) = serde_yaml::from_str::<serde_yaml::Value>(text) {
        if let Some(at) = serde_err.location() {
            let message = serde_err.to_string();
            // serde_yaml appends " at line L column C"; the caller prints the position itself.
            let suffix = format!(" at line {} column {}", at.line(), at.column());
            let message = message.split(&suffix).collect::<Vec<_>>().join("");
            return SyntaxError {
                message,
                line: at.line(),
                column: at.column(),
            };
        }
    }
    SyntaxError {
        message: e.info().to_string(),
        line: e.marker().line(),
        column: e.marker().col() + 1,
    }
}

fn too_deep() -> String {
    format!("lists and mappings are nested more than {MAX_DEPTH} levels deep; a config needs three at most")
}

/// A collection being read, with the anchor it will be stored under (0 = none).
enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
    },
    Map {
        entries: Vec<MapEntry>,
        pending_key: Option<(String, usize)>,
        anchor: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    /// Each anchored value with the number of values it holds (itself included).
    anchors: HashMap<usize, (Value, usize)>,
    root: Option<Value>,
    /// Documents seen so far: a config holds one.
    documents: usize,
    /// Values made so far, aliases counted at their expanded size ([`MAX_VALUES`]).
    values: usize,
    /// For each open collection, `values` when it started (to size it for its anchor).
    started_at: Vec<usize>,
}

impl Builder {
    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let line = span.start.line();
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(SyntaxError {
                        message: "a config holds one YAML document; remove the second `---`"
                            .to_string(),
                        line,
                        column: span.start.col() + 1,
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                self.count(1, line, span)?;
                let quoted = style != ScalarStyle::Plain;
                let value = Value::Scalar {
                    text: text.into_owned(),
                    quoted,
                };
                self.remember(anchor, &value, 1);
                self.push(value, line, span)?;
            }
            Event::Alias(id) => {
                let (value, size) = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| (Value::plain(""), 1));
                self.count(size, line, span)?;
                self.push(value, line, span)?;
            }
            Event::SequenceStart(anchor, _) => {
                self.open(line, span)?;
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    anchor,
                });
            }
            Event::MappingStart(anchor, _) => {
                self.open(line, span)?;
                self.stack.push(Frame::Map {
                    entries: Vec::new(),
                    pending_key: None,
                    anchor,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, anchor }) => (Value::Seq(items), anchor),
                    Some(Frame::Map {
                        entries, anchor, ..
                    }) => (Value::Map(entries), anchor),
                    None => return Ok(()),
                };
                let started = self.started_at.pop().unwrap_or(0);
                self.remember(anchor, &value, self.values - started);
                self.push(value, line, span)?;
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    fn remember(&mut self, anchor: usize, value: &Value, size: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, (value.clone(), size));
        }
    }

    /// A list or mapping begins: one value more, one level deeper ([`MAX_DEPTH`]).
    fn open(&mut self, line: usize, span: Span) -> Result<(), SyntaxError> {
        self.count(1, line, span)?;
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError {
                message: too_deep(),
                line,
                column: span.start.col() + 1,
            });
        }
        self.started_at.push(self.values - 1);
        Ok(())
    }

    /// `size` more values ([`MAX_VALUES`]).
    fn count(&mut self, size: usize, line: usize, span: Span) -> Result<(), SyntaxError> {
        self.values = self.values.saturating_add(size);
        if self.values > MAX_VALUES {
            return Err(SyntaxError {
                message: format!(
                    "the config holds more than {MAX_VALUES} values once its `*alias` references \
                     are expanded; a config needs a few dozen (is an alias repeated inside \
                     another?)"
                ),
                line,
                column: span.start.col() + 1,
            });
        }
        Ok(())
    }

    /// Adds a finished node to the collection being read (or makes it the document).
    fn push(&mut self, value: Value, line: usize, span: Span) -> Result<(), SyntaxError> {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                Some((key, key_line)) => entries.push(MapEntry {
                    key,
                    line: key_line,
                    value,
                }),
                None => match value {
                    Value::Scalar { text, .. } => *pending_key = Some((text, line)),
                    _ => {
                        return Err(SyntaxError {
                            message: "a key must be a plain name, not a list or a mapping"
                                .to_string(),
                            line,
                            column: span.start.col() + 1,
                        })
                    }
                },
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(text: &str) -> Value {
        Value::plain(text)
    }

    fn top(text: &str) -> Vec<MapEntry> {
        match parse(text) {
            Ok(Value::Map(entries)) => entries,
            other => panic!("expected a mapping, got {other:?}"),
        }
    }

    #[test]
    fn keys_keep_their_lines() {
        let entries = top("# comment\na: 1\n\nb:\n  - x\n  - y\nc: [p, q]\nd: 'quoted'\n");
        let keys: Vec<_> = entries.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(keys, [("a", 2), ("b", 4), ("c", 7), ("d", 8)]);
        assert_eq!(entries[1].value, Value::Seq(vec![scalar("x"), scalar("y")]));
        assert_eq!(entries[2].value, Value::Seq(vec![scalar("p"), scalar("q")]));
        assert_eq!(
            entries[3].value,
            Value::Scalar {
                text: "quoted".into(),
                quoted: true
            }
        );
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_caller_to_report() {
        let entries = top("a: 1\na: 2\n");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].line, 2);
    }

    #[test]
    fn scalars_resolve_like_the_core_schema() {
        assert_eq!(scalar("1e-4").as_f64(), Some(1e-4));
        assert_eq!(scalar("512").as_i64(), Some(512));
        assert_eq!(scalar("512").as_f64(), Some(512.0));
        assert_eq!(scalar("-3").as_i64(), Some(-3));
        assert_eq!(scalar("1.5").as_i64(), None);
        assert_eq!(scalar("1e3").as_i64(), None);
        assert_eq!(scalar("nan").as_f64(), None);
        assert_eq!(scalar("inf").as_f64(), None);
        assert_eq!(scalar("eight").as_i64(), None);
        assert_eq!(scalar("True").as_bool(), Some(true));
        assert_eq!(scalar("yes").as_bool(), None);
        assert!(scalar("~").is_null() && scalar("").is_null() && scalar("null").is_null());
        assert!(!Value::Scalar {
            text: "null".into(),
            quoted: true
        }
        .is_null());
        assert_eq!(scalar("abc").describe(), "the text `abc`");
        assert_eq!(scalar("0.5").describe(), "the number `0.5`");
    }

    #[test]
    fn anchors_and_aliases_copy_values() {
        let entries = top("a: &r 8\nb: *r\n");
        assert_eq!(entries[1].value, scalar("8"));
    }

    #[test]
    fn empty_text_is_null_and_a_scalar_is_a_scalar() {
        assert!(parse("").unwrap().is_null());
        assert!(parse("# only a comment\n").unwrap().is_null());
        assert_eq!(
            parse("[q_proj, v_proj]").unwrap(),
            Value::Seq(vec![scalar("q_proj"), scalar("v_proj")])
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.line >= 2, "{err:?}");
        assert!(!err.message.is_empty());
        let err = parse("a: 1\n  b: 2\n").unwrap_err();
        assert_eq!(err.line, 2, "{err:?}");
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused_quickly() {
        // Nine levels of ten aliases each: 10^9 values once expanded, from 300 bytes.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let start = std::time::Instant::now();
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("alias"), "{err:?}");
        assert_eq!(err.line, 5, "{err:?}");
        // Aliases that stay small are fine.
        assert!(parse("a: &a [1, 2]\nb: [*a, *a, *a]\n").is_ok());

        let deep = format!("a: {}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse(&deep).unwrap_err();
        assert!(err.message.contains("nested"), "{err:?}");
        let deep_block: String = (0..70)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        let err = parse(&deep_block).unwrap_err();
        assert!(err.message.contains("nested"), "{err:?}");
        assert!(parse(
            &"[".repeat(10)
                .chars()
                .chain("]".repeat(10).chars())
                .collect::<String>()
        )
        .is_ok());
        // Both refusals are immediate (before, the bomb exhausted memory and the nesting took
        // minutes); a generous bound that only a runaway parse can exceed.
        assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
    }

    #[test]
    fn a_second_document_is_refused() {
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("one YAML document"), "{err:?}");
    }
}
