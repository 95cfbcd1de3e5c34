//! Mutual TLS on llmos's internal plane (Raft peers, the worker registry,
//! workers' `Worker` service, pipeline links and TCP collectives).
//!
//! - [`Identity`]: who the other end is, read from its certificate's
//!   subject alternative names: the DNS name `coordinator.llmos` or
//!   `worker.llmos` gives the role (a certificate names exactly one), an
//!   optional URI `llmos://<role>/<id>` the replica or worker id, and its
//!   other DNS names and IP addresses the hosts it may be reached at.
//! - [`Tls`]: a certificate, its key and the CA, read from files and read
//!   again when they change (new connections use the new ones; open ones
//!   keep theirs), with one rustls configuration per use (gRPC over h2,
//!   collective links) built from them.
//! - [`server`]: a tonic listener stream of handshaken connections whose
//!   [`PeerInfo`] (the verified identity) reaches every request's
//!   extensions, and [`require`], the check the internal services make.
//! - [`client`]: tonic channels that dial with a client certificate and
//!   accept only a server of the expected role.
//! - [`blocking`]: handshakes on std sockets and a stream split into a
//!   reader and a writer that two threads use at once (the collectives'
//!   links read and write concurrently).
//! - [`dev`]: a development CA and certificates (`llmos certs init`).
//!
//! Server certificates are checked against the CA and the expected role's
//! DNS name, not the dialled host: identities, not addresses, are what the
//! internal plane trusts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub mod blocking;
pub mod client;
pub mod dev;
pub mod server;

pub use server::{require, PeerInfo};

/// ALPN of gRPC over TLS.
const ALPN_H2: &[u8] = b"h2";
/// ALPN of the collectives' links (a gRPC client cannot land on one).
const ALPN_LINK: &[u8] = b"llmos-link/1";
/// How often, at most, the files' modification times are looked at.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// A handshake that takes longer fails (a client that connects and says
/// nothing holds no server task for ever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file}: {why}")]
    File { file: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("certificate: {0}")]
    Identity(String),
}

/// The two roles on the internal plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Worker,
}

impl Role {
    /// The DNS name a certificate of this role carries (and a client
    /// expects of a server of this role).
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator.llmos",
            Role::Worker => "worker.llmos",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
        }
    }

    fn server_name(self) -> ServerName<'static> {
        ServerName::try_from(self.dns_name()).expect("a valid DNS name")
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a verified certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// `llmos://<role>/<id>`: the replica or worker id the certificate is
    /// bound to (None: any of the role).
    pub id: Option<String>,
    /// Its other DNS names and its IP addresses (as text): the hosts it
    /// may be reached at.
    pub hosts: Vec<String>,
}

impl Identity {
    /// Reads the identity of a (verified) certificate.
    pub fn of(cert: &[u8]) -> Result<Identity, TlsError> {
        use x509_parser::extensions::GeneralName;
        let (_, c) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
        let san = c
            .subject_alternative_name()
            .map_err(|e| TlsError::Identity(format!("subject alternative names: {e}")))?
            .ok_or_else(|| TlsError::Identity("no subject alternative names".into()))?;
        let mut roles = Vec::new();
        let mut ids = Vec::new();
        let mut hosts = Vec::new();
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    let d = d.to_ascii_lowercase();
                    match [Role::Coordinator, Role::Worker]
                        .into_iter()
                        .find(|r| r.dns_name() == d)
                    {
                        Some(r) => roles.push(r),
                        None => hosts.push(d),
                    }
                }
                GeneralName::IPAddress(b) => match b.len() {
                    4 => hosts.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string(),
                    ),
                    16 => hosts.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string(),
                    ),
                    _ => {}
                },
                GeneralName::URI(u) => {
                    if u.len() >= 8 && u[..8].eq_ignore_ascii_case("llmos://") {
                        ids.push(u[8..].to_string());
                    }
                }
                _ => {}
            }
        }
        let role = match roles.as_slice() {
            [r] => *r,
            [] => {
                return Err(TlsError::Identity(format!(
                    "names no role (a DNS name {} or {})",
                    Role::Coordinator.dns_name(),
                    Role::Worker.dns_name()
                )))
            }
            _ => return Err(TlsError::Identity("names more than one role".into())),
        };
        let id = match ids.as_slice() {
            [] => None,
            [one] => {
                let (r, id) = one.split_once('/').unwrap_or((one.as_str(), ""));
                if r != role.as_str() || id.is_empty() {
                    return Err(TlsError::Identity(format!(
                        "URI llmos://{one} does not name this {role} certificate's id"
                    )));
                }
                Some(id.to_string())
            }
            _ => return Err(TlsError::Identity("names more than one id".into())),
        };
        Ok(Identity { role, id, hosts })
    }

    /// Whether `host` is one the certificate names.
    pub fn names_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Whether the host of `address` (`http://host:port`) is one the
    /// certificate names.
    pub fn names_address(&self, address: &str) -> bool {
        address
            .parse::<tonic::codegen::http::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| self.names_host(h)))
            .unwrap_or(false)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.id {
            Some(id) => write!(f, "{} {id}", self.role),
            None => write!(f, "a {}", self.role),
        }
    }
}

/// Where the certificate, its key and the CA are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `DIR/NAME.crt`, `DIR/NAME.key`, `DIR/ca.crt` (what
    /// [`dev::init`] writes).
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.crt"),
        }
    }

    fn mtimes(&self) -> [Option<SystemTime>; 3] {
        [&self.cert, &self.key, &self.ca]
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }
}

/// The configurations built from one reading of the files.
struct Loaded {
    identity: Identity,
    grpc_server: Arc<rustls::ServerConfig>,
    grpc_client: Arc<rustls::ClientConfig>,
    link_server: Arc<rustls::ServerConfig>,
    link_client: Arc<rustls::ClientConfig>,
    mtimes: [Option<SystemTime>; 3],
}

