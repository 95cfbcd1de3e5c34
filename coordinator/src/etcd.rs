//! [`EtcdStore`]: the cluster state machine over an external etcd, for
//! sites that already run one. Commands are an ordered log: each write puts
//! a key under `/llmos/<cluster>/log/`, and etcd's revision orders them;
//! every coordinator watches the prefix and applies puts in revision order,
//! so all agree. A writer waits until it applied its own revision. The
//! leader (etcd election on `/llmos/<cluster>/leader`, under a lease) runs
//! the leader-only duties and compacts: it writes the state at a revision
//! to `/llmos/<cluster>/snapshot` and deletes the log keys it covers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, SortOrder, SortTarget, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{ClusterState, Command, StateError};
use crate::store::{ControlPlane, EtcdSettings, MemberInfo, MetaStore, StoreError};

#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: i64,
    state: ClusterState,
}

struct Applied {
    /// Shared with readers; a write copies it only while one holds it.
    state: Arc<ClusterState>,
    revision: i64,
    snapshot_revision: i64,
    since_snapshot: u64,
    /// Verdicts of recent revisions, for the writers waiting on them.
    results: BTreeMap<i64, Result<(), StateError>>,
}

struct Shared {
    applied: Mutex<Applied>,
    revision: watch::Sender<i64>,
    leader: AtomicBool,
    leader_name: Mutex<String>,
    /// Times the observed leader changed to another one.
    leader_changes: AtomicU64,
    next: AtomicU64,
}

pub struct EtcdStore {
    client: Client,
    s: EtcdSettings,
    prefix: String,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lease: Arc<Mutex<Option<i64>>>,
}

const KEEP_RESULTS: usize = 4096;

impl EtcdStore {
    pub async fn start(s: EtcdSettings) -> Result<Arc<EtcdStore>, StoreError> {
        let endpoints = s.endpoints.join(",");
        let err = |reason: String| StoreError::Etcd {
            endpoints: endpoints.clone(),
            reason,
        };
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(s.request_timeout)
            .with_timeout(s.request_timeout);
        let client = Client::connect(&s.endpoints, Some(opts))
            .await
            .map_err(|e| err(e.to_string()))?;
        let prefix = format!("/llmos/{}/", s.cluster_id);
        let (tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            applied: Mutex::new(Applied {
                state: Arc::default(),
                revision: 0,
                snapshot_revision: 0,
                since_snapshot: 0,
                results: BTreeMap::new(),
            }),
            revision: tx,
            leader: AtomicBool::new(false),
            leader_name: Mutex::new(String::new()),
            leader_changes: AtomicU64::new(0),
            next: AtomicU64::new(0),
        });
        load(&client, &prefix, &shared)
            .await
            .map_err(|e| err(format!("loading the state: {e}")))?;
        let mut store = EtcdStore {
            client: client.clone(),
            s: s.clone(),
            prefix: prefix.clone(),
            shared: shared.clone(),
            tasks: Vec::new(),
            lease: Arc::new(Mutex::new(None)),
        };
        store.tasks.push(tokio::spawn(watch_log(
            client.clone(),
            prefix.clone(),
            shared.clone(),
            s.snapshot_entries,
        )));
        store.tasks.push(tokio::spawn(observe_leader(
            client.clone(),
            prefix.clone(),
            shared.clone(),
        )));
        store.tasks.push(tokio::spawn(campaign(
            client.clone(),
            prefix.clone(),
            s.clone(),
            shared.clone(),
            store.lease.clone(),
        )));
        Ok(Arc::new(store))
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoints: self.s.endpoints.join(","),
            reason: e.to_string(),
        }
    }

    async fn wait_applied(&self, revision: i64) -> Result<(), StoreError> {
        let mut rx = self.shared.revision.subscribe();
        let waited = tokio::time::timeout(self.s.request_timeout, async {
            rx.wait_for(|&r| r >= revision).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.err("the log watcher stopped")),
            Err(_) => Err(self.err(format!(
                "revision {revision} not applied within {:?} (watch behind or etcd unreachable)",
                self.s.request_timeout
            ))),
        }
    }
}

