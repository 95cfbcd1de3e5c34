//! What `ClusterStatus` and `ListWorkers` report: workers, and each model
//! with its replicas, their stages, the router's view of their load and
//! the engine's own figures.

use llmos_proto::v1 as api;
use llmos_proto::worker::v1 as wk;
use tonic::Request;

use crate::cluster::Cluster;
use crate::shard_spec::pipeline_linked;
use crate::state::{ClusterState, Deployment, ModelState, Replica, Serving};

/// One model as `ClusterStatus` shows it (asks its first serving replica's
/// engine for its figures).
pub(crate) async fn model_status(
    cluster: &Cluster,
    state: &ClusterState,
    m: &Deployment,
) -> api::ModelStatus {
    let primary = m.primary();
    let serving = match primary.filter(|r| r.state == ModelState::Ready) {
        Some(r) => engine_stats(cluster, m, r).await,
        None => None,
    };
    let stages = |r: &Replica| -> Vec<api::StagePlacement> {
        (0..r.placement.stages.len())
            .map(|i| stage_status(state, r, i))
            .collect()
    };
    api::ModelStatus {
        name: m.name.clone(),
        source: m.source.clone(),
        state: format!("{:?}", m.state),
        stages: primary.map(&stages).unwrap_or_default(),
        serving,
        pipeline_transport: match primary {
            Some(r) if r.placement.stages.len() > 1 => {
                if pipeline_linked(state, m, &r.placement) {
                    "link"
                } else {
                    "grpc"
                }
            }
            _ => "",
        }
        .into(),
        options: Some(serving_options(&m.serving)),
        reason: model_reason(m),
        generation: m.generation,
        epoch: primary.map_or(0, |r| r.epoch),
        state_since_ms: m.since_ms,
        replicas_desired: m.replicas,
        replicas: m
            .instances
            .values()
            .map(|r| {
                let load = cluster.router.load(&m.name, r.epoch);
                let reported = load.reported.unwrap_or_default();
                api::ReplicaStatus {
                    id: r.id,
                    state: if r.draining() {
                        "Draining".into()
                    } else {
                        format!("{:?}", r.state)
                    },
                    reason: r.reason.clone(),
                    epoch: r.epoch,
                    stages: stages(r),
                    running: reported.running,
                    waiting: reported.waiting,
                    in_flight: load.in_flight,
                    kv_blocks_free: reported.kv_blocks_free,
                    routed: load.routed,
                    routed_for_prefix: load.routed_for_prefix,
                    prefix_cache_hit_rate: if reported.prefix_queried_tokens > 0 {
                        reported.prefix_hit_tokens as f64 / reported.prefix_queried_tokens as f64
                    } else {
                        0.0
                    },
                    state_since_ms: if r.draining() {
                        r.draining_since_ms
                    } else {
                        r.since_ms
                    },
                }
            })
            .collect(),
        pool: m.pool.clone(),
        labels: m.labels.clone().into_iter().collect(),
        autoscale_min: m.autoscale.map_or(0, |a| a.0),
        autoscale_max: m.autoscale.map_or(0, |a| a.1),
    }
}

fn serving_status(e: &wk::EngineStats) -> api::ServingStatus {
    api::ServingStatus {
        running: e.running,
        waiting: e.waiting,
        kv_blocks_total: e.kv_blocks_total,
        kv_blocks_used: e.kv_blocks_used,
        kv_blocks_cached: e.kv_blocks_cached,
        prefix_cache_hit_rate: if e.prefix_queried_tokens > 0 {
            e.prefix_hit_tokens as f64 / e.prefix_queried_tokens as f64
        } else {
            0.0
        },
        prefix_hit_tokens: e.prefix_hit_tokens,
        prefix_queried_tokens: e.prefix_queried_tokens,
        preemptions: e.preemptions,
        steps: e.steps,
        generated_tokens: e.generated_tokens,
        repaired_tokens: e.repaired_tokens,
    }
}

/// The engine's figures from the worker running a replica's engine.
pub(crate) async fn engine_stats(
    cluster: &Cluster,
    dep: &Deployment,
    r: &Replica,
) -> Option<api::ServingStatus> {
    let mut client = cluster.worker(r.engine_worker()?).await.ok()?;
    let mut req = Request::new(wk::StatsRequest {});
    req.set_timeout(cluster.config.connect_timeout);
    let stats = client.stats(req).await.ok()?.into_inner();
    stats
        .shards
        .iter()
        .find(|s| s.shard.as_ref().is_some_and(|s| s.model == dep.name))
        .and_then(|s| s.engine.as_ref())
        .map(serving_status)
}

