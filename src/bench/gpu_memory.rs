//! The GPU memory a benchmark run takes. candle has no allocator statistics, so a thread asks
//! the CUDA driver for the used memory (total − free) every few milliseconds and keeps the
//! highest value; the memory in use before the model is built (the CUDA context, other
//! processes) is subtracted. A sampled peak can miss a spike shorter than the interval.

use candle_core::Device;

/// Watches the used memory of a CUDA device from [`DeviceMemory::watch`] until dropped.
pub struct DeviceMemory {
    #[cfg(feature = "cuda")]
    watch: Option<cuda::Watch>,
}

impl DeviceMemory {
    /// Starts watching `device` (nothing to watch on the CPU).
    pub fn watch(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        {
            DeviceMemory {
                watch: cuda::Watch::start(device),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            DeviceMemory {}
        }
    }

    /// The highest used memory seen so far above the starting point, bytes; `None` on the CPU
    /// or when the driver could not be asked.
    pub fn peak(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        {
            self.watch.as_ref().and_then(cuda::Watch::peak)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};
    use candle_core::Device;

    pub struct Watch {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicU64>,
        baseline: u64,
        thread: Option<JoinHandle<()>>,
    }

    fn used_bytes() -> Option<u64> {
        let (free, total) = result::mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }

    impl Watch {
        pub fn start(device: &Device) -> Option<Watch> {
            let Device::Cuda(dev) = device else {
                return None;
            };
            let context: Arc<CudaContext> = dev.cuda_stream().context().clone();
            context.bind_to_thread().ok()?;
            let baseline = used_bytes()?;
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicU64::new(baseline));
            let (stop2, peak2) = (stop.clone(), peak.clone());
            let thread = std::thread::spawn(move || {
                if context.bind_to_thread().is_err() {
                    return;
                }
                while !stop2.load(Ordering::Relaxed) {
                    if let Some(used) = used_bytes() {
                        peak2.fetch_max(used, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            Some(Watch {
                stop,
                peak,
                baseline,
                thread: Some(thread),
            })
        }

        pub fn peak(&self) -> Option<u64> {
            Some(
                self.peak
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.baseline),
            )
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}
