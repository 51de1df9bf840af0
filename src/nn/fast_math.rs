//! Vectorised `exp` and `erf` over slices of f32, for the fused CPU kernels (attention's softmax,
//! GEGLU).
//!
//! libm's `expf`/`erff` are scalar calls; a softmax over 1024 keys or a GELU over a `[1024, 2560]`
//! activation spends most of its time in them. Here each function is a branch-free polynomial that
//! the compiler turns into AVX-512 or AVX2 code (chosen at run time, with a portable fallback).
//!
//! Accuracy, checked in the tests against `f64`: `exp` within 2 ulp (relative 2.4e-7) for
//! arguments in [-87, 88] (smaller arguments give 0 or a tiny normal number, never a NaN); `erf`
//! within 3e-7 absolute, so `gelu` within 3e-7·|x|.

/// Calls `$f` compiled for the best instruction set this processor has.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the processor has AVX-512F (checked just above).
                return unsafe { x86::avx512::$f($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the processor has AVX2 and FMA (checked just above).
                return unsafe { x86::avx2::$f($($arg),*) };
            }
        }
        portable::$f($($arg),*)
    }};
}

/// A norm's scale or shift over a run of values: one number for the run (a group norm's
/// channel) or one per value (a layer norm).
#[derive(Clone, Copy)]
pub enum Param<'a> {
    Const(f32),
    PerValue(&'a [f32]),
}

/// `(Σ(x − shift), Σ(x − shift)²)` in f64 (sixteen f32 lanes per block of 256 values, then
/// f64). A shift near the mean (any one of the values will do) keeps the variance
/// `Σ(x − shift)²/n − (Σ(x − shift)/n)²` free of cancellation.
pub fn sum_and_squares(x: &[f32], shift: f32) -> (f64, f64) {
    dispatch!(sum_and_squares_impl(x, shift))
}

/// A norm's output over one run: `y = (x − mean)·rstd·w + b`, then SiLU when `silu`.
pub fn norm_forward(
    x: &[f32],
    (mean, rstd): (f32, f32),
    (w, b): (Param, Param),
    silu: bool,
    out: &mut [f32],
) {
    dispatch!(norm_forward_impl(x, (mean, rstd), (w, b), silu, out))
}

/// A norm's backward, first pass over one run: writes `d = dŷ·w` (dŷ the gradient before the
/// SiLU, when `silu`) into `d` and returns `(Σd, Σd·x̂)` with `x̂ = (x − mean)·rstd`.
pub fn norm_backward_sums(
    (x, dy): (&[f32], &[f32]),
    (mean, rstd): (f32, f32),
    (w, b): (Param, Param),
    silu: bool,
    d: &mut [f32],
) -> (f64, f64) {
    dispatch!(norm_backward_sums_impl(
        (x, dy),
        (mean, rstd),
        (w, b),
        silu,
        d
    ))
}

/// A norm's backward, second pass: `dx = rstd·(d − m1 − x̂·m2)`, written over `d`.
pub fn norm_backward_finish(
    x: &[f32],
    (mean, rstd): (f32, f32),
    (m1, m2): (f32, f32),
    d: &mut [f32],
) {
    dispatch!(norm_backward_finish_impl(x, (mean, rstd), (m1, m2), d))
}

/// `x ← exp(x − shift)` for every element; returns the sum of the results (accumulated in f32,
/// sixteen lanes).
pub fn exp_sub_sum(row: &mut [f32], shift: f32) -> f32 {
    dispatch!(exp_sub_sum_impl(row, shift))
}

/// The largest element (−∞ for an empty slice; NaNs are skipped).
pub fn max(row: &[f32]) -> f32 {
    dispatch!(max_impl(row))
}

/// `out[i] = a[i] · gelu(g[i])` with the exact (erf) GELU, for GEGLU's forward.
pub fn geglu(a: &[f32], g: &[f32], out: &mut [f32]) {
    dispatch!(geglu_impl(a, g, out))
}

/// GEGLU's backward: `da[i] = dy[i] · gelu(g[i])`, `dg[i] = dy[i] · a[i] · gelu′(g[i])`.
pub fn geglu_backward(a: &[f32], g: &[f32], dy: &[f32], da: &mut [f32], dg: &mut [f32]) {
    dispatch!(geglu_backward_impl(a, g, dy, da, dg))
}

/// `out[i] = silu(g[i]) · u[i]` with `silu(g) = g / (1 + e^−g)`, for SwiGLU's forward.
pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    dispatch!(swiglu_impl(g, u, out))
}

/// SwiGLU's backward: `dg[i] = dy[i] · u[i] · silu′(g[i])`, `du[i] = dy[i] · silu(g[i])`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dispatch!(swiglu_backward_impl(g, u, dy, dg, du))
}

