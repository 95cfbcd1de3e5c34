//! Collective communication for tensor-parallel groups: the `Collective`
//! seam (rank, world size, all-reduce sum, all-gather, broadcast,
//! send/recv, barrier) with three implementations:
//!
//! - [`TcpGroup`]: a full mesh of TCP links between the ranks' processes
//!   (any host), for CPU workers; all-reduce is one exchange for small
//!   buffers and a ring (reduce-scatter + all-gather) for large ones. It also
//!   carries the group's control messages (the leader's step broadcasts).
//! - [`NcclGroup`]: NCCL through cudarc (loaded at run time), for ranks whose
//!   tensors live on CUDA devices; formed over a `TcpGroup` that hands out
//!   the unique id.
//! - [`SoloGroup`]: world size 1, every collective a no-op.
//!
//! [`PipelineLink`] uses a two-rank group of either backend to pass hidden
//! states from one pipeline stage straight to the next.
//!
//! Every operation has a deadline: a peer that dies or stops answering fails
//! the operation (and the group: it is `broken` afterwards) within it, so a
//! request waiting on a dead rank ends with UNAVAILABLE instead of hanging.
//! Sums are taken in rank order on every rank, so all ranks hold bitwise
//! equal results.

mod link;
mod nccl;
mod stream;
mod tcp;

pub use link::{LinkBackend, LinkSpec, PipelineLink};
pub use nccl::{nccl_available, NcclGroup};
pub use tcp::{Rendezvous, TcpGroup};

use tch::Tensor;

/// A collective's or a link's failure.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer failed, closed its link or did not answer in time; the group
    /// (or link) is broken afterwards.
    #[error("collective: {0}")]
    Failed(String),
    /// A peer is alive but did not take part: it failed the step on its
    /// side (a pipeline link's previous stage, a rank that sent nothing).
    #[error("{0}")]
    PeerStepFailed(String),
    /// What was asked cannot be done with this group or link (a rank, a
    /// dtype, a backend, a shape).
    #[error("{0}")]
    Invalid(String),
    #[error("device {0:?} is not available: {1}")]
    DeviceUnavailable(String, String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// A group of ranks that run collectives together. Every rank calls the
/// same operations in the same order with the same shapes.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// "tcp", "nccl" or "solo", for logs and errors.
    fn backend(&self) -> &'static str;
    /// Sums `t` over all ranks, in place (the same result on every rank).
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()>;
    /// Every rank's `t` (all the same shape), concatenated along dim 0 in
    /// rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Root's `t` into every rank's `t` (same shape and dtype everywhere).
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    fn send(&self, t: &Tensor, peer: usize) -> Result<()>;
    /// Fills `t` with what `peer` sent (same shape and dtype).
    fn recv(&self, t: &mut Tensor, peer: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Sums a host f32 buffer over all ranks in place (the fused CPU decode
    /// step's activations). Device backends refuse host buffers.
    fn all_reduce_host(&self, buf: &mut [f32]) -> Result<()>;
    /// Bytes this rank has sent so far (benchmarks report them per token).
    fn bytes_sent(&self) -> u64;
    /// An operation failed: the group's framing or communicator is gone and
    /// only a new group helps.
    fn is_broken(&self) -> bool {
        false
    }
}

/// World size 1: nothing to exchange.
pub struct SoloGroup;

impl Collective for SoloGroup {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "solo"
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.copy())
    }
    fn broadcast(&self, _t: &mut Tensor, root: usize) -> Result<()> {
        check_rank(root, 1)
    }
    fn send(&self, _t: &Tensor, peer: usize) -> Result<()> {
        Err(no_peer(peer, 0))
    }
    fn recv(&self, _t: &mut Tensor, peer: usize) -> Result<()> {
        Err(no_peer(peer, 0))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_reduce_host(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
}

fn check_rank(r: usize, world: usize) -> Result<()> {
    if r >= world {
        return Err(CommError::Invalid(format!(
            "rank {r} is outside a group of {world}"
        )));
    }
    Ok(())
}

fn no_peer(peer: usize, me: usize) -> CommError {
    CommError::Invalid(format!(
        "rank {me} cannot exchange with rank {peer}: not another rank of its group"
    ))
}

#[cfg(test)]
mod tests;
