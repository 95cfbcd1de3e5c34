//! The shard host: one OS thread owns the loaded shards and their paged KV
//! pools (libtorch work is blocking); `HostHandle` sends it commands. Steps
//! of all models run here one at a time, in arrival order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_meta::serving::{DEFAULT_BLOCK_SIZE, DEFAULT_KV_BLOCKS};
use llmos_meta::{ModelSpec, OpenedModel};
use llmos_proto::worker::v1 as pb;
use prost::Message;
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

use super::codec::{from_wire, to_wire};
use super::links::{relink, without_links, LinkTable, Links};
use crate::collective::{Collective, NcclGroup, Rendezvous, TcpGroup};
use crate::error::{Result, WorkerError};
use crate::model::cpu_decode::PagedSeq;
use crate::model::linear::Quantization;
use crate::model::llama::LoadOptions;
use crate::model::{Llama, ShardSpec};
use crate::paged::{BatchLayout, KvPool, SeqSlice};
use crate::sampling::{Sampler, SamplingParams};

/// How long the ranks of a tensor-parallel group wait for each other to
/// link up.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// A collective without an answer fails after this when the spec says 0.
const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);

struct Hosted {
    spec: pb::ShardSpec,
    model: Llama,
    pool: KvPool,
    weight_bytes: u64,
    /// The stage's tensor-parallel group (this shard is one rank of it).
    /// Its pipeline links are in the host's `LinkTable`.
    group: Option<Arc<TcpGroup>>,
}

impl Drop for Hosted {
    fn drop(&mut self) {
        // Ends a follower's wait for steps and the peers' operations.
        if let Some(g) = &self.group {
            g.close();
        }
    }
}

enum Command {
    Load(
        pb::ShardSpec,
        std::sync::mpsc::Sender<Command>,
        oneshot::Sender<Result<pb::LoadShardResponse>>,
    ),
    Unload(String, oneshot::Sender<Result<()>>),
    /// A step, with its input when it arrived over the pipeline link.
    Step(
        pb::StepRequest,
        Option<Tensor>,
        oneshot::Sender<Result<pb::StepResponse>>,
    ),
    Stats(oneshot::Sender<pb::StatsResponse>),
}

#[derive(Clone)]
pub struct HostHandle {
    tx: std::sync::mpsc::Sender<Command>,
    links: LinkTable,
}

impl HostHandle {
    /// Starts the host thread; it ends when every handle is dropped. It
    /// cannot hold tensor-parallel shards (no collective listener).
    pub fn spawn() -> Self {
        Self::spawn_with(None, Device::Cpu)
    }

