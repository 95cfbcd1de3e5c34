//! Iteration-level scheduling of one deployed model (pure logic: no I/O, no
//! clock of its own, no model). Each call to [`Scheduler::schedule`] forms
//! the next step's batch from sequences not already in a step:
//!
//! 1. running sequences, highest priority first: one token each when
//!    decoding, a chunk of the prompt otherwise (chunked prefill), within the
//!    step's token budget; a sequence that needs a new block and finds none
//!    preempts the lowest-priority, latest-arrived running sequence (its
//!    blocks are freed and it is recomputed later from its tokens);
//! 2. waiting sequences in priority order (then arrival), admitted while the
//!    batch has room and their prompt's blocks can be had (after the prefix
//!    cache's hits); a waiting sequence of higher priority than a running one
//!    may preempt it. A waiting prompt whose next uncached block a running
//!    sequence with the same prefix is still computing waits for it (and
//!    then shares it) instead of computing it a second time; the prompts
//!    behind it are not held up.
//!
//! [`Scheduler::complete`] applies a step's sampled tokens and reports what
//! finished. Every path that ends a sequence releases its blocks.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use llmos_meta::FinishReason;

use super::blocks::{BlockManager, PrefixStats};
use crate::sampling::{Choice, History};

/// Limits of one model's scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens one step processes (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once (1 turns batching off).
    pub max_running: usize,
    /// Requests waiting to start; more are refused.
    pub max_waiting: usize,
    /// Steps in flight at once (the pipeline's stage count).
    pub max_in_flight: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub prefix_caching: bool,
    /// The model's context length: prompt plus new tokens must fit.
    pub max_context: usize,
    /// The model's vocabulary: prompt ids (and biased ids) must be below
    /// it, checked at admission so a bad request never fails a batch.
    pub vocab_size: usize,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running", self.max_running),
            ("max_waiting", self.max_waiting),
            ("max_in_flight", self.max_in_flight),
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
            ("max_context", self.max_context),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }

    /// Sequences in one step: the running ones spread over the steps in
    /// flight, so every pipeline stage has a batch.
    fn batch_seqs(&self) -> usize {
        self.max_running.div_ceil(self.max_in_flight)
    }
}

/// What a sequence asks for.
#[derive(Debug, Clone)]
pub struct SeqParams {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Tokens that end the sequence (the model's EOS), empty to ignore.
    pub stop_ids: Vec<u32>,
    /// Higher runs first.
    pub priority: i32,
    pub deadline: Option<Instant>,
    /// Sampling index of the first generated token: 0, or the tokens a
    /// resumed sequence had already produced elsewhere (they end its
    /// prompt).
    pub first_index: u64,
}

/// How a sequence left the scheduler: it finished (the one finish reason
/// type of the project, `llmos_meta::FinishReason`: length, EOS, or
/// cancelled by its client; stop sequences are matched on text, outside the
/// engine), or it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Done(FinishReason),
    DeadlineExceeded,
    /// Pushed out of a full queue by a request of higher priority.
    Displaced,
    /// The step carrying it failed.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
}

#[derive(Debug)]
struct Seq {
    params: SeqParams,
    /// Prompt plus generated tokens.
    tokens: Vec<u32>,
    /// Leading positions whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    generated: usize,
    arrival: u64,
    phase: Phase,
    in_flight: bool,
    cancelled: bool,
    preemptions: u32,
    cached_prompt_tokens: usize,
    /// The hashes of its prompt's shareable full blocks as admitted
    /// (`BlockManager::prompt_chain`): what a waiting prompt compares with
    /// to wait for a block this sequence is computing.
    chain: Vec<u64>,
}

impl Seq {
    fn queue_key(&self, id: u64) -> (std::cmp::Reverse<i32>, u64, u64) {
        (std::cmp::Reverse(self.params.priority), self.arrival, id)
    }
}

