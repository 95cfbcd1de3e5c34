//! `llmos local`: a coordinator and N workers as child processes on
//! loopback with ports chosen by the OS, the model deployed over all
//! workers, one generation streamed; then the cluster keeps serving, its
//! endpoint and ready-to-paste commands printed, until Ctrl-C (`--once`:
//! stop after the generation). Children die with this process (parent
//! death signal, kill on drop), so Ctrl-C leaves nothing behind.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use llmos_proto::v1 as api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::GenerateArgs;

#[derive(Args, Clone)]
pub struct LocalArgs {
    /// Number of worker processes (pipeline stages).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Model path or `smollm2`.
    #[arg(long, default_value = "smollm2")]
    source: String,
    /// libtorch threads per worker.
    #[arg(long, default_value_t = 1)]
    worker_threads: u32,
    /// Stop after the generation instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// No API keys (anyone who reaches the loopback ports is an admin) and
    /// a plaintext internal plane. Without it, the coordinator takes a
    /// fresh admin key (printed, and used by this command), and the
    /// coordinator and workers talk mutual TLS with certificates made for
    /// this cluster (`llmos certs init` in a temporary directory, removed
    /// at exit).
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    generate: GenerateArgs,
}

/// The binary `name` beside this one (the build puts them together).
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {} (build the workspace)",
            p.display(),
            me.display()
        );
    }
    Ok(p)
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts `cmd` and reads its `listening on ADDR` line; the rest of its
/// output is left in the returned lines.
async fn spawn(mut cmd: Command, what: &str) -> Result<(Child, String, Lines)> {
    cmd.stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env(
            "LLMOS_LOG",
            std::env::var("LLMOS_LOG").unwrap_or_else(|_| "warn".into()),
        );
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .with_context(|| format!("{what} did not start within 30 s"))??
        .with_context(|| format!("{what} exited before listening"))?;
    let addr = line
        .strip_prefix("listening on ")
        .with_context(|| format!("{what} printed {line:?}"))?
        .to_string();
    Ok((child, addr, lines))
}