    /// Starts the host thread with the worker's collective listener, which
    /// tensor-parallel groups and pipeline links form over; shards are
    /// loaded on `device`.
    pub fn spawn_with(rendezvous: Option<Arc<Rendezvous>>, device: Device) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let links = LinkTable::default();
        let shared = links.clone();
        std::thread::Builder::new()
            .name("llmos-shard-host".into())
            .spawn(move || {
                let _no_grad = tch::no_grad_guard();
                let mut host = Host {
                    shards: HashMap::new(),
                    threads: tch::get_num_threads(),
                    rendezvous,
                    device,
                    links: shared,
                };
                while let Ok(cmd) = rx.recv() {
                    host.handle(cmd);
                }
            })
            .expect("spawn the shard host thread");
        HostHandle { tx, links }
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| WorkerError::HostStopped)?;
        rx.await.map_err(|_| WorkerError::HostStopped)
    }

    pub async fn load(&self, spec: pb::ShardSpec) -> Result<pb::LoadShardResponse> {
        let me = self.tx.clone();
        self.call(|tx| Command::Load(spec, me, tx)).await?
    }

    pub async fn unload(&self, model: String) -> Result<()> {
        self.call(|tx| Command::Unload(model, tx)).await?
    }

    /// Runs one step. In a linked pipeline its input first arrives over the
    /// link from the previous stage (received here, off the host thread, so
    /// a stage waiting for its input blocks no other model's steps), and a
    /// step that fails is reported over the link to the next stage, which
    /// then fails it at once.
    pub async fn step(&self, req: pb::StepRequest) -> Result<pb::StepResponse> {
        let links =
            if req.to_next || matches!(req.input, Some(pb::step_request::Input::FromPrevious(_))) {
                self.links.get(&req.model)
            } else {
                Links::default()
            };
        let (step, to_next) = (req.step_id, req.to_next);
        let r = self.linked_step(req, &links).await;
        if let (Err(e), true, Some(next)) = (&r, to_next, &links.next) {
            if let Err(e2) = next.send_failed(step) {
                tracing::warn!(error = %e, link_error = %e2, "cannot report a failed step to the next stage");
            }
        }
        r
    }

    async fn linked_step(&self, req: pb::StepRequest, links: &Links) -> Result<pb::StepResponse> {
        // A link missing here is being (re)formed: the step is retried
        // later, so UNAVAILABLE.
        if req.to_next && links.next.is_none() {
            return Err(WorkerError::StepFailed(format!(
                "model {:?} has no pipeline link to its next stage on this worker (not formed)",
                req.model
            )));
        }
        let input = match (&req.input, &links.prev) {
            (Some(pb::step_request::Input::FromPrevious(_)), None) => {
                return Err(WorkerError::StepFailed(format!(
                    "model {:?} has no pipeline link from its previous stage on this worker (not formed)",
                    req.model
                )))
            }
            (Some(pb::step_request::Input::FromPrevious(_)), Some(prev)) => {
                let rows: i64 = req.sequences.iter().map(|s| s.tokens as i64).sum();
                let (prev, step, cols) = (prev.clone(), req.step_id, links.hidden);
                let t = tokio::task::spawn_blocking(move || {
                    let _no_grad = tch::no_grad_guard();
                    prev.recv(step, rows, cols)
                })
                .await
                .map_err(|e| WorkerError::StepFailed(format!("the link receiver died: {e}")))??;
                Some(t)
            }
            _ => None,
        };
        self.call(|tx| Command::Step(req, input, tx)).await?
    }

    pub async fn stats(&self) -> Result<pb::StatsResponse> {
        self.call(Command::Stats).await
    }
}

struct Host {
    shards: HashMap<String, Hosted>,
    /// libtorch's intra-op threads for batched steps (the fused one-token
    /// step runs on its own pool with libtorch at one thread).
    threads: i32,
    rendezvous: Option<Arc<Rendezvous>>,
    device: Device,
    links: LinkTable,
}

/// The spec with the serving defaults filled in where it says 0.
pub fn normalized(mut spec: pb::ShardSpec) -> pb::ShardSpec {
    if spec.block_size == 0 {
        spec.block_size = DEFAULT_BLOCK_SIZE;
    }
    if spec.kv_blocks == 0 {
        spec.kv_blocks = DEFAULT_KV_BLOCKS;
    }
    spec
}

impl Host {
    fn handle(&mut self, cmd: Command) {
        // A dropped reply receiver means the caller went away: nothing to do.
        match cmd {
            Command::Load(spec, me, tx) => drop(tx.send(self.load(spec, me))),
            Command::Unload(model, tx) => {
                self.links.remove(&model);
                let r = match self.shards.remove(&model) {
                    Some(_) => Ok(()),
                    None => Err(WorkerError::UnknownModel(model)),
                };
                drop(tx.send(r));
            }
            Command::Step(req, input, tx) => drop(tx.send(self.step(req, input))),
            Command::Stats(tx) => drop(tx.send(self.stats())),
        }
    }

