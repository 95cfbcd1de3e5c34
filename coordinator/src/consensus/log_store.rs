//! Durable Raft storage: a write-ahead log of entries, hard state and
//! conf state (every record length-prefixed and CRC-32 checked, fsynced
//! before raft-rs is told it is persisted), a snapshot file written
//! atomically (temp file, fsync, rename, fsync of the folder), and the
//! in-memory view raft-rs reads through [`raft::Storage`].
//!
//! Layout of a data directory:
//! - `meta.json`: cluster id and node id; a directory of another cluster or
//!   node is refused.
//! - `snapshot`: magic, CRC, protobuf `Snapshot` (state machine + conf state).
//! - `raft.wal`: magic, then records `[len u32][crc32 u32][kind u8][payload]`.
//!
//! Compaction writes a snapshot, drops the entries it covers from memory
//! and rewrites the WAL with what remains (temp file + rename), so a crash
//! at any point leaves either the old or the new log, both complete.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use serde::{Deserialize, Serialize};

const WAL_MAGIC: &[u8; 8] = b"LLMOSWL1";
const SNAP_MAGIC: &[u8; 8] = b"LLMOSSN1";
const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;

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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
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
    wal: File,
    /// Whether `fsync` is called (always, except in benchmarks that say so).
    sync: bool,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// `entries[i].index == snapshot index + 1 + i`.
    entries: Vec<Entry>,
    /// Bytes in the WAL, for status.
    wal_bytes: u64,
    /// Where replay found a torn last record (cut there at open).
    torn_at: Option<usize>,
    /// fsyncs of the WAL so far.
    fsyncs: u64,
}

/// The offset of a whole record (length, checksum and body that check out)
/// starting after `from`, if any.
fn record_after(bytes: &[u8], from: usize) -> Option<usize> {
    (from + 1..bytes.len().saturating_sub(8)).find(|&p| {
        let len = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[p + 4..p + 8].try_into().unwrap());
        len > 0
            && bytes.len() - (p + 8) >= len
            && crc32fast::hash(&bytes[p + 8..p + 8 + len]) == crc
    })
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

