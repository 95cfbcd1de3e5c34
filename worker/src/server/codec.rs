//! The wire and the engine's types: libtorch tensors as raw little-endian
//! bytes with dtype and shape (`llmos.worker.v1.Tensor`), shard specs,
//! steps and their outputs, stats. Everything that arrives is checked
//! here, and a field that does not fit is named in the error.

use std::time::Duration;

use llmos_meta::quant::GgmlType;
use llmos_meta::request::SamplingParams;
use llmos_meta::serving::{DEFAULT_BLOCK_SIZE, DEFAULT_KV_BLOCKS};
use llmos_proto::worker::v1 as pb;
use tch::{Device, Kind, Tensor};

use crate::comm::{LinkBackend, LinkSpec};
use crate::engine::EngineStats;
use crate::model::linear::Quantization;
use crate::runtime::{
    HostStats, SampleAt, Sampled, SeqStep, ShardConfig, Step, StepInput, StepOutput, TensorParallel,
};
use crate::sampling::History;

/// A message that does not hold what it must (INVALID_ARGUMENT).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

impl From<tch::TchError> for WireError {
    fn from(e: tch::TchError) -> Self {
        WireError(format!("libtorch: {e}"))
    }
}

pub type Result<T, E = WireError> = std::result::Result<T, E>;

fn kind_of(d: pb::DType) -> Option<Kind> {
    Some(match d {
        pb::DType::F32 => Kind::Float,
        pb::DType::Bf16 => Kind::BFloat16,
        pb::DType::F16 => Kind::Half,
        pb::DType::I64 => Kind::Int64,
        pb::DType::Unspecified => return None,
    })
}

pub fn dtype_of(k: Kind) -> pb::DType {
    match k {
        Kind::Float => pb::DType::F32,
        Kind::BFloat16 => pb::DType::Bf16,
        Kind::Half => pb::DType::F16,
        Kind::Int64 => pb::DType::I64,
        other => panic!("no wire dtype for {other:?}"),
    }
}

/// Copies `t` (any device) to the wire format.
pub fn to_wire(t: &Tensor) -> pb::Tensor {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut data = vec![0u8; n];
    t.copy_data_u8(&mut data, t.numel());
    pb::Tensor {
        dtype: dtype_of(t.kind()) as i32,
        shape: t.size(),
        data,
    }
}

/// Checks dtype, shape and byte length, then builds a CPU tensor.
pub fn from_wire(w: &pb::Tensor, what: &str) -> Result<Tensor> {
    let dtype = pb::DType::try_from(w.dtype).unwrap_or(pb::DType::Unspecified);
    let kind = kind_of(dtype)
        .ok_or_else(|| WireError(format!("{what}: dtype {} is not supported", w.dtype)))?;
    if w.shape.iter().any(|&d| d < 0) || w.shape.is_empty() {
        return Err(WireError(format!("{what}: bad shape {:?}", w.shape)));
    }
    let numel = w
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d as usize));
    let want = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
    if want != Some(w.data.len()) {
        return Err(WireError(format!(
            "{what}: {} bytes do not hold a {:?} tensor of shape {:?}",
            w.data.len(),
            dtype,
            w.shape
        )));
    }
    Ok(Tensor::f_from_data_size(&w.data, &w.shape, kind)?)
}

fn timeout(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms as u64))
}

fn link_spec(l: &pb::PipelineLink) -> Result<LinkSpec> {
    let backend = match pb::LinkBackend::try_from(l.backend) {
        Ok(pb::LinkBackend::Nccl) => LinkBackend::Nccl,
        Ok(pb::LinkBackend::Tcp | pb::LinkBackend::Unspecified) => LinkBackend::Tcp,
        Err(_) => {
            return Err(WireError(format!(
                "PipelineLink.backend: unknown backend {}",
                l.backend
            )))
        }
    };
    Ok(LinkSpec {
        rank: l.rank as usize,
        peers: l.peers.clone(),
        group: l.group.clone(),
        backend,
        timeout: timeout(l.timeout_ms),
    })
}

