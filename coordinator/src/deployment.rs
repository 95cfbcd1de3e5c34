//! A deployed model: what the operator asked for (desired) and what the
//! reconciler made of it (observed), one `Replica` per full copy. Changed
//! only by `crate::state::ClusterState::apply`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::placement::Placement;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelState {
    /// Asked for, not placed yet (`Deployment::reason` says what it waits
    /// for).
    Pending,
    /// Placed; shards are loading.
    Loading,
    Ready,
    /// Will not converge without an edit (a shard the workers refuse to
    /// load); undeploy it.
    Failed(String),
}

/// How the operator asked for a model to be split (0 / empty: automatic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelShape {
    pub stages: u32,
    pub layer_split: Vec<u32>,
    pub tensor_parallel: u32,
}

/// One full copy of a deployed model: its own stages and ranks (on workers
/// no other replica of the model uses) and its own engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub id: u32,
    /// The parallel shape it was planned for: a replica whose shape is no
    /// longer the deployment's is replaced (a re-split).
    #[serde(default)]
    pub shape: ParallelShape,
    pub placement: Placement,
    /// The log index of this placement: carried by every shard command and
    /// engine request, so a worker tells a stale command (or request) from
    /// a current one.
    pub epoch: u64,
    /// (stage, rank) pairs loaded under `epoch`.
    pub loaded: BTreeSet<(u32, u32)>,
    /// Loading or Ready (Pending and Failed are the model's).
    pub state: ModelState,
    /// Why it is not Ready yet; empty when Ready.
    pub reason: String,
    pub since_ms: u64,
    /// Unix ms since it stopped taking new requests (scaled down, or its
    /// worker drained); 0: not draining. Removed once its requests finish.
    pub draining_since_ms: u64,
}

impl Replica {
    /// Every (stage, rank, worker) of the placement.
    pub fn shards(&self) -> impl Iterator<Item = (u32, u32, &str)> {
        self.placement.stages.iter().enumerate().flat_map(|(i, s)| {
            s.workers()
                .enumerate()
                .map(move |(r, w)| (i as u32, r as u32, w))
        })
    }

    pub fn holds(&self, worker: &str) -> bool {
        self.placement.stages.iter().any(|s| s.holds(worker))
    }

    pub fn draining(&self) -> bool {
        self.draining_since_ms > 0
    }

    /// Takes new requests.
    pub fn serving(&self) -> bool {
        self.state == ModelState::Ready && !self.draining()
    }

    /// The worker running its engine (stage 0, rank 0).
    pub fn engine_worker(&self) -> Option<&str> {
        self.placement.stages.first().map(|s| s.worker.as_str())
    }

    pub(crate) fn set_state(&mut self, state: ModelState, reason: String, at_ms: u64) {
        if self.state != state {
            self.since_ms = at_ms;
        }
        self.state = state;
        self.reason = reason;
    }
}

pub(crate) fn one() -> u32 {
    1
}

/// One deployed model: what the operator asked for (desired) beside what
/// the reconciler has made of it so far (observed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    // --- desired ---
    pub source: String,
    pub dtype: String,
    /// "none", "int8", "q8_0", "q4_0", "q4_1" or "file" ("" in logs from
    /// before quantization: none).
    #[serde(default)]
    pub quantization: String,
    #[serde(default)]
    pub serving: Serving,
    #[serde(default)]
    pub shape: ParallelShape,
    /// How many replicas should serve.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Only workers of this pool ("": any) carrying these labels.
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// (min, max) replicas for the built-in autoscaler; None: off.
    #[serde(default)]
    pub autoscale: Option<(u32, u32)>,
    /// Changes on every edit of the desired part (the log index of the
    /// edit).
    #[serde(default)]
    pub generation: u64,
    // --- observed ---
    /// Replicas by id (ids are never reused).
    #[serde(default)]
    pub instances: BTreeMap<u32, Replica>,
    #[serde(default)]
    pub next_replica: u32,
    /// Ready: every replica asked for serves. Loading: some are placed.
    /// Pending: none placed yet. Failed: will not converge without an edit.
    pub state: ModelState,
    /// What the next replica waits for (room), or why the model failed;
    /// each replica has its own reason too.
    #[serde(default)]
    pub reason: String,
    /// Unix ms since `state` (as stamped by the leader).
    #[serde(default)]
    pub since_ms: u64,
}

impl Deployment {
    /// Replicas taking new requests.
    pub fn serving(&self) -> impl Iterator<Item = &Replica> {
        self.instances.values().filter(|r| r.serving())
    }

    /// The replica placed under `epoch`.
    pub fn at_epoch(&self, epoch: u64) -> Option<&Replica> {
        self.instances.values().find(|r| r.epoch == epoch)
    }

    /// The replica with a shard on `worker`, if any (at most one).
    pub fn replica_on(&self, worker: &str) -> Option<&Replica> {
        self.instances.values().find(|r| r.holds(worker))
    }

    /// The replica the status shows first: a serving one, else the first.
    pub fn primary(&self) -> Option<&Replica> {
        self.serving()
            .next()
            .or_else(|| self.instances.values().next())
    }

    /// Derives the model's state from its replicas' (Failed stays).
    pub(crate) fn refresh(&mut self, at_ms: u64) {
        if matches!(self.state, ModelState::Failed(_)) {
            return;
        }
        let serving = self.serving().filter(|r| r.shape == self.shape).count() as u32;
        let state = if serving >= self.replicas {
            ModelState::Ready
        } else if self.instances.is_empty() {
            ModelState::Pending
        } else {
            ModelState::Loading
        };
        if state != self.state {
            self.since_ms = at_ms;
        }
        if state == ModelState::Ready {
            self.reason.clear();
        }
        self.state = state;
    }
}

/// How a deployed model is served: its KV cache and engine limits (0 in a
/// request means the default; stored resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub kv_blocks: u32,
    pub block_size: u32,
    pub max_batch_tokens: u32,
    pub max_running: u32,
    pub max_waiting: u32,
    pub prefix_caching: bool,
    /// "auto", "grpc" or "link" (see `ServingOptions.pipeline_transport`);
    /// "" in logs from before it: auto.
    #[serde(default)]
    pub pipeline_transport: String,
    /// "auto", "f32", "bf16" or "f16" (see `ServingOptions.kv_cache_dtype`);
    /// "" in logs from before it: auto.
    #[serde(default)]
    pub kv_cache_dtype: String,
}

impl Serving {
    /// Bytes of one cached key or value element of a model whose elements
    /// take `model_bytes` ("auto": the model's).
    pub fn kv_element_bytes(&self, model_bytes: u64) -> u64 {
        match self.kv_cache_dtype.as_str() {
            "f32" => 4,
            "bf16" | "f16" => 2,
            _ => model_bytes,
        }
    }
}

impl Default for Serving {
    fn default() -> Self {
        use llmos_meta::serving as d;
        Serving {
            kv_blocks: d::DEFAULT_KV_BLOCKS,
            block_size: d::DEFAULT_BLOCK_SIZE,
            max_batch_tokens: d::DEFAULT_MAX_BATCH_TOKENS,
            max_running: d::DEFAULT_MAX_RUNNING,
            max_waiting: d::DEFAULT_MAX_WAITING,
            prefix_caching: true,
            pipeline_transport: d::DEFAULT_PIPELINE_TRANSPORT.into(),
            kv_cache_dtype: "auto".into(),
        }
    }
}
