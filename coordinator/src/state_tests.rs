use super::*;
use crate::placement::Stage;

fn register(id: &str, at_ms: u64) -> Command {
    Command::RegisterWorker {
        id: id.into(),
        address: format!("http://{id}:50061"),
        device: "cpu".into(),
        memory_total_bytes: 100,
        memory_free_bytes: 90,
        at_ms,
        collective_address: String::new(),
        pool: String::new(),
        labels: BTreeMap::new(),
    }
}

fn deploy(name: &str) -> Command {
    Command::DeployModel {
        name: name.into(),
        source: "smollm2".into(),
        dtype: "f32".into(),
        quantization: "none".into(),
        serving: Serving::default(),
        shape: ParallelShape::default(),
        replicas: 1,
        pool: String::new(),
        labels: BTreeMap::new(),
        autoscale: None,
        at_ms: 5,
    }
}

fn placement(workers: &[&str]) -> Placement {
    let stages = workers
        .iter()
        .enumerate()
        .map(|(i, w)| Stage {
            worker: w.to_string(),
            layer_start: i as u32 * 10,
            layer_end: (i as u32 + 1) * 10,
            embed: i == 0,
            head: i + 1 == workers.len(),
            bytes: 10,
            ..Default::default()
        })
        .collect();
    Placement {
        stages,
        ..Default::default()
    }
}

fn place(name: &str, generation: u64, workers: &[&str]) -> Command {
    place_replica(name, generation, 0, workers)
}

fn place_replica(name: &str, generation: u64, replica: u32, workers: &[&str]) -> Command {
    Command::PlaceModel {
        name: name.into(),
        generation,
        replica,
        shape: Default::default(),
        placement: placement(workers),
        at_ms: 7,
    }
}

fn cordon(id: &str, cordoned: bool) -> Command {
    Command::CordonWorker {
        id: id.into(),
        cordoned,
    }
}

fn loaded(name: &str, epoch: u64, stage: u32) -> Command {
    Command::ShardLoaded {
        name: name.into(),
        epoch,
        stage,
        rank: 0,
        at_ms: 9,
    }
}

fn health(id: &str, healthy: bool, at_ms: u64) -> Command {
    Command::SetWorkerHealth {
        id: id.into(),
        healthy,
        at_ms,
    }
}

/// A log that exercises every command, including refused ones (stale
/// generations and epochs, unknown names, a busy worker).
fn log() -> Vec<Command> {
    vec![
        register("a", 1),
        register("b", 2),
        register("c", 3),
        deploy("m"),                // 4: generation 4
        place("m", 3, &["a", "b"]), // stale generation: refused
        place("m", 4, &["a", "b"]), // 6: epoch 6
        loaded("m", 5, 0),          // stale epoch: refused
        loaded("m", 6, 0),
        loaded("m", 6, 1), // Ready
        Command::PutSetting {
            key: "k".into(),
            value: "v".into(),
        },
        health("b", false, 100),
        Command::WorkerGone { id: "b".into() },
        place("m", 4, &["a", "b"]), // b is unhealthy: refused
        place("m", 4, &["a", "c"]), // 14: re-placed, epoch 14
        loaded("m", 14, 0),
        Command::ModelProgress {
            name: "m".into(),
            generation: 4,
            replica: Some(0),
            reason: "stage 1: loading".into(),
            failed: false,
            at_ms: 20,
        },
        deploy("n"),
        Command::ModelProgress {
            name: "n".into(),
            generation: 17,
            replica: None,
            reason: "bad file".into(),
            failed: true,
            at_ms: 21,
        },
        Command::RemoveWorker { id: "a".into() }, // holds m: refused
        register("c", 30),                        // c restarted: m's stage 1 lost
        Command::UndeployModel { name: "n".into() },
        Command::DeleteSetting { key: "nope".into() },
        health("b", true, 40),
        register("d", 41),
        Command::ScaleModel {
            name: "m".into(),
            replicas: 2,
            at_ms: 42,
        }, // 25: generation 25
        place_replica("m", 4, 1, &["d"]), // stale generation: refused
        place_replica("m", 25, 1, &["c"]), // c holds replica 0: refused
        place_replica("m", 25, 1, &["d"]), // 28: replica 1, epoch 28
        loaded("m", 28, 0),               // replica 1 Ready
        cordon("d", true),
        place_replica("m", 25, 2, &["d"]), // d is cordoned: refused
        Command::DrainReplica {
            name: "m".into(),
            replica: 1,
            reason: "worker d drained".into(),
            at_ms: 50,
        },
        Command::RemoveReplica {
            name: "m".into(),
            replica: 1,
            at_ms: 60,
        },
        Command::RemoveReplica {
            name: "m".into(),
            replica: 1,
            at_ms: 61,
        }, // gone already: refused
        cordon("d", false),
        Command::ReshapeModel {
            name: "m".into(),
            shape: ParallelShape {
                stages: 2,
                ..Default::default()
            },
            at_ms: 70,
        }, // 36: generation 36
    ]
}

