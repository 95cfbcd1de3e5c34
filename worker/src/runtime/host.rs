//! What the host thread does: load a shard (its tensor-parallel group and
//! pipeline links first, then the weights and a KV pool that fits the
//! device), run a step of it (the fused one-token CPU step or the batched
//! forward, then sampling), report stats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_meta::{ModelSpec, OpenedModel};
use tch::{Device, Kind, Tensor};

use super::error::{Result, RuntimeError};
use super::follower::{spawn_follower, FollowerStep};
use super::links::{relink, LinkTable, Links};
use super::step::{
    HostStats, Loaded, SampleAt, Sampled, ShardConfig, ShardStats, Step, StepInput, StepOutput,
};
use super::Command;
use crate::comm::{Collective, NcclGroup, Rendezvous, TcpGroup};
use crate::kv::{BatchLayout, KvPool, SeqSlice};
use crate::metrics::{metrics, Stage, Timed};
use crate::model::cpu_decode::PagedSeq;
use crate::model::llama::LoadOptions;
use crate::model::{Llama, ShardSpec};

/// How long the ranks of a tensor-parallel group wait for each other to
/// link up.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// A collective without an answer fails after this when the config says
/// nothing.
const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);

struct Hosted {
    config: ShardConfig,
    model: Llama,
    pool: KvPool,
    weight_bytes: u64,
    /// The stage's tensor-parallel group (this shard is one rank of it).
    /// Its pipeline links are in the host's `LinkTable`.
    group: Option<Arc<TcpGroup>>,
    /// A first stage of several (it embeds, the head is elsewhere): the
    /// hidden states it sent on, one row per KV slot `[slots, hidden]`,
    /// written with the slot's keys and values. When a later stage is
    /// replaced, the engine recomputes that stage's cache from these rows
    /// instead of re-running this stage (`Host::boundary`). Allocated at
    /// the first step, in float32.
    boundary: Option<Tensor>,
}

impl Drop for Hosted {
    fn drop(&mut self) {
        // Ends a follower's wait for steps and the peers' operations.
        if let Some(g) = &self.group {
            g.close();
        }
    }
}

pub(super) struct Host {
    shards: HashMap<String, Hosted>,
    /// libtorch's intra-op threads for batched steps (the fused one-token
    /// step runs on its own pool with libtorch at one thread).
    threads: i32,
    rendezvous: Option<Arc<Rendezvous>>,
    device: Device,
    links: LinkTable,
}

impl Host {
    pub(super) fn new(
        rendezvous: Option<Arc<Rendezvous>>,
        device: Device,
        links: LinkTable,
    ) -> Self {
        Host {
            shards: HashMap::new(),
            threads: tch::get_num_threads(),
            rendezvous,
            device,
            links,
        }
    }

    pub(super) fn handle(&mut self, cmd: Command) {
        // A dropped reply receiver means the caller went away: nothing to do.
        match cmd {
            Command::Load(config, me, tx) => drop(tx.send(self.load(config, me))),
            Command::Adopt(config, model, tx) => drop(tx.send(self.adopt(config, *model))),
            Command::Reserve(model, blocks, tx) => drop(tx.send(self.reserve(&model, blocks))),
            Command::Unload(model, tx) => {
                self.links.remove(&model);
                let r = match self.shards.remove(&model) {
                    Some(_) => Ok(()),
                    None => Err(RuntimeError::UnknownModel(model)),
                };
                drop(tx.send(r));
            }
            Command::Step(step, input, tx) => drop(tx.send(self.step(step, input))),
            Command::Boundary(model, slots, tx) => drop(tx.send(self.boundary(&model, &slots))),
            Command::Stats(tx) => drop(tx.send(self.stats())),
        }
    }

    fn relink(&self, config: &ShardConfig, old: Links, hidden: usize) -> Result<Links> {
        relink(
            self.rendezvous.as_deref(),
            self.device,
            config,
            old,
            hidden as i64,
            FORM_TIMEOUT,
            DEFAULT_COLLECTIVE_TIMEOUT,
        )
    }

