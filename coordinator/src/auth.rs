//! API keys: who may call the public APIs, as which tenant, with which
//! role and limits.
//!
//! A key is `llmos_<id>_<secret>`: the id (16 hex digits) names the key in
//! the replicated state, listings and logs; the secret (64 hex digits, 256
//! random bits) is shown once, when the key is made, and kept nowhere:
//! the state holds a random salt and SHA-256(salt ‖ secret). A secret of
//! 256 random bits needs no slow password hash (there is nothing to guess
//! from a dictionary); the salt keeps two keys' hashes unrelated.
//!
//! Every coordinator checks keys against its own applied copy of the
//! state, so a revocation holds on a replica as soon as it applies the
//! `RevokeKey` command (within a Raft heartbeat or two).
//!
//! Roles: `user` calls `llmos.v1.Inference` and the HTTP API; `admin` also
//! `llmos.v1.Admin`. Health, liveness and reflection stay open; metrics
//! need a key only with `--metrics-need-key`.

use std::collections::BTreeMap;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::state::ClusterState;

/// The prefix every key starts with (so a leaked key is recognizable by
/// secret scanners).
pub const KEY_PREFIX: &str = "llmos_";
/// Hex digits of a key's id and of its secret.
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;
/// The shortest bootstrap admin key accepted (`--admin-key-file`).
pub const MIN_BOOTSTRAP_KEY_LEN: usize = 20;
/// The key id and tenant the bootstrap admin key reports as.
pub const BOOTSTRAP_KEY_ID: &str = "bootstrap";
pub const BOOTSTRAP_TENANT: &str = "(bootstrap)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role {s:?}: expected user or admin")),
        }
    }
}

/// What a key may use; 0 (or none) is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Tokens (prompt plus `max_tokens`, charged at admission) a minute.
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Requests streaming at once.
    #[serde(default)]
    pub max_concurrent: u32,
    /// The highest priority its requests get (1 low, 2 normal, 3 high);
    /// a request asking for more is served at this one.
    #[serde(default)]
    pub priority_max: u32,
}

/// A key as the replicated state holds it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    /// Hex of the random salt and of SHA-256(salt ‖ secret).
    pub salt: String,
    pub hash: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub created_ms: u64,
}

/// Who made a request (put in the request's extensions once its key is
/// checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub tenant: String,
    pub role: Role,
    pub limits: Limits,
}

fn salted(salt: &[u8], secret: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret);
    hex::encode(h.finalize())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Checks a tenant name: 1 to 64 of `[A-Za-z0-9._-]` (it labels metrics).
pub fn check_tenant(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 64 {
        return Err(format!(
            "tenant {t:?}: 1 to 64 characters (letters, digits, . _ -)"
        ));
    }
    if !t
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "tenant {t:?}: only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// A new key: the token to show once, and what the state keeps.
pub fn new_key(tenant: &str, role: Role, limits: Limits, created_ms: u64) -> (String, ApiKey) {
    let id = random_hex(ID_HEX / 2);
    let secret = random_hex(SECRET_HEX / 2);
    let salt = random_hex(16);
    let hash = salted(salt.as_bytes(), secret.as_bytes());
    let token = format!("{KEY_PREFIX}{id}_{secret}");
    (
        token,
        ApiKey {
            id,
            tenant: tenant.to_string(),
            role,
            salt,
            hash,
            limits,
            created_ms,
        },
    )
}

/// Whether `s` is shaped like a key id (16 hex digits).
pub fn is_key_id(s: &str) -> bool {
    s.len() == ID_HEX && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The id and secret of a token shaped like a key (not checked).
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, ID_HEX) && hex(secret, SECRET_HEX)).then_some((id, secret))
}

/// A key's id for messages and logs: the id part of a key-shaped token,
/// else nothing of the token at all.
fn shown(token: &str) -> String {
    match split_token(token) {
        Some((id, _)) => format!("key {id}"),
        None => "the key given".to_string(),
    }
}

/// The bootstrap admin key (`--admin-key-file`, `LLMOS_ADMIN_KEY`): held
/// in memory as a salted hash, on every coordinator that is given it.
#[derive(Clone)]
pub struct BootstrapKey {
    salt: [u8; 16],
    hash: String,
}

impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapKey(..)")
    }
}

impl BootstrapKey {
    pub fn new(key: &str) -> Result<Self, String> {
        let key = key.trim();
        if key.len() < MIN_BOOTSTRAP_KEY_LEN {
            return Err(format!(
                "the admin key has {} characters; at least {MIN_BOOTSTRAP_KEY_LEN} (e.g. `openssl rand -hex 32`)",
                key.len()
            ));
        }
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        Ok(BootstrapKey {
            salt,
            hash: salted(&salt, key.as_bytes()),
        })
    }

    fn matches(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        salted(&self.salt, token.as_bytes())
            .as_bytes()
            .ct_eq(self.hash.as_bytes())
            .into()
    }
}

/// How a coordinator checks callers.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Keys are required on the public APIs (off: every call is served as
    /// an anonymous admin, and `llmos status` says so).
    pub required: bool,
    pub bootstrap: Option<BootstrapKey>,
    /// `/metrics` needs a (user) key too.
    pub metrics_need_key: bool,
}

/// Why a caller is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key, or not a valid one: UNAUTHENTICATED / 401.
    Unauthenticated(String),
    /// A valid key without the role: PERMISSION_DENIED / 403.
    Forbidden(String),
}

impl From<Denied> for Status {
    fn from(d: Denied) -> Status {
        match d {
            Denied::Unauthenticated(m) => Status::unauthenticated(m),
            Denied::Forbidden(m) => Status::permission_denied(m),
        }
    }
}

