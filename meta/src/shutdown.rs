//! How a llmos process learns it should stop: SIGINT (Ctrl-C) or SIGTERM
//! (what Kubernetes sends a pod, and `llmos local` its children). Both lead
//! to the same graceful shutdown: stop accepting, finish what is in
//! flight, join the tasks, exit 0.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Both handlers, installed: from here on neither signal kills the process
/// outright. Install them before announcing the process is ready (a signal
/// that arrives earlier takes its default action).
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for either signal; returns its name.
    pub async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}
