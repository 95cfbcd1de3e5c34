//! Prometheus metrics of a coordinator, served at `/metrics` on the HTTP
//! port. Native names under `llmos_`; with `--metrics-compat vllm` also
//! vLLM's names (label `model_name`), so dashboards and KEDA triggers
//! written for vLLM work unchanged.
//!
//! Two sources: what this coordinator sees of each request (it relays every
//! token: time to first token, inter-token latency, end-to-end latency,
//! prompt and generated tokens, finish reasons), recorded as it happens in
//! `prometheus` collectors; and what the engines report (running and
//! waiting sequences, KV blocks, preemptions, prefix-cache lookups) plus
//! the control plane's Raft figures, read when scraped.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cluster::Cluster;

/// Latency buckets, in seconds (vLLM's range: milliseconds to minutes).
const LATENCY: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

/// One set of request collectors under one naming scheme.
struct Requests {
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    finished: IntCounterVec,
}

impl Requests {
    fn new(r: &Registry, names: &Names) -> prometheus::Result<Self> {
        let hist = |name: &str, help: &str| -> prometheus::Result<HistogramVec> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY.to_vec()),
                &[names.model],
            )?;
            r.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                r.register(Box::new(c.clone()))?;
                Ok(c)
            };
        Ok(Requests {
            ttft: hist(
                names.ttft,
                "Seconds from a request's arrival to its first token.",
            )?,
            itl: hist(names.itl, "Seconds between a request's consecutive tokens.")?,
            e2e: hist(names.e2e, "Seconds from a request's arrival to its end.")?,
            queue: hist(
                names.queue,
                "Seconds a request waited in its engine's queue before its first step.",
            )?,
            prompt_tokens: counter(
                names.prompt_tokens,
                "Prompt tokens of finished requests.",
                &[names.model],
            )?,
            generation_tokens: counter(
                names.generation_tokens,
                "Tokens generated.",
                &[names.model],
            )?,
            finished: counter(
                names.finished,
                "Requests finished, by reason (stop, length, abort, error).",
                &[names.model, names.reason],
            )?,
        })
    }
}

/// The names of one scheme.
struct Names {
    model: &'static str,
    reason: &'static str,
    ttft: &'static str,
    itl: &'static str,
    e2e: &'static str,
    queue: &'static str,
    prompt_tokens: &'static str,
    generation_tokens: &'static str,
    finished: &'static str,
}

const NATIVE: Names = Names {
    model: "model",
    reason: "reason",
    ttft: "llmos_time_to_first_token_seconds",
    itl: "llmos_inter_token_latency_seconds",
    e2e: "llmos_e2e_request_latency_seconds",
    queue: "llmos_request_queue_time_seconds",
    prompt_tokens: "llmos_prompt_tokens_total",
    generation_tokens: "llmos_generation_tokens_total",
    finished: "llmos_requests_finished_total",
};

const VLLM: Names = Names {
    model: "model_name",
    reason: "finished_reason",
    ttft: "vllm:time_to_first_token_seconds",
    itl: "vllm:inter_token_latency_seconds",
    e2e: "vllm:e2e_request_latency_seconds",
    queue: "vllm:request_queue_time_seconds",
    prompt_tokens: "vllm:prompt_tokens_total",
    generation_tokens: "vllm:generation_tokens_total",
    finished: "vllm:request_success_total",
};

/// A coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    native: Requests,
    vllm: Option<Requests>,
    in_flight: IntGaugeVec,
    tenant_requests: IntCounterVec,
    tenant_tokens: IntCounterVec,
    tenant_refusals: IntCounterVec,
}

impl Metrics {
    /// `vllm_compat`: also record under vLLM's names.
    pub fn new(vllm_compat: bool) -> Arc<Self> {
        let registry = Registry::new();
        let native = Requests::new(&registry, &NATIVE).expect("valid native metrics");
        let vllm =
            vllm_compat.then(|| Requests::new(&registry, &VLLM).expect("valid vLLM metrics"));
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "llmos_requests_in_flight",
                "Requests this coordinator is streaming.",
            ),
            &["model"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("registered once");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let tenant_requests = counter(
            "llmos_tenant_requests_total",
            "Requests of each tenant admitted by this coordinator (API keys on).",
            &["tenant"],
        );
        let tenant_tokens = counter(
            "llmos_tenant_tokens_total",
            "Tokens each tenant used through this coordinator: prompt or generated (kind).",
            &["tenant", "kind"],
        );
        let tenant_refusals = counter(
            "llmos_tenant_refusals_total",
            "Requests of each tenant refused by its quota, by the limit reached (reason).",
            &["tenant", "reason"],
        );
        Arc::new(Metrics {
            registry,
            native,
            vllm,
            in_flight,
            tenant_requests,
            tenant_tokens,
            tenant_refusals,
        })
    }