fn link_to_wire(l: &LinkSpec) -> pb::PipelineLink {
    pb::PipelineLink {
        rank: l.rank as u32,
        peers: l.peers.clone(),
        group: l.group.clone(),
        backend: match l.backend {
            LinkBackend::Tcp => pb::LinkBackend::Tcp,
            LinkBackend::Nccl => pb::LinkBackend::Nccl,
        } as i32,
        timeout_ms: l.timeout.map_or(0, |t| t.as_millis() as u32),
    }
}

/// The shard a `ShardSpec` asks for, with the serving defaults
/// (`llmos_meta::serving`) where it says 0. Its engine part is the
/// server's.
pub fn shard_config(spec: &pb::ShardSpec) -> Result<ShardConfig> {
    // A floating-point element type (`None`: unspecified), or an error
    // naming the field.
    let float_kind = |field: &str, code: i32| match pb::DType::try_from(code) {
        Ok(pb::DType::I64) => Err(WireError(format!(
            "ShardSpec.{field}: a float type, not int64"
        ))),
        Ok(d) => Ok(kind_of(d)),
        Err(_) => Err(WireError(format!(
            "ShardSpec.{field}: unknown dtype {code}"
        ))),
    };
    let kind = float_kind("dtype", spec.dtype)?.unwrap_or(Kind::Float);
    let kv_kind = float_kind("kv_dtype", spec.kv_dtype)?;
    let quantization = match pb::Quantization::try_from(spec.quantization) {
        Ok(pb::Quantization::Int8) => Quantization::Int8,
        Ok(pb::Quantization::Q80) => Quantization::Blocks(GgmlType::Q8_0),
        Ok(pb::Quantization::Q40) => Quantization::Blocks(GgmlType::Q4_0),
        Ok(pb::Quantization::Q41) => Quantization::Blocks(GgmlType::Q4_1),
        Ok(pb::Quantization::File) => Quantization::File,
        Ok(pb::Quantization::Unspecified) => Quantization::None,
        Err(_) => {
            return Err(WireError(format!(
                "ShardSpec.quantization: unknown quantization code {}",
                spec.quantization
            )))
        }
    };
    if spec.layer_start > spec.layer_end {
        return Err(WireError(format!(
            "ShardSpec: layer_start {} is after layer_end {}",
            spec.layer_start, spec.layer_end
        )));
    }
    let or = |v: u32, d: u32| if v == 0 { d } else { v } as usize;
    Ok(ShardConfig {
        model: spec.model.clone(),
        source: spec.source.clone(),
        layers: spec.layer_start as usize..spec.layer_end as usize,
        embed: spec.embed,
        head: spec.head,
        kind,
        quantization,
        kv_kind,
        kv_blocks: or(spec.kv_blocks, DEFAULT_KV_BLOCKS),
        block_size: or(spec.block_size, DEFAULT_BLOCK_SIZE),
        tensor_parallel: spec.tensor_parallel.as_ref().map(|t| TensorParallel {
            rank: t.rank as usize,
            world_size: t.world_size as usize,
            peers: t.peers.clone(),
            group: t.group.clone(),
            timeout: timeout(t.timeout_ms),
        }),
        prev_link: spec.prev_link.as_ref().map(link_spec).transpose()?,
        next_link: spec.next_link.as_ref().map(link_spec).transpose()?,
    })
}

/// The wire's spec of a hosted shard (without the engine part).
pub fn shard_spec(c: &ShardConfig) -> pb::ShardSpec {
    pb::ShardSpec {
        model: c.model.clone(),
        source: c.source.clone(),
        layer_start: c.layers.start as u32,
        layer_end: c.layers.end as u32,
        embed: c.embed,
        head: c.head,
        dtype: dtype_of(c.kind) as i32,
        kv_dtype: c.kv_kind.map_or(pb::DType::Unspecified, dtype_of) as i32,
        kv_blocks: c.kv_blocks as u32,
        block_size: c.block_size as u32,
        engine: None,
        tensor_parallel: c.tensor_parallel.as_ref().map(|t| pb::TensorParallel {
            rank: t.rank as u32,
            world_size: t.world_size as u32,
            peers: t.peers.clone(),
            group: t.group.clone(),
            timeout_ms: t.timeout.map_or(0, |d| d.as_millis() as u32),
        }),
        quantization: match c.quantization {
            Quantization::None => pb::Quantization::Unspecified,
            Quantization::Int8 => pb::Quantization::Int8,
            Quantization::Blocks(GgmlType::Q8_0) => pb::Quantization::Q80,
            Quantization::Blocks(GgmlType::Q4_0) => pb::Quantization::Q40,
            Quantization::Blocks(_) => pb::Quantization::Q41,
            Quantization::File => pb::Quantization::File,
        } as i32,
        prev_link: c.prev_link.as_ref().map(link_to_wire),
        next_link: c.next_link.as_ref().map(link_to_wire),
        // The runtime knows no epochs: the server fills in what it holds.
        epoch: 0,
    }
}

