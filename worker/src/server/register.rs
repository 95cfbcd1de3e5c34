//! Registration with the coordinators: announce this worker, then heartbeat
//! at the interval the coordinator asks for. Any coordinator replica takes
//! the writes (followers forward them to the Raft leader), so when one is
//! unreachable or cannot commit the worker moves on to the next address of
//! its list; it registers again only when the cluster forgot it. Every call
//! has a deadline.

use std::time::Duration;

use llmos_proto::worker::v1 as pb;
use pb::registry_client::RegistryClient;
use tonic::Request;

use crate::runtime::device::memory_of;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Coordinator URLs, comma-separated, e.g.
    /// `http://c-0:50051,http://c-1:50051,http://c-2:50051`.
    pub coordinator: String,
    /// Mutual TLS on the internal plane (the registry, and this worker's
    /// server); None: plaintext.
    pub tls: Option<std::sync::Arc<llmos_tls::Tls>>,
    /// Stable across restarts.
    pub worker_id: String,
    /// The URL at which this worker's API is reached.
    pub address: String,
    pub device: String,
    /// host:port of the collective listener; empty: none.
    pub collective_address: String,
    /// Worker pool ("": default) and labels, for deployments that ask.
    pub pool: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// On SIGTERM (or SIGINT), how long to wait for the coordinator to move
    /// this worker's replicas away before stopping anyway; zero: stop at
    /// once.
    pub drain_timeout: Duration,
}

fn with_deadline<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// Runs until the task is dropped. Heartbeats report the shards `held`.
pub async fn registration_loop(reg: Registration, held: super::HeldShards) {
    let addresses: Vec<String> = reg
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if addresses.is_empty() {
        tracing::error!("no coordinator address given");
        return;
    }
    let mut turn = 0usize;
    let mut registered = false;
    let mut interval = Duration::from_secs(2);
    loop {
        let coordinator = addresses[turn % addresses.len()].clone();
        turn += 1;
        let endpoint = match tonic::transport::Endpoint::from_shared(coordinator.clone()) {
            Ok(e) => e.connect_timeout(CALL_TIMEOUT),
            Err(e) => {
                tracing::error!(%coordinator, error = %e, "bad coordinator address");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let connected = llmos_tls::client::connect(
            endpoint,
            reg.tls.as_ref(),
            llmos_tls::Role::Coordinator,
            CALL_TIMEOUT,
        )
        .await;
        let mut client = match connected {
            Ok(c) => RegistryClient::new(c),
            Err(e) => {
                tracing::debug!(%coordinator, error = %e, "coordinator unreachable; trying the next");
                tokio::time::sleep(RETRY / addresses.len() as u32).await;
                continue;
            }
        };
        let (total, free) = memory_of(&reg.device);
        if registered {
            // Known to the cluster already: carry on heartbeating here.
            if !heartbeats(
                &mut client,
                &reg,
                &held,
                &coordinator,
                Duration::ZERO,
                interval,
            )
            .await
            {
                registered = false;
            }
            continue;
        }
        interval = match client
            .register(with_deadline(pb::RegisterRequest {
                worker_id: reg.worker_id.clone(),
                address: reg.address.clone(),
                device: reg.device.clone(),
                memory_total_bytes: total,
                memory_free_bytes: free,
                collective_address: reg.collective_address.clone(),
                pool: reg.pool.clone(),
                labels: reg.labels.clone().into_iter().collect(),
            }))
            .await
        {
            Ok(r) => Duration::from_millis(r.into_inner().heartbeat_interval_ms.max(100) as u64),
            Err(e) => {
                tracing::warn!(%coordinator, error = %e, "registration failed; trying the next coordinator");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        tracing::info!(worker = %reg.worker_id, %coordinator, "registered");
        registered = heartbeats(&mut client, &reg, &held, &coordinator, interval, interval).await;
    }
}

/// Heartbeats through one coordinator until a call fails. Returns whether
/// the cluster still knows this worker (false: register again).
async fn heartbeats(
    client: &mut RegistryClient<tonic::transport::Channel>,
    reg: &Registration,
    held: &super::HeldShards,
    coordinator: &str,
    first_wait: Duration,
    interval: Duration,
) -> bool {
    let mut wait = first_wait;
    loop {
        tokio::time::sleep(wait).await;
        wait = interval;
        let (_, free) = memory_of(&reg.device);
        match client
            .heartbeat(with_deadline(pb::HeartbeatRequest {
                worker_id: reg.worker_id.clone(),
                memory_free_bytes: free,
                shards: held.report().await,
            }))
            .await
        {
            Ok(r) if r.get_ref().known => {}
            Ok(_) => {
                tracing::warn!(%coordinator, "the cluster forgot this worker; registering again");
                return false;
            }
            Err(e) => {
                tracing::warn!(%coordinator, error = %e, "heartbeat failed; trying the next coordinator");
                return true;
            }
        }
    }
}

/// Asks the coordinators to drain this worker (its replicas are replaced
/// elsewhere, then drained and unloaded here), and waits until it holds
/// nothing or `reg.drain_timeout` passes. Heartbeats go on meanwhile (the
/// registration loop), so the coordinator sees the engine go idle.
pub async fn drain(reg: &Registration, held: &super::HeldShards) {
    if held.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + reg.drain_timeout;
    let mut asked = false;
    for coordinator in reg
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(coordinator.to_string()) else {
            continue;
        };
        let Ok(channel) = llmos_tls::client::connect(
            endpoint.connect_timeout(CALL_TIMEOUT),
            reg.tls.as_ref(),
            llmos_tls::Role::Coordinator,
            CALL_TIMEOUT,
        )
        .await
        else {
            continue;
        };
        // The internal Registry, as registration and heartbeats: a worker
        // holds no API key.
        let mut registry = RegistryClient::new(channel);
        match registry
            .drain(with_deadline(llmos_proto::worker::v1::DrainRequest {
                worker_id: reg.worker_id.clone(),
            }))
            .await
        {
            Ok(r) => {
                tracing::info!(%coordinator, replicas = ?r.into_inner().replicas, timeout = ?reg.drain_timeout, "draining: waiting for the replicas here to move");
                asked = true;
                break;
            }
            Err(e) => {
                tracing::warn!(%coordinator, error = %e, "asking to drain failed; trying the next coordinator")
            }
        }
    }
    if !asked {
        tracing::warn!("no coordinator took the drain; stopping with shards held");
        return;
    }
    while !held.is_empty() {
        if tokio::time::Instant::now() >= deadline {
            let models: Vec<String> = held.report().await.into_iter().map(|s| s.model).collect();
            tracing::warn!(timeout = ?reg.drain_timeout, held = ?models, "drain timed out; stopping with shards held");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("drained: nothing held");
}