/// The key in an `authorization` value (`Bearer <key>`, case-insensitive
/// scheme).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// Checks the `authorization` value of a call that needs `need`.
pub fn check(
    config: &AuthConfig,
    keys: &BTreeMap<String, ApiKey>,
    authorization: Option<&str>,
    need: Role,
) -> Result<Caller, Denied> {
    if !config.required {
        return Ok(Caller {
            key_id: String::new(),
            tenant: String::new(),
            role: Role::Admin,
            limits: Limits::default(),
        });
    }
    let Some(value) = authorization else {
        return Err(Denied::Unauthenticated(
            "this API needs an API key: send `authorization: Bearer <key>` (make one with `llmos keys create`)".into(),
        ));
    };
    let Some(token) = bearer(value) else {
        return Err(Denied::Unauthenticated(
            "the authorization header is not `Bearer <key>`".into(),
        ));
    };
    let caller = if let Some(b) = config.bootstrap.as_ref().filter(|b| b.matches(token)) {
        let _ = b;
        Caller {
            key_id: BOOTSTRAP_KEY_ID.into(),
            // Not a valid tenant name: no tenant's metrics mix with it.
            tenant: BOOTSTRAP_TENANT.into(),
            role: Role::Admin,
            limits: Limits::default(),
        }
    } else {
        let found = split_token(token).and_then(|(id, secret)| {
            use subtle::ConstantTimeEq;
            let k = keys.get(id)?;
            let ok: bool = salted(k.salt.as_bytes(), secret.as_bytes())
                .as_bytes()
                .ct_eq(k.hash.as_bytes())
                .into();
            ok.then_some(k)
        });
        let Some(k) = found else {
            return Err(Denied::Unauthenticated(format!(
                "{} is not a valid API key (unknown, revoked, or mistyped)",
                shown(token)
            )));
        };
        Caller {
            key_id: k.id.clone(),
            tenant: k.tenant.clone(),
            role: k.role,
            limits: k.limits.clone(),
        }
    };
    if caller.role < need {
        return Err(Denied::Forbidden(format!(
            "this call needs an {} key; key {} (tenant {}) is a {} key",
            need.as_str(),
            caller.key_id,
            caller.tenant,
            caller.role.as_str()
        )));
    }
    Ok(caller)
}

/// A gRPC interceptor requiring `need` on every method of the service it
/// wraps; the caller goes into the request's extensions.
#[derive(Clone)]
pub struct Require {
    pub cluster: std::sync::Arc<crate::Cluster>,
    pub need: Role,
}

impl tonic::service::Interceptor for Require {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let value = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        let state: std::sync::Arc<ClusterState> = self.cluster.read();
        let caller = check(&self.cluster.config.auth, &state.api_keys, value, self.need)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> AuthConfig {
        AuthConfig {
            required: true,
            bootstrap: Some(BootstrapKey::new("a-bootstrap-key-of-enough-length").unwrap()),
            metrics_need_key: false,
        }
    }

    #[test]
    fn a_key_checks_by_its_hash_and_never_holds_the_secret() {
        let (token, key) = new_key("acme", Role::User, Limits::default(), 1);
        let (id, secret) = split_token(&token).unwrap();
        assert_eq!(id, key.id);
        let stored = serde_json::to_string(&key).unwrap();
        assert!(!stored.contains(secret), "{stored}");
        let keys = BTreeMap::from([(key.id.clone(), key.clone())]);
        let bearer = format!("Bearer {token}");
        let c = check(&on(), &keys, Some(&bearer), Role::User).unwrap();
        assert_eq!((c.tenant.as_str(), c.role), ("acme", Role::User));
        // The admin role is refused, naming the key and the role.
        match check(&on(), &keys, Some(&bearer), Role::Admin) {
            Err(Denied::Forbidden(m)) => assert!(m.contains(&key.id) && m.contains("admin"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A wrong secret under a known id, no key, a malformed header.
        let wrong = format!("Bearer {KEY_PREFIX}{}_{}", key.id, "0".repeat(64));
        for v in [
            Some(wrong.as_str()),
            None,
            Some("Basic abc"),
            Some("Bearer "),
        ] {
            match check(&on(), &keys, v, Role::User) {
                Err(Denied::Unauthenticated(m)) => assert!(!m.contains(secret), "{m}"),
                other => panic!("{v:?}: {other:?}"),
            }
        }
        // Revoked: gone from the map.
        assert!(check(&on(), &BTreeMap::new(), Some(&bearer), Role::User).is_err());
    }

    #[test]
    fn the_bootstrap_key_is_an_admin_and_short_ones_are_refused() {
        let c = check(
            &on(),
            &BTreeMap::new(),
            Some("bearer a-bootstrap-key-of-enough-length"),
            Role::Admin,
        )
        .unwrap();
        assert_eq!((c.key_id.as_str(), c.role), (BOOTSTRAP_KEY_ID, Role::Admin));
        let e = BootstrapKey::new("short").unwrap_err();
        assert!(e.contains("at least 20"), "{e}");
        // Auth off: everyone is an anonymous admin.
        let off = AuthConfig::default();
        assert_eq!(
            check(&off, &BTreeMap::new(), None, Role::Admin)
                .unwrap()
                .role,
            Role::Admin
        );
    }

    #[test]
    fn tenants_are_checked() {
        assert!(check_tenant("team-a.prod_1").is_ok());
        for bad in ["", "a b", "x\"y", &"t".repeat(65)] {
            assert!(check_tenant(bad).is_err(), "{bad:?}");
        }
    }
}
