//! Pipeline links: a two-rank group between the leaders of neighbouring
//! pipeline stages over which a step's hidden states go straight from one
//! stage to the next (NCCL send/recv between GPUs, TCP otherwise), instead
//! of back through the engine's `Step` calls.
//!
//! Every transfer is a header (step id, rows, columns, dtype) followed by
//! the payload. The header keeps the two stages in step when one of them
//! fails a step: a stage that fails before sending sends a header without
//! payload (the next stage fails that step at once instead of waiting out
//! its deadline), a header of an older step than the one expected is
//! drained (the receiving stage failed that step before reading it), and a
//! header of a later step is kept for the step it belongs to. Over TCP, a
//! previous stage that sends nothing within the deadline fails that step
//! only (its late header is drained later); a peer that goes away, a frame
//! cut off mid-way or an NCCL deadline breaks the link, and the
//! coordinator's reload of the stage (on the worker's re-registration)
//! forms a new one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::{Collective, NcclGroup, Rendezvous, TcpGroup};
use super::{CommError, Result};

/// What carries a link's transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkBackend {
    /// A TCP connection between the two workers' collective listeners
    /// (host memory; any device).
    Tcp,
    /// NCCL send/recv between the two workers' GPUs (the NCCL id travels
    /// over the TCP connection).
    Nccl,
}

/// One end of a link as the coordinator placed it: rank 0 is the earlier
/// stage (it sends), rank 1 the later one (it receives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub rank: usize,
    /// Collective addresses (host:port) of rank 0 and rank 1.
    pub peers: Vec<String>,
    /// Names the link on the listeners (new when either worker
    /// re-registers).
    pub group: String,
    pub backend: LinkBackend,
    /// A transfer without an answer for this long fails (`None`: the
    /// caller's default).
    pub timeout: Option<Duration>,
}

/// The sending side of a link is rank 0, the receiving side rank 1.
const SENDER: usize = 0;
const RECEIVER: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    step: u64,
    rows: i64,
    cols: i64,
    /// 0: the sending stage failed this step (no payload follows).
    kind: i64,
}

fn kind_code(k: Kind) -> Result<i64> {
    Ok(match k {
        Kind::Float => 1,
        Kind::BFloat16 => 2,
        Kind::Half => 3,
        k => {
            return Err(CommError::Invalid(format!(
                "pipeline links carry float hidden states, not {k:?}"
            )))
        }
    })
}

fn code_kind(c: i64) -> Option<Kind> {
    match c {
        1 => Some(Kind::Float),
        2 => Some(Kind::BFloat16),
        3 => Some(Kind::Half),
        _ => None,
    }
}

/// One end of a link between neighbouring stages.
pub struct PipelineLink {
    spec: LinkSpec,
    /// The connection (and the NCCL id's way when the backend is NCCL).
    tcp: Arc<TcpGroup>,
    /// What carries the transfers: `tcp` itself, or NCCL over it.
    comm: Arc<dyn Collective>,
    /// Where headers and payloads live (CUDA for NCCL).
    device: Device,
    /// A header read ahead of its step.
    pending: Mutex<Option<Header>>,
}