/// The kernels, written once as `#[inline(always)]` functions and instantiated per instruction
/// set by `kernels!`.
mod portable {
    use super::scalar::*;
    use super::Param;

    const LANES: usize = 16;

    #[inline(always)]
    pub fn exp_sub_sum_impl(row: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (x, a) in chunk.iter_mut().zip(acc.iter_mut()) {
                *x = exp(*x - shift);
                *a += *x;
            }
        }
        let mut sum = 0.0;
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            sum += *x;
        }
        sum + acc.iter().sum::<f32>()
    }

    #[inline(always)]
    pub fn max_impl(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (x, a) in chunk.iter().zip(acc.iter_mut()) {
                *a = if *x > *a { *x } else { *a };
            }
        }
        let tail = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        acc.iter().fold(tail, |m, &x| m.max(x))
    }

    #[inline(always)]
    pub fn sum_and_squares_impl(x: &[f32], shift: f32) -> (f64, f64) {
        let (mut sum, mut squares) = (0f64, 0f64);
        for block in x.chunks(256) {
            let (mut s, mut q) = ([0f32; LANES], [0f32; LANES]);
            let mut chunks = block.chunks_exact(LANES);
            for chunk in &mut chunks {
                for ((v, s), q) in chunk.iter().zip(s.iter_mut()).zip(q.iter_mut()) {
                    let v = *v - shift;
                    *s += v;
                    *q += v * v;
                }
            }
            for v in chunks.remainder() {
                let v = f64::from(*v - shift);
                sum += v;
                squares += v * v;
            }
            sum += s.iter().map(|v| f64::from(*v)).sum::<f64>();
            squares += q.iter().map(|v| f64::from(*v)).sum::<f64>();
        }
        (sum, squares)
    }

    /// `f(i, w_i, b_i)` over a run, with the parameters constant or per value (each case its
    /// own loop, so each vectorises).
    #[inline(always)]
    fn with_params(n: usize, (w, b): (Param, Param), mut f: impl FnMut(usize, f32, f32)) {
        match (w, b) {
            (Param::Const(w), Param::Const(b)) => (0..n).for_each(|i| f(i, w, b)),
            (Param::PerValue(w), Param::PerValue(b)) => {
                let (w, b) = (&w[..n], &b[..n]);
                (0..n).for_each(|i| f(i, w[i], b[i]))
            }
            (Param::Const(w), Param::PerValue(b)) => {
                let b = &b[..n];
                (0..n).for_each(|i| f(i, w, b[i]))
            }
            (Param::PerValue(w), Param::Const(b)) => {
                let w = &w[..n];
                (0..n).for_each(|i| f(i, w[i], b))
            }
        }
    }

    #[inline(always)]
    pub fn norm_forward_impl(
        x: &[f32],
        (mean, rstd): (f32, f32),
        params: (Param, Param),
        silu: bool,
        out: &mut [f32],
    ) {
        let n = x.len().min(out.len());
        let (x, out) = (&x[..n], &mut out[..n]);
        if silu {
            with_params(n, params, |i, w, b| {
                let y = (x[i] - mean) * rstd * w + b;
                out[i] = y / (1.0 + exp(-y));
            });
        } else {
            with_params(n, params, |i, w, b| out[i] = (x[i] - mean) * rstd * w + b);
        }
    }

    #[inline(always)]
    pub fn norm_backward_sums_impl(
        (x, dy): (&[f32], &[f32]),
        (mean, rstd): (f32, f32),
        params: (Param, Param),
        silu: bool,
        d: &mut [f32],
    ) -> (f64, f64) {
        let n = x.len().min(dy.len()).min(d.len());
        let (x, dy, d) = (&x[..n], &dy[..n], &mut d[..n]);
        if silu {
            with_params(n, params, |i, w, b| {
                let xhat = (x[i] - mean) * rstd;
                let y = xhat * w + b;
                let sg = 1.0 / (1.0 + exp(-y));
                d[i] = dy[i] * sg * (1.0 + y * (1.0 - sg)) * w;
            });
        } else {
            with_params(n, params, |i, w, _| d[i] = dy[i] * w);
        }
        let (mut s1, mut s2) = (0f64, 0f64);
        for (xb, db) in x.chunks(256).zip(d.chunks(256)) {
            let (mut a, mut c) = ([0f32; LANES], [0f32; LANES]);
            let mut xc = xb.chunks_exact(LANES);
            let mut dc = db.chunks_exact(LANES);
            for (xs, ds) in (&mut xc).zip(&mut dc) {
                for l in 0..LANES {
                    a[l] += ds[l];
                    c[l] += ds[l] * (xs[l] - mean) * rstd;
                }
            }
            for (xv, dv) in xc.remainder().iter().zip(dc.remainder()) {
                s1 += f64::from(*dv);
                s2 += f64::from(*dv * (*xv - mean) * rstd);
            }
            s1 += a.iter().map(|v| f64::from(*v)).sum::<f64>();
            s2 += c.iter().map(|v| f64::from(*v)).sum::<f64>();
        }
        (s1, s2)
    }

    #[inline(always)]
    pub fn norm_backward_finish_impl(
        x: &[f32],
        (mean, rstd): (f32, f32),
        (m1, m2): (f32, f32),
        d: &mut [f32],
    ) {
        for (dv, xv) in d.iter_mut().zip(x) {
            *dv = rstd * (*dv - m1 - (*xv - mean) * rstd * m2);
        }
    }

    #[inline(always)]
    pub fn geglu_impl(a: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, a), g) in out.iter_mut().zip(a).zip(g) {
            *o = *a * gelu(*g);
        }
    }

    #[inline(always)]
    pub fn geglu_backward_impl(a: &[f32], g: &[f32], dy: &[f32], da: &mut [f32], dg: &mut [f32]) {
        let n = a
            .len()
            .min(g.len())
            .min(dy.len())
            .min(da.len())
            .min(dg.len());
        let (a, g, dy) = (&a[..n], &g[..n], &dy[..n]);
        let (da, dg) = (&mut da[..n], &mut dg[..n]);
        for i in 0..n {
            let (value, slope) = gelu_and_slope(g[i]);
            da[i] = dy[i] * value;
            dg[i] = dy[i] * a[i] * slope;
        }
    }

    #[inline(always)]
    pub fn swiglu_impl(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = g.len().min(u.len()).min(out.len());
        let (g, u, out) = (&g[..n], &u[..n], &mut out[..n]);
        for i in 0..n {
            out[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        }
    }

    #[inline(always)]
    pub fn swiglu_backward_impl(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let n = g
            .len()
            .min(u.len())
            .min(dy.len())
            .min(dg.len())
            .min(du.len());
        let (g, u, dy) = (&g[..n], &u[..n], &dy[..n]);
        let (dg, du) = (&mut dg[..n], &mut du[..n]);
        for i in 0..n {
            let sigmoid = 1.0 / (1.0 + exp(-g[i]));
            du[i] = dy[i] * g[i] * sigmoid;
            dg[i] = dy[i] * u[i] * sigmoid * (1.0 + g[i] * (1.0 - sigmoid));
        }
    }
}

