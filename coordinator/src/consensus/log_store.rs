//! Durable Raft storage on TiKV's log engine (the `raft-engine` crate):
//! entries, hard state and conf state go to the engine (one write batch
//! per Ready, `fdatasync`ed before raft-rs is told it is persisted); the
//! state-machine snapshot is a file written atomically (temp file, fsync,
//! rename, fsync of the folder); raft-rs reads an in-memory view through
//! [`raft::Storage`].
//!
//! Layout of a data directory:
//! - `meta.json`: cluster id and node id; a directory of another cluster or
//!   node is refused.
//! - `snapshot`: magic, CRC, protobuf `Snapshot` (state machine + conf state).
//! - `raft-engine/`: the engine's log files (one Raft group, id 1; entries,
//!   and the keys `hard_state` and `conf_state`).
//!
//! Compaction writes the snapshot file first, then tells the engine to drop
//! the entries it covers and purges its expired files, so a crash at any
//! point leaves a snapshot and a log that together hold every entry (entries
//! at or below the snapshot are skipped on open).
//!
//! A crash in the middle of a write leaves a torn tail in the engine's last
//! file: the engine cuts it at open and logs the fact (its
//! `TolerateTailCorruption` recovery mode); such a write was never
//! acknowledged, as raft-rs is told only after the sync that covers it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};
use serde::{Deserialize, Serialize};