    pub fn tenant_admitted(&self, tenant: &str) {
        self.tenant_requests.with_label_values(&[tenant]).inc();
    }

    pub fn tenant_refused(&self, tenant: &str, reason: &str) {
        self.tenant_refusals
            .with_label_values(&[tenant, reason])
            .inc();
    }

    pub fn tenant_tokens(&self, tenant: &str, prompt: u64, generated: u64) {
        self.tenant_tokens
            .with_label_values(&[tenant, "prompt"])
            .inc_by(prompt);
        self.tenant_tokens
            .with_label_values(&[tenant, "generated"])
            .inc_by(generated);
    }

    /// Starts observing one request of `model`, arrived at `arrived`.
    pub fn request(self: &Arc<Self>, model: &str, arrived: Instant) -> RequestObserver {
        self.in_flight.with_label_values(&[model]).inc();
        RequestObserver {
            metrics: Arc::clone(self),
            model: model.to_string(),
            arrived,
            last_token: None,
            done: false,
        }
    }

    /// A request of `model` waited `seconds` in its engine's queue (known
    /// with its first token, whatever its end).
    pub fn queue_time(&self, model: &str, seconds: f64) {
        self.each(|r| r.queue.with_label_values(&[model]).observe(seconds));
    }

    fn each(&self, f: impl Fn(&Requests)) {
        f(&self.native);
        if let Some(v) = &self.vllm {
            f(v);
        }
    }

    /// The text exposition: the collectors, then what the engines report
    /// and the control plane's figures, read now.
    pub async fn render(&self, cluster: &Cluster) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        let mut text = String::from_utf8(out).expect("utf-8");
        text.push_str(&engines(cluster, self.vllm.is_some()).await);
        text.push_str(&control_plane(cluster));
        text
    }
}

/// Records one request's tokens and end; an observer dropped before the
/// end counts the request as aborted (the client went away).
pub struct RequestObserver {
    metrics: Arc<Metrics>,
    model: String,
    arrived: Instant,
    last_token: Option<Instant>,
    done: bool,
}

impl RequestObserver {
    /// `n` tokens arrived now.
    pub fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let m = self.model.as_str();
        match self.last_token {
            None => {
                // Tokens that came with the first arrived with it: no gap.
                let t = (now - self.arrived).as_secs_f64();
                self.metrics.each(|r| {
                    r.ttft.with_label_values(&[m]).observe(t);
                    for _ in 1..n {
                        r.itl.with_label_values(&[m]).observe(0.0);
                    }
                });
            }
            Some(prev) => {
                let t = (now - prev).as_secs_f64() / n as f64;
                self.metrics.each(|r| {
                    for _ in 0..n {
                        r.itl.with_label_values(&[m]).observe(t);
                    }
                });
            }
        }
        self.metrics
            .each(|r| r.generation_tokens.with_label_values(&[m]).inc_by(n as u64));
        self.last_token = Some(now);
    }

    /// The request ended with `reason` (`stop`, `length`, `error`) after a
    /// prompt of `prompt_tokens`.
    pub fn finished(&mut self, reason: &str, prompt_tokens: u32) {
        if self.done {
            return;
        }
        self.done = true;
        let (m, t) = (self.model.as_str(), self.arrived.elapsed().as_secs_f64());
        self.metrics.each(|r| {
            r.e2e.with_label_values(&[m]).observe(t);
            r.prompt_tokens
                .with_label_values(&[m])
                .inc_by(prompt_tokens as u64);
            r.finished.with_label_values(&[m, reason]).inc();
        });
    }
}

impl Drop for RequestObserver {
    fn drop(&mut self) {
        if !self.done {
            self.finished("abort", 0);
        }
        self.metrics
            .in_flight
            .with_label_values(&[self.model.as_str()])
            .dec();
    }
}

/// `stream` of `Generate` responses, observed by `obs` as it passes.
pub fn observe<S>(
    stream: S,
    mut obs: RequestObserver,
) -> impl tokio_stream::Stream<Item = Result<llmos_proto::v1::GenerateResponse, tonic::Status>>
where
    S: tokio_stream::Stream<Item = Result<llmos_proto::v1::GenerateResponse, tonic::Status>>,
{
    use tokio_stream::StreamExt;
    stream.map(move |item| {
        match &item {
            Ok(r) => {
                obs.tokens(r.tokens.len());
                if r.finish_reason != 0 {
                    obs.finished(
                        crate::inference::finish_name(r.finish_reason),
                        r.usage.as_ref().map_or(0, |u| u.prompt_tokens),
                    );
                }
            }
            Err(_) => obs.finished("error", 0),
        }
        item
    })
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One family in the text format: `# HELP`, `# TYPE`, a sample per
/// (label set, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, v) in samples {
        out.push_str(&format!("{name}{{{labels}}} {v}\n"));
    }
}

