//! A collective link's socket, plaintext or mutual TLS (`llmos_tls::
//! blocking`): the stream a rendezvous handshake runs on, then the reading
//! and writing halves a formed group's link uses.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// One link's socket: plaintext, or the two halves of a TLS stream.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(llmos_tls::blocking::Reader, llmos_tls::blocking::Writer),
}

impl Stream {
    pub(super) fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.read_exact(buf),
            Stream::Tls(r, _) => r.read_exact(buf),
        }
    }
    pub(super) fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(buf),
            Stream::Tls(_, w) => w.write_all(buf),
        }
    }
    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_read_timeout(t),
            Stream::Tls(r, _) => r.set_read_timeout(t),
        }
    }

    /// The halves a formed group's link uses: the reader (the caller's),
    /// the writer (its thread's) and the socket (to end reads on close).
    pub(super) fn split(self) -> std::io::Result<(LinkReader, LinkWriter, TcpStream)> {
        Ok(match self {
            Stream::Plain(s) => {
                let w = s.try_clone()?;
                let socket = s.try_clone()?;
                (LinkReader::Plain(s), LinkWriter::Plain(w), socket)
            }
            Stream::Tls(r, w) => {
                let socket = r.socket()?;
                (LinkReader::Tls(Mutex::new(r)), LinkWriter::Tls(w), socket)
            }
        })
    }
}

/// The reading side of a link.
pub(super) enum LinkReader {
    Plain(TcpStream),
    Tls(Mutex<llmos_tls::blocking::Reader>),
}

impl LinkReader {
    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            LinkReader::Plain(s) => s.set_read_timeout(t),
            LinkReader::Tls(r) => r
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_read_timeout(t),
        }
    }
    /// Waits (under the read timeout) for a first byte; consumes nothing.
    pub(super) fn wait_readable(&self) -> std::io::Result<()> {
        match self {
            LinkReader::Plain(s) => s.peek(&mut [0u8; 1]).map(drop),
            LinkReader::Tls(r) => r.lock().unwrap_or_else(|e| e.into_inner()).wait_readable(),
        }
    }
    pub(super) fn read_exact(&self, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            LinkReader::Plain(s) => {
                let mut s: &TcpStream = s;
                s.read_exact(buf)
            }
            LinkReader::Tls(r) => r.lock().unwrap_or_else(|e| e.into_inner()).read_exact(buf),
        }
    }
}

/// The writing side (its thread's).
pub(super) enum LinkWriter {
    Plain(TcpStream),
    Tls(llmos_tls::blocking::Writer),
}

impl LinkWriter {
    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            LinkWriter::Plain(s) => s.set_write_timeout(t),
            LinkWriter::Tls(w) => w.set_write_timeout(t),
        }
    }
    pub(super) fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            LinkWriter::Plain(s) => s.write_all(buf),
            LinkWriter::Tls(w) => w.write_all(buf),
        }
    }
    pub(super) fn shutdown(&mut self) {
        let _ = match self {
            LinkWriter::Plain(s) => s.shutdown(Shutdown::Write),
            LinkWriter::Tls(w) => w.shutdown(),
        };
    }
}
