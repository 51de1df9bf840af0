//! A language model's training data read into conversations: alpaca, sharegpt, messages or
//! plain-text records from `.jsonl`, `.json` (an array) or `.csv`, each kept with the line it
//! starts on, and every malformed record reported by line before any work starts.
//!
//! The conversions are LLaMA-Factory's: alpaca's `instruction` and `input` joined by a newline
//! as the user's turn (after the `history` pairs), `output` as the assistant's; sharegpt's
//! `human`/`gpt` turns and messages' `user`/`assistant` alternate, after an optional first
//! `system` turn (or a `system` key), and end with the assistant.

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::DataFormat;
use crate::dataset::error::DatasetError;
use crate::models::config_json::kind;

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The name chat templates use (`message['role']`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// What one record trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// An optional system turn, then user and assistant turns alternating, ending with the
    /// assistant: the assistant's turns are learned.
    Chat(Vec<Message>),
    /// Plain text, every token learned.
    Text(String),
}

/// A record and the line of its file it starts on (1-based; the header is line 1 of a CSV).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub line: usize,
    pub sample: Sample,
}

/// A data file's records, in file order.
#[derive(Debug, Clone)]
pub struct Records {
    /// The layout the records were read as (`auto` resolved).
    pub format: DataFormat,
    pub records: Vec<Record>,
}

/// Parsed JSON values, each with the line it starts on (or why it could not be parsed).
type Parsed = Vec<(usize, Result<Value, String>)>;
/// Records, each with its line (or what is wrong with it).
type Samples = Vec<(usize, Result<Sample, String>)>;

/// The largest data file read (a bigger one is almost certainly not meant).
const FILE_LIMIT: u64 = 4 << 30;

/// Reads `path` (`.jsonl`, `.json` or `.csv`) as `format`. Every malformed record is one
/// problem of the error, by line.
pub fn read_records(path: &Path, format: DataFormat) -> Result<Records, DatasetError> {
    let text = crate::files::read_text(path, FILE_LIMIT, "a training data file")
        .map_err(|e| DatasetError::Invalid(format!("{}: {e}", path.display())))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let origin = path.display().to_string();
    let (format, results) = match extension.as_deref() {
        Some("jsonl") => from_json_objects(json_lines(&text), format),
        Some("json") => {
            let objects =
                json_array(&text).map_err(|e| DatasetError::Invalid(format!("{origin}: {e}")))?;
            from_json_objects(objects, format)
        }
        Some("csv") => {
            from_csv(&text, format).map_err(|e| DatasetError::Invalid(format!("{origin}: {e}")))?
        }
        _ => {
            return Err(DatasetError::Invalid(format!(
                "{origin}: training data must be a .jsonl, .json or .csv file"
            )))
        }
    };
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for (line, result) in results {
        match result {
            Ok(sample) => records.push(Record { line, sample }),
            Err(problem) => problems.push(format!("line {line}: {problem}")),
        }
    }
    if !problems.is_empty() {
        return Err(DatasetError::Problems {
            origin,
            problems,
            hint: Some(hint(format).to_string()),
        });
    }
    if records.is_empty() {
        return Err(DatasetError::Invalid(format!("{origin}: holds no records")));
    }
    Ok(Records { format, records })
}

fn hint(format: DataFormat) -> &'static str {
    match format {
        DataFormat::Alpaca => {
            "an alpaca record is {\"instruction\": \"...\", \"input\": \"...\" (optional), \"output\": \"...\"}"
        }
        DataFormat::ShareGpt => {
            "a sharegpt record is {\"conversations\": [{\"from\": \"human\", \"value\": \"...\"}, {\"from\": \"gpt\", \"value\": \"...\"}]}"
        }
        DataFormat::Messages => {
            "a messages record is {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]}"
        }
        DataFormat::Text | DataFormat::Auto => "a text record is {\"text\": \"...\"}",
    }
}

/// Each non-blank line of a JSON Lines file, parsed.
fn json_lines(text: &str) -> Parsed {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let value = serde_json::from_str(l).map_err(|e| format!("not valid JSON ({e})"));
            (i + 1, value)
        })
        .collect()
}

