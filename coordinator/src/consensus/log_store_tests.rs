use super::*;
use raft::Storage;

fn entry(index: u64, term: u64, data: &str) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = data.as_bytes().to_vec().into();
    e
}

fn voters(ids: &[u64]) -> ConfState {
    let mut cs = ConfState::default();
    cs.voters = ids.to_vec();
    cs
}

fn open(dir: &Path) -> Result<Recovered, LogError> {
    DiskStorage::open(dir, "c1", 1, Some((voters(&[1, 2, 3]), vec![])), true)
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    let mut h = HardState::default();
    h.term = term;
    h.vote = vote;
    h.commit = commit;
    h
}

#[test]
fn entries_hard_state_and_conflicts_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).unwrap();
    assert!(r.fresh);
    let mut s = r.storage;
    s.persist(
        &[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")],
        Some(&hs(1, 1, 1)),
    )
    .unwrap();
    // A new leader overwrites the uncommitted suffix from index 2.
    s.persist(&[entry(2, 2, "B")], Some(&hs(2, 2, 2))).unwrap();
    drop(s);
    let r = open(dir.path()).unwrap();
    assert!(!r.fresh);
    let s = r.storage;
    assert_eq!(s.last_index().unwrap(), 2);
    assert_eq!(s.term(2).unwrap(), 2);
    assert_eq!(
        &s.entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap()[1]
            .data[..],
        b"B"
    );
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs(2, 2, 2));
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
}

#[test]
fn compaction_keeps_the_tail_and_the_snapshot_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap().storage;
    let ents: Vec<_> = (1..=10)
        .map(|i| entry(i, 1 + i / 5, &i.to_string()))
        .collect();
    s.persist(&ents, Some(&hs(3, 1, 10))).unwrap();
    s.compact(7, b"state@7".to_vec()).unwrap();
    assert_eq!(s.first_index().unwrap(), 8);
    assert_eq!(s.term(7).unwrap(), 2);
    assert!(matches!(
        s.term(6),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    s.persist(&[entry(11, 3, "11")], None).unwrap();
    drop(s);
    let s = open(dir.path()).unwrap().storage;
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (8, 11));
    let snap = s.snapshot(0, 2).unwrap();
    assert_eq!(&snap.data[..], b"state@7");
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
    assert_eq!(s.initial_state().unwrap().hard_state.commit, 10);
}

/// Entries, term and vote are fsynced before raft is told; a new commit
/// index alone is written without one.
#[test]
fn only_entries_term_and_vote_are_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap().storage;
    s.persist(&[entry(1, 1, "a")], Some(&hs(1, 1, 0))).unwrap();
    assert_eq!(s.fsyncs, 1);
    s.set_commit(1).unwrap();
    s.persist(&[], Some(&hs(1, 1, 1))).unwrap();
    assert_eq!(s.fsyncs, 1, "a commit index alone is not fsynced");
    s.persist(&[], Some(&hs(2, 1, 1))).unwrap();
    s.persist(&[], Some(&hs(2, 3, 1))).unwrap();
    assert_eq!(s.fsyncs, 3, "a new term and a new vote are");
    // A commit index from a light ready is not written on its own; it
    // rides with the next entries.
    s.set_commit(2).unwrap();
    assert_eq!(s.hard_state().commit, 2);
    drop(s);
    let mut s = open(dir.path()).unwrap().storage;
    assert_eq!(s.initial_state().unwrap().hard_state, hs(2, 3, 1));
    s.set_commit(1).unwrap();
    s.persist(&[entry(2, 2, "b")], None).unwrap();
    s.set_commit(2).unwrap();
    s.persist(&[entry(3, 2, "c")], None).unwrap();
    drop(s);
    let s = open(dir.path()).unwrap().storage;
    assert_eq!(s.initial_state().unwrap().hard_state, hs(2, 3, 2));
}

