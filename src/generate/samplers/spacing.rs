//! Which training timesteps a sampler visits: diffusers' `timestep_spacing` (`leading`,
//! `linspace`, `trailing`, see arXiv:2305.08891 table 2) with `steps_offset`, computed with the
//! same floating-point steps as the numpy calls diffusers makes (`linspace`, float `arange`,
//! round-half-to-even, `interp`), so our timesteps and sigmas are diffusers' to the bit.

use std::fmt;
use std::str::FromStr;

/// How `steps` timesteps are spread over `0..num_train_timesteps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `0, r, 2r, ...` (`r = N / steps`, integer) plus `steps_offset`: SD 1.x's schedule.
    Leading,
    /// Evenly from `N − 1` down to `0` (rounded for integer samplers).
    Linspace,
    /// `N, N − N/steps, ...` minus one: always starts at the last timestep.
    Trailing,
}

impl TimestepSpacing {
    /// The name diffusers uses in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Trailing => "trailing",
        }
    }
}

impl fmt::Display for TimestepSpacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TimestepSpacing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leading" => Ok(TimestepSpacing::Leading),
            "linspace" => Ok(TimestepSpacing::Linspace),
            "trailing" => Ok(TimestepSpacing::Trailing),
            other => Err(format!(
                "timestep_spacing `{other}` is not supported; use `leading`, `linspace` or `trailing`"
            )),
        }
    }
}

/// `numpy.linspace(start, stop, num)` (endpoint included), in f64.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            values[num - 1] = stop;
            values
        }
    }
}

/// `numpy.arange(start, stop, step)` for floats: `ceil((stop − start) / step)` values, filled as
/// numpy fills them (`start + i · (second − first)`).
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let count = ((stop - start) / step).ceil();
    if count.is_nan() || count <= 0.0 || count.is_infinite() {
        return Vec::new();
    }
    let count = count as usize;
    let delta = (start + step) - start;
    (0..count)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `numpy.round`: halves go to the even neighbour.
pub(crate) fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `numpy.interp(x, 0..table.len(), table)`: linear interpolation in a table indexed by integer
/// timesteps, clamped at both ends.
pub(crate) fn interp(x: f64, table: &[f64]) -> f64 {
    let Some(&last) = table.last() else {
        return f64::NAN;
    };
    if x <= 0.0 {
        return table[0];
    }
    if x >= (table.len() - 1) as f64 {
        return last;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return table[j];
    }
    let slope = table[j + 1] - table[j];
    slope * (x - j as f64) + table[j]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers_match_numpy() {
        // np.linspace(0, 999, 4) = [0, 333, 666, 999]; np.linspace(0, 1, 1) = [0].
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(linspace(0.0, 1.0, 1), vec![0.0]);
        // np.arange(1000, 0, -1000/3) = [1000, 666.67, 333.33]; np.arange(0, 0, 1) = [].
        let a = arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(a.len(), 3);
        assert!((a[1] - 666.666_666_666_666_7).abs() < 1e-9);
        assert!(arange(0.0, 0.0, 1.0).is_empty());
        // np.round([0.5, 1.5, 2.5, -0.5]) = [0, 2, 2, -0].
        let r: Vec<f64> = [0.5, 1.5, 2.5, -0.5]
            .iter()
            .map(|&x| round_even(x))
            .collect();
        assert_eq!(r, vec![0.0, 2.0, 2.0, 0.0]);
        let table = [0.0, 10.0, 30.0];
        assert_eq!(interp(0.25, &table), 2.5);
        assert_eq!(interp(1.5, &table), 20.0);
        assert_eq!(interp(2.0, &table), 30.0);
        assert_eq!(interp(7.0, &table), 30.0);
        assert_eq!(interp(-1.0, &table), 0.0);
    }

    #[test]
    fn spacing_names_round_trip_and_unknown_ones_are_named() {
        for s in [
            TimestepSpacing::Leading,
            TimestepSpacing::Linspace,
            TimestepSpacing::Trailing,
        ] {
            assert_eq!(s.as_str().parse::<TimestepSpacing>(), Ok(s));
        }
        let err = "karras".parse::<TimestepSpacing>().unwrap_err();
        assert!(err.contains("`karras`"), "{err}");
    }
}
