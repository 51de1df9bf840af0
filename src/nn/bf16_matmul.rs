//! Matrix products with a bf16 weight on processors that multiply bf16 natively (AVX-512 BF16's
//! `vdpbf16ps`: 32 bf16 products summed pairwise into 16 f32 lanes per instruction, twice the
//! f32 FMA's rate).
//!
//! Under `mixed_precision: bf16` the frozen weight matrices are kept in bf16 on the CPU. Widened
//! to f32 for each product (as on processors without the instructions), they cost f32's time;
//! PyTorch's bf16 instead multiplies bf16 activations by bf16 weights with f32 accumulation. Here
//! the same: the f32 input is rounded to bf16 (to nearest, ties to even, as a `.to(bfloat16)`
//! does), products accumulate in f32, and the result is added to an f32 output. Only a frozen
//! linear layer's two products take this path: its forward `x Wᵀ` and its input gradient
//! `dY W`.
//!
//! Layout: the weight operand is packed per call into panels of [`NR`] columns whose rows hold
//! pairs of consecutive `k` (the instruction's operand); the input is packed into rows of pairs.
//! The weight is packed a chunk of columns at a time ([`CHUNK_BYTES`]); a task computes one
//! block of [`MC`] rows against a few panels of the chunk: [`MR`] × [`NR`] tiles, each summed over
//! the whole `k` in registers and then added to the output.

use rayon::prelude::*;

use super::dense::Shared;

/// Output columns per panel: two 16-lane registers.
const NR: usize = 32;
/// Output rows per register tile: 2·MR accumulators, with the two panel loads and the
/// broadcast input, within the 32 vector registers.
const MR: usize = 12;
/// Rows per task: the block's packed input (MC × k/2 × 4 bytes) stays in the core's L2 cache
/// while the task runs over its panels.
const MC: usize = 4 * MR;
/// Panels per task.
const PANELS: usize = 4;
/// The packed weight is made and used a block at a time: [`KC`] pairs of `k` by about
/// [`CHUNK_BYTES`] of columns. All row blocks then re-read it from the cache (a vocabulary-wide
/// `lm_head`, 151,936 columns, is 272 MB packed, and would be streamed from memory once per row
/// block), and each row block's input for the block of `k` stays cached across its panels.
const CHUNK_BYTES: usize = 4 << 20;
/// Pairs of `k` per block.
const KC: usize = 512;

/// Whether this processor has the instructions (AVX-512 F and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f32` → bf16 bits, rounded to nearest with ties to even (NaN stays a quiet NaN).
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// How the weight `W: [out, in]` is read as the product's right operand `B: [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// `B = Wᵀ` (`k = in`, `n = out`): a forward `x Wᵀ`.
    Transposed,
    /// `B = W` (`k = out`, `n = in`): an input gradient `dY W`.
    AsIs,
}

