//! The shard host: one OS thread owns the loaded shards and every sequence's
//! KV cache (libtorch work is blocking); `HostHandle` sends it commands.

use std::collections::HashMap;
use std::time::Instant;

use llmos_meta::{ModelSpec, OpenedModel};
use llmos_proto::worker::v1 as pb;
use tch::{Device, Kind};
use tokio::sync::oneshot;

use super::codec::{from_wire, to_wire};
use crate::error::{Result, WorkerError};
use crate::kv_cache::KvCache;
use crate::model::llama::LoadOptions;
use crate::model::{Llama, ShardSpec};
use crate::sampling::{Sampler, SamplingParams};

/// Initial cache capacity of a new sequence (it grows by doubling).
const INITIAL_CACHE_POSITIONS: usize = 64;

struct Hosted {
    spec: pb::ShardSpec,
    model: Llama,
    caches: HashMap<String, KvCache>,
    /// Per-sequence samplers of a last stage that samples.
    samplers: HashMap<String, Sampler>,
    weight_bytes: u64,
}

enum Command {
    Load(
        pb::ShardSpec,
        oneshot::Sender<Result<pb::LoadShardResponse>>,
    ),
    Unload(String, oneshot::Sender<Result<()>>),
    Forward(
        pb::ForwardRequest,
        oneshot::Sender<Result<pb::ForwardResponse>>,
    ),
    Release(String, String, oneshot::Sender<Result<bool>>),
    Stats(oneshot::Sender<pb::StatsResponse>),
}

#[derive(Clone)]
pub struct HostHandle {
    tx: std::sync::mpsc::Sender<Command>,
}

impl HostHandle {
    /// Starts the host thread; it ends when every handle is dropped.
    pub fn spawn() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("llmos-shard-host".into())
            .spawn(move || {
                let _no_grad = tch::no_grad_guard();
                let mut host = Host {
                    shards: HashMap::new(),
                };
                while let Ok(cmd) = rx.recv() {
                    host.handle(cmd);
                }
            })
            .expect("spawn the shard host thread");
        HostHandle { tx }
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| WorkerError::HostStopped)?;
        rx.await.map_err(|_| WorkerError::HostStopped)
    }

    pub async fn load(&self, spec: pb::ShardSpec) -> Result<pb::LoadShardResponse> {
        self.call(|tx| Command::Load(spec, tx)).await?
    }

    pub async fn unload(&self, model: String) -> Result<()> {
        self.call(|tx| Command::Unload(model, tx)).await?
    }

    pub async fn forward(&self, req: pb::ForwardRequest) -> Result<pb::ForwardResponse> {
        self.call(|tx| Command::Forward(req, tx)).await?
    }

    pub async fn release(&self, model: String, sequence: String) -> Result<bool> {
        self.call(|tx| Command::Release(model, sequence, tx))
            .await?
    }

    pub async fn stats(&self) -> Result<pb::StatsResponse> {
        self.call(Command::Stats).await
    }
}

struct Host {
    shards: HashMap<String, Hosted>,
}

impl Host {
    fn handle(&mut self, cmd: Command) {
        // A dropped reply receiver means the caller went away: nothing to do.
        match cmd {
            Command::Load(spec, tx) => drop(tx.send(self.load(spec))),
            Command::Unload(model, tx) => {
                let r = match self.shards.remove(&model) {
                    Some(_) => Ok(()),
                    None => Err(WorkerError::UnknownModel(model)),
                };
                drop(tx.send(r));
            }
            Command::Forward(req, tx) => drop(tx.send(self.forward(req))),
            Command::Release(model, seq, tx) => {
                let r = match self.shards.get_mut(&model) {
                    Some(h) => {
                        h.samplers.remove(&seq);
                        Ok(h.caches.remove(&seq).is_some())
                    }
                    None => Err(WorkerError::UnknownModel(model)),
                };
                drop(tx.send(r));
            }
            Command::Stats(tx) => drop(tx.send(self.stats())),
        }
    }