/// The items of a JSON array, each with the line it starts on.
fn json_array(text: &str) -> Result<Parsed, String> {
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let bytes = text.as_bytes();
    let skip_space = |mut at: usize| {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        at
    };
    let mut at = skip_space(text.strip_prefix('\u{feff}').map_or(0, |_| 3));
    if bytes.get(at) != Some(&b'[') {
        return Err(
            "a .json data file holds one array of records ([{...}, {...}]); for one record per \
             line use .jsonl"
                .to_string(),
        );
    }
    at = skip_space(at + 1);
    let mut items = Vec::new();
    if bytes.get(at) == Some(&b']') {
        return Ok(items);
    }
    loop {
        let mut stream = serde_json::Deserializer::from_str(&text[at..]).into_iter::<Value>();
        let line = line_of(at);
        match stream.next() {
            Some(Ok(value)) => items.push((line, Ok(value))),
            Some(Err(e)) => {
                return Err(format!(
                    "line {}: not valid JSON ({e}); the records after it cannot be read",
                    line + e.line().saturating_sub(1)
                ))
            }
            None => return Err("the array is not closed with `]`".to_string()),
        }
        at = skip_space(at + stream.byte_offset());
        match bytes.get(at) {
            Some(b',') => at = skip_space(at + 1),
            Some(b']') => return Ok(items),
            _ => {
                return Err(format!(
                    "line {}: expected `,` or `]` after a record",
                    line_of(at.min(text.len()))
                ))
            }
        }
    }
}

/// The records of parsed JSON objects; `auto` takes its layout from the first object.
fn from_json_objects(values: Parsed, format: DataFormat) -> (DataFormat, Samples) {
    let format = match format {
        DataFormat::Auto => values
            .iter()
            .find_map(|(_, v)| v.as_ref().ok()?.as_object().map(detect))
            .unwrap_or(DataFormat::Text),
        given => given,
    };
    let samples = values
        .into_iter()
        .map(|(line, value)| {
            let sample = value.and_then(|v| match v {
                Value::Object(map) => sample_of(&map, format),
                other => Err(format!("expected a JSON object, found {}", kind(&other))),
            });
            (line, sample)
        })
        .collect();
    (format, samples)
}

/// The layout a record's keys say.
fn detect(map: &Map<String, Value>) -> DataFormat {
    if map.contains_key("messages") {
        DataFormat::Messages
    } else if map.contains_key("conversations") {
        DataFormat::ShareGpt
    } else if map.contains_key("instruction") || map.contains_key("output") {
        DataFormat::Alpaca
    } else {
        DataFormat::Text
    }
}

/// The string under `key`: `Ok(None)` when absent or null, an error when of another type.
fn string<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

fn sample_of(map: &Map<String, Value>, format: DataFormat) -> Result<Sample, String> {
    match format {
        DataFormat::Alpaca => alpaca(map),
        DataFormat::ShareGpt => turns(
            map,
            "conversations",
            "from",
            "value",
            &[
                ("system", Role::System),
                ("human", Role::User),
                ("user", Role::User),
                ("gpt", Role::Assistant),
                ("assistant", Role::Assistant),
            ],
        ),
        DataFormat::Messages | DataFormat::Auto => turns(
            map,
            "messages",
            "role",
            "content",
            &[
                ("system", Role::System),
                ("user", Role::User),
                ("assistant", Role::Assistant),
            ],
        ),
        DataFormat::Text => match string(map, "text")? {
            Some(text) if !text.trim().is_empty() => Ok(Sample::Text(text.to_string())),
            Some(_) => Err("`text` is empty".to_string()),
            None => Err("no `text`".to_string()),
        },
    }
}

fn alpaca(map: &Map<String, Value>) -> Result<Sample, String> {
    let instruction = string(map, "instruction")?.unwrap_or("");
    let input = string(map, "input")?.unwrap_or("");
    let output = string(map, "output")?;
    let mut messages = Vec::new();
    if let Some(system) = string(map, "system")?.filter(|s| !s.is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    match map.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (i, pair) in pairs.iter().enumerate() {
                let turn = pair
                    .as_array()
                    .filter(|p| p.len() == 2)
                    .and_then(|p| Some((p[0].as_str()?, p[1].as_str()?)));
                let (asked, answered) = turn.ok_or_else(|| {
                    format!(
                        "`history` item {} must be [\"question\", \"answer\"]",
                        i + 1
                    )
                })?;
                messages.push(Message::new(Role::User, asked));
                messages.push(Message::new(Role::Assistant, answered));
            }
        }
        Some(other) => return Err(format!("`history` must be a list, found {}", kind(other))),
    }
    let query: Vec<&str> = [instruction, input]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if query.is_empty() {
        return Err("no `instruction` (and no `input`): nothing to answer".to_string());
    }
    let Some(output) = output.filter(|o| !o.trim().is_empty()) else {
        return Err("no `output`, or an empty one: nothing to learn".to_string());
    };
    messages.push(Message::new(Role::User, query.join("\n")));
    messages.push(Message::new(Role::Assistant, output));
    Ok(Sample::Chat(messages))
}

