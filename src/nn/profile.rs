//! Wall-clock time per kind of op, for `bench --breakdown`: where a training step's time goes.
//!
//! Off by default, when a [`scope`] costs one relaxed atomic load. The ops call it at their
//! leaves (a frozen layer's product, attention, a norm), on the thread that asked for the op,
//! so nested work on worker threads is counted in its caller's entry. Backward ops that candle
//! runs itself (element-wise, reshapes, the adapters' products) have no entry: they are the
//! step's time minus the entries.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// One kind of op: how many times it ran and its total seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: &'static str,
    pub calls: u64,
    pub seconds: f64,
    /// The matrix-product FLOPs these calls performed (0 where not counted).
    pub flops: u64,
}

/// Turns the timing on or off process-wide.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Times the rest of the caller's block under `name` (when the timing is on).
pub fn scope(name: &'static str) -> Option<Scope> {
    scope_flops(name, 0)
}

/// [`scope`] for an op that performs `flops` floating-point operations in matrix products.
pub fn scope_flops(name: &'static str, flops: u64) -> Option<Scope> {
    ON.load(Ordering::Relaxed).then(|| Scope {
        name,
        flops,
        start: Instant::now(),
    })
}

/// The entries so far, in the order first seen, and clears them.
pub fn take() -> Vec<Entry> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A running measurement; recorded when dropped.
pub struct Scope {
    name: &'static str,
    flops: u64,
    start: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let seconds = self.start.elapsed().as_secs_f64();
        let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        match table.iter_mut().find(|e| e.name == self.name) {
            Some(e) => {
                e.calls += 1;
                e.seconds += seconds;
                e.flops += self.flops;
            }
            None => table.push(Entry {
                name: self.name,
                calls: 1,
                seconds,
                flops: self.flops,
            }),
        }
    }
}

/// The system allocator, counting the bytes it holds: a binary that installs it
/// (`#[global_allocator]`, as `bench` does) can ask [`heap_bytes`] what a step keeps alive,
/// including what custom ops hold in their backward closures, which candle's graph walk does
/// not see.
pub struct CountingAlloc;

static HEAP: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        COUNTING.store(true, Ordering::Relaxed);
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HEAP.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        COUNTING.store(true, Ordering::Relaxed);
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
            HEAP.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// The most bytes the heap held since the last call (then starts again from now).
pub fn take_heap_peak() -> Option<usize> {
    COUNTING.load(Ordering::Relaxed).then(|| {
        let now = HEAP.load(Ordering::Relaxed);
        PEAK.swap(now, Ordering::Relaxed).max(now)
    })
}

/// Bytes the heap holds now, when [`CountingAlloc`] is the global allocator; `None` otherwise.
pub fn heap_bytes() -> Option<usize> {
    COUNTING
        .load(Ordering::Relaxed)
        .then(|| HEAP.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_on() {
        // One test owns the global switch, so the two halves cannot race with another test.
        take();
        drop(scope("off"));
        assert!(take().is_empty());
        enable(true);
        drop(scope("a"));
        drop(scope("a"));
        drop(scope_flops("b", 7));
        enable(false);
        let t = take();
        assert_eq!(
            t.iter()
                .map(|e| (e.name, e.calls, e.flops))
                .collect::<Vec<_>>(),
            [("a", 2, 0), ("b", 1, 7)]
        );
    }
}
