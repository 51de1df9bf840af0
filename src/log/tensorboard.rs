//! Writes TensorBoard event files: loss curves, learning rates and preview images.
//!
//! Our own code rather than a crate: `tensorboard-rs` panics on I/O errors and mislays image
//! bytes (DESIGN.md §7). One [`EventWriter`] owns one file
//! `events.out.tfevents.<unix secs>.<host>` in the log directory; TensorBoard reads every such
//! file of a directory as one run. Events are buffered in memory and written every
//! [`EventWriter::DEFAULT_FLUSH_INTERVAL`] (or on [`EventWriter::flush`]); every I/O error is
//! returned, so the training loop can warn and carry on. A failed write is cut back to the last
//! whole record, so the file stays readable.
//!
//! Every file starts with the file version and a `SessionLog START` at the first step it will
//! log. TensorBoard treats a second START in a run directory as a restart and drops the earlier
//! points at or after its step: that is how a resumed run replaces what the interrupted run
//! logged past its checkpoint (and a fresh run into an old log directory replaces the old run).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::event::{encode_event, EventBody, PngImage};
use super::record::append_record;
use crate::{Error, Result};

/// Pending bytes that trigger a write before the interval is up (preview images are large).
const MAX_PENDING_BYTES: usize = 4 << 20;

/// Appends TensorBoard events to one event file.
pub struct EventWriter {
    path: PathBuf,
    file: Box<dyn EventFile>,
    /// Records not yet handed to the file.
    pending: Vec<u8>,
    pending_events: usize,
    /// Length of the file's whole records; a failed write is cut back to it.
    written: u64,
    flush_interval: Duration,
    last_flush: Instant,
}

impl EventWriter {
    /// How often buffered events reach the file when no [`flush`](Self::flush) comes first.
    pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

    /// Creates `log_dir` if needed and a new event file in it (never overwriting one), for a run
    /// starting at step 1.
    pub fn create(log_dir: &Path) -> Result<EventWriter> {
        Self::open(log_dir, 1)
    }

    /// As [`create`](Self::create), for a run resumed from the state saved after step
    /// `resumed_after`: TensorBoard drops the points earlier files logged after that step (what
    /// the interrupted run did past its checkpoint) and shows this file's instead. Points logged
    /// at other x-axes (`loss/epoch_average` at the epoch number) are not dropped.
    pub fn create_resumed(log_dir: &Path, resumed_after: u64) -> Result<EventWriter> {
        Self::open(log_dir, resumed_after.saturating_add(1))
    }

    fn open(log_dir: &Path, first_step: u64) -> Result<EventWriter> {
        std::fs::create_dir_all(log_dir).map_err(|e| {
            Error::io(
                log_dir,
                with_context(e, "cannot create the TensorBoard log directory"),
            )
        })?;
        let (path, file) = create_event_file(log_dir)?;
        let mut writer = EventWriter::with_file(path, Box::new(file));
        writer.push(0, &EventBody::FileVersion);
        writer.push(first_step, &EventBody::SessionStart);
        writer.flush()?;
        Ok(writer)
    }

    fn with_file(path: PathBuf, file: Box<dyn EventFile>) -> EventWriter {
        EventWriter {
            path,
            file,
            pending: Vec::new(),
            pending_events: 0,
            written: 0,
            flush_interval: Self::DEFAULT_FLUSH_INTERVAL,
            last_flush: Instant::now(),
        }
    }

    /// Sets how often buffered events are written (zero: at every event).
    pub fn with_flush_interval(mut self, interval: Duration) -> EventWriter {
        self.flush_interval = interval;
        self
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs one scalar at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: u64) -> Result<()> {
        self.add_scalars(&[(tag, value)], step)
    }

