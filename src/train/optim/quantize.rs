//! Blockwise 8-bit quantization with bitsandbytes' dynamic map: how [`super::AdamW8bit`] stores
//! its moments in one byte per element.
//!
//! A tensor is cut into blocks of [`BLOCK_SIZE`] elements; each block keeps its largest absolute
//! value (`absmax`, f32) and each element the index (u8) of the map value nearest to
//! `x / absmax`. The map (Dettmers et al., "8-bit Optimizers via Block-wise Quantization") has a
//! dynamic exponent: 7 decades from 1e-6 to 1, with more fraction points in the larger decades,
//! so small values keep their relative precision. The signed map (for the first moment) holds 0,
//! 1 and 127 values of each sign; the unsigned one (second moment) 0, 1 and 254 positive values.

/// Elements per quantization block (bitsandbytes' optimizers use 256).
pub const BLOCK_SIZE: usize = 256;

/// `torch.linspace(start, end, steps)` in f32 as torch computes it on x86-64 CPUs with FMA
/// (its CPU kernels are built per instruction set, and the compiler fuses `start + step·i` into
/// one multiply-add): the first half counts up from `start`, the second half down from `end`.
/// bitsandbytes builds its maps with it, so this makes ours equal to the last bit.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' dynamic quantization map (`create_dynamic_map(signed)`, 8 bits, 7 exponent
/// bits), sorted ascending: 256 values in [-1, 1] (signed) or [0, 1] (unsigned).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const EXPONENT_BITS: i32 = 7;
    let mut values = Vec::with_capacity(256);
    for i in 0..EXPONENT_BITS {
        // Decade i spans 10^(i-6) · [0.1, 1], split into 2^i (signed) or 2^(i+1) intervals
        // whose midpoints are the map's values.
        let intervals = if signed {
            1usize << i
        } else {
            1usize << (i + 1)
        };
        let bounds = linspace(0.1, 1.0, intervals + 1);
        // Python's `10 ** -k`: the double nearest to 10^-k, then f32 as torch casts the scalar.
        let scale = (1.0 / 10f64.powi(EXPONENT_BITS - 1 - i)) as f32;
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            if signed {
                values.push(-(scale * mean));
            }
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.resize(256, 0.0);
    values.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&values);
    map
}

/// A quantization map with its lookup rules.
#[derive(Debug, Clone)]
pub struct QuantMap {
    values: [f32; 256],
    signed: bool,
    /// The code of 0.0, used for blocks that are entirely zero.
    zero_code: u8,
}

impl QuantMap {
    pub fn new(signed: bool) -> Self {
        let values = dynamic_map(signed);
        let zero_code = values.iter().position(|&v| v == 0.0).unwrap_or(0) as u8;
        QuantMap {
            values,
            signed,
            zero_code,
        }
    }

    pub fn value(&self, code: u8) -> f32 {
        self.values[usize::from(code)]
    }

    /// The code of the map value nearest to `x` (a tie goes to the smaller value). With the
    /// signed map, a code whose value has the other sign than `x` moves one step towards `x`'s
    /// side, as bitsandbytes' CUDA kernel does, so the first moment never flips sign.
    pub fn encode(&self, x: f32) -> u8 {
        let upper = self.values.partition_point(|&v| v < x).min(255);
        let mut code = if upper == 0 {
            0
        } else {
            let lower = upper - 1;
            if (x - self.values[lower]).abs() <= (self.values[upper] - x).abs() {
                lower
            } else {
                upper
            }
        };
        if self.signed && self.values[code].is_sign_negative() != x.is_sign_negative() {
            if x > 0.0 {
                code = (code + 1).min(255);
            } else {
                code = code.saturating_sub(1);
            }
        }
        code as u8
    }

    /// Quantizes one block in place of `codes`; returns its absmax.
    pub fn encode_block(&self, values: &[f32], codes: &mut [u8]) -> f32 {
        let absmax = values.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        if absmax == 0.0 {
            codes.fill(self.zero_code);
        } else {
            for (code, &v) in codes.iter_mut().zip(values) {
                *code = self.encode(v / absmax);
            }
        }
        absmax
    }

    /// Dequantizes one block into `out`.
    pub fn decode_block(&self, codes: &[u8], absmax: f32, out: &mut [f32]) {
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = self.value(c) * absmax;
        }
    }
}

/// A tensor held as one u8 code per element plus one f32 scale per block of [`BLOCK_SIZE`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuantized {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