/// The engine's one log file (a fresh directory writes fewer than 16 MB).
fn log_file(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<_> = fs::read_dir(dir.join(ENGINE_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().unwrap()
}

/// A crash in the middle of a write leaves a torn tail (cut short, or
/// whole length with bad bytes): it was never acknowledged, so the log
/// opens without it and takes new writes after.
#[test]
fn a_torn_last_write_is_dropped_and_the_log_continues() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap().storage;
    s.persist(&[entry(1, 1, "hello")], Some(&hs(1, 1, 1)))
        .unwrap();
    drop(s);
    let file = log_file(dir.path());
    let intact = fs::metadata(&file).unwrap().len() as usize;
    let mut s = open(dir.path()).unwrap().storage;
    s.persist(&[entry(2, 1, "world")], None).unwrap();
    drop(s);
    let good = fs::read(&file).unwrap();
    assert!(good.len() > intact);
    for torn in [
        good[..good.len() - 5].to_vec(),
        good[..intact + 3].to_vec(),
        {
            let mut b = good.clone();
            let last = b.len() - 2;
            b[last] ^= 0x40;
            b
        },
    ] {
        fs::write(&file, &torn).unwrap();
        let mut s = open(dir.path()).unwrap().storage;
        assert_eq!(s.last_index().unwrap(), 1);
        assert_eq!(s.initial_state().unwrap().hard_state, hs(1, 1, 1));
        s.persist(&[entry(2, 1, "again")], Some(&hs(1, 1, 2)))
            .unwrap();
        drop(s);
        let s = open(dir.path()).unwrap().storage;
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(
            &s.entries(2, 3, None, GetEntriesContext::empty(false))
                .unwrap()[0]
                .data[..],
            b"again"
        );
    }
}

/// A snapshot received from the leader replaces the whole log, across a
/// restart too.
#[test]
fn an_installed_snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap().storage;
    let ents: Vec<_> = (1..=5).map(|i| entry(i, 1, "old")).collect();
    s.persist(&ents, Some(&hs(1, 1, 3))).unwrap();
    let mut snap = Snapshot::default();
    snap.data = b"state@9".to_vec().into();
    snap.mut_metadata().index = 9;
    snap.mut_metadata().term = 4;
    snap.mut_metadata().set_conf_state(voters(&[1, 2]));
    s.apply_snapshot(snap).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (10, 9));
    s.persist(&[entry(10, 4, "new")], Some(&hs(4, 2, 10)))
        .unwrap();
    drop(s);
    let s = open(dir.path()).unwrap().storage;
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (10, 10)
    );
    assert_eq!(s.term(9).unwrap(), 4);
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs(4, 2, 10));
    assert_eq!(st.conf_state.voters, vec![1, 2]);
    assert_eq!(&s.snapshot(0, 2).unwrap().data[..], b"state@9");
}

#[test]
fn a_damaged_snapshot_or_an_old_log_format_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap().storage;
    s.persist(&[entry(1, 1, "hello")], Some(&hs(1, 1, 1)))
        .unwrap();
    drop(s);
    let snap = dir.path().join("snapshot");
    let good = fs::read(&snap).unwrap();
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    fs::write(&snap, &b).unwrap();
    let e = open(dir.path())
        .err()
        .expect("corrupt snapshot must be refused")
        .to_string();
    assert!(e.contains("snapshot is corrupt"), "{e}");
    fs::write(&snap, &good).unwrap();

    fs::write(dir.path().join("raft.wal"), b"LLMOSWL1").unwrap();
    let e = open(dir.path())
        .err()
        .expect("a log of the old format must be refused")
        .to_string();
    assert!(
        e.contains("raft.wal is a raft log of an older llmos") && e.contains("new member"),
        "{e}"
    );
}

#[test]
fn a_directory_of_another_cluster_or_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).unwrap());
    let e = DiskStorage::open(dir.path(), "other", 1, None, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("belongs to cluster \"c1\"") && e.contains("\"other\""),
        "{e}"
    );
    assert!(DiskStorage::open(dir.path(), "c1", 2, None, true).is_err());
}

#[test]
fn a_second_instance_on_a_directory_is_refused_and_a_released_one_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path()).unwrap();
    let err = match open(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("two instances opened one directory"),
    };
    assert!(err.contains("another instance"), "{err}");
    assert!(err.contains("raft-engine"), "names the directory: {err}");
    drop(first);
    // Released: the next instance (a restart in the same process) opens it.
    assert!(!open(dir.path()).unwrap().fresh);
}
