//! `Registry` (workers register and heartbeat) and `Admin` (deploy,
//! undeploy, workers, status).

use std::sync::Arc;
use std::time::Instant;

use llmos_proto::v1 as api;
use llmos_proto::worker::v1 as wk;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::error::{CoordError, Result};
use crate::placement::{plan_tp, ModelShape, PlacementRequest, Stage, WorkerCapacity};
use crate::state::{ClusterState, Command, Deployment, ModelState, Serving, StateError};

pub struct RegistryService {
    pub cluster: Arc<Cluster>,
}

#[tonic::async_trait]
impl wk::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<wk::RegisterRequest>,
    ) -> Result<Response<wk::RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() || r.address.is_empty() {
            return Err(Status::invalid_argument(
                "worker_id and address are required",
            ));
        }
        self.cluster.forget_client(&r.address);
        self.cluster
            .propose(Command::RegisterWorker {
                id: r.worker_id.clone(),
                address: r.address.clone(),
                device: r.device,
                memory_total_bytes: r.memory_total_bytes,
                memory_free_bytes: r.memory_free_bytes,
                at_ms: self.cluster.now_ms(),
                collective_address: r.collective_address.clone(),
            })
            .await?;
        tracing::info!(worker = %r.worker_id, address = %r.address, "worker registered");
        // A restarted worker gets its shards back; the first stage of a
        // model it serves learns its (possibly new) address; a stage's
        // tensor-parallel group links up again (every rank reloads), and so
        // do the pipeline links of its neighbouring stages (they keep their
        // weights and cache).
        let state = self.cluster.read();
        for m in state.models.values() {
            let stages = &m.placement.stages;
            let linked = pipeline_linked(&state, m);
            let near = |i: usize| {
                stages[i].holds(&r.worker_id)
                    || (linked
                        && (i > 0 && stages[i - 1].holds(&r.worker_id)
                            || stages.get(i + 1).is_some_and(|s| s.holds(&r.worker_id))))
            };
            for (i, s) in stages.iter().enumerate().filter(|(i, _)| {
                near(*i) || (*i == 0 && stages.iter().any(|o| o.holds(&r.worker_id)))
            }) {
                for (rank, worker) in s.workers().enumerate() {
                    let (cluster, spec) = (
                        self.cluster.clone(),
                        shard_spec(&state, m, i, rank, self.cluster.config.step_timeout),
                    );
                    let worker = worker.to_string();
                    tokio::spawn(async move {
                        if let Err(e) = load_stage(&cluster, &worker, spec).await {
                            tracing::error!(%worker, error = %e, "reloading a shard after re-registration failed");
                        }
                    });
                }
            }
        }
        Ok(Response::new(wk::RegisterResponse {
            heartbeat_interval_ms: self.cluster.config.heartbeat_interval.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<wk::HeartbeatRequest>,
    ) -> Result<Response<wk::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let known = match self
            .cluster
            .propose(Command::Heartbeat {
                id: r.worker_id,
                memory_free_bytes: r.memory_free_bytes,
                at_ms: self.cluster.now_ms(),
            })
            .await
        {
            Ok(()) => true,
            Err(CoordError::State(StateError::UnknownWorker(_))) => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(wk::HeartbeatResponse { known }))
    }
}

/// Whether a deployment's stages pass hidden states over direct pipeline
/// links: asked for ("link"), or "auto" with every stage on a GPU (NCCL).
pub(crate) fn pipeline_linked(state: &ClusterState, dep: &Deployment) -> bool {
    let stages = &dep.placement.stages;
    if stages.len() < 2 {
        return false;
    }
    match dep.serving.pipeline_transport.as_str() {
        "link" => true,
        "grpc" => false,
        _ => stages.iter().all(|s| on_gpu(state, &s.worker)),
    }
}

fn on_gpu(state: &ClusterState, worker: &str) -> bool {
    state
        .workers
        .get(worker)
        .is_some_and(|w| w.device.starts_with("cuda"))
}

