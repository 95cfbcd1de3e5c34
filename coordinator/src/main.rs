//! `llmos-coordinator`: flags, logging, and `serve`.

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "llmos-coordinator",
    version,
    about = "llmos coordinator: placement, routing, public gRPC API"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(
        long,
        env = "LLMOS_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: std::net::SocketAddr,
    /// Seconds without a heartbeat after which a worker is marked unhealthy.
    #[arg(long, default_value_t = 10)]
    heartbeat_timeout_s: u64,
    /// Deadline of one forward step on one stage, in seconds.
    #[arg(long, default_value_t = 30)]
    step_timeout_s: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLMOS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("bind {}", cli.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let config = llmos_coordinator::Config {
        heartbeat_timeout: std::time::Duration::from_secs(cli.heartbeat_timeout_s),
        step_timeout: std::time::Duration::from_secs(cli.step_timeout_s),
        ..Default::default()
    };
    llmos_coordinator::serve(listener, config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