pub fn sampling(s: &pb::Sampling) -> SamplingParams {
    SamplingParams {
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        // 1 disables; so does 0 on the wire.
        repetition_penalty: if s.repetition_penalty == 0.0 {
            1.0
        } else {
            s.repetition_penalty
        },
        logit_bias: s.logit_bias.iter().map(|b| (b.id, b.bias)).collect(),
        top_logprobs: s.top_logprobs,
        ..SamplingParams::from_wire(s.temperature, s.top_k, s.top_p, s.seed)
    }
}

pub fn sampling_to_wire(p: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        // 1 disables top-p; so does 0 on the wire.
        top_p: p.top_p,
        seed: p.seed,
        min_p: p.min_p,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p
            .logit_bias
            .iter()
            .map(|&(id, bias)| pb::TokenBias { id, bias })
            .collect(),
        top_logprobs: p.top_logprobs,
    }
}

pub fn sampled_to_wire(t: &Sampled) -> pb::SampledToken {
    pb::SampledToken {
        id: t.id,
        logprob: t.logprob,
        top: t
            .top
            .iter()
            .map(|&(id, logprob)| pb::TokenLogprob { id, logprob })
            .collect(),
    }
}

pub fn sampled(t: &pb::SampledToken) -> Sampled {
    Sampled {
        id: t.id,
        logprob: t.logprob,
        top: t.top.iter().map(|a| (a.id, a.logprob)).collect(),
    }
}

/// A step as it arrived; its sampling parameters are checked where it runs.
pub fn step(req: pb::StepRequest) -> Result<Step> {
    let input = match &req.input {
        Some(pb::step_request::Input::Tokens(w)) => {
            let t = from_wire(w, "StepRequest.tokens")?;
            if t.kind() != Kind::Int64 || t.dim() != 1 {
                return Err(WireError(format!(
                    "StepRequest.tokens must be int64 [tokens], got {:?} {:?}",
                    t.kind(),
                    t.size()
                )));
            }
            let ids = Vec::<i64>::try_from(&t)?;
            let ids = ids
                .iter()
                .map(|&i| u32::try_from(i))
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(|_| {
                    WireError("StepRequest.tokens: a token id is negative or too large".into())
                })?;
            StepInput::Tokens(ids)
        }
        Some(pb::step_request::Input::Hidden(w)) => {
            let t = from_wire(w, "StepRequest.hidden")?;
            if t.dim() != 2 || !t.is_floating_point() {
                return Err(WireError(format!(
                    "StepRequest.hidden must be float [tokens, hidden], got {:?} {:?}",
                    t.kind(),
                    t.size()
                )));
            }
            StepInput::Hidden(t)
        }
        Some(pb::step_request::Input::FromPrevious(_)) => StepInput::FromPrevious,
        None => {
            return Err(WireError(
                "StepRequest.input: the request has no input".into(),
            ))
        }
    };
    let seqs = req
        .sequences
        .iter()
        .map(|s| SeqStep {
            position: s.position as usize,
            tokens: s.tokens as usize,
            blocks: s.blocks.clone(),
            sample: s.sample.as_ref().map(|p| {
                let params = sampling(p);
                let history = params.needs_history().then(|| History {
                    tokens: s.history.clone(),
                    generated_from: s.generated_from as usize,
                });
                SampleAt {
                    params,
                    index: s.sample_index,
                    history,
                }
            }),
            want_logits: s.want_logits,
            trace: (!s.traceparent.is_empty()).then(|| s.traceparent.clone()),
        })
        .collect();
    Ok(Step {
        model: req.model,
        id: req.step_id,
        seqs,
        input,
        to_next: req.to_next,
    })
}

