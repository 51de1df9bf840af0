//! The user's files, read and written without surprises.
//!
//! Reading: only regular files are read. A named pipe (FIFO) would block the program forever
//! and a device such as `/dev/zero` never ends, so a path that is not a regular file is refused
//! with what it is ("a directory", "a named pipe (FIFO)"), and text files are read up to a bound.
//! The kind is checked on the opened file (opened without blocking), so a file swapped between
//! a check and the read cannot slip through.
//!
//! Writing: [`write_atomically`] writes a temporary file beside the target (`.<name>.<pid>.tmp`),
//! syncs it and renames it over the target, so an interruption leaves the old file or the new
//! one. A run killed in the middle leaves its temporary behind; [`remove_stale_temporaries`]
//! recognises those by their name and a process id that is gone, and removes them.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// What a path that is not a regular file is, in words ("a directory", "a named pipe (FIFO)").
pub fn kind_of(metadata: &Metadata) -> &'static str {
    let kind = metadata.file_type();
    if kind.is_file() {
        return "a regular file";
    }
    if kind.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The error for a path that is `kind` instead of a regular file.
fn not_a_file(kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {kind}, not a regular file; give the path of a file"),
    )
}

/// Fails unless `path` is a regular file (or a link to one); the error says what it is instead.
/// For checks that do not read the file (its contents are read later, through [`open`]).
pub fn check_regular(path: &Path) -> io::Result<()> {
    let metadata = std::fs::metadata(path)?;
    if metadata.is_file() {
        Ok(())
    } else {
        Err(not_a_file(kind_of(&metadata)))
    }
}

/// Opens `path` for reading if it is a regular file. It is opened without blocking (a FIFO
/// would otherwise wait for a writer) and its kind checked on the open file.
pub fn open(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_a_file(kind_of(&metadata)));
    }
    // O_NONBLOCK means nothing for a regular file's reads; nothing to undo.
    Ok(file)
}

/// The bytes of the regular file `path`.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The text of the regular file `path`, refused past `limit` bytes (`what` names the kind of
/// file in that message: "a config file").
pub fn read_text(path: &Path, limit: u64, what: &str) -> io::Result<String> {
    let file = open(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is larger than {} MiB, too large for {what}",
                limit / (1024 * 1024)
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is not UTF-8 text (byte {}); save it as UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// The largest config, prompt list or caption this program reads as text: far beyond any real
/// one, small enough that a wrong path fails at once.
pub const TEXT_LIMIT: u64 = 16 * 1024 * 1024;

/// The name `path` is written under before it is renamed into place: hidden, in the same folder,
/// with this process's id (`.name.safetensors.1234.tmp`).
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` through [`temporary_path`]: written, synced, renamed, and the
/// folder synced. The folder must exist. On failure the temporary file is removed, an existing
/// `path` is left as it was, and the error names `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    write_through_temporary(path, bytes).map_err(|e| crate::Error::io(path, e))
}

fn write_through_temporary(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = temporary_path(path);
    let result = (|| -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_folder(&folder);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes renames in `folder` durable, where the platform can sync a folder.
pub fn sync_folder(folder: &Path) {
    if let Ok(dir) = File::open(folder) {
        let _ = dir.sync_all();
    }
}

/// The process id in a name made by [`temporary_path`] (or a folder named the same way with
/// `.tmp`/`.old`): `.name.1234.tmp` → 1234.
fn temporary_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let rest = rest
        .strip_suffix(".tmp")
        .or_else(|| rest.strip_suffix(".old"))?;
    let (stem, pid) = rest.rsplit_once('.')?;
    if stem.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running (a process that cannot be signalled but exists counts).
fn is_running(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 checks for the process's existence and sends nothing.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Removes from `folder` the temporary files and folders of [`temporary_path`]'s naming whose
/// process is gone (a run killed while writing), and `legacy` names an earlier version of this
/// program wrote its temporaries under (checked by the caller's predicate). Returns what was
/// removed; a folder that cannot be listed holds nothing to remove.
pub fn remove_stale_temporaries(
    folder: &Path,
    legacy: impl Fn(&str) -> bool,
) -> io::Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = match temporary_owner(&name) {
            Some(pid) => !is_running(pid),
            None => legacy(&name),
        };
        if !stale {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path)?,
            _ => std::fs::remove_file(&path)?,
        }
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_the_refusal_says_what_the_path_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read(&file).unwrap(), b"hello");
        assert_eq!(read_text(&file, 100, "a test").unwrap(), "hello");
        check_regular(&file).unwrap();

        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        let err = check_regular(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        let err = read_text(Path::new("/dev/zero"), 100, "a test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("character device"), "{err}");
        let err = read(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);

        let big = dir.path().join("big.txt");
        std::fs::write(&big, vec![b'x'; 2 * 1024 * 1024 + 1]).unwrap();
        let err = read_text(&big, 2 * 1024 * 1024, "a config file")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("larger than 2 MiB") && err.contains("config"),
            "{err}"
        );
        std::fs::write(&big, b"ok\xFF").unwrap();
        let err = read_text(&big, 100, "x").unwrap_err().to_string();
        assert!(err.contains("UTF-8 text (byte 2)"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_named_pipe_is_refused_at_once_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.yaml");
        let c_path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Without a writer, a blocking open would never return: the test would hang.
        let err = read_text(&fifo, 100, "a config file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("named pipe (FIFO)"), "{err}");
        let err = check_regular(&fifo).unwrap_err().to_string();
        assert!(err.contains("named pipe (FIFO)"), "{err}");
    }

    #[test]
    fn atomic_writes_replace_the_file_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("run.safetensors");
        let err = write_atomically(&path, b"first").unwrap_err().to_string();
        assert!(err.contains("run.safetensors"), "{err}");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["run.safetensors"]);
        let tmp = temporary_path(&path);
        let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(temporary_owner(&name), Some(std::process::id()));
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // No process has an id this large (Linux's maximum is 2^22).
        let dead = 4_000_000_000u32;
        let own = std::process::id();
        for name in [
            format!(".run.safetensors.{dead}.tmp"),
            format!(".run.safetensors.{own}.tmp"),
            format!(".config.yaml.{dead}.tmp"),
            "run.safetensors".to_string(),
            ".hidden.txt".to_string(),
            "config.tmp~".to_string(),
            ".x.12a.tmp".to_string(),
        ] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        std::fs::create_dir(d.join(format!(".state-step00000020.{dead}.tmp"))).unwrap();
        std::fs::write(
            d.join(format!(".state-step00000020.{dead}.tmp")).join("a"),
            b"x",
        )
        .unwrap();
        std::fs::create_dir(d.join(format!(".state-step00000010.{dead}.old"))).unwrap();
        let removed = remove_stale_temporaries(d, |n| n.ends_with(".tmp~")).unwrap();
        let names: Vec<String> = removed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                format!(".config.yaml.{dead}.tmp"),
                format!(".run.safetensors.{dead}.tmp"),
                format!(".state-step00000010.{dead}.old"),
                format!(".state-step00000020.{dead}.tmp"),
                "config.tmp~".to_string(),
            ]
        );
        assert!(d.join(format!(".run.safetensors.{own}.tmp")).exists());
        assert!(d.join("run.safetensors").exists() && d.join(".hidden.txt").exists());
        assert!(d.join(".x.12a.tmp").exists());
        assert!(remove_stale_temporaries(&d.join("missing"), |_| true)
            .unwrap()
            .is_empty());
    }
}
