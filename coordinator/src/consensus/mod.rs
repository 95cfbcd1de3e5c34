//! The replicated control plane on raft-rs.
//!
//! - [`log_store`]: durable storage (checksummed WAL, atomic snapshots,
//!   compaction) behind `raft::Storage`.
//! - [`node`]: [`RaftNode`], the handle callers use (config, errors, the
//!   published view); `ready_loop`: the Ready loop it runs on a thread,
//!   owning `RawNode`, the state machine and the waiters of writes and
//!   ReadIndex reads.
//! - [`RaftTransport`] (the seam between the node and the network) and
//!   [`transport`]: it over gRPC (batched, per-peer queues); `mem` (tests
//!   and the `test-util` feature only): an in-memory network with faults.
//! - `sim` (tests only): the deterministic harness that steps replicas'
//!   Ready loops over a simulated network under a seed.

pub mod log_store;
#[cfg(any(test, feature = "test-util"))]
pub mod mem;
pub mod node;
mod ready_loop;
pub mod transport;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "test-util"))]
pub use mem::MemNetwork;
pub use node::{Bootstrap, RaftConfig, RaftError, RaftNode, View};
pub use transport::{GrpcTransport, PeerService};

use raft::prelude::Message;

/// Best-effort delivery of raft messages; raft retries what is lost.
pub trait RaftTransport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
    /// Snapshots sent since the last call, by peer, and whether each
    /// reached it: raft is told only then (a leader waits for the outcome
    /// before sending that peer anything else).
    fn snapshot_outcomes(&self) -> Vec<(u64, bool)>;
    /// Where peer `id` listens (from the peer list, membership, or a batch).
    fn set_peer(&self, id: u64, address: &str);
    fn remove_peer(&self, id: u64);
}

/// raft-rs logs through slog; this drain forwards to `tracing`.
struct TracingDrain;

struct KvString(String);

impl slog::Serializer for KvString {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvString(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            _ => tracing::debug!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

pub(crate) fn tracing_logger(node: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("node" => node))
}
