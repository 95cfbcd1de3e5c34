//! The server side for tonic: a stream of handshaken connections to hand
//! to `serve_with_incoming_shutdown`, and the identity checks the internal
//! services make.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::{peer_identity, Identity, Role, Tls, HANDSHAKE_TIMEOUT};

/// Who is on the other end of a connection: reaches every request's
/// extensions on a TLS listener.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    pub identity: Identity,
}

/// A connection that completed the mutual-TLS handshake.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Most TLS handshakes one listener runs at once.
const MAX_HANDSHAKES: usize = 256;

/// Accepts on `listener` and yields connections whose handshake
/// succeeded (each runs in its own task, so a slow client holds up no
/// other); failed handshakes (a plaintext client, a certificate of
/// another CA, none at all) are logged and dropped. Ends when the
/// receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handshakes in flight: connections beyond these wait for a slot
    // before any TLS work (unauthenticated clients cannot make the server
    // hold unbounded tasks).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: not fatal.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().grpc_server.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "refused a connection: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "refused a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                        return;
                    }
                };
                let identity = match peer_identity(stream.get_ref().1.peer_certificates()) {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "refused a connection");
                        return;
                    }
                };
                let conn = TlsConn {
                    stream,
                    info: PeerInfo { remote, identity },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The check an internal service makes of a request: when the service
/// runs with TLS (`tls_on`), the caller's certificate must be of one of
/// `roles` (PERMISSION_DENIED naming the identity and the service
/// otherwise; UNAUTHENTICATED for a request that came without a verified
/// identity: it did not come through the TLS listener). Plaintext
/// (`--insecure`): nothing to check, None.
pub fn require<T>(
    req: &tonic::Request<T>,
    tls_on: bool,
    service: &str,
    roles: &[Role],
) -> Result<Option<Identity>, tonic::Status> {
    if !tls_on {
        return Ok(None);
    }
    let Some(info) = req.extensions().get::<PeerInfo>() else {
        return Err(tonic::Status::unauthenticated(format!(
            "{service} takes calls over mutual TLS only; this one came without a verified certificate"
        )));
    };
    if roles.contains(&info.identity.role) {
        return Ok(Some(info.identity.clone()));
    }
    let want: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(tonic::Status::permission_denied(format!(
        "{service} takes calls from a {} certificate; {} presented {}",
        want.join(" or "),
        info.remote,
        info.identity
    )))
}

/// A tonic interceptor making [`require`]'s check on every call of a
/// service.
#[derive(Clone)]
pub struct RequireRole {
    pub tls_on: bool,
    pub service: &'static str,
    pub roles: &'static [Role],
}

impl tonic::service::Interceptor for RequireRole {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        require(&req, self.tls_on, self.service, self.roles)?;
        Ok(req)
    }
}
