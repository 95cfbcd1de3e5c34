//! How raft messages travel between replicas: [`RaftTransport`], with a
//! gRPC implementation (a queue and a sender task per peer; everything
//! queued is sent as one batch, on a `RaftStream` the sender keeps open, or
//! by a `Raft` call when it holds a snapshot, whose answer reports it
//! delivered) and an in-memory network for tests that drops, delays and
//! partitions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Batches a stream may hold unsent (its peer stopped reading: frozen or
/// partitioned). Past it the stream is dropped with what it holds (raft
/// sends again what matters) and the next batch opens another; a dead
/// connection is found by HTTP/2 keep-alive pings.
const STREAM_BACKLOG: usize = 256;

/// Says, at most every 5 s per peer, that raft messages were lost (raft
/// retries; a warning per message would flood the log).
fn warn_lost(last: &Mutex<Option<Instant>>, peer: u64, address: &str, status: &Status) {
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
        tracing::warn!(peer, %address, code = ?status.code(), error = %status.message(), "raft messages to peer lost");
        *last = Some(Instant::now());
    }
}

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
            let endpoint = match Endpoint::from_shared(address.clone()) {
                Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
                Err(e) => {
                    tracing::error!(peer = to, %address, error = %e, "bad peer address");
                    return;
                }
            };
            let client = |e: Endpoint| {
                pb::peer_client::PeerClient::new(llmos_tls::client::connect_lazy(
                    e,
                    tls.as_ref(),
                    // Only a coordinator's certificate answers for a peer.
                    llmos_tls::Role::Coordinator,
                    Duration::from_secs(1),
                ))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20)
            };
            // Calls (snapshots) end within the timeout; the stream lives as
            // long as its connection answers keep-alive pings.
            let mut calls = client(endpoint.clone().timeout(timeout));
            let streams = client(
                endpoint
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true),
            );
            let last_warn = Arc::new(Mutex::new(None));
            // The open stream: its batches' queue, and whether its call
            // returned (then the queue may still look open while nobody
            // reads it any more).
            let mut stream: Option<(mpsc::Sender<pb::RaftRequest>, Arc<AtomicBool>)> = None;
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
                let is_snapshot =
                    |m: &Message| m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
                if batch.iter().any(is_snapshot) {
                    let sent = calls.raft(req).await;
                    let ok = sent.is_ok();
                    for _ in batch.iter().filter(|m| is_snapshot(m)) {
                        snapshots.lock().unwrap().push((to, ok));
                    }
                    if let Err(status) = sent {
                        warn_lost(&last_warn, to, &address, &status);
                    }
                    continue;
                }
                let tx = match &stream {
                    Some((tx, ended)) if !tx.is_closed() && !ended.load(Ordering::Acquire) => {
                        tx.clone()
                    }
                    _ => {
                        let (tx, batches) = mpsc::channel(STREAM_BACKLOG);
                        let ended = Arc::new(AtomicBool::new(false));
                        let (mut c, last_warn, address, done) = (
                            streams.clone(),
                            last_warn.clone(),
                            address.clone(),
                            ended.clone(),
                        );
                        tokio::spawn(async move {
                            let batches = tokio_stream::wrappers::ReceiverStream::new(batches);
                            let r = c.raft_stream(batches).await;
                            done.store(true, Ordering::Release);
                            if let Err(status) = r {
                                warn_lost(&last_warn, to, &address, &status);
                            }
                        });
                        stream = Some((tx.clone(), ended));
                        tx
                    }
                };
                if tx.try_send(req).is_err() {
                    // Full (the peer stopped reading) or just ended: the
                    // stream goes with what it holds; the next batch opens
                    // another.
                    stream = None;
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
    /// Turns true when this coordinator begins to stop: open `RaftStream`s
    /// then end (a graceful shutdown waits for every open request, and a
    /// peer keeps its stream open as long as it can). A receiver whose
    /// sender is gone never ends them.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn raft(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let identity = self.sender(&req)?;
        self.accept(identity.as_ref(), req.into_inner())?;
        Ok(Response::new(pb::RaftResponse {}))
    }

    async fn raft_stream(
        &self,
        req: Request<tonic::Streaming<pb::RaftRequest>>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let identity = self.sender(&req)?;
        let mut batches = req.into_inner();
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            if stopping.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await
            }
        };
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                batch = batches.message() => match batch? {
                    Some(r) => self.accept(identity.as_ref(), r)?,
                    None => break,
                },
                // Stopping: the sender opens another stream, to whichever
                // replica it then reaches.
                _ = &mut stopped => break,
            }
        }
        Ok(Response::new(pb::RaftResponse {}))
    }
}

impl PeerService {
    /// On mutual TLS, only a coordinator's certificate may send Raft
    /// messages (a worker's may not): its verified identity.
    fn sender<T>(&self, req: &Request<T>) -> Result<Option<llmos_tls::Identity>, Status> {
        llmos_tls::require(
            req,
            self.transport.tls.is_some(),
            "llmos.coordinator.v1.Peer",
            &[llmos_tls::Role::Coordinator],
        )
    }

    /// Checks one batch (as the node its certificate names, of this
    /// cluster, well-formed messages of its sender) and steps it into raft.
    fn accept(
        &self,
        identity: Option<&llmos_tls::Identity>,
        r: pb::RaftRequest,
    ) -> Result<(), Status> {
        if let Some(i) = identity {
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
        let learn = match identity {
            None => true,
            Some(i) => i.id.is_some(),
        };
        if r.from_id != 0 && learn {
            self.transport.set_peer(r.from_id, &r.from_address);
        }
        self.node.step(msgs);
        Ok(())
    }
}
