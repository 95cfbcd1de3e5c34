use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use super::dev::{self, Holder};
use super::*;

fn holder(role: Role, id: Option<&str>) -> Holder {
    Holder {
        role,
        id: id.map(String::from),
    }
}

fn make(dir: &Path, holders: &[Holder]) -> Vec<Arc<Tls>> {
    dev::init(dir, holders, &["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .into_iter()
        .map(|f| Tls::load(f).unwrap())
        .collect()
}

#[test]
fn identities_come_from_the_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(
        dir.path(),
        &[
            holder(Role::Coordinator, Some("2")),
            holder(Role::Worker, None),
        ],
    );
    let c = t[0].identity();
    assert_eq!(c.role, Role::Coordinator);
    assert_eq!(c.id.as_deref(), Some("2"));
    assert!(c.names_host("127.0.0.1") && c.names_host("localhost"));
    assert!(!c.names_host("10.0.0.1"));
    let w = t[1].identity();
    assert_eq!((w.role, w.id), (Role::Worker, None));
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    dev::init(dir.path(), &[holder(Role::Worker, None)], &[]).unwrap();
    let mut f = TlsFiles::in_dir(dir.path(), "worker");
    f.key = dir.path().join("missing.key");
    let e = Tls::load(f.clone()).unwrap_err().to_string();
    assert!(e.contains("missing.key"), "{e}");
    std::fs::write(dir.path().join("junk.crt"), "not pem").unwrap();
    f.key = TlsFiles::in_dir(dir.path(), "worker").key;
    f.cert = dir.path().join("junk.crt");
    let e = Tls::load(f).unwrap_err().to_string();
    assert!(e.contains("junk.crt"), "{e}");
}

type Side = std::io::Result<(blocking::Reader, blocking::Writer, Identity)>;

/// A server thread accepting one link; returns what the client's
/// handshake and the server's saw.
fn pair(server: Arc<Tls>, client: Arc<Tls>, expect: Role) -> (Side, Side) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let s = std::thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        blocking::accept(&server, sock)
    });
    let c = blocking::connect(&client, TcpStream::connect(addr).unwrap(), expect);
    (c, s.join().unwrap())
}

#[test]
fn split_links_carry_large_buffers_both_ways_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(
        dir.path(),
        &[
            holder(Role::Worker, Some("a")),
            holder(Role::Worker, Some("b")),
        ],
    );
    let (c, s) = pair(t[0].clone(), t[1].clone(), Role::Worker);
    let (mut cr, mut cw, cid) = c.unwrap();
    let (mut sr, mut sw, sid) = s.unwrap();
    assert_eq!(cid.id.as_deref(), Some("a"));
    assert_eq!(sid.id.as_deref(), Some("b"));
    // 8 MiB each way, both sides writing before reading: more than the
    // sockets buffer, so a writer holding the connection across a
    // blocked write would deadlock.
    let n = 8 << 20;
    let a: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..n).map(|i| (i % 241) as u8).collect();
    let (a2, b2) = (a.clone(), b.clone());
    let w1 = std::thread::spawn(move || {
        cw.write_all(&a2).unwrap();
        cw.shutdown().unwrap();
    });
    let w2 = std::thread::spawn(move || {
        sw.write_all(&b2).unwrap();
        sw.shutdown().unwrap();
    });
    let mut got_b = Vec::new();
    let mut got_a = Vec::new();
    let r = std::thread::spawn(move || {
        sr.read_to_end(&mut got_a).unwrap();
        got_a
    });
    cr.read_to_end(&mut got_b).unwrap();
    let got_a = r.join().unwrap();
    w1.join().unwrap();
    w2.join().unwrap();
    assert!(got_a == a, "server read {} bytes", got_a.len());
    assert!(got_b == b, "client read {} bytes", got_b.len());
}

#[test]
fn a_server_of_another_role_or_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(
        dir.path(),
        &[
            holder(Role::Coordinator, Some("1")),
            holder(Role::Worker, None),
        ],
    );
    // A worker expecting a coordinator reaches a worker.
    let (c, _) = pair(t[1].clone(), t[1].clone(), Role::Coordinator);
    let e = c.err().expect("refused").to_string();
    assert!(
        e.contains("coordinator.llmos") || e.contains("NotValidForName"),
        "{e}"
    );
    // A certificate of another CA: refused by the server.
    let other = tempfile::tempdir().unwrap();
    let o = make(other.path(), &[holder(Role::Worker, None)]);
    let (c, s) = pair(t[1].clone(), o[0].clone(), Role::Worker);
    assert!(c.is_err() || s.is_err());
    assert!(
        s.is_err(),
        "the server accepted a certificate of another CA"
    );
}

#[test]
fn a_plaintext_client_gets_nothing_from_a_tls_server() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(dir.path(), &[holder(Role::Worker, None)]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let tls = t[0].clone();
    let s = std::thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        blocking::accept(&tls, sock).map(|_| ())
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"LLMOSCL1 hello in plaintext").unwrap();
    assert!(s.join().unwrap().is_err());
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    assert!(!buf.windows(8).any(|w| w == b"LLMOSCL1"));
}

#[test]
fn changed_files_are_read_again_and_bad_ones_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(dir.path(), &[holder(Role::Worker, Some("old"))]);
    assert_eq!(t[0].identity().id.as_deref(), Some("old"));
    // Rotate: a new CA and certificate written over the same files.
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));
    let again = tempfile::tempdir().unwrap();
    dev::init(again.path(), &[holder(Role::Worker, Some("new"))], &[]).unwrap();
    for f in ["ca.crt", "worker-new.crt", "worker-new.key"] {
        let to = match f {
            "ca.crt" => "ca.crt",
            "worker-new.crt" => "worker-old.crt",
            _ => "worker-old.key",
        };
        std::fs::copy(again.path().join(f), dir.path().join(to)).unwrap();
    }
    assert_eq!(t[0].identity().id.as_deref(), Some("new"));
    // A broken rotation keeps what was in force.
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));
    std::fs::write(dir.path().join("worker-old.key"), "half written").unwrap();
    assert_eq!(t[0].identity().id.as_deref(), Some("new"));
}

#[tokio::test]
async fn grpc_channels_check_the_server_role() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(
        dir.path(),
        &[
            holder(Role::Coordinator, Some("1")),
            holder(Role::Worker, Some("w")),
        ],
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut incoming = server::incoming(l, t[0].clone());
    let uri = format!("http://{addr}");
    let got = client::probe(&uri, &t[1], Role::Coordinator, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.id.as_deref(), Some("1"));
    use tokio_stream::StreamExt;
    let conn = incoming.next().await.unwrap().unwrap();
    use tonic::transport::server::Connected;
    assert_eq!(conn.connect_info().identity.id.as_deref(), Some("w"));
    // Expecting a worker there fails.
    let e = client::probe(&uri, &t[1], Role::Worker, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("worker.llmos") || e.to_string().contains("NotValidForName"),
        "{e}"
    );
}