/// Reads the snapshot and the log after it at one revision, and applies.
async fn load(client: &Client, prefix: &str, shared: &Shared) -> Result<(), etcd_client::Error> {
    let mut kv = client.kv_client();
    let snap = kv.get(format!("{prefix}snapshot"), None).await?;
    let at = snap.header().map(|h| h.revision()).unwrap_or(0);
    let (mut state, snap_rev) = match snap.kvs().first() {
        Some(k) => match serde_json::from_slice::<Snapshot>(k.value()) {
            Ok(s) => (s.state, s.revision),
            Err(e) => {
                return Err(etcd_client::Error::InvalidArgs(format!(
                    "{prefix}snapshot does not decode: {e}"
                )))
            }
        },
        None => (ClusterState::default(), 0),
    };
    let log = kv
        .get(
            format!("{prefix}log/"),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(at)
                    .with_min_mod_revision(snap_rev + 1)
                    .with_sort(SortTarget::Mod, SortOrder::Ascend),
            ),
        )
        .await?;
    let mut revision = snap_rev;
    for k in log.kvs() {
        let _ = apply_value(&mut state, k.value());
        revision = k.mod_revision();
    }
    let revision = revision.max(at);
    let n = log.kvs().len() as u64;
    {
        let mut a = shared.applied.lock().unwrap();
        a.state = Arc::new(state);
        a.revision = revision;
        a.snapshot_revision = snap_rev;
        a.since_snapshot = n;
    }
    shared.revision.send_replace(revision);
    Ok(())
}

fn apply_value(state: &mut ClusterState, value: &[u8]) -> Result<(), StateError> {
    match serde_json::from_slice::<Command>(value) {
        Ok(cmd) => state.apply(&cmd),
        Err(e) => {
            tracing::error!(error = %e, "undecodable command in the etcd log");
            state.applied += 1;
            Ok(())
        }
    }
}

async fn watch_log(client: Client, prefix: String, shared: Arc<Shared>, snapshot_entries: u64) {
    loop {
        let from = shared.applied.lock().unwrap().revision + 1;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut wc = client.watch_client();
        let mut stream = match wc.watch(format!("{prefix}log/"), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "etcd watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        // History compacted past us: reload from the snapshot.
                        tracing::warn!(
                            reason = resp.cancel_reason(),
                            "etcd watch canceled; reloading"
                        );
                        if let Err(e) = load(&client, &prefix, &shared).await {
                            tracing::warn!(error = %e, "reload failed");
                        }
                        break;
                    }
                    let mut last = None;
                    let mut compact = None;
                    {
                        let mut a = shared.applied.lock().unwrap();
                        for ev in resp.events() {
                            let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) else {
                                continue;
                            };
                            if kv.mod_revision() <= a.revision {
                                continue;
                            }
                            let r = apply_value(Arc::make_mut(&mut a.state), kv.value());
                            a.results.insert(kv.mod_revision(), r);
                            while a.results.len() > KEEP_RESULTS {
                                a.results.pop_first();
                            }
                            a.revision = kv.mod_revision();
                            a.since_snapshot += 1;
                            last = Some(a.revision);
                        }
                        if a.since_snapshot >= snapshot_entries
                            && shared.leader.load(Ordering::SeqCst)
                        {
                            a.since_snapshot = 0;
                            compact = Some(Snapshot {
                                revision: a.revision,
                                state: (*a.state).clone(),
                            });
                        }
                    }
                    if let Some(r) = last {
                        shared.revision.send_replace(r);
                    }
                    if let Some(s) = compact {
                        let (client, prefix, shared) =
                            (client.clone(), prefix.clone(), shared.clone());
                        tokio::spawn(async move {
                            let revision = s.revision;
                            match write_snapshot(&client, &prefix, s).await {
                                Ok(()) => {
                                    shared.applied.lock().unwrap().snapshot_revision = revision
                                }
                                Err(e) => tracing::warn!(error = %e, "etcd snapshot failed"),
                            }
                        });
                    }
                }
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

async fn write_snapshot(
    client: &Client,
    prefix: &str,
    s: Snapshot,
) -> Result<(), etcd_client::Error> {
    let mut kv = client.kv_client();
    let json = serde_json::to_vec(&s).expect("snapshot json");
    kv.put(format!("{prefix}snapshot"), json, None).await?;
    let old = kv
        .get(
            format!("{prefix}log/"),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_max_mod_revision(s.revision),
            ),
        )
        .await?;
    for chunk in old.kvs().chunks(64) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|k| etcd_client::TxnOp::delete(k.key().to_vec(), None))
            .collect();
        kv.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    tracing::info!(
        revision = s.revision,
        deleted = old.kvs().len(),
        "etcd log compacted"
    );
    Ok(())
}

