//! Pipeline placement: which worker holds which contiguous layer range.
//! Layers go to workers in proportion to the memory each has free after the
//! fixed parts it must hold (embedding on the first stage, final norm and
//! head on the last); an explicit split is checked and honoured. A model
//! that does not fit is refused with the shortfall in bytes.

use llmos_meta::ModelConfig;
use serde::{Deserialize, Serialize};

/// Byte sizes of the parts of a model, for a given weight dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub num_layers: u32,
    pub layer_bytes: u64,
    pub embed_bytes: u64,
    /// Final norm plus the head matrix when it is not tied.
    pub head_bytes: u64,
    pub tied_head: bool,
    /// What a first stage of several keeps beside its KV cache: the hidden
    /// state it sent on for every KV slot (float32), so that a replaced
    /// later stage can recompute its cache from them.
    pub boundary_bytes: u64,
}

/// Parameter counts of one layer.
struct LayerParams {
    /// Elements of q, k, v, o, gate, up and down.
    linear: u64,
    /// Output rows of those weights (one quantization scale each).
    out_rows: u64,
    /// Norm weights and q/k/v biases.
    other: u64,
}

impl LayerParams {
    fn of(c: &ModelConfig) -> Self {
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (q, kv) = (
            (c.num_heads * c.head_dim) as u64,
            (c.num_kv_heads * c.head_dim) as u64,
        );
        let bias = if c.qkv_bias { q + 2 * kv } else { 0 };
        LayerParams {
            linear: h * q + 2 * h * kv + q * h + 3 * h * i,
            out_rows: q + 2 * kv + h + 2 * i + h,
            other: 2 * h + bias,
        }
    }
}

impl ModelShape {
    pub fn from_config(c: &ModelConfig, dtype_bytes: u64) -> Self {
        let (h, embed) = (
            c.hidden_size as u64,
            c.vocab_size as u64 * c.hidden_size as u64,
        );
        let p = LayerParams::of(c);
        ModelShape {
            num_layers: c.num_layers as u32,
            layer_bytes: (p.linear + p.other) * dtype_bytes,
            embed_bytes: embed * dtype_bytes,
            head_bytes: (h + if c.tie_embeddings { 0 } else { embed }) * dtype_bytes,
            tied_head: c.tie_embeddings,
            boundary_bytes: 0,
        }
    }

    /// The layers' linear weights as int8 with an f32 scale per output row
    /// (norms and biases stay in the dtype); embedding and head unchanged.
    pub fn with_int8_layers(mut self, c: &ModelConfig, dtype_bytes: u64) -> Self {
        let p = LayerParams::of(c);
        self.layer_bytes = p.linear + p.out_rows * 4 + p.other * dtype_bytes;
        self
    }

    /// The layers' linear weights in GGUF blocks of `block_bytes` per 32
    /// weights (norms and biases stay in the dtype); embedding and head
    /// unchanged.
    pub fn with_block_layers(
        mut self,
        c: &ModelConfig,
        dtype_bytes: u64,
        block_bytes: u64,
    ) -> Self {
        let p = LayerParams::of(c);
        self.layer_bytes = (p.linear * block_bytes).div_ceil(32) + p.other * dtype_bytes;
        self
    }

