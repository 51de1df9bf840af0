//! TFRecord framing, the container of TensorBoard event files.
//!
//! Each record is `u64 length (LE) | u32 masked CRC-32C of those 8 bytes | data | u32 masked
//! CRC-32C of the data`. A reader that meets a bad checksum stops there, so a record is only
//! ever appended whole.

use super::crc32c;

/// Bytes a record adds around its data.
pub const FRAMING_BYTES: usize = 8 + 4 + 4;

/// Appends `data` to `out` as one framed record.
pub fn append_record(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.reserve(data.len() + FRAMING_BYTES);
    out.extend_from_slice(&length);
    out.extend_from_slice(&crc32c::masked(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32c::masked(data).to_le_bytes());
}

/// The data of every record in `bytes`, checksums verified; the error names the record and the
/// byte offset where the file stops making sense.
pub fn split_records(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let index = records.len();
        let rest = &bytes[at..];
        if rest.len() < 12 {
            return Err(format!(
                "record {index} at byte {at}: truncated header ({} bytes)",
                rest.len()
            ));
        }
        let (length, rest) = rest.split_at(8);
        let (length_crc, rest) = rest.split_at(4);
        if crc32c::masked(length).to_le_bytes() != length_crc {
            return Err(format!(
                "record {index} at byte {at}: the length's checksum does not match"
            ));
        }
        let mut length_bytes = [0u8; 8];
        length_bytes.copy_from_slice(length);
        let length = u64::from_le_bytes(length_bytes);
        let needed = usize::try_from(length)
            .ok()
            .and_then(|n| n.checked_add(4))
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| {
                format!(
                    "record {index} at byte {at}: {length} bytes of data announced, {} left in \
                     the file",
                    rest.len()
                )
            })?;
        let (data, data_crc) = rest[..needed].split_at(needed - 4);
        if crc32c::masked(data).to_le_bytes() != data_crc {
            return Err(format!(
                "record {index} at byte {at}: the data's checksum does not match"
            ));
        }
        records.push(data);
        at += 12 + needed;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_framing_is_little_endian() {
        let mut file = Vec::new();
        append_record(&mut file, b"first");
        append_record(&mut file, b"");
        append_record(&mut file, &[9u8; 1000]);
        assert_eq!(&file[..8], &5u64.to_le_bytes());
        assert_eq!(
            &file[8..12],
            &crc32c::masked(&5u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&file[12..17], b"first");
        assert_eq!(&file[17..21], &crc32c::masked(b"first").to_le_bytes());
        let records = split_records(&file).unwrap();
        assert_eq!(records, vec![&b"first"[..], &b""[..], &[9u8; 1000][..]]);
    }

    #[test]
    fn damage_is_reported_with_the_record_and_offset() {
        let mut file = Vec::new();
        append_record(&mut file, b"first");
        append_record(&mut file, b"second");
        let second = 5 + FRAMING_BYTES;

        let mut flipped = file.clone();
        flipped[second + 12] ^= 1;
        let err = split_records(&flipped).unwrap_err();
        assert!(
            err.contains("record 1 at byte 21") && err.contains("data"),
            "{err}"
        );

        let mut bad_length = file.clone();
        bad_length[second] ^= 1;
        let err = split_records(&bad_length).unwrap_err();
        assert!(err.contains("length's checksum"), "{err}");

        let err = split_records(&file[..file.len() - 1]).unwrap_err();
        assert!(
            err.contains("record 1") && err.contains("announced"),
            "{err}"
        );
        let err = split_records(&file[..second + 3]).unwrap_err();
        assert!(err.contains("truncated header"), "{err}");
    }
}