/// A list of turns under `list`, each an object with a role under `role_key` (mapped by
/// `roles`) and text under `content_key`; checked for the order a chat needs.
fn turns(
    map: &Map<String, Value>,
    list: &str,
    role_key: &str,
    content_key: &str,
    roles: &[(&str, Role)],
) -> Result<Sample, String> {
    let items = match map.get(list) {
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("`{list}` must be a list, found {}", kind(other))),
        None => return Err(format!("no `{list}`")),
    };
    let mut messages = Vec::new();
    if let Some(system) = string(map, "system")?.filter(|s| !s.is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    for (i, item) in items.iter().enumerate() {
        let turn = item
            .as_object()
            .ok_or_else(|| format!("`{list}` item {} must be an object", i + 1))?;
        let name = string(turn, role_key)?
            .ok_or_else(|| format!("`{list}` item {} has no `{role_key}`", i + 1))?;
        let role = roles
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                let valid: Vec<&str> = roles.iter().map(|(n, _)| *n).collect();
                format!(
                    "`{list}` item {}: `{role_key}` is `{name}`; this program trains on {}",
                    i + 1,
                    valid.join(", ")
                )
            })?;
        let content = string(turn, content_key)?
            .ok_or_else(|| format!("`{list}` item {} has no `{content_key}`", i + 1))?;
        messages.push(Message::new(role, content));
    }
    check_order(&messages)?;
    Ok(Sample::Chat(messages))
}

/// An optional system turn first, then user and assistant alternating from the user, ending
/// with a non-empty assistant turn.
fn check_order(messages: &[Message]) -> Result<(), String> {
    let start = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let turns = &messages[start..];
    if turns.is_empty() {
        return Err("no user or assistant turn".to_string());
    }
    for (i, m) in turns.iter().enumerate() {
        let want = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role != want {
            return Err(format!(
                "turn {} is {}, where {} was expected (after an optional system turn, user and \
                 assistant alternate, starting with the user)",
                start + i + 1,
                m.role.as_str(),
                want.as_str()
            ));
        }
    }
    match turns.last() {
        Some(m) if m.role == Role::Assistant && !m.content.trim().is_empty() => Ok(()),
        Some(m) if m.role == Role::Assistant => Err("the last assistant turn is empty".to_string()),
        _ => Err("the conversation ends with the user: there is no answer to learn".to_string()),
    }
}