/// This process's TLS material; cheap to share.
pub struct Tls {
    files: TlsFiles,
    loaded: RwLock<Arc<Loaded>>,
    checked: Mutex<Instant>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("identity", &self.identity())
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |why: String| TlsError::File {
        file: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let mtimes = files.mtimes();
    let chain = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
        file: files.key.clone(),
        why: format!("no PEM private key: {e}"),
    })?;
    let identity = Identity::of(&chain[0]).map_err(|e| TlsError::File {
        file: files.cert.clone(),
        why: e.to_string(),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&files.ca)? {
        roots.add(c).map_err(|e| TlsError::File {
            file: files.ca.clone(),
            why: format!("not a CA certificate: {e}"),
        })?;
    }
    let roots = Arc::new(roots);
    let config = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::File {
            file: files.key.clone(),
            why: format!("does not go with {}: {e}", files.cert.display()),
        })?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(config)?;
    let with_alpn_s = |alpn: &[u8]| {
        let mut c = server.clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(c)
    };
    let with_alpn_c = |alpn: &[u8]| {
        let mut c = client.clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(c)
    };
    Ok(Loaded {
        identity,
        grpc_server: with_alpn_s(ALPN_H2),
        grpc_client: with_alpn_c(ALPN_H2),
        link_server: with_alpn_s(ALPN_LINK),
        link_client: with_alpn_c(ALPN_LINK),
        mtimes,
    })
}

impl Tls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let loaded = load(&files)?;
        Ok(Arc::new(Tls {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
            checked: Mutex::new(Instant::now()),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// This process's own identity (from its certificate).
    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    /// The configurations in force, read again first when a file changed
    /// (looked at most once a second). Files that fail to load leave the
    /// previous ones in force, with a warning: a half-written rotation
    /// does not take the plane down.
    fn current(&self) -> Arc<Loaded> {
        let now_loaded = self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        {
            let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.elapsed() < RELOAD_CHECK {
                return now_loaded;
            }
            *checked = Instant::now();
        }
        if self.files.mtimes() == now_loaded.mtimes {
            return now_loaded;
        }
        match load(&self.files) {
            Ok(l)
                if l.identity.role != now_loaded.identity.role
                    || l.identity.id != now_loaded.identity.id =>
            {
                tracing::warn!(was = %now_loaded.identity, now = %l.identity, cert = %self.files.cert.display(), "TLS certificate files changed to another identity; keeping the previous ones (restart to change identity)");
                now_loaded
            }
            Ok(l) => {
                tracing::info!(cert = %self.files.cert.display(), identity = %l.identity, "TLS certificate files changed; new connections use them");
                let l = Arc::new(l);
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = l.clone();
                l
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the previous ones");
                now_loaded
            }
        }
    }
}

/// The internal-plane flags `llmos-coordinator` and `llmos-worker serve`
/// share (flattened into their arguments).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsFlags {
    /// Mutual TLS on the internal plane: this process's certificate (PEM;
    /// a SAN DNS name `coordinator.llmos` or `worker.llmos`, optionally the
    /// URI `llmos://<role>/<id>`; `llmos certs init` makes them). Needs
    /// --tls-key and --tls-ca (a coordinator also --internal-listen). The
    /// files are read again when they change (new connections use them).
    #[arg(long, env = "LLMOS_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "LLMOS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) the other processes' certificates must chain to.
    #[arg(long, env = "LLMOS_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve and dial the internal plane in plaintext, without
    /// certificates (`llmos status` reports it). Without it,
    /// --tls-cert/--tls-key/--tls-ca are needed.
    #[arg(
        long,
        env = "LLMOS_INSECURE",
        conflicts_with = "tls_cert",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure: bool,
}

impl TlsFlags {
    /// [`from_flags`] on these flags.
    pub fn load(&self, role: Role, plane: &str) -> Result<Option<Arc<Tls>>, TlsError> {
        from_flags(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
            self.insecure,
            role,
            plane,
        )
    }
}

/// The internal plane's TLS from a process's flags: the certificate, its
/// key and the CA (all three, of `role`), or plaintext only when asked
/// for by name (`insecure`). `plane` says in the error what goes
/// unprotected. `--insecure` logs a warning.
pub fn from_flags(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    insecure: bool,
    role: Role,
    plane: &str,
) -> Result<Option<Arc<Tls>>, TlsError> {
    let (Some(cert), Some(key), Some(ca)) = (cert, key, ca) else {
        if insecure {
            tracing::warn!(
                "--insecure: the internal plane ({plane}) is plaintext and unauthenticated"
            );
            return Ok(None);
        }
        return Err(TlsError::Config(format!(
            "the internal plane ({plane}) needs mutual TLS: give --tls-cert, --tls-key and --tls-ca (`llmos certs init DIR` makes a development set), or --insecure for plaintext"
        )));
    };
    let tls = Tls::load(TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        ca: ca.to_path_buf(),
    })?;
    let me = tls.identity();
    if me.role != role {
        return Err(TlsError::File {
            file: cert.to_path_buf(),
            why: format!("the certificate of {me}, not of a {role}"),
        });
    }
    tracing::info!(identity = %me, "internal plane on mutual TLS");
    Ok(Some(tls))
}

/// An error with its sources (tonic's transport errors say only
/// "transport error" at the top; the TLS reason is below).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(c) = s {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        s = c.source();
    }
    out
}

/// The identity of a handshaken connection's peer (the verifier has
/// checked its chain against the CA).
fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    Identity::of(leaf)
}

#[cfg(test)]
mod tests;