/// Keeps the leader's name (for status) fresh.
async fn observe_leader(client: Client, prefix: String, shared: Arc<Shared>) {
    let election = format!("{prefix}leader");
    // The last leader seen (not the last read, which may have failed).
    let mut last = String::new();
    loop {
        let name = match client.election_client().leader(election.clone()).await {
            Ok(r) => r
                .kv()
                .map(|k| String::from_utf8_lossy(k.value()).into_owned())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        if !name.is_empty() && name != last {
            // A failed read ("") between two reads of one leader is no change.
            shared.leader_changes.fetch_add(1, Ordering::Relaxed);
            last = name.clone();
        }
        *shared.leader_name.lock().unwrap() = name;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Campaigns for leadership under a lease; keeps the lease alive.
async fn campaign(
    client: Client,
    prefix: String,
    s: EtcdSettings,
    shared: Arc<Shared>,
    lease_slot: Arc<Mutex<Option<i64>>>,
) {
    let election = format!("{prefix}leader");
    let ttl = s.lease_ttl.as_secs().max(2) as i64;
    loop {
        let lease = match client.lease_client().grant(ttl, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                tracing::warn!(error = %e, "etcd lease grant failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *lease_slot.lock().unwrap() = Some(lease);
        let keeper = {
            let client = client.clone();
            tokio::spawn(async move {
                let Ok((mut k, mut stream)) = client.lease_client().keep_alive(lease).await else {
                    return;
                };
                loop {
                    if k.keep_alive().await.is_err() {
                        return;
                    }
                    match stream.message().await {
                        Ok(Some(r)) if r.ttl() > 0 => {}
                        _ => return,
                    }
                    tokio::time::sleep(Duration::from_millis((ttl as u64 * 1000) / 3)).await;
                }
            })
        };
        match client
            .election_client()
            .campaign(election.clone(), s.name.clone(), lease)
            .await
        {
            Ok(_) => {
                tracing::info!(name = %s.name, "elected leader through etcd");
                shared.leader.store(true, Ordering::SeqCst);
                // Lead until the lease is lost.
                let _ = keeper.await;
                shared.leader.store(false, Ordering::SeqCst);
                tracing::warn!(name = %s.name, "etcd lease lost: no longer leader");
            }
            Err(e) => {
                keeper.abort();
                tracing::warn!(error = %e, "etcd campaign failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[tonic::async_trait]
impl MetaStore for EtcdStore {
    async fn propose(&self, cmd: Command) -> Result<Result<(), StateError>, StoreError> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let key = format!(
            "{}log/{}-{:016x}-{n}",
            self.prefix,
            self.s.name.replace('/', "_"),
            rand::random::<u64>()
        );
        let value = serde_json::to_vec(&cmd).expect("command json");
        let mut kv = self.client.kv_client();
        let put = tokio::time::timeout(self.s.request_timeout, kv.put(key, value, None))
            .await
            .map_err(|_| {
                self.err(format!(
                    "put not acknowledged within {:?}",
                    self.s.request_timeout
                ))
            })?
            .map_err(|e| self.err(e))?;
        let revision = put.header().map(|h| h.revision()).unwrap_or(0);
        self.wait_applied(revision).await?;
        let a = self.shared.applied.lock().unwrap();
        a.results
            .get(&revision)
            .cloned()
            .ok_or_else(|| self.err(format!("the verdict of revision {revision} was evicted")))
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(1)
            .with_sort(SortTarget::Mod, SortOrder::Descend);
        let r = tokio::time::timeout(
            self.s.request_timeout,
            kv.get(format!("{}log/", self.prefix), Some(opts)),
        )
        .await
        .map_err(|_| self.err("read not answered in time"))?
        .map_err(|e| self.err(e))?;
        let latest = r.kvs().first().map(|k| k.mod_revision()).unwrap_or(0);
        self.wait_applied(latest).await
    }

    fn local(&self) -> Arc<ClusterState> {
        self.shared.applied.lock().unwrap().state.clone()
    }

    fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::SeqCst)
    }

    fn status(&self) -> ControlPlane {
        let a = self.shared.applied.lock().unwrap();
        let leader = self.shared.leader_name.lock().unwrap().clone();
        ControlPlane {
            store: "etcd",
            node_id: 0,
            role: if self.is_leader() {
                "Leader"
            } else {
                "Follower"
            }
            .into(),
            leader_id: 0,
            leader: leader.clone(),
            term: 0,
            commit_index: a.revision as u64,
            applied_index: a.revision as u64,
            snapshot_index: a.snapshot_revision as u64,
            leader_changes: self.shared.leader_changes.load(Ordering::Relaxed),
            members: self
                .s
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| MemberInfo {
                    id: i as u64 + 1,
                    address: e.clone(),
                    leader: false,
                    learner: false,
                })
                .collect(),
        }
    }

    async fn add_member(&self, _id: u64, _address: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "membership of an etcd-backed control plane is etcd's own (etcdctl member add); \
             coordinators on etcd hold no consensus state and can be started or stopped freely"
                .into(),
        ))
    }

    async fn remove_member(&self, id: u64) -> Result<(), StoreError> {
        self.add_member(id, "").await
    }

    async fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        let lease = *self.lease.lock().unwrap();
        if let Some(lease) = lease {
            // Hands leadership over at once instead of after the lease TTL.
            let _ = self.client.lease_client().revoke(lease).await;
        }
    }
}