/// Branch-free scalar building blocks; the loops above vectorise them.
mod scalar {
    /// `exp(x)` by `2^n · e^r` with `n = round(x·log2 e)` and `r = x − n·ln 2` (Cody–Waite: ln 2
    /// in two parts, so `r` is exact to f32 rounding even for |x| near 88), `|r| ≤ 0.347`, `e^r` a
    /// degree-7 Taylor polynomial.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
        const ROUND: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_145_75; // 0x3f317200: n·LN2_HI is exact for |n| < 2^9
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = x.clamp(-87.0, 88.0);
        let r = x * LOG2E + ROUND;
        let n = r.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
        let nf = r - ROUND;
        let f = (x - nf * LN2_HI) - nf * LN2_LO;
        let p = 1.0
            + f * (1.0
                + f * (1.0 / 2.0
                    + f * (1.0 / 6.0
                        + f * (1.0 / 24.0
                            + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
        p * f32::from_bits(((n + 127) as u32) << 23)
    }

    /// `erf(x)`: Abramowitz & Stegun 7.1.26 on |x| with the sign restored (abs. error ≤ 1.5e-7).
    #[inline(always)]
    pub fn erf(x: f32) -> f32 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
        let y = 1.0 - poly * exp(-z * z);
        if x < 0.0 {
            -y
        } else {
            y
        }
    }

    /// `x · Φ(x)` with `Φ(x) = (1 + erf(x/√2))/2`.
    #[inline(always)]
    pub fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    /// `gelu(x)` and `gelu′(x) = Φ(x) + x·φ(x)`.
    #[inline(always)]
    pub fn gelu_and_slope(x: f32) -> (f32, f32) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
        (x * cdf, cdf + x * pdf)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// The portable kernels, each wrapped in a function compiled for one instruction set.
    macro_rules! kernels {
        ($features:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn exp_sub_sum_impl(row: &mut [f32], shift: f32) -> f32 {
                super::super::portable::exp_sub_sum_impl(row, shift)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn max_impl(row: &[f32]) -> f32 {
                super::super::portable::max_impl(row)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn sum_and_squares_impl(x: &[f32], shift: f32) -> (f64, f64) {
                super::super::portable::sum_and_squares_impl(x, shift)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn norm_forward_impl(
                x: &[f32],
                stats: (f32, f32),
                params: (super::super::Param, super::super::Param),
                silu: bool,
                out: &mut [f32],
            ) {
                super::super::portable::norm_forward_impl(x, stats, params, silu, out)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn norm_backward_sums_impl(
                inputs: (&[f32], &[f32]),
                stats: (f32, f32),
                params: (super::super::Param, super::super::Param),
                silu: bool,
                d: &mut [f32],
            ) -> (f64, f64) {
                super::super::portable::norm_backward_sums_impl(inputs, stats, params, silu, d)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn norm_backward_finish_impl(
                x: &[f32],
                stats: (f32, f32),
                means: (f32, f32),
                d: &mut [f32],
            ) {
                super::super::portable::norm_backward_finish_impl(x, stats, means, d)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn geglu_impl(a: &[f32], g: &[f32], out: &mut [f32]) {
                super::super::portable::geglu_impl(a, g, out)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn geglu_backward_impl(
                a: &[f32],
                g: &[f32],
                dy: &[f32],
                da: &mut [f32],
                dg: &mut [f32],
            ) {
                super::super::portable::geglu_backward_impl(a, g, dy, da, dg)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn swiglu_impl(g: &[f32], u: &[f32], out: &mut [f32]) {
                super::super::portable::swiglu_impl(g, u, out)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn swiglu_backward_impl(
                g: &[f32],
                u: &[f32],
                dy: &[f32],
                dg: &mut [f32],
                du: &mut [f32],
            ) {
                super::super::portable::swiglu_backward_impl(g, u, dy, dg, du)
            }
        };
    }

    pub mod avx512 {
        kernels!("avx512f,avx2,fma");
    }

    pub mod avx2 {
        kernels!("avx2,fma");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Maclaurin series below 4 (its cancellation costs < 8 of f64's 16 digits there);
        // beyond, erf differs from ±1 by less than 1.6e-8.
        if x.abs() >= 4.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for k in 1..200 {
            term *= -x * x / k as f64;
            sum += term / (2 * k + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid() -> Vec<f32> {
        (0..=20_000).map(|i| -10.0 + i as f32 * 1e-3).collect()
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let xs: Vec<f32> = (0..=34_900).map(|i| -86.5 + i as f32 * 5e-3).collect();
        let mut got = xs.clone();
        exp_sub_sum(&mut got, 0.5);
        for (x, g) in xs.iter().zip(&got) {
            let want = f64::from(*x - 0.5).exp(); // the kernel subtracts in f32 too
            let rel = (f64::from(*g) - want).abs() / want;
            assert!(
                rel < 2.4e-7,
                "exp({x} - 0.5) = {g}, want {want} (rel {rel:e})"
            );
        }
        // The returned sum, over a softmax-like range (and a length that leaves a tail).
        let mut row: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.01).sin() * 8.0).collect();
        let want_sum: f64 = row.iter().map(|x| f64::from(*x - 8.0).exp()).sum();
        let sum = exp_sub_sum(&mut row, 8.0);
        assert!(
            (f64::from(sum) - want_sum).abs() / want_sum < 1e-6,
            "{sum} vs {want_sum}"
        );
        // Far below the range: a tiny number, not a NaN or a negative.
        let mut low = [-1e4f32, -200.0, f32::NEG_INFINITY];
        exp_sub_sum(&mut low, 0.0);
        assert!(low.iter().all(|v| (0.0..1e-37).contains(v)), "{low:?}");
    }

    #[test]
    fn max_finds_the_largest_in_any_lane() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let mut xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            if n > 0 {
                xs[n / 2] = 5.0;
            }
            let want = if n == 0 { f32::NEG_INFINITY } else { 5.0 };
            assert_eq!(max(&xs), want, "n = {n}");
        }
    }

    #[test]
    fn geglu_and_its_gradient_match_f64() {
        let g = grid();
        let a: Vec<f32> = g.iter().map(|x| 0.5 + (x * 1.3).cos()).collect();
        let dy: Vec<f32> = g.iter().map(|x| (x * 0.7).sin() - 0.2).collect();
        let mut out = vec![0.0; g.len()];
        geglu(&a, &g, &mut out);
        let (mut da, mut dg) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        geglu_backward(&a, &g, &dy, &mut da, &mut dg);
        for i in 0..g.len() {
            let (x, a, dy) = (f64::from(g[i]), f64::from(a[i]), f64::from(dy[i]));
            let cdf = 0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let gelu = x * cdf;
            let tol = 4e-7 * (1.0 + x.abs()) * (1.0 + a.abs());
            assert!((f64::from(out[i]) - a * gelu).abs() < tol, "geglu at {x}");
            assert!((f64::from(da[i]) - dy * gelu).abs() < tol, "da at {x}");
            assert!(
                (f64::from(dg[i]) - dy * a * (cdf + x * pdf)).abs() < tol,
                "dg at {x}"
            );
        }
    }
}