pub(crate) fn stage_status(state: &ClusterState, r: &Replica, i: usize) -> api::StagePlacement {
    let s = &r.placement.stages[i];
    api::StagePlacement {
        ranks_loaded: r.loaded.iter().filter(|(st, _)| *st as usize == i).count() as u32,
        worker_id: s.worker.clone(),
        worker_address: state
            .workers
            .get(&s.worker)
            .map(|w| w.address.clone())
            .unwrap_or_default(),
        layer_start: s.layer_start,
        layer_end: s.layer_end,
        embed: s.embed,
        head: s.head,
        weight_bytes: s.bytes,
        tensor_parallel_workers: s.followers.clone(),
    }
}

/// Workers as the state has them; free memory from the last heartbeat
/// where this coordinator holds the leases (the leader), else as
/// registered.
pub(crate) fn worker_statuses(cluster: &Cluster, state: &ClusterState) -> Vec<api::WorkerStatus> {
    state
        .workers
        .values()
        .map(|w| api::WorkerStatus {
            id: w.id.clone(),
            address: w.address.clone(),
            device: w.device.clone(),
            healthy: w.healthy,
            gone: w.gone,
            memory_total_bytes: w.memory_total_bytes,
            memory_free_bytes: cluster
                .leases
                .report(&w.id)
                .map_or(w.memory_free_bytes, |r| r.memory_free_bytes),
            shards: state
                .models
                .values()
                .flat_map(|m| {
                    m.instances.values().flat_map(move |r| {
                        r.placement
                            .stages
                            .iter()
                            .filter(|s| s.holds(&w.id))
                            .map(move |s| {
                                format!("{}/{}:{}-{}", m.name, r.id, s.layer_start, s.layer_end)
                            })
                    })
                })
                .collect(),
            pool: w.pool.clone(),
            labels: w.labels.clone().into_iter().collect(),
            cordoned: w.cordoned,
        })
        .collect()
}

/// Why a model is not Ready: its own reason (the next replica's wait, or
/// its failure), else the first replica's that has one.
pub(crate) fn model_reason(m: &Deployment) -> String {
    if !m.reason.is_empty() || m.state == ModelState::Ready {
        return m.reason.clone();
    }
    m.instances
        .values()
        .find(|r| !r.reason.is_empty() && !r.draining())
        .map(|r| format!("replica {}: {}", r.id, r.reason))
        .unwrap_or_default()
}

/// A deployment's serving options as the API states them.
pub(crate) fn serving_options(s: &Serving) -> api::ServingOptions {
    api::ServingOptions {
        kv_cache_blocks: s.kv_blocks,
        block_size: s.block_size,
        max_batch_tokens: s.max_batch_tokens,
        max_running: s.max_running,
        max_waiting: s.max_waiting,
        disable_prefix_caching: !s.prefix_caching,
        pipeline_transport: s.pipeline_transport.clone(),
        kv_cache_dtype: match s.kv_cache_dtype.as_str() {
            "" => "auto".into(),
            t => t.into(),
        },
    }
}

pub(crate) fn control_plane(cluster: &Cluster) -> api::ControlPlaneStatus {
    let c = cluster.store.status();
    api::ControlPlaneStatus {
        store: c.store.to_string(),
        node_id: c.node_id,
        leader_id: c.leader_id,
        leader: c.leader,
        term: c.term,
        commit_index: c.commit_index,
        applied_index: c.applied_index,
        snapshot_index: c.snapshot_index,
        role: c.role,
        auth: if cluster.config.auth.required {
            "required".into()
        } else {
            "off".into()
        },
        internal_plane: match cluster.config.internal_plane {
            Some(a) => a.to_string(),
            None => "shared".into(),
        },
        internal_tls: internal_tls(cluster.config.tls.as_deref()),
        members: c
            .members
            .into_iter()
            .map(|m| api::Member {
                id: m.id,
                address: m.address,
                leader: m.leader,
                learner: m.learner,
            })
            .collect(),
    }
}

/// `ControlPlaneStatus.internal_tls`: what protects the internal plane,
/// and what nothing can (NCCL).
pub fn internal_tls(tls: Option<&llmos_tls::Tls>) -> String {
    const NCCL: &str = "; NCCL traffic between GPUs is not encrypted";
    match tls {
        Some(t) => format!("mutual TLS (this coordinator: {}){NCCL}", t.identity()),
        None => format!("plaintext (--insecure){NCCL}"),
    }
}
