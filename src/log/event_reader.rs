//! Reads event files back: checksums verified, our fields decoded. For tests and tools; the
//! proof that TensorBoard itself reads them is `tools/read_tb_events.py`.

use std::io;
use std::path::{Path, PathBuf};

use super::event::{decode_event, Event, EventKind, Value};
use super::record::split_records;
use crate::{Error, Result};

/// Every event of one file, in order. A damaged record is an error naming the file, the record
/// and its byte offset.
pub fn read_event_file(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let invalid = |reason: String| {
        let reason = format!("not a valid TensorBoard event file: {reason}");
        Error::io(path, io::Error::new(io::ErrorKind::InvalidData, reason))
    };
    split_records(&bytes)
        .map_err(invalid)?
        .into_iter()
        .enumerate()
        .map(|(i, record)| decode_event(record).map_err(|e| invalid(format!("record {i}: {e}"))))
        .collect()
}

/// The event files (`*tfevents*`) directly inside `log_dir`, sorted by name (the order
/// TensorBoard reads them in).
pub fn event_files(log_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(log_dir).map_err(|e| Error::io(log_dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(log_dir, e))?.path();
        let is_events = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains("tfevents"));
        if is_events && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The `(step, value)` points of scalar `tag` in `events`, in file order.
pub fn scalar_series(events: &[Event], tag: &str) -> Vec<(i64, f32)> {
    let mut points = Vec::new();
    for event in events {
        if let EventKind::Summary(values) = &event.kind {
            for v in values.iter().filter(|v| v.tag == tag) {
                if let Value::Scalar(x) = v.value {
                    points.push((event.step, x));
                }
            }
        }
    }
    points
}
