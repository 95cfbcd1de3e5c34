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
use crate::settings::validate_setting;
use crate::shard_spec::{pipeline_linked, shard_spec};
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
            workers: worker_statuses(&*self.cluster.read_fresh().await?),
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
                options: Some(serving_options(&m.serving)),
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
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }))
    }
}

/// A deployment's serving options as the API states them.
fn serving_options(s: &Serving) -> api::ServingOptions {
    api::ServingOptions {
        kv_cache_blocks: s.kv_blocks,
        block_size: s.block_size,
        max_batch_tokens: s.max_batch_tokens,
        max_running: s.max_running,
        max_waiting: s.max_waiting,
        disable_prefix_caching: !s.prefix_caching,
        pipeline_transport: s.pipeline_transport.clone(),
    }
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
