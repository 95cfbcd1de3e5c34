//! The pipeline links of the shards this worker hosts: one table, written
//! by the host thread when it loads or drops a shard and read by
//! `HostHandle` (which receives a step's input off the host thread) and by
//! the host's steps (which send their output on).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::Device;

use super::error::{Result, RuntimeError};
use super::step::ShardConfig;
use crate::comm::{LinkSpec, PipelineLink, Rendezvous};

/// A shard's links to its neighbouring stages (a stage leader's).
#[derive(Clone, Default)]
pub(super) struct Links {
    pub prev: Option<Arc<PipelineLink>>,
    pub next: Option<Arc<PipelineLink>>,
    /// Columns of the hidden states that arrive.
    pub hidden: i64,
}

/// Model name -> its shard's links.
#[derive(Clone, Default)]
pub(super) struct LinkTable(Arc<Mutex<HashMap<String, Links>>>);

impl LinkTable {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Links>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model's links (none when it has none or is not loaded).
    pub fn get(&self, model: &str) -> Links {
        self.map().get(model).cloned().unwrap_or_default()
    }

    pub fn set(&self, model: &str, links: Links) {
        self.map().insert(model.to_string(), links);
    }

    pub fn remove(&self, model: &str) {
        self.map().remove(model);
    }
}

/// The links `spec` asks for: each kept from `old` when its spec is the
/// same and it still works, else formed anew within `form_timeout` (the
/// previous stage's link first: neighbours form theirs in the same order
/// along the pipeline, so no two wait on each other).
pub(super) fn relink(
    rendezvous: Option<&Rendezvous>,
    device: Device,
    spec: &ShardConfig,
    old: Links,
    hidden: i64,
    form_timeout: Duration,
    op_timeout: Duration,
) -> Result<Links> {
    let form = |want: &Option<LinkSpec>,
                have: Option<Arc<PipelineLink>>|
     -> Result<Option<Arc<PipelineLink>>> {
        let Some(want) = want else {
            return Ok(None);
        };
        if let Some(h) = have.filter(|h| h.spec() == want && !h.is_broken()) {
            return Ok(Some(h));
        }
        let rv = rendezvous.ok_or_else(|| {
            RuntimeError::Invalid(
                "this worker has no collective listener: it cannot hold a linked pipeline stage"
                    .into(),
            )
        })?;
        Ok(Some(Arc::new(PipelineLink::form(
            rv,
            want,
            device,
            form_timeout,
            op_timeout,
        )?)))
    };
    let prev = form(&spec.prev_link, old.prev)?;
    let next = form(&spec.next_link, old.next)?;
    Ok(Links { prev, next, hidden })
}