/// Positions of a planned sequence that the later stages lost (they were
/// replaced) and must recompute, from the first stage's boundary rows,
/// before its step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub id: u64,
    pub position: usize,
    pub tokens: usize,
    /// Its block table up to `position + tokens`.
    pub blocks: Vec<u32>,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub id: u64,
    pub position: usize,
    pub tokens: Vec<u32>,
    pub blocks: Vec<u32>,
    /// Set when this step reaches the sequence's last token: the index of
    /// the token to sample.
    pub sample_index: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub seqs: Vec<Planned>,
}

impl StepPlan {
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// What a sequence's client hears.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// A token, its log-probability under the model and the alternatives
    /// asked for (`SamplingParams::top_logprobs`).
    Token {
        id: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
        /// On a sequence's first token: how long it waited from submission
        /// to its first step (set by the engine).
        queued: Option<std::time::Duration>,
    },
    Finished(Finished),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub reason: Finish,
    pub prompt_tokens: usize,
    pub generated: usize,
    pub cached_prompt_tokens: usize,
    pub preemptions: u32,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    QueueFull {
        waiting: usize,
        limit: usize,
    },
    /// The prompt could never fit in the cache.
    TooLong {
        blocks: usize,
        limit: usize,
    },
    /// The request fails a check every request passes (no new tokens,
    /// prompt plus new tokens beyond the model's context).
    Invalid(llmos_meta::request::RequestError),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub blocks_cached: usize,
    pub prefix: PrefixStats,
    pub preemptions: u64,
    pub steps: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<u64, Seq>,
    waiting: BTreeSet<(std::cmp::Reverse<i32>, u64, u64)>,
    running: Vec<u64>,
    arrivals: u64,
    preemptions: u64,
    steps: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.prefix_caching),
            cfg,
            seqs: HashMap::new(),
            waiting: BTreeSet::new(),
            running: Vec::new(),
            arrivals: 0,
            preemptions: 0,
            steps: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            blocks_total: self.blocks.num_blocks(),
            blocks_used: self.blocks.used(),
            blocks_cached: self.blocks.cached(),
            prefix: self.blocks.stats(),
            preemptions: self.preemptions,
            steps: self.steps,
        }
    }

    /// Whether nothing is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Queues a sequence. A full queue refuses it unless a waiting sequence
    /// of lower priority can be displaced (returned, finished).
    pub fn submit(
        &mut self,
        id: u64,
        params: SeqParams,
    ) -> Result<Option<(u64, Finished)>, Refusal> {
        let positions = params.prompt.len() + params.max_new_tokens;
        llmos_meta::request::check_prompt(&params.prompt, self.cfg.vocab_size)
            .map_err(Refusal::Invalid)?;
        llmos_meta::request::check_generation(
            params.prompt.len(),
            params.max_new_tokens,
            self.cfg.max_context,
        )
        .map_err(Refusal::Invalid)?;
        let blocks = self.blocks.blocks_for(positions);
        if blocks > self.blocks.num_blocks() {
            return Err(Refusal::TooLong {
                blocks,
                limit: self.blocks.num_blocks(),
            });
        }
        let mut displaced = None;
        if self.waiting.len() >= self.cfg.max_waiting {
            let &(std::cmp::Reverse(low), _, victim) =
                self.waiting.last().expect("a full queue is not empty");
            if params.priority <= low {
                return Err(Refusal::QueueFull {
                    waiting: self.waiting.len(),
                    limit: self.cfg.max_waiting,
                });
            }
            displaced = Some((victim, self.finish(victim, Finish::Displaced)));
        }
        self.arrivals += 1;
        let seq = Seq {
            tokens: params.prompt.clone(),
            params,
            computed: 0,
            blocks: Vec::new(),
            generated: 0,
            arrival: self.arrivals,
            phase: Phase::Waiting,
            in_flight: false,
            cancelled: false,
            preemptions: 0,
            cached_prompt_tokens: 0,
            chain: Vec::new(),
        };
        self.waiting.insert(seq.queue_key(id));
        self.seqs.insert(id, seq);
        Ok(displaced)
    }

    /// Ends a sequence at the client's request: at once when it is not in a
    /// step, else when its step completes.
    pub fn cancel(&mut self, id: u64) -> Option<Finished> {
        let seq = self.seqs.get_mut(&id)?;
        if seq.in_flight {
            seq.cancelled = true;
            return None;
        }
        Some(self.finish(id, Finish::Done(FinishReason::Cancelled)))
    }

    /// Ends sequences (not in a step) whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, Finished)> {
        let due: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| !s.in_flight && s.params.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        due.into_iter()
            .map(|id| (id, self.finish(id, Finish::DeadlineExceeded)))
            .collect()
    }

    /// The earliest deadline of a sequence not in a step.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.seqs
            .values()
            .filter(|s| !s.in_flight)
            .filter_map(|s| s.params.deadline)
            .min()
    }

    fn finish(&mut self, id: u64, reason: Finish) -> Finished {
        let seq = self.seqs.remove(&id).expect("finishing a known sequence");
        match seq.phase {
            Phase::Waiting => {
                self.waiting.remove(&seq.queue_key(id));
            }
            Phase::Running => self.running.retain(|&r| r != id),
        }
        self.blocks.release(&seq.blocks);
        Finished {
            reason,
            prompt_tokens: seq.params.prompt.len(),
            generated: seq.generated,
            cached_prompt_tokens: seq.cached_prompt_tokens,
            preemptions: seq.preemptions,
        }
    }

    /// Frees a running sequence's blocks and queues it again; it will be
    /// recomputed from its tokens.
    fn preempt(&mut self, id: u64) {
        let seq = self.seqs.get_mut(&id).expect("preempting a known sequence");
        debug_assert!(seq.phase == Phase::Running && !seq.in_flight);
        self.blocks.release(&std::mem::take(&mut seq.blocks));
        seq.computed = 0;
        seq.phase = Phase::Waiting;
        seq.preemptions += 1;
        let key = seq.queue_key(id);
        self.running.retain(|&r| r != id);
        self.waiting.insert(key);
        self.preemptions += 1;
        tracing::debug!(sequence = id, "preempted: blocks exhausted");
    }

    /// The running sequence to preempt: lowest priority, latest arrival,
    /// not in a step and not in `spare` (this step's plan).
    fn victim(&self, spare: &[(u64, usize)]) -> Option<u64> {
        self.running
            .iter()
            .filter(|id| !spare.iter().any(|(p, _)| p == *id))
            .map(|id| (id, &self.seqs[id]))
            .filter(|(_, s)| !s.in_flight)
            .min_by_key(|(id, s)| (s.params.priority, std::cmp::Reverse(s.arrival), **id))
            .map(|(id, _)| *id)
    }

    /// Whether the first block of `chain` that is not cached is one a
    /// running sequence with the same prefix has yet to compute (it is in
    /// its prompt past what it computed): a prompt admitted now would
    /// compute it again beside it.
    fn prefix_in_progress(&self, chain: &[u64]) -> bool {
        let next = self.blocks.cached_run(chain);
        let Some(&h) = chain.get(next) else {
            return false;
        };
        let bs = self.cfg.block_size;
        self.running.iter().any(|r| {
            let s = &self.seqs[r];
            s.chain.get(next) == Some(&h) && s.computed < (next + 1) * bs
        })
    }

    /// Forms the next step, or `None` when nothing can run now.
    pub fn schedule(&mut self) -> Option<StepPlan> {
        let mut budget = self.cfg.max_batch_tokens;
        let max_seqs = self.cfg.batch_seqs();
        // (sequence, tokens this step) in plan order.
        let mut plan: Vec<(u64, usize)> = Vec::new();
        let mut order: Vec<u64> = self
            .running
            .iter()
            .copied()
            .filter(|id| !self.seqs[id].in_flight)
            .collect();
        order.sort_by_key(|id| {
            (
                std::cmp::Reverse(self.seqs[id].params.priority),
                self.seqs[id].arrival,
            )
        });
        for id in order {
            if plan.len() >= max_seqs || budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted as a victim meanwhile
            }
            let (computed, remaining, held) = {
                let s = &self.seqs[&id];
                (s.computed, s.tokens.len() - s.computed, s.blocks.len())
            };
            let n = remaining.min(budget);
            let mut need = self.blocks.blocks_for(computed + n).saturating_sub(held);
            while need > 0 {
                if let Some(b) = self.blocks.allocate() {
                    self.seqs.get_mut(&id).unwrap().blocks.push(b);
                    need -= 1;
                    continue;
                }
                match self.victim(&plan) {
                    Some(v) => self.preempt(v),
                    None => break,
                }
                if self.seqs[&id].phase == Phase::Waiting {
                    break; // this sequence itself was the victim
                }
            }
            if need > 0 || self.seqs[&id].phase != Phase::Running {
                continue;
            }
            plan.push((id, n));
            budget -= n;
        }
        // Waiting prompts left for a later step: the next block they would
        // compute is being computed by a running sequence with the same
        // prefix (they share it once it is cached, instead of computing it
        // twice).
        let mut deferred: Vec<u64> = Vec::new();
        while plan.len() < max_seqs && budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(&(_, _, id)) = self
                .waiting
                .iter()
                .find(|(_, _, id)| !deferred.contains(id))
            else {
                break;
            };
            let chain = self.blocks.prompt_chain(&self.seqs[&id].tokens);
            if self.prefix_in_progress(&chain) {
                deferred.push(id);
                continue;
            }
            let got = {
                let s = &self.seqs[&id];
                let positions = s.tokens.len();
                self.blocks.allocate_prompt(&s.tokens, positions)
            };
            let Some(got) = got else {
                // Room for a higher-priority arrival: preempt a lower one.
                let prio = self.seqs[&id].params.priority;
                match self.victim(&plan) {
                    Some(v) if self.seqs[&v].params.priority < prio => {
                        self.preempt(v);
                        continue;
                    }
                    _ => break,
                }
            };
            let s = self.seqs.get_mut(&id).unwrap();
            self.waiting.remove(&s.queue_key(id));
            s.phase = Phase::Running;
            s.computed = got.cached_tokens;
            if s.preemptions == 0 {
                s.cached_prompt_tokens = got.cached_tokens;
            }
            s.blocks = got.blocks;
            s.chain = chain;
            self.running.push(id);
            let n = (s.tokens.len() - s.computed).min(budget);
            budget -= n;
            plan.push((id, n));
        }
        if plan.is_empty() {
            return None;
        }
        let mut seqs = Vec::with_capacity(plan.len());
        for (id, n) in plan {
            let s = self.seqs.get_mut(&id).unwrap();
            s.in_flight = true;
            let done = s.computed + n == s.tokens.len();
            seqs.push(Planned {
                id,
                position: s.computed,
                tokens: s.tokens[s.computed..s.computed + n].to_vec(),
                blocks: s.blocks.clone(),
                sample_index: done.then_some(s.params.first_index + s.generated as u64),
            });
        }
        self.steps += 1;
        Some(StepPlan { seqs })
    }

    /// Applies a finished step: `sampled` has one choice per planned
    /// sequence with a `sample_index`, in plan order. Returns the events to
    /// deliver.
    pub fn complete(&mut self, plan: &StepPlan, sampled: Vec<Choice>) -> Vec<(u64, SeqEvent)> {
        let mut events = Vec::new();
        let mut tokens = sampled.into_iter();
        for p in &plan.seqs {
            let tok = if p.sample_index.is_some() {
                tokens.next()
            } else {
                None
            };
            let Some(s) = self.seqs.get_mut(&p.id) else {
                continue;
            };
            s.in_flight = false;
            s.computed = p.position + p.tokens.len();
            self.blocks.register_full(&s.tokens, &s.blocks, s.computed);
            if s.cancelled {
                let f = self.finish(p.id, Finish::Done(FinishReason::Cancelled));
                events.push((p.id, SeqEvent::Finished(f)));
                continue;
            }
            let Some(Choice { id, logprob, top }) = tok else {
                continue;
            };
            s.tokens.push(id);
            s.generated += 1;
            events.push((
                p.id,
                SeqEvent::Token {
                    id,
                    logprob,
                    top,
                    queued: None,
                },
            ));
            let reason = if s.params.stop_ids.contains(&id) {
                Some(Finish::Done(FinishReason::Eos))
            } else if s.generated >= s.params.max_new_tokens {
                Some(Finish::Done(FinishReason::Length))
            } else {
                None
            };
            if let Some(r) = reason {
                let f = self.finish(p.id, r);
                events.push((p.id, SeqEvent::Finished(f)));
            }
        }
        events
    }

    /// The later stages were replaced: sequences that have run end
    /// (`Failed`; their clients resume them), and every block's content is
    /// held by the first stage only, to be recomputed by the later stages
    /// when a sequence reuses it (`repairs`). Waiting sequences stay.
    /// Returns the ended sequences and, to be run at once (before their
    /// clients' resumed requests arrive), the repairs of the cached blocks
    /// those requests will reuse; those blocks count as held by every
    /// stage from here on (`repair_failed` takes that back).
    /// With `later` false (the engine has no later stages: its only stage
    /// was kept) nothing is lost and no block goes stale.
    pub fn stages_replaced(&mut self, later: bool) -> (Vec<(u64, Finished)>, Vec<Repair>) {
        if later {
            self.blocks.mark_all_stale();
        }
        let ids = self.running.clone();
        let mut repairs = Vec::new();
        for &id in &ids {
            let s = &self.seqs[&id];
            let n = self.blocks.cached_prefix(&s.blocks, s.computed);
            let blocks = s.blocks[..n].to_vec();
            if let Some(from) = self.blocks.stale_from(&blocks, n * self.cfg.block_size) {
                repairs.push(Repair {
                    id,
                    position: from,
                    tokens: n * self.cfg.block_size - from,
                    blocks: blocks.clone(),
                });
            }
            self.blocks.set_stale(&blocks, false);
        }
        let ended = ids
            .into_iter()
            .map(|id| (id, self.finish(id, Finish::Failed)))
            .collect();
        (ended, repairs)
    }

    /// What the later stages must recompute before `plan` runs: for each
    /// planned sequence whose cached positions include blocks they lost,
    /// from its first such block to the step's position. Those blocks
    /// count as held by every stage from here on (the repairs and the step
    /// write them); `repair_failed` takes that back.
    pub fn repairs(&mut self, plan: &StepPlan) -> Vec<Repair> {
        let mut out = Vec::new();
        for p in &plan.seqs {
            if let Some(from) = self.blocks.stale_from(&p.blocks, p.position) {
                let held = self.blocks.blocks_for(p.position);
                out.push(Repair {
                    id: p.id,
                    position: from,
                    tokens: p.position - from,
                    blocks: p.blocks[..held].to_vec(),
                });
            }
            self.blocks.set_stale(&p.blocks, false);
        }
        out
    }

    /// Repairs that did not complete: their blocks are still lost on the
    /// later stages (call it before failing their sequences).
    pub fn repair_failed(&mut self, repairs: &[Repair]) {
        for r in repairs {
            self.blocks.set_stale(&r.blocks, true);
        }
    }

    /// The pipeline's depth changed: how many steps may be in flight.
    pub fn set_max_in_flight(&mut self, n: usize) {
        self.cfg.max_in_flight = n.max(1);
    }

    /// A sequence's tokens so far, as its penalties count them.
    pub fn history(&self, id: u64) -> Option<History> {
        let s = self.seqs.get(&id)?;
        Some(History {
            tokens: s.tokens.clone(),
            generated_from: s
                .params
                .prompt
                .len()
                .saturating_sub(s.params.first_index as usize),
        })
    }

    /// A step failed: its sequences end (and free their blocks).
    pub fn fail(&mut self, plan: &StepPlan) -> Vec<(u64, Finished)> {
        let mut out = Vec::new();
        for p in &plan.seqs {
            if let Some(s) = self.seqs.get_mut(&p.id) {
                s.in_flight = false;
                out.push((p.id, self.finish(p.id, Finish::Failed)));
            }
        }
        out
    }

    /// Ends every sequence (the engine is stopping or its pipeline broke).
    pub fn drain(&mut self, reason: Finish) -> Vec<(u64, Finished)> {
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        ids.into_iter()
            .map(|id| (id, self.finish(id, reason)))
            .collect()
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
