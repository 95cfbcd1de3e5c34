//! What each worker is told to load: the `ShardSpec` of one rank of one
//! stage of a deployment, with its tensor-parallel group, its pipeline
//! links and, for the first stage's leader, the engine.

use llmos_proto::worker::v1 as wk;

use crate::placement::Placement;
use crate::state::{ClusterState, Deployment, Replica};

/// Whether a replica's stages pass hidden states over direct pipeline
/// links: asked for ("link"), or "auto" with every stage on a GPU (NCCL).
pub(crate) fn pipeline_linked(state: &ClusterState, dep: &Deployment, p: &Placement) -> bool {
    let stages = &p.stages;
    if stages.len() < 2 {
        return false;
    }
    match dep.serving.pipeline_transport.as_str() {
        "link" => true,
        "grpc" => false,
        _ => stages.iter().all(|s| on_gpu(state, &s.worker)),
    }
}

fn on_gpu(state: &ClusterState, worker: &str) -> bool {
    state
        .workers
        .get(worker)
        .is_some_and(|w| w.device.starts_with("cuda"))
}

/// The link between stage `i` and stage `i + 1` as rank `rank` (0: stage
/// `i`, which sends) sees it: NCCL when both leaders are on GPUs, TCP
/// otherwise.
fn pipeline_link(
    state: &ClusterState,
    dep: &Deployment,
    p: &Placement,
    i: usize,
    rank: u32,
    step_timeout: std::time::Duration,
) -> wk::PipelineLink {
    let ends = [&p.stages[i].worker, &p.stages[i + 1].worker];
    let info = |w: &String| state.workers.get(w);
    wk::PipelineLink {
        rank,
        peers: ends
            .iter()
            .map(|w| {
                info(w)
                    .map(|w| w.collective_address.clone())
                    .unwrap_or_default()
            })
            .collect(),
        group: format!(
            "{}/{:x}-{:x}",
            p.link_name(&dep.name, i),
            info(ends[0]).map_or(0, |w| w.registered_at_ms),
            info(ends[1]).map_or(0, |w| w.registered_at_ms),
        ),
        backend: if ends.iter().all(|w| on_gpu(state, w)) {
            wk::LinkBackend::Nccl
        } else {
            wk::LinkBackend::Tcp
        } as i32,
        timeout_ms: step_timeout.as_millis() as u32,
    }
}

fn dtype_code(dtype: &str) -> wk::DType {
    match dtype {
        "bf16" => wk::DType::Bf16,
        "f16" => wk::DType::F16,
        _ => wk::DType::F32,
    }
}

