//! Prometheus metrics of a worker, served at `/metrics` on
//! `--metrics-listen`: what no coordinator can see, per pipeline stage
//! (labels `model`, `stage` = the shard's layer range `start-end`, `rank` =
//! its tensor-parallel rank):
//!
//! - recorded as steps run: the stage's step time and tokens
//!   (`llmos_stage_step_seconds`, `llmos_stage_step_tokens_total`), the
//!   hidden states it sends over its pipeline link to the next stage and
//!   how long each send takes (`llmos_stage_link_sent_bytes_total`,
//!   `llmos_stage_link_send_seconds`), and each tensor-parallel all-reduce
//!   (`llmos_stage_allreduce_seconds`);
//! - read when scraped: the stage's weight and KV-cache bytes, the bytes
//!   sent to its tensor-parallel group, the engine's running/waiting
//!   sequences and KV blocks where this worker runs the model's engine,
//!   the shards held and the device's memory.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use tch::Tensor;

use crate::comm::{self, Collective};

/// Step and transfer buckets, in seconds (tens of microseconds to tens of
/// seconds: a CPU decode step to a long prefill).
const STEP: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

const LABELS: &[&str] = &["model", "stage", "rank"];

/// A stage's label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub model: String,
    /// `start-end` (end exclusive).
    pub layers: String,
    pub rank: usize,
}

impl Stage {
    pub fn new(model: &str, layers: &std::ops::Range<usize>, rank: usize) -> Self {
        Stage {
            model: model.to_string(),
            layers: format!("{}-{}", layers.start, layers.end),
            rank,
        }
    }

    fn values(&self) -> [String; 3] {
        [
            self.model.clone(),
            self.layers.clone(),
            self.rank.to_string(),
        ]
    }
}

/// The process's collectors (one registry per worker process).
pub struct WorkerMetrics {
    registry: Registry,
    step_seconds: HistogramVec,
    step_tokens: IntCounterVec,
    link_bytes: IntCounterVec,
    link_seconds: HistogramVec,
    allreduce_seconds: HistogramVec,
}

pub fn metrics() -> &'static WorkerMetrics {
    static M: OnceLock<WorkerMetrics> = OnceLock::new();
    M.get_or_init(|| WorkerMetrics::new().expect("valid worker metrics"))
}

impl WorkerMetrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str| -> prometheus::Result<HistogramVec> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(STEP.to_vec()),
                LABELS,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), LABELS)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(WorkerMetrics {
            step_seconds: hist(
                "llmos_stage_step_seconds",
                "Seconds a stage takes to run one batched step through its layers.",
            )?,
            step_tokens: counter(
                "llmos_stage_step_tokens_total",
                "Tokens (prompt and decode rows) a stage ran through its layers.",
            )?,
            link_bytes: counter(
                "llmos_stage_link_sent_bytes_total",
                "Hidden-state bytes a stage sent over its pipeline link to the next stage.",
            )?,
            link_seconds: hist(
                "llmos_stage_link_send_seconds",
                "Seconds a stage takes to send one step's hidden states to the next stage.",
            )?,
            allreduce_seconds: hist(
                "llmos_stage_allreduce_seconds",
                "Seconds one tensor-parallel all-reduce takes on this rank.",
            )?,
            registry,
        })
    }

    /// A step of `tokens` tokens ran in `seconds`.
    pub fn step(&self, stage: &Stage, tokens: usize, seconds: f64) {
        let v = stage.values();
        let v: [&str; 3] = [&v[0], &v[1], &v[2]];
        self.step_seconds.with_label_values(&v).observe(seconds);
        self.step_tokens.with_label_values(&v).inc_by(tokens as u64);
    }

    /// `bytes` of hidden states went to the next stage in `seconds`.
    pub fn link_send(&self, stage: &Stage, bytes: u64, seconds: f64) {
        let v = stage.values();
        let v: [&str; 3] = [&v[0], &v[1], &v[2]];
        self.link_bytes.with_label_values(&v).inc_by(bytes);
        self.link_seconds.with_label_values(&v).observe(seconds);
    }

    fn allreduce(&self, stage: &Stage) -> Histogram {
        let v = stage.values();
        self.allreduce_seconds
            .with_label_values(&[&v[0], &v[1], &v[2]])
    }

    /// The collectors in the text format.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("utf-8")
    }
}