/// The link between stage `i` and stage `i + 1` as rank `rank` (0: stage
/// `i`, which sends) sees it: NCCL when both leaders are on GPUs, TCP
/// otherwise.
fn pipeline_link(
    state: &ClusterState,
    dep: &Deployment,
    i: usize,
    rank: u32,
    step_timeout: std::time::Duration,
) -> wk::PipelineLink {
    let ends = [
        &dep.placement.stages[i].worker,
        &dep.placement.stages[i + 1].worker,
    ];
    let info = |w: &String| state.workers.get(w);
    wk::PipelineLink {
        rank,
        peers: ends
            .iter()
            .map(|w| {
                info(w)
                    .map(|w| w.collective_address.clone())
                    .unwrap_or_default()
            })
            .collect(),
        group: format!(
            "{}/{:x}-{:x}",
            dep.placement.link_name(&dep.name, i),
            info(ends[0]).map_or(0, |w| w.registered_at_ms),
            info(ends[1]).map_or(0, |w| w.registered_at_ms),
        ),
        backend: if ends.iter().all(|w| on_gpu(state, w)) {
            wk::LinkBackend::Nccl
        } else {
            wk::LinkBackend::Tcp
        } as i32,
        timeout_ms: step_timeout.as_millis() as u32,
    }
}

fn dtype_code(dtype: &str) -> wk::DType {
    match dtype {
        "bf16" => wk::DType::Bf16,
        _ => wk::DType::F32,
    }
}

