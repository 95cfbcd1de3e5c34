//! The engine over a real (tiny, seeded) model on this worker's host: what
//! batching, preemption, prefix caching, cancellation, deadlines and a full
//! queue must not change, and must free.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::runtime::{HostHandle, ShardConfig};

async fn engine(
    num_blocks: u32,
    max_running: usize,
    max_batch_tokens: usize,
    max_waiting: usize,
) -> EngineHandle {
    let host = HostHandle::spawn();
    let loaded = host
        .load(ShardConfig::tiny("m", num_blocks as usize, 4))
        .await
        .unwrap();
    let cfg = SchedulerConfig {
        max_batch_tokens,
        max_running,
        max_waiting,
        max_in_flight: 1,
        num_blocks: num_blocks as usize,
        block_size: 4,
        prefix_caching: true,
        max_context: loaded.max_context,
        vocab_size: loaded.vocab_size,
    };
    EngineHandle::spawn(
        "m".into(),
        cfg,
        Pipeline::new(vec![Arc::new(LocalStage { host })], false),
    )
    .unwrap()
}

fn sub(prompt: &[u32], max_new: usize, seed: Option<u64>) -> Submission {
    Submission {
        request_id: "r".into(),
        params: SeqParams {
            prompt: prompt.to_vec(),
            max_new_tokens: max_new,
            stop_ids: vec![],
            priority: 0,
            deadline: None,
            first_index: 0,
        },
        trace: None,
        sampling: SamplingParams::from_wire(
            if seed.is_some() { 0.8 } else { 0.0 },
            0,
            0.0,
            seed.unwrap_or(0),
        ),
    }
}

/// Tokens of a sequence until it finishes.
async fn collect(mut ev: Events) -> Result<(Vec<u32>, Finished)> {
    let mut out = Vec::new();
    while let Some(e) = ev.recv().await {
        match e? {
            SeqEvent::Token { id, .. } => out.push(id),
            SeqEvent::Finished(f) => return Ok((out, f)),
        }
    }
    panic!("the engine dropped a sequence without finishing it")
}

fn prompts() -> Vec<(Vec<u32>, usize, Option<u64>)> {
    (0..6u32)
        .map(|i| {
            let p: Vec<u32> = (0..3 + 5 * i)
                .map(|j| (j * 37 + i * 11 + 1) % 512)
                .collect();
            (p, 6 + i as usize, (i % 3 == 2).then_some(40 + i as u64))
        })
        .collect()
}

