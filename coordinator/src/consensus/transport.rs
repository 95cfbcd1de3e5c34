//! How raft messages travel between replicas: [`RaftTransport`], with a
//! gRPC implementation (a queue and a sender task per peer; everything
//! queued is sent as one batch) and an in-memory network for tests that
//! drops, delays and partitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmos_proto::coordinator::v1 as pb;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use super::node::RaftNode;
use super::RaftTransport;

/// Most messages in one gRPC batch.
const MAX_BATCH: usize = 1024;

struct PeerQueue {
    address: String,
    tx: mpsc::UnboundedSender<Message>,
}

pub struct GrpcTransport {
    cluster_id: String,
    /// Mutual TLS to peers (None: plaintext, `--insecure`).
    tls: Option<Arc<llmos_tls::Tls>>,
    self_id: u64,
    self_address: String,
    timeout: Duration,
    peers: Mutex<HashMap<u64, PeerQueue>>,
    rt: tokio::runtime::Handle,
    /// Outcomes of snapshots sent, for the Ready loop to report.
    snapshots: Arc<Mutex<Vec<(u64, bool)>>>,
}

impl GrpcTransport {
    /// Must be called inside a tokio runtime (sender tasks run on it).
    pub fn new(
        cluster_id: &str,
        self_id: u64,
        self_address: &str,
        tls: Option<Arc<llmos_tls::Tls>>,
    ) -> Arc<Self> {
        Arc::new(GrpcTransport {
            cluster_id: cluster_id.to_string(),
            tls,
            self_id,
            self_address: self_address.to_string(),
            timeout: Duration::from_secs(3),
            peers: Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
            snapshots: Arc::default(),
        })
    }

    fn spawn_sender(&self, to: u64, address: String, mut rx: mpsc::UnboundedReceiver<Message>) {
        let (cluster_id, from_id, from_address, timeout) = (
            self.cluster_id.clone(),
            self.self_id,
            self.self_address.clone(),
            self.timeout,
        );
        let snapshots = self.snapshots.clone();
        let tls = self.tls.clone();
        self.rt.spawn(async move {
            let channel = match Endpoint::from_shared(address.clone()) {
                Ok(e) => llmos_tls::client::connect_lazy(
                    e.connect_timeout(Duration::from_secs(1))
                        .timeout(timeout)
                        .tcp_nodelay(true),
                    tls.as_ref(),
                    // Only a coordinator's certificate answers for a peer.
                    llmos_tls::Role::Coordinator,
                    Duration::from_secs(1),
                ),
                Err(e) => {
                    tracing::error!(peer = to, %address, error = %e, "bad peer address");
                    return;
                }
            };
            let mut client = pb::peer_client::PeerClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            let mut last_warn: Option<Instant> = None;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let req = pb::RaftRequest {
                    cluster_id: cluster_id.clone(),
                    from_id,
                    from_address: from_address.clone(),
                    messages: batch
                        .iter()
                        .map(|m| m.write_to_bytes().expect("encode raft message"))
                        .collect(),
                };
                let sent = client.raft(req).await;
                let ok = sent.is_ok();
                for m in &batch {
                    if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                        snapshots.lock().unwrap().push((to, ok));
                    }
                }
                if let Err(status) = sent {
                    // Raft retries; say so now and then, not per message.
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!(peer = to, %address, code = ?status.code(), error = %status.message(), "raft messages to peer lost");
                        last_warn = Some(Instant::now());
                    }
                }
            }
        });
    }
}

impl RaftTransport for GrpcTransport {
    fn snapshot_outcomes(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut *self.snapshots.lock().unwrap())
    }

    fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        for m in msgs {
            match peers.get(&m.to) {
                Some(q) => {
                    let _ = q.tx.send(m);
                }
                None => {
                    if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                        self.snapshots.lock().unwrap().push((m.to, false));
                    }
                    tracing::debug!(to = m.to, "no address for raft peer; message dropped")
                }
            }
        }
    }

    fn set_peer(&self, id: u64, address: &str) {
        if id == self.self_id || address.is_empty() {
            return;
        }
        let mut peers = self.peers.lock().unwrap();
        if peers.get(&id).is_some_and(|q| q.address == address) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.spawn_sender(id, address.to_string(), rx);
        peers.insert(
            id,
            PeerQueue {
                address: address.to_string(),
                tx,
            },
        );
    }

    fn remove_peer(&self, id: u64) {
        self.peers.lock().unwrap().remove(&id);
    }
}

/// What a batch claims against its sender's verified certificate, when
/// that is bound to a node id: the id must be the batch's, and the
/// address it asks to be answered at must be on a host the certificate
/// names (a peer's address comes from its identity, not from the message
/// alone).
fn check_sender(i: &llmos_tls::Identity, r: &pb::RaftRequest) -> Result<(), Status> {
    // A certificate of the role alone (shared by the replicas) is trusted
    // for any node of the role.
    let Some(id) = &i.id else { return Ok(()) };
    if *id != r.from_id.to_string() {
        return Err(Status::permission_denied(format!(
            "a raft batch claiming node {} came with the certificate of {i}",
            r.from_id
        )));
    }
    if !r.from_address.is_empty() {
        if !i.names_address(&r.from_address) {
            return Err(Status::permission_denied(format!(
                "node {} asks to be reached at {:?}, a host its certificate ({i}) does not name",
                r.from_id, r.from_address
            )));
        }
    }
    Ok(())
}

/// The receiving side: the `Peer` gRPC service.
pub struct PeerService {
    pub cluster_id: String,
    pub node: Arc<RaftNode>,
    pub transport: Arc<GrpcTransport>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn raft(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        // On mutual TLS, only a coordinator's certificate may send Raft
        // messages (a worker's may not), as the node its certificate names.
        let identity = llmos_tls::require(
            &req,
            self.transport.tls.is_some(),
            "llmos.coordinator.v1.Peer",
            &[llmos_tls::Role::Coordinator],
        )?;
        let r = req.into_inner();
        if let Some(i) = &identity {
            check_sender(i, &r)?;
        }
        if r.cluster_id != self.cluster_id {
            // The expected id is not echoed: it is what a sender needs to
            // be heard.
            return Err(Status::failed_precondition(format!(
                "raft batch from node {} of cluster {:?} reached coordinator {}, of another cluster",
                r.from_id,
                r.cluster_id,
                self.node.id(),
            )));
        }
        let mut msgs = Vec::with_capacity(r.messages.len());
        for b in &r.messages {
            let m = Message::parse_from_bytes(b)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            // raft-rs panics (`fatal!`) on a proposal without entries; no
            // replica sends one.
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgPropose
                && m.get_entries().is_empty()
            {
                return Err(Status::invalid_argument("a raft proposal without entries"));
            }
            if m.from != r.from_id {
                return Err(Status::invalid_argument(format!(
                    "a raft message from node {} in a batch of node {}",
                    m.from, r.from_id
                )));
            }
            msgs.push(m);
        }
        // The sender's reply address, once the batch checked out: on mutual
        // TLS only from a certificate bound to the node (whose hosts
        // include the address's); a certificate of the role alone (shared)
        // proves no node, so its batches teach no address (the membership
        // in the log and --peers give them).
        let learn = match &identity {
            None => true,
            Some(i) => i.id.is_some(),
        };
        if r.from_id != 0 && learn {
            self.transport.set_peer(r.from_id, &r.from_address);
        }
        self.node.step(msgs);
        Ok(Response::new(pb::RaftResponse {}))
    }
}
