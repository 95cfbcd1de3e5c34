//! How the services log: to stderr, filtered by `LLMOS_LOG` (an
//! `EnvFilter`, e.g. `info,llmos_coordinator=debug`), as text or as one
//! JSON object per line (`--log-format json`, for log pipelines).

/// Starts the process's logging; `format` is `text` or `json`.
pub fn init(format: &str, default_filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LLMOS_LOG")
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().init(),
        other => return Err(format!("--log-format {other:?}: text or json")),
    }
    Ok(())
}
