//! Tests of the scheduler (pure logic: a fake model samples fixed tokens).

use super::*;

fn choice(id: u32) -> Choice {
    Choice {
        id,
        logprob: -0.1,
        top: vec![],
    }
}

fn cfg(num_blocks: usize, max_running: usize, budget: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: budget,
        max_running,
        max_waiting: 4,
        max_in_flight: 1,
        num_blocks,
        block_size: 4,
        prefix_caching: true,
        max_context: 1024,
        vocab_size: 1024,
    }
}

fn params(prompt: &[u32], max_new: usize, priority: i32) -> SeqParams {
    SeqParams {
        prompt: prompt.to_vec(),
        max_new_tokens: max_new,
        stop_ids: vec![0],
        priority,
        deadline: None,
        first_index: 0,
    }
}

/// Runs the plan with a fake model that always samples `tok`.
fn step(s: &mut Scheduler, tok: u32) -> (StepPlan, Vec<(u64, SeqEvent)>) {
    step_with(s, || tok)
}

/// Runs the plan with a fake model that samples what `sample` gives.
fn step_with(
    s: &mut Scheduler,
    mut sample: impl FnMut() -> u32,
) -> (StepPlan, Vec<(u64, SeqEvent)>) {
    let plan = s.schedule().expect("something to run");
    let n = plan
        .seqs
        .iter()
        .filter(|p| p.sample_index.is_some())
        .count();
    let ev = s.complete(&plan, (0..n).map(|_| choice(sample())).collect());
    (plan, ev)
}

#[test]
fn new_requests_join_and_finished_ones_leave_at_step_boundaries() {
    let mut s = Scheduler::new(cfg(32, 8, 64));
    s.submit(1, params(&[1, 2, 3], 3, 0)).unwrap();
    let (plan, ev) = step(&mut s, 7);
    assert_eq!(plan.seqs[0].tokens, vec![1, 2, 3]);
    assert_eq!(ev.len(), 1);
    s.submit(2, params(&[4, 5], 1, 0)).unwrap();
    let (plan, ev) = step(&mut s, 7);
    // 1 decodes its sampled token while 2's prompt joins the batch.
    assert_eq!(plan.seqs.len(), 2);
    assert_eq!(
        (plan.seqs[0].position, plan.seqs[0].tokens.clone()),
        (3, vec![7])
    );
    assert_eq!(plan.seqs[1].tokens, vec![4, 5]);
    assert!(ev.iter().any(|(id, e)| *id == 2
        && matches!(e, SeqEvent::Finished(f) if f.reason == Finish::Done(FinishReason::Length))));
    let (plan, ev) = step(&mut s, 0);
    assert_eq!(plan.seqs.len(), 1, "2 left the batch");
    assert!(
        matches!(ev[1].1, SeqEvent::Finished(f) if f.reason == Finish::Done(FinishReason::Eos))
    );
    assert!(s.is_idle());
    assert_eq!(s.stats().blocks_used, 0);
}

#[test]
fn long_prompts_are_chunked_beside_decoding() {
    let mut s = Scheduler::new(cfg(32, 8, 8));
    s.submit(1, params(&[1, 2], 10, 0)).unwrap();
    step(&mut s, 5);
    s.submit(2, params(&(10..30).collect::<Vec<_>>(), 1, 0))
        .unwrap();
    let mut chunks = Vec::new();
    for _ in 0..3 {
        let (plan, _) = step(&mut s, 5);
        assert_eq!(plan.seqs[0].tokens.len(), 1, "1 keeps decoding");
        assert!(plan.tokens() <= 8);
        chunks.push(plan.seqs[1].tokens.len());
    }
    assert_eq!(chunks, vec![7, 7, 6]);
}