/// `c += a · B` for `a: [m, k]` (f32, row-major), `B` the bf16 weight `w: [out, in]` read as
/// `orientation` says, `c: [m, n]` (f32, row-major). Panics unless [`available`] and the
/// lengths fit (callers check both).
pub fn add_product(
    a: &[f32],
    w: &[half::bf16],
    (out, inp): (usize, usize),
    orientation: Orientation,
    c: &mut [f32],
) {
    assert!(available(), "bf16 products need AVX-512 BF16");
    assert_eq!(w.len(), out * inp, "bf16 product: weight size");
    let (k, n) = match orientation {
        Orientation::Transposed => (inp, out),
        Orientation::AsIs => (out, inp),
    };
    let m = a.len() / k.max(1);
    assert!(
        a.len() == m * k && c.len() == m * n,
        "bf16 product: operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let k2 = k.div_ceil(2);
    let a = pack_input(a, m, k);
    let chunk = (CHUNK_BYTES / (KC * NR * 4)).max(1) * NR;
    let mut b = Vec::new();
    let c_ptr = Shared(c.as_mut_ptr());
    for p0 in (0..k2).step_by(KC) {
        let pairs = KC.min(k2 - p0);
        for chunk0 in (0..n).step_by(chunk) {
            let chunk_cols = chunk.min(n - chunk0);
            let columns = chunk0..chunk0 + chunk_cols;
            pack_weight(w, (k, n), orientation, (p0..p0 + pairs, columns), &mut b);
            let panels = chunk_cols.div_ceil(NR);
            let panel_groups = panels.div_ceil(PANELS);
            let (a, b) = (&a, &b);
            (0..m.div_ceil(MC) * panel_groups)
                .into_par_iter()
                .for_each(|task| {
                    let (block, group) = (task / panel_groups, task % panel_groups);
                    let rows = block * MC..((block + 1) * MC).min(m);
                    for panel in group * PANELS..((group + 1) * PANELS).min(panels) {
                        let col0 = chunk0 + panel * NR;
                        let cols = NR.min(n - col0);
                        let b_panel = &b[panel * pairs * NR..][..pairs * NR];
                        for r0 in rows.clone().step_by(MR) {
                            let tile_rows = MR.min(rows.end - r0);
                            let a_tile = &a[r0 * k2 + p0..][..(MR - 1) * k2 + pairs];
                            // SAFETY: the processor has the instructions (asserted above);
                            // a_tile holds MR packed rows of stride k2 from pair p0 (the input
                            // is padded to whole tiles), b_panel pairs × NR; rows
                            // r0..r0+tile_rows × columns col0..col0+cols of c belong to this
                            // task alone, and c outlives the parallel loop.
                            unsafe {
                                let dst = c_ptr.get().add(r0 * n + col0);
                                tile((a_tile, k2), b_panel, pairs, dst, n, tile_rows, cols);
                            }
                        }
                    }
                });
        }
    }
}

/// Pairs `pairs` of `k` and columns `columns` of the weight into `packed` as
/// `[panels][pairs][NR]` pairs `(B[2p, j], B[2p + 1, j])` (low half first), zero past `k` and
/// the last column.
fn pack_weight(
    w: &[half::bf16],
    (k, n): (usize, usize),
    orientation: Orientation,
    (pairs, columns): (std::ops::Range<usize>, std::ops::Range<usize>),
    packed: &mut Vec<u32>,
) {
    let k2 = pairs.len();
    let panels = columns.len().div_ceil(NR);
    packed.clear();
    packed.resize(panels * k2 * NR, 0);
    let bits = |v: &half::bf16| u32::from(v.to_bits());
    packed
        .par_chunks_mut(k2 * NR)
        .enumerate()
        .for_each(|(panel, dst)| {
            let col0 = columns.start + panel * NR;
            let cols = NR.min(columns.end - col0);
            match orientation {
                // B = Wᵀ: column j of B is row j of w (`[n, k]`), read along its pairs.
                Orientation::Transposed => {
                    let (k0, k1) = (2 * pairs.start, (2 * pairs.end).min(k));
                    for j in 0..cols {
                        let row = &w[(col0 + j) * k + k0..(col0 + j) * k + k1];
                        let mut two = row.chunks_exact(2);
                        for (p, pair) in (&mut two).enumerate() {
                            dst[p * NR + j] = bits(&pair[0]) | (bits(&pair[1]) << 16);
                        }
                        if let [last] = two.remainder() {
                            dst[(k2 - 1) * NR + j] = bits(last);
                        }
                    }
                }
                // B = W (`[k, n]`): rows 2p and 2p + 1 interleaved.
                Orientation::AsIs => {
                    for (p, dst) in (pairs.start..).zip(dst.chunks_exact_mut(NR)) {
                        let lo = &w[2 * p * n + col0..][..cols];
                        let dst = &mut dst[..cols];
                        if 2 * p + 1 < k {
                            let hi = &w[(2 * p + 1) * n + col0..][..cols];
                            for ((d, lo), hi) in dst.iter_mut().zip(lo).zip(hi) {
                                *d = bits(lo) | (bits(hi) << 16);
                            }
                        } else {
                            for (d, lo) in dst.iter_mut().zip(lo) {
                                *d = bits(lo);
                            }
                        }
                    }
                }
            }
        });
}

/// The input rounded to bf16 as `[m rounded up to MR][k/2]` pairs (zero past `k` and `m`).
fn pack_input(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    let mut packed = vec![0u32; m.div_ceil(MR) * MR * k2];
    packed
        .par_chunks_mut(k2)
        .zip(a.par_chunks(k))
        .for_each(|(dst, row)| {
            let mut pairs = row.chunks_exact(2);
            for (d, pair) in dst.iter_mut().zip(&mut pairs) {
                *d = u32::from(to_bf16(pair[0])) | (u32::from(to_bf16(pair[1])) << 16);
            }
            if let [last] = pairs.remainder() {
                dst[k2 - 1] = u32::from(to_bf16(*last));
            }
        });
    packed
}

/// One MR × NR tile: `c[i, j] += Σ_p a[i, p] · b[p, j]` over `k2` pairs, `rows` × `cols` of
/// it written.
///
/// # Safety
/// AVX-512 F and BF16 present; `a` holds MR rows of `k2` pairs at stride `lda`, `b` `k2` rows
/// of NR pairs; `c` is valid for `rows` rows of `ldc` with `cols` columns each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(
    (a, lda): (&[u32], usize),
    b: &[u32],
    k2: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for p in 0..k2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
        for (i, acc) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * lda + p) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
        }
    }
    let low = if cols >= 16 {
        0xffff
    } else {
        (1u32 << cols) as u16 - 1
    };
    let high = if cols >= NR {
        0xffff
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    for (i, acc) in acc.iter().enumerate().take(rows) {
        let row = c.add(i * ldc);
        let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(low, row), acc[0]);
        _mm512_mask_storeu_ps(row, low, sum);
        if high != 0 {
            let row = row.add(16);
            let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(high, row), acc[1]);
            _mm512_mask_storeu_ps(row, high, sum);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: (&[u32], usize), _: &[u32], _: usize, _: *mut f32, _: usize, _: usize, _: usize) {
    unreachable!("bf16 products run only where `available` says so")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rounding_is_to_nearest_even() {
        for x in [
            1.0f32,
            -2.5,
            1.234_567_8,
            1e-30,
            65504.0,
            f32::INFINITY,
            -0.0,
        ] {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        // Exactly halfway: ties go to the even mantissa.
        let halfway = f32::from_bits(0x3f80_8000);
        assert_eq!(to_bf16(halfway), 0x3f80);
        let halfway_odd = f32::from_bits(0x3f81_8000);
        assert_eq!(to_bf16(halfway_odd), 0x3f82);
        assert!(half::bf16::from_bits(to_bf16(f32::NAN)).is_nan());
    }

    /// Both orientations against the products of the bf16-rounded operands in f64, on sizes
    /// with row, column and odd-`k` tails, added to a prefilled output.
    #[test]
    fn products_equal_the_rounded_operands_products() {
        if !available() {
            eprintln!("skipped: this processor has no AVX-512 BF16");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // The last: more columns than one packed chunk (its weight is made in two).
        for (m, out, inp) in [
            (1, 1, 1),
            (13, 33, 7),
            (50, 70, 129),
            (100, 64, 96),
            (3, 17_000, 129),
        ] {
            let w: Vec<half::bf16> = (0..out * inp)
                .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            for orientation in [Orientation::Transposed, Orientation::AsIs] {
                let (k, n) = match orientation {
                    Orientation::Transposed => (inp, out),
                    Orientation::AsIs => (out, inp),
                };
                let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let start: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut c = start.clone();
                add_product(&a, &w, (out, inp), orientation, &mut c);
                for i in 0..m {
                    for j in 0..n {
                        let mut want = f64::from(start[i * n + j]);
                        for kk in 0..k {
                            let x = f64::from(half::bf16::from_bits(to_bf16(a[i * k + kk])));
                            let b = match orientation {
                                Orientation::Transposed => w[j * k + kk],
                                Orientation::AsIs => w[kk * n + j],
                            };
                            want += x * f64::from(b);
                        }
                        let got = f64::from(c[i * n + j]);
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{orientation:?} {m}×{out}×{inp} [{i}, {j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