fn apply_all(state: &mut ClusterState, log: &[Command]) -> Vec<Result<(), StateError>> {
    log.iter().map(|c| state.apply(c)).collect()
}

/// What a snapshot is: the state as JSON (the Raft snapshot and the etcd
/// store's snapshot key both hold this).
fn through_snapshot(s: &ClusterState) -> ClusterState {
    serde_json::from_slice(&serde_json::to_vec(s).unwrap()).unwrap()
}

#[test]
fn a_snapshot_plus_the_suffix_of_the_log_equals_the_whole_log() {
    // Commands cross the log as JSON too.
    let wire: Vec<Command> = log()
        .iter()
        .map(|c| serde_json::from_str(&serde_json::to_string(c).unwrap()).unwrap())
        .collect();
    assert_eq!(wire, log());
    let mut whole = ClusterState::default();
    let whole_results = apply_all(&mut whole, &wire);
    for cut in 0..=wire.len() {
        let mut prefix = ClusterState::default();
        let mut results = apply_all(&mut prefix, &wire[..cut]);
        let mut restored = through_snapshot(&prefix);
        results.extend(apply_all(&mut restored, &wire[cut..]));
        assert_eq!(restored, whole, "snapshot at {cut}");
        assert_eq!(results, whole_results, "snapshot at {cut}");
    }
    // The state it reached is the one the commands describe.
    let m = &whole.models["m"];
    assert_eq!((m.generation, m.replicas, m.next_replica), (36, 2, 2));
    assert_eq!(m.shape.stages, 2);
    assert_eq!(
        m.instances[&0].shape,
        ParallelShape::default(),
        "placed before"
    );
    assert_eq!(m.instances.keys().copied().collect::<Vec<_>>(), vec![0]);
    let r = &m.instances[&0];
    assert_eq!(r.epoch, 14);
    assert_eq!(r.placement.stages[1].worker, "c");
    assert_eq!(r.state, ModelState::Loading, "c restarted: stage 1 reloads");
    assert!(r.loaded.is_empty(), "{:?}", r.loaded);
    assert_eq!(m.state, ModelState::Loading, "0 of 2 replicas serve");
    assert!(!whole.models.contains_key("n"));
    assert!(whole.workers["b"].healthy && !whole.workers["b"].gone);
    assert!(!whole.workers["d"].cordoned);
    assert_eq!(whole.applied, wire.len() as u64);
    let refused: Vec<usize> = whole_results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(refused, vec![5, 7, 13, 19, 22, 26, 27, 31, 34]);
}

#[test]
fn desired_state_is_recorded_then_placed_loaded_and_ready() {
    let mut s = ClusterState::default();
    s.apply(&register("a", 1)).unwrap();
    s.apply(&register("b", 2)).unwrap();
    s.apply(&deploy("m")).unwrap();
    let m = &s.models["m"];
    assert_eq!(
        (m.state.clone(), m.generation, m.instances.len()),
        (ModelState::Pending, 3, 0)
    );
    assert_eq!(
        s.apply(&place("m", 2, &["a"])),
        Err(StateError::StaleGeneration {
            name: "m".into(),
            current: 3,
            got: 2
        })
    );
    s.apply(&place("m", 3, &["a", "b"])).unwrap();
    let epoch = s.models["m"].instances[&0].epoch;
    assert_eq!(epoch, 5);
    assert_eq!(s.models["m"].instances[&0].placement.group_nonce, epoch);
    s.apply(&loaded("m", epoch, 0)).unwrap();
    assert_eq!(s.models["m"].state, ModelState::Loading);
    assert_eq!(
        s.apply(&Command::ShardLoaded {
            name: "m".into(),
            epoch,
            stage: 0,
            rank: 1,
            at_ms: 9
        }),
        Err(StateError::NoSuchShard {
            name: "m".into(),
            stage: 0,
            rank: 1
        })
    );
    s.apply(&loaded("m", epoch, 1)).unwrap();
    assert_eq!(s.models["m"].state, ModelState::Ready);
    assert_eq!(s.models["m"].since_ms, 9);
    // A worker of the model restarts: its stage and the first stage (its
    // engine names the later stage's address) load again.
    s.apply(&register("b", 50)).unwrap();
    let m = &s.models["m"];
    assert_eq!(m.state, ModelState::Loading);
    assert!(m.instances[&0].loaded.is_empty());
    assert!(
        m.instances[&0].reason.contains("restarted"),
        "{}",
        m.instances[&0].reason
    );
    // A worker that restarts but holds nothing of it changes nothing.
    s.apply(&loaded("m", epoch, 0)).unwrap();
    s.apply(&loaded("m", epoch, 1)).unwrap();
    s.apply(&register("x", 60)).unwrap();
    s.apply(&register("x", 61)).unwrap();
    assert_eq!(s.models["m"].state, ModelState::Ready);
}