    fn load(
        &mut self,
        spec: pb::ShardSpec,
        me: std::sync::mpsc::Sender<Command>,
    ) -> Result<pb::LoadShardResponse> {
        let started = Instant::now();
        let spec = normalized(spec);
        let intact = |h: &&mut Hosted| h.group.as_ref().is_none_or(|g| !g.is_broken());
        let same = |h: &&mut Hosted| without_links(&h.spec) == without_links(&spec);
        if let Some(h) = self.shards.get_mut(&spec.model).filter(same).filter(intact) {
            // Asked again (a coordinator replica after re-registration, or a
            // neighbouring stage restarted): keep the weights and the cache;
            // links whose spec changed or that broke are formed anew.
            let links = relink(
                self.rendezvous.as_deref(),
                self.device,
                &spec,
                self.links.get(&spec.model),
                h.model.config().hidden_size as i64,
                FORM_TIMEOUT,
                DEFAULT_COLLECTIVE_TIMEOUT,
            )
            .inspect_err(|_| self.links.remove(&spec.model))?;
            self.links.set(&spec.model, links);
            h.spec = spec;
            return Ok(pb::LoadShardResponse {
                weight_bytes: h.weight_bytes,
                load_seconds: started.elapsed().as_secs_f64(),
                max_context: h.model.config().max_position as u32,
            });
        }
        // Replacing a shard: free the old one first.
        self.links.remove(&spec.model);
        self.shards.remove(&spec.model);
        let kind = match pb::DType::try_from(spec.dtype).unwrap_or(pb::DType::Unspecified) {
            pb::DType::Unspecified | pb::DType::F32 => Kind::Float,
            pb::DType::Bf16 => Kind::BFloat16,
            pb::DType::F16 => Kind::Half,
            pb::DType::I64 => {
                return Err(WorkerError::InvalidRequest(
                    "weights cannot be int64".into(),
                ))
            }
        };
        let opened = OpenedModel::open(&ModelSpec::parse(&spec.source)?)?;
        let tp = spec.tensor_parallel.clone().filter(|t| t.world_size > 1);
        let split = match &tp {
            Some(t) => Some(
                opened
                    .config
                    .tp_split(t.rank as usize, t.world_size as usize)
                    .map_err(WorkerError::InvalidRequest)?,
            ),
            None => None,
        };
        // The group links up before the (slow) load, so a missing rank fails
        // the deployment at once.
        let group = match &tp {
            Some(t) => {
                if t.peers.len() != t.world_size as usize {
                    return Err(WorkerError::InvalidRequest(format!(
                        "a group of {} ranks with {} peer addresses",
                        t.world_size,
                        t.peers.len()
                    )));
                }
                let rv = self.rendezvous.as_ref().ok_or_else(|| {
                    WorkerError::InvalidRequest(
                        "this worker has no collective listener: it cannot hold a tensor-parallel shard"
                            .into(),
                    )
                })?;
                let op_timeout = if t.timeout_ms == 0 {
                    DEFAULT_COLLECTIVE_TIMEOUT
                } else {
                    Duration::from_millis(t.timeout_ms as u64)
                };
                Some(Arc::new(rv.form(
                    &t.group,
                    t.rank as usize,
                    &t.peers,
                    FORM_TIMEOUT,
                    op_timeout,
                )?))
            }
            None => None,
        };
        // So are the pipeline links.
        let links = relink(
            self.rendezvous.as_deref(),
            self.device,
            &spec,
            Links::default(),
            opened.config.hidden_size as i64,
            FORM_TIMEOUT,
            DEFAULT_COLLECTIVE_TIMEOUT,
        )?;
        let shard = ShardSpec {
            layers: spec.layer_start as usize..spec.layer_end as usize,
            embed: spec.embed,
            head: spec.head,
        };
        let opts = LoadOptions {
            kind,
            device: self.device,
            seed: 0,
            quantization: match pb::Quantization::try_from(spec.quantization) {
                Ok(pb::Quantization::Int8) => Quantization::Int8,
                Ok(pb::Quantization::Unspecified) => Quantization::None,
                Err(_) => {
                    return Err(WorkerError::InvalidRequest(format!(
                        "unknown quantization code {}",
                        spec.quantization
                    )))
                }
            },
        };
        let mut model = Llama::load_tp(
            opened.weights.as_deref(),
            &opened.config,
            shard,
            &opts,
            split,
            &mut |_, _| {},
        )?;
        if let Some(g) = &group {
            if self.device.is_cuda() {
                // Activations stay on the GPU: NCCL sums them; the TCP group
                // keeps carrying the leader's steps.
                model.set_collective(Arc::new(NcclGroup::form(g, g.op_timeout())?))?;
            } else {
                model.set_collective(g.clone())?;
            }
        }
        let shape = model.pool_shape(spec.kv_blocks as usize, spec.block_size as usize);
        let bytes = shape.num_blocks * shape.block_bytes(kind);
        let (_, available) = crate::device::memory(self.device);
        if available > 0 && bytes as u64 > available {
            return Err(WorkerError::LimitExceeded {
                what: format!(
                    "a KV cache of {} blocks of {} positions ({bytes} bytes)",
                    spec.kv_blocks, spec.block_size
                ),
                limit_name: "the memory available on this worker in bytes",
                limit: available as usize,
                got: bytes,
            });
        }
        let pool = model.new_pool(spec.kv_blocks as usize, spec.block_size as usize)?;
        llmos_kernels::cpu::gemv::pool();
        let weight_bytes = model.weight_bytes() as u64;
        let max_context = model.config().max_position as u32;
        tracing::info!(model = %spec.model, layers = ?(spec.layer_start..spec.layer_end), weight_bytes, kv_bytes = pool.bytes(), "shard loaded");
        if let Some(g) = group.as_ref().filter(|g| g.rank() > 0) {
            spawn_follower(spec.model.clone(), g.clone(), me);
        }
        self.links.set(&spec.model, links);
        self.shards.insert(
            spec.model.clone(),
            Hosted {
                spec,
                model,
                pool,
                weight_bytes,
                group,
            },
        );
        Ok(pb::LoadShardResponse {
            weight_bytes,
            load_seconds: started.elapsed().as_secs_f64(),
            max_context,
        })
    }

