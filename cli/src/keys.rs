//! The API key every call carries (`--api-key`, `LLMOS_API_KEY`), and
//! `llmos keys create|list|revoke`.

use std::sync::OnceLock;

use anyhow::{Context, Result};
use clap::Subcommand;
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::show::print_json;

/// Adds `authorization: Bearer <key>` to every call (nothing without a key).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A coordinator connection that sends the key.
pub type Ch = InterceptedService<Channel, Bearer>;

static KEY: OnceLock<Option<String>> = OnceLock::new();

/// The key this process sends (set once, from the flag or environment).
pub fn use_key(key: Option<String>) {
    let _ = KEY.set(key.filter(|k| !k.trim().is_empty()));
}

pub fn with_key(ch: Channel) -> Result<Ch> {
    let v = match KEY.get().cloned().flatten() {
        None => None,
        Some(k) => Some(
            format!("Bearer {}", k.trim())
                .parse()
                .context("--api-key holds characters a header cannot carry")?,
        ),
    };
    Ok(InterceptedService::new(ch, Bearer(v)))
}

#[derive(Subcommand, Clone)]
pub enum KeysCommand {
    /// Make a key for a tenant; the key is printed once (the cluster keeps
    /// only its salted hash).
    Create {
        #[arg(long)]
        tenant: String,
        /// `user` (generate, the HTTP API) or `admin` (also deploy, keys, ...).
        #[arg(long, default_value = "user", value_parser = ["user", "admin"])]
        role: String,
        /// Tokens a minute (prompt plus max_tokens, charged when a request
        /// is admitted); 0: no limit.
        #[arg(long, default_value_t = 0)]
        tokens_per_minute: u64,
        /// Requests streaming at once; 0: no limit.
        #[arg(long, default_value_t = 0)]
        max_concurrent: u32,
        /// Highest priority served: low, normal or high (default: no cap).
        #[arg(long, value_parser = ["low", "normal", "high"])]
        priority_max: Option<String>,
    },
    /// Keys (ids, tenants, roles, limits; never the keys themselves).
    List,
    /// Revoke a key by its id (every coordinator refuses it once it
    /// applies the revocation).
    Revoke { id: String },
}

pub async fn run(mut admin: AdminClient<Ch>, c: KeysCommand) -> Result<()> {
    match c {
        KeysCommand::Create {
            tenant,
            role,
            tokens_per_minute,
            max_concurrent,
            priority_max,
        } => {
            let priority_max = match priority_max.as_deref() {
                Some("low") => 1,
                Some("normal") => 2,
                Some("high") => 3,
                _ => 0,
            };
            let r = admin
                .create_key(api::CreateKeyRequest {
                    tenant,
                    role,
                    limits: Some(api::KeyLimits {
                        tokens_per_minute,
                        max_concurrent,
                        priority_max,
                    }),
                })
                .await
                .map_err(crate::status_error)?
                .into_inner();
            let mut v = info(&r.info.unwrap_or_default());
            v["key"] = json!(r.key);
            print_json(v);
            eprintln!("the key is shown only now: the cluster keeps its salted hash");
        }
        KeysCommand::List => {
            let r = admin
                .list_keys(api::ListKeysRequest {})
                .await
                .map_err(crate::status_error)?
                .into_inner();
            print_json(json!(r.keys.iter().map(info).collect::<Vec<_>>()));
        }
        KeysCommand::Revoke { id } => {
            admin
                .revoke_key(api::RevokeKeyRequest { id })
                .await
                .map_err(crate::status_error)?;
        }
    }
    Ok(())
}

fn info(k: &api::ApiKeyInfo) -> serde_json::Value {
    let l = k.limits.unwrap_or_default();
    json!({"id": k.id, "tenant": k.tenant, "role": k.role,
        "tokens_per_minute": l.tokens_per_minute, "max_concurrent": l.max_concurrent,
        "priority_max": l.priority_max, "created_unix_ms": k.created_unix_ms})
}
