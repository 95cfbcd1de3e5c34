//! Registration with the coordinator: announce this worker, then heartbeat
//! at the interval the coordinator asks for; register again when it forgets
//! us (coordinator restart) or the connection breaks. Every call has a
//! deadline.

use std::time::Duration;

use llmos_proto::worker::v1 as pb;
use pb::registry_client::RegistryClient;
use tonic::Request;

use super::host::meminfo;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Registration {
    /// The coordinator's URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Stable across restarts.
    pub worker_id: String,
    /// The URL at which this worker's API is reached.
    pub address: String,
    pub device: String,
}

fn with_deadline<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// Runs until the task is dropped.
pub async fn registration_loop(reg: Registration) {
    loop {
        let endpoint = match tonic::transport::Endpoint::from_shared(reg.coordinator.clone()) {
            Ok(e) => e.connect_timeout(CALL_TIMEOUT),
            Err(e) => {
                tracing::error!(coordinator = %reg.coordinator, error = %e, "bad coordinator address");
                return;
            }
        };
        let mut client = match endpoint.connect().await {
            Ok(c) => RegistryClient::new(c),
            Err(e) => {
                tracing::debug!(error = %e, "coordinator unreachable; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let (total, free) = meminfo();
        let interval = match client
            .register(with_deadline(pb::RegisterRequest {
                worker_id: reg.worker_id.clone(),
                address: reg.address.clone(),
                device: reg.device.clone(),
                memory_total_bytes: total,
                memory_free_bytes: free,
            }))
            .await
        {
            Ok(r) => Duration::from_millis(r.into_inner().heartbeat_interval_ms.max(100) as u64),
            Err(e) => {
                tracing::warn!(error = %e, "registration failed; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        tracing::info!(worker = %reg.worker_id, coordinator = %reg.coordinator, "registered");
        loop {
            tokio::time::sleep(interval).await;
            let (_, free) = meminfo();
            match client
                .heartbeat(with_deadline(pb::HeartbeatRequest {
                    worker_id: reg.worker_id.clone(),
                    memory_free_bytes: free,
                }))
                .await
            {
                Ok(r) if r.get_ref().known => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed; registering again");
                    break;
                }
            }
        }
    }
}