fn record(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    out.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

fn encode_entries(entries: &[Entry], out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    for e in entries {
        let b = e.write_to_bytes().expect("encode entry");
        payload.extend_from_slice(&(b.len() as u32).to_le_bytes());
        payload.extend_from_slice(&b);
    }
    record(KIND_ENTRIES, &payload, out);
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
        let meta_path = dir.join("meta.json");
        let want = Meta {
            cluster_id: cluster_id.to_string(),
            node_id,
        };
        let fresh = !meta_path.exists();
        if fresh {
            let snapshot = Snapshot::default();
            write_atomic(&dir.join("snapshot"), &encode_snapshot(&snapshot), sync)?;
            let mut wal = WAL_MAGIC.to_vec();
            if let Some((cs, entries)) = initial {
                record(
                    KIND_CONF_STATE,
                    &cs.write_to_bytes().expect("encode"),
                    &mut wal,
                );
                if let Some(last) = entries.last() {
                    let mut hs = HardState::default();
                    hs.term = last.term;
                    hs.commit = last.index;
                    encode_entries(&entries, &mut wal);
                    record(
                        KIND_HARD_STATE,
                        &hs.write_to_bytes().expect("encode"),
                        &mut wal,
                    );
                }
            }
            write_atomic(&dir.join("raft.wal"), &wal, sync)?;
            let json = serde_json::to_vec_pretty(&want).expect("meta json");
            write_atomic(&meta_path, &json, sync)?;
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
        }
        let snap_path = dir.join("snapshot");
        let snapshot = decode_snapshot(&snap_path, &fs::read(&snap_path).map_err(io(&snap_path))?)?;
        let mut s = DiskStorage {
            dir: dir.to_path_buf(),
            wal: File::open(&snap_path).map_err(io(&snap_path))?, // replaced below
            sync,
            hard_state: HardState::default(),
            conf_state: snapshot.get_metadata().get_conf_state().clone(),
            snapshot,
            entries: Vec::new(),
            wal_bytes: 0,
            torn_at: None,
            fsyncs: 0,
        };
        s.hard_state.term = s.snapshot.get_metadata().term;
        s.hard_state.commit = s.snapshot.get_metadata().index;
        s.replay()?;
        // A commit index is written without an fsync; one lost in a crash
        // is never below the snapshot (compaction rewrites the log durably
        // with the commit index it had).
        s.hard_state.commit = s.hard_state.commit.max(s.snapshot.get_metadata().index);
        let wal_path = dir.join("raft.wal");
        s.wal = OpenOptions::new()
            .append(true)
            .open(&wal_path)
            .map_err(io(&wal_path))?;
        if let Some(at) = s.torn_at {
            s.wal.set_len(at as u64).map_err(io(&wal_path))?;
            s.wal.sync_all().map_err(io(&wal_path))?;
            s.wal_bytes = at as u64;
        }
        Ok(Recovered { fresh, storage: s })
    }

    fn replay(&mut self) -> Result<(), LogError> {
        let path = self.dir.join("raft.wal");
        let bytes = fs::read(&path).map_err(io(&path))?;
        self.wal_bytes = bytes.len() as u64;
        let corrupt = |offset: usize, what: String| LogError::Corrupt {
            path: path.clone(),
            offset: offset as u64,
            what,
        };
        if bytes.len() < 8 || &bytes[..8] != WAL_MAGIC {
            return Err(corrupt(0, "not an llmos raft log (bad magic)".into()));
        }
        let mut off = 8;
        while off < bytes.len() {
            // A record cut short at the end, or the last record failing its
            // checksum, is a write a crash interrupted: it was never
            // acknowledged (raft is told only after the fsync that covers
            // it), so it is dropped and the log continues before it, as
            // raft-engine does. Damage anywhere else refuses to start.
            // Torn only if nothing valid follows: a damaged length in the
            // middle of the log must not pass for a torn tail (it would cut
            // acknowledged entries).
            let torn = |what: String| -> Result<usize, LogError> {
                if let Some(at) = record_after(&bytes, off) {
                    return Err(corrupt(
                        off,
                        format!("{what}, with a valid record at byte {at} after it"),
                    ));
                }
                tracing::warn!(path = %path.display(), offset = off, %what, "dropping a torn record at the end of the raft log (a write a crash interrupted)");
                Ok(off)
            };
            if bytes.len() - off < 8 {
                self.torn_at = Some(torn("truncated record header".into())?);
                break;
            }
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap());
            let body = off + 8;
            if len == 0 {
                return Err(corrupt(off, "a record of 0 bytes".into()));
            }
            if bytes.len() - body < len {
                self.torn_at = Some(torn(format!(
                    "truncated record: {len} bytes announced, {} left",
                    bytes.len() - body
                ))?);
                break;
            }
            let rec = &bytes[body..body + len];
            if crc32fast::hash(rec) != crc {
                if body + len == bytes.len() {
                    self.torn_at = Some(torn(format!(
                        "checksum mismatch in the last record ({len} bytes)"
                    ))?);
                    break;
                }
                return Err(corrupt(
                    off,
                    format!("checksum mismatch in a record of {len} bytes"),
                ));
            }
            let (kind, payload) = (rec[0], &rec[1..]);
            let bad = |e: protobuf::ProtobufError| corrupt(off, format!("undecodable record: {e}"));
            match kind {
                KIND_ENTRIES => {
                    let mut p = 0;
                    let mut ents = Vec::new();
                    while p < payload.len() {
                        if payload.len() - p < 4 {
                            return Err(corrupt(off, "truncated entry batch".into()));
                        }
                        let n = u32::from_le_bytes(payload[p..p + 4].try_into().unwrap()) as usize;
                        let e = payload
                            .get(p + 4..p + 4 + n)
                            .ok_or_else(|| corrupt(off, "truncated entry batch".into()))?;
                        ents.push(Entry::parse_from_bytes(e).map_err(bad)?);
                        p += 4 + n;
                    }
                    self.append_in_memory(&ents);
                }
                KIND_HARD_STATE => {
                    self.hard_state = HardState::parse_from_bytes(payload).map_err(bad)?
                }
                KIND_CONF_STATE => {
                    self.conf_state = ConfState::parse_from_bytes(payload).map_err(bad)?
                }
                k => return Err(corrupt(off, format!("unknown record kind {k}"))),
            }
            off = body + len;
        }
        Ok(())
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

    fn write_wal(&mut self, buf: &[u8], durable: bool) -> Result<(), LogError> {
        let path = self.dir.join("raft.wal");
        self.wal.write_all(buf).map_err(io(&path))?;
        if self.sync && durable {
            self.wal.sync_data().map_err(io(&path))?;
            self.fsyncs += 1;
        }
        self.wal_bytes += buf.len() as u64;
        Ok(())
    }

    /// Persists new entries and the hard state with one write and one
    /// fsync; raft-rs may only be told after this returns. A hard state
    /// that changes only the commit index is written without an fsync (as
    /// etcd does): a commit index lost in a crash is learned again from the
    /// leader, while entries, term and vote must survive.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), LogError> {
        let mut buf = Vec::new();
        if !entries.is_empty() {
            encode_entries(entries, &mut buf);
        }
        if let Some(hs) = hs {
            record(
                KIND_HARD_STATE,
                &hs.write_to_bytes().expect("encode"),
                &mut buf,
            );
        }
        if buf.is_empty() {
            return Ok(());
        }
        let durable = !entries.is_empty()
            || hs.is_some_and(|h| h.term != self.hard_state.term || h.vote != self.hard_state.vote);
        self.write_wal(&buf, durable)?;
        self.append_in_memory(entries);
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<(), LogError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.persist(&[], Some(&hs))
    }

    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), LogError> {
        let mut buf = Vec::new();
        record(
            KIND_CONF_STATE,
            &cs.write_to_bytes().expect("encode"),
            &mut buf,
        );
        self.write_wal(&buf, true)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Installs a snapshot received from the leader.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), LogError> {
        let m = snap.get_metadata();
        self.hard_state.term = self.hard_state.term.max(m.term);
        self.hard_state.commit = m.index;
        self.conf_state = m.get_conf_state().clone();
        self.entries.clear();
        self.snapshot = snap;
        self.rewrite()
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
        self.entries.drain(..(index - snap_index) as usize);
        self.snapshot = snap;
        self.rewrite()
    }

    /// Writes the snapshot file, then a new WAL holding what remains.
    fn rewrite(&mut self) -> Result<(), LogError> {
        write_atomic(
            &self.dir.join("snapshot"),
            &encode_snapshot(&self.snapshot),
            self.sync,
        )?;
        let mut wal = WAL_MAGIC.to_vec();
        record(
            KIND_CONF_STATE,
            &self.conf_state.write_to_bytes().expect("encode"),
            &mut wal,
        );
        record(
            KIND_HARD_STATE,
            &self.hard_state.write_to_bytes().expect("encode"),
            &mut wal,
        );
        if !self.entries.is_empty() {
            encode_entries(&self.entries, &mut wal);
        }
        let path = self.dir.join("raft.wal");
        write_atomic(&path, &wal, self.sync)?;
        self.wal = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.wal_bytes = wal.len() as u64;
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

    pub fn wal_bytes(&self) -> u64 {
        self.wal_bytes
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