impl PipelineLink {
    /// Links up with the other stage's leader (both call this with the same
    /// spec but their own rank) within `form_timeout`.
    pub fn form(
        rendezvous: &Rendezvous,
        spec: &LinkSpec,
        device: Device,
        form_timeout: Duration,
        default_timeout: Duration,
    ) -> Result<Self> {
        if spec.peers.len() != 2 || spec.rank > 1 {
            return Err(CommError::Invalid(format!(
                "a pipeline link has 2 ranks, got rank {} with {} peer addresses",
                spec.rank,
                spec.peers.len()
            )));
        }
        let op_timeout = spec.timeout.unwrap_or(default_timeout);
        let tcp = Arc::new(rendezvous.form(
            &spec.group,
            spec.rank,
            &spec.peers,
            form_timeout,
            op_timeout,
        )?);
        let (comm, device): (Arc<dyn Collective>, Device) = match spec.backend {
            LinkBackend::Nccl => {
                if !device.is_cuda() {
                    return Err(CommError::Invalid(format!(
                        "an NCCL pipeline link on a worker whose shards live on {device:?}"
                    )));
                }
                (Arc::new(NcclGroup::form(&tcp, op_timeout)?), device)
            }
            LinkBackend::Tcp => (tcp.clone(), Device::Cpu),
        };
        tracing::info!(group = %spec.group, rank = spec.rank, backend = comm.backend(), "pipeline link formed");
        Ok(PipelineLink {
            spec: spec.clone(),
            tcp,
            comm,
            device,
            pending: Mutex::new(None),
        })
    }

    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    pub fn backend(&self) -> &'static str {
        self.comm.backend()
    }

    /// A link whose peer failed or went away: only a new one helps.
    pub fn is_broken(&self) -> bool {
        self.tcp.is_broken() || self.comm.is_broken()
    }

    /// Ends the link: the peer's transfers fail at once.
    pub fn close(&self) {
        self.tcp.close();
    }

    /// Bytes sent over the link (headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.comm.bytes_sent()
    }

    fn send_header(&self, h: Header) -> Result<()> {
        let t = Tensor::from_slice(&[h.step as i64, h.rows, h.cols, h.kind]).to_device(self.device);
        self.comm.send(&t, RECEIVER)
    }

    fn recv_header(&self) -> Result<Header> {
        if let Some(h) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Ok(h);
        }
        let mut t = Tensor::zeros([4], (Kind::Int64, self.device));
        if self.comm.backend() == "tcp" {
            // A previous stage slower than the deadline fails this step
            // only: its header, when it comes, is drained by step id.
            self.tcp.recv_when_sent(&mut t, SENDER)?;
        } else {
            // NCCL cannot take back a posted receive: past the deadline the
            // communicator is aborted and the link broken.
            self.comm.recv(&mut t, SENDER)?;
        }
        let v = Vec::<i64>::try_from(t.to_device(Device::Cpu))?;
        Ok(Header {
            step: v[0] as u64,
            rows: v[1],
            cols: v[2],
            kind: v[3],
        })
    }

    fn recv_payload(&self, h: &Header) -> Result<Tensor> {
        let kind = code_kind(h.kind).ok_or_else(|| {
            self.close();
            CommError::Failed(format!(
                "pipeline link {}: a header with dtype code {} (the stages are out of step)",
                self.spec.group, h.kind
            ))
        })?;
        if h.rows < 0 || h.cols < 0 {
            self.close();
            return Err(CommError::Failed(format!(
                "pipeline link {}: a header of shape [{}, {}]",
                self.spec.group, h.rows, h.cols
            )));
        }
        let mut t = Tensor::empty([h.rows, h.cols], (kind, self.device));
        self.comm.recv(&mut t, SENDER)?;
        Ok(t)
    }

    /// Sender: step `step`'s output hidden states `[rows, cols]` to the next
    /// stage.
    pub fn send(&self, step: u64, hidden: &Tensor) -> Result<()> {
        let (rows, cols) = hidden.size2()?;
        let kind = kind_code(hidden.kind())?;
        self.send_header(Header {
            step,
            rows,
            cols,
            kind,
        })?;
        let x = hidden.to_device(self.device).contiguous();
        self.comm.send(&x, RECEIVER)
    }

    /// Sender: this stage failed step `step`; the next stage fails it too
    /// instead of waiting for hidden states.
    pub fn send_failed(&self, step: u64) -> Result<()> {
        self.send_header(Header {
            step,
            rows: 0,
            cols: 0,
            kind: 0,
        })
    }

    /// Receiver: step `step`'s hidden states, which must be `[rows, cols]`.
    pub fn recv(&self, step: u64, rows: i64, cols: i64) -> Result<Tensor> {
        loop {
            let h = self.recv_header()?;
            if h.step < step {
                // A step this stage failed before reading its input.
                if h.kind != 0 {
                    drop(self.recv_payload(&h)?);
                }
                continue;
            }
            if h.step > step {
                // The previous stage never got to this step (it failed it
                // before sending): keep what arrived for its own step.
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                return Err(CommError::PeerStepFailed(format!(
                    "step {step}: the previous stage sent nothing for it (it failed the step)"
                )));
            }
            if h.kind == 0 {
                return Err(CommError::PeerStepFailed(format!(
                    "step {step}: the previous stage failed it"
                )));
            }
            let t = self.recv_payload(&h)?;
            if (h.rows, h.cols) != (rows, cols) {
                return Err(CommError::Invalid(format!(
                    "step {step}: the previous stage sent hidden states [{}, {}] where the step has [{rows}, {cols}]",
                    h.rows, h.cols
                )));
            }
            return Ok(t);
        }
    }
}

impl Drop for PipelineLink {
    fn drop(&mut self) {
        self.close();
    }
}
