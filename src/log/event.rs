//! TensorBoard's `Event` protobuf message, encoded and decoded by hand for the fields we use.
//!
//! The schema (tensorflow/core/util/event.proto and summary.proto) is small and frozen, so a
//! protobuf library would bring more than it saves. Field numbers used here:
//!
//! ```text
//! Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
//!              Summary summary = 5; SessionLog session_log = 7; }
//! Summary    { repeated Value value = 1; }
//! Value      { string tag = 1; float simple_value = 2; Image image = 4;
//!              TensorProto tensor = 8; SummaryMetadata metadata = 9; }
//! Image      { int32 height = 1; int32 width = 2; int32 colorspace = 3;
//!              bytes encoded_image_string = 4; }
//! SessionLog { SessionStatus status = 1; }   // START = 1
//! SummaryMetadata { PluginData plugin_data = 1; }   PluginData { string plugin_name = 1; }
//! TensorProto { DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8; }
//! TensorShapeProto { repeated Dim dim = 2; }   Dim { int64 size = 1; }
//! ```
//!
//! A text (TensorBoard's Text tab) is what `SummaryWriter.add_text` writes: a one-element
//! `DT_STRING` (7) tensor with the plugin name `text`.

/// The version string of the first record of every event file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `SessionLog.status` value telling TensorBoard a run (re)started at this event's step.
const SESSION_START: u64 = 1;

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

/// An image ready to be written: PNG bytes and what the `Summary.Image` message says about them.
#[derive(Debug, Clone, Copy)]
pub struct PngImage<'a> {
    pub height: u32,
    pub width: u32,
    /// 1 grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA (as in `Summary.Image`).
    pub colorspace: u32,
    pub png: &'a [u8],
}

/// What an event carries (the `what` oneof of `Event`).
pub enum EventBody<'a> {
    FileVersion,
    /// `SessionLog { status: START }`: from the second one in a run directory on, TensorBoard
    /// drops the events seen before whose step is at or after this event's step.
    SessionStart,
    Scalars(&'a [(&'a str, f32)]),
    Image {
        tag: &'a str,
        image: PngImage<'a>,
    },
    /// Markdown text for the Text tab.
    Text {
        tag: &'a str,
        text: &'a str,
    },
}

/// TensorFlow's `DT_STRING`.
const DT_STRING: u64 = 7;

/// The serialized `Event` message.
pub fn encode_event(wall_time: f64, step: u64, body: &EventBody<'_>) -> Vec<u8> {
    let mut event = Vec::new();
    put_key(&mut event, 1, FIXED64);
    event.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut event, 2, VARINT);
    put_varint(&mut event, step);
    match body {
        EventBody::FileVersion => put_bytes(&mut event, 3, FILE_VERSION.as_bytes()),
        EventBody::SessionStart => {
            let mut log = Vec::new();
            put_key(&mut log, 1, VARINT);
            put_varint(&mut log, SESSION_START);
            put_bytes(&mut event, 7, &log);
        }
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values.iter() {
                let mut message = Vec::new();
                put_bytes(&mut message, 1, tag.as_bytes());
                put_key(&mut message, 2, FIXED32);
                message.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &message);
            }
            put_bytes(&mut event, 5, &summary);
        }
        EventBody::Image { tag, image } => {
            let mut picture = Vec::with_capacity(image.png.len() + 32);
            for (field, number) in [(1, image.height), (2, image.width), (3, image.colorspace)] {
                put_key(&mut picture, field, VARINT);
                put_varint(&mut picture, u64::from(number));
            }
            put_bytes(&mut picture, 4, image.png);
            let mut message = Vec::with_capacity(picture.len() + tag.len() + 16);
            put_bytes(&mut message, 1, tag.as_bytes());
            put_bytes(&mut message, 4, &picture);
            let mut summary = Vec::with_capacity(message.len() + 8);
            put_bytes(&mut summary, 1, &message);
            put_bytes(&mut event, 5, &summary);
        }
        EventBody::Text { tag, text } => {
            let mut dim = Vec::new();
            put_key(&mut dim, 1, VARINT);
            put_varint(&mut dim, 1);
            let mut shape = Vec::new();
            put_bytes(&mut shape, 2, &dim);
            let mut tensor = Vec::new();
            put_key(&mut tensor, 1, VARINT);
            put_varint(&mut tensor, DT_STRING);
            put_bytes(&mut tensor, 2, &shape);
            put_bytes(&mut tensor, 8, text.as_bytes());
            let mut plugin = Vec::new();
            put_bytes(&mut plugin, 1, b"text");
            let mut metadata = Vec::new();
            put_bytes(&mut metadata, 1, &plugin);
            let mut message = Vec::new();
            put_bytes(&mut message, 1, tag.as_bytes());
            put_bytes(&mut message, 8, &tensor);
            put_bytes(&mut message, 9, &metadata);
            let mut summary = Vec::new();
            put_bytes(&mut summary, 1, &message);
            put_bytes(&mut event, 5, &summary);
        }
    }
    event
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8 & 0x7F) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, LENGTH_DELIMITED);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A decoded `Event`: the fields we write, anything else reported as [`EventKind::Other`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    FileVersion(String),
    SessionStart,
    Summary(Vec<SummaryValue>),
    /// A graph, a log message, another session status...: not something we write.
    Other,
}

