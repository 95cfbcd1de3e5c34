//! Channels to internal services: over mutual TLS when this process has a
//! certificate, accepting only a server whose certificate is of the
//! expected role; plaintext otherwise (`--insecure`).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{peer_identity, Identity, Role, Tls};

/// Dials `uri` (http://host:port) and completes the handshake, the
/// server being required to hold a certificate of role `expect`.
async fn dial(
    tls: Arc<Tls>,
    expect: Role,
    timeout: Duration,
    uri: Uri,
) -> std::io::Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Identity,
)> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .ok_or_else(|| std::io::Error::other(format!("{uri}: no port")))?;
    let work = async move {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(tls.current().grpc_client.clone());
        let stream = connector.connect(expect.server_name(), tcp).await?;
        let identity =
            peer_identity(stream.get_ref().1.peer_certificates()).map_err(std::io::Error::other)?;
        Ok((stream, identity))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no TLS connection to {uri} within {timeout:?}"),
        )),
    }
}

fn connector(
    tls: Arc<Tls>,
    expect: Role,
    timeout: Duration,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            dial(tls, expect, timeout, uri)
                .await
                .map(|(s, _)| TokioIo::new(s))
        }
    })
}

/// Connects `endpoint` now (its connect timeout also bounds the TLS
/// handshake when given as `timeout`).
pub async fn connect(
    endpoint: Endpoint,
    tls: Option<&Arc<Tls>>,
    expect: Role,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            endpoint
                .connect_with_connector(connector(tls.clone(), expect, timeout))
                .await
        }
    }
}

/// A channel that connects on first use (and again after a failure).
pub fn connect_lazy(
    endpoint: Endpoint,
    tls: Option<&Arc<Tls>>,
    expect: Role,
    timeout: Duration,
) -> Channel {
    match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => endpoint.connect_with_connector_lazy(connector(tls.clone(), expect, timeout)),
    }
}

/// Dials `uri` once and returns the identity its server presented (for
/// checks and tests; the channel functions above are what services use).
pub async fn probe(
    uri: &str,
    tls: &Arc<Tls>,
    expect: Role,
    timeout: Duration,
) -> std::io::Result<Identity> {
    let uri: Uri = uri.parse().map_err(std::io::Error::other)?;
    dial(tls.clone(), expect, timeout, uri)
        .await
        .map(|(_, i)| i)
}
