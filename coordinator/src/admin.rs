//! The `Admin` service: deploy, scale, re-split, undeploy, drain, members,
//! settings, status (assembled in `crate::status`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::worker::v1 as wk;
use tonic::{Request, Response, Status};

use crate::auth;
use crate::cluster::Cluster;
use crate::error::{CoordError, Result};
use crate::placement::{plan_tp, PlanError, WorkerCapacity};
use crate::settings::validate_setting;
use crate::sizing::{placement_request, rank_shape};
use crate::state::{
    ClusterState, Command, Deployment, ModelState, ParallelShape, Serving, StateError,
};
use crate::status::{control_plane, model_reason, model_status, stage_status, worker_statuses};

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
        kv_cache_dtype: match o.kv_cache_dtype.as_str() {
            "" | "auto" => "auto".into(),
            t @ ("f32" | "bf16" | "f16") => t.into(),
            other => {
                return Err(CoordError::Invalid(format!(
                    "kv_cache_dtype {other:?} is not one of auto, f32, bf16, f16"
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

pub(crate) async fn load_stage(
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

/// Unloads `model`'s shard of `epoch` (0: any) from `worker`; one it does
/// not hold is no error.
pub(crate) async fn unload_shard(
    cluster: &Cluster,
    worker: &str,
    model: &str,
    epoch: u64,
) -> Result<()> {
    let mut client = cluster.worker(worker).await?;
    let mut req = Request::new(wk::UnloadShardRequest {
        model: model.to_string(),
        epoch,
    });
    req.set_timeout(cluster.config.load_timeout);
    match client.unload_shard(req).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(status) => Err(CoordError::WorkerFailed {
            worker: worker.to_string(),
            status,
        }),
    }
}

/// Best effort, at once (the reconciler unloads what a worker that is down
/// now still reports when it comes back).
async fn unload_everywhere(cluster: &Arc<Cluster>, dep: &Deployment) {
    let mut unloads = tokio::task::JoinSet::new();
    for (r, (_, _, w)) in dep
        .instances
        .values()
        .flat_map(|r| r.shards().map(move |s| (r, s)))
    {
        let (c, w, name, epoch) = (cluster.clone(), w.to_string(), dep.name.clone(), r.epoch);
        unloads.spawn(async move {
            if let Err(e) = unload_shard(&c, &w, &name, epoch).await {
                tracing::debug!(worker = %w, error = %e, "unloading at undeploy failed");
            }
        });
    }
    unloads.join_all().await;
}

pub struct AdminService {
    pub cluster: Arc<Cluster>,
}

impl AdminService {
    /// Records the deploy as desired state (after checking it against the
    /// model, not against the cluster's free memory: the reconciler waits
    /// for room), then waits for Ready unless told not to.
    async fn deploy(&self, r: api::DeployModelRequest) -> Result<api::DeployModelResponse> {
        let started = Instant::now();
        let c = &self.cluster;
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
            q @ ("int8" | "q8_0" | "q4_0" | "q4_1" | "file") => q,
            other => {
                return Err(CoordError::Invalid(format!(
                    "quantization {other:?} (supported: none, int8, q8_0, q4_0, q4_1, file)"
                )))
            }
        };
        if c.read_fresh().await?.models.contains_key(&r.name) {
            return Err(StateError::ModelExists(r.name).into());
        }
        let serving = serving(r.serving)?;
        let rt = c.open_model(&r.name, &r.source)?;
        let shape = ParallelShape {
            stages: r.stages,
            layer_split: r.layer_split.clone(),
            tensor_parallel: r.tensor_parallel.max(1),
        };
        check_shape(&rt.config, dtype, quantization, &serving, &shape)?;
        let autoscale = match (r.autoscale_min, r.autoscale_max) {
            (0, 0) => None,
            (min, max) if min >= 1 && max >= min => Some((min, max)),
            (min, max) => {
                return Err(CoordError::Invalid(format!(
                    "autoscale bounds min {min}, max {max}: need 1 <= min <= max (both 0: off)"
                )))
            }
        };
        c.propose(Command::DeployModel {
            name: r.name.clone(),
            source: r.source.clone(),
            dtype: dtype.into(),
            quantization: quantization.into(),
            serving,
            shape,
            replicas: r.replicas.max(1),
            pool: r.pool.clone(),
            labels: r.labels.into_iter().collect(),
            autoscale,
            at_ms: c.now_ms(),
        })
        .await?;
        c.wake.notify_one();
        tracing::info!(model = %r.name, "deploy recorded");
        let generation = c.read().models.get(&r.name).map_or(0, |d| d.generation);
        if r.wait == Some(false) {
            return Ok(api::DeployModelResponse {
                stages: Vec::new(),
                load_seconds: 0.0,
            });
        }
        let timeout = timeout_or(r.wait_timeout_ms, c.config.load_timeout);
        let (state, dep) = wait_ready(c, &r.name, generation, timeout).await?;
        let first = dep.primary();
        Ok(api::DeployModelResponse {
            stages: first
                .map(|r| {
                    (0..r.placement.stages.len())
                        .map(|i| stage_status(&state, r, i))
                        .collect()
                })
                .unwrap_or_default(),
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Refuses, with the numbers, a parallel shape the model cannot take
/// however many workers there are (a split that does not cover its layers,
/// heads that do not divide by the tensor-parallel size). Too few workers
/// or too little memory now is no error: the reconciler waits.
fn check_shape(
    config: &llmos_meta::ModelConfig,
    dtype: &str,
    quantization: &str,
    serving: &Serving,
    shape: &ParallelShape,
) -> Result<()> {
    let tp = shape.tensor_parallel.max(1);
    let rank = rank_shape(config, dtype, quantization, serving, tp)?;
    let unbounded: Vec<WorkerCapacity> = (0..(rank.num_layers * tp).max(1))
        .map(|i| WorkerCapacity {
            id: format!("any-{i:05}"),
            free_bytes: u64::MAX >> 16,
        })
        .collect();
    match plan_tp(&rank, &unbounded, &placement_request(shape), tp) {
        Err(e @ PlanError::Invalid(_)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Waits until generation `generation` of `name` is Ready (every replica
/// asked for serves; with `settled`, none drains either), returning the
/// state it is Ready in; or Failed, replaced or gone, or `timeout` passes.
async fn wait_ready(
    c: &Cluster,
    name: &str,
    generation: u64,
    timeout: Duration,
) -> Result<(Arc<ClusterState>, Deployment)> {
    wait_until(c, name, generation, timeout, |d| {
        d.state == ModelState::Ready
    })
    .await
}

/// Exactly the replicas asked for serve, in the shape asked for, and none
/// drains: what a scale or a re-split waits for.
fn settled(d: &Deployment) -> bool {
    d.state == ModelState::Ready
        && d.instances.len() == d.replicas as usize
        && d.instances
            .values()
            .all(|r| r.serving() && r.shape == d.shape)
}

/// A request's `wait_timeout_ms`, or `default` when it gives 0.
fn timeout_or(ms: u32, default: Duration) -> Duration {
    match ms {
        0 => default,
        ms => Duration::from_millis(ms as u64),
    }
}

async fn wait_until(
    c: &Cluster,
    name: &str,
    generation: u64,
    timeout: Duration,
    done: impl Fn(&Deployment) -> bool,
) -> Result<(Arc<ClusterState>, Deployment)> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = c.read();
        let dep = state
            .models
            .get(name)
            .filter(|d| d.generation == generation)
            .cloned()
            .ok_or_else(|| CoordError::UnknownModel(name.to_string()))?;
        if done(&dep) {
            return Ok((state, dep));
        }
        match &dep.state {
            ModelState::Failed(reason) => {
                return Err(CoordError::DeployFailed {
                    model: name.to_string(),
                    reason: reason.clone(),
                })
            }
            _ if Instant::now() >= deadline => {
                return Err(CoordError::NotReadyInTime {
                    model: name.to_string(),
                    waited: timeout,
                    state: format!(
                        "{:?}, {} of {} replicas serving",
                        dep.state,
                        dep.serving().count(),
                        dep.replicas
                    ),
                    reason: model_reason(&dep),
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
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
        let r = req.into_inner();
        let dep = self
            .cluster
            .read_fresh()
            .await?
            .models
            .get(&r.name)
            .cloned()
            .ok_or_else(|| CoordError::UnknownModel(r.name.clone()))?;
        self.cluster
            .propose(Command::UndeployModel {
                name: r.name.clone(),
            })
            .await?;
        self.cluster.forget_model(&r.name);
        // The reconciler unloads whatever a worker still reports holding;
        // this only does it sooner.
        if r.wait == Some(false) {
            let c = self.cluster.clone();
            tokio::spawn(async move { unload_everywhere(&c, &dep).await });
        } else {
            unload_everywhere(&self.cluster, &dep).await;
        }
        Ok(Response::new(api::UndeployModelResponse {}))
    }

    async fn list_workers(
        &self,
        _req: Request<api::ListWorkersRequest>,
    ) -> Result<Response<api::ListWorkersResponse>, Status> {
        Ok(Response::new(api::ListWorkersResponse {
            workers: worker_statuses(&self.cluster, &*self.cluster.read_fresh().await?),
        }))
    }

    async fn cluster_status(
        &self,
        _req: Request<api::ClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatusResponse>, Status> {
        let state = self.cluster.read_fresh().await?;
        let mut models = Vec::new();
        for m in state.models.values() {
            models.push(model_status(&self.cluster, &state, m).await);
        }
        Ok(Response::new(api::ClusterStatusResponse {
            workers: worker_statuses(&self.cluster, &state),
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

    async fn scale_model(
        &self,
        req: Request<api::ScaleModelRequest>,
    ) -> Result<Response<api::ScaleModelResponse>, Status> {
        let r = req.into_inner();
        let c = &self.cluster;
        if r.replicas == 0 {
            return Err(CoordError::Invalid(format!(
                "replicas must be at least 1 (got 0); undeploy {:?} to remove it",
                r.name
            ))
            .into());
        }
        let previous = c
            .read_fresh()
            .await?
            .models
            .get(&r.name)
            .map(|d| d.replicas)
            .ok_or_else(|| CoordError::UnknownModel(r.name.clone()))?;
        c.propose(Command::ScaleModel {
            name: r.name.clone(),
            replicas: r.replicas,
            at_ms: c.now_ms(),
        })
        .await?;
        c.wake.notify_one();
        tracing::info!(model = %r.name, previous, replicas = r.replicas, "scale recorded");
        if r.wait == Some(true) {
            let generation = c.read().models.get(&r.name).map_or(0, |d| d.generation);
            let timeout = timeout_or(r.wait_timeout_ms, c.config.load_timeout);
            wait_until(c, &r.name, generation, timeout, settled).await?;
        }
        Ok(Response::new(api::ScaleModelResponse { previous }))
    }

    async fn drain_worker(
        &self,
        req: Request<api::DrainWorkerRequest>,
    ) -> Result<Response<api::DrainWorkerResponse>, Status> {
        let r = req.into_inner();
        let c = &self.cluster;
        let replicas = record_drain(c, &r.worker_id).await?;
        if r.wait == Some(true) {
            let timeout = timeout_or(
                r.wait_timeout_ms,
                c.config.drain_timeout + c.config.load_timeout,
            );
            let deadline = Instant::now() + timeout;
            loop {
                let left = c.read().models_on(&r.worker_id);
                if left.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Status::deadline_exceeded(format!(
                        "worker {:?} still holds replicas of {left:?} after {timeout:?}; the drain goes on",
                        r.worker_id
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(Response::new(api::DrainWorkerResponse { replicas }))
    }

    async fn uncordon_worker(
        &self,
        req: Request<api::UncordonWorkerRequest>,
    ) -> Result<Response<api::UncordonWorkerResponse>, Status> {
        let id = req.into_inner().worker_id;
        self.cluster
            .propose(Command::CordonWorker {
                id: id.clone(),
                cordoned: false,
            })
            .await?;
        self.cluster.wake.notify_one();
        tracing::info!(worker = %id, "uncordoned");
        Ok(Response::new(api::UncordonWorkerResponse {}))
    }

    async fn resplit_model(
        &self,
        req: Request<api::ResplitModelRequest>,
    ) -> Result<Response<api::ResplitModelResponse>, Status> {
        let r = req.into_inner();
        let c = &self.cluster;
        let dep = c
            .read_fresh()
            .await?
            .models
            .get(&r.name)
            .cloned()
            .ok_or_else(|| CoordError::UnknownModel(r.name.clone()))?;
        let shape = ParallelShape {
            stages: r.stages,
            layer_split: r.layer_split,
            tensor_parallel: dep.shape.tensor_parallel,
        };
        let rt = c
            .model(&r.name)
            .ok_or_else(|| CoordError::UnknownModel(r.name.clone()))?;
        check_shape(
            &rt.config,
            &dep.dtype,
            &dep.quantization,
            &dep.serving,
            &shape,
        )?;
        c.propose(Command::ReshapeModel {
            name: r.name.clone(),
            shape: shape.clone(),
            at_ms: c.now_ms(),
        })
        .await?;
        c.wake.notify_one();
        tracing::info!(model = %r.name, ?shape, "re-split recorded");
        if r.wait == Some(true) {
            let generation = c.read().models.get(&r.name).map_or(0, |d| d.generation);
            let timeout = timeout_or(
                r.wait_timeout_ms,
                c.config.load_timeout + c.config.drain_timeout,
            );
            wait_until(c, &r.name, generation, timeout, |d| {
                d.state == ModelState::Ready
                    && d.instances.len() == d.replicas as usize
                    && d.instances
                        .values()
                        .all(|r| r.serving() && r.shape == d.shape)
            })
            .await?;
        }
        Ok(Response::new(api::ResplitModelResponse {}))
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

    async fn create_key(
        &self,
        req: Request<api::CreateKeyRequest>,
    ) -> Result<Response<api::CreateKeyResponse>, Status> {
        let r = req.into_inner();
        auth::check_tenant(&r.tenant)
            .map_err(|e| Status::invalid_argument(format!("tenant: {e}")))?;
        let role = auth::Role::parse(&r.role).map_err(Status::invalid_argument)?;
        let l = r.limits.unwrap_or_default();
        if l.priority_max > 3 {
            return Err(Status::invalid_argument(format!(
                "limits.priority_max {}: 0 (no cap), 1 low, 2 normal or 3 high",
                l.priority_max
            )));
        }
        let limits = auth::Limits {
            tokens_per_minute: l.tokens_per_minute,
            max_concurrent: l.max_concurrent,
            priority_max: l.priority_max,
        };
        let (token, key) = auth::new_key(&r.tenant, role, limits, self.cluster.now_ms());
        let info = key_info(&key);
        self.cluster
            .propose(Command::CreateKey { key: key.clone() })
            .await?;
        tracing::info!(key = %key.id, tenant = %key.tenant, role = key.role.as_str(), "API key created");
        Ok(Response::new(api::CreateKeyResponse {
            key: token,
            info: Some(info),
        }))
    }

    async fn list_keys(
        &self,
        _req: Request<api::ListKeysRequest>,
    ) -> Result<Response<api::ListKeysResponse>, Status> {
        let state = self.cluster.read_fresh().await?;
        Ok(Response::new(api::ListKeysResponse {
            keys: state.api_keys.values().map(key_info).collect(),
        }))
    }

    async fn revoke_key(
        &self,
        req: Request<api::RevokeKeyRequest>,
    ) -> Result<Response<api::RevokeKeyResponse>, Status> {
        let given = req.into_inner().id;
        let given = given.trim();
        // A whole key given by mistake: revoke it by its id. Anything else
        // that is not an id is refused before it reaches the log (it may
        // be a secret), and not echoed.
        let id =
            match auth::split_token(given) {
                Some((id, _)) => id.to_string(),
                None if auth::is_key_id(given) => given.to_string(),
                None => return Err(Status::invalid_argument(
                    "RevokeKeyRequest.id: not a key id (16 hex digits, as `llmos keys list` shows)",
                )),
            };
        self.cluster
            .propose(Command::RevokeKey { id: id.clone() })
            .await?;
        tracing::info!(key = %id, "API key revoked");
        Ok(Response::new(api::RevokeKeyResponse {}))
    }
}

/// Cordons `worker` (the reconciler then moves its replicas away); the
/// replicas on it, as model/replica.
pub(crate) async fn record_drain(c: &Cluster, worker: &str) -> Result<Vec<String>> {
    c.propose(Command::CordonWorker {
        id: worker.to_string(),
        cordoned: true,
    })
    .await?;
    c.wake.notify_one();
    let state = c.read();
    let replicas: Vec<String> = state
        .models
        .values()
        .filter_map(|m| m.replica_on(worker).map(|x| format!("{}/{}", m.name, x.id)))
        .collect();
    tracing::info!(%worker, ?replicas, "drain recorded");
    Ok(replicas)
}

fn key_info(k: &auth::ApiKey) -> api::ApiKeyInfo {
    api::ApiKeyInfo {
        id: k.id.clone(),
        tenant: k.tenant.clone(),
        role: k.role.as_str().into(),
        limits: Some(api::KeyLimits {
            tokens_per_minute: k.limits.tokens_per_minute,
            max_concurrent: k.limits.max_concurrent,
            priority_max: k.limits.priority_max,
        }),
        created_unix_ms: k.created_ms,
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

    #[test]
    fn kv_cache_dtypes_default_to_the_model_s_and_unknown_ones_are_refused() {
        let kv = |t: &str| {
            serving(Some(api::ServingOptions {
                kv_cache_dtype: t.into(),
                ..Default::default()
            }))
        };
        assert_eq!(kv("").unwrap().kv_cache_dtype, "auto");
        for t in ["auto", "f32", "bf16", "f16"] {
            assert_eq!(kv(t).unwrap().kv_cache_dtype, t);
        }
        let e = kv("int8").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("kv_cache_dtype \"int8\" is not one of auto, f32, bf16, f16"),
            "{msg}"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }
}
