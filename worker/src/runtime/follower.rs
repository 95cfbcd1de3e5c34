//! Tensor-parallel followers: the leader rank passes each step (its layout
//! and the embedded input) to the other ranks over the group's control
//! channel, and each follower runs it through its own host thread.
//!
//! The control message is little-endian: the number of sequences; per
//! sequence its position, token count, block count and blocks (u32 each);
//! then the hidden states' rows and columns (u64) and their f32 values.

use std::sync::Arc;

use tch::{Kind, Tensor};
use tokio::sync::oneshot;

use super::error::{Result, RuntimeError};
use super::step::{SeqStep, Step, StepInput};
use super::Command;
use crate::comm::{Collective, TcpGroup};

/// What a follower rank needs of a step: its layout and input.
pub(super) struct FollowerStep {
    pub seqs: Vec<SeqStep>,
    /// Float32 `[tokens, hidden]`.
    pub hidden: Tensor,
}

impl FollowerStep {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (rows, cols) = self.hidden.size2()?;
        let mut out = Vec::with_capacity(16 + (rows * cols * 4) as usize);
        let mut put = |v: u32| out.extend(v.to_le_bytes());
        put(self.seqs.len() as u32);
        for s in &self.seqs {
            put(s.position as u32);
            put(s.tokens as u32);
            put(s.blocks.len() as u32);
            s.blocks.iter().for_each(|&b| put(b));
        }
        out.extend((rows as u64).to_le_bytes());
        out.extend((cols as u64).to_le_bytes());
        let values = Vec::<f32>::try_from(self.hidden.to_device(tch::Device::Cpu).reshape([-1]))?;
        values.iter().for_each(|v| out.extend(v.to_le_bytes()));
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<FollowerStep> {
        let mut r = Reader { bytes, at: 0 };
        let n = r.u32()?;
        let mut seqs = Vec::new();
        for _ in 0..n {
            let (position, tokens, nb) = (r.u32()?, r.u32()?, r.u32()?);
            let blocks = (0..nb).map(|_| r.u32()).collect::<Result<Vec<u32>>>()?;
            seqs.push(SeqStep {
                position: position as usize,
                tokens: tokens as usize,
                blocks,
                ..Default::default()
            });
        }
        let (rows, cols) = (r.u64()? as usize, r.u64()? as usize);
        let len = rows.checked_mul(cols).and_then(|n| n.checked_mul(4));
        let values: Vec<f32> = r
            .take(len.unwrap_or(usize::MAX))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if r.at != bytes.len() {
            return Err(RuntimeError::Invalid(format!(
                "a step from the leader has {} bytes after its hidden states",
                bytes.len() - r.at
            )));
        }
        let hidden = Tensor::from_slice(&values).view([rows as i64, cols as i64]);
        Ok(FollowerStep { seqs, hidden })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "a step from the leader is cut off at byte {} of {}",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// A follower rank's loop: each step the leader broadcasts runs here too
/// (through the host thread, like any step), until the group closes or
/// breaks. Its result is the leader's to report.
pub(super) fn spawn_follower(
    model: String,
    group: Arc<TcpGroup>,
    host: std::sync::mpsc::Sender<Command>,
) {
    let name = format!("llmos-tp-rank-{}", group.rank());
    let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
        let msg = match group.recv_control() {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(%model, rank = group.rank(), reason = %e, "tensor-parallel follower stops");
                return;
            }
        };
        let step = match FollowerStep::decode(&msg) {
            Ok(s) => Step {
                model: model.clone(),
                id: 0,
                seqs: s.seqs,
                input: StepInput::Hidden(s.hidden.to_kind(Kind::Float)),
                to_next: false,
            },
            Err(e) => {
                tracing::error!(%model, error = %e, "a step from the leader does not decode");
                group.close();
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        if host.send(Command::Step(step, None, tx)).is_err() {
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
mod tests {
    use super::*;

    #[test]
    fn a_step_round_trips_and_a_cut_one_is_refused() {
        let step = FollowerStep {
            seqs: vec![
                SeqStep {
                    position: 7,
                    tokens: 1,
                    blocks: vec![3, 9],
                    ..Default::default()
                },
                SeqStep {
                    position: 0,
                    tokens: 2,
                    blocks: vec![4],
                    ..Default::default()
                },
            ],
            hidden: Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]),
        };
        let bytes = step.encode().unwrap();
        let back = FollowerStep::decode(&bytes).unwrap();
        assert_eq!(back.seqs, step.seqs);
        assert!(back.hidden.equal(&step.hidden));
        let e = FollowerStep::decode(&bytes[..bytes.len() - 1])
            .err()
            .expect("a cut message is refused")
            .to_string();
        assert!(e.contains("cut off"), "{e}");
    }
}
