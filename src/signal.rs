//! OS signals as one future. Knows nothing of HTTP.
//!
//! SIGINT and SIGTERM start a graceful shutdown; a second one during the drain ends the
//! process at once, the way the signal's default action would (so a shell sees status 130 for
//! SIGINT, 143 for SIGTERM). SIGKILL cannot be caught by any process: a drain only happens
//! when the orchestrator sends SIGTERM first and waits (Kubernetes does, for
//! `terminationGracePeriodSeconds`).

use std::io;

use futures_lite::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::shutdown::Shutdown;

/// The signals that start a graceful shutdown.
const SHUTDOWN_SIGNALS: [i32; 2] = [SIGINT, SIGTERM];

/// Registered handlers for SIGINT and SIGTERM. Registering replaces the default action
/// (terminate) for as long as the process runs.
pub(crate) struct Signals(signal_hook_async_std::Signals);

impl Signals {
    /// Registers the handlers.
    pub(crate) fn new() -> io::Result<Signals> {
        signal_hook_async_std::Signals::new(SHUTDOWN_SIGNALS).map(Signals)
    }

    /// Starts `shutdown` on the first signal; ends the process on the second. Never returns.
    pub(crate) async fn handle(mut self, shutdown: Shutdown) {
        if let Some(signal) = self.0.next().await {
            log::info!("received {}; shutting down gracefully (send it again to exit at once)", name(signal));
            shutdown.start();
        }
        if let Some(signal) = self.0.next().await {
            log::warn!("received {} during the drain; exiting now", name(signal));
            exit_by(signal);
        }
        futures_lite::future::pending::<()>().await;
    }
}

/// Ends the process as the signal's default action would.
fn exit_by(signal: i32) -> ! {
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    std::process::exit(128 + signal)
}

/// The signal's conventional name.
fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
