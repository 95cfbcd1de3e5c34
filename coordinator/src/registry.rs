//! The `Registry` service: workers register and heartbeat.

use std::sync::Arc;
use std::time::Instant;

use llmos_proto::worker::v1 as wk;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::leases::Report;
use crate::router::EngineLoad;
use crate::state::Command;

pub struct RegistryService {
    pub cluster: Arc<Cluster>,
}

impl RegistryService {
    /// The caller's verified identity on mutual TLS (of one of `roles`).
    fn caller<T>(
        &self,
        req: &Request<T>,
        roles: &[llmos_tls::Role],
    ) -> Result<Option<llmos_tls::Identity>, Status> {
        llmos_tls::require(req, self.cluster.config.tls.is_some(), SERVICE, roles)
    }
}

#[tonic::async_trait]
impl wk::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<wk::RegisterRequest>,
    ) -> Result<Response<wk::RegisterResponse>, Status> {
        let who = self.caller(&req, &[llmos_tls::Role::Worker])?;
        let r = req.into_inner();
        check_worker(who.as_ref(), &r.worker_id, Some(&r.address))?;
        if !r.collective_address.is_empty() {
            check_worker(
                who.as_ref(),
                &r.worker_id,
                Some(&format!("tcp://{}", r.collective_address)),
            )?;
        }
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
                pool: r.pool.clone(),
                labels: r.labels.into_iter().collect(),
            })
            .await?;
        tracing::info!(worker = %r.worker_id, address = %r.address, "worker registered");
        // A restarted worker lost its shards (the state machine marked them
        // and what linked to them not loaded): the reconciler loads them.
        self.cluster.leases.forget(&r.worker_id);
        self.cluster.wake.notify_one();
        Ok(Response::new(wk::RegisterResponse {
            heartbeat_interval_ms: self.cluster.config.heartbeat_interval.as_millis() as u32,
        }))
    }

    /// Renews the worker's lease on the leader (no log write); a follower
    /// passes it to the leader.
    async fn heartbeat(
        &self,
        req: Request<wk::HeartbeatRequest>,
    ) -> Result<Response<wk::HeartbeatResponse>, Status> {
        let who = self.caller(
            &req,
            &[llmos_tls::Role::Worker, llmos_tls::Role::Coordinator],
        )?;
        if let Some(w) = who.as_ref().filter(|w| w.role == llmos_tls::Role::Worker) {
            check_worker(Some(w), &req.get_ref().worker_id, None)?;
        }
        let c = &self.cluster;
        // Every coordinator the report passes routes with it.
        let at_ms = c.now_ms();
        for s in &req.get_ref().shards {
            if let Some(e) = &s.engine {
                c.router.report(
                    &s.model,
                    s.epoch,
                    EngineLoad {
                        running: e.running,
                        waiting: e.waiting,
                        kv_blocks_free: e.kv_blocks_total.saturating_sub(e.kv_blocks_used),
                        prefix_hit_tokens: e.prefix_hit_tokens,
                        prefix_queried_tokens: e.prefix_queried_tokens,
                    },
                    at_ms,
                );
            }
        }
        if !c.store.is_leader() {
            if req.metadata().contains_key(FORWARDED) {
                return Err(Status::unavailable(
                    "not the leader (leadership is changing); heartbeat another coordinator",
                ));
            }
            let mut leader = c.leader_registry().ok_or_else(|| {
                Status::unavailable("no leader is known yet; heartbeat another coordinator")
            })?;
            let mut fwd = Request::new(req.into_inner());
            fwd.metadata_mut()
                .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
            fwd.set_timeout(c.config.connect_timeout);
            return leader.heartbeat(fwd).await;
        }
        let r = req.into_inner();
        let Some(healthy) = c.read().workers.get(&r.worker_id).map(|w| w.healthy) else {
            return Ok(Response::new(wk::HeartbeatResponse { known: false }));
        };
        c.leases.renew(
            &r.worker_id,
            Report {
                memory_free_bytes: r.memory_free_bytes,
                shards: r.shards.into_iter().map(|s| (s.model, s.epoch)).collect(),
            },
            Instant::now(),
        );
        if !healthy {
            c.wake.notify_one();
        }
        Ok(Response::new(wk::HeartbeatResponse { known: true }))
    }

    async fn drain(
        &self,
        req: Request<wk::DrainRequest>,
    ) -> Result<Response<wk::DrainResponse>, Status> {
        let who = self.caller(&req, &[llmos_tls::Role::Worker])?;
        let id = req.into_inner().worker_id;
        check_worker(who.as_ref(), &id, None)?;
        if id.is_empty() {
            return Err(Status::invalid_argument("DrainRequest.worker_id is empty"));
        }
        let replicas = crate::admin::record_drain(&self.cluster, &id).await?;
        Ok(Response::new(wk::DrainResponse { replicas }))
    }
}

const SERVICE: &str = "llmos.worker.v1.Registry";

/// On mutual TLS, a worker certificate bound to an id speaks only for
/// that worker, and the address it registers must be on a host the
/// certificate names (a certificate of the role alone, shared by a pool,
/// is trusted for any id and address of the role).
fn check_worker(
    who: Option<&llmos_tls::Identity>,
    worker_id: &str,
    address: Option<&str>,
) -> Result<(), Status> {
    let Some(w) = who else { return Ok(()) };
    let Some(id) = &w.id else { return Ok(()) };
    if id != worker_id {
        return Err(Status::permission_denied(format!(
            "the certificate of {w} cannot speak for worker {worker_id:?}"
        )));
    }
    if let Some(a) = address {
        if !w.names_address(a) {
            return Err(Status::permission_denied(format!(
                "worker {worker_id} registers the address {a:?}, on a host its certificate ({w}) does not name"
            )));
        }
    }
    Ok(())
}

/// Marks a heartbeat a follower passed on (the receiver does not pass it
/// further).
const FORWARDED: &str = "llmos-forwarded";
