//! CRC-32C (Castagnoli), the checksum TFRecord framing puts after each length and each record.
//!
//! TensorBoard stores the checksum "masked" (rotated and offset) so that a CRC of data that itself
//! contains CRCs does not degenerate; [`masked`] is what goes on disk.

/// The Castagnoli polynomial, bit-reversed (the CRC is computed least significant bit first).
const POLYNOMIAL: u32 = 0x82F6_3B78;

/// The CRC of every byte value, computed at compile time.
const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLYNOMIAL
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

/// The CRC-32C of `data`.
pub fn checksum(data: &[u8]) -> u32 {
    let crc = data.iter().fold(!0u32, |crc, &byte| {
        TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8)
    });
    !crc
}

/// The masked CRC-32C of `data`, as TFRecord files store it.
pub fn masked(data: &[u8]) -> u32 {
    let crc = checksum(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_published_check_values() {
        // The standard check value of CRC-32C, and the test vectors of RFC 3720 (iSCSI), B.4.
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(checksum(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(checksum(&ascending), 0x46DD_794E);
        assert_eq!(checksum(b""), 0);
    }

    #[test]
    fn mask_rotates_right_by_15_then_adds_the_constant() {
        // Worked by hand: crc("123456789") = 0xE3069283.
        // Rotated right by 15: low 15 bits 0x1283 move to the top, giving 0x2507_C60D.
        let rotated = 0xE306_9283u32.rotate_right(15);
        assert_eq!(rotated, 0x2507_C60D);
        // The value TensorBoard's own `masked_crc32c` gives for the same bytes.
        assert_eq!(masked(b"123456789"), 0xC78A_B0E5);
    }
}