    fn load(
        &mut self,
        config: ShardConfig,
        me: std::sync::mpsc::Sender<Command>,
    ) -> Result<Loaded> {
        let started = Instant::now();
        let intact = |h: &&mut Hosted| h.group.as_ref().is_none_or(|g| !g.is_broken());
        let same = |h: &&mut Hosted| h.config.without_links() == config.without_links();
        if self
            .shards
            .get_mut(&config.model)
            .filter(same)
            .filter(intact)
            .is_some()
        {
            // Asked again (a coordinator replica after re-registration, or a
            // neighbouring stage restarted): keep the weights and the cache;
            // links whose config changed or that broke are formed anew.
            let h = &self.shards[&config.model];
            let (hidden, weight_bytes, max_context, vocab_size) = (
                h.model.config().hidden_size,
                h.weight_bytes,
                h.model.config().max_position,
                h.model.config().vocab_size,
            );
            let links = self
                .relink(&config, self.links.get(&config.model), hidden)
                .inspect_err(|_| self.links.remove(&config.model))?;
            self.links.set(&config.model, links);
            if let Some(h) = self.shards.get_mut(&config.model) {
                h.config = config;
            }
            return Ok(Loaded {
                weight_bytes,
                load_seconds: started.elapsed().as_secs_f64(),
                max_context,
                vocab_size,
                kept: true,
            });
        }
        // Replacing a shard: free the old one first.
        self.links.remove(&config.model);
        self.shards.remove(&config.model);
        let opened = OpenedModel::open(&ModelSpec::parse(&config.source)?)?;
        let tp = config.tensor_parallel.clone().filter(|t| t.world_size > 1);
        let split = match &tp {
            Some(t) => Some(
                opened
                    .config
                    .tp_split(t.rank, t.world_size)
                    .map_err(RuntimeError::Invalid)?,
            ),
            None => None,
        };
        // The group links up before the (slow) load, so a missing rank fails
        // the deployment at once.
        let group = match &tp {
            Some(t) => {
                if t.peers.len() != t.world_size {
                    return Err(RuntimeError::Invalid(format!(
                        "a group of {} ranks with {} peer addresses",
                        t.world_size,
                        t.peers.len()
                    )));
                }
                let rv = self.rendezvous.as_ref().ok_or_else(|| {
                    RuntimeError::Invalid(
                        "this worker has no collective listener: it cannot hold a tensor-parallel shard"
                            .into(),
                    )
                })?;
                let op_timeout = t.timeout.unwrap_or(DEFAULT_COLLECTIVE_TIMEOUT);
                Some(Arc::new(rv.form(
                    &t.group,
                    t.rank,
                    &t.peers,
                    FORM_TIMEOUT,
                    op_timeout,
                )?))
            }
            None => None,
        };
        // So are the pipeline links.
        let links = self.relink(&config, Links::default(), opened.config.hidden_size)?;
        let shard = ShardSpec {
            layers: config.layers.clone(),
            embed: config.embed,
            head: config.head,
        };
        let opts = LoadOptions {
            kind: config.kind,
            device: self.device,
            seed: 0,
            quantization: config.quantization,
            kv_kind: config.kv_kind,
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
            let stage = Stage::new(&config.model, &config.layers, g.rank());
            if self.device.is_cuda() {
                // Activations stay on the GPU: NCCL sums them; the TCP group
                // keeps carrying the leader's steps.
                let nccl: Arc<dyn Collective> = Arc::new(NcclGroup::form(g, g.op_timeout())?);
                model.set_collective(Arc::new(Timed::new(nccl, &stage)))?;
            } else {
                model.set_collective(Arc::new(Timed::new(g.clone(), &stage)))?;
            }
        }
        let name = config.model.clone();
        let follower = group.as_ref().filter(|g| g.rank() > 0).cloned();
        let loaded = self.insert(config, model, group, started)?;
        if let Some(g) = follower {
            spawn_follower(name.clone(), g, me);
        }
        self.links.set(&name, links);
        Ok(loaded)
    }