#[test]
fn liveness_transitions_are_the_only_worker_writes() {
    let mut s = ClusterState::default();
    s.apply(&register("a", 1)).unwrap();
    s.apply(&health("a", false, 100)).unwrap();
    assert_eq!(s.workers["a"].unhealthy_since_ms, 100);
    // A second "unhealthy" keeps the first time.
    s.apply(&health("a", false, 200)).unwrap();
    assert_eq!(s.workers["a"].unhealthy_since_ms, 100);
    s.apply(&Command::WorkerGone { id: "a".into() }).unwrap();
    assert!(s.workers["a"].gone && !s.workers["a"].healthy);
    s.apply(&health("a", true, 300)).unwrap();
    assert!(s.workers["a"].healthy && !s.workers["a"].gone);
    assert_eq!(s.workers["a"].unhealthy_since_ms, 0);
    assert_eq!(
        s.apply(&health("zz", true, 1)),
        Err(StateError::UnknownWorker("zz".into()))
    );
}

#[test]
fn unknown_names_are_errors_that_leave_the_state_unchanged() {
    let mut s = ClusterState::default();
    s.apply(&register("a", 1)).unwrap();
    let before = s.clone();
    assert_eq!(
        s.apply(&Command::UndeployModel { name: "x".into() }),
        Err(StateError::UnknownModel("x".into()))
    );
    assert_eq!(
        s.apply(&place("x", 1, &["a"])),
        Err(StateError::UnknownModel("x".into()))
    );
    assert_eq!(s.workers, before.workers);
    assert_eq!(s.models, before.models);
    s.apply(&deploy("m")).unwrap();
    assert_eq!(
        s.apply(&deploy("m")),
        Err(StateError::ModelExists("m".into()))
    );
    let generation = s.models["m"].generation;
    assert_eq!(
        s.apply(&place("m", generation, &["zz"])),
        Err(StateError::UnknownWorker("zz".into()))
    );
    s.apply(&Command::UndeployModel { name: "m".into() })
        .unwrap();
    s.apply(&Command::RemoveWorker { id: "a".into() }).unwrap();
    assert!(s.workers.is_empty() && s.models.is_empty());
}

/// Replicas: each on workers of its own; the model is Ready when every
/// replica asked for serves; a draining replica takes no requests and
/// does not count.
#[test]
fn replicas_scale_drain_and_count_towards_ready() {
    let mut s = ClusterState::default();
    for (i, w) in ["a", "b", "c"].iter().enumerate() {
        s.apply(&register(w, i as u64)).unwrap();
    }
    s.apply(&deploy("m")).unwrap();
    s.apply(&Command::ScaleModel {
        name: "m".into(),
        replicas: 2,
        at_ms: 10,
    })
    .unwrap();
    let g = s.models["m"].generation;
    s.apply(&place_replica("m", g, 0, &["a"])).unwrap();
    assert_eq!(
        s.apply(&place_replica("m", g, 1, &["a"])),
        Err(StateError::WorkerHoldsReplica {
            id: "a".into(),
            name: "m".into(),
            replica: 0
        })
    );
    assert_eq!(
        s.apply(&place_replica("m", g, 5, &["b"])),
        Err(StateError::UnknownReplica {
            name: "m".into(),
            replica: 5
        }),
        "ids are handed out in order"
    );
    s.apply(&place_replica("m", g, 1, &["b"])).unwrap();
    let e0 = s.models["m"].instances[&0].epoch;
    let e1 = s.models["m"].instances[&1].epoch;
    s.apply(&loaded("m", e0, 0)).unwrap();
    assert_eq!(s.models["m"].state, ModelState::Loading, "1 of 2 serve");
    s.apply(&loaded("m", e1, 0)).unwrap();
    assert_eq!(s.models["m"].state, ModelState::Ready);
    assert_eq!(s.models["m"].serving().count(), 2);
    // Scale down to 1: the reconciler drains one; it stops serving at once.
    s.apply(&Command::ScaleModel {
        name: "m".into(),
        replicas: 1,
        at_ms: 20,
    })
    .unwrap();
    s.apply(&Command::DrainReplica {
        name: "m".into(),
        replica: 1,
        reason: "scaled down to 1".into(),
        at_ms: 21,
    })
    .unwrap();
    let m = &s.models["m"];
    assert_eq!(m.serving().map(|r| r.id).collect::<Vec<_>>(), vec![0]);
    assert_eq!(m.state, ModelState::Ready);
    assert!(m.instances[&1].draining());
    assert_eq!(s.models_on("b"), vec!["m".to_string()], "until removed");
    s.apply(&Command::RemoveReplica {
        name: "m".into(),
        replica: 1,
        at_ms: 30,
    })
    .unwrap();
    assert!(s.models_on("b").is_empty());
    assert_eq!(
        s.apply(&Command::ScaleModel {
            name: "m".into(),
            replicas: 0,
            at_ms: 31,
        }),
        Err(StateError::NoReplicas {
            name: "m".into(),
            replicas: 0
        })
    );
    // A cordon survives a restart of the worker.
    s.apply(&cordon("c", true)).unwrap();
    s.apply(&register("c", 40)).unwrap();
    assert!(s.workers["c"].cordoned && !s.workers["c"].schedulable());
}
