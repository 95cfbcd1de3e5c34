//! `llmos`: talks to any coordinator (`generate`, `models`, `workers`,
//! `status`, `deploy`, `undeploy`), or starts a local cluster (`local`).

mod apply;
mod certs;
mod keys;
mod local;
mod show;

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
pub use keys::Ch as Channel;
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use serde_json::json;
use show::*;

#[derive(Parser)]
#[command(
    name = "llmos",
    version,
    about = "llmos: a cluster runtime for large language models"
)]
struct Cli {
    /// Coordinator URLs, comma-separated: the CLI moves on to the next
    /// when one is unreachable or cannot reach a quorum.
    #[arg(
        long,
        global = true,
        env = "LLMOS_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The API key sent with every call (`authorization: Bearer`); make
    /// one with `llmos keys create`.
    #[arg(long, global = true, env = "LLMOS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Clone)]
enum Command {
    /// Generate text, streamed to stdout.
    Generate(GenerateArgs),
    /// Deployed models.
    Models,
    /// Registered workers.
    Workers,
    /// Workers, models and placements.
    Status,
    /// Deploy a model over the registered workers.
    Deploy(DeployArgs),
    /// Make the deployments what a JSON file lists (deploy what is
    /// missing, scale or re-split what differs), then wait until they serve.
    Apply(apply::ApplyArgs),
    /// Remove a deployed model.
    Undeploy { name: String },
    /// Set how many replicas of a model serve.
    Scale {
        name: String,
        #[arg(long)]
        replicas: u32,
        /// Return once recorded instead of waiting until exactly that many
        /// replicas serve.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Move every replica off a worker (a replacement first, then the old
    /// one drains and unloads) and place nothing new there.
    Drain {
        worker: String,
        /// Return once recorded instead of waiting until the worker holds
        /// nothing.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Make a drained worker schedulable again.
    Uncordon { worker: String },
    /// Change how a model's layers are split over pipeline stages while it
    /// serves (each replica is replaced by one of the new shape).
    Resplit {
        name: String,
        /// Layers per stage, e.g. 8,22.
        #[arg(long, value_delimiter = ',')]
        split: Vec<u32>,
        /// Stages (0: the fewest that fit); ignored with --split.
        #[arg(long, default_value_t = 0)]
        stages: u32,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Coordinator replicas (Raft membership).
    #[command(subcommand)]
    Members(MembersCommand),
    /// Cluster settings (e.g. generate.default_max_new_tokens).
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// API keys of tenants (needs an admin key).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Start a coordinator and workers on this machine, deploy a model over
    /// all of them, and generate; Ctrl-C stops everything.
    Local(local::LocalArgs),
    /// Certificates for the internal plane's mutual TLS.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

#[derive(Args, Clone)]
pub struct GenerateArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as plain text instead of a chat turn.
    #[arg(long)]
    pub raw: bool,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop candidates less likely than this fraction of the top one (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// OpenAI's presence penalty over generated tokens, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty over generated tokens, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Hugging Face's repetition penalty over prompt and generated tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// With --json: also report this many most likely alternatives per token (0-20).
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: u32,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// One JSON object per token, then one with finish_reason and usage.
    #[arg(long)]
    pub json: bool,
    /// low, normal or high.
    #[arg(long, default_value = "normal")]
    pub priority: String,
    /// End the request with DEADLINE_EXCEEDED after this many ms (0: none).
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u32,
}

#[derive(Subcommand, Clone)]
enum MembersCommand {
    /// Members, the leader, term and log indexes.
    List,
    /// Add a replica started with `llmos-coordinator --join --node-id ID`.
    Add {
        id: u64,
        /// Where it listens, e.g. http://10.0.0.3:50051
        address: String,
    },
    /// Remove a replica (leadership moves first if it leads).
    Remove { id: u64 },
}

#[derive(Subcommand, Clone)]
enum SettingsCommand {
    List,
    Set { key: String, value: String },
    Delete { key: String },
}

#[derive(Args, Clone)]
struct DeployArgs {
    #[arg(long)]
    name: String,
    /// Model path every worker can read, or `smollm2`.
    #[arg(long)]
    source: String,
    /// Pipeline stages (0: the fewest that fit).
    #[arg(long, default_value_t = 0)]
    stages: u32,
    /// Layers per stage, e.g. 12,18.
    #[arg(long, value_delimiter = ',')]
    split: Vec<u32>,
    /// Tensor-parallel ranks per stage (each stage then spans this many
    /// workers).
    #[arg(long, default_value_t = 1)]
    tp: u32,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Linear weights: none (in --dtype); int8 (weight-only, one scale per
    /// output channel; about half the bytes of bf16); q8_0, q4_0, q4_1
    /// (GGUF blocks multiplied in their blocks, CPU workers: the file's own
    /// where it stores them so, else quantized at load); file (every weight
    /// as the GGUF file quantizes it, the head included).
    #[arg(long, default_value = "none")]
    quantize: String,
    /// KV cache blocks on every stage (0: 1024).
    #[arg(long, default_value_t = 0)]
    kv_blocks: u32,
    /// Positions per KV block (0: 16).
    #[arg(long, default_value_t = 0)]
    block_size: u32,
    /// Tokens per engine step (0: 512).
    #[arg(long, default_value_t = 0)]
    max_batch_tokens: u32,
    /// Sequences running at once (0: 64; 1 turns batching off).
    #[arg(long, default_value_t = 0)]
    max_running: u32,
    /// Requests waiting before RESOURCE_EXHAUSTED (0: 256).
    #[arg(long, default_value_t = 0)]
    max_waiting: u32,
    #[arg(long)]
    no_prefix_caching: bool,
    /// How hidden states travel between pipeline stages: auto (direct NCCL
    /// links when every stage is on a GPU, else through the engine's gRPC
    /// calls), grpc, or link (direct links on any device: NCCL or TCP).
    #[arg(long, default_value = "auto")]
    pipeline_transport: String,
    /// The KV cache's element type: auto (the model's dtype), f32, bf16 or
    /// f16 (an f32 model's cache in half the memory, keys and values
    /// rounded).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Return once the deploy is recorded instead of waiting for Ready
    /// (`llmos status` shows the progress).
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for Ready; the model stays deployed (and keeps
    /// converging) when it passes.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Full copies of the model, each on workers of its own.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Only workers of this pool.
    #[arg(long, default_value = "")]
    pool: String,
    /// Only workers with this label, as key=value (repeatable).
    #[arg(long = "label", value_parser = llmos_proto::parse_label)]
    labels: Vec<(String, String)>,
    /// Let the coordinator's autoscaler keep the replica count within
    /// MIN,MAX (up when requests wait, down when idle).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    autoscale: Vec<u32>,
}

fn coordinators(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.contains("://") {
                a.to_string()
            } else {
                format!("http://{a}")
            }
        })
        .collect()
}

async fn channel(url: &str) -> Result<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {url}"))?;
    keys::with_key(ch)
}

/// A gRPC status, shown as `Code: message`.
#[derive(Debug)]
struct StatusError(tonic::Status);

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for StatusError {}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(StatusError(s))
}

/// What a generation streamed so far: after the loss of its coordinator,
/// the next one resumes it from there (the `Generate` resume protocol).
pub struct Progress {
    /// Chosen here, so a resume names the stream even when its first
    /// response was lost (and, without `--seed`, draws with the same seed).
    request_id: String,
    received: Vec<u32>,
}

impl Progress {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Progress {
            request_id: format!("cli-{}-{nanos}", std::process::id()),
            received: Vec::new(),
        }
    }
}

/// A stream that broke without an answer from its coordinator (the
/// connection or the process went away): another coordinator can resume
/// it. An answered failure carries the `llmos-failure` kind.
fn lost_connection(s: &tonic::Status) -> bool {
    !s.metadata().contains_key(llmos_meta::failure::FAILURE_KEY)
        && matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        )
}

/// Streams one generation to stdout with the `llmos-worker generate`
/// contract; `progress` carries what was streamed across coordinators.
pub async fn generate(ch: Channel, a: &GenerateArgs, progress: &mut Progress) -> Result<()> {
    use api::generate_request::Prompt;
    let prompt = if a.raw {
        Prompt::Text(a.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(api::ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(api::ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        Prompt::Chat(api::ChatMessages { messages })
    };
    if a.top_logprobs > 0 && !a.json {
        anyhow::bail!("--top-logprobs needs --json (the alternatives are printed with each token's JSON line)");
    }
    let req = api::GenerateRequest {
        model: a.model.clone(),
        prompt: Some(prompt),
        sampling: Some(api::SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            min_p: a.min_p,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            repetition_penalty: a.repetition_penalty,
            logit_bias: Default::default(),
        }),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: a.max_tokens,
            stop_sequences: a.stop.clone(),
            ignore_eos: a.ignore_eos,
        }),
        logprobs: a.json,
        priority: match a.priority.as_str() {
            "low" => api::Priority::Low,
            "high" => api::Priority::High,
            "normal" => api::Priority::Normal,
            other => anyhow::bail!("--priority {other:?}: use low, normal or high"),
        } as i32,
        timeout_ms: a.timeout_ms,
        request_id: progress.request_id.clone(),
        resume: (!progress.received.is_empty()).then(|| api::Resume {
            received_token_ids: progress.received.clone(),
        }),
        top_logprobs: a.top_logprobs,
    };
    let mut stream = InferenceClient::new(ch)
        .generate(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        let m = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            // The next coordinator resumes after what arrived.
            Err(s) if lost_connection(&s) => {
                return Err(status_error(tonic::Status::unavailable(format!(
                    "the stream broke after {} tokens ({:?}: {})",
                    progress.received.len(),
                    s.code(),
                    s.message()
                ))))
            }
            Err(s) => return Err(status_error(s)),
        };
        for t in &m.tokens {
            progress.received.push(t.id);
            if a.json {
                writeln!(
                    out,
                    "{}",
                    json!({"id": t.id, "text": t.text, "logprob": t.logprob,
                        "top_logprobs": t.top_logprobs.iter().map(|a| json!({
                            "id": a.id, "text": a.text, "logprob": a.logprob})).collect::<Vec<_>>()})
                )?;
            } else {
                write!(out, "{}", t.text)?;
                out.flush()?;
            }
        }
        if m.finish_reason != 0 {
            let reason = api::FinishReason::try_from(m.finish_reason)
                .map(|f| {
                    f.as_str_name()
                        .trim_start_matches("FINISH_REASON_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            let usage = m.usage.unwrap_or_default();
            let t = m.timings.unwrap_or_default();
            if a.json {
                writeln!(
                    out,
                    "{}",
                    json!({
                        "finish_reason": reason,
                        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens, "migrations": usage.migrations},
                        "timings": {"time_to_first_token_s": t.time_to_first_token_s, "decode_s": t.decode_s, "decode_tokens_per_s": t.decode_tokens_per_s},
                    })
                )?;
            } else {
                writeln!(out)?;
                eprintln!(
                    "[llmos] prompt {} tokens, generated {} tokens, {:.1} tokens/s (first token after {:.2} s), finish: {reason}",
                    usage.prompt_tokens, usage.completion_tokens, t.decode_tokens_per_s, t.time_to_first_token_s
                );
            }
        }
    }
    Ok(())
}

async fn wait_ready(
    admin: &mut AdminClient<Channel>,
    name: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<api::ModelStatus> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let deadline = std::time::Instant::now() + timeout;
    let bars = MultiProgress::new();
    let status_line = bars.add(ProgressBar::new_spinner());
    let style =
        ProgressStyle::with_template("stage {prefix:>2} [{bar:20}] {pos}/{len} ranks {msg}")
            .expect("template")
            .progress_chars("=> ");
    let mut stage_bars: Vec<ProgressBar> = Vec::new();
    let mut epoch = 0;
    loop {
        let s = admin
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        let m = s
            .models
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| anyhow::anyhow!("model {name:?} was undeployed while waiting"))?;
        if m.epoch != epoch {
            // Placed (anew): one bar per stage of this placement.
            epoch = m.epoch;
            for b in stage_bars.drain(..) {
                bars.remove(&b);
            }
            for (i, st) in m.stages.iter().enumerate() {
                let b = bars.add(ProgressBar::new(
                    1 + st.tensor_parallel_workers.len() as u64,
                ));
                b.set_style(style.clone());
                b.set_prefix(i.to_string());
                b.set_message(format!(
                    "layers {}-{} on {}",
                    st.layer_start, st.layer_end, st.worker_id
                ));
                stage_bars.push(b);
            }
        }
        for (b, st) in stage_bars.iter().zip(&m.stages) {
            b.set_position(st.ranks_loaded as u64);
        }
        status_line.set_message(if m.reason.is_empty() {
            format!("{name}: {}", m.state)
        } else {
            format!("{name}: {} ({})", m.state, m.reason)
        });
        status_line.tick();
        if m.state == "Ready" {
            bars.clear().ok();
            return Ok(m);
        }
        if m.state.starts_with("Failed") {
            bars.clear().ok();
            anyhow::bail!("model {name:?} failed: {}", m.reason);
        }
        if std::time::Instant::now() >= deadline {
            bars.clear().ok();
            anyhow::bail!(
                "model {name:?} is not ready after {}s ({}: {}); it stays deployed and keeps converging (`llmos undeploy {name}` cancels)",
                timeout.as_secs(),
                m.state,
                m.reason
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn try_next(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StatusError>().is_some_and(|s| {
        s.0.code() == tonic::Code::Unavailable
            && !s
                .0
                .metadata()
                .contains_key(llmos_meta::failure::FAILURE_KEY)
    }) || e
        .chain()
        .any(|c| c.to_string().contains("connecting to the coordinator"))
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Local(a) = &cli.command {
        // It makes the cluster's key itself.
        return local::run(a).await;
    }
    if let Command::Certs(c) = &cli.command {
        return certs::run(c);
    }
    keys::use_key(cli.api_key.clone());
    let addresses = coordinators(&cli.coordinator);
    anyhow::ensure!(!addresses.is_empty(), "no coordinator address given");
    // Twice round the list: a write that met a change of leader is
    // answered UNAVAILABLE at once, and the next try (perhaps on the
    // coordinator that answered) reaches the new leader.
    if let Command::Apply(a) = &cli.command {
        return apply::run(&addresses, a).await;
    }
    let tries = 2 * addresses.len();
    let mut last = None;
    let mut progress = Progress::new();
    for (i, url) in addresses.iter().cycle().take(tries).enumerate() {
        let r = match (channel(url).await, &cli.command) {
            (Ok(ch), Command::Generate(a)) => generate(ch, a, &mut progress).await,
            (Ok(ch), command) => run_on(ch, command.clone()).await,
            (Err(e), _) => Err(e),
        };
        match r {
            Err(e) if try_next(&e) && i + 1 < tries => {
                eprintln!("coordinator {url}: {e:#}; trying the next");
                last = Some(e);
            }
            r => return r,
        }
    }
    Err(last.expect("at least one address"))
}

async fn run_on(ch: Channel, command: Command) -> Result<()> {
    match command {
        Command::Generate(a) => generate(ch, &a, &mut Progress::new()).await?,
        Command::Models => {
            let ms = InferenceClient::new(ch)
                .list_models(api::ListModelsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .models;
            print_json(json!(ms
                .iter()
                .map(|m| json!({"name": m.name, "architecture": m.architecture, "layers": m.num_layers,
                    "vocab_size": m.vocab_size, "max_context": m.max_context, "dtype": m.dtype,
                    "quantization": m.quantization}))
                .collect::<Vec<_>>()));
        }
        Command::Workers => {
            let ws = AdminClient::new(ch)
                .list_workers(api::ListWorkersRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .workers;
            print_json(workers_json(&ws));
        }
        Command::Status => {
            let s = AdminClient::new(ch)
                .cluster_status(api::ClusterStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let models: Vec<_> = s
                .models
                .iter()
                .map(|m| {
                    json!({"name": m.name, "source": m.source, "state": m.state,
                    "stages": stages_json(&m.stages), "pipeline_transport": m.pipeline_transport,
                    "serving": m.serving.as_ref().map(serving_json),
                    "options": m.options.as_ref().map(options_json), "reason": m.reason,
                    "generation": m.generation, "epoch": m.epoch, "state_since_ms": m.state_since_ms,
                    "replicas_desired": m.replicas_desired, "replicas": replicas_json(&m.replicas),
                    "pool": m.pool, "autoscale": (m.autoscale_max > 0).then(|| json!([m.autoscale_min, m.autoscale_max]))})
                })
                .collect();
            print_json(
                json!({"workers": workers_json(&s.workers), "models": models,
                "control_plane": control_plane_json(&s.control_plane)}),
            );
        }
        Command::Deploy(a) => {
            let started = std::time::Instant::now();
            let (name, wait, timeout) = (a.name.clone(), !a.no_wait, a.timeout);
            let mut admin = AdminClient::new(ch);
            admin
                .deploy_model(api::DeployModelRequest {
                    name: a.name,
                    source: a.source,
                    stages: a.stages,
                    layer_split: a.split,
                    dtype: a.dtype,
                    quantization: a.quantize,
                    tensor_parallel: a.tp,
                    serving: Some(api::ServingOptions {
                        kv_cache_blocks: a.kv_blocks,
                        block_size: a.block_size,
                        max_batch_tokens: a.max_batch_tokens,
                        max_running: a.max_running,
                        max_waiting: a.max_waiting,
                        disable_prefix_caching: a.no_prefix_caching,
                        pipeline_transport: a.pipeline_transport,
                        kv_cache_dtype: a.kv_cache_dtype,
                    }),
                    // The CLI waits itself, drawing the progress.
                    wait: Some(false),
                    wait_timeout_ms: 0,
                    replicas: a.replicas,
                    pool: a.pool,
                    labels: a.labels.into_iter().collect(),
                    autoscale_min: a.autoscale.first().copied().unwrap_or(0),
                    autoscale_max: a.autoscale.get(1).copied().unwrap_or(0),
                })
                .await
                .map_err(status_error)?;
            if !wait {
                print_json(json!({"recorded": name}));
                return Ok(());
            }
            let m = wait_ready(&mut admin, &name, std::time::Duration::from_secs(timeout)).await?;
            print_json(json!({"stages": stages_json(&m.stages),
                "load_seconds": started.elapsed().as_secs_f64()}));
        }
        Command::Scale {
            name,
            replicas,
            no_wait,
            timeout,
        } => {
            let started = std::time::Instant::now();
            let r = AdminClient::new(ch)
                .scale_model(api::ScaleModelRequest {
                    name: name.clone(),
                    replicas,
                    wait: Some(!no_wait),
                    wait_timeout_ms: (timeout * 1000).min(u32::MAX as u64) as u32,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_json(
                json!({"model": name, "previous": r.previous, "replicas": replicas,
                "seconds": started.elapsed().as_secs_f64()}),
            );
        }
        Command::Drain {
            worker,
            no_wait,
            timeout,
        } => {
            let r = AdminClient::new(ch)
                .drain_worker(api::DrainWorkerRequest {
                    worker_id: worker.clone(),
                    wait: Some(!no_wait),
                    wait_timeout_ms: (timeout * 1000).min(u32::MAX as u64) as u32,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_json(json!({"worker": worker, "moved": r.replicas, "done": !no_wait}));
        }
        Command::Resplit {
            name,
            split,
            stages,
            no_wait,
            timeout,
        } => {
            let started = std::time::Instant::now();
            AdminClient::new(ch)
                .resplit_model(api::ResplitModelRequest {
                    name: name.clone(),
                    stages: if split.is_empty() {
                        stages
                    } else {
                        split.len() as u32
                    },
                    layer_split: split,
                    wait: Some(!no_wait),
                    wait_timeout_ms: (timeout * 1000).min(u32::MAX as u64) as u32,
                })
                .await
                .map_err(status_error)?;
            print_json(
                json!({"model": name, "done": !no_wait, "seconds": started.elapsed().as_secs_f64()}),
            );
        }
        Command::Uncordon { worker } => {
            AdminClient::new(ch)
                .uncordon_worker(api::UncordonWorkerRequest { worker_id: worker })
                .await
                .map_err(status_error)?;
        }
        Command::Undeploy { name } => {
            AdminClient::new(ch)
                .undeploy_model(api::UndeployModelRequest {
                    name,
                    wait: Some(true),
                })
                .await
                .map_err(status_error)?;
        }
        Command::Members(m) => {
            let mut admin = AdminClient::new(ch);
            let members = match m {
                MembersCommand::List => {
                    let r = admin
                        .list_members(api::ListMembersRequest {})
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    print_json(control_plane_json(&r.control_plane));
                    return Ok(());
                }
                MembersCommand::Add { id, address } => {
                    admin
                        .add_member(api::AddMemberRequest { id, address })
                        .await
                        .map_err(status_error)?
                        .into_inner()
                        .members
                }
                MembersCommand::Remove { id } => {
                    admin
                        .remove_member(api::RemoveMemberRequest { id })
                        .await
                        .map_err(status_error)?
                        .into_inner()
                        .members
                }
            };
            print_json(json!(members
                .iter()
                .map(|m| json!({"id": m.id, "address": m.address, "leader": m.leader, "learner": m.learner}))
                .collect::<Vec<_>>()));
        }
        Command::Settings(c) => {
            let mut admin = AdminClient::new(ch);
            match c {
                SettingsCommand::List => {
                    let r = admin
                        .list_settings(api::ListSettingsRequest {})
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    let sorted: std::collections::BTreeMap<_, _> = r.settings.into_iter().collect();
                    print_json(json!(sorted));
                }
                SettingsCommand::Set { key, value } => {
                    admin
                        .set_setting(api::SetSettingRequest { key, value })
                        .await
                        .map_err(status_error)?;
                }
                SettingsCommand::Delete { key } => {
                    admin
                        .delete_setting(api::DeleteSettingRequest { key })
                        .await
                        .map_err(status_error)?;
                }
            }
        }
        Command::Keys(c) => keys::run(AdminClient::new(ch), c).await?,
        Command::Local(_) | Command::Apply(_) | Command::Certs(_) => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
