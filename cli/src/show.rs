//! How the CLI prints what the coordinator answers (pretty JSON).

use llmos_proto::v1 as api;
use serde_json::json;

pub fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}

/// Workers grouped by pool ("default" for workers that named none).
pub fn workers_json(ws: &[api::WorkerStatus]) -> serde_json::Value {
    let mut pools: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    for w in ws {
        let pool = if w.pool.is_empty() {
            "default"
        } else {
            &w.pool
        };
        let labels: std::collections::BTreeMap<_, _> = w.labels.iter().collect();
        pools
            .entry(pool.to_string())
            .or_default()
            .push(json!({"id": w.id, "address": w.address,
            "device": w.device, "healthy": w.healthy, "gone": w.gone, "cordoned": w.cordoned,
            "labels": labels, "memory_total_bytes": w.memory_total_bytes,
            "memory_free_bytes": w.memory_free_bytes, "shards": w.shards}));
    }
    json!(pools)
}

/// One line per stage: "worker: layers a-b (tp ranks ...)".
pub fn placement_line(ss: &[api::StagePlacement]) -> String {
    ss.iter()
        .map(|s| {
            let tp = if s.tensor_parallel_workers.is_empty() {
                String::new()
            } else {
                format!(" +tp {}", s.tensor_parallel_workers.join(","))
            };
            format!("{}: {}-{}{tp}", s.worker_id, s.layer_start, s.layer_end)
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

pub fn replicas_json(rs: &[api::ReplicaStatus]) -> serde_json::Value {
    json!(rs
        .iter()
        .map(|r| json!({"id": r.id, "state": r.state, "reason": r.reason, "epoch": r.epoch,
            "placement": placement_line(&r.stages), "running": r.running, "waiting": r.waiting,
            "in_flight": r.in_flight, "kv_blocks_free": r.kv_blocks_free, "routed": r.routed,
            "prefix_routed_rate": if r.routed > 0 { r.routed_for_prefix as f64 / r.routed as f64 } else { 0.0 },
            "prefix_cache_hit_rate": r.prefix_cache_hit_rate,
            "state_since_ms": r.state_since_ms}))
        .collect::<Vec<_>>())
}

pub fn stages_json(ss: &[api::StagePlacement]) -> serde_json::Value {
    json!(ss
        .iter()
        .map(|s| json!({"worker": s.worker_id, "address": s.worker_address, "layers": format!("{}-{}", s.layer_start, s.layer_end),
            "embed": s.embed, "head": s.head, "weight_bytes": s.weight_bytes,
            "ranks": 1 + s.tensor_parallel_workers.len(), "ranks_loaded": s.ranks_loaded}))
        .collect::<Vec<_>>())
}

/// Polls the cluster status until `name` is Ready, drawing a progress bar
/// per stage (ranks loaded) with what the model waits for; fails with the
/// reason when it failed or `timeout` passed.
pub fn control_plane_json(c: &Option<api::ControlPlaneStatus>) -> serde_json::Value {
    let Some(c) = c else { return json!(null) };
    json!({"store": c.store, "node_id": c.node_id, "role": c.role, "leader_id": c.leader_id, "leader": c.leader,
        "term": c.term, "commit_index": c.commit_index, "applied_index": c.applied_index,
        "snapshot_index": c.snapshot_index, "auth": c.auth, "internal_plane": c.internal_plane, "internal_tls": c.internal_tls,
        "members": c.members.iter().map(|m| json!({"id": m.id, "address": m.address, "leader": m.leader, "learner": m.learner})).collect::<Vec<_>>()})
}

/// Whether another coordinator may succeed where this one failed.
pub fn options_json(o: &api::ServingOptions) -> serde_json::Value {
    json!({"kv_cache_blocks": o.kv_cache_blocks, "block_size": o.block_size,
        "max_batch_tokens": o.max_batch_tokens, "max_running": o.max_running,
        "max_waiting": o.max_waiting, "prefix_caching": !o.disable_prefix_caching,
        "pipeline_transport": o.pipeline_transport, "kv_cache_dtype": o.kv_cache_dtype})
}

pub fn serving_json(s: &api::ServingStatus) -> serde_json::Value {
    json!({
        "running": s.running,
        "waiting": s.waiting,
        "kv_blocks_total": s.kv_blocks_total,
        "kv_blocks_used": s.kv_blocks_used,
        "kv_blocks_cached": s.kv_blocks_cached,
        "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
        "prefix_hit_tokens": s.prefix_hit_tokens,
        "preemptions": s.preemptions,
        "steps": s.steps,
        "generated_tokens": s.generated_tokens,
        "repaired_tokens": s.repaired_tokens,
    })
}