/// One `Summary.Value`.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryValue {
    pub tag: String,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(f32),
    Image {
        height: u32,
        width: u32,
        colorspace: u32,
        png: Vec<u8>,
    },
    /// A string tensor (the Text tab's), its first string.
    Text(String),
    /// A histogram, audio, another tensor...: not something we write.
    Other,
}

/// Decodes a serialized `Event`; the error says which field is malformed.
pub fn decode_event(bytes: &[u8]) -> Result<Event, String> {
    let mut event = Event {
        wall_time: 0.0,
        step: 0,
        kind: EventKind::Other,
    };
    for field in Fields::new(bytes) {
        match field? {
            (1, Wire::Fixed64(bits)) => event.wall_time = f64::from_bits(bits),
            (2, Wire::Varint(step)) => event.step = step as i64,
            (3, Wire::Bytes(text)) => {
                let version = std::str::from_utf8(text)
                    .map_err(|_| "Event.file_version is not UTF-8".to_string())?;
                event.kind = EventKind::FileVersion(version.to_string());
            }
            (5, Wire::Bytes(summary)) => event.kind = EventKind::Summary(decode_summary(summary)?),
            (7, Wire::Bytes(log)) => {
                let mut status = 0;
                for field in Fields::new(log) {
                    if let (1, Wire::Varint(s)) = field? {
                        status = s;
                    }
                }
                if status == SESSION_START {
                    event.kind = EventKind::SessionStart;
                }
            }
            _ => {}
        }
    }
    Ok(event)
}

fn decode_summary(bytes: &[u8]) -> Result<Vec<SummaryValue>, String> {
    let mut values = Vec::new();
    for field in Fields::new(bytes) {
        if let (1, Wire::Bytes(message)) = field? {
            values.push(decode_value(message)?);
        }
    }
    Ok(values)
}

fn decode_value(bytes: &[u8]) -> Result<SummaryValue, String> {
    let mut tag = String::new();
    let mut value = Value::Other;
    for field in Fields::new(bytes) {
        match field? {
            (1, Wire::Bytes(text)) => {
                tag = String::from_utf8(text.to_vec())
                    .map_err(|_| "Summary.Value.tag is not UTF-8".to_string())?;
            }
            (2, Wire::Fixed32(bits)) => value = Value::Scalar(f32::from_bits(bits)),
            (4, Wire::Bytes(image)) => value = decode_image(image)?,
            (8, Wire::Bytes(tensor)) => value = decode_text(tensor)?,
            _ => {}
        }
    }
    Ok(SummaryValue { tag, value })
}

/// A `DT_STRING` tensor's first string; other tensors are [`Value::Other`].
fn decode_text(bytes: &[u8]) -> Result<Value, String> {
    let (mut dtype, mut first) = (0, None);
    for field in Fields::new(bytes) {
        match field? {
            (1, Wire::Varint(v)) => dtype = v,
            (8, Wire::Bytes(b)) if first.is_none() => {
                first = Some(
                    String::from_utf8(b.to_vec())
                        .map_err(|_| "a text summary is not UTF-8".to_string())?,
                );
            }
            _ => {}
        }
    }
    Ok(match (dtype, first) {
        (DT_STRING, Some(text)) => Value::Text(text),
        _ => Value::Other,
    })
}

fn decode_image(bytes: &[u8]) -> Result<Value, String> {
    let (mut height, mut width, mut colorspace, mut png) = (0, 0, 0, Vec::new());
    for field in Fields::new(bytes) {
        match field? {
            (1, Wire::Varint(v)) => height = v as u32,
            (2, Wire::Varint(v)) => width = v as u32,
            (3, Wire::Varint(v)) => colorspace = v as u32,
            (4, Wire::Bytes(b)) => png = b.to_vec(),
            _ => {}
        }
    }
    Ok(Value::Image {
        height,
        width,
        colorspace,
        png,
    })
}