    /// Holds `model` with a KV pool of the configured size (refused when
    /// the device cannot hold it).
    fn insert(
        &mut self,
        config: ShardConfig,
        model: Llama,
        group: Option<Arc<TcpGroup>>,
        started: Instant,
    ) -> Result<Loaded> {
        self.check_fit(&model, config.kv_blocks, config.block_size)?;
        let pool = model.new_pool(config.kv_blocks, config.block_size)?;
        llmos_kernels::cpu::gemv::pool();
        let weight_bytes = model.weight_bytes() as u64;
        let max_context = model.config().max_position;
        let vocab_size = model.config().vocab_size;
        tracing::info!(model = %config.model, layers = ?config.layers, weight_bytes, kv_bytes = pool.bytes(), "shard loaded");
        self.shards.insert(
            config.model.clone(),
            Hosted {
                config,
                model,
                pool,
                weight_bytes,
                group,
                boundary: None,
            },
        );
        Ok(Loaded {
            weight_bytes,
            load_seconds: started.elapsed().as_secs_f64(),
            max_context,
            vocab_size,
            kept: false,
        })
    }

    /// Refuses a KV pool the device's available memory cannot hold.
    fn check_fit(&self, model: &Llama, blocks: usize, block_size: usize) -> Result<()> {
        let shape = model.pool_shape(blocks, block_size);
        let mut bytes = shape.num_blocks * shape.block_bytes(model.kind());
        if model.shard().embed && !model.shard().head {
            // A first stage of several also keeps its boundary rows.
            bytes += model.config().boundary_bytes(blocks * block_size) as usize;
        }
        let (_, available) = super::device::memory(self.device);
        if available > 0 && bytes as u64 > available {
            return Err(RuntimeError::LimitExceeded {
                what: format!(
                    "a KV cache of {blocks} blocks of {block_size} positions ({bytes} bytes)"
                ),
                limit_name: "the memory available on this worker in bytes",
                limit: available as usize,
                got: bytes,
            });
        }
        Ok(())
    }

    fn adopt(&mut self, config: ShardConfig, model: Llama) -> Result<Loaded> {
        if config.tensor_parallel.is_some()
            || config.prev_link.is_some()
            || config.next_link.is_some()
        {
            return Err(RuntimeError::Invalid(
                "an adopted model is hosted whole: no tensor-parallel group or pipeline links"
                    .into(),
            ));
        }
        self.links.remove(&config.model);
        self.shards.remove(&config.model);
        self.insert(config, model, None, Instant::now())
    }

    fn reserve(&mut self, model: &str, blocks: usize) -> Result<usize> {
        let h = self
            .shards
            .get(model)
            .ok_or_else(|| RuntimeError::UnknownModel(model.to_string()))?;
        let have = h.pool.shape();
        if have.num_blocks >= blocks {
            return Ok(have.num_blocks);
        }
        self.check_fit(&h.model, blocks, have.block_size)?;
        let h = self.shards.get_mut(model).expect("looked up above");
        // The old pool goes first, so both are never held at once.
        h.pool = h.model.new_pool(1, have.block_size)?;
        h.pool = h.model.new_pool(blocks, have.block_size)?;
        h.boundary = None;
        h.config.kv_blocks = blocks;
        Ok(blocks)
    }

    /// The metrics labels of `model`'s stage here.
    fn stage(&self, model: &str) -> Option<Stage> {
        self.shards.get(model).map(|h| {
            Stage::new(
                model,
                &h.config.layers,
                h.group.as_ref().map_or(0, |g| g.rank()),
            )
        })
    }