/// A collective whose all-reduces are timed into the stage's histogram.
pub struct Timed {
    inner: Arc<dyn Collective>,
    seconds: Histogram,
}

impl Timed {
    pub fn new(inner: Arc<dyn Collective>, stage: &Stage) -> Self {
        Timed {
            inner,
            seconds: metrics().allreduce(stage),
        }
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> comm::Result<()> {
        let began = Instant::now();
        let r = self.inner.all_reduce_sum(t);
        self.seconds.observe(began.elapsed().as_secs_f64());
        r
    }
    fn all_gather(&self, t: &Tensor) -> comm::Result<Tensor> {
        self.inner.all_gather(t)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> comm::Result<()> {
        self.inner.broadcast(t, root)
    }
    fn send(&self, t: &Tensor, peer: usize) -> comm::Result<()> {
        self.inner.send(t, peer)
    }
    fn recv(&self, t: &mut Tensor, peer: usize) -> comm::Result<()> {
        self.inner.recv(t, peer)
    }
    fn barrier(&self) -> comm::Result<()> {
        self.inner.barrier()
    }
    fn all_reduce_host(&self, buf: &mut [f32]) -> comm::Result<()> {
        let began = Instant::now();
        let r = self.inner.all_reduce_host(buf);
        self.seconds.observe(began.elapsed().as_secs_f64());
        r
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
    fn is_broken(&self) -> bool {
        self.inner.is_broken()
    }
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The families read when scraped, from a `Stats` answer.
pub fn snapshot(stats: &llmos_proto::worker::v1::StatsResponse) -> String {
    /// Name, type, help, samples (labels, value).
    type Family = (&'static str, &'static str, &'static str, Vec<(String, f64)>);
    let mut fams: Vec<Family> = vec![
        ("llmos_stage_weight_bytes", "gauge", "Weight bytes of a stage's shard on this worker.", vec![]),
        ("llmos_stage_kv_cache_bytes", "gauge", "KV-cache bytes a stage's shard reserved (its layers' share of every block).", vec![]),
        ("llmos_stage_collective_sent_bytes_total", "counter", "Bytes a tensor-parallel rank sent to its group.", vec![]),
        ("llmos_engine_requests_running", "gauge", "Sequences the model's engine on this worker is running.", vec![]),
        ("llmos_engine_requests_waiting", "gauge", "Sequences waiting in the model's engine on this worker.", vec![]),
        ("llmos_engine_kv_blocks_used", "gauge", "KV blocks in use by the model's engine on this worker (every stage of the replica uses the same block tables).", vec![]),
        ("llmos_engine_kv_blocks_total", "gauge", "KV blocks of the model's engine on this worker.", vec![]),
    ];
    for s in &stats.shards {
        let Some(spec) = &s.shard else { continue };
        let rank = spec.tensor_parallel.as_ref().map_or(0, |t| t.rank);
        let labels = format!(
            "model=\"{}\",stage=\"{}-{}\",rank=\"{}\"",
            label(&spec.model),
            spec.layer_start,
            spec.layer_end,
            rank
        );
        fams[0].3.push((labels.clone(), s.weight_bytes as f64));
        fams[1].3.push((labels.clone(), s.kv_cache_bytes as f64));
        fams[2]
            .3
            .push((labels.clone(), s.collective_bytes_sent as f64));
        if let Some(e) = &s.engine {
            let m = format!("model=\"{}\"", label(&spec.model));
            fams[3].3.push((m.clone(), e.running as f64));
            fams[4].3.push((m.clone(), e.waiting as f64));
            fams[5].3.push((m.clone(), e.kv_blocks_used as f64));
            fams[6].3.push((m, e.kv_blocks_total as f64));
        }
    }
    let mut out = String::new();
    for (name, kind, help, samples) in fams {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (l, v) in samples {
            out.push_str(&format!("{name}{{{l}}} {v}\n"));
        }
    }
    for (name, help, v) in [
        (
            "llmos_worker_shards",
            "Shards this worker holds.",
            stats.shards.len() as f64,
        ),
        (
            "llmos_worker_memory_total_bytes",
            "Memory of this worker's device (host RAM for CPU workers).",
            stats.memory_total_bytes as f64,
        ),
        (
            "llmos_worker_memory_available_bytes",
            "Memory of this worker's device still available.",
            stats.memory_available_bytes as f64,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        ));
    }
    out
}
