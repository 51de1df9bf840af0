//! The process's peak memory, the figure a user sees in their system monitor: what a run
//! reports in `train_summary.json` and what `bench` compares with diffusers + peft.

/// Peak resident set size of this process so far, in bytes: `VmHWM` from `/proc/self/status`
/// on Linux, `getrusage`'s `ru_maxrss` elsewhere on Unix; `None` where neither is available.
pub fn peak_rss_bytes() -> Option<u64> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        return Some(kib * 1024);
    }
    #[cfg(unix)]
    {
        // SAFETY: getrusage fills the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let max = u64::try_from(usage.ru_maxrss).ok()?;
            // macOS reports bytes, the other Unixes KiB.
            return Some(if cfg!(target_os = "macos") {
                max
            } else {
                max * 1024
            });
        }
    }
    None
}

/// The memory the system can give a new process without swapping (`MemAvailable` of
/// `/proc/meminfo`), bytes; `None` where it cannot be read.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `bytes` in GiB with two decimals (`4.31 GiB`).
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_grows_with_what_the_process_touches() {
        let before = peak_rss_bytes().expect("a peak on this platform");
        let block = vec![1u8; 256 << 20];
        let after = peak_rss_bytes().expect("a peak on this platform");
        assert!(
            after >= before && after >= (256 << 20),
            "{before} → {after} with {} bytes touched",
            block.iter().map(|&b| b as usize).sum::<usize>()
        );
        assert_eq!(gib(3 << 29), "1.50 GiB");
    }
}
