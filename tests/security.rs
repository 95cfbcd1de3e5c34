//! API keys, roles and tenant quotas (issue 25): every public RPC (taken
//! from the service descriptors) and HTTP route (from the router's table)
//! refuses a call without a key, admin RPCs refuse a user key; a tenant
//! over its tokens per minute is refused with a retry hint while another
//! is served; a revoked key is refused by every coordinator of a Raft group
//! within a second; the state, snapshots and logs hold hashes, never keys.

use std::time::{Duration, Instant};

use llmos_coordinator::auth::{AuthConfig, BootstrapKey};
use llmos_coordinator::http::Access;
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use llmos_tests::cluster::*;
use llmos_tests::group::*;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Code;

const ADMIN_KEY: &str = "bootstrap-admin-key-for-the-security-tests";

fn auth_on() -> AuthConfig {
    AuthConfig {
        required: true,
        bootstrap: Some(BootstrapKey::new(ADMIN_KEY).unwrap()),
        metrics_need_key: false,
    }
}

/// A coordinator with keys required, its gRPC and HTTP addresses.
async fn secured(config: llmos_coordinator::Config) -> (String, std::net::SocketAddr) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (g, h) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    tokio::spawn(async move {
        let http = llmos_coordinator::HttpListener {
            listener: http,
            max_body_bytes: 1 << 20,
        };
        if let Err(e) =
            llmos_coordinator::serve_with_http(grpc, Some(http), config, std::future::pending())
                .await
        {
            eprintln!("coordinator stopped: {e}");
        }
    });
    (format!("http://{g}"), h)
}

fn with_key<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// (service, method, server-streaming) of every method of the public
/// services, from the descriptors the server registers for reflection.
fn public_methods() -> Vec<(String, String, bool)> {
    methods_of(&["llmos.v1"])
}