const SNAP_MAGIC: &[u8; 8] = b"LLMOSSN1";
/// The one Raft group this engine holds.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const ENGINE_DIR: &str = "raft-engine";
/// The log file of llmos before it moved to raft-engine.
const OLD_WAL: &str = "raft.wal";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt at byte {offset}: {what}; refusing to start. Restore the data \
         directory from a backup, or remove it and add this node back as a new member"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("raft log in {path}: {what}; refusing to start")]
    Engine { path: PathBuf, what: String },
    #[error(
        "data directory {dir} belongs to cluster {found:?} (node {found_node}), but this node \
         is configured as node {node} of cluster {expected:?}; refusing to start"
    )]
    WrongCluster {
        dir: PathBuf,
        found: String,
        found_node: u64,
        expected: String,
        node: u64,
    },
    #[error(
        "{path} is a raft log of an older llmos (before raft-engine) that this version does \
         not read; refusing to start. Remove the data directory and add this node back as a \
         new member (the others send it a snapshot)"
    )]
    OldFormat { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn engine_err(path: &Path) -> impl FnOnce(raft_engine::Error) -> LogError + '_ {
    move |e| LogError::Engine {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

/// How raft-engine finds the index of our entries.
struct RaftEntries;

impl MessageExt for RaftEntries {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Meta {
    cluster_id: String,
    node_id: u64,
}

/// What the data directory held at start-up.
pub struct Recovered {
    /// Whether the directory was new (nothing on disk before).
    pub fresh: bool,
    pub storage: DiskStorage,
}

/// raft-rs storage backed by a data directory.
pub struct DiskStorage {
    dir: PathBuf,
    engine: Engine,
    /// Whether writes are synced (always, except in benchmarks that say so).
    sync: bool,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// `entries[i].index == snapshot index + 1 + i`: the log since the
    /// snapshot, kept in memory as well (raft-rs reads terms and entries
    /// on every Ready; the state machine's log is compacted every few
    /// thousand entries).
    entries: Vec<Entry>,
    /// Synced writes so far.
    fsyncs: u64,
    /// `hard_state.commit` is ahead of what the engine holds.
    commit_unwritten: bool,
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    if sync {
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    if sync {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

fn open_engine(dir: &Path) -> Result<Engine, LogError> {
    let path = dir.join(ENGINE_DIR);
    let cfg = raft_engine::Config {
        dir: path.to_string_lossy().into_owned(),
        recovery_mode: RecoveryMode::TolerateTailCorruption,
        recovery_threads: 1,
        // The control plane's log is small: files of 16 MB, purged (and
        // recycled) once the snapshot covers them.
        target_file_size: ReadableSize::mb(16),
        purge_threshold: ReadableSize::mb(64),
        ..Default::default()
    };
    // The directory's lock can be held for a moment by a child this process
    // is forking (until it execs, it shares the descriptor of a lock just
    // released, e.g. by a coordinator restarted in the same process); a
    // second instance on the directory holds it for good and is refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match Engine::open(cfg.clone()) {
            Err(e) if is_lock_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r.map_err(engine_err(&path)),
        }
    }
}

fn is_lock_busy(e: &raft_engine::Error) -> bool {
    matches!(e, raft_engine::Error::Other(_)) && e.to_string().contains("Failed to lock file")
}

impl DiskStorage {
    /// Opens (or creates) the data directory of node `node_id` of cluster
    /// `cluster_id`. A new directory starts with `initial` when given: the
    /// conf state and the committed bootstrap entries (one membership
    /// change per founding member, identical on every founder, so a member
    /// added later learns the founders from the log), or empty (a node that
    /// waits to be added by the leader).
    pub fn open(
        dir: &Path,
        cluster_id: &str,
        node_id: u64,
        initial: Option<(ConfState, Vec<Entry>)>,
        sync: bool,
    ) -> Result<Recovered, LogError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let old = dir.join(OLD_WAL);
        if old.exists() {
            return Err(LogError::OldFormat { path: old });
        }
        let meta_path = dir.join("meta.json");
        let want = Meta {
            cluster_id: cluster_id.to_string(),
            node_id,
        };
        let fresh = !meta_path.exists();
        // The engine is opened once: closing it and opening it again can
        // fail to take its lock while another thread of this process forks
        // (the child holds a copy of the lock's descriptor until it execs).
        let engine = if fresh {
            // A directory a crash left half made (no meta.json yet) starts
            // over.
            let engine_dir = dir.join(ENGINE_DIR);
            if engine_dir.exists() {
                fs::remove_dir_all(&engine_dir).map_err(io(&engine_dir))?;
            }
            write_atomic(
                &dir.join("snapshot"),
                &encode_snapshot(&Snapshot::default()),
                sync,
            )?;
            let engine = open_engine(dir)?;
            if let Some((cs, entries)) = initial {
                let mut batch = LogBatch::default();
                batch
                    .put_message(GROUP, KEY_CONF_STATE.to_vec(), &cs)
                    .map_err(engine_err(dir))?;
                if let Some(last) = entries.last() {
                    let mut hs = HardState::default();
                    hs.term = last.term;
                    hs.commit = last.index;
                    batch
                        .add_entries::<RaftEntries>(GROUP, &entries)
                        .map_err(engine_err(dir))?;
                    batch
                        .put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)
                        .map_err(engine_err(dir))?;
                }
                engine.write(&mut batch, sync).map_err(engine_err(dir))?;
            }
            let json = serde_json::to_vec_pretty(&want).expect("meta json");
            write_atomic(&meta_path, &json, sync)?;
            engine
        } else {
            let bytes = fs::read(&meta_path).map_err(io(&meta_path))?;
            let found: Meta = serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt {
                path: meta_path.clone(),
                offset: e.column() as u64,
                what: e.to_string(),
            })?;
            if found != want {
                return Err(LogError::WrongCluster {
                    dir: dir.to_path_buf(),
                    found: found.cluster_id,
                    found_node: found.node_id,
                    expected: want.cluster_id,
                    node: want.node_id,
                });
            }
            open_engine(dir)?
        };
        let snap_path = dir.join("snapshot");
        let snapshot = decode_snapshot(&snap_path, &fs::read(&snap_path).map_err(io(&snap_path))?)?;
        let epath = dir.join(ENGINE_DIR);
        let mut hard_state: HardState = engine
            .get_message(GROUP, KEY_HARD_STATE)
            .map_err(engine_err(&epath))?
            .unwrap_or_default();
        let conf_state: ConfState = engine
            .get_message(GROUP, KEY_CONF_STATE)
            .map_err(engine_err(&epath))?
            .unwrap_or_else(|| snapshot.get_metadata().get_conf_state().clone());
        let snap_index = snapshot.get_metadata().index;
        let mut entries = Vec::new();
        if let (Some(first), Some(last)) = (engine.first_index(GROUP), engine.last_index(GROUP)) {
            // Entries the snapshot covers may remain when a crash came
            // between the snapshot and the compaction of the log.
            let from = first.max(snap_index + 1);
            if from <= last {
                if from > snap_index + 1 {
                    return Err(LogError::Engine {
                        path: epath,
                        what: format!(
                            "the log starts at entry {first} but the snapshot ends at \
                             {snap_index}: entries {} to {} are missing",
                            snap_index + 1,
                            from - 1
                        ),
                    });
                }
                engine
                    .fetch_entries_to::<RaftEntries>(GROUP, from, last + 1, None, &mut entries)
                    .map_err(engine_err(&epath))?;
            }
        }
        hard_state.term = hard_state.term.max(snapshot.get_metadata().term);
        // A commit index is written without a sync; one lost in a crash is
        // never below the snapshot (compaction syncs the commit index it
        // had).
        hard_state.commit = hard_state.commit.max(snap_index);
        Ok(Recovered {
            fresh,
            storage: DiskStorage {
                dir: dir.to_path_buf(),
                engine,
                sync,
                hard_state,
                conf_state,
                snapshot,
                entries,
                fsyncs: 0,
                commit_unwritten: false,
            },
        })
    }

    fn append_in_memory(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        let snap_index = self.snapshot.get_metadata().index;
        // Entries at or below the snapshot are already covered by it.
        let skip = snap_index.saturating_sub(first.index - 1) as usize;
        if skip >= ents.len() {
            return;
        }
        let ents = &ents[skip..];
        let keep = (ents[0].index - snap_index - 1) as usize;
        self.entries.truncate(keep.min(self.entries.len()));
        self.entries.extend_from_slice(ents);
    }

    fn write(&mut self, batch: &mut LogBatch, durable: bool) -> Result<(), LogError> {
        let sync = self.sync && durable;
        self.engine
            .write(batch, sync)
            .map_err(engine_err(&self.dir.join(ENGINE_DIR)))?;
        if sync {
            self.fsyncs += 1;
        }
        Ok(())
    }

    /// Persists new entries and the hard state with one write and one
    /// sync; raft-rs may only be told after this returns. A hard state
    /// that changes only the commit index is written without a sync (as
    /// etcd does): a commit index lost in a crash is learned again from the
    /// leader, while entries, term and vote must survive. A commit index
    /// advanced by `set_commit` since the last write rides along.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), LogError> {
        let pending = (hs.is_none() && self.commit_unwritten && !entries.is_empty())
            .then(|| self.hard_state.clone());
        let hs = hs.or(pending.as_ref());
        let mut batch = LogBatch::default();
        let bad = |e| LogError::Engine {
            path: self.dir.join(ENGINE_DIR),
            what: format!("{e}"),
        };
        if !entries.is_empty() {
            batch
                .add_entries::<RaftEntries>(GROUP, entries)
                .map_err(bad)?;
        }
        if let Some(hs) = hs {
            batch
                .put_message(GROUP, KEY_HARD_STATE.to_vec(), hs)
                .map_err(bad)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let durable = !entries.is_empty()
            || hs.is_some_and(|h| h.term != self.hard_state.term || h.vote != self.hard_state.vote);
        self.write(&mut batch, durable)?;
        self.append_in_memory(entries);
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
            self.commit_unwritten = false;
        }
        Ok(())
    }

    /// A commit index learned after the Ready that persisted the entries
    /// (raft-rs's light ready): kept in memory and written with the next
    /// write (never synced on its own, so it costs no write per commit;
    /// one lost in a crash is learned again from the leader, and a
    /// snapshot writes the one it covers).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), LogError> {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
            self.commit_unwritten = true;
        }
        Ok(())
    }

    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), LogError> {
        let mut batch = LogBatch::default();
        batch
            .put_message(GROUP, KEY_CONF_STATE.to_vec(), &cs)
            .map_err(engine_err(&self.dir.join(ENGINE_DIR)))?;
        self.write(&mut batch, true)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Installs a snapshot received from the leader: the snapshot file
    /// first, then the whole log replaced by the hard and conf state.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), LogError> {
        let m = snap.get_metadata();
        self.hard_state.term = self.hard_state.term.max(m.term);
        self.hard_state.commit = m.index;
        self.conf_state = m.get_conf_state().clone();
        self.entries.clear();
        self.snapshot = snap;
        write_atomic(
            &self.dir.join("snapshot"),
            &encode_snapshot(&self.snapshot),
            self.sync,
        )?;
        let epath = self.dir.join(ENGINE_DIR);
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Clean);
        batch
            .put_message(GROUP, KEY_HARD_STATE.to_vec(), &self.hard_state)
            .map_err(engine_err(&epath))?;
        batch
            .put_message(GROUP, KEY_CONF_STATE.to_vec(), &self.conf_state)
            .map_err(engine_err(&epath))?;
        self.write(&mut batch, true)?;
        self.purge()
    }

    /// Takes a snapshot of the state machine at `index` (applied) and drops
    /// the log entries it covers.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), LogError> {
        let snap_index = self.snapshot.get_metadata().index;
        if index <= snap_index || index > self.last() {
            return Ok(());
        }
        let term = self.entries[(index - snap_index - 1) as usize].term;
        let mut snap = Snapshot::default();
        snap.data = data.into();
        let m = snap.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(self.conf_state.clone());
        write_atomic(
            &self.dir.join("snapshot"),
            &encode_snapshot(&snap),
            self.sync,
        )?;
        self.entries.drain(..(index - snap_index) as usize);
        self.snapshot = snap;
        let epath = self.dir.join(ENGINE_DIR);
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Compact { index: index + 1 });
        // The commit index the snapshot needs, durably.
        batch
            .put_message(GROUP, KEY_HARD_STATE.to_vec(), &self.hard_state)
            .map_err(engine_err(&epath))?;
        self.write(&mut batch, true)?;
        self.purge()
    }

    /// Lets the engine delete (or recycle) files that hold nothing live.
    fn purge(&mut self) -> Result<(), LogError> {
        self.engine
            .purge_expired_files()
            .map_err(engine_err(&self.dir.join(ENGINE_DIR)))?;
        Ok(())
    }

    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Bytes the engine's log files take on disk.
    pub fn log_bytes(&self) -> u64 {
        self.engine.get_used_size() as u64
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }
}
fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    let body = s.write_to_bytes().expect("encode snapshot");
    let mut out = SNAP_MAGIC.to_vec();
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a snapshot file's bytes and the state it carries (the fuzz
/// target's entry): the snapshot's index, or why it is refused.
#[doc(hidden)]
pub fn check_snapshot(bytes: &[u8]) -> Result<u64, String> {
    let s = decode_snapshot(Path::new("<fuzz>"), bytes).map_err(|e| e.to_string())?;
    if !s.get_data().is_empty() {
        serde_json::from_slice::<crate::state::ClusterState>(s.get_data())
            .map_err(|e| e.to_string())?;
    }
    Ok(s.get_metadata().index)
}

fn decode_snapshot(path: &Path, bytes: &[u8]) -> Result<Snapshot, LogError> {
    let corrupt = |what: &str| LogError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        what: what.to_string(),
    };
    if bytes.len() < 12 || &bytes[..8] != SNAP_MAGIC {
        return Err(corrupt("not an llmos snapshot (bad magic or truncated)"));
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if crc32fast::hash(&bytes[12..]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Snapshot::parse_from_bytes(&bytes[12..]).map_err(|e| corrupt(&e.to_string()))
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let off = self.first();
        let mut ents = self.entries[(low - off) as usize..(high - off) as usize].to_vec();
        if let Some(max) = max_size.into() {
            let mut size = 0u64;
            let mut n = 0;
            for e in &ents {
                size += e.compute_size() as u64;
                if n > 0 && size > max {
                    break;
                }
                n += 1;
            }
            ents.truncate(n);
        }
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let m = self.snapshot.get_metadata();
        if idx == m.index {
            return Ok(m.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
#[path = "log_store_tests.rs"]
mod tests;