/// The spec of rank `rank` of stage `i` of a deployment; the first stage's
/// leader also gets the engine, with the later stages' current addresses.
/// Followers of a tensor-parallel group hold neither embedding nor head.
fn shard_spec(
    state: &ClusterState,
    dep: &Deployment,
    i: usize,
    rank: usize,
    step_timeout: std::time::Duration,
) -> wk::ShardSpec {
    let s = &dep.placement.stages[i];
    let v = &dep.serving;
    let tp = dep.placement.tensor_parallel.max(1);
    let tensor_parallel = (tp > 1).then(|| wk::TensorParallel {
        rank: rank as u32,
        world_size: tp,
        peers: s
            .workers()
            .map(|w| {
                state
                    .workers
                    .get(w)
                    .map(|w| w.collective_address.clone())
                    .unwrap_or_default()
            })
            .collect(),
        group: dep.placement.group_name(&dep.name, i),
        timeout_ms: step_timeout.as_millis() as u32,
    });
    let leader = rank == 0;
    let linked = pipeline_linked(state, dep);
    let n = dep.placement.stages.len();
    let prev_link =
        (linked && leader && i > 0).then(|| pipeline_link(state, dep, i - 1, 1, step_timeout));
    let next_link =
        (linked && leader && i + 1 < n).then(|| pipeline_link(state, dep, i, 0, step_timeout));
    let engine = (i == 0 && leader).then(|| wk::EngineSpec {
        next_stages: dep.placement.stages[1..]
            .iter()
            .map(|n| wk::StageRef {
                worker_id: n.worker.clone(),
                address: state
                    .workers
                    .get(&n.worker)
                    .map(|w| w.address.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        max_batch_tokens: v.max_batch_tokens,
        max_running: v.max_running,
        max_waiting: v.max_waiting,
        disable_prefix_caching: !v.prefix_caching,
        step_timeout_ms: step_timeout.as_millis() as u32,
        linked,
    });
    wk::ShardSpec {
        model: dep.name.clone(),
        source: dep.source.clone(),
        layer_start: s.layer_start,
        layer_end: s.layer_end,
        embed: s.embed && leader,
        head: s.head && leader,
        dtype: dtype_code(&dep.dtype) as i32,
        quantization: if dep.quantization == "int8" {
            wk::Quantization::Int8
        } else {
            wk::Quantization::Unspecified
        } as i32,
        kv_blocks: v.kv_blocks,
        block_size: v.block_size,
        engine,
        tensor_parallel,
        prev_link,
        next_link,
    }
}

/// Serving options with defaults filled in, checked.
fn serving(o: Option<api::ServingOptions>) -> Result<Serving> {
    let o = o.unwrap_or_default();
    let d = Serving::default();
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let s = Serving {
        kv_blocks: or(o.kv_cache_blocks, d.kv_blocks),
        block_size: or(o.block_size, d.block_size),
        max_batch_tokens: or(o.max_batch_tokens, d.max_batch_tokens),
        max_running: or(o.max_running, d.max_running),
        max_waiting: or(o.max_waiting, d.max_waiting),
        prefix_caching: !o.disable_prefix_caching,
        pipeline_transport: match o.pipeline_transport.as_str() {
            "" | "auto" => "auto".into(),
            "grpc" => "grpc".into(),
            "link" => "link".into(),
            other => {
                return Err(CoordError::Invalid(format!(
                    "pipeline_transport {other:?} is not one of auto, grpc, link"
                )))
            }
        },
    };
    if s.block_size > 1024 {
        return Err(CoordError::Limit {
            what: "block_size".into(),
            limit_name: "the largest block in positions",
            limit: 1024,
            got: s.block_size as usize,
        });
    }
    Ok(s)
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
    }
}

/// The engine's figures from the worker holding the model's first stage.
async fn engine_stats(cluster: &Cluster, dep: &Deployment) -> Option<api::ServingStatus> {
    let first = dep.placement.stages.first()?;
    let mut client = cluster.worker(&first.worker).await.ok()?;
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

async fn load_stage(
    cluster: &Cluster,
    worker: &str,
    spec: wk::ShardSpec,
) -> Result<wk::LoadShardResponse> {
    let mut client = cluster.worker(worker).await?;
    let mut req = Request::new(wk::LoadShardRequest { shard: Some(spec) });
    req.set_timeout(cluster.config.load_timeout);
    client
        .load_shard(req)
        .await
        .map(Response::into_inner)
        .map_err(|status| CoordError::WorkerFailed {
            worker: worker.to_string(),
            status,
        })
}

/// Best effort: a worker that is down has lost the shard anyway.
async fn unload_everywhere(cluster: &Cluster, model: &str, stages: &[Stage]) {
    for w in stages.iter().flat_map(|s| s.workers()) {
        if let Ok(mut c) = cluster.worker(w).await {
            let _ = c
                .unload_shard(wk::UnloadShardRequest {
                    model: model.to_string(),
                })
                .await;
        }
    }
}

fn stage_status(state: &ClusterState, s: &Stage) -> api::StagePlacement {
    api::StagePlacement {
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

fn worker_statuses(state: &ClusterState) -> Vec<api::WorkerStatus> {
    state
        .workers
        .values()
        .map(|w| api::WorkerStatus {
            id: w.id.clone(),
            address: w.address.clone(),
            device: w.device.clone(),
            healthy: w.healthy,
            memory_total_bytes: w.memory_total_bytes,
            memory_free_bytes: w.memory_free_bytes,
            shards: state
                .models
                .values()
                .flat_map(|m| {
                    m.placement
                        .stages
                        .iter()
                        .filter(|s| s.holds(&w.id))
                        .map(|s| format!("{}:{}-{}", m.name, s.layer_start, s.layer_end))
                })
                .collect(),
        })
        .collect()
}

pub struct AdminService {
    pub cluster: Arc<Cluster>,
}

impl AdminService {
    async fn deploy(&self, r: api::DeployModelRequest) -> Result<api::DeployModelResponse> {
        let started = Instant::now();
        if r.name.is_empty() || r.source.is_empty() {
            return Err(CoordError::Invalid("name and source are required".into()));
        }
        let dtype = match r.dtype.as_str() {
            "" | "f32" => "f32",
            "bf16" => "bf16",
            other => {
                return Err(CoordError::Invalid(format!(
                    "dtype {other:?} (supported: f32, bf16)"
                )))
            }
        };
        let quantization = match r.quantization.as_str() {
            "" | "none" => "none",
            "int8" => "int8",
            other => {
                return Err(CoordError::Invalid(format!(
                    "quantization {other:?} (supported: none, int8)"
                )))
            }
        };
        if self
            .cluster
            .read_fresh()
            .await?
            .models
            .contains_key(&r.name)
        {
            return Err(StateError::ModelExists(r.name).into());
        }
        let serving = serving(r.serving)?;
        let rt = self.cluster.open_model(&r.name, &r.source)?;
        let dtype_bytes = if dtype == "f32" { 4 } else { 2 };
        let mut shape = ModelShape::from_config(&rt.config, dtype_bytes);
        if quantization == "int8" {
            shape = shape.with_int8_layers(&rt.config, dtype_bytes);
        }
        let c = &rt.config;
        let tp = r.tensor_parallel.max(1);
        // Refused here, with the numbers, rather than by every worker.
        let split = c.tp_split(0, tp as usize).map_err(CoordError::Invalid)?;
        // A rank holds a tp-th of each layer's weights, and `kv_blocks`
        // blocks of its own KV heads for each of its layers.
        shape.layer_bytes = shape.layer_bytes.div_ceil(tp as u64)
            + serving.kv_blocks as u64
                * serving.block_size as u64
                * 2
                * (split.kv_heads * c.head_dim) as u64
                * dtype_bytes;
        let workers: Vec<WorkerCapacity> = self
            .cluster
            .read()
            .workers
            .values()
            .filter(|w| w.healthy)
            .map(|w| WorkerCapacity {
                id: w.id.clone(),
                free_bytes: w.memory_free_bytes,
            })
            .collect();
        let req = PlacementRequest {
            stages: (r.stages > 0).then_some(r.stages),
            split: (!r.layer_split.is_empty()).then(|| r.layer_split.clone()),
            reserve_bytes: 0,
        };
        let mut placement = plan_tp(&shape, &workers, &req, tp)?;
        placement.group_nonce = self.cluster.now_ms();
        self.cluster
            .propose(Command::DeployModel {
                name: r.name.clone(),
                source: r.source.clone(),
                dtype: dtype.into(),
                quantization: quantization.into(),
                placement: placement.clone(),
                serving,
            })
            .await?;
        let mut loads = tokio::task::JoinSet::new();
        let state = self.cluster.read();
        let dep = state
            .models
            .get(&r.name)
            .cloned()
            .ok_or_else(|| CoordError::UnknownModel(r.name.clone()))?;
        // All ranks of all stages at once: a group links up while loading.
        for (i, s) in placement.stages.iter().enumerate() {
            for (rank, w) in s.workers().enumerate() {
                let (cluster, worker) = (self.cluster.clone(), w.to_string());
                let spec = shard_spec(&state, &dep, i, rank, self.cluster.config.step_timeout);
                loads.spawn(
                    async move { (worker.clone(), load_stage(&cluster, &worker, spec).await) },
                );
            }
        }
        let mut failure = None;
        while let Some(joined) = loads.join_next().await {
            let (worker, result) = joined.expect("load task");
            if let Err(e) = result {
                tracing::error!(%worker, error = %e, "loading a shard failed");
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            // Roll back: no half-deployed model stays behind.
            unload_everywhere(&self.cluster, &r.name, &placement.stages).await;
            let _ = self
                .cluster
                .propose(Command::UndeployModel {
                    name: r.name.clone(),
                })
                .await;
            self.cluster.forget_model(&r.name);
            return Err(e);
        }
        self.cluster
            .propose(Command::SetModelState {
                name: r.name.clone(),
                state: ModelState::Ready,
            })
            .await?;
        let state = self.cluster.read();
        tracing::info!(model = %r.name, stages = placement.stages.len(), "model deployed");
        Ok(api::DeployModelResponse {
            stages: placement
                .stages
                .iter()
                .map(|s| stage_status(&state, s))
                .collect(),
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[tonic::async_trait]
impl api::admin_server::Admin for AdminService {
    async fn deploy_model(
        &self,
        req: Request<api::DeployModelRequest>,
    ) -> Result<Response<api::DeployModelResponse>, Status> {
        Ok(Response::new(self.deploy(req.into_inner()).await?))
    }

    async fn undeploy_model(
        &self,
        req: Request<api::UndeployModelRequest>,
    ) -> Result<Response<api::UndeployModelResponse>, Status> {
        let name = req.into_inner().name;
        let dep = self
            .cluster
            .read_fresh()
            .await?
            .models
            .get(&name)
            .cloned()
            .ok_or_else(|| CoordError::UnknownModel(name.clone()))?;
        unload_everywhere(&self.cluster, &name, &dep.placement.stages).await;
        self.cluster
            .propose(Command::UndeployModel { name: name.clone() })
            .await?;
        self.cluster.forget_model(&name);
        Ok(Response::new(api::UndeployModelResponse {}))
    }

    async fn list_workers(
        &self,
        _req: Request<api::ListWorkersRequest>,
    ) -> Result<Response<api::ListWorkersResponse>, Status> {
        Ok(Response::new(api::ListWorkersResponse {
            workers: worker_statuses(&self.cluster.read_fresh().await?),
        }))
    }

    async fn cluster_status(
        &self,
        _req: Request<api::ClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatusResponse>, Status> {
        let state = self.cluster.read_fresh().await?;
        let mut models = Vec::new();
        for m in state.models.values() {
            let serving = if m.state == ModelState::Ready {
                engine_stats(&self.cluster, m).await
            } else {
                None
            };
            models.push(api::ModelStatus {
                name: m.name.clone(),
                source: m.source.clone(),
                state: format!("{:?}", m.state),
                stages: m
                    .placement
                    .stages
                    .iter()
                    .map(|s| stage_status(&state, s))
                    .collect(),
                serving,
                pipeline_transport: match (m.placement.stages.len(), pipeline_linked(&state, m)) {
                    (0 | 1, _) => "",
                    (_, true) => "link",
                    (_, false) => "grpc",
                }
                .into(),
            });
        }
        Ok(Response::new(api::ClusterStatusResponse {
            workers: worker_statuses(&state),
            models,
            control_plane: Some(control_plane(&self.cluster)),
        }))
    }

    async fn list_members(
        &self,
        _req: Request<api::ListMembersRequest>,
    ) -> Result<Response<api::ListMembersResponse>, Status> {
        Ok(Response::new(api::ListMembersResponse {
            control_plane: Some(control_plane(&self.cluster)),
        }))
    }

    async fn add_member(
        &self,
        req: Request<api::AddMemberRequest>,
    ) -> Result<Response<api::AddMemberResponse>, Status> {
        let r = req.into_inner();
        if r.id == 0 || r.address.is_empty() {
            return Err(Status::invalid_argument(
                "id (at least 1) and address are required",
            ));
        }
        let address = if r.address.contains("://") {
            r.address
        } else {
            format!("http://{}", r.address)
        };
        self.cluster
            .store
            .add_member(r.id, &address)
            .await
            .map_err(CoordError::from)?;
        tracing::info!(member = r.id, %address, "coordinator member added");
        Ok(Response::new(api::AddMemberResponse {
            members: control_plane(&self.cluster).members,
        }))
    }

    async fn remove_member(
        &self,
        req: Request<api::RemoveMemberRequest>,
    ) -> Result<Response<api::RemoveMemberResponse>, Status> {
        let id = req.into_inner().id;
        self.cluster
            .store
            .remove_member(id)
            .await
            .map_err(CoordError::from)?;
        tracing::info!(member = id, "coordinator member removed");
        Ok(Response::new(api::RemoveMemberResponse {
            members: control_plane(&self.cluster).members,
        }))
    }

    async fn set_setting(
        &self,
        req: Request<api::SetSettingRequest>,
    ) -> Result<Response<api::SetSettingResponse>, Status> {
        let r = req.into_inner();
        validate_setting(&r.key, &r.value)?;
        self.cluster
            .propose(Command::PutSetting {
                key: r.key,
                value: r.value,
            })
            .await?;
        Ok(Response::new(api::SetSettingResponse {}))
    }

    async fn delete_setting(
        &self,
        req: Request<api::DeleteSettingRequest>,
    ) -> Result<Response<api::DeleteSettingResponse>, Status> {
        let key = req.into_inner().key;
        self.cluster.propose(Command::DeleteSetting { key }).await?;
        Ok(Response::new(api::DeleteSettingResponse {}))
    }

    async fn list_settings(
        &self,
        _req: Request<api::ListSettingsRequest>,
    ) -> Result<Response<api::ListSettingsResponse>, Status> {
        Ok(Response::new(api::ListSettingsResponse {
            settings: self
                .cluster
                .read_fresh()
                .await?
                .settings
                .into_iter()
                .collect(),
        }))
    }
}

/// The setting that overrides `max_new_tokens` of requests that give none.
pub const SETTING_DEFAULT_MAX_NEW_TOKENS: &str = "generate.default_max_new_tokens";
const MAX_SETTING_KEY: usize = 128;
const MAX_SETTING_VALUE: usize = 4096;

fn validate_setting(key: &str, value: &str) -> Result<()> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_SETTING_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
    if !key_ok {
        return Err(CoordError::Invalid(format!(
            "setting key {key:?}: 1 to {MAX_SETTING_KEY} characters of a-z, 0-9, '.', '_', '-', '/'"
        )));
    }
    if value.len() > MAX_SETTING_VALUE {
        return Err(CoordError::Limit {
            what: format!("value of setting {key:?}"),
            limit_name: "maximum bytes",
            limit: MAX_SETTING_VALUE,
            got: value.len(),
        });
    }
    if key == SETTING_DEFAULT_MAX_NEW_TOKENS && value.parse::<u32>().map_or(true, |v| v == 0) {
        return Err(CoordError::Invalid(format!(
            "{key} must be a positive integer, got {value:?}"
        )));
    }
    Ok(())
}

fn control_plane(cluster: &Cluster) -> api::ControlPlaneStatus {
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
        members: c
            .members
            .into_iter()
            .map(|m| api::Member {
                id: m.id,
                address: m.address,
                leader: m.leader,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{Placement, Stage};
    use crate::state::{Command, ModelState};

    /// Three workers (`device` each) and a 3-stage deployment over them
    /// with `transport`.
    fn cluster(devices: [&str; 3], transport: &str) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, d) in devices.iter().enumerate() {
            s.apply(&Command::RegisterWorker {
                id: format!("w{i}"),
                address: format!("http://w{i}:50061"),
                device: d.to_string(),
                memory_total_bytes: 100,
                memory_free_bytes: 90,
                at_ms: 1000 + i as u64,
                collective_address: format!("w{i}:7000"),
            })
            .unwrap();
        }
        let stages = (0..3)
            .map(|i| Stage {
                worker: format!("w{i}"),
                layer_start: i * 10,
                layer_end: (i + 1) * 10,
                embed: i == 0,
                head: i == 2,
                bytes: 10,
                ..Default::default()
            })
            .collect();
        s.apply(&Command::DeployModel {
            name: "m".into(),
            source: "smollm2".into(),
            dtype: "f32".into(),
            quantization: "none".into(),
            placement: Placement {
                stages,
                group_nonce: 7,
                ..Default::default()
            },
            serving: Serving {
                pipeline_transport: transport.into(),
                ..Default::default()
            },
        })
        .unwrap();
        s.apply(&Command::SetModelState {
            name: "m".into(),
            state: ModelState::Ready,
        })
        .unwrap();
        s
    }

    fn specs(s: &ClusterState) -> Vec<wk::ShardSpec> {
        let dep = &s.models["m"];
        (0..3)
            .map(|i| shard_spec(s, dep, i, 0, std::time::Duration::from_secs(9)))
            .collect()
    }

    /// "auto" links the stages only when all of them are on GPUs (NCCL);
    /// "link" links CPU stages over TCP; "grpc" never links. Each link's
    /// two ends name the same group with the two leaders' addresses in
    /// order, the earlier stage as rank 0; the engine is told.
    #[test]
    fn pipeline_links_follow_the_transport_and_the_devices() {
        for (devices, transport, linked, backend) in [
            (["cpu"; 3], "auto", false, None),
            (["cuda"; 3], "auto", true, Some(wk::LinkBackend::Nccl)),
            (["cuda", "cpu", "cuda"], "auto", false, None),
            (["cpu"; 3], "link", true, Some(wk::LinkBackend::Tcp)),
            (["cuda"; 3], "grpc", false, None),
        ] {
            let s = cluster(devices, transport);
            let sp = specs(&s);
            let what = format!("{devices:?} {transport}");
            assert_eq!(sp[0].engine.as_ref().unwrap().linked, linked, "{what}");
            if !linked {
                assert!(
                    sp.iter()
                        .all(|x| x.prev_link.is_none() && x.next_link.is_none()),
                    "{what}"
                );
                continue;
            }
            assert!(
                sp[0].prev_link.is_none() && sp[2].next_link.is_none(),
                "{what}"
            );
            for i in 0..2 {
                let (out, into) = (
                    sp[i].next_link.as_ref().unwrap(),
                    sp[i + 1].prev_link.as_ref().unwrap(),
                );
                assert_eq!((out.rank, into.rank), (0, 1), "{what}");
                assert_eq!(out.group, into.group, "{what}");
                assert_eq!(out.peers, into.peers, "{what}");
                assert_eq!(
                    out.peers,
                    vec![format!("w{i}:7000"), format!("w{}:7000", i + 1)],
                    "{what}"
                );
                assert_eq!(out.backend, backend.unwrap() as i32, "{what}");
                assert_eq!(out.timeout_ms, 9000);
            }
            assert_ne!(sp[0].next_link, sp[1].next_link, "{what}");
        }
        // Mixed devices asked to link: the GPU pair uses NCCL, the pair
        // with a CPU end TCP.
        let sp = specs(&cluster(["cuda", "cuda", "cpu"], "link"));
        let backend = |l: &Option<wk::PipelineLink>| l.as_ref().unwrap().backend;
        assert_eq!(backend(&sp[0].next_link), wk::LinkBackend::Nccl as i32);
        assert_eq!(backend(&sp[1].next_link), wk::LinkBackend::Tcp as i32);
    }

    /// A worker that registers again (a restart) renames the links it is
    /// an end of, and only those, so both ends form new ones.
    #[test]
    fn a_re_registered_worker_renames_its_links() {
        let mut s = cluster(["cpu"; 3], "link");
        let before = specs(&s);
        s.apply(&Command::RegisterWorker {
            id: "w2".into(),
            address: "http://w2:50099".into(),
            device: "cpu".into(),
            memory_total_bytes: 100,
            memory_free_bytes: 90,
            at_ms: 5000,
            collective_address: "w2:7099".into(),
        })
        .unwrap();
        let after = specs(&s);
        assert_eq!(before[0].next_link, after[0].next_link);
        let (b, a) = (
            before[1].next_link.as_ref().unwrap(),
            after[1].next_link.as_ref().unwrap(),
        );
        assert_ne!(b.group, a.group);
        assert_eq!(a.peers[1], "w2:7099");
        assert_eq!(after[2].prev_link.as_ref().unwrap().group, a.group);
    }

    #[test]
    fn an_unknown_pipeline_transport_is_refused_naming_the_choices() {
        let e = serving(Some(api::ServingOptions {
            pipeline_transport: "nccl".into(),
            ..Default::default()
        }))
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"nccl\" is not one of auto, grpc, link"),
            "{msg}"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }
}