    fn load(&mut self, spec: pb::ShardSpec) -> Result<pb::LoadShardResponse> {
        let started = Instant::now();
        if let Some(h) = self.shards.get(&spec.model).filter(|h| h.spec == spec) {
            // Asked again (a coordinator replica after re-registration):
            // keep the weights and the sequences' caches.
            return Ok(pb::LoadShardResponse {
                weight_bytes: h.weight_bytes,
                load_seconds: 0.0,
            });
        }
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
        let shard = ShardSpec {
            layers: spec.layer_start as usize..spec.layer_end as usize,
            embed: spec.embed,
            head: spec.head,
        };
        let opts = LoadOptions {
            kind,
            device: Device::Cpu,
            seed: 0,
        };
        let model = Llama::load(
            opened.weights.as_deref(),
            &opened.config,
            shard,
            &opts,
            &mut |_, _| {},
        )?;
        crate::gemv::pool();
        let weight_bytes = model.weight_bytes() as u64;
        tracing::info!(model = %spec.model, layers = ?(spec.layer_start..spec.layer_end), weight_bytes, "shard loaded");
        self.shards.insert(
            spec.model.clone(),
            Hosted {
                spec,
                model,
                caches: HashMap::new(),
                samplers: HashMap::new(),
                weight_bytes,
            },
        );
        Ok(pb::LoadShardResponse {
            weight_bytes,
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn forward(&mut self, req: pb::ForwardRequest) -> Result<pb::ForwardResponse> {
        let h = self
            .shards
            .get_mut(&req.model)
            .ok_or_else(|| WorkerError::UnknownModel(req.model.clone()))?;
        let model = &h.model;
        let cfg = model.config();
        let x = match req.input {
            Some(pb::forward_request::Input::Tokens(w)) => {
                if !model.shard().embed {
                    return Err(WorkerError::InvalidRequest(
                        "this shard holds no embedding: send hidden states".into(),
                    ));
                }
                let ids = from_wire(&w, "tokens")?;
                if ids.kind() != Kind::Int64 || ids.dim() != 2 || ids.size()[0] != 1 {
                    return Err(WorkerError::InvalidRequest(format!(
                        "tokens must be int64 [1, t], got {:?} {:?}",
                        ids.kind(),
                        ids.size()
                    )));
                }
                let max = ids.max().int64_value(&[]);
                let min = ids.min().int64_value(&[]);
                if min < 0 || max >= cfg.vocab_size as i64 {
                    return Err(WorkerError::InvalidRequest(format!(
                        "token ids must be in 0..{}, got {min}..={max}",
                        cfg.vocab_size
                    )));
                }
                model.embed(&ids)?
            }
            Some(pb::forward_request::Input::Hidden(w)) => {
                if model.shard().embed {
                    return Err(WorkerError::InvalidRequest(
                        "this shard embeds tokens: send token ids".into(),
                    ));
                }
                let x = from_wire(&w, "hidden")?;
                let s = x.size();
                if s.len() != 3 || s[0] != 1 || s[2] != cfg.hidden_size as i64 {
                    return Err(WorkerError::InvalidRequest(format!(
                        "hidden must be [1, t, {}], got {s:?}",
                        cfg.hidden_size
                    )));
                }
                x.to_kind(model.kind())
            }
            None => {
                return Err(WorkerError::InvalidRequest(
                    "the request has no input".into(),
                ))
            }
        };
        let sampling = match &req.sample {
            Some(s) => {
                let p = SamplingParams {
                    temperature: s.temperature,
                    top_k: s.top_k as usize,
                    top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
                    seed: s.seed,
                };
                p.validate()?;
                Some(p)
            }
            None => None,
        };
        if (req.want_logits || sampling.is_some()) && !model.shard().head {
            return Err(WorkerError::InvalidRequest(
                "this shard holds no LM head".into(),
            ));
        }
        let t = x.size()[1] as usize;
        let cache = h
            .caches
            .entry(req.sequence_id.clone())
            .or_insert_with(|| model.new_cache(1, INITIAL_CACHE_POSITIONS.max(t)));
        if req.position as usize != cache.len() {
            return Err(WorkerError::PositionMismatch {
                sequence: req.sequence_id,
                cached: cache.len(),
                requested: req.position as usize,
            });
        }
        cache.grow_for(t, cfg.max_position)?;
        let out = model.forward_hidden(&x, cache)?;
        let output = if let Some(params) = sampling {
            let logits = model.logits(&out.select(1, -1))?;
            let logits: Vec<f32> = Vec::try_from(logits.view([-1]))?;
            let sampler = h
                .samplers
                .entry(req.sequence_id.clone())
                .or_insert_with(|| Sampler::new(params));
            let (id, logprob) = sampler.sample(&logits);
            pb::forward_response::Output::Token(pb::SampledToken { id, logprob })
        } else if req.want_logits {
            pb::forward_response::Output::Logits(to_wire(&model.logits(&out.select(1, -1))?))
        } else {
            pb::forward_response::Output::Hidden(to_wire(&out))
        };
        Ok(pb::ForwardResponse {
            sequence_id: req.sequence_id,
            output: Some(output),
        })
    }

    fn stats(&self) -> pb::StatsResponse {
        let shards = self
            .shards
            .values()
            .map(|h| pb::ShardStats {
                shard: Some(h.spec.clone()),
                weight_bytes: h.weight_bytes,
                sequences: h.caches.len() as u32,
                kv_cache_bytes: h.caches.values().map(|c| c.bytes() as u64).sum(),
            })
            .collect();
        let (total, available) = meminfo();
        pb::StatsResponse {
            shards,
            memory_total_bytes: total,
            memory_available_bytes: available,
        }
    }
}

/// (MemTotal, MemAvailable) in bytes from /proc/meminfo.
pub(crate) fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (get("MemTotal:"), get("MemAvailable:"))
}