/// A CSV's rows as alpaca records: `instruction,input,output` or `prompt,response` columns (a
/// `system` column is read too); `auto` and `alpaca` accept either.
fn from_csv(text: &str, format: DataFormat) -> Result<(DataFormat, Samples), String> {
    if !matches!(format, DataFormat::Auto | DataFormat::Alpaca) {
        return Err(format!(
            "a CSV file holds alpaca records (`instruction,input,output` or `prompt,response` \
             columns), not `{format}`"
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("its header cannot be read ({e})"))?
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let (question, input, answer) = match (
        column("instruction"),
        column("output"),
        column("prompt"),
        column("response"),
    ) {
        (Some(q), Some(a), _, _) => (q, column("input"), a),
        (_, _, Some(q), Some(a)) => (q, None, a),
        _ => {
            return Err(format!(
                "its columns are {}; a CSV of training data needs `instruction,input,output` \
                 or `prompt,response`",
                headers.join(", ")
            ))
        }
    };
    let system = column("system");
    let mut rows = Vec::new();
    for result in reader.records() {
        match result {
            Ok(row) => {
                let line = row.position().map_or(0, |p| p.line() as usize);
                let mut map = Map::new();
                let mut put = |key: &str, at: Option<usize>| {
                    if let Some(value) = at.and_then(|i| row.get(i)) {
                        map.insert(key.to_string(), Value::String(value.to_string()));
                    }
                };
                put("instruction", Some(question));
                put("input", input);
                put("output", Some(answer));
                put("system", system);
                rows.push((line, alpaca(&map)));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                rows.push((line, Err(format!("not a valid CSV row ({e})"))));
            }
        }
    }
    Ok((DataFormat::Alpaca, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn chat(records: &Records, i: usize) -> Vec<(Role, String)> {
        match &records.records[i].sample {
            Sample::Chat(m) => m.iter().map(|m| (m.role, m.content.clone())).collect(),
            Sample::Text(t) => panic!("text {t}"),
        }
    }

    #[test]
    fn every_layout_becomes_a_conversation_and_auto_tells_them_apart() {
        let dir = tempfile::tempdir().unwrap();
        let alpaca = write(
            dir.path(),
            "a.jsonl",
            "{\"instruction\": \"Translate\", \"input\": \"bonjour\", \"output\": \"hello\", \"system\": \"Be brief.\"}\n\
             \n\
             {\"instruction\": \"Say hi\", \"output\": \"hi\", \"history\": [[\"q1\", \"a1\"]]}\n",
        );
        let r = read_records(&alpaca, DataFormat::Auto).unwrap();
        assert_eq!(r.format, DataFormat::Alpaca);
        assert_eq!(r.records[1].line, 3);
        assert_eq!(
            chat(&r, 0),
            [
                (Role::System, "Be brief.".to_string()),
                (Role::User, "Translate\nbonjour".to_string()),
                (Role::Assistant, "hello".to_string())
            ]
        );
        assert_eq!(chat(&r, 1).len(), 4);

        let sharegpt = write(
            dir.path(),
            "s.json",
            "[\n  {\"conversations\": [{\"from\": \"system\", \"value\": \"S\"},\n    {\"from\": \"human\", \"value\": \"Q\"}, {\"from\": \"gpt\", \"value\": \"A\"}]},\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"Q2\"}, {\"from\": \"gpt\", \"value\": \"A2\"}]}\n]\n",
        );
        let r = read_records(&sharegpt, DataFormat::Auto).unwrap();
        assert_eq!(r.format, DataFormat::ShareGpt);
        assert_eq!((r.records[0].line, r.records[1].line), (2, 4));
        assert_eq!(chat(&r, 0)[0], (Role::System, "S".to_string()));

        let messages = write(
            dir.path(),
            "m.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"1\"}, {\"role\": \"assistant\", \"content\": \"2\"}, {\"role\": \"user\", \"content\": \"3\"}, {\"role\": \"assistant\", \"content\": \"4\"}]}\n",
        );
        let r = read_records(&messages, DataFormat::Messages).unwrap();
        assert_eq!(chat(&r, 0).len(), 4);

        let text = write(dir.path(), "t.jsonl", "{\"text\": \"once upon a time\"}\n");
        let r = read_records(&text, DataFormat::Auto).unwrap();
        assert_eq!(r.records[0].sample, Sample::Text("once upon a time".into()));

        let csv = write(
            dir.path(),
            "c.csv",
            "prompt,response\n\"What is 2+2?\",4\n\"multi\nline\",yes\n",
        );
        let r = read_records(&csv, DataFormat::Auto).unwrap();
        assert_eq!(r.format, DataFormat::Alpaca);
        assert_eq!((r.records[0].line, r.records[1].line), (2, 3));
        assert_eq!(chat(&r, 1)[0].1, "multi\nline");
    }

    #[test]
    fn every_malformed_record_is_named_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "bad.jsonl",
            "{\"instruction\": \"ok\", \"output\": \"fine\"}\n\
             {\"instruction\": \"no answer\"}\n\
             not json\n\
             [1, 2]\n\
             {\"instruction\": \"x\", \"output\": 5}\n",
        );
        let e = read_records(&path, DataFormat::Auto).unwrap_err();
        let DatasetError::Problems { problems, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems[0].starts_with("line 2: no `output`"),
            "{problems:?}"
        );
        assert!(problems[1].starts_with("line 3: not valid JSON"));
        assert!(problems[2].starts_with("line 4: expected a JSON object"));
        assert!(problems[3].contains("`output` must be a string"));

        let path = write(
            dir.path(),
            "order.jsonl",
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}]}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n\
             {\"messages\": [{\"role\": \"tool\", \"content\": \"q\"}]}\n",
        );
        let e = read_records(&path, DataFormat::Messages)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1: turn 1 is assistant, where user was expected"),
            "{e}"
        );
        assert!(
            e.contains("line 2: the conversation ends with the user"),
            "{e}"
        );
        assert!(
            e.contains("line 3: `messages` item 1: `role` is `tool`"),
            "{e}"
        );

        let path = write(
            dir.path(),
            "broken.json",
            "[{\"text\": \"a\"},\n {\"text\": ]\n",
        );
        let e = read_records(&path, DataFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: not valid JSON"), "{e}");
        let path = write(dir.path(), "cols.csv", "question,answer\nq,a\n");
        let e = read_records(&path, DataFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`prompt,response`"), "{e}");
        let path = write(dir.path(), "data.txt", "hello");
        let e = read_records(&path, DataFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".jsonl, .json or .csv"), "{e}");
    }
}
