use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::*;

/// Forms a TCP group of `world` ranks in threads of this process, each with
/// its own rendezvous listener.
fn form_group(name: &str, world: usize, op_timeout: Duration) -> Vec<TcpGroup> {
    let rvs: Vec<Arc<Rendezvous>> = (0..world)
        .map(|_| Arc::new(Rendezvous::bind("127.0.0.1:0").unwrap()))
        .collect();
    let peers: Vec<String> = rvs.iter().map(|r| r.local_addr().to_string()).collect();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (rv, peers, name) = (rvs[rank].clone(), peers.clone(), name.to_string());
            std::thread::spawn(move || {
                rv.form(&name, rank, &peers, Duration::from_secs(10), op_timeout)
                    .unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `f(rank, group)` on every rank at once and returns the results in
/// rank order.
fn on_all<T: Send + 'static>(
    groups: Vec<TcpGroup>,
    f: impl Fn(usize, &TcpGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let hs: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, g)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, &g))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 31 + rank * 7) % 97) as f32 * 0.013 - 0.5 + rank as f32)
        .collect()
}

#[test]
fn tcp_all_reduce_small_and_ring_sizes_sum_and_agree_bitwise() {
    // 3 ranks: 5 floats (direct), 100_003 floats (ring with uneven chunks),
    // and 2 floats (fewer than ranks).
    for n in [5usize, 100_003, 2] {
        let groups = form_group(&format!("ar-{n}"), 3, Duration::from_secs(10));
        let out = on_all(groups, move |r, g| {
            let mut v = values(r, n);
            g.all_reduce_host(&mut v).unwrap();
            v
        });
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| values(r, n)).collect();
        let want: Vec<f32> = (0..n)
            .map(|i| inputs.iter().map(|v| v[i] as f64).sum::<f64>() as f32)
            .collect();
        for v in &out {
            assert_eq!(v.len(), n);
            let err = v
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "n={n}: off by {err}");
        }
        assert!(
            out[0] == out[1] && out[1] == out[2],
            "ranks disagree (n={n})"
        );
    }
}

#[test]
fn tcp_tensor_collectives_gather_broadcast_send_recv_barrier() {
    let groups = form_group("tensors", 3, Duration::from_secs(10));
    let out = on_all(groups, |r, g| {
        assert_eq!((g.rank(), g.world_size(), g.backend()), (r, 3, "tcp"));
        // all-gather in rank order, dtype kept
        let mine = Tensor::full([2, 3], r as i64 + 1, (Kind::BFloat16, Device::Cpu));
        let all = g.all_gather(&mine).unwrap();
        assert_eq!(all.size(), [6, 3]);
        assert_eq!(all.kind(), Kind::BFloat16);
        let rows: Vec<f32> = Vec::try_from(all.select(1, 0).to_kind(Kind::Float)).unwrap();
        assert_eq!(rows, [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        // all-reduce of a tensor
        let mut t = Tensor::full([4], (r + 1) as f64, (Kind::Float, Device::Cpu));
        g.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [6.0; 4]);
        // broadcast from rank 2
        let mut b = Tensor::full([3], r as f64 * 10.0, (Kind::Float, Device::Cpu));
        g.broadcast(&mut b, 2).unwrap();
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [20.0; 3]);
        // a ring of send/recv: r -> r+1
        let next = (r + 1) % 3;
        let prev = (r + 2) % 3;
        g.send(&Tensor::from_slice(&[r as i64, 42]), next).unwrap();
        let mut got = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
        g.recv(&mut got, prev).unwrap();
        assert_eq!(Vec::<i64>::try_from(&got).unwrap(), [prev as i64, 42]);
        g.barrier().unwrap();
        // sending to oneself is refused, naming the ranks
        let e = g.send(&Tensor::from_slice(&[1i64]), r).unwrap_err();
        assert!(e.to_string().contains("cannot exchange"), "{e}");
        g.bytes_sent()
    });
    assert!(out.iter().all(|&b| b > 0));
}