#[test]
fn blocks_running_out_preempts_the_lowest_priority_and_it_resumes() {
    // 4 blocks of 4: two prompts of 8 positions fill the cache.
    let mut s = Scheduler::new(cfg(4, 8, 64));
    s.submit(1, params(&[1, 2, 3, 4, 5, 6, 7, 8], 6, 1))
        .unwrap();
    s.submit(2, params(&[9, 10, 11, 12, 13, 14, 15, 16], 6, 0))
        .unwrap();
    step(&mut s, 3);
    assert_eq!(s.stats().blocks_used, 4);
    // Both need a third block now: 2 (lower priority) is preempted.
    let (plan, _) = step(&mut s, 3);
    assert_eq!(plan.seqs.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(s.stats().preemptions, 1);
    assert_eq!(s.stats().waiting, 1);
    // 1 runs to the end; 2 is recomputed from prompt + its sampled token.
    let mut resumed = None;
    while !s.is_idle() {
        let (plan, _) = step(&mut s, 3);
        if let Some(p) = plan.seqs.iter().find(|p| p.id == 2) {
            resumed.get_or_insert(p.clone());
        }
    }
    let p = resumed.expect("2 was recomputed");
    assert_eq!(p.position, 0);
    assert_eq!(p.tokens, [9, 10, 11, 12, 13, 14, 15, 16, 3]);
    assert_eq!(
        p.sample_index,
        Some(1),
        "it continues with its second token"
    );
    assert_eq!(s.stats().blocks_used, 0);
}

#[test]
fn priority_orders_the_queue_and_a_full_queue_refuses() {
    let mut c = cfg(64, 1, 64);
    c.max_waiting = 2;
    let mut s = Scheduler::new(c);
    s.submit(1, params(&[1], 5, 0)).unwrap();
    step(&mut s, 9); // 1 runs; the batch holds one sequence
    s.submit(2, params(&[2], 1, 0)).unwrap();
    s.submit(3, params(&[3], 1, 5)).unwrap();
    let e = s.submit(4, params(&[4], 1, 0)).unwrap_err();
    assert_eq!(
        e,
        Refusal::QueueFull {
            waiting: 2,
            limit: 2
        }
    );
    // A higher priority displaces the lowest waiting request.
    let (id, f) = s.submit(5, params(&[5], 1, 9)).unwrap().unwrap();
    assert_eq!((id, f.reason), (2, Finish::Displaced));
    // 1 finishes; then 5 (priority 9) before 3 (priority 5).
    let mut order = Vec::new();
    while !s.is_idle() {
        let (plan, _) = step(&mut s, 9);
        for p in plan.seqs {
            if !order.contains(&p.id) {
                order.push(p.id);
            }
        }
    }
    assert_eq!(order, vec![1, 5, 3]);
}

#[test]
fn cancel_and_deadline_free_everything() {
    let mut s = Scheduler::new(cfg(16, 8, 64));
    let now = Instant::now();
    s.submit(1, params(&[1, 2, 3, 4, 5], 50, 0)).unwrap();
    let mut p = params(&[6, 7], 50, 0);
    p.deadline = Some(now + std::time::Duration::from_millis(10));
    s.submit(2, p).unwrap();
    s.submit(3, params(&[8], 50, 0)).unwrap();
    let plan = s.schedule().unwrap();
    // Cancelled while in a step: ends when the step completes.
    assert_eq!(s.cancel(1), None);
    let ev = s.complete(&plan, vec![choice(4); 3]);
    assert!(ev.iter().any(|(id, e)| *id == 1
        && matches!(e, SeqEvent::Finished(f) if f.reason == Finish::Done(FinishReason::Cancelled))));
    let expired = s.expire(now + std::time::Duration::from_millis(20));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].1.reason, Finish::DeadlineExceeded);
    assert_eq!(
        s.cancel(3).unwrap().reason,
        Finish::Done(FinishReason::Cancelled)
    );
    assert!(s.is_idle());
    assert_eq!(s.stats().blocks_used, 0);
}

#[test]
fn a_repeated_prompt_starts_from_cached_blocks() {
    let mut s = Scheduler::new(cfg(16, 8, 64));
    let prompt: Vec<u32> = (1..=10).collect();
    s.submit(1, params(&prompt, 1, 0)).unwrap();
    step(&mut s, 9);
    s.submit(2, params(&prompt, 1, 0)).unwrap();
    let (plan, ev) = step(&mut s, 9);
    assert_eq!(plan.seqs[0].position, 8, "two full blocks reused");
    assert_eq!(plan.seqs[0].tokens, vec![9, 10]);
    assert!(matches!(ev[1].1, SeqEvent::Finished(f) if f.cached_prompt_tokens == 8));
    assert_eq!(s.stats().prefix.hit_tokens, 8);
}

/// Prompts sharing a prefix that arrive together: the second waits
/// one step for the first to compute the shared blocks, then starts
/// from them, while a prompt with another prefix is not held up.
#[test]
fn a_prompt_waits_for_the_prefix_a_running_prompt_is_computing() {
    let mut s = Scheduler::new(cfg(32, 8, 64));
    let a: Vec<u32> = (1..=17).collect();
    let mut b = a[..16].to_vec();
    b.extend([99, 98]);
    s.submit(1, params(&a, 3, 0)).unwrap();
    s.submit(2, params(&b, 3, 0)).unwrap();
    s.submit(3, params(&[200, 201, 202], 3, 0)).unwrap();
    let (plan, _) = step(&mut s, 9);
    let ids: Vec<u64> = plan.seqs.iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![1, 3], "2 waits for 1's blocks; 3 does not");
    let (plan, _) = step(&mut s, 9);
    let two = plan.seqs.iter().find(|p| p.id == 2).expect("2 admitted");
    assert_eq!(
        (two.position, two.tokens.clone()),
        (16, vec![99, 98]),
        "the four blocks 1 computed are shared"
    );
    assert_eq!(s.stats().prefix.hit_tokens, 16);
    while !s.is_idle() {
        step(&mut s, 9);
    }
    assert_eq!(s.stats().blocks_used, 0);
}