/// Returns (an error) when one of the cluster's processes exits on its own.
async fn watch(children: &mut [(String, Child)]) -> Result<()> {
    loop {
        for (what, c) in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{what} exited ({status}); stopping the local cluster");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(a: &LocalArgs) -> Result<()> {
    let mut children = Vec::new();
    let mut coord = Command::new(sibling("llmos-coordinator")?);
    // The internal plane (worker registry, Raft) on its own port, as in a
    // production cluster.
    coord.args([
        "--listen",
        "127.0.0.1:0",
        "--internal-listen",
        "127.0.0.1:0",
    ]);
    // Development certificates for this cluster's processes.
    let certs = if a.insecure {
        None
    } else {
        let dir = tempfile::Builder::new()
            .prefix("llmos-local-certs-")
            .tempdir()
            .context("a directory for the local cluster's certificates")?;
        let workers: Vec<String> = (0..a.workers).map(|i| format!("local-{i}")).collect();
        llmos_tls::dev::init(
            dir.path(),
            &crate::certs::holders(&["1".to_string()], &workers),
            &crate::certs::default_hosts(),
        )?;
        Some(dir)
    };
    let tls_args = |cmd: &mut Command, name: &str| match &certs {
        None => {
            cmd.arg("--insecure");
        }
        Some(dir) => {
            let f = llmos_tls::TlsFiles::in_dir(dir.path(), name);
            cmd.arg("--tls-cert")
                .arg(&f.cert)
                .arg("--tls-key")
                .arg(&f.key)
                .arg("--tls-ca")
                .arg(&f.ca);
        }
    };
    coord.args(["--node-id", "1"]);
    tls_args(&mut coord, "coordinator-1");
    let key = if a.insecure {
        coord.arg("--no-auth");
        None
    } else {
        // A fresh admin key for this cluster (it lives as long as it does).
        let mut b = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .context("reading /dev/urandom for the admin key")?;
        let k: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let k = format!("llmos-local-{k}");
        coord.env("LLMOS_ADMIN_KEY", &k);
        crate::keys::use_key(Some(k.clone()));
        Some(k)
    };
    let (child, addr, mut lines) = spawn(coord, "the coordinator").await?;
    children.push(("the coordinator".to_string(), child));
    let url = format!("http://{addr}");
    let http = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .ok()
        .and_then(|l| l.ok().flatten())
        .and_then(|l| {
            l.strip_prefix("http listening on ")
                .map(|a| format!("http://{a}"))
        })
        .context("the coordinator did not print its HTTP address")?;
    let internal = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .ok()
        .and_then(|l| l.ok().flatten())
        .and_then(|l| {
            l.strip_prefix("internal listening on ")
                .map(|a| format!("http://{a}"))
        })
        .context("the coordinator did not print its internal address")?;
    eprintln!("[llmos] coordinator on {url} (HTTP {http}, internal {internal})");
    for i in 0..a.workers {
        let mut w = Command::new(sibling("llmos-worker")?);
        w.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--coordinator",
            &internal,
            "--worker-id",
        ])
        .arg(format!("local-{i}"))
        .args(["--threads", &a.worker_threads.to_string()])
        .args(["--metrics-listen", "127.0.0.1:0"]);
        tls_args(&mut w, &format!("worker-local-{i}"));
        let (child, waddr, mut wlines) = spawn(w, "a worker").await?;
        let metrics = tokio::time::timeout(Duration::from_secs(5), wlines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .and_then(|l| l.strip_prefix("metrics on ").map(str::to_string))
            .context("a worker did not print its metrics address")?;
        eprintln!("[llmos] worker local-{i} on {waddr} (metrics {metrics})");
        children.push((format!("worker local-{i}"), child));
    }
    let work = async {
        let ch = crate::channel(&url).await?;
        let mut admin = api::admin_client::AdminClient::new(ch.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ws = admin
                .list_workers(api::ListWorkersRequest {})
                .await
                .map_err(crate::status_error)?;
            if ws.get_ref().workers.iter().filter(|w| w.healthy).count() == a.workers as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("workers did not register within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let d = admin
            .deploy_model(api::DeployModelRequest {
                name: a.generate.model.clone(),
                source: a.source.clone(),
                stages: a.workers,
                ..Default::default()
            })
            .await
            .map_err(crate::status_error)?
            .into_inner();
        let split: Vec<String> = d
            .stages
            .iter()
            .map(|s| format!("{}: layers {}-{}", s.worker_id, s.layer_start, s.layer_end))
            .collect();
        eprintln!(
            "[llmos] deployed {} in {:.1} s ({})",
            a.generate.model,
            d.load_seconds,
            split.join(", ")
        );
        crate::generate(ch, &a.generate, &mut crate::Progress::new()).await?;
        if a.once {
            return Ok(());
        }
        match &key {
            Some(k) => eprintln!(
                "[llmos] admin API key (for the commands below): export LLMOS_API_KEY={k}"
            ),
            None => eprintln!("[llmos] --insecure: no API key needed"),
        }
        let bearer = key.as_deref().unwrap_or("-");
        eprintln!("[llmos] serving until Ctrl-C; gRPC API (with reflection) at {url}");
        eprintln!(
            "[llmos]   llmos --coordinator {url} generate --model {} --prompt \"Hello\"",
            a.generate.model
        );
        eprintln!("[llmos]   llmos --coordinator {url} status");
        eprintln!("[llmos] OpenAI HTTP API at {http}");
        eprintln!(
            "[llmos]   curl {http}/v1/chat/completions -H \"authorization: Bearer $LLMOS_API_KEY\" -H 'content-type: application/json' -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
            a.generate.model
        );
        eprintln!(
            "[llmos]   python -c 'import openai; c = openai.OpenAI(base_url=\"{http}/v1\", api_key=\"{bearer}\"); print(c.chat.completions.create(model=\"{}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}]).choices[0].message.content)'",
            a.generate.model
        );
        watch(&mut children).await
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\n[llmos] interrupted: stopping");
            Ok(())
        }
        _ = term.recv() => {
            eprintln!("[llmos] terminated: stopping");
            Ok(())
        }
    };
    for (_, mut c) in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    result
}