#[test]
fn a_dead_rank_fails_the_operation_promptly_and_breaks_the_group() {
    let op_timeout = Duration::from_secs(20);
    let mut groups = form_group("dead", 2, op_timeout);
    let g1 = groups.pop().unwrap();
    let g0 = groups.pop().unwrap();
    // Rank 1's process "ends": its links close.
    drop(g1);
    let t = Instant::now();
    let mut v = vec![1f32; 16];
    let e = g0.all_reduce_host(&mut v).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("rank 1"), "{e}");
    assert!(g0.is_broken());
    // Later operations fail at once, saying why.
    let e = g0.barrier().unwrap_err();
    assert!(e.to_string().contains("broken"), "{e}");
    assert!(matches!(e, super::CommError::Failed(_)));
}

#[test]
fn a_silent_rank_fails_the_operation_at_the_deadline() {
    let mut groups = form_group("silent", 2, Duration::from_millis(300));
    let _g1 = groups.pop().unwrap(); // alive, but never joins the all-reduce
    let g0 = groups.pop().unwrap();
    let t = Instant::now();
    let e = g0.all_reduce_host(&mut [1f32; 4]).unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(e.to_string().contains("did not answer"), "{e}");
}

#[test]
fn forming_without_a_rank_names_the_missing_one() {
    let rv = Rendezvous::bind("127.0.0.1:0").unwrap();
    let other = Rendezvous::bind("127.0.0.1:0").unwrap();
    let peers = vec![rv.local_addr().to_string(), other.local_addr().to_string()];
    let e = rv
        .form(
            "lonely",
            0,
            &peers,
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
        .err()
        .expect("rank 1 never dials");
    assert!(e.to_string().contains("ranks [1] did not connect"), "{e}");
    let e = rv
        .form(
            "x",
            2,
            &peers,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("rank 2 is outside a group of 2"),
        "{e}"
    );
}

#[test]
fn solo_group_is_a_no_op() {
    let g = SoloGroup;
    let mut t = Tensor::from_slice(&[1f32, 2.0]);
    g.all_reduce_sum(&mut t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
    assert_eq!(g.all_gather(&t).unwrap().size(), [2]);
    g.barrier().unwrap();
    assert!(g.send(&t, 1).is_err());
}

/// GPU: an NCCL communicator of world size 1 runs the all-reduce path on a
/// CUDA tensor. Ignored by default: a GPU test (see the README).
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_nccl_world_of_one_all_reduces() {
    llmos_kernels::load_torch_cuda().expect("libtorch_cuda.so loads");
    assert!(
        tch::Cuda::device_count() > 0,
        "a GPU test ran without a CUDA device (run it with --ignored on a GPU machine)"
    );
    assert!(
        nccl_available(),
        "a GPU machine must find libnccl.so (scripts/setup.sh links it)"
    );
    let groups = form_group("nccl1", 1, Duration::from_secs(10));
    let nccl = NcclGroup::form(&groups[0], Duration::from_secs(10)).unwrap();
    let mut t = Tensor::arange(1000, (Kind::Float, Device::Cuda(0)));
    nccl.all_reduce_sum(&mut t).unwrap();
    let want = Tensor::arange(1000, (Kind::Float, Device::Cuda(0)));
    assert_eq!(f64::try_from((&t - &want).abs().max()).unwrap(), 0.0);
    let g = nccl.all_gather(&want.to_kind(Kind::BFloat16)).unwrap();
    assert_eq!(g.size(), [1000]);
    assert_eq!(nccl.bytes_sent(), 4000 + 2000);
    nccl.barrier().unwrap();
}

/// Both ends of a TCP pipeline link formed in this process: (sender,
/// receiver).
fn link_pair(name: &str, op_timeout: Duration) -> (PipelineLink, PipelineLink) {
    let rvs: Vec<Arc<Rendezvous>> = (0..2)
        .map(|_| Arc::new(Rendezvous::bind("127.0.0.1:0").unwrap()))
        .collect();
    let peers: Vec<String> = rvs.iter().map(|r| r.local_addr().to_string()).collect();
    let hs: Vec<_> = (0..2u32)
        .map(|rank| {
            let spec = LinkSpec {
                rank: rank as usize,
                peers: peers.clone(),
                group: name.into(),
                backend: LinkBackend::Tcp,
                timeout: Some(op_timeout),
            };
            let rv = rvs[rank as usize].clone();
            std::thread::spawn(move || {
                PipelineLink::form(&rv, &spec, Device::Cpu, Duration::from_secs(10), op_timeout)
                    .unwrap()
            })
        })
        .collect();
    let mut ends = hs.into_iter().map(|h| h.join().unwrap());
    (ends.next().unwrap(), ends.next().unwrap())
}

fn hidden(step: u64, rows: i64, kind: Kind) -> Tensor {
    (Tensor::arange(rows * 8, (Kind::Float, Device::Cpu)) + step as f64)
        .view([rows, 8])
        .to_kind(kind)
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

/// A pipeline link carries each step's hidden states in their dtype, and
/// stays in step when either side fails a step: a step the sender failed
/// fails at the receiver at once (reported, or skipped), a step the
/// receiver failed before reading is drained, a shape the receiver did not
/// expect fails that step only. A sender that goes away fails the receiver
/// promptly and breaks the link.
#[test]
fn pipeline_link_keeps_stages_in_step_through_failures() {
    let (tx, rx) = link_pair("link-steps", Duration::from_secs(5));
    assert_eq!(tx.backend(), "tcp");
    // Plain steps, f32 and bf16.
    for (step, kind) in [(10u64, Kind::Float), (11, Kind::BFloat16)] {
        tx.send(step, &hidden(step, 3, kind)).unwrap();
        let got = rx.recv(step, 3, 8).unwrap();
        assert!(same(&got, &hidden(step, 3, kind)), "step {step}");
    }
    // The sender failed step 12 and said so.
    tx.send_failed(12).unwrap();
    let e = rx.recv(12, 3, 8).unwrap_err();
    assert!(e.to_string().contains("previous stage failed it"), "{e}");
    // The receiver failed step 13 before reading it: step 14 drains it.
    tx.send(13, &hidden(13, 2, Kind::Float)).unwrap();
    tx.send(14, &hidden(14, 5, Kind::Float)).unwrap();
    assert!(same(
        &rx.recv(14, 5, 8).unwrap(),
        &hidden(14, 5, Kind::Float)
    ));
    // The sender never got to step 15: it fails, and step 16 still gets
    // its own hidden states.
    tx.send(16, &hidden(16, 1, Kind::Float)).unwrap();
    let e = rx.recv(15, 4, 8).unwrap_err();
    assert!(e.to_string().contains("sent nothing for it"), "{e}");
    assert!(same(
        &rx.recv(16, 1, 8).unwrap(),
        &hidden(16, 1, Kind::Float)
    ));
    // A shape the step does not have fails that step only.
    tx.send(17, &hidden(17, 2, Kind::Float)).unwrap();
    let e = rx.recv(17, 3, 8).unwrap_err();
    assert!(
        e.to_string().contains("[2, 8] where the step has [3, 8]"),
        "{e}"
    );
    tx.send(18, &hidden(18, 3, Kind::Float)).unwrap();
    assert!(same(
        &rx.recv(18, 3, 8).unwrap(),
        &hidden(18, 3, Kind::Float)
    ));
    assert!(!tx.is_broken() && !rx.is_broken());
    assert!(tx.bytes_sent() > 0);
    // The sender goes away: the receiver fails at once, not at its
    // deadline, and the link is broken for good.
    drop(tx);
    let t0 = Instant::now();
    assert!(rx.recv(19, 3, 8).is_err());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(rx.is_broken());
    assert!(rx.recv(20, 3, 8).is_err());
}

/// A receiver whose sender stays silent fails that step at the link's
/// deadline, but the link survives: the late step's hidden states are
/// drained when they come, and the next step gets its own.
#[test]
fn a_silent_sender_fails_the_step_at_the_deadline_not_the_link() {
    let (tx, rx) = link_pair("link-silent", Duration::from_millis(300));
    let t0 = Instant::now();
    let e = rx.recv(1, 1, 8).unwrap_err();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("sent nothing"), "{e}");
    assert!(!rx.is_broken());
    tx.send(1, &hidden(1, 1, Kind::Float)).unwrap();
    tx.send(2, &hidden(2, 4, Kind::Float)).unwrap();
    assert!(same(&rx.recv(2, 4, 8).unwrap(), &hidden(2, 4, Kind::Float)));
}

/// Mutual TLS between workers: a group of worker certificates all-reduces
/// large buffers (the ring, both directions at once) and smaller ones
/// exactly as plaintext does; a coordinator's certificate, a certificate
/// of another CA, or no TLS at all cannot join a link.
#[test]
fn tls_links_admit_only_workers_of_the_cluster() {
    use llmos_tls::dev::{self, Holder};
    use llmos_tls::{Role, Tls, TlsFiles};
    let dir = tempfile::tempdir().unwrap();
    let h = Holder::bound;
    dev::init(
        dir.path(),
        &[
            h(Role::Worker, "a"),
            h(Role::Worker, "b"),
            h(Role::Worker, "c"),
            h(Role::Coordinator, "1"),
        ],
        &["127.0.0.1".into()],
    )
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    dev::init(other.path(), &[h(Role::Worker, "x")], &[]).unwrap();
    let tls = |name: &str| Tls::load(TlsFiles::in_dir(dir.path(), name)).unwrap();
    let rvs: Vec<Arc<Rendezvous>> = ["worker-a", "worker-b", "worker-c"]
        .iter()
        .map(|n| Arc::new(Rendezvous::bind_with("127.0.0.1:0", Some(tls(n))).unwrap()))
        .collect();
    let peers: Vec<String> = rvs.iter().map(|r| r.local_addr().to_string()).collect();
    let groups: Vec<TcpGroup> = (0..3)
        .map(|rank| {
            let (rv, peers) = (rvs[rank].clone(), peers.clone());
            std::thread::spawn(move || {
                rv.form(
                    "tls",
                    rank,
                    &peers,
                    Duration::from_secs(10),
                    Duration::from_secs(20),
                )
                .unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    // 1M floats per rank: the ring path; then a small direct one.
    let sums = on_all(groups, |rank, g| {
        let mut big: Vec<f32> = (0..1 << 20)
            .map(|i| (i % 97) as f32 + rank as f32)
            .collect();
        g.all_reduce_host(&mut big).unwrap();
        let mut small = vec![rank as f32 + 1.0; 16];
        g.all_reduce_host(&mut small).unwrap();
        (big[5], big[(1 << 20) - 1], small[0])
    });
    let last = ((1 << 20) - 1) % 97;
    for s in sums {
        assert_eq!(s, (15.0 + 3.0, (3 * last + 3) as f32, 6.0));
    }

    // Rank 1 dialling rank 0 with a coordinator's certificate, one of
    // another CA, or in plaintext: rank 0 never sees it join.
    let foreign = Tls::load(TlsFiles {
        ca: dir.path().join("ca.crt"),
        ..TlsFiles::in_dir(other.path(), "worker-x")
    })
    .unwrap();
    for (what, intruder) in [
        (
            "a coordinator",
            Rendezvous::bind_with("127.0.0.1:0", Some(tls("coordinator-1"))),
        ),
        (
            "another CA",
            Rendezvous::bind_with("127.0.0.1:0", Some(foreign)),
        ),
        ("plaintext", Rendezvous::bind("127.0.0.1:0")),
    ] {
        let intruder = intruder.unwrap();
        let rank0 = rvs[0].clone();
        let peers = vec![
            rank0.local_addr().to_string(),
            intruder.local_addr().to_string(),
        ];
        let p = peers.clone();
        let waits = std::thread::spawn(move || {
            rank0.form(
                "intruded",
                0,
                &p,
                Duration::from_millis(1500),
                Duration::from_secs(1),
            )
        });
        let joined = intruder.form(
            "intruded",
            1,
            &peers,
            Duration::from_millis(1500),
            Duration::from_secs(1),
        );
        let e = waits
            .join()
            .unwrap()
            .err()
            .unwrap_or_else(|| panic!("{what} joined"));
        assert!(e.to_string().contains("did not connect"), "{what}: {e}");
        assert!(joined.is_err(), "{what}: the intruder formed a group");
    }
}