    /// Bytes a stage holding `layers` layers needs.
    pub fn stage_bytes(&self, layers: u32, first: bool, last: bool) -> u64 {
        let mut b = layers as u64 * self.layer_bytes;
        if first {
            b += self.embed_bytes;
            if !last {
                b += self.boundary_bytes;
            }
        }
        if last {
            b += self.head_bytes;
            // A tied head reads the embedding matrix: a last stage that is
            // not also the first loads its own copy.
            if self.tied_head && !first {
                b += self.embed_bytes;
            }
        }
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCapacity {
    pub id: String,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementRequest {
    /// `None`: the fewest stages that fit.
    pub stages: Option<u32>,
    /// Layers per stage, in order (must sum to the model's layer count).
    pub split: Option<Vec<u32>>,
    /// Bytes kept free on every stage for KV cache and activations.
    pub reserve_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The stage's worker; with tensor parallelism its group's leader
    /// (rank 0: embedding, head, the Step calls).
    pub worker: String,
    pub layer_start: u32,
    pub layer_end: u32,
    pub embed: bool,
    pub head: bool,
    /// Bytes per rank (the leader's, which holds the embedding and head).
    pub bytes: u64,
    /// Ranks 1.. of the stage's tensor-parallel group, in rank order.
    #[serde(default)]
    pub followers: Vec<String>,
}

impl Stage {
    /// The stage's workers in rank order.
    pub fn workers(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.worker.as_str()).chain(self.followers.iter().map(String::as_str))
    }

    pub fn holds(&self, id: &str) -> bool {
        self.workers().any(|w| w == id)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub stages: Vec<Stage>,
    /// Ranks per stage (0 or 1: none).
    #[serde(default)]
    pub tensor_parallel: u32,
    /// Makes the names of this placement's groups unique (a new placement
    /// never links to a group of an old one).
    #[serde(default)]
    pub group_nonce: u64,
}

impl Placement {
    /// The name of stage `i`'s tensor-parallel group.
    pub fn group_name(&self, model: &str, i: usize) -> String {
        format!("{model}/stage{i}/{:016x}", self.group_nonce)
    }

    /// The name of the pipeline link between stage `i` and stage `i + 1`.
    pub fn link_name(&self, model: &str, i: usize) -> String {
        format!("{model}/link{i}/{:016x}", self.group_nonce)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid placement request: {0}")]
    Invalid(String),
    #[error("not enough memory: the model needs {needed} bytes over {stages} stage(s) but the workers have {available} bytes free (short by {short} bytes); stage {stage}: waiting for {stage_short} more bytes free on a worker")]
    Insufficient {
        needed: u64,
        available: u64,
        short: u64,
        stages: usize,
        /// The first stage that does not fit, and by how much.
        stage: usize,
        stage_short: u64,
    },
    /// The shape asks for more workers than are healthy now (a reconciler
    /// waits for them).
    #[error("waiting for workers: {needed} needed ({what}), {available} healthy")]
    TooFewWorkers {
        needed: usize,
        available: usize,
        what: String,
    },
}

/// Plans a placement of `model` over `workers`.
pub fn plan(
    model: &ModelShape,
    workers: &[WorkerCapacity],
    req: &PlacementRequest,
) -> Result<Placement, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::TooFewWorkers {
            needed: req.split.as_ref().map_or(1, Vec::len).max(1),
            available: 0,
            what: "at least one".into(),
        });
    }
    // Most free memory first; ties by id for determinism.
    let mut ws: Vec<&WorkerCapacity> = workers.iter().collect();
    ws.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.id.cmp(&b.id)));
    if let Some(split) = &req.split {
        let n = split.len();
        if n == 0 || split.contains(&0) {
            return Err(PlanError::Invalid(format!(
                "split {split:?}: every stage needs at least one layer"
            )));
        }
        let total: u32 = split.iter().sum();
        if total != model.num_layers {
            return Err(PlanError::Invalid(format!(
                "split {split:?} covers {total} layers, the model has {}",
                model.num_layers
            )));
        }
        if let Some(s) = req.stages.filter(|&s| s as usize != n) {
            return Err(PlanError::Invalid(format!(
                "{s} stages asked for but the split has {n}"
            )));
        }
        if n > ws.len() {
            return Err(PlanError::TooFewWorkers {
                needed: n,
                available: ws.len(),
                what: format!("a split of {n} stages"),
            });
        }
        return check(model, &ws[..n], split, req.reserve_bytes);
    }
    let candidates: Vec<usize> = match req.stages {
        Some(0) => return Err(PlanError::Invalid("stages must be at least 1".into())),
        Some(s) if s > model.num_layers => {
            return Err(PlanError::Invalid(format!(
                "{s} stages for {} layers",
                model.num_layers
            )))
        }
        Some(s) if s as usize > ws.len() => {
            return Err(PlanError::TooFewWorkers {
                needed: s as usize,
                available: ws.len(),
                what: format!("{s} stages"),
            })
        }
        Some(s) => vec![s as usize],
        None => (1..=ws.len().min(model.num_layers as usize)).collect(),
    };
    let mut last_err = None;
    for n in candidates {
        let split = proportional(model, &ws[..n], req.reserve_bytes);
        match check(model, &ws[..n], &split, req.reserve_bytes) {
            Ok(p) => return Ok(p),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("at least one candidate"))
}