    /// One batched step of one model's shard (timed into the stage's
    /// metrics, its send to the next stage included); `input` holds the
    /// hidden states that arrived over the pipeline link.
    fn step(&mut self, step: Step, input: Option<Tensor>) -> Result<StepOutput> {
        let began = Instant::now();
        let tokens = step.tokens();
        let stage = self.stage(&step.model);
        // The step serves every sequence in it: a child of the first
        // traced one's span, linked to the others'.
        let mut traces = step.seqs.iter().filter_map(|s| s.trace.as_deref());
        let span = match traces.next() {
            Some(first) => {
                let span = tracing::info_span!(
                    "step",
                    model = %step.model,
                    stage = stage.as_ref().map_or("", |s| s.layers.as_str()),
                    // Integers as i64: OpenTelemetry's integer attribute.
                    rank = stage.as_ref().map_or(0, |s| s.rank) as i64,
                    step_id = step.id as i64,
                    sequences = step.seqs.len() as i64,
                    tokens = tokens as i64,
                );
                llmos_meta::logging::set_parent(&span, Some(first));
                for t in traces {
                    llmos_meta::logging::add_link(&span, t);
                }
                span
            }
            // No sequence is traced (a tensor-parallel follower's step
            // carries none): no orphan span.
            None => tracing::Span::none(),
        };
        let _entered = span.enter();
        let out = self.run_step(step, input, stage.as_ref());
        if let (Ok(_), Some(stage)) = (&out, &stage) {
            metrics().step(stage, tokens, began.elapsed().as_secs_f64());
        }
        out
    }

