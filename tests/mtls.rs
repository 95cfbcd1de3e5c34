//! Mutual TLS on the internal plane (issue 25): a coordinator and workers
//! with certificates of one CA serve a model; a client without a
//! certificate, with one of another CA, or with another role's identity
//! is refused by the registry, the Raft peer service, the workers' API;
//! a certificate bound to an id speaks for that id only, at hosts it
//! names; three coordinator processes form a Raft group over mutual TLS;
//! `llmos status` reports the plane's protection and NCCL's lack of it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use llmos_proto::coordinator::v1 as peer;
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::worker::v1 as wk;
use llmos_tests::cluster::*;
use llmos_tests::group::*;
use llmos_tls::dev::{self, Holder};
use llmos_tls::{Role, Tls, TlsFiles};
use llmos_worker::server::register::Registration;
use llmos_worker::server::{serve_registered, HostHandle};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

fn certs(dir: &Path, holders: &[Holder]) {
    let hosts: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    dev::init(dir, holders, &hosts).unwrap();
}

fn tls(dir: &Path, name: &str) -> Arc<Tls> {
    Tls::load(TlsFiles::in_dir(dir, name)).unwrap()
}

/// A channel to `url` presenting `tls`'s certificate, expecting a server
/// of role `server`; None: plaintext.
async fn channel(url: &str, tls: Option<&Arc<Tls>>, server: Role) -> Result<Channel, String> {
    let e = Endpoint::from_shared(url.to_string()).unwrap();
    llmos_tls::client::connect(e, tls, server, Duration::from_secs(5))
        .await
        .map_err(|e| llmos_tls::error_chain(&e))
}

fn register(id: &str, address: &str) -> wk::RegisterRequest {
    wk::RegisterRequest {
        worker_id: id.into(),
        address: address.into(),
        device: "cpu".into(),
        ..Default::default()
    }
}

fn raft_batch(from: u64) -> peer::RaftRequest {
    peer::RaftRequest {
        cluster_id: "llmos".into(),
        from_id: from,
        from_address: "http://127.0.0.1:1".into(),
        messages: vec![],
    }
}