/// A step for another worker's `Step` stream.
pub fn step_to_wire(step: &Step) -> pb::StepRequest {
    let input = match &step.input {
        StepInput::Tokens(ids) => {
            let data = ids.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
            pb::step_request::Input::Tokens(pb::Tensor {
                dtype: pb::DType::I64 as i32,
                shape: vec![ids.len() as i64],
                data,
            })
        }
        StepInput::Hidden(h) => pb::step_request::Input::Hidden(to_wire(h)),
        StepInput::FromPrevious => pb::step_request::Input::FromPrevious(pb::FromPreviousStage {}),
    };
    pb::StepRequest {
        model: step.model.clone(),
        sequences: step
            .seqs
            .iter()
            .map(|s| pb::StepSequence {
                position: s.position as u32,
                tokens: s.tokens as u32,
                blocks: s.blocks.clone(),
                sample: s.sample.as_ref().map(|a| sampling_to_wire(&a.params)),
                sample_index: s.sample.as_ref().map_or(0, |a| a.index),
                want_logits: s.want_logits,
                history: s
                    .sample
                    .as_ref()
                    .and_then(|a| a.history.as_ref())
                    .map_or_else(Vec::new, |h| h.tokens.clone()),
                generated_from: s
                    .sample
                    .as_ref()
                    .and_then(|a| a.history.as_ref())
                    .map_or(0, |h| h.generated_from as u32),
                traceparent: s.trace.clone().unwrap_or_default(),
            })
            .collect(),
        input: Some(input),
        step_id: step.id,
        to_next: step.to_next,
    }
}

pub fn output_to_wire(out: &StepOutput) -> pb::StepResponse {
    pb::StepResponse {
        hidden: out.hidden.as_ref().map(to_wire),
        tokens: out.tokens.iter().map(sampled_to_wire).collect(),
        logits: out.logits.as_ref().map(to_wire),
    }
}

/// Another worker's answer to a step.
pub fn output(resp: &pb::StepResponse) -> Result<StepOutput> {
    Ok(StepOutput {
        hidden: resp
            .hidden
            .as_ref()
            .map(|w| from_wire(w, "StepResponse.hidden"))
            .transpose()?,
        tokens: resp.tokens.iter().map(sampled).collect(),
        logits: resp
            .logits
            .as_ref()
            .map(|w| from_wire(w, "StepResponse.logits"))
            .transpose()?,
    })
}

pub fn host_stats(s: &HostStats) -> pb::StatsResponse {
    pb::StatsResponse {
        shards: s
            .shards
            .iter()
            .map(|h| pb::ShardStats {
                shard: Some(shard_spec(&h.config)),
                weight_bytes: h.weight_bytes,
                kv_cache_bytes: h.kv_cache_bytes,
                engine: None,
                collective_bytes_sent: h.collective_bytes_sent,
                link_bytes_sent: h.link_bytes_sent,
            })
            .collect(),
        memory_total_bytes: s.memory_total_bytes,
        memory_available_bytes: s.memory_available_bytes,
    }
}

