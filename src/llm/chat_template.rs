//! A model's chat template — the Jinja text under `chat_template` in its
//! `tokenizer_config.json` — rendered as transformers' `apply_chat_template` renders it, so that
//! a conversation becomes exactly the text the model was tuned on.
//!
//! transformers renders with jinja2's sandboxed environment, `trim_blocks` and `lstrip_blocks`,
//! loop controls, its own `tojson` (Python's `json.dumps`, non-ASCII kept), and the globals
//! `raise_exception` and `strftime_now`; the template sees `messages`, `add_generation_prompt`,
//! the special tokens (`bos_token`, `eos_token`) and any extra variables. Here the same with
//! minijinja, Python's string methods (`.strip()`, `.split()`, `.startswith()`...) included.

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

use super::records::Message;

/// A compiled chat template and the special tokens it is given.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// The template's name inside the environment.
const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; the error is minijinja's reason, with its line.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_json);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| -> String {
            strftime(&format, days_since_epoch_now())
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// `strftime_now` gives the date of `unix_seconds` (UTC) from now on, not today's: a
    /// training run renders every record as of the day it started, so that a run resumed on
    /// another day sees the same tokens (Llama 3's template writes "Today Date").
    pub fn fix_date(&mut self, unix_seconds: f64) {
        let days = (unix_seconds / 86_400.0).floor() as i64;
        self.env
            .add_function("strftime_now", move |format: String| -> String {
                strftime(&format, days)
            });
    }

    /// The text of `messages`; with `add_generation_prompt`, followed by what starts the
    /// assistant's answer. `extra` adds variables (Llama 3's `date_string`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &[(&str, Value)],
    ) -> Result<String, String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut context: Vec<(&str, Value)> = vec![
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(token) = token {
                context.push((key, Value::from(token.as_str())));
            }
        }
        context.extend(extra.iter().cloned());
        let template = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        template
            .render(Value::from_iter(context))
            .map_err(|e| describe(&e))
    }
}

/// minijinja's error with its detail and line.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text.push_str(&format!(": {detail}"));
        }
    }
    text
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)` — `", "` and
/// `": "` between items on one line, or `indent` spaces per level.
fn python_json(value: Value, indent: Option<usize>) -> Result<Value, Error> {
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = match indent {
        Some(_) => (",", ": "),
        None => (", ", ": "),
    };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(key.clone()).to_string());
                out.push_str(key_sep);
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Days since 1970-01-01 (UTC) now.
fn days_since_epoch_now() -> i64 {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (seconds / 86_400) as i64
}

/// Python's `strftime` for a date (`%d`, `%b`, `%B`, `%m`, `%Y`, `%y`, `%%`; other fields are
/// kept as written), on the civil date `days` after 1970-01-01.
fn strftime(format: &str, days: i64) -> String {
    let (year, month, day) = crate::log::summary::civil_date(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_date_is_what_strftime_now_gives() {
        let mut t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", None, None).unwrap();
        let today = t.render(&[], false, &[]).unwrap();
        // 2024-07-26 00:00 UTC.
        t.fix_date(1_721_952_000.0);
        assert_eq!(t.render(&[], false, &[]).unwrap(), "26 Jul 2024");
        assert_ne!(today, "26 Jul 2024");
    }
    use crate::llm::records::Role;

    #[derive(serde::Deserialize)]
    struct Case {
        template: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
        messages: Vec<CaseMessage>,
        add_generation_prompt: bool,
        text: String,
    }

    #[derive(serde::Deserialize)]
    struct CaseMessage {
        role: String,
        content: String,
    }

    /// The real templates of Qwen2.5, Qwen3, Llama 3.1 and Mistral-Nemo, and one of ours
    /// without whitespace control (trim_blocks, lstrip_blocks), render every conversation
    /// exactly as transformers' `apply_chat_template` does.
    #[test]
    fn real_templates_render_as_transformers_does() {
        let folder = crate::fixtures::root().join("llm/templates");
        let cases: Vec<Case> =
            serde_json::from_str(&std::fs::read_to_string(folder.join("cases.json")).unwrap())
                .unwrap();
        assert_eq!(cases.len(), 25);
        for case in cases {
            let source =
                std::fs::read_to_string(folder.join(format!("{}.jinja", case.template))).unwrap();
            let template = ChatTemplate::new(&source, case.bos_token, case.eos_token).unwrap();
            let messages: Vec<Message> = case
                .messages
                .iter()
                .map(|m| Message {
                    role: match m.role.as_str() {
                        "system" => Role::System,
                        "user" => Role::User,
                        _ => Role::Assistant,
                    },
                    content: m.content.clone(),
                })
                .collect();
            let text = template
                .render(
                    &messages,
                    case.add_generation_prompt,
                    &[("date_string", Value::from("26 Jul 2024"))],
                )
                .unwrap();
            assert_eq!(text, case.text, "{} {:?}", case.template, messages);
        }
    }

    #[test]
    fn a_template_can_refuse_a_conversation_and_dates_format_as_python() {
        let t = ChatTemplate::new(
            "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}x",
            None,
            None,
        )
        .unwrap();
        let m = |content: &str| Message {
            role: Role::User,
            content: content.to_string(),
        };
        assert_eq!(t.render(&[m("a")], false, &[]).unwrap(), "x");
        let e = t.render(&[m("a"), m("b")], false, &[]).unwrap_err();
        assert!(e.contains("one message only"), "{e}");
        // 2024-07-26 is day 19930 after 1970-01-01.
        assert_eq!(strftime("%d %b %Y", 19_930), "26 Jul 2024");
        assert_eq!(strftime("%B %m/%y %%", 0), "January 01/70 %");
        let json = python_json(
            Value::from_serialize(serde_json::json!({"a": [1, "é"], "b": {}})),
            None,
        )
        .unwrap();
        assert_eq!(json.to_string(), r#"{"a": [1, "é"], "b": {}}"#);
    }
}