/// A field's payload as the wire format gives it.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The (field number, payload) pairs of one message, in order.
struct Fields<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields {
            rest: bytes,
            failed: false,
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .rest
                .split_first()
                .ok_or_else(|| "a varint runs past the end of the message".to_string())?;
            self.rest = rest;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint is longer than 10 bytes".to_string())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.rest.len() {
            return Err(format!(
                "a field of {n} bytes runs past the end of the message ({} left)",
                self.rest.len()
            ));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u32, Wire<'a>), String> {
        let key = self.varint()?;
        let number = (key >> 3) as u32;
        let wire = match (key & 7) as u8 {
            VARINT => Wire::Varint(self.varint()?),
            FIXED64 => Wire::Fixed64(u64::from_le_bytes(self.fixed::<8>()?)),
            LENGTH_DELIMITED => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| "a length does not fit in memory".to_string())?;
                Wire::Bytes(self.take(len)?)
            }
            FIXED32 => Wire::Fixed32(u32::from_le_bytes(self.fixed::<4>()?)),
            other => return Err(format!("field {number} has unsupported wire type {other}")),
        };
        Ok((number, wire))
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let field = self.field();
        self.failed = field.is_err();
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_event_has_the_protobuf_bytes_tensorflow_writes() {
        // Event { wall_time: 1.5, step: 300, summary { value { tag: "a", simple_value: 2.0 } } },
        // bytes worked out by hand from the wire format.
        let bytes = encode_event(1.5, 300, &EventBody::Scalars(&[("a", 2.0)]));
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(&[0x10, 0xAC, 0x02]); // step 300 as a varint
        expected.extend_from_slice(&[0x2A, 10, 0x0A, 8, 0x0A, 1, b'a', 0x15]);
        expected.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn file_version_and_session_start_bytes() {
        let version = encode_event(0.0, 0, &EventBody::FileVersion);
        assert_eq!(&version[11..13], &[0x1A, 13]);
        assert_eq!(&version[13..], b"brain.Event:2");
        let start = encode_event(0.0, 7, &EventBody::SessionStart);
        assert_eq!(&start[9..], &[0x10, 7, 0x3A, 2, 0x08, 1]);
    }

    #[test]
    fn events_decode_to_what_was_encoded() {
        let scalars = [("loss/current", 0.25f32), ("lr/unet", 1e-4)];
        let bytes = encode_event(1234.5, 1 << 40, &EventBody::Scalars(&scalars));
        let event = decode_event(&bytes).unwrap();
        assert_eq!(event.wall_time, 1234.5);
        assert_eq!(event.step, 1 << 40);
        let EventKind::Summary(values) = event.kind else {
            panic!("not a summary: {:?}", event.kind);
        };
        assert_eq!(values.len(), 2);
        assert_eq!(values[0].tag, "loss/current");
        assert_eq!(values[0].value, Value::Scalar(0.25));
        assert_eq!(values[1].value, Value::Scalar(1e-4));

        let png = vec![7u8; 300];
        let image = PngImage {
            height: 64,
            width: 96,
            colorspace: 3,
            png: &png,
        };
        let bytes = encode_event(2.0, 5, &EventBody::Image { tag: "s/0", image });
        let event = decode_event(&bytes).unwrap();
        let EventKind::Summary(values) = event.kind else {
            panic!("not a summary");
        };
        assert_eq!(
            values[0].value,
            Value::Image {
                height: 64,
                width: 96,
                colorspace: 3,
                png
            }
        );
        assert_eq!(
            decode_event(&encode_event(0.0, 3, &EventBody::SessionStart))
                .unwrap()
                .kind,
            EventKind::SessionStart
        );
    }

    #[test]
    fn a_text_summary_has_the_bytes_torch_writes() {
        // torch.utils.tensorboard.summary.text("samples/0", "hello").SerializeToString()
        // (torch 2.15.0, tensorboard 2.20): torch names the tag `<tag>/text_summary`.
        let torch =
            "0a330a1673616d706c65732f302f746578745f73756d6d617279420f0807120412020801420568\
                     656c6c6f4a080a060a0474657874";
        let bytes = encode_event(
            0.0,
            3,
            &EventBody::Text {
                tag: "samples/0/text_summary",
                text: "hello",
            },
        );
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(hex.ends_with(torch), "{hex}");
        let EventKind::Summary(values) = decode_event(&bytes).unwrap().kind else {
            panic!("not a summary");
        };
        assert_eq!(values[0].value, Value::Text("hello".into()));
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let bytes = encode_event(1.0, 2, &EventBody::Scalars(&[("loss", 1.0)]));
        // Fields end at bytes 9 (wall_time) and 11 (step); any other cut is inside a field.
        for cut in 1..bytes.len() {
            let decoded = decode_event(&bytes[..cut]);
            assert_eq!(
                decoded.is_ok(),
                cut == 9 || cut == 11,
                "prefix of {cut} bytes"
            );
        }
    }
}