    fn run_step(
        &mut self,
        step: Step,
        input: Option<Tensor>,
        stage: Option<&Stage>,
    ) -> Result<StepOutput> {
        let h = self
            .shards
            .get_mut(&step.model)
            .ok_or_else(|| RuntimeError::UnknownModel(step.model.clone()))?;
        let model = &h.model;
        let cfg = model.config();
        let layout = BatchLayout {
            seqs: step
                .seqs
                .iter()
                .map(|s| SeqSlice {
                    position: s.position,
                    tokens: s.tokens,
                    blocks: s.blocks.clone(),
                })
                .collect(),
            block_size: h.pool.shape().block_size,
        };
        layout.validate(&h.pool.shape(), cfg.max_position)?;
        let t = layout.total_tokens() as i64;
        let mut samplers = Vec::new();
        for (i, s) in step.seqs.iter().enumerate() {
            if let Some(at) = &s.sample {
                at.params.validate()?;
                samplers.push((i, at));
            }
        }
        let logit_rows: Vec<usize> = step
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.sample.is_some() || s.want_logits)
            .map(|(i, _)| i)
            .collect();
        if !logit_rows.is_empty() && !model.shard().head {
            return Err(RuntimeError::Invalid("this shard holds no LM head".into()));
        }
        let ids = match &step.input {
            StepInput::Tokens(ids) => {
                if !model.shard().embed {
                    return Err(RuntimeError::Invalid(
                        "this shard holds no embedding: send hidden states".into(),
                    ));
                }
                if ids.len() as i64 != t {
                    return Err(RuntimeError::Invalid(format!(
                        "the step has {t} tokens in its sequences but {} token ids",
                        ids.len()
                    )));
                }
                llmos_meta::request::check_prompt(ids, cfg.vocab_size)?;
                Some(ids)
            }
            StepInput::Hidden(_) | StepInput::FromPrevious if model.shard().embed => {
                return Err(RuntimeError::Invalid(
                    "this shard embeds tokens: send token ids".into(),
                ))
            }
            StepInput::Hidden(_) | StepInput::FromPrevious => None,
        };
        // One token of one sequence takes the fused decode step.
        let fused = t == 1 && layout.seqs.len() == 1 && model.fused_layers_supported();
        let leader = h.group.as_ref().filter(|g| g.rank() == 0).cloned();
        let follower = h.group.as_ref().is_some_and(|g| g.rank() > 0);
        // The input as hidden states, unless the fused step embeds the token
        // itself (a tensor-parallel leader embeds first: its group gets
        // hidden states).
        let x: Option<Tensor> = match (ids, &step.input) {
            (Some(_), _) if fused && leader.is_none() => None,
            (Some(ids), _) => {
                let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                Some(model.embed_packed(&Tensor::from_slice(&ids))?)
            }
            (None, input_kind) => {
                let x = match input_kind {
                    StepInput::Hidden(x) => x.shallow_clone(),
                    _ => input.ok_or_else(|| {
                        RuntimeError::Invalid(
                            "no hidden states arrived over the pipeline link".into(),
                        )
                    })?,
                };
                if x.size() != [t, cfg.hidden_size as i64] {
                    return Err(RuntimeError::Invalid(format!(
                        "hidden must be [{t}, {}], got {:?}",
                        cfg.hidden_size,
                        x.size()
                    )));
                }
                Some(x.to_device(self.device))
            }
        };
        if let (Some(g), Some(x)) = (&leader, &x) {
            // The step for the other ranks: the same layout, this input.
            let msg = FollowerStep {
                seqs: step.layout_only(),
                hidden: x.to_kind(Kind::Float),
            };
            g.send_control(&msg.encode()?)?;
        }
        let (hidden, logits) = if fused {
            let s = &layout.seqs[0];
            let mut seq = PagedSeq {
                pool: &mut h.pool,
                blocks: &s.blocks,
                position: s.position,
            };
            fused_step(model, &mut seq, x, ids, !logit_rows.is_empty())?
        } else {
            // Steps whose products all run on the `gemv` kernels' pool
            // leave libtorch only small element-wise work: its threads
            // would spin against the pool's.
            let want = if model.projections_on_pool(t) {
                1
            } else {
                self.threads
            };
            set_threads(want);
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
            return Ok(StepOutput::default());
        }
        if let (Some(hidden), true) = (&hidden, model.shard().embed) {
            let slots = Tensor::from_slice(&layout.slots()).to_device(hidden.device());
            // In float32 whatever the step sent (the fused step sends
            // float32, a batched bf16 step bf16): both kept exactly.
            let rows = h.boundary.get_or_insert_with(|| {
                let shape = h.pool.shape();
                Tensor::zeros(
                    [
                        (shape.num_blocks * shape.block_size) as i64,
                        hidden.size()[1],
                    ],
                    (Kind::Float, hidden.device()),
                )
            });
            let _ = rows.index_copy_(0, &slots, &hidden.to_kind(Kind::Float));
        }
        if step.to_next {
            let Some(hidden) = &hidden else {
                return Err(RuntimeError::Invalid(
                    "a step asked the last stage to pass hidden states on".into(),
                ));
            };
            let Some(next) = self.links.get(&step.model).next else {
                return Err(RuntimeError::LinkMissing(
                    "this stage's pipeline link to the next stage is not formed".into(),
                ));
            };
            let sent = Instant::now();
            next.send(step.id, hidden)?;
            if let Some(stage) = stage {
                let bytes = hidden.numel() as u64 * hidden.kind().elt_size_in_bytes() as u64;
                metrics().link_send(stage, bytes, sent.elapsed().as_secs_f64());
            }
            return Ok(StepOutput::default());
        }
        let vocab = cfg.vocab_size;
        let row_of = |seq: usize| {
            logit_rows
                .iter()
                .position(|&i| i == seq)
                .expect("a logit row")
        };
        let tokens = sample_rows(samplers, &logits, vocab, row_of);
        let want: Vec<usize> = step
            .seqs
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
            Tensor::from_slice(&rows).view([want.len() as i64, vocab as i64])
        });
        Ok(StepOutput {
            hidden,
            tokens,
            logits,
        })
    }

    /// The hidden states a first stage sent on for these KV slots (see
    /// `Hosted::boundary`), `[slots, hidden]`.
    fn boundary(&self, model: &str, slots: &[i64]) -> Result<Tensor> {
        let h = self
            .shards
            .get(model)
            .ok_or_else(|| RuntimeError::UnknownModel(model.to_string()))?;
        let rows = h.boundary.as_ref().ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "model {model:?}'s shard here keeps no boundary hidden states (it is not a first stage of several, or ran no step)"
            ))
        })?;
        let n = rows.size()[0];
        if let Some(bad) = slots.iter().find(|&&s| s < 0 || s >= n) {
            return Err(RuntimeError::Invalid(format!(
                "KV slot {bad} is outside model {model:?}'s pool of {n} slots"
            )));
        }
        let idx = Tensor::from_slice(slots).to_device(rows.device());
        Ok(rows.index_select(0, &idx))
    }

    fn stats(&self) -> HostStats {
        let shards = self
            .shards
            .values()
            .map(|h| ShardStats {
                config: h.config.clone(),
                weight_bytes: h.weight_bytes,
                kv_cache_bytes: (h.pool.bytes()
                    + h.boundary
                        .as_ref()
                        .map_or(0, |b| b.numel() * b.kind().elt_size_in_bytes()))
                    as u64,
                collective_bytes_sent: h.group.as_ref().map_or(0, |g| g.bytes_sent()),
                link_bytes_sent: self
                    .links
                    .get(&h.config.model)
                    .next
                    .map_or(0, |l| l.bytes_sent()),
            })
            .collect();
        let (total, available) = super::device::memory(self.device);
        HostStats {
            shards,
            memory_total_bytes: total,
            memory_available_bytes: available,
        }
    }
}