    /// Logs several scalars at `step`, in one event.
    pub fn add_scalars(&mut self, values: &[(&str, f32)], step: u64) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.push(step, &EventBody::Scalars(values));
        self.flush_if_due()
    }

    /// Logs markdown text (TensorBoard's Text tab), as `SummaryWriter.add_text` does.
    pub fn add_text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        self.push(step, &EventBody::Text { tag, text });
        self.flush_if_due()
    }

    /// Logs a PNG image (TensorBoard's Images tab). `width` and `height` must be the PNG's own;
    /// anything else, or bytes that are not a PNG, is an error and nothing is logged.
    pub fn add_image_png(
        &mut self,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
        step: u64,
    ) -> Result<()> {
        let header = png_header(png).map_err(|reason| self.invalid_image(tag, reason))?;
        if (header.width, header.height) != (width, height) {
            let reason = format!(
                "the PNG is {}×{} pixels, but {width}×{height} was given",
                header.width, header.height
            );
            return Err(self.invalid_image(tag, reason));
        }
        let image = PngImage {
            height,
            width,
            colorspace: header.colorspace,
            png,
        };
        self.push(step, &EventBody::Image { tag, image });
        self.flush_if_due()
    }

    /// Writes every buffered event to the file. On error the buffered events are dropped (the
    /// error says how many) and the file is cut back to its last whole record.
    pub fn flush(&mut self) -> Result<()> {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self
            .file
            .write_all(&self.pending)
            .and_then(|()| self.file.flush());
        let events = std::mem::take(&mut self.pending_events);
        let bytes = std::mem::take(&mut self.pending);
        match result {
            Ok(()) => {
                self.written += bytes.len() as u64;
                self.pending = bytes;
                self.pending.clear();
                Ok(())
            }
            Err(e) => {
                let repaired = self.file.truncate_to(self.written);
                let mut note = format!("{events} TensorBoard event(s) could not be written");
                if let Err(cut) = repaired {
                    note.push_str(&format!(
                        " and the partial write could not be cut off ({cut}); TensorBoard will \
                         stop reading this file there"
                    ));
                }
                Err(Error::io(&self.path, with_context(e, &note)))
            }
        }
    }

    /// Flushes and asks the system to put the file on disk.
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        self.file
            .sync()
            .map_err(|e| Error::io(&self.path, with_context(e, "cannot sync the event file")))
    }

    fn push(&mut self, step: u64, body: &EventBody<'_>) {
        let event = encode_event(unix_now(), step, body);
        append_record(&mut self.pending, &event);
        self.pending_events += 1;
    }

    fn flush_if_due(&mut self) -> Result<()> {
        if self.last_flush.elapsed() >= self.flush_interval
            || self.pending.len() >= MAX_PENDING_BYTES
        {
            self.flush()
        } else {
            Ok(())
        }
    }

    fn invalid_image(&self, tag: &str, reason: String) -> Error {
        let message = format!("image `{tag}` not logged: {reason}");
        Error::io(
            &self.path,
            io::Error::new(io::ErrorKind::InvalidInput, message),
        )
    }
}

impl Drop for EventWriter {
    /// Best effort: a writer dropped on an error path still saves what it can. Callers who want
    /// to know about a failure call [`EventWriter::flush`] or [`EventWriter::close`] first.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("path", &self.path)
            .field("pending_events", &self.pending_events)
            .finish()
    }
}

/// The file an [`EventWriter`] appends to; a trait so tests can make writes fail.
trait EventFile: Write + Send {
    /// Cuts the file back to `len` bytes and continues writing there.
    fn truncate_to(&mut self, len: u64) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
}

impl EventFile for File {
    fn truncate_to(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::Start(len)).map(|_| ())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// Creates `events.out.tfevents.<secs>.<host>`, adding `.1`, `.2`… if that name is taken
/// (two writers started within the same second).
fn create_event_file(log_dir: &Path) -> Result<(PathBuf, File)> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("events.out.tfevents.{secs}.{}", host_name());
    for attempt in 0..1000 {
        let name = match attempt {
            0 => base.clone(),
            n => format!("{base}.{n}"),
        };
        let path = log_dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                let e = with_context(e, "cannot create the TensorBoard event file");
                return Err(Error::io(path, e));
            }
        }
    }
    let e = io::Error::new(
        io::ErrorKind::AlreadyExists,
        "1000 event files of this second already exist",
    );
    Err(Error::io(log_dir.join(base), e))
}

