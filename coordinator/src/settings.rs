//! Cluster settings: the keys the coordinator reads and the checks every
//! write of a setting passes (used by the Admin API that writes them and
//! by the request path that reads them).

use crate::error::{CoordError, Result};

/// The setting that overrides `max_new_tokens` of requests that give none.
pub const SETTING_DEFAULT_MAX_NEW_TOKENS: &str = "generate.default_max_new_tokens";
/// The setting that picks how requests spread over replicas: `prefix` or
/// `round-robin` (the coordinator's `--routing` when unset).
pub const SETTING_ROUTING: &str = "routing.policy";
const MAX_SETTING_KEY: usize = 128;
const MAX_SETTING_VALUE: usize = 4096;

pub fn validate_setting(key: &str, value: &str) -> Result<()> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_SETTING_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
    if !key_ok {
        return Err(CoordError::Invalid(format!(
            "setting key {key:?}: 1 to {MAX_SETTING_KEY} characters of a-z, 0-9, '.', '_', '-', '/'"
        )));
    }
    if value.len() > MAX_SETTING_VALUE {
        return Err(CoordError::Limit {
            what: format!("value of setting {key:?}"),
            limit_name: "maximum bytes",
            limit: MAX_SETTING_VALUE,
            got: value.len(),
        });
    }
    if key == SETTING_DEFAULT_MAX_NEW_TOKENS && value.parse::<u32>().map_or(true, |v| v == 0) {
        return Err(CoordError::Invalid(format!(
            "{key} must be a positive integer, got {value:?}"
        )));
    }
    if key == SETTING_ROUTING && !matches!(value, "prefix" | "round-robin") {
        return Err(CoordError::Invalid(format!(
            "{key} is {value:?}: use prefix or round-robin"
        )));
    }
    Ok(())
}