pub fn engine_stats(e: &EngineStats) -> pb::EngineStats {
    let s = &e.scheduler;
    pb::EngineStats {
        running: s.running as u32,
        waiting: s.waiting as u32,
        kv_blocks_total: s.blocks_total as u32,
        kv_blocks_used: s.blocks_used as u32,
        kv_blocks_cached: s.blocks_cached as u32,
        prefix_queried_tokens: s.prefix.queried_tokens,
        prefix_hit_tokens: s.prefix.hit_tokens,
        prefix_evictions: s.prefix.evictions,
        preemptions: s.preemptions,
        steps: s.steps,
        generated_tokens: e.generated_tokens,
        repaired_tokens: e.repaired_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_mismatched_bytes() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Int64] {
            let t = Tensor::arange(24, (Kind::Float, Device::Cpu))
                .view([2, 3, 4])
                .to_kind(kind);
            let back = from_wire(&to_wire(&t), "t").unwrap();
            assert_eq!(back.size(), vec![2, 3, 4]);
            assert!(back.equal(&t));
        }
        let mut w = to_wire(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu)));
        w.data.pop();
        let e = from_wire(&w, "hidden").unwrap_err().to_string();
        assert!(e.contains("hidden") && e.contains("15 bytes"), "{e}");
    }

    #[test]
    fn a_shard_spec_round_trips_with_the_serving_defaults() {
        let spec = pb::ShardSpec {
            model: "m".into(),
            source: "synthetic:tiny".into(),
            layer_start: 1,
            layer_end: 2,
            head: true,
            dtype: pb::DType::Bf16 as i32,
            kv_dtype: pb::DType::F16 as i32,
            quantization: pb::Quantization::Int8 as i32,
            next_link: Some(pb::PipelineLink {
                rank: 0,
                peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
                group: "g".into(),
                backend: pb::LinkBackend::Tcp as i32,
                timeout_ms: 250,
            }),
            ..Default::default()
        };
        let c = shard_config(&spec).unwrap();
        assert_eq!((c.kind, c.kv_kind), (Kind::BFloat16, Some(Kind::Half)));
        assert_eq!(
            (c.kv_blocks, c.block_size),
            (DEFAULT_KV_BLOCKS as usize, DEFAULT_BLOCK_SIZE as usize)
        );
        assert_eq!(
            c.next_link.as_ref().unwrap().timeout,
            Some(Duration::from_millis(250))
        );
        let back = shard_spec(&c);
        assert_eq!(
            back,
            pb::ShardSpec {
                kv_blocks: DEFAULT_KV_BLOCKS,
                block_size: DEFAULT_BLOCK_SIZE,
                ..spec.clone()
            }
        );
        let bad = pb::ShardSpec {
            dtype: pb::DType::I64 as i32,
            ..spec.clone()
        };
        let e = shard_config(&bad).unwrap_err().to_string();
        assert!(e.contains("ShardSpec.dtype"), "{e}");
        let bad = pb::ShardSpec {
            kv_dtype: pb::DType::I64 as i32,
            ..spec
        };
        let e = shard_config(&bad).unwrap_err().to_string();
        assert!(e.contains("ShardSpec.kv_dtype"), "{e}");
    }

    #[test]
    fn a_step_round_trips_through_the_wire() {
        let step = Step {
            model: "m".into(),
            id: 42,
            seqs: vec![SeqStep {
                position: 3,
                tokens: 2,
                blocks: vec![5, 1],
                sample: Some(SampleAt {
                    params: SamplingParams {
                        min_p: 0.05,
                        presence_penalty: 0.5,
                        frequency_penalty: -0.25,
                        repetition_penalty: 1.1,
                        logit_bias: vec![(7, -100.0), (9, 2.5)],
                        top_logprobs: 5,
                        ..SamplingParams::from_wire(0.7, 40, 0.9, 11)
                    },
                    index: 6,
                    history: Some(History {
                        tokens: vec![1, 2, 3, 17],
                        generated_from: 2,
                    }),
                }),
                want_logits: true,
                trace: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            }],
            input: StepInput::Tokens(vec![17, 99]),
            to_next: true,
        };
        let back = super::step(step_to_wire(&step)).unwrap();
        assert_eq!(
            (back.model.as_str(), back.id, back.to_next),
            ("m", 42, true)
        );
        assert_eq!(back.seqs, step.seqs);
        assert!(matches!(back.input, StepInput::Tokens(ref t) if t == &[17, 99]));
        let mut neg = step_to_wire(&step);
        if let Some(pb::step_request::Input::Tokens(t)) = &mut neg.input {
            t.data[..8].copy_from_slice(&(-1i64).to_le_bytes());
        }
        let e = super::step(neg).unwrap_err().to_string();
        assert!(e.contains("StepRequest.tokens"), "{e}");
        let t = Sampled {
            id: 3,
            logprob: -0.5,
            top: vec![(3, -0.5), (8, -1.25)],
        };
        assert_eq!(sampled(&sampled_to_wire(&t)), t);
    }
}