/// This machine's name, reduced to characters safe in a file name ("localhost" if unknown).
fn host_name() -> String {
    let from_files = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok());
    let from_env = || {
        std::env::var("HOSTNAME")
            .or_else(|_| std::env::var("COMPUTERNAME"))
            .ok()
    };
    let raw = from_files.or_else(from_env).unwrap_or_default();
    let safe: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() {
        "localhost".to_string()
    } else {
        safe
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn with_context(e: io::Error, context: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

/// What `Summary.Image` needs from a PNG's IHDR chunk.
#[derive(Debug, PartialEq)]
struct PngHeader {
    width: u32,
    height: u32,
    colorspace: u32,
}

fn png_header(png: &[u8]) -> std::result::Result<PngHeader, String> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];
    if png.len() < 26 || png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
        return Err(format!(
            "the {} bytes given are not a PNG file (no PNG signature and IHDR header)",
            png.len()
        ));
    }
    let number = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    // Summary.Image: 1 grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA (a palette counts as RGB).
    let colorspace = match png[25] {
        0 => 1,
        4 => 2,
        2 | 3 => 3,
        6 => 4,
        other => return Err(format!("unknown PNG colour type {other}")),
    };
    Ok(PngHeader {
        width: number(16),
        height: number(20),
        colorspace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::{decode_event, EventKind, Value};
    use crate::log::record::split_records;
    use std::sync::{Arc, Mutex};

    /// A file in memory whose writes fail while `fail` is set, after taking half the bytes.
    #[derive(Clone, Default)]
    struct FlakyFile {
        bytes: Arc<Mutex<Vec<u8>>>,
        fail: Arc<Mutex<bool>>,
    }

    impl Write for FlakyFile {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut bytes = self.bytes.lock().unwrap();
            if *self.fail.lock().unwrap() {
                bytes.extend_from_slice(&buf[..buf.len() / 2]);
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl EventFile for FlakyFile {
        fn truncate_to(&mut self, len: u64) -> io::Result<()> {
            self.bytes.lock().unwrap().truncate(len as usize);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn scalars_in(bytes: &[u8]) -> Vec<(i64, f32)> {
        split_records(bytes)
            .unwrap()
            .into_iter()
            .filter_map(|r| match decode_event(r).unwrap().kind {
                EventKind::Summary(values) => match values[0].value {
                    Value::Scalar(v) => Some((decode_event(r).unwrap().step, v)),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_failed_write_is_reported_and_cut_back_so_the_file_stays_readable() {
        let file = FlakyFile::default();
        let mut writer =
            EventWriter::with_file(PathBuf::from("events.test"), Box::new(file.clone()))
                .with_flush_interval(Duration::from_secs(3600));
        writer.add_scalar("loss", 1.0, 1).unwrap();
        writer.flush().unwrap();
        writer.add_scalar("loss", 2.0, 2).unwrap();
        writer.add_scalar("loss", 3.0, 3).unwrap();

        *file.fail.lock().unwrap() = true;
        let err = writer.flush().unwrap_err().to_string();
        assert!(err.starts_with("events.test: "), "{err}");
        assert!(
            err.contains("2 TensorBoard event(s) could not be written"),
            "{err}"
        );
        assert!(err.contains("disk full"), "{err}");
        // The half-written record is gone: the file still parses.
        assert_eq!(scalars_in(&file.bytes.lock().unwrap()), vec![(1, 1.0)]);

        *file.fail.lock().unwrap() = false;
        writer.add_scalar("loss", 4.0, 4).unwrap();
        writer.flush().unwrap();
        assert_eq!(
            scalars_in(&file.bytes.lock().unwrap()),
            vec![(1, 1.0), (4, 4.0)]
        );
    }

    #[test]
    fn events_wait_for_the_flush_interval() {
        let file = FlakyFile::default();
        let mut writer = EventWriter::with_file(PathBuf::from("e"), Box::new(file.clone()))
            .with_flush_interval(Duration::from_secs(3600));
        writer.add_scalar("loss", 1.0, 1).unwrap();
        assert!(file.bytes.lock().unwrap().is_empty());
        writer.flush().unwrap();
        assert_eq!(scalars_in(&file.bytes.lock().unwrap()).len(), 1);

        let mut eager = EventWriter::with_file(PathBuf::from("e"), Box::new(file.clone()))
            .with_flush_interval(Duration::ZERO);
        eager.add_scalar("loss", 2.0, 2).unwrap();
        assert_eq!(scalars_in(&file.bytes.lock().unwrap()).len(), 2);
    }

    #[test]
    fn png_header_gives_size_and_colorspace() {
        let mut png = Vec::new();
        image::RgbaImage::new(5, 3)
            .write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(
            png_header(&png),
            Ok(PngHeader {
                width: 5,
                height: 3,
                colorspace: 4
            })
        );
        let mut gray = Vec::new();
        image::GrayImage::new(2, 7)
            .write_to(&mut io::Cursor::new(&mut gray), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(png_header(&gray).map(|h| h.colorspace), Ok(1));
        assert!(png_header(b"\xFF\xD8\xFF\xE0 a jpeg, not a png at all")
            .unwrap_err()
            .contains("not a PNG"));
    }

    #[test]
    fn host_name_is_safe_in_a_file_name() {
        let host = host_name();
        assert!(!host.is_empty());
        assert!(host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    }
}