/// Plans stages of `tp` ranks each (`tp` 0 or 1: `plan`). `rank_shape` is
/// one rank's share of the model (a `tp`-th of each layer; the embedding
/// and head stay whole, on the group's leader). Workers are grouped most
/// free memory first; a group plans as one worker with its smallest
/// member's free memory, and its first worker leads.
pub fn plan_tp(
    rank_shape: &ModelShape,
    workers: &[WorkerCapacity],
    req: &PlacementRequest,
    tp: u32,
) -> Result<Placement, PlanError> {
    if tp <= 1 {
        return plan(rank_shape, workers, req);
    }
    let tp = tp as usize;
    let mut ws: Vec<&WorkerCapacity> = workers.iter().collect();
    ws.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.id.cmp(&b.id)));
    let stages = req
        .stages
        .map(|s| s as usize)
        .or(req.split.as_ref().map(Vec::len))
        .unwrap_or(1)
        .max(1);
    if stages * tp > ws.len() {
        return Err(PlanError::TooFewWorkers {
            needed: stages * tp,
            available: ws.len(),
            what: format!("{stages} stage(s) x {tp} tensor-parallel ranks"),
        });
    }
    let groups: Vec<&[&WorkerCapacity]> = ws.chunks_exact(tp).collect();
    let virt: Vec<WorkerCapacity> = groups
        .iter()
        .map(|g| WorkerCapacity {
            id: g[0].id.clone(),
            free_bytes: g.iter().map(|w| w.free_bytes).min().unwrap_or(0),
        })
        .collect();
    let mut p = plan(rank_shape, &virt, req)?;
    for s in &mut p.stages {
        let g = groups
            .iter()
            .find(|g| g[0].id == s.worker)
            .expect("a planned stage is a group's leader");
        s.followers = g[1..].iter().map(|w| w.id.clone()).collect();
    }
    p.tensor_parallel = tp as u32;
    Ok(p)
}

/// Layers per stage in proportion to each worker's memory left after its
/// fixed parts (largest remainder, at least one layer each).
fn proportional(model: &ModelShape, ws: &[&WorkerCapacity], reserve: u64) -> Vec<u32> {
    let n = ws.len();
    let room: Vec<f64> = ws
        .iter()
        .enumerate()
        .map(|(i, w)| {
            w.free_bytes
                .saturating_sub(model.stage_bytes(0, i == 0, i + 1 == n) + reserve)
                as f64
        })
        .collect();
    let total: f64 = room.iter().sum();
    let layers = model.num_layers as f64;
    let exact: Vec<f64> = if total > 0.0 {
        room.iter().map(|r| r / total * layers).collect()
    } else {
        vec![layers / n as f64; n]
    };
    let mut split: Vec<u32> = exact.iter().map(|e| (e.floor() as u32).max(1)).collect();
    let mut assigned: u32 = split.iter().sum();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let mut k = 0;
    while assigned < model.num_layers {
        split[order[k % n]] += 1;
        assigned += 1;
        k += 1;
    }
    while assigned > model.num_layers {
        // Only possible through the at-least-one rule: take from the largest.
        let i = (0..n).max_by_key(|&i| split[i]).expect("n > 0");
        split[i] -= 1;
        assigned -= 1;
    }
    split
}