/// A worker in this process registered with `coordinator` over mutual TLS
/// as `id` (its certificate `worker-<id>` in `dir`); its API's address.
async fn tls_worker(coordinator: &str, dir: &Path, id: &str) -> String {
    let t = tls(dir, &format!("worker-{id}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rv = Arc::new(
        llmos_worker::comm::Rendezvous::bind_with("127.0.0.1:0", Some(t.clone())).unwrap(),
    );
    let registration = Registration {
        coordinator: coordinator.into(),
        tls: Some(t),
        worker_id: id.into(),
        address: format!("http://{addr}"),
        device: "cpu".into(),
        collective_address: rv.local_addr().to_string(),
        ..Default::default()
    };
    tokio::spawn(serve_registered(
        listener,
        HostHandle::spawn_with(Some(rv), tch::Device::Cpu),
        Some(registration),
        std::future::pending(),
    ));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certified_roles_reach_the_internal_plane() {
    let ca = tempfile::tempdir().unwrap();
    certs(
        ca.path(),
        &[
            Holder::bound(Role::Coordinator, "1"),
            Holder::bound(Role::Coordinator, "2"),
            Holder::bound(Role::Worker, "w0"),
            Holder::bound(Role::Worker, "w1"),
        ],
    );
    let other = tempfile::tempdir().unwrap();
    certs(other.path(), &[Holder::bound(Role::Worker, "w1")]);
    // A certificate of the other CA, presented by a client that trusts
    // this cluster's CA (so that the server's refusal is what is seen).
    let foreign = Tls::load(TlsFiles {
        ca: ca.path().join("ca.crt"),
        ..TlsFiles::in_dir(other.path(), "worker-w1")
    })
    .unwrap();

    let (public_url, internal_url) = start_planes(llmos_coordinator::Config {
        tls: Some(tls(ca.path(), "coordinator-1")),
        ..test_config()
    })
    .await;

    // A worker with its certificate registers, loads and serves.
    let w0 = tls_worker(&internal_url, ca.path(), "w0").await;
    let mut admin = connect(&public_url, AdminClient::new).await;
    wait_for_workers(&mut admin, 1).await;
    admin
        .deploy_model(api::DeployModelRequest {
            name: "smol".into(),
            source: "smollm2".into(),
            wait: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut inference = connect(
        &public_url,
        llmos_proto::v1::inference_client::InferenceClient::new,
    )
    .await;
    let prompt: Vec<u32> = (100..110).collect();
    let got = generated_ids(&mut inference, ids_request("smol", &prompt, 4)).await;
    assert_eq!(got.len(), 4);

    // Status names the protection and what it does not cover.
    let cp = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .control_plane
        .unwrap();
    assert!(
        cp.internal_tls.contains("mutual TLS")
            && cp.internal_tls.contains("coordinator 1")
            && cp.internal_tls.contains("NCCL"),
        "{}",
        cp.internal_tls
    );

    // No certificate: plaintext gets no answer from the TLS port.
    let plain = channel(&internal_url, None, Role::Coordinator).await;
    if let Ok(ch) = plain {
        let r = wk::registry_client::RegistryClient::new(ch)
            .register(register("w1", "http://127.0.0.1:1"))
            .await;
        assert!(r.is_err(), "a plaintext client registered: {r:?}");
    }
    // A certificate of another CA: the handshake fails.
    let e = match channel(&internal_url, Some(&foreign), Role::Coordinator).await {
        Err(e) => e,
        Ok(ch) => wk::registry_client::RegistryClient::new(ch)
            .register(register("w1", "http://127.0.0.1:1"))
            .await
            .expect_err("a certificate of another CA registered")
            .to_string(),
    };
    assert!(!e.is_empty());

    // A coordinator's identity cannot register as a worker.
    let c2 = tls(ca.path(), "coordinator-2");
    let ch = channel(&internal_url, Some(&c2), Role::Coordinator)
        .await
        .unwrap();
    let e = wk::registry_client::RegistryClient::new(ch)
        .register(register("w1", "http://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A worker's identity cannot send Raft messages, and a coordinator's
    // cannot claim another node.
    let w1 = tls(ca.path(), "worker-w1");
    let ch = channel(&internal_url, Some(&w1), Role::Coordinator)
        .await
        .unwrap();
    let e = peer::peer_client::PeerClient::new(ch.clone())
        .raft(raft_batch(2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("worker w1"), "{e:?}");
    // Nor on the stream replicas keep open.
    let e = peer::peer_client::PeerClient::new(ch.clone())
        .raft_stream(tokio_stream::iter([raft_batch(2)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let c2ch = channel(&internal_url, Some(&c2), Role::Coordinator)
        .await
        .unwrap();
    let e = peer::peer_client::PeerClient::new(c2ch.clone())
        .raft(raft_batch(3))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = peer::peer_client::PeerClient::new(c2ch.clone())
        .raft_stream(tokio_stream::iter([raft_batch(3)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // ... nor be answered at a host its certificate does not name.
    let mut b = raft_batch(2);
    b.from_address = "http://127.0.0.2:1".into();
    let e = peer::peer_client::PeerClient::new(c2ch)
        .raft(b)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A worker's certificate speaks for its own id only, at its hosts.
    let mut reg = wk::registry_client::RegistryClient::new(ch);
    let e = reg
        .register(register("w0", "http://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = reg
        .register(register("w1", "http://127.0.0.2:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = reg
        .heartbeat(wk::HeartbeatRequest {
            worker_id: "w0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The worker's own API: no plaintext, no foreign CA; a worker may
    // step but not load; a coordinator may load but not step.
    if let Ok(ch) = channel(&w0, None, Role::Worker).await {
        let r = wk::worker_client::WorkerClient::new(ch)
            .stats(wk::StatsRequest {})
            .await;
        assert!(r.is_err(), "a plaintext client read a worker's stats");
    }
    assert!(
        channel(&w0, Some(&foreign), Role::Worker).await.is_err() || {
            let ch = channel(&w0, Some(&foreign), Role::Worker).await.unwrap();
            wk::worker_client::WorkerClient::new(ch)
                .stats(wk::StatsRequest {})
                .await
                .is_err()
        }
    );
    let as_worker = channel(&w0, Some(&w1), Role::Worker).await.unwrap();
    let e = wk::worker_client::WorkerClient::new(as_worker)
        .unload_shard(wk::UnloadShardRequest {
            model: "smol".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let as_coordinator = channel(&w0, Some(&c2), Role::Worker).await.unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel::<wk::StepRequest>(1);
    let e = wk::worker_client::WorkerClient::new(as_coordinator.clone())
        .step(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    wk::worker_client::WorkerClient::new(as_coordinator)
        .stats(wk::StatsRequest {})
        .await
        .unwrap();
    // A client expecting a coordinator does not take the worker's server.
    assert!(channel(&w0, Some(&c2), Role::Coordinator).await.is_err());
    // The model still serves.
    let got = generated_ids(&mut inference, ids_request("smol", &prompt, 4)).await;
    assert_eq!(got.len(), 4);
}

/// Three coordinator processes, each with a certificate bound to its node
/// id, elect a leader and replicate a write over mutual TLS; the binary
/// refuses to start with neither certificates nor --insecure, or with a
/// worker's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_replicate_over_mutual_tls() {
    let root = tempfile::tempdir().unwrap();
    let ca = root.path().join("certs");
    certs(
        &ca,
        &[
            Holder::bound(Role::Coordinator, "1"),
            Holder::bound(Role::Coordinator, "2"),
            Holder::bound(Role::Coordinator, "3"),
            Holder::bound(Role::Worker, "w"),
        ],
    );
    let flags = |name: &str| -> Vec<String> {
        let f = TlsFiles::in_dir(&ca, name);
        vec![
            "--tls-cert".into(),
            f.cert.display().to_string(),
            "--tls-key".into(),
            f.key.display().to_string(),
            "--tls-ca".into(),
            f.ca.display().to_string(),
        ]
    };
    let internal: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = (1..=3)
        .map(|i| format!("{i}=http://127.0.0.1:{}", internal[i - 1]))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for i in 1..=3u64 {
        let extra = [
            vec![
                "--peers".to_string(),
                peers.clone(),
                "--internal-listen".into(),
                format!("127.0.0.1:{}", internal[i as usize - 1]),
            ],
            flags(&format!("coordinator-{i}")),
        ]
        .concat();
        let mut n = node(root.path(), i, free_port(), &extra);
        assert!(!n.args.contains(&"--insecure".to_string()));
        n.start();
        nodes.push(n);
    }
    let urls: Vec<String> = nodes.iter().map(Node::url).collect();
    let lead = leader(&urls, Duration::from_secs(30)).await;
    assert!(lead > 0);
    let mut a = admin(&urls[0]).await;
    a.set_setting(api::SetSettingRequest {
        key: "generate.default_max_new_tokens".into(),
        value: "77".into(),
    })
    .await
    .unwrap();
    for u in &urls {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = admin(u)
                .await
                .list_settings(api::ListSettingsRequest {})
                .await
                .unwrap()
                .into_inner();
            if s.settings.get("generate.default_max_new_tokens") == Some(&"77".to_string()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{u} never applied the write"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let cp = control_plane(&urls[1]).await.unwrap();
    assert!(
        cp.internal_tls.contains("coordinator 2"),
        "{}",
        cp.internal_tls
    );

    // Neither certificates nor --insecure; a worker's certificate.
    let run = |extra: &[String]| {
        let out = std::process::Command::new(coordinator_bin())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "off",
                "--no-auth",
            ])
            .args(["--internal-listen", "127.0.0.1:0"])
            .args(extra)
            .env("LLMOS_LOG", "error")
            .env_remove("LLMOS_INSECURE")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
    let err = run(&flags("worker-w"));
    assert!(err.contains("not of a coordinator"), "{err}");
}