/// The spec of rank `rank` of stage `i` of a replica; the first stage's
/// leader also gets the engine, with the later stages' current addresses.
/// Followers of a tensor-parallel group hold neither embedding nor head.
pub(crate) fn shard_spec(
    state: &ClusterState,
    dep: &Deployment,
    replica: &Replica,
    i: usize,
    rank: usize,
    step_timeout: std::time::Duration,
) -> wk::ShardSpec {
    let p = &replica.placement;
    let s = &p.stages[i];
    let v = &dep.serving;
    let tp = p.tensor_parallel.max(1);
    let tensor_parallel = (tp > 1).then(|| wk::TensorParallel {
        rank: rank as u32,
        world_size: tp,
        peers: s
            .workers()
            .map(|w| {
                state
                    .workers
                    .get(w)
                    .map(|w| w.collective_address.clone())
                    .unwrap_or_default()
            })
            .collect(),
        group: p.group_name(&dep.name, i),
        timeout_ms: step_timeout.as_millis() as u32,
    });
    let leader = rank == 0;
    let linked = pipeline_linked(state, dep, p);
    let n = p.stages.len();
    let prev_link =
        (linked && leader && i > 0).then(|| pipeline_link(state, dep, p, i - 1, 1, step_timeout));
    let next_link =
        (linked && leader && i + 1 < n).then(|| pipeline_link(state, dep, p, i, 0, step_timeout));
    let engine = (i == 0 && leader).then(|| wk::EngineSpec {
        next_stages: p.stages[1..]
            .iter()
            .map(|n| wk::StageRef {
                worker_id: n.worker.clone(),
                address: state
                    .workers
                    .get(&n.worker)
                    .map(|w| w.address.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        max_batch_tokens: v.max_batch_tokens,
        max_running: v.max_running,
        max_waiting: v.max_waiting,
        disable_prefix_caching: !v.prefix_caching,
        step_timeout_ms: step_timeout.as_millis() as u32,
        linked,
    });
    wk::ShardSpec {
        model: dep.name.clone(),
        source: dep.source.clone(),
        layer_start: s.layer_start,
        layer_end: s.layer_end,
        embed: s.embed && leader,
        head: s.head && leader,
        dtype: dtype_code(&dep.dtype) as i32,
        quantization: match dep.quantization.as_str() {
            "int8" => wk::Quantization::Int8,
            "q8_0" => wk::Quantization::Q80,
            "q4_0" => wk::Quantization::Q40,
            "q4_1" => wk::Quantization::Q41,
            "file" => wk::Quantization::File,
            _ => wk::Quantization::Unspecified,
        } as i32,
        kv_dtype: match dep.serving.kv_cache_dtype.as_str() {
            "" | "auto" => wk::DType::Unspecified,
            t => dtype_code(t),
        } as i32,
        kv_blocks: v.kv_blocks,
        block_size: v.block_size,
        engine,
        tensor_parallel,
        prev_link,
        next_link,
        epoch: replica.epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{Placement, Stage};
    use crate::state::{Command, ModelState, Serving};

    /// Three workers (`device` each) and a 3-stage deployment over them
    /// with `transport`.
    fn cluster(devices: [&str; 3], transport: &str) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, d) in devices.iter().enumerate() {
            s.apply(&Command::RegisterWorker {
                id: format!("w{i}"),
                address: format!("http://w{i}:50061"),
                device: d.to_string(),
                memory_total_bytes: 100,
                memory_free_bytes: 90,
                at_ms: 1000 + i as u64,
                collective_address: format!("w{i}:7000"),
                pool: String::new(),
                labels: Default::default(),
            })
            .unwrap();
        }
        let stages = (0..3)
            .map(|i| Stage {
                worker: format!("w{i}"),
                layer_start: i * 10,
                layer_end: (i + 1) * 10,
                embed: i == 0,
                head: i == 2,
                bytes: 10,
                ..Default::default()
            })
            .collect();
        s.apply(&Command::DeployModel {
            name: "m".into(),
            source: "smollm2".into(),
            dtype: "f32".into(),
            quantization: "none".into(),
            serving: Serving {
                pipeline_transport: transport.into(),
                ..Default::default()
            },
            shape: Default::default(),
            replicas: 1,
            pool: String::new(),
            labels: Default::default(),
            autoscale: None,
            at_ms: 1,
        })
        .unwrap();
        let generation = s.models["m"].generation;
        s.apply(&Command::PlaceModel {
            name: "m".into(),
            generation,
            replica: 0,
            shape: Default::default(),
            placement: Placement {
                stages,
                ..Default::default()
            },
            at_ms: 2,
        })
        .unwrap();
        let epoch = s.models["m"].instances[&0].epoch;
        for stage in 0..3 {
            s.apply(&Command::ShardLoaded {
                name: "m".into(),
                epoch,
                stage,
                rank: 0,
                at_ms: 3,
            })
            .unwrap();
        }
        assert_eq!(s.models["m"].state, ModelState::Ready);
        s
    }

    fn specs(s: &ClusterState) -> Vec<wk::ShardSpec> {
        let dep = &s.models["m"];
        (0..3)
            .map(|i| {
                shard_spec(
                    s,
                    dep,
                    &dep.instances[&0],
                    i,
                    0,
                    std::time::Duration::from_secs(9),
                )
            })
            .collect()
    }

    /// "auto" links the stages only when all of them are on GPUs (NCCL);
    /// "link" links CPU stages over TCP; "grpc" never links. Each link's
    /// two ends name the same group with the two leaders' addresses in
    /// order, the earlier stage as rank 0; the engine is told.
    #[test]
    fn pipeline_links_follow_the_transport_and_the_devices() {
        for (devices, transport, linked, backend) in [
            (["cpu"; 3], "auto", false, None),
            (["cuda"; 3], "auto", true, Some(wk::LinkBackend::Nccl)),
            (["cuda", "cpu", "cuda"], "auto", false, None),
            (["cpu"; 3], "link", true, Some(wk::LinkBackend::Tcp)),
            (["cuda"; 3], "grpc", false, None),
        ] {
            let s = cluster(devices, transport);
            let sp = specs(&s);
            let what = format!("{devices:?} {transport}");
            assert_eq!(sp[0].engine.as_ref().unwrap().linked, linked, "{what}");
            if !linked {
                assert!(
                    sp.iter()
                        .all(|x| x.prev_link.is_none() && x.next_link.is_none()),
                    "{what}"
                );
                continue;
            }
            assert!(
                sp[0].prev_link.is_none() && sp[2].next_link.is_none(),
                "{what}"
            );
            for i in 0..2 {
                let (out, into) = (
                    sp[i].next_link.as_ref().unwrap(),
                    sp[i + 1].prev_link.as_ref().unwrap(),
                );
                assert_eq!((out.rank, into.rank), (0, 1), "{what}");
                assert_eq!(out.group, into.group, "{what}");
                assert_eq!(out.peers, into.peers, "{what}");
                assert_eq!(
                    out.peers,
                    vec![format!("w{i}:7000"), format!("w{}:7000", i + 1)],
                    "{what}"
                );
                assert_eq!(out.backend, backend.unwrap() as i32, "{what}");
                assert_eq!(out.timeout_ms, 9000);
            }
            assert_ne!(sp[0].next_link, sp[1].next_link, "{what}");
        }
        // Mixed devices asked to link: the GPU pair uses NCCL, the pair
        // with a CPU end TCP.
        let sp = specs(&cluster(["cuda", "cuda", "cpu"], "link"));
        let backend = |l: &Option<wk::PipelineLink>| l.as_ref().unwrap().backend;
        assert_eq!(backend(&sp[0].next_link), wk::LinkBackend::Nccl as i32);
        assert_eq!(backend(&sp[1].next_link), wk::LinkBackend::Tcp as i32);
    }

    /// Every stage is told the deployment's KV cache type; "auto" leaves
    /// it unset (the model's dtype).
    #[test]
    fn every_stage_is_told_the_kv_cache_dtype() {
        for (kv, want) in [
            ("auto", wk::DType::Unspecified),
            ("f32", wk::DType::F32),
            ("bf16", wk::DType::Bf16),
            ("f16", wk::DType::F16),
        ] {
            let mut s = cluster(["cpu"; 3], "auto");
            s.models.get_mut("m").unwrap().serving.kv_cache_dtype = kv.into();
            assert!(specs(&s).iter().all(|x| x.kv_dtype == want as i32), "{kv}");
        }
    }

    fn restart_w2() -> Command {
        Command::RegisterWorker {
            id: "w2".into(),
            address: "http://w2:50099".into(),
            device: "cpu".into(),
            memory_total_bytes: 100,
            memory_free_bytes: 90,
            at_ms: 5000,
            collective_address: "w2:7099".into(),
            pool: String::new(),
            labels: Default::default(),
        }
    }

    /// A worker that registers again (a restart) renames the links it is
    /// an end of, and only those, so both ends form new ones; the shards
    /// that must load again (its own, its linked neighbour's, the first
    /// stage's engine) are no longer counted loaded.
    #[test]
    fn a_re_registered_worker_renames_its_links() {
        let mut s = cluster(["cpu"; 3], "link");
        let before = specs(&s);
        s.apply(&restart_w2()).unwrap();
        let after = specs(&s);
        assert_eq!(before[0].next_link, after[0].next_link);
        let (b, a) = (
            before[1].next_link.as_ref().unwrap(),
            after[1].next_link.as_ref().unwrap(),
        );
        assert_ne!(b.group, a.group);
        assert_eq!(a.peers[1], "w2:7099");
        assert_eq!(after[2].prev_link.as_ref().unwrap().group, a.group);
        let m = &s.models["m"];
        assert_eq!(m.state, ModelState::Loading);
        assert_eq!(m.instances[&0].state, ModelState::Loading);
        assert!(
            m.instances[&0].loaded.is_empty(),
            "{:?}",
            m.instances[&0].loaded
        );
        // Over gRPC (no links) the middle stage keeps its shard.
        let mut s = cluster(["cpu"; 3], "grpc");
        s.apply(&restart_w2()).unwrap();
        assert_eq!(s.models["m"].instances[&0].loaded, [(1, 0)].into());
    }
}
