//! A development CA and certificates for the internal plane (`llmos certs
//! init`, `llmos local`): ECDSA P-256, the CA valid ten years, the others
//! one, each for both server and client use (every process both serves
//! and dials). Production clusters bring their own CA (cert-manager, a
//! corporate PKI) issuing the same names; see docs/security.md.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::{Role, TlsError, TlsFiles};

/// One certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub role: Role,
    /// Bound id (`llmos://<role>/<id>`); None: any of the role.
    pub id: Option<String>,
}

impl Holder {
    /// A certificate of `role` bound to `id` (`llmos://<role>/<id>`).
    pub fn bound(role: Role, id: impl Into<String>) -> Holder {
        Holder {
            role,
            id: Some(id.into()),
        }
    }

    /// The files' base name: `coordinator-1`, `worker-w0`, or the role
    /// alone for a certificate bound to no id.
    pub fn file_name(&self) -> String {
        match &self.id {
            Some(id) => format!("{}-{id}", self.role),
            None => self.role.to_string(),
        }
    }
}

fn err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("making certificates: {e}"))
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let file_err = |e: std::io::Error| TlsError::File {
        file: path.to_path_buf(),
        why: e.to_string(),
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    use std::io::Write;
    let mut f = opts.open(path).map_err(file_err)?;
    // A file that existed keeps its mode through `open`: set it.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(file_err)?;
    }
    f.write_all(text.as_bytes()).map_err(file_err)
}

/// Writes `DIR/ca.crt`, `DIR/ca.key` and, per holder, `DIR/<name>.crt`
/// and `DIR/<name>.key` (keys readable by the owner only). Every
/// certificate names `hosts` (DNS names or IP addresses) besides its
/// role. Returns the holders' files.
pub fn init(dir: &Path, holders: &[Holder], hosts: &[String]) -> Result<Vec<TlsFiles>, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
        file: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "llmos development CA");
    ca.distinguished_name = name;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time_now();
    ca.not_before = now;
    ca.not_after = now + rcgen_days(3650);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    write(&dir.join("ca.crt"), &ca_cert.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut out = Vec::new();
    for h in holders {
        let mut p = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("llmos {}", h.file_name()));
        p.distinguished_name = name;
        p.subject_alt_names
            .push(SanType::DnsName(h.role.dns_name().try_into().map_err(err)?));
        if let Some(id) = &h.id {
            p.subject_alt_names.push(SanType::URI(
                format!("llmos://{}/{id}", h.role).try_into().map_err(err)?,
            ));
        }
        for host in hosts {
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => p.subject_alt_names.push(SanType::IpAddress(ip)),
                Err(_) => p
                    .subject_alt_names
                    .push(SanType::DnsName(host.as_str().try_into().map_err(err)?)),
            }
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now;
        p.not_after = now + rcgen_days(365);
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        let files = TlsFiles::in_dir(dir, &h.file_name());
        write(&files.cert, &cert.pem(), false)?;
        write(&files.key, &key.serialize_pem(), true)?;
        out.push(files);
    }
    Ok(out)
}

/// The files `init` wrote for `holder` in `dir`.
pub fn files(dir: &Path, holder: &Holder) -> TlsFiles {
    TlsFiles::in_dir(dir, &holder.file_name())
}

/// `dir`'s CA key, for issuing more certificates later.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}
