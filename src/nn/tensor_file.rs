//! A `.safetensors` file read one tensor at a time into memory the program owns.
//!
//! Memory-mapping a checkpoint and copying each tensor out of the mapping (candle's
//! `MmapedSafetensors`) leaves every page that was read resident in the process beside its heap
//! copy until the mapping is dropped: loading SD 1.5 peaked at twice the weights (8.6 GB for
//! 4.2 GB of tensors). Here only the header is read at open; each tensor's bytes are then read
//! with a positioned read into a buffer that becomes the tensor, and the file's pages stay in
//! the kernel's page cache, which is not the process's memory.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

/// The largest header read (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// An open `.safetensors` file: its header parsed, its tensors read on demand.
pub struct TensorFile {
    path: PathBuf,
    file: File,
    /// Where the tensor data starts: after the 8-byte length and the header.
    data_start: u64,
    metadata: Metadata,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile")
            .field("path", &self.path)
            .finish()
    }
}

impl TensorFile {
    /// Opens `path` (a regular file) and reads its header; the error is a reason to follow the
    /// file's name.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = crate::files::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut prefix = [0u8; 8];
        read_at(&file, &mut prefix, 0)
            .map_err(|_| format!("the file is {len} bytes long: not a safetensors file"))?;
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER || n > len - 8 {
            return Err(format!(
                "its header length ({n} bytes) does not fit the file ({len} bytes): not a \
                 safetensors file, or an incomplete download"
            ));
        }
        let mut header = vec![0u8; n as usize];
        read_at(&file, &mut header, 8).map_err(|e| e.to_string())?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| format!("not a valid safetensors file (its header: {e})"))?;
        let data_start = 8 + n;
        if data_start + metadata.data_len() as u64 != len {
            return Err(format!(
                "the header describes {} bytes of tensors but the file holds {}: the download \
                 may be incomplete",
                metadata.data_len(),
                len - data_start
            ));
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            file,
            data_start,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor's name and shape.
    pub fn keys_and_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.metadata
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.shape.clone()))
            .collect()
    }

    /// The `__metadata__` strings of the header.
    pub fn header_metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    /// Whether the file holds a tensor named `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.metadata.info(key).is_some()
    }

    /// The tensor `key`, read from the file into a new CPU tensor of its stored dtype; `None`
    /// when there is no such tensor.
    pub fn load(&self, key: &str) -> candle_core::Result<Option<Tensor>> {
        let Some(info) = self.metadata.info(key) else {
            return Ok(None);
        };
        let dtype = dtype_of(info).map_err(|m| {
            candle_core::Error::Msg(format!("{}: `{key}`: {m}", self.path.display()))
        })?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        read_at(&self.file, &mut bytes, self.data_start + start as u64).map_err(|e| {
            candle_core::Error::Msg(format!("{}: reading `{key}`: {e}", self.path.display()))
        })?;
        Tensor::from_raw_buffer(&bytes, dtype, &info.shape, &Device::Cpu).map(Some)
    }
}

fn dtype_of(info: &TensorInfo) -> Result<DType, String> {
    Ok(match info.dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        other => return Err(format!("the dtype {other:?} is not supported")),
    })
}

/// Fills `buf` from `offset` of `file`.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_back_as_written_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1u8, 2, 3], &dev).unwrap();
        let c = a.to_dtype(DType::F16).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([
                ("a".to_string(), a.clone()),
                ("b".to_string(), b.clone()),
                ("c".to_string(), c),
            ]),
            &path,
        )
        .unwrap();
        let file = TensorFile::open(&path).unwrap();
        let mut keys = file.keys_and_shapes();
        keys.sort();
        assert_eq!(
            keys,
            [
                ("a".to_string(), vec![2, 3]),
                ("b".to_string(), vec![3]),
                ("c".to_string(), vec![2, 3])
            ]
        );
        let back = file.load("a").unwrap().unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(
            file.load("b").unwrap().unwrap().to_vec1::<u8>().unwrap(),
            [1, 2, 3]
        );
        let half = file.load("c").unwrap().unwrap();
        assert_eq!(half.dtype(), DType::F16);
        assert!(file.load("missing").unwrap().is_none() && !file.contains("missing"));

        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let err = TensorFile::open(&cut).unwrap_err();
        assert!(err.contains("incomplete"), "{err}");
        std::fs::write(&cut, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
        let err = TensorFile::open(&cut).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
        std::fs::write(&cut, b"abc").unwrap();
        let err = TensorFile::open(&cut).unwrap_err();
        assert!(err.contains("3 bytes long"), "{err}");
        let err = TensorFile::open(dir.path()).unwrap_err();
        assert!(err.contains("folder"), "{err}");
    }
}
