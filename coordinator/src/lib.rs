//! llmos coordinator: the control plane. Links no libtorch.
//!
//! - [`state`]: the cluster state (workers, models, placements) and the
//!   commands that change it, applied deterministically: the seam a
//!   replicated log (Raft, etcd) sits behind.
//! - [`placement`]: plans contiguous layer ranges over workers in proportion
//!   to their free memory, or checks an explicit split.

pub mod placement;
pub mod state;
