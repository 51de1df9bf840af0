//! Process settings that make CPU training faster; binaries call [`tune_process`] first thing in
//! `main`, before any tensor exists.
//!
//! **Memory.** Freed tensor memory stays in the process instead of going back to the kernel.
//! A training step allocates and frees the same large buffers (activations, gradients) over and
//! over. With glibc's defaults, blocks above the dynamic mmap threshold get their own `mmap`, and
//! freed memory at the top of the heap is trimmed, so the next allocation page-faults its way
//! back in: on SD 1.5 at 256 px a profile showed ~20 % of the step in the kernel clearing pages.
//! [`keep_freed_memory`] raises both thresholds so that freed blocks are reused. The peak
//! resident memory is unchanged (it is what a step needs at its widest point); memory is simply
//! not returned between steps.
//!
//! **Idle spinning.** candle runs element-wise ops on its own worker threads, which spin for
//! 25 000 iterations after each op before sleeping. On a small machine those spins take the
//! cores the matrix products' threads need; measured on 2 busy cores, a short spin
//! (`CANDLE_BARRIER_POOL_SPIN_LIMIT=100`) cut the CPU time of an SD 1.5 step by ~40 %.

/// The spin limit [`tune_process`] gives candle's worker pool unless the user set one.
pub const SPIN_LIMIT: &str = "100";

/// Applies both settings of the module docs. Call it at the start of `main`, before any other
/// thread runs and before candle's first op (candle reads its setting once). An explicit
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` in the environment is kept.
pub fn tune_process() {
    keep_freed_memory();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT);
    }
}

/// Tunes glibc's malloc for a training process (see the module docs). Returns whether the
/// settings were applied (false on other platforms and C libraries).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: mallopt only changes malloc's tuning parameters; it is called with valid
        // parameter numbers and values, and returns 0 when it refuses them.
        unsafe {
            // 32 MiB is the largest threshold glibc accepts on 64-bit systems; setting it also
            // turns off the dynamic adjustment.
            let mmap = mallopt(M_MMAP_THRESHOLD, 32 << 20);
            let trim = mallopt(M_TRIM_THRESHOLD, c_int::MAX);
            mmap == 1 && trim == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn applies_on_glibc() {
        let applied = super::keep_freed_memory();
        assert_eq!(
            applied,
            cfg!(all(target_os = "linux", target_env = "gnu")),
            "mallopt refused the settings"
        );
    }
}