async fn alone(p: &[u32], n: usize, seed: Option<u64>) -> Vec<u32> {
    let e = engine(64, 1, 512, 8).await;
    let (_, ev) = e.submit(sub(p, n, seed)).await.unwrap();
    collect(ev).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sequences_give_the_tokens_they_give_alone() {
    let e = engine(128, 8, 16, 16).await;
    let mut runs = Vec::new();
    for (p, n, seed) in prompts() {
        runs.push(e.submit(sub(&p, n, seed)).await.unwrap().1);
    }
    let mut batched = Vec::new();
    for ev in runs {
        batched.push(collect(ev).await.unwrap().0);
    }
    let stats = e.stats().await.unwrap();
    let tokens: usize = batched.iter().map(Vec::len).sum();
    // One at a time takes a step per token or more; fewer steps than
    // tokens means steps carried several sequences. (Not "< tokens / 2":
    // how many requests arrive before the first step depends on the
    // machine's load.)
    assert!(
        (stats.scheduler.steps as usize) < tokens,
        "{} steps for {tokens} tokens: not batched",
        stats.scheduler.steps
    );
    for ((p, n, seed), got) in prompts().into_iter().zip(&batched) {
        assert_eq!(got.len(), n);
        assert_eq!(got, &alone(&p, n, seed).await, "prompt {p:?}");
    }
    assert_eq!(stats.scheduler.blocks_used, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_resume_with_the_same_tokens() {
    // 12 blocks of 4 positions for 4 sequences of 27-34 positions (7-9
    // blocks each). Short prompts are all admitted at once (a block or two
    // each) and outlive the submissions by far (24-30 steps each), so they
    // must outgrow the cache whatever the timing.
    let e = engine(12, 8, 64, 16).await;
    let work: Vec<(Vec<u32>, usize, Option<u64>)> = (0..4u32)
        .map(|i| {
            let p: Vec<u32> = (0..3 + i).map(|j| (j * 53 + i * 7 + 2) % 512).collect();
            (
                p,
                24 + 2 * i as usize,
                (i % 2 == 1).then_some(70 + i as u64),
            )
        })
        .collect();
    let mut runs = Vec::new();
    for (p, n, seed) in &work {
        runs.push(e.submit(sub(p, *n, *seed)).await.unwrap().1);
    }
    let mut preempted = 0;
    let mut outs = Vec::new();
    for ev in runs {
        let (t, f) = collect(ev).await.unwrap();
        preempted += f.preemptions;
        outs.push(t);
    }
    assert!(preempted > 0, "the cache was never short");
    for ((p, n, seed), got) in work.into_iter().zip(&outs) {
        assert_eq!(got.len(), n);
        assert_eq!(got, &alone(&p, n, seed).await, "prompt {p:?}");
    }
    let s = e.stats().await.unwrap().scheduler;
    assert_eq!(s.blocks_used, 0);
    assert!(s.preemptions > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_cache_hit_gives_the_tokens_of_a_miss() {
    let e = engine(64, 8, 512, 8).await;
    let system: Vec<u32> = (0..21).map(|j| (j * 13 + 5) % 512).collect();
    let a = [&system[..], &[7, 8, 9]].concat();
    let b = [&system[..], &[100, 3]].concat();
    let (miss, f) = collect(e.submit(sub(&a, 8, None)).await.unwrap().1)
        .await
        .unwrap();
    assert_eq!(f.cached_prompt_tokens, 0);
    let (hit, f) = collect(e.submit(sub(&a, 8, None)).await.unwrap().1)
        .await
        .unwrap();
    assert_eq!(f.cached_prompt_tokens, 20, "five full blocks of 4 reused");
    assert_eq!(hit, miss);
    // A different question after the same system prompt reuses its blocks.
    let (other, f) = collect(e.submit(sub(&b, 8, None)).await.unwrap().1)
        .await
        .unwrap();
    assert_eq!(f.cached_prompt_tokens, 20);
    assert_eq!(other, alone(&b, 8, None).await);
    let s = e.stats().await.unwrap().scheduler;
    assert_eq!(s.prefix.hit_tokens, 40);
    assert_eq!(s.blocks_used, 0);
}

/// Two prompts with the same system prompt queued behind a long prompt
/// are admitted in the same step, where its last chunk leaves room for
/// both: the second waits for the first to compute the shared blocks and
/// starts from them (admitted beside it, it would compute them again), and
/// each gives the tokens it gives alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_sharing_a_prefix_that_arrive_together_compute_it_once() {
    let e = engine(512, 8, 64, 8).await;
    let long: Vec<u32> = (0..64 * 24 + 1).map(|j| (j * 7 + 1) % 512).collect();
    let system: Vec<u32> = (0..21).map(|j| (j * 17 + 3) % 512).collect();
    let a = [&system[..], &[7, 8, 9]].concat();
    let b = [&system[..], &[100, 3]].concat();
    let (_, el) = e.submit(sub(&long, 1, None)).await.unwrap();
    let (_, ea) = e.submit(sub(&a, 8, None)).await.unwrap();
    let (_, eb) = e.submit(sub(&b, 8, None)).await.unwrap();
    let (ta, fa) = collect(ea).await.unwrap();
    let (tb, fb) = collect(eb).await.unwrap();
    let (_, fl) = collect(el).await.unwrap();
    assert!(fl.generated == 1, "the long prompt ran: {fl:?}");
    assert_eq!(fa.cached_prompt_tokens, 0);
    assert_eq!(fb.cached_prompt_tokens, 20, "five full blocks of 4 shared");
    assert_eq!(ta, alone(&a, 8, None).await);
    assert_eq!(tb, alone(&b, 8, None).await);
    let s = e.stats().await.unwrap().scheduler;
    assert_eq!((s.prefix.hit_tokens, s.blocks_used), (20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_and_deadlines_return_every_block() {
    let e = engine(2048, 8, 512, 8).await;
    let (id, mut ev) = e.submit(sub(&[1, 2, 3, 4, 5], 200, None)).await.unwrap();
    // Cancel once it is running.
    assert!(matches!(ev.recv().await, Some(Ok(SeqEvent::Token { .. }))));
    e.cancel(id);
    // A deadline that falls mid-generation: far enough for the first token
    // on a loaded machine, far too near for 8000 tokens.
    let mut deadline = sub(&[9, 8, 7], 8000, None);
    let due = Instant::now() + Duration::from_millis(500);
    deadline.params.deadline = Some(due);
    let (_, mut dev) = e.submit(deadline).await.unwrap();
    assert!(
        matches!(dev.recv().await, Some(Ok(SeqEvent::Token { .. }))),
        "the first token did not arrive before the deadline"
    );
    match collect(dev).await {
        Err(EngineError::DeadlineExceeded { generated, .. }) => {
            assert!(Instant::now() >= due, "expired before its deadline");
            assert!(generated > 0 && generated < 8000, "{generated}")
        }
        other => panic!("expected DEADLINE_EXCEEDED, got {other:?}"),
    }
    // The cancelled one ends (cancelled) or its channel closes.
    while let Some(e) = ev.recv().await {
        if let Ok(SeqEvent::Finished(f)) = e {
            assert_eq!(f.reason, Finish::Done(llmos_meta::FinishReason::Cancelled));
        }
    }
    let s = e.stats().await.unwrap().scheduler;
    assert_eq!((s.blocks_used, s.running, s.waiting), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted_with_a_retry_hint() {
    // One running sequence, at most two waiting.
    let e = engine(512, 1, 512, 2).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(e.submit(sub(&[1, 2, 3], 300, None)).await.unwrap());
    }
    let err = e.submit(sub(&[4, 5], 4, None)).await.unwrap_err();
    assert_eq!(err.kind(), llmos_meta::failure::FailureKind::QueueFull);
    assert!(err.to_string().contains("limit 2"), "{err}");
    assert!(err.retry_after_ms().is_some_and(|ms| ms >= 50), "{err:?}");
    // A higher priority displaces a waiting one instead of being refused.
    let mut urgent = sub(&[6], 2, None);
    urgent.params.priority = 3;
    let (_, ev) = e.submit(urgent).await.unwrap();
    for (id, _) in &held {
        e.cancel(*id);
    }
    assert_eq!(collect(ev).await.unwrap().0.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_resumed_from_its_emitted_tokens_continues_it_exactly() {
    // What a coordinator does when a replica dies mid-stream: the prompt
    // plus the k tokens already streamed, sampling from index k, on a fresh
    // engine (another replica), must produce the undisturbed tail.
    for seed in [None, Some(41u64)] {
        let p: Vec<u32> = (0..9u32).map(|j| (j * 29 + 5) % 512).collect();
        let whole = alone(&p, 12, seed).await;
        for k in [1usize, 5, 11] {
            let mut resumed = sub(&[p.as_slice(), &whole[..k]].concat(), 12 - k, seed);
            resumed.params.first_index = k as u64;
            let e = engine(64, 1, 512, 8).await;
            let (_, ev) = e.submit(resumed).await.unwrap();
            let tail = collect(ev).await.unwrap().0;
            assert_eq!(tail, whole[k..], "seed {seed:?}, resumed after {k} tokens");
        }
        if seed.is_some() {
            // The index matters: resuming without it draws other tokens.
            let e = engine(64, 1, 512, 8).await;
            let (_, ev) = e
                .submit(sub(&[p.as_slice(), &whole[..5]].concat(), 7, seed))
                .await
                .unwrap();
            assert_ne!(collect(ev).await.unwrap().0, whole[5..]);
        }
    }
}

/// Token ids outside the vocabulary (in the prompt, or biased) are refused
/// when submitted, naming the id: never a failed batch step for the
/// sequences beside them, never a bias silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_outside_the_vocabulary_are_refused_at_admission() {
    let e = engine(64, 4, 64, 4).await;
    let (_, ok) = e.submit(sub(&[1, 2, 3], 3, None)).await.unwrap();
    let err = e.submit(sub(&[1, 1 << 30], 3, None)).await.unwrap_err();
    assert_eq!(err.kind(), llmos_meta::failure::FailureKind::InvalidRequest);
    assert!(err.to_string().contains(&(1u32 << 30).to_string()), "{err}");
    let mut biased = sub(&[1, 2], 3, None);
    biased.sampling.logit_bias = vec![(1 << 30, 5.0)];
    let err = e.submit(biased).await.unwrap_err();
    assert!(err.to_string().contains("logit_bias"), "{err}");
    // The sequence admitted before runs to its end.
    assert_eq!(collect(ok).await.unwrap().0.len(), 3);
}

/// A two-stage engine over two hosts of this process (the tiny model's
/// two layers, one each), relayed.
async fn stage_host(layers: std::ops::Range<usize>, embed: bool, head: bool) -> HostHandle {
    let host = HostHandle::spawn();
    host.load(ShardConfig {
        layers,
        embed,
        head,
        ..ShardConfig::tiny("m", 512, 4)
    })
    .await
    .unwrap();
    host
}

fn two_stages(first: &HostHandle, second: &HostHandle) -> Pipeline {
    Pipeline::new(
        vec![
            Arc::new(LocalStage {
                host: first.clone(),
            }),
            Arc::new(LocalStage {
                host: second.clone(),
            }),
        ],
        false,
    )
}

fn two_stage_config() -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: 8,
        max_running: 4,
        max_waiting: 8,
        max_in_flight: 2,
        num_blocks: 512,
        block_size: 4,
        prefix_caching: true,
        max_context: 2048,
        vocab_size: 512,
    }
}

async fn two_stage_engine(first: &HostHandle, second: &HostHandle) -> EngineHandle {
    EngineHandle::spawn("m".into(), two_stage_config(), two_stages(first, second)).unwrap()
}

/// Issue 21 item 3: the second stage's worker is lost and its layers are
/// loaded anew elsewhere (an empty cache), while the first stage kept its
/// cache. Resumed sequences (prompt plus the tokens streamed) reuse the
/// first stage's cached blocks; only the new stage recomputes them, from
/// the first stage's boundary rows, and the tokens are the undisturbed
/// run's. A sequence running at the replacement has its cached blocks
/// recomputed at once (before its resumed request arrives); one that had
/// finished, when a request reuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_later_stage_recomputes_only_what_it_lost() {
    async fn undisturbed(p: &[u32], n: usize, seed: Option<u64>) -> Vec<u32> {
        let (a, b) = (
            stage_host(0..1, true, false).await,
            stage_host(1..2, false, true).await,
        );
        let e = two_stage_engine(&a, &b).await;
        let (_, ev) = e.submit(sub(p, n, seed)).await.unwrap();
        collect(ev).await.unwrap().0
    }
    for seed in [None, Some(43u64)] {
        let p: Vec<u32> = (0..13u32).map(|j| (j * 31 + 7) % 512).collect();
        let long = [9u32, 8, 7];
        let whole = undisturbed(&p, 12, seed).await;

        let first = stage_host(0..1, true, false).await;
        let e = two_stage_engine(&first, &stage_host(1..2, false, true).await).await;
        // A sequence that will be running when the stage is replaced.
        let (_, mut running) = e.submit(sub(&long, 1500, seed)).await.unwrap();
        let (_, ev) = e.submit(sub(&p, 5, seed)).await.unwrap();
        assert_eq!(collect(ev).await.unwrap().0, whole[..5]);
        // At least 4 of its tokens streamed before the replacement (on a
        // loaded machine the short request can finish first).
        let mut streamed = Vec::new();
        while streamed.len() < 4 {
            match running.recv().await.expect("an event") {
                Ok(SeqEvent::Token { id, .. }) => streamed.push(id),
                other => panic!("before the replacement: {other:?}"),
            }
        }

        // The second stage replaced by a fresh host: nothing cached there.
        e.repipe(two_stages(&first, &stage_host(1..2, false, true).await))
            .unwrap();
        let err = loop {
            match running.recv().await.expect("an event") {
                Ok(SeqEvent::Token { id, .. }) => streamed.push(id),
                Ok(SeqEvent::Finished(f)) => panic!("finished before the replacement: {f:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(
            err.kind(),
            llmos_meta::failure::FailureKind::StageUnavailable,
            "a running sequence ends resumable: {err}"
        );
        let k = streamed.len();

        // The finished one: its 4 cached blocks (13 + 4 positions were
        // computed) are reused, and recomputed by the new stage then.
        let mut resumed = sub(&[p.as_slice(), &whole[..5]].concat(), 7, seed);
        resumed.params.first_index = 5;
        let (_, ev) = e.submit(resumed).await.unwrap();
        let (tail, f) = collect(ev).await.unwrap();
        assert_eq!(tail, whole[5..], "seed {seed:?}");
        assert_eq!(f.cached_prompt_tokens, 16);
        let at_replacement = e.stats().await.unwrap().repaired_tokens - 16;

        // The running one: recomputed at the replacement, so its resumed
        // request reuses blocks every stage holds, and goes on exactly.
        let mut resumed = sub(&[long.as_slice(), &streamed].concat(), 20, seed);
        resumed.params.first_index = k as u64;
        let (_, ev) = e.submit(resumed).await.unwrap();
        let (tail, f) = collect(ev).await.unwrap();
        assert_eq!(
            tail,
            undisturbed(&long, k + 20, seed).await[k..],
            "seed {seed:?}"
        );
        assert!(f.cached_prompt_tokens > 0);
        assert_eq!(f.cached_prompt_tokens as u64, at_replacement);
        let stats = e.stats().await.unwrap();
        assert_eq!(stats.repaired_tokens, at_replacement + 16);
        assert_eq!(stats.scheduler.blocks_used, 0);

        // A second reuse finds them held by every stage: nothing repaired.
        let mut again = sub(&[p.as_slice(), &whole[..5]].concat(), 7, seed);
        again.params.first_index = 5;
        let (_, ev) = e.submit(again).await.unwrap();
        assert_eq!(collect(ev).await.unwrap().0, whole[5..]);
        assert_eq!(
            e.stats().await.unwrap().repaired_tokens,
            at_replacement + 16
        );
    }
}

/// Without the repair the reused blocks would be read from the new
/// stage's empty cache: the same resumed request, on an engine whose first
/// stage's cache is not known to be lost elsewhere (a fresh second stage
/// put in place without telling the engine), gives other tokens. This is
/// what makes the test above able to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_blocks_a_new_stage_lacks_without_repair_goes_wrong() {
    let p: Vec<u32> = (0..13u32).map(|j| (j * 31 + 7) % 512).collect();
    let (a, b) = (
        stage_host(0..1, true, false).await,
        stage_host(1..2, false, true).await,
    );
    let undisturbed = two_stage_engine(&a, &b).await;
    let (_, ev) = undisturbed.submit(sub(&p, 12, None)).await.unwrap();
    let whole = collect(ev).await.unwrap().0;
    drop(undisturbed);
    let e = two_stage_engine(&a, &b).await;
    let (_, ev) = e.submit(sub(&p, 5, None)).await.unwrap();
    assert_eq!(collect(ev).await.unwrap().0, whole[..5]);
    // The second stage's host unloads and reloads its shard behind the
    // engine's back: its cache is empty, the engine still trusts it.
    b.unload("m".into()).await.unwrap();
    b.load(ShardConfig {
        layers: 1..2,
        embed: false,
        head: true,
        ..ShardConfig::tiny("m", 512, 4)
    })
    .await
    .unwrap();
    let mut resumed = sub(&[p.as_slice(), &whole[..5]].concat(), 7, None);
    resumed.params.first_index = 5;
    let (_, ev) = e.submit(resumed).await.unwrap();
    assert_ne!(collect(ev).await.unwrap().0, whole[5..]);
}

/// A one-stage engine handed its own stage again (a new placement epoch
/// that kept the shard): nothing was lost, so its cache is reused as is,
/// nothing is recomputed, and a resumed request continues exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_single_stage_loses_nothing_at_a_new_epoch() {
    let p: Vec<u32> = (0..13u32).map(|j| (j * 31 + 7) % 512).collect();
    let whole = alone(&p, 12, None).await;
    let host = stage_host(0..2, true, true).await;
    let one = |host: &HostHandle| {
        Pipeline::new(
            vec![Arc::new(LocalStage { host: host.clone() }) as Arc<dyn Stage>],
            false,
        )
    };
    let cfg = SchedulerConfig {
        max_in_flight: 1,
        ..two_stage_config()
    };
    let e = EngineHandle::spawn("m".into(), cfg, one(&host)).unwrap();
    let (_, ev) = e.submit(sub(&p, 5, None)).await.unwrap();
    assert_eq!(collect(ev).await.unwrap().0, whole[..5]);
    e.repipe(one(&host)).unwrap();
    let mut resumed = sub(&[p.as_slice(), &whole[..5]].concat(), 7, None);
    resumed.params.first_index = 5;
    let (_, ev) = e.submit(resumed).await.unwrap();
    let (tail, f) = collect(ev).await.unwrap();
    assert_eq!(tail, whole[5..]);
    assert_eq!(f.cached_prompt_tokens, 16);
    assert_eq!(e.stats().await.unwrap().repaired_tokens, 0);
}