/// The same for the services of `packages`.
fn methods_of(packages: &[&str]) -> Vec<(String, String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(llmos_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for f in set.file {
        if !packages.contains(&f.package()) {
            continue;
        }
        for s in &f.service {
            for m in &s.method {
                out.push((
                    format!("{}.{}", f.package(), s.name()),
                    m.name().to_string(),
                    m.server_streaming(),
                ));
            }
        }
    }
    out
}

/// Calls `/service/method` with an empty message (every field default)
/// and `key`; the status it ends with (OK when it answers).
async fn raw_call(
    ch: &Channel,
    service: &str,
    method: &str,
    streaming: bool,
    key: Option<&str>,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::try_from(format!("/{service}/{method}")).unwrap();
    let req = match key {
        Some(k) => with_key(k, ()),
        None => tonic::Request::new(()),
    };
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let call = async {
        if streaming {
            let mut s = grpc.server_streaming(req, path, codec).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        } else {
            grpc.unary(req, path, codec).await.map(|_| ())
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(())) => Code::Ok,
        Ok(Err(s)) => s.code(),
        Err(_) => panic!("{service}/{method} did not answer within 10 s"),
    }
}

/// One HTTP/1.1 exchange on loopback: (status, raw head, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key
        .map(|k| format!("authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("an HTTP answer within 60 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

/// Tokens streamed for `req` sent with `key`.
async fn generated(
    inference: &mut InferenceClient<Channel>,
    key: &str,
    req: api::GenerateRequest,
) -> usize {
    let mut stream = inference
        .generate(with_key(key, req))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.unwrap() {
        n += m.tokens.len();
    }
    n
}

/// Waits for a worker, then deploys SmolLM2 as `smol` (as admin).
async fn deploy_smol(admin: &mut AdminClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while admin
        .list_workers(with_key(ADMIN_KEY, api::ListWorkersRequest {}))
        .await
        .unwrap()
        .into_inner()
        .workers
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the worker did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin
        .deploy_model(with_key(
            ADMIN_KEY,
            api::DeployModelRequest {
                name: "smol".into(),
                source: "smollm2".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

async fn create_key(
    admin: &mut AdminClient<Channel>,
    tenant: &str,
    role: &str,
    limits: api::KeyLimits,
) -> api::CreateKeyResponse {
    admin
        .create_key(with_key(
            ADMIN_KEY,
            api::CreateKeyRequest {
                tenant: tenant.into(),
                role: role.into(),
                limits: Some(limits),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_rpc_and_route_needs_a_key_and_admin_calls_an_admin_key() {
    let (url, http_addr) = secured(llmos_coordinator::Config {
        auth: auth_on(),
        ..test_config()
    })
    .await;
    let ch = connect(&url, |c| c).await;
    let mut admin = AdminClient::new(ch.clone());
    let user = create_key(&mut admin, "acme", "user", Default::default())
        .await
        .key;
    let admin_key = create_key(&mut admin, "ops", "admin", Default::default())
        .await
        .key;

    let methods = public_methods();
    for (svc, m) in [
        ("llmos.v1.Inference", "Generate"),
        ("llmos.v1.Admin", "DeployModel"),
        ("llmos.v1.Admin", "CreateKey"),
    ] {
        assert!(
            methods.iter().any(|(s, n, _)| s == svc && n == m),
            "{svc}/{m} missing from the descriptors: {methods:?}"
        );
    }
    for (svc, m, streaming) in &methods {
        let admin_only = svc == "llmos.v1.Admin";
        assert_eq!(
            raw_call(&ch, svc, m, *streaming, None).await,
            Code::Unauthenticated,
            "{svc}/{m} without a key"
        );
        assert_eq!(
            raw_call(
                &ch,
                svc,
                m,
                *streaming,
                Some("llmos_0000000000000000_nonsense")
            )
            .await,
            Code::Unauthenticated,
            "{svc}/{m} with a made-up key"
        );
        let as_user = raw_call(&ch, svc, m, *streaming, Some(&user)).await;
        if admin_only {
            assert_eq!(as_user, Code::PermissionDenied, "{svc}/{m} with a user key");
        } else {
            assert!(
                !matches!(as_user, Code::Unauthenticated | Code::PermissionDenied),
                "{svc}/{m} with a user key: {as_user:?}"
            );
        }
        // An admin key passes (the empty request is then refused, or
        // answered, on its merits).
        let as_admin = raw_call(&ch, svc, m, *streaming, Some(&admin_key)).await;
        assert!(
            !matches!(as_admin, Code::Unauthenticated | Code::PermissionDenied),
            "{svc}/{m} with an admin key: {as_admin:?}"
        );
    }
    // Probes and reflection stay open.
    assert_eq!(
        raw_call(&ch, "grpc.health.v1.Health", "Check", false, None).await,
        Code::Ok
    );

    let routes = llmos_coordinator::http::route_table();
    assert!(routes.iter().any(|r| r.1 == "/v1/chat/completions"));
    for (method, path, access) in routes {
        let body = if method == "POST" { "{}" } else { "" };
        let (status, head, text) = http(http_addr, method, path, None, body).await;
        match access {
            Access::Key(_) => {
                assert_eq!(status, 401, "{method} {path} without a key: {text}");
                assert!(
                    head.to_ascii_lowercase()
                        .contains("www-authenticate: bearer"),
                    "{head}"
                );
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["type"], "authentication_error", "{text}");
                let (status, _, text) = http(http_addr, method, path, Some(&user), body).await;
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} with a user key: {status} {text}"
                );
                let (status, _, _) = http(http_addr, method, path, Some("llmos_x_y"), body).await;
                assert_eq!(status, 401, "{method} {path} with a made-up key");
            }
            Access::Open | Access::Metrics => {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} is open: {status} {text}"
                );
            }
        }
    }

    // Status reports that keys are required.
    let cp = admin
        .cluster_status(with_key(&admin_key, api::ClusterStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
        .control_plane
        .unwrap();
    assert_eq!(cp.auth, "required");
    assert_eq!(cp.internal_plane, "shared");
    // Listing shows ids, tenants and roles, never a key.
    let listed = admin
        .list_keys(with_key(ADMIN_KEY, api::ListKeysRequest {}))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 2);
    let shown = format!("{listed:?}");
    for k in [&user, &admin_key] {
        let secret = k.rsplit('_').next().unwrap();
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(listed
        .iter()
        .any(|k| k.tenant == "acme" && k.role == "user"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_is_refused_with_a_retry_hint_while_another_is_served_and_inputs_are_bounded(
) {
    let (url, http_addr) = secured(llmos_coordinator::Config {
        auth: auth_on(),
        ..test_config()
    })
    .await;
    start_worker(&url, "w0").await;
    let ch = connect(&url, |c| c).await;
    let mut admin = AdminClient::new(ch.clone());
    let mut inference = InferenceClient::new(ch.clone());
    deploy_smol(&mut admin).await;
    // 60 tokens a minute: 1 a second.
    let small = create_key(
        &mut admin,
        "small",
        "user",
        api::KeyLimits {
            tokens_per_minute: 60,
            ..Default::default()
        },
    )
    .await
    .key;
    let big = create_key(&mut admin, "big", "user", Default::default())
        .await
        .key;
    let prompt: Vec<u32> = (100..110).collect();
    // 10 prompt + 20 tokens: charged 30 of 60; the 20 are generated (EOS
    // ignored), so nothing comes back.
    assert_eq!(
        generated(&mut inference, &small, ids_request("smol", &prompt, 20)).await,
        20
    );
    let since_first = Instant::now();
    // The next 59 do not fit in the 30 left (plus a token a second since):
    // refused at once, with how long until they would.
    let refused = inference
        .generate(with_key(&small, ids_request("smol", &prompt, 49)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("60 tokens_per_minute"),
        "{}",
        refused.message()
    );
    let retry_ms: u64 = refused
        .metadata()
        .get("retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 29 missing at admission of the first, less a token a second since.
    let bound = 29_000u64.saturating_sub(since_first.elapsed().as_millis() as u64);
    assert!(
        (1..=bound).contains(&retry_ms),
        "{retry_ms} ms, at most {bound}"
    );
    // The other tenant is served meanwhile.
    assert_eq!(
        generated(&mut inference, &big, ids_request("smol", &prompt, 8)).await,
        8
    );
    // Over HTTP: 429 with Retry-After, the OpenAI error envelope.
    let body =
        serde_json::json!({"model": "smol", "prompt": [prompt], "max_tokens": 49}).to_string();
    let (status, head, text) =
        http(http_addr, "POST", "/v1/completions", Some(&small), &body).await;
    assert_eq!(status, 429, "{text}");
    let retry_after: u64 = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_string)
        })
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((1..=29).contains(&retry_after), "{head}");
    let (status, _, text) = http(http_addr, "POST", "/v1/completions", Some(&big), &body).await;
    assert_eq!(status, 200, "{text}");
    // More than a whole minute's tokens is a bad request, not a wait.
    let e = inference
        .generate(with_key(&small, ids_request("smol", &prompt, 60)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Limits on input, each named: stop sequences (count, length), the
    // size of a request message.
    let mut stops = ids_request("smol", &prompt, 4);
    stops.stopping.as_mut().unwrap().stop_sequences = (0..17).map(|i| format!("s{i}")).collect();
    let e = inference.generate(with_key(&big, stops)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("at most 16 stop sequences, got 17"),
        "{e:?}"
    );
    let body = serde_json::json!({"model": "smol", "prompt": "hi", "max_tokens": 2, "stop": ["x".repeat(300)]}).to_string();
    let (status, _, text) = http(http_addr, "POST", "/v1/completions", Some(&big), &body).await;
    assert_eq!(status, 400, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["param"], "stop", "{text}");
    assert!(text.contains("300 bytes; at most 256"), "{text}");
    let huge = api::GenerateRequest {
        model: "smol".into(),
        prompt: Some(api::generate_request::Prompt::Text("word ".repeat(2 << 20))),
        ..Default::default()
    };
    let e = inference.generate(with_key(&big, huge)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("limit"), "{e:?}");
    // max_concurrent: a second stream of the key is refused while the
    // first runs, and admitted once the first is dropped.
    let narrow = create_key(
        &mut admin,
        "narrow",
        "user",
        api::KeyLimits {
            max_concurrent: 1,
            ..Default::default()
        },
    )
    .await
    .key;
    let running = inference
        .generate(with_key(&narrow, ids_request("smol", &prompt, 200)))
        .await
        .unwrap()
        .into_inner();
    let e = inference
        .generate(with_key(&narrow, ids_request("smol", &prompt, 2)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_concurrent 1"), "{e:?}");
    drop(running);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match inference
            .generate(with_key(&narrow, ids_request("smol", &prompt, 2)))
            .await
        {
            Ok(s) => {
                drop(s);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "the slot of a dropped stream was not freed: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Over HTTP, more choices than the key may stream at once: 400 at once.
    let body =
        serde_json::json!({"model": "smol", "prompt": "hi", "max_tokens": 2, "n": 2}).to_string();
    let (status, _, text) = http(http_addr, "POST", "/v1/completions", Some(&narrow), &body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("max_concurrent"), "{text}");
    // The refusals and the tokens are counted per tenant.
    let (_, _, metrics) = http(http_addr, "GET", "/metrics", None, "").await;
    assert!(
        metrics.contains(
            r#"llmos_tenant_refusals_total{reason="tokens_per_minute",tenant="small"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"llmos_tenant_tokens_total{kind="generated",tenant="small"} 20"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_by_every_coordinator_within_a_second_and_no_key_is_stored() {
    // The bootstrap key's file lies outside the directories searched below.
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("admin.key");
    std::fs::write(&key_file, ADMIN_KEY).unwrap();
    // Raft peers on the public ports (this test is about keys, not planes).
    let extra = vec![
        format!("--admin-key-file={}", key_file.display()),
        "--shared-planes".to_string(),
    ];
    // Key creations and revocations are logged: the logs are checked too.
    let group = Group::founded_logging(3, TICK_MS, &extra, "info");
    let urls: Vec<String> = group.nodes.values().map(|n| n.url()).collect();
    // Writes reach the leader through any replica, once one is elected.
    let mut admin = admin(&urls[0]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(s) = admin
        .list_keys(with_key(ADMIN_KEY, api::ListKeysRequest {}))
        .await
    {
        assert!(Instant::now() < deadline, "no quorum: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keys made with the CLI, as an operator would.
    let cli = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("llmos");
    let out = std::process::Command::new(&cli)
        .args([
            "--coordinator",
            &urls.join(","),
            "keys",
            "create",
            "--tenant",
            "acme",
        ])
        .env("LLMOS_API_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("llmos_{id}_")), "{made}");
    // Enough further keys that a snapshot (every 40 entries) holds them.
    let mut secrets = vec![key.clone()];
    for i in 0..45 {
        let r = admin
            .create_key(with_key(
                ADMIN_KEY,
                api::CreateKeyRequest {
                    tenant: format!("t{i}"),
                    role: "user".into(),
                    limits: None,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        secrets.push(r.key);
    }
    // Every replica serves the key.
    let mut clients = Vec::new();
    for u in &urls {
        let c = connect(u, InferenceClient::new).await;
        clients.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in clients.iter_mut() {
        loop {
            match c
                .list_models(with_key(&key, api::ListModelsRequest {}))
                .await
            {
                Ok(_) => break,
                Err(s) => assert!(Instant::now() < deadline, "{s:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Revoked through one replica: each refuses it within a second.
    let revoked_at = Instant::now();
    admin
        .revoke_key(with_key(
            ADMIN_KEY,
            api::RevokeKeyRequest { id: id.clone() },
        ))
        .await
        .unwrap();
    for (c, u) in clients.iter_mut().zip(&urls) {
        loop {
            match c
                .list_models(with_key(&key, api::ListModelsRequest {}))
                .await
            {
                Err(s) if s.code() == Code::Unauthenticated => break,
                r => assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "{u} still serves the revoked key after {:?}: {r:?}",
                    revoked_at.elapsed()
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "{u}: refused {:?} after the revocation",
            revoked_at.elapsed()
        );
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // Something not an id (a mistyped secret, say) never reaches the log.
    let e = admin
        .revoke_key(with_key(
            ADMIN_KEY,
            api::RevokeKeyRequest {
                id: "not-an-id-but-maybe-a-secret".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(!e.message().contains("maybe-a-secret"), "{e:?}");
    secrets.push("llmos_0_not-an-id-but-maybe-a-secret".into());
    // Revoking again: NOT_FOUND naming the key.
    let again = admin
        .revoke_key(with_key(
            ADMIN_KEY,
            api::RevokeKeyRequest { id: id.clone() },
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    // Stop the group: its data (log, snapshots) and logs on disk.
    let mut group = group;
    for n in group.nodes.values_mut() {
        n.kill9();
    }
    let mut files = Vec::new();
    collect_files(group._root.path(), &mut files);
    let mut bytes = 0usize;
    let mut saw_hash = false;
    let mut saw_snapshot = false;
    let mut secret_parts: Vec<&str> = secrets
        .iter()
        .map(|s| s.rsplit('_').next().unwrap())
        .collect();
    secret_parts.push(ADMIN_KEY);
    for f in &files {
        let data = std::fs::read(f).unwrap();
        bytes += data.len();
        for secret in &secret_parts {
            assert!(
                !contains(&data, secret.as_bytes()),
                "{} holds a key's secret",
                f.display()
            );
        }
        if contains(&data, b"\"hash\"") {
            saw_hash = true;
            // The keys are in a snapshot too (45 keys outlast one).
            saw_snapshot |= f.to_string_lossy().contains("snap");
        }
    }
    assert!(
        saw_hash,
        "no stored key hash found in {} files ({bytes} bytes): the check read nothing",
        files.len()
    );
    assert!(saw_snapshot, "no snapshot holding keys among {files:?}");
    eprintln!(
        "{} files, {bytes} bytes, a snapshot among them: no secret",
        files.len()
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_plane_listens_apart_from_the_public_one() {
    let config = llmos_coordinator::Config {
        auth: auth_on(),
        ..test_config()
    };
    let (public_url, internal_url) = start_planes(config).await;
    let i = internal_url.strip_prefix("http://").unwrap().to_string();
    let public_ch = connect(&public_url, |c| c).await;
    let internal_ch = connect(&internal_url, |c| c).await;
    // Workers and Raft peers: the internal port only.
    let internal_methods = methods_of(&["llmos.worker.v1", "llmos.coordinator.v1"]);
    let registry: Vec<_> = internal_methods
        .iter()
        .filter(|(s, _, _)| s == "llmos.worker.v1.Registry" || s == "llmos.coordinator.v1.Peer")
        .collect();
    assert!(
        registry.iter().any(|(_, m, _)| m == "Register"),
        "{registry:?}"
    );
    assert!(registry.iter().any(|(_, m, _)| m == "Raft"), "{registry:?}");
    for (svc, m, streaming) in registry {
        assert_eq!(
            raw_call(&public_ch, svc, m, *streaming, Some(ADMIN_KEY)).await,
            Code::Unimplemented,
            "{svc}/{m} on the public port"
        );
    }
    // Clients: the public port only.
    for (svc, m, streaming) in public_methods() {
        assert_eq!(
            raw_call(&internal_ch, &svc, &m, streaming, Some(ADMIN_KEY)).await,
            Code::Unimplemented,
            "{svc}/{m} on the internal port"
        );
    }
    for ch in [&public_ch, &internal_ch] {
        assert_eq!(
            raw_call(ch, "grpc.health.v1.Health", "Check", false, None).await,
            Code::Ok
        );
    }
    // Status says where the internal plane is.
    let cp = AdminClient::new(public_ch.clone())
        .cluster_status(with_key(ADMIN_KEY, api::ClusterStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
        .control_plane
        .unwrap();
    assert_eq!(cp.internal_plane, i);
    // No certificates: status says the internal plane is plaintext.
    assert!(
        cp.internal_tls.starts_with("plaintext (--insecure)") && cp.internal_tls.contains("NCCL"),
        "{}",
        cp.internal_tls
    );
    // A worker registered on the internal port serves what clients ask on
    // the public one.
    start_worker(&internal_url, "w0").await;
    let mut admin = AdminClient::new(public_ch.clone());
    deploy_smol(&mut admin).await;
    let mut inference = InferenceClient::new(public_ch);
    let prompt: Vec<u32> = (100..110).collect();
    assert_eq!(
        generated(&mut inference, ADMIN_KEY, ids_request("smol", &prompt, 4)).await,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_proposal_without_entries_is_refused_and_keys_need_their_own_internal_port() {
    // raft-rs panics on an empty proposal: the Peer service refuses it, and
    // the coordinator goes on serving.
    let (url, _) = secured(llmos_coordinator::Config {
        auth: auth_on(),
        ..test_config()
    })
    .await;
    let ch = connect(&url, |c| c).await;
    let mut peer = llmos_proto::coordinator::v1::peer_client::PeerClient::new(ch.clone());
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
    m.to = 1;
    m.from = 1;
    let e = peer
        .raft(llmos_proto::coordinator::v1::RaftRequest {
            cluster_id: "llmos".into(),
            from_id: 0,
            from_address: String::new(),
            messages: vec![protobuf::Message::write_to_bytes(&m).unwrap()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut admin = AdminClient::new(ch);
    create_key(&mut admin, "after", "user", Default::default()).await;
    // Another cluster's batch is refused without learning this one's id.
    let e = peer
        .raft(llmos_proto::coordinator::v1::RaftRequest {
            cluster_id: "guess".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!e.message().contains("\"llmos\""), "{e:?}");
    // The stream replicas keep open checks each batch alike: an empty
    // proposal after a well-formed empty batch ends it, naming why, and
    // so does another cluster's batch.
    for bad in [
        llmos_proto::coordinator::v1::RaftRequest {
            cluster_id: "llmos".into(),
            messages: vec![protobuf::Message::write_to_bytes(&m).unwrap()],
            ..Default::default()
        },
        llmos_proto::coordinator::v1::RaftRequest {
            cluster_id: "guess".into(),
            ..Default::default()
        },
    ] {
        let fine = llmos_proto::coordinator::v1::RaftRequest {
            cluster_id: "llmos".into(),
            ..Default::default()
        };
        let foreign = bad.cluster_id != "llmos";
        let e = peer
            .raft_stream(tokio_stream::iter([fine, bad]))
            .await
            .unwrap_err();
        if foreign {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        } else {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("without entries"), "{e:?}");
        }
    }

    // The binary with keys on (its default) and both planes on one port
    // refuses to start, naming the way out. Boolean flags read from the
    // environment take 1/0 (and yes/no, true/false) as an operator writes
    // them: LLMOS_INSECURE=1 with LLMOS_NO_AUTH=0 reaches the same refusal,
    // not a parse error.
    let flag = [("--insecure", None), ("", Some(("1", "0")))];
    for (arg, env) in flag {
        let mut cmd = std::process::Command::new(coordinator_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "off"])
            .env("LLMOS_LOG", "error")
            .env_remove("LLMOS_NO_AUTH");
        match env {
            None => {
                cmd.arg(arg);
            }
            Some((insecure, no_auth)) => {
                cmd.env("LLMOS_INSECURE", insecure)
                    .env("LLMOS_NO_AUTH", no_auth);
            }
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--internal-listen") && err.contains("--no-auth"),
            "{err}"
        );
    }
}