impl BlockQuantized {
    /// All zeros (codes 0 with scale 0, as bitsandbytes initialises its state).
    pub fn zeros(len: usize) -> Self {
        BlockQuantized {
            codes: vec![0; len],
            absmax: vec![0.0; len.div_ceil(BLOCK_SIZE)],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Bytes held: one per element plus four per block.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }

    /// Quantizes `values` with `map`.
    pub fn encode(values: &[f32], map: &QuantMap) -> Self {
        let mut q = BlockQuantized::zeros(values.len());
        for ((block, codes), absmax) in values
            .chunks(BLOCK_SIZE)
            .zip(q.codes.chunks_mut(BLOCK_SIZE))
            .zip(q.absmax.iter_mut())
        {
            *absmax = map.encode_block(block, codes);
        }
        q
    }

    /// The dequantized values.
    pub fn decode(&self, map: &QuantMap) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        for ((codes, &absmax), o) in self
            .codes
            .chunks(BLOCK_SIZE)
            .zip(&self.absmax)
            .zip(out.chunks_mut(BLOCK_SIZE))
        {
            map.decode_block(codes, absmax, o);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_have_bitsandbytes_shape() {
        let signed = dynamic_map(true);
        assert_eq!(signed[255], 1.0);
        assert_eq!(signed.iter().filter(|v| **v == 0.0).count(), 1);
        assert_eq!(signed.iter().filter(|v| **v < 0.0).count(), 127);
        assert!((signed[0] + 0.99297).abs() < 1e-5, "{}", signed[0]);
        assert!(signed.windows(2).all(|w| w[0] < w[1]));
        let unsigned = dynamic_map(false);
        assert_eq!((unsigned[0], unsigned[255]), (0.0, 1.0));
        assert!(unsigned.windows(2).all(|w| w[0] < w[1]));
        // the smallest non-zero value of the unsigned map sits in the 1e-6 decade
        assert!((unsigned[1] - 3.25e-7).abs() < 1e-12, "{}", unsigned[1]);
    }

    #[test]
    fn encode_picks_the_nearest_value() {
        let map = QuantMap::new(false);
        for code in 0..=255u8 {
            assert_eq!(map.encode(map.value(code)), code);
        }
        // between two neighbours: the nearer one; exactly half-way: the smaller one
        let (a, b) = (map.value(200), map.value(201));
        assert_eq!(map.encode(a + (b - a) * 0.4), 200);
        assert_eq!(map.encode(a + (b - a) * 0.6), 201);
        let mid = (a + b) / 2.0;
        if mid - a == b - mid {
            assert_eq!(map.encode(mid), 200);
        }
        assert_eq!(map.encode(2.0), 255);
        assert_eq!(map.encode(-1.0), 0);
    }

    #[test]
    fn signed_codes_keep_the_sign() {
        let map = QuantMap::new(true);
        // a tiny negative value is nearest to 0.0 but must stay negative
        let c = map.encode(-1e-9);
        assert!(map.value(c) < 0.0, "{}", map.value(c));
        let c = map.encode(1e-9);
        assert!(map.value(c) >= 0.0);
        assert_eq!(map.encode(-1.0), 0);
        assert_eq!(map.encode(1.0), 255);
    }

    #[test]
    fn round_trip_error_is_small_relative_to_the_block_scale() {
        let values: Vec<f32> = (0..1000)
            .map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 5 - 4))
            .collect();
        let map = QuantMap::new(true);
        let q = BlockQuantized::encode(&values, &map);
        assert_eq!(q.codes.len(), 1000);
        assert_eq!(q.absmax.len(), 4);
        assert_eq!(q.bytes(), 1000 + 16);
        let back = q.decode(&map);
        for (block, (orig, dec)) in values
            .chunks(BLOCK_SIZE)
            .zip(back.chunks(BLOCK_SIZE))
            .enumerate()
        {
            let absmax = q.absmax[block];
            for (o, d) in orig.iter().zip(dec) {
                // the coarsest spacing (top decade, 64 intervals over 0.9) bounds the error
                assert!(
                    (o - d).abs() <= absmax * 0.0071,
                    "{o} vs {d} (absmax {absmax})"
                );
                assert_eq!(o.signum(), d.signum(), "{o} vs {d}");
            }
        }
    }

    #[test]
    fn zero_block_decodes_to_zero() {
        let map = QuantMap::new(false);
        let q = BlockQuantized::encode(&[0.0; 300], &map);
        assert_eq!(q.absmax, vec![0.0, 0.0]);
        assert!(q.decode(&map).iter().all(|v| *v == 0.0));
    }
}