fn set_threads(n: i32) {
    if tch::get_num_threads() != n {
        tch::set_num_threads(n);
    }
}

/// The fused one-token step of one sequence: from the token (`x` is None)
/// or from hidden states. Returns the output hidden states (a shard
/// without the head) or the logits row (when `want_logits`).
fn fused_step(
    model: &Llama,
    seq: &mut PagedSeq<'_>,
    x: Option<Tensor>,
    ids: Option<&Vec<u32>>,
    want_logits: bool,
) -> Result<(Option<Tensor>, Vec<f32>)> {
    set_threads(1);
    let x = match (x, ids) {
        (None, Some(ids)) => model.embed_row(ids[0])?,
        (Some(x), _) => Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1]))?,
        (None, None) => unreachable!("an input was checked"),
    };
    let out = model.decode_hidden(x, seq)?;
    Ok(if model.shard().head {
        (None, if want_logits { out } else { Vec::new() })
    } else {
        let width = out.len() as i64;
        (Some(Tensor::from_slice(&out).view([1, width])), Vec::new())
    })
}

/// Samples each row's token (`logits` holds the logit rows, `row_of` maps
/// a sequence to its row). Rows sample independently (each a pass over
/// the vocabulary for its log-probability): across the decode pool.
fn sample_rows(
    samplers: Vec<(usize, &SampleAt)>,
    logits: &[f32],
    vocab: usize,
    row_of: impl Fn(usize) -> usize + Sync,
) -> Vec<Sampled> {
    let mut tokens = vec![Sampled::default(); samplers.len()];
    let picked = llmos_kernels::cpu::spin_pool::SharedSlot(tokens.as_mut_ptr());
    llmos_kernels::cpu::gemv::pool().run(samplers.len(), &|n| {
        let (i, at) = samplers[n];
        let r = row_of(i);
        let row = &logits[r * vocab..(r + 1) * vocab];
        let choice = crate::sampling::choose(&at.params, row, at.index, at.history.as_ref());
        // SAFETY: task `n` alone writes element `n`, which is in bounds.
        unsafe { *picked.at(n) = choice };
    });
    tokens
}