/// What each model's serving engines report, summed over its replicas.
async fn engines(cluster: &Cluster, vllm: bool) -> String {
    let state = cluster.read();
    let mut per_model = Vec::new();
    for (name, dep) in &state.models {
        let mut sum = [0f64; 8];
        for r in dep.serving() {
            if let Some(s) = crate::status::engine_stats(cluster, dep, r).await {
                for (acc, v) in sum.iter_mut().zip([
                    s.running as f64,
                    s.waiting as f64,
                    s.kv_blocks_used as f64,
                    s.kv_blocks_total as f64,
                    s.preemptions as f64,
                    s.prefix_queried_tokens as f64,
                    s.prefix_hit_tokens as f64,
                    s.repaired_tokens as f64,
                ]) {
                    *acc += v;
                }
            }
        }
        // Native: the model and the worker pool it is placed on (what a
        // pool's autoscaler reads); vLLM's: the model only.
        per_model.push((
            format!("model=\"{}\",pool=\"{}\"", label(name), label(&dep.pool)),
            format!("model_name=\"{}\"", label(name)),
            sum,
        ));
    }
    let col = |i: usize, native: bool| -> Vec<(String, f64)> {
        per_model
            .iter()
            .map(|(n, v, s)| (if native { n } else { v }.clone(), s[i]))
            .collect()
    };
    let usage: Vec<(String, f64)> = per_model
        .iter()
        .map(|(_, v, s)| (v.clone(), if s[3] > 0.0 { s[2] / s[3] } else { 0.0 }))
        .collect();
    let mut out = String::new();
    let native = [
        (
            "llmos_requests_running",
            "gauge",
            "Sequences the model's engines are running.",
            0,
        ),
        (
            "llmos_requests_waiting",
            "gauge",
            "Sequences waiting in the model's engines.",
            1,
        ),
        (
            "llmos_kv_blocks_used",
            "gauge",
            "KV cache blocks in use (first stage of each replica).",
            2,
        ),
        (
            "llmos_kv_blocks_total",
            "gauge",
            "KV cache blocks (first stage of each replica).",
            3,
        ),
        (
            "llmos_preemptions_total",
            "counter",
            "Sequences preempted (their cache freed, recomputed).",
            4,
        ),
        (
            "llmos_prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            5,
        ),
        (
            "llmos_prefix_cache_hits_total",
            "counter",
            "Prompt tokens the prefix cache served.",
            6,
        ),
        (
            "llmos_kv_repaired_tokens_total",
            "counter",
            "Cached positions later stages recomputed from the first stage's kept hidden states after they were replaced.",
            7,
        ),
    ];
    for (name, kind, help, i) in native {
        family(&mut out, name, kind, help, &col(i, true));
    }
    if vllm {
        let compat = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                0,
            ),
            (
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                1,
            ),
            (
                "vllm:num_preemptions_total",
                "counter",
                "Cumulative number of preemptions.",
                4,
            ),
            (
                "vllm:prefix_cache_queries_total",
                "counter",
                "Prefix cache queries, in tokens.",
                5,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "counter",
                "Prefix cache hits, in tokens.",
                6,
            ),
        ];
        for (name, kind, help, i) in compat {
            family(&mut out, name, kind, help, &col(i, false));
        }
        family(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            &usage,
        );
    }
    out
}

/// The control plane as this coordinator sees it.
fn control_plane(cluster: &Cluster) -> String {
    let c = cluster.store.status();
    let mut out = String::new();
    for (name, kind, help, v) in [
        (
            "llmos_raft_term",
            "gauge",
            "Current Raft term.",
            c.term as f64,
        ),
        (
            "llmos_raft_commit_index",
            "gauge",
            "Raft commit index.",
            c.commit_index as f64,
        ),
        (
            "llmos_raft_applied_index",
            "gauge",
            "Raft index applied here.",
            c.applied_index as f64,
        ),
        (
            "llmos_raft_is_leader",
            "gauge",
            "1 when this coordinator leads.",
            if cluster.store.is_leader() { 1.0 } else { 0.0 },
        ),
        (
            "llmos_raft_leader_changes_total",
            "counter",
            "Times this coordinator saw the control plane's leader change (the first leader counts).",
            c.leader_changes as f64,
        ),
        (
            "llmos_raft_proposals_failed_total",
            "counter",
            "Writes this coordinator proposed that were not committed (no leader, timeout, leader change).",
            cluster.proposals_failed() as f64,
        ),
        (
            "llmos_migrations_total",
            "counter",
            "Requests moved to another replica after theirs failed (this coordinator).",
            cluster.migrations() as f64,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    out
}