    /// One batched step of one model's shard; `input` holds the hidden
    /// states that arrived over the pipeline link.
    fn step(&mut self, req: pb::StepRequest, input: Option<Tensor>) -> Result<pb::StepResponse> {
        let h = self
            .shards
            .get_mut(&req.model)
            .ok_or_else(|| WorkerError::UnknownModel(req.model.clone()))?;
        let model = &h.model;
        let cfg = model.config();
        let layout = BatchLayout {
            seqs: req
                .sequences
                .iter()
                .map(|s| SeqSlice {
                    position: s.position as usize,
                    tokens: s.tokens as usize,
                    blocks: s.blocks.clone(),
                })
                .collect(),
            block_size: h.pool.shape().block_size,
        };
        layout.validate(&h.pool.shape(), cfg.max_position)?;
        let t = layout.total_tokens() as i64;
        let mut samplers = Vec::new();
        for (i, s) in req.sequences.iter().enumerate() {
            if let Some(p) = &s.sample {
                let params = SamplingParams::from_wire(p.temperature, p.top_k, p.top_p, p.seed);
                params.validate()?;
                samplers.push((i, Sampler::new(params), s.sample_index));
            }
        }
        let logit_rows: Vec<usize> = req
            .sequences
            .iter()
            .enumerate()
            .filter(|(_, s)| s.sample.is_some() || s.want_logits)
            .map(|(i, _)| i)
            .collect();
        if !logit_rows.is_empty() && !model.shard().head {
            return Err(WorkerError::InvalidRequest(
                "this shard holds no LM head".into(),
            ));
        }
        let ids = match &req.input {
            Some(pb::step_request::Input::Tokens(w)) => {
                if !model.shard().embed {
                    return Err(WorkerError::InvalidRequest(
                        "this shard holds no embedding: send hidden states".into(),
                    ));
                }
                let ids = from_wire(w, "tokens")?;
                if ids.kind() != Kind::Int64 || ids.size() != [t] {
                    return Err(WorkerError::InvalidRequest(format!(
                        "tokens must be int64 [{t}] (the step's packed tokens), got {:?} {:?}",
                        ids.kind(),
                        ids.size()
                    )));
                }
                let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
                if min < 0 || max >= cfg.vocab_size as i64 {
                    return Err(WorkerError::InvalidRequest(format!(
                        "token ids must be in 0..{}, got {min}..={max}",
                        cfg.vocab_size
                    )));
                }
                Some(ids)
            }
            Some(pb::step_request::Input::Hidden(_) | pb::step_request::Input::FromPrevious(_))
                if model.shard().embed =>
            {
                return Err(WorkerError::InvalidRequest(
                    "this shard embeds tokens: send token ids".into(),
                ))
            }
            Some(pb::step_request::Input::Hidden(_) | pb::step_request::Input::FromPrevious(_)) => {
                None
            }
            None => {
                return Err(WorkerError::InvalidRequest(
                    "the request has no input".into(),
                ))
            }
        };
        // One token of one sequence takes the fused decode step.
        let fused = t == 1 && layout.seqs.len() == 1 && model.fused_layers_supported();
        let leader = h.group.as_ref().filter(|g| g.rank() == 0).cloned();
        let follower = h.group.as_ref().is_some_and(|g| g.rank() > 0);
        // The input as hidden states, unless the fused step embeds the token
        // itself (a tensor-parallel leader embeds first: its group gets
        // hidden states).
        let x: Option<Tensor> = match (&ids, &req.input) {
            (Some(_), _) if fused && leader.is_none() => None,
            (Some(ids), _) => Some(model.embed_packed(ids)?),
            (None, Some(input_kind)) => {
                let x = match input_kind {
                    pb::step_request::Input::Hidden(w) => from_wire(w, "hidden")?,
                    _ => input.ok_or_else(|| {
                        WorkerError::InvalidRequest(
                            "no hidden states arrived over the pipeline link".into(),
                        )
                    })?,
                };
                if x.size() != [t, cfg.hidden_size as i64] {
                    return Err(WorkerError::InvalidRequest(format!(
                        "hidden must be [{t}, {}], got {:?}",
                        cfg.hidden_size,
                        x.size()
                    )));
                }
                Some(x)
            }
            _ => unreachable!("checked above"),
        };
        if let (Some(g), Some(x)) = (&leader, &x) {
            // The step for the other ranks: the same layout, this input.
            let step = pb::StepRequest {
                model: req.model.clone(),
                sequences: crate::engine::stage::layout_only(&req.sequences),
                input: Some(pb::step_request::Input::Hidden(to_wire(
                    &x.to_kind(Kind::Float),
                ))),
                ..Default::default()
            };
            g.send_control(&step.encode_to_vec())?;
        }
        // Logits of the requested rows, as one flat f32 vector.
        let vocab = cfg.vocab_size;
        let (hidden, logits): (Option<Tensor>, Vec<f32>) = if fused {
            if tch::get_num_threads() != 1 {
                tch::set_num_threads(1);
            }
            let s = &layout.seqs[0];
            let mut seq = PagedSeq {
                pool: &mut h.pool,
                blocks: &s.blocks,
                position: s.position,
            };
            let out = match (&x, &ids) {
                (None, Some(ids)) => {
                    let x = model.embed_row(ids.int64_value(&[0]) as u32)?;
                    model.decode_hidden(x, &mut seq)?
                }
                (Some(x), _) => {
                    let v = Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1]))?;
                    model.decode_hidden(v, &mut seq)?
                }
                (None, None) => unreachable!("an input was checked"),
            };
            if model.shard().head {
                (
                    None,
                    if logit_rows.is_empty() {
                        Vec::new()
                    } else {
                        out
                    },
                )
            } else {
                let width = out.len() as i64;
                (Some(Tensor::from_slice(&out).view([1, width])), Vec::new())
            }
        } else {
            // Steps whose products all run on the `gemv` kernels' pool
            // leave libtorch only small element-wise work: its threads
            // would spin against the pool's.
            let want = if model.projections_on_pool(t) {
                1
            } else {
                self.threads
            };
            if tch::get_num_threads() != want {
                tch::set_num_threads(want);
            }
            let x = x.expect("the batched path embeds first");
            let out = model.forward_batch(&x, &layout, &mut h.pool)?;
            if model.shard().head {
                let last = layout.last_rows();
                let rows: Vec<i64> = logit_rows.iter().map(|&i| last[i]).collect();
                let logits = if rows.is_empty() {
                    Vec::new()
                } else {
                    Vec::try_from(
                        model
                            .logits_rows(&out, &rows)?
                            .to_device(Device::Cpu)
                            .reshape([-1]),
                    )?
                };
                (None, logits)
            } else {
                (Some(out), Vec::new())
            }
        };
        if follower {
            // The leader answers for the group.
            return Ok(pb::StepResponse::default());
        }
        if req.to_next {
            let Some(hidden) = &hidden else {
                return Err(WorkerError::InvalidRequest(
                    "a step asked the last stage to pass hidden states on".into(),
                ));
            };
            let Some(next) = self.links.get(&req.model).next else {
                return Err(WorkerError::StepFailed(
                    "this stage's pipeline link to the next stage is not formed".into(),
                ));
            };
            next.send(req.step_id, hidden)?;
            return Ok(pb::StepResponse::default());
        }
        let row_of = |seq: usize| {
            logit_rows
                .iter()
                .position(|&i| i == seq)
                .expect("a logit row")
        };
        // Rows sample independently (each a pass over the vocabulary for
        // its log-probability): across the decode pool.
        let samplers: Vec<_> = samplers.into_iter().map(std::sync::Mutex::new).collect();
        let mut tokens = vec![pb::SampledToken::default(); samplers.len()];
        let picked = llmos_kernels::cpu::spin_pool::SharedSlot(tokens.as_mut_ptr());
        llmos_kernels::cpu::gemv::pool().run(samplers.len(), &|n| {
            let mut guard = samplers[n].lock().unwrap_or_else(|e| e.into_inner());
            let (i, sampler, index) = &mut *guard;
            let r = row_of(*i);
            let (id, logprob) = sampler.sample_at(&logits[r * vocab..(r + 1) * vocab], *index);
            // SAFETY: task `n` alone writes element `n`, which is in bounds.
            unsafe { *picked.at(n) = pb::SampledToken { id, logprob } };
        });
        let want: Vec<usize> = req
            .sequences
            .iter()
            .enumerate()
            .filter(|(_, s)| s.want_logits)
            .map(|(i, _)| row_of(i))
            .collect();
        let logits = (!want.is_empty()).then(|| {
            let rows: Vec<f32> = want
                .iter()
                .flat_map(|&r| logits[r * vocab..(r + 1) * vocab].iter().copied())
                .collect();
            to_wire(&Tensor::from_slice(&rows).view([want.len() as i64, vocab as i64]))
        });
        Ok(pb::StepResponse {
            hidden: hidden.as_ref().map(to_wire),
            tokens,
            logits,
        })
    }

    fn stats(&self) -> pb::StatsResponse {
        let shards = self
            .shards
            .values()
            .map(|h| pb::ShardStats {
                shard: Some(h.spec.clone()),
                weight_bytes: h.weight_bytes,
                kv_cache_bytes: h.pool.bytes() as u64,
                engine: None,
                collective_bytes_sent: h.group.as_ref().map_or(0, |g| g.bytes_sent()),
                link_bytes_sent: self
                    .links
                    .get(&h.spec.model)
                    .next
                    .map_or(0, |l| l.bytes_sent()),
            })
            .collect();
        let (total, available) = crate::device::memory(self.device);
        pb::StatsResponse {
            shards,
            memory_total_bytes: total,
            memory_available_bytes: available,
        }
    }
}

/// A follower rank's loop: each step the leader broadcasts runs here too
/// (through the host thread, like any step), until the group closes or
/// breaks. Its result is the leader's to report.
fn spawn_follower(model: String, group: Arc<TcpGroup>, host: std::sync::mpsc::Sender<Command>) {
    let name = format!("llmos-tp-rank-{}", group.rank());
    let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
        let msg = match group.recv_control() {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(%model, rank = group.rank(), reason = %e, "tensor-parallel follower stops");
                return;
            }
        };
        let req = match pb::StepRequest::decode(msg.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%model, error = %e, "a step from the leader does not decode");
                group.close();
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        if host.send(Command::Step(req, None, tx)).is_err() {
            return;
        }
        match rx.blocking_recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // The ranks are out of step now: end the group so the
                // leader fails at once instead of waiting out its deadline.
                tracing::warn!(%model, rank = group.rank(), error = %e, "a follower step failed");
                group.close();
                return;
            }
            Err(_) => return,
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a tensor-parallel follower thread");
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
