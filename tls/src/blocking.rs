//! Mutual TLS on std sockets, for the collectives' links: a handshake,
//! then a stream split into a [`Reader`] and a [`Writer`] that two threads
//! use at once.
//!
//! A rustls connection is one state machine for both directions, so the
//! halves share it under a lock held only to hand it bytes (never across
//! a socket read or write). All TLS output leaves through the writer:
//! it writes, in the order they were produced, the records of the data it
//! is given and anything the reader's processing queued (a key update's
//! answer), under its own lock; the reader only reads the socket and
//! decrypts. So a peer that stops reading blocks only the writer, and two
//! ranks sending large buffers to each other cannot deadlock.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::{peer_identity, Identity, Role, Tls, HANDSHAKE_TIMEOUT};

/// Plaintext written per record batch (bounds what one lock hold encrypts).
const CHUNK: usize = 256 << 10;

type Shared = Arc<Mutex<rustls::Connection>>;

fn handshake(
    mut conn: rustls::Connection,
    mut sock: TcpStream,
) -> std::io::Result<(Reader, Writer, Identity)> {
    // One deadline for the whole handshake (a peer dripping a byte now
    // and then does not hold this thread for longer).
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
            ));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        conn.complete_io(&mut sock)?;
    }
    // Anything the handshake left to send (a TLS 1.3 server's tickets).
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    let identity = peer_identity(conn.peer_certificates()).map_err(std::io::Error::other)?;
    conn.set_buffer_limit(None);
    let shared: Shared = Arc::new(Mutex::new(conn));
    let mut reader = Reader {
        conn: shared.clone(),
        sock: sock.try_clone()?,
        plain: VecDeque::new(),
        raw: vec![0u8; 64 << 10],
        eof: None,
    };
    // Records that came in the handshake's last read (the peer's first
    // data, sent right behind its Finished) were decrypted by it already.
    reader.take_plaintext(&mut shared.lock().unwrap_or_else(|e| e.into_inner()))?;
    let writer = Writer { conn: shared, sock };
    Ok((reader, writer, identity))
}

/// Completes the server side of a handshake on an accepted socket; the
/// client must present a certificate of the CA (its identity is
/// returned for the caller's checks).
pub fn accept(tls: &Tls, sock: TcpStream) -> std::io::Result<(Reader, Writer, Identity)> {
    let conn = rustls::ServerConnection::new(tls.current().link_server.clone())
        .map_err(std::io::Error::other)?;
    handshake(conn.into(), sock)
}

/// Completes the client side on a connected socket; the server must hold
/// a certificate of role `expect`.
pub fn connect(
    tls: &Tls,
    sock: TcpStream,
    expect: Role,
) -> std::io::Result<(Reader, Writer, Identity)> {
    let name: ServerName<'static> = expect.server_name();
    let conn = rustls::ClientConnection::new(tls.current().link_client.clone(), name)
        .map_err(std::io::Error::other)?;
    handshake(conn.into(), sock)
}

/// The reading half: decrypted bytes, in order.
pub struct Reader {
    conn: Shared,
    sock: TcpStream,
    plain: VecDeque<u8>,
    raw: Vec<u8>,
    /// The stream ended: cleanly (the peer's close_notify came first) or
    /// not (the socket closed without it: the peer was cut off).
    eof: Option<bool>,
}

impl Reader {
    /// Bounds each wait for the socket (None: for ever), as
    /// `TcpStream::set_read_timeout`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Waits (under the read timeout) until a decrypted byte is there or
    /// the stream ended; consumes nothing. A stream that ended without the
    /// peer's close_notify reads as `UnexpectedEof` (cut off, not
    /// finished).
    pub fn wait_readable(&mut self) -> std::io::Result<()> {
        if !self.plain.is_empty() {
            return Ok(());
        }
        // One deadline for the whole wait: reads that bring only records
        // without data (a key update, tickets) do not restart it.
        let timeout = self.sock.read_timeout()?;
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let r = self.wait_until(deadline);
        self.sock.set_read_timeout(timeout)?;
        r
    }

    fn wait_until(&mut self, deadline: Option<std::time::Instant>) -> std::io::Result<()> {
        while self.plain.is_empty() {
            match self.eof {
                Some(true) => return Ok(()),
                Some(false) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without a TLS close_notify",
                    ))
                }
                None => {
                    if let Some(d) = deadline {
                        let left = d.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            return Err(std::io::ErrorKind::TimedOut.into());
                        }
                        self.sock.set_read_timeout(Some(left))?;
                    }
                    self.fill()?
                }
            }
        }
        Ok(())
    }

    /// Moves what rustls has decrypted into `plain`; notes a close_notify.
    fn take_plaintext(&mut self, conn: &mut rustls::Connection) -> std::io::Result<()> {
        let mut buf = [0u8; 16 << 10];
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => {
                    self.eof = Some(true);
                    return Ok(());
                }
                Ok(k) => self.plain.extend(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the socket once and decrypts what came.
    fn fill(&mut self) -> std::io::Result<()> {
        let n = self.sock.read(&mut self.raw)?;
        if n == 0 {
            self.eof.get_or_insert(false);
            return Ok(());
        }
        let shared = self.conn.clone();
        let mut conn = shared.lock().unwrap_or_else(|e| e.into_inner());
        let raw = std::mem::take(&mut self.raw);
        let mut got = &raw[..n];
        let mut step = || -> std::io::Result<()> {
            // Nothing is taken after a close_notify: what follows it is
            // ignored (rustls takes no more bytes then).
            while !got.is_empty() && self.eof.is_none() {
                if conn.read_tls(&mut got)? == 0 {
                    break;
                }
                conn.process_new_packets().map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                })?;
                // Decrypted bytes leave rustls's buffer before more records
                // go in (it holds a bounded amount).
                self.take_plaintext(&mut conn)?;
            }
            Ok(())
        };
        let r = step();
        self.raw = raw;
        r
    }

    /// Ends reads (a blocked one returns) without touching the writer.
    pub fn shutdown(&self) -> std::io::Result<()> {
        self.sock.shutdown(Shutdown::Read)
    }

    /// The underlying socket (to shut it down from another thread).
    pub fn socket(&self) -> std::io::Result<TcpStream> {
        self.sock.try_clone()
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.wait_readable()?;
        let n = buf.len().min(self.plain.len());
        for (d, s) in buf.iter_mut().zip(self.plain.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

/// The writing half.
pub struct Writer {
    conn: Shared,
    sock: TcpStream,
}

impl Writer {
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    /// Takes the records produced so far (under the connection's lock).
    fn records(&self, plain: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if !plain.is_empty() {
            conn.writer().write_all(plain)?;
        }
        let mut out = Vec::with_capacity(plain.len() + 256);
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    /// Sends a close_notify, then ends the socket's sending side.
    pub fn shutdown(&mut self) -> std::io::Result<()> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_close_notify();
        let out = self.records(&[])?;
        let _ = self.sock.write_all(&out);
        self.sock.shutdown(Shutdown::Write)
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        let out = self.records(&buf[..n])?;
        self.sock.write_all(&out)?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let out = self.records(&[])?;
        self.sock.write_all(&out)
    }
}
