//! Ctrl-C and SIGTERM: the first asks the run to stop after the current step (it then writes a
//! resumable state and exits with status 130); a second one ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::TrainError;

/// Installs the process's Ctrl-C / SIGTERM handler and returns the flag it sets. Call once per
/// process (the binary does); a second call fails.
pub fn install_stop_handler() -> Result<Arc<AtomicBool>, TrainError> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: stopping now, without saving");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then saving a resumable state (press Ctrl-C again to stop at once)");
    })
    .map_err(|e| TrainError::Usage(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(flag)
}