#[test]
fn a_prompt_larger_than_the_cache_is_refused() {
    let mut s = Scheduler::new(cfg(2, 8, 64));
    let e = s.submit(1, params(&[1; 8], 4, 0)).unwrap_err();
    assert_eq!(
        e,
        Refusal::TooLong {
            blocks: 3,
            limit: 2
        }
    );
}

/// A seeded token stream (ids 100..40100).
fn next_token(state: &mut u64) -> u32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 33) % 40000 + 100) as u32
}

/// Multi-turn chats: conversations of 6 turns after a shared 32-token
/// system prompt (each turn the whole history plus 32 new tokens, then 16
/// generated ones joining it), sent by clients each with one request at a
/// time, rotating over its conversations.
struct Chats {
    rng: u64,
    history: Vec<Vec<u32>>,
    /// Each client's conversations, and how many turns it sent.
    clients: Vec<(Vec<usize>, usize)>,
    /// Sequence id -> (client, conversation, answer so far).
    live: HashMap<u64, (usize, usize, Vec<u32>)>,
    next_id: u64,
}

impl Chats {
    fn send(&mut self, s: &mut Scheduler, c: usize) {
        let (mine, sent) = &mut self.clients[c];
        if *sent == mine.len() * 6 {
            return;
        }
        let conv = mine[*sent % mine.len()];
        *sent += 1;
        let rng = &mut self.rng;
        self.history[conv].extend((0..32).map(|_| next_token(rng)));
        self.next_id += 1;
        let mut p = params(&self.history[conv], 16, 0);
        p.stop_ids.clear();
        s.submit(self.next_id, p).unwrap();
        self.live.insert(self.next_id, (c, conv, Vec::new()));
    }

    /// Runs `convs` conversations from `clients` clients on `s`: (cached
    /// prompt tokens, prompt tokens).
    fn run(s: &mut Scheduler, convs: usize, clients: usize, seed: u64) -> (usize, usize) {
        let mut rng = seed;
        let system: Vec<u32> = (0..32).map(|_| next_token(&mut rng)).collect();
        let mut chats = Chats {
            rng,
            history: vec![system; convs],
            clients: (0..clients)
                .map(|c| ((c..convs).step_by(clients).collect(), 0))
                .collect(),
            live: HashMap::new(),
            next_id: seed << 32,
        };
        for c in 0..clients {
            chats.send(s, c);
        }
        let (mut cached, mut prompt) = (0, 0);
        while !chats.live.is_empty() {
            let rng = &mut chats.rng;
            let (_, events) = step_with(s, || next_token(rng));
            for (id, e) in events {
                match e {
                    SeqEvent::Token { id: t, .. } => chats.live.get_mut(&id).unwrap().2.push(t),
                    SeqEvent::Finished(f) => {
                        let (c, conv, answer) = chats.live.remove(&id).unwrap();
                        cached += f.cached_prompt_tokens;
                        prompt += f.prompt_tokens;
                        chats.history[conv].extend(answer);
                        chats.send(s, c);
                    }
                }
            }
        }
        (cached, prompt)
    }
}

/// Multi-turn chats on a cache an earlier workload filled: each
/// conversation's newest blocks survive until its next turn, though the
/// running sequences hold much of the cache and the earlier workload's
/// prefixes (hit, so protected) fill the rest: the hit rate is a cold
/// cache's, every turn reusing the whole history (three quarters of the
/// prompt tokens). With the protected segment capped at a share of the
/// whole cache instead of the evictable blocks, the newest blocks were
/// evicted first and the rate fell to about two thirds.
#[test]
fn conversations_keep_their_histories_on_a_cache_an_earlier_workload_filled() {
    let chat_cfg = || {
        let mut c = cfg(192, 64, 512);
        c.block_size = 16;
        c.max_waiting = 64;
        c.max_context = 4096;
        c.vocab_size = 50_000;
        c
    };
    let cold = Chats::run(&mut Scheduler::new(chat_cfg()), 8, 4, 1);
    let mut s = Scheduler::new(chat_cfg());
    Chats::run(&mut s, 16, 8, 2);
    assert!(s.stats().blocks_cached > 150, "the earlier run filled it");
    let warm = Chats::run(&mut s, 8, 4, 1);
    assert!(s.stats().prefix.evictions > 0);
    assert_eq!(warm, cold, "hit tokens, prompt tokens");
    assert_eq!(cold.0 * 4, cold.1 * 3, "three quarters hit");
}