fn check(
    model: &ModelShape,
    ws: &[&WorkerCapacity],
    split: &[u32],
    reserve: u64,
) -> Result<Placement, PlanError> {
    let n = split.len();
    let mut start = 0;
    let mut stages = Vec::with_capacity(n);
    let (mut needed, mut available, mut short) = (0u64, 0u64, 0u64);
    let mut first_short = None;
    for (i, (&layers, w)) in split.iter().zip(ws).enumerate() {
        let (first, last) = (i == 0, i + 1 == n);
        let bytes = model.stage_bytes(layers, first, last);
        needed += bytes + reserve;
        available += w.free_bytes;
        let lacking = (bytes + reserve).saturating_sub(w.free_bytes);
        if lacking > 0 && first_short.is_none() {
            first_short = Some((i, lacking));
        }
        short += lacking;
        stages.push(Stage {
            worker: w.id.clone(),
            layer_start: start,
            layer_end: start + layers,
            embed: first,
            head: last,
            bytes,
            followers: Vec::new(),
        });
        start += layers;
    }
    if let Some((stage, stage_short)) = first_short {
        return Err(PlanError::Insufficient {
            needed,
            available,
            short,
            stages: n,
            stage,
            stage_short,
        });
    }
    Ok(Placement {
        stages,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn shape() -> ModelShape {
        // 30 layers of 1 GiB, 2 GiB embedding, untied 2 GiB head.
        ModelShape {
            num_layers: 30,
            layer_bytes: GB,
            embed_bytes: 2 * GB,
            head_bytes: 2 * GB,
            tied_head: false,
            boundary_bytes: 0,
        }
    }

    fn workers(free: &[u64]) -> Vec<WorkerCapacity> {
        free.iter()
            .enumerate()
            .map(|(i, &f)| WorkerCapacity {
                id: format!("w{i}"),
                free_bytes: f * GB,
            })
            .collect()
    }

    fn layers(p: &Placement) -> Vec<u32> {
        p.stages
            .iter()
            .map(|s| s.layer_end - s.layer_start)
            .collect()
    }

    #[test]
    fn tensor_parallel_groups_workers_and_counts_them() {
        let ws = workers(&[100_000, 90_000, 80_000, 70_000, 60_000]);
        let req = PlacementRequest {
            stages: Some(2),
            ..Default::default()
        };
        let p = plan_tp(&shape(), &ws, &req, 2).unwrap();
        assert_eq!(p.tensor_parallel, 2);
        assert_eq!(p.stages.len(), 2);
        // Most free first, two at a time; the fifth worker is left over.
        assert_eq!(p.stages[0].workers().collect::<Vec<_>>(), ["w0", "w1"]);
        assert_eq!(p.stages[1].workers().collect::<Vec<_>>(), ["w2", "w3"]);
        assert!(p.stages[1].holds("w3") && !p.stages[1].holds("w4"));
        assert_eq!(layers(&p).iter().sum::<u32>(), shape().num_layers);
        let e = plan_tp(
            &shape(),
            &ws,
            &PlacementRequest {
                stages: Some(3),
                ..Default::default()
            },
            2,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::TooFewWorkers {
                needed: 6,
                available: 5,
                what: "3 stage(s) x 2 tensor-parallel ranks".into()
            }
        );
    }

    #[test]
    fn automatic_uses_one_stage_when_it_fits() {
        let p = plan(&shape(), &workers(&[40, 80]), &PlacementRequest::default()).unwrap();
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].worker, "w1");
        assert!(p.stages[0].embed && p.stages[0].head);
        assert_eq!(p.stages[0].bytes, 34 * GB);
    }

    #[test]
    fn layers_follow_free_memory_and_cover_the_model_contiguously() {
        // 34 GiB needed; 24 + 12 free: room after fixed parts 22 and 10.
        let req = PlacementRequest {
            stages: Some(2),
            ..Default::default()
        };
        let p = plan(&shape(), &workers(&[12, 24]), &req).unwrap();
        assert_eq!(p.stages[0].worker, "w1");
        assert_eq!(layers(&p), vec![21, 9]);
        assert_eq!(
            (
                p.stages[0].layer_start,
                p.stages[1].layer_start,
                p.stages[1].layer_end
            ),
            (0, 21, 30)
        );
        for (s, w) in p.stages.iter().zip([24, 12]) {
            assert!(s.bytes <= w * GB, "{s:?}");
        }
        // Automatic picks the fewest stages that fit: here two.
        let auto = plan(
            &shape(),
            &workers(&[12, 24, 30]),
            &PlacementRequest::default(),
        )
        .unwrap();
        assert_eq!(auto.stages.len(), 2);
    }

    #[test]
    fn explicit_split_is_honoured_or_refused_with_numbers() {
        let req = |split: Vec<u32>| PlacementRequest {
            split: Some(split),
            ..Default::default()
        };
        let p = plan(&shape(), &workers(&[40, 40, 40]), &req(vec![4, 16, 10])).unwrap();
        assert_eq!(layers(&p), vec![4, 16, 10]);
        let e = plan(&shape(), &workers(&[40, 40]), &req(vec![10, 10]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("20 layers") && e.contains("30"), "{e}");
        let e = plan(&shape(), &workers(&[40]), &req(vec![10, 20])).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::TooFewWorkers {
                    needed: 2,
                    available: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn too_little_memory_states_the_shortfall() {
        // Needs 34 GiB; 3 x 10 GiB free.
        let e = plan(
            &shape(),
            &workers(&[10, 10, 10]),
            &PlacementRequest::default(),
        )
        .unwrap_err();
        match e {
            PlanError::Insufficient {
                needed,
                available,
                short,
                stage,
                stage_short,
                ..
            } => {
                assert_eq!(available, 30 * GB);
                assert!(needed >= 34 * GB && short >= 4 * GB, "{e}");
                assert!(stage < 3 && stage_short > 0 && stage_short <= short, "{e}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn tied_head_on_a_later_stage_counts_an_embedding_copy() {
        let s = ModelShape {
            tied_head: true,
            head_bytes: 0,
            ..shape()
        };
        assert_eq!(s.stage_bytes(10, true, true), 12 * GB);
        assert_eq!(s.stage_bytes(10, false, true), 12 * GB);
        assert_eq!(s.stage_bytes(10, true, false), 12 * GB);
        assert_eq!(s.stage_bytes(10, false, false), 10 * GB);
        // The boundary rows: on a first stage of several only.
        let s = ModelShape {
            boundary_bytes: GB,
            ..shape()
        };
        assert_eq!(s.stage_bytes(10, true, false), 13 * GB);
        assert_eq!(s.stage_bytes(10, true, true), 14 * GB);
        assert_eq!(s.stage_bytes(10, false, false), 10 * GB);
        let cfg = ModelConfig::preset("smollm2-135m").unwrap();
        let m = ModelShape::from_config(&cfg, 4);
        assert_eq!(
            m.num_layers as u64 * m.layer_bytes + m.embed_bytes + m.head_bytes,
            cfg.num_params() as u64 * 4
        );
    }
}
