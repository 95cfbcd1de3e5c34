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
    let t = make(dir.path(), &[holder(Role::Worker, Some("w"))]);
    let server = t[0].clone();
    // Clients of the old CA and of the next one.
    let old_client = tempfile::tempdir().unwrap();
    let next = tempfile::tempdir().unwrap();
    for d in [&old_client, &next] {
        dev::init(d.path(), &[holder(Role::Worker, Some("w"))], &[]).unwrap();
    }
    std::fs::copy(dir.path().join("ca.crt"), old_client.path().join("ca.crt")).unwrap();
    let old_client = Tls::load(TlsFiles::in_dir(old_client.path(), "worker-w")).unwrap();
    // The server's files replaced by the next CA's: new connections use
    // them (a client trusting only the old CA is refused, one of the next
    // CA is served), with no restart.
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));
    for (from, to) in [
        ("ca.crt", "ca.crt"),
        ("worker-w.crt", "worker-w.crt"),
        ("worker-w.key", "worker-w.key"),
    ] {
        std::fs::copy(next.path().join(from), dir.path().join(to)).unwrap();
    }
    let next_client = Tls::load(TlsFiles::in_dir(next.path(), "worker-w")).unwrap();
    let (c, s) = pair(server.clone(), old_client, Role::Worker);
    assert!(c.is_err() && s.is_err(), "the old CA's client was served");
    let (c, s) = pair(server.clone(), next_client.clone(), Role::Worker);
    assert!(
        c.is_ok() && s.is_ok(),
        "the rotated server refused its new CA's client"
    );
    // Files of another identity, or half written: the previous set stays.
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));
    let other = tempfile::tempdir().unwrap();
    dev::init(other.path(), &[holder(Role::Worker, Some("x"))], &[]).unwrap();
    for (from, to) in [
        ("ca.crt", "ca.crt"),
        ("worker-x.crt", "worker-w.crt"),
        ("worker-x.key", "worker-w.key"),
    ] {
        std::fs::copy(other.path().join(from), dir.path().join(to)).unwrap();
    }
    assert_eq!(server.identity().id.as_deref(), Some("w"));
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));
    std::fs::write(dir.path().join("worker-w.key"), "half written").unwrap();
    assert_eq!(server.identity().id.as_deref(), Some("w"));
    let (c, s) = pair(server, next_client, Role::Worker);
    assert!(
        c.is_ok() && s.is_ok(),
        "a bad rotation took the server down"
    );
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

/// A client of `pair`'s kind driven by hand: handshaken with `tls`'s
/// link configuration, `early` queued before the handshake (rustls sends
/// it right behind its Finished, in the same flight).
fn raw_client(
    tls: &Tls,
    addr: std::net::SocketAddr,
    early: &[u8],
) -> (rustls::ClientConnection, TcpStream) {
    let mut sock = TcpStream::connect(addr).unwrap();
    let mut c = rustls::ClientConnection::new(
        tls.current().link_client.clone(),
        Role::Worker.server_name(),
    )
    .unwrap();
    c.writer().write_all(early).unwrap();
    while c.is_handshaking() {
        c.complete_io(&mut sock).unwrap();
    }
    while c.wants_write() {
        c.write_tls(&mut sock).unwrap();
    }
    (c, sock)
}

fn server_of(
    tls: Arc<Tls>,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<blocking::Reader>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        let (r, w, _) = blocking::accept(&tls, sock).unwrap();
        drop(w);
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r
    });
    (addr, h)
}

#[test]
fn data_sent_right_behind_the_handshake_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(dir.path(), &[holder(Role::Worker, Some("a"))]);
    let (addr, server) = server_of(t[0].clone());
    let (_c, _sock) = raw_client(&t[0], addr, b"hello, rank 0");
    let mut r = server.join().unwrap();
    let mut got = [0u8; 13];
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello, rank 0");
}

#[test]
fn bytes_after_a_close_notify_end_the_stream_and_a_cut_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let t = make(dir.path(), &[holder(Role::Worker, Some("a"))]);
    // Data, close_notify and junk in one write: the data, then a clean end
    // (no spin on what follows the close_notify).
    let (addr, server) = server_of(t[0].clone());
    let (mut c, mut sock) = raw_client(&t[0], addr, b"");
    let mut r = server.join().unwrap();
    c.writer().write_all(b"bye").unwrap();
    c.send_close_notify();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out.extend_from_slice(b"junk after the end");
    sock.write_all(&out).unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    // The socket closing without a close_notify: cut off, not finished.
    let (addr, server) = server_of(t[0].clone());
    let (mut c, mut sock) = raw_client(&t[0], addr, b"");
    let mut r = server.join().unwrap();
    c.writer().write_all(b"half").unwrap();
    c.write_tls(&mut sock).unwrap();
    // A FIN with no close_notify before it (dropping the socket could
    // reset it instead: the server's tickets are unread).
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let e = r.read_to_end(&mut got).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(got, b"half");
}
