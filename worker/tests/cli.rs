//! The `llmos-worker generate` output contract, run as a user would: the
//! JSON stream, plain streaming with a summary on stderr, stop sequences,
//! seeded sampling, and a clean error (exit 1, no panic) for a bad file.

use std::process::{Command, Output};

fn generate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmos-worker"))
        .arg("generate")
        .args(["--model", "smollm2", "--threads", "2"])
        .args(args)
        .output()
        .expect("run llmos-worker")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn text_of(lines: &[serde_json::Value]) -> String {
    lines.iter().filter_map(|l| l["text"].as_str()).collect()
}

const QUESTION: &str = "What is the capital of France?";

#[test]
fn json_stream_has_one_object_per_token_then_usage() {
    let lines = json_lines(&generate(&[
        "--prompt",
        QUESTION,
        "--max-tokens",
        "24",
        "--json",
    ]));
    let (last, tokens) = lines.split_last().unwrap();
    assert!(!tokens.is_empty());
    for t in tokens {
        assert!(t["id"].as_u64().is_some() && t["text"].is_string(), "{t}");
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0 && lp.is_finite(), "{t}");
    }
    assert_eq!(
        last["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        tokens.len()
    );
    assert!(
        last["usage"]["prompt_tokens"].as_u64().unwrap() > 10,
        "chat template applied: {last}"
    );
    // Greedy SmolLM2 answers and ends its turn with <|im_end|>.
    assert_eq!(last["finish_reason"], "eos", "{last}");
    assert!(text_of(tokens).contains("Paris"), "{}", text_of(tokens));
}

#[test]
fn stop_sequence_ends_generation_before_the_stop_text() {
    let lines = json_lines(&generate(&[
        "--prompt", QUESTION, "--stop", "Paris", "--json",
    ]));
    let (last, tokens) = lines.split_last().unwrap();
    assert_eq!(last["finish_reason"], "stop");
    let text = text_of(tokens);
    assert!(
        !text.contains("Paris") && text.contains("capital"),
        "{text:?}"
    );
}

#[test]
fn seeded_sampling_reproduces_and_max_tokens_is_honoured() {
    let args = [
        "--prompt",
        "Write a short poem about rain.",
        "--max-tokens",
        "16",
    ];
    let run = |seed: &str| {
        let mut a = args.to_vec();
        a.extend([
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]);
        json_lines(&generate(&a))
    };
    let (a, b, c) = (run("5"), run("5"), run("6"));
    // Same seed, same tokens (the final line differs only in timings).
    assert_eq!(a[..a.len() - 1], b[..b.len() - 1]);
    let ids = |v: &[serde_json::Value]| {
        v.iter()
            .filter_map(|l| l["id"].as_u64())
            .collect::<Vec<_>>()
    };
    assert_ne!(ids(&a), ids(&c), "different seeds gave the same 16 tokens");
    let last = a.last().unwrap();
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(ids(&a).len(), 16);
}

#[test]
fn plain_mode_streams_text_and_summarizes_on_stderr() {
    let out = generate(&["--prompt", QUESTION, "--max-tokens", "24"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stdout.contains("Paris"), "{stdout:?}");
    assert!(!stdout.contains("tokens/s"), "summary belongs on stderr");
    let summary = stderr.lines().last().unwrap();
    assert!(
        summary.contains("prompt") && summary.contains("generated") && summary.contains("tokens/s"),
        "{summary}"
    );
}

#[test]
fn bad_model_file_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmos-worker"))
        .args([
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("broken.gguf") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A prompt longer than the context is refused with the numbers.
    let long = "word ".repeat(9000);
    let out = generate(&["--prompt", &long, "--raw", "--max-tokens", "8"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("context length") && stderr.contains("8192"),
        "{stderr}"
    );
}

/// `serve` stops on SIGTERM (what Kubernetes sends a pod; `llmos local`
/// its children) the way it stops on Ctrl-C: exit 0, the port closed.
#[test]
fn sigterm_stops_serve_cleanly() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmos-worker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run llmos-worker serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().trim_start_matches("listening on ").to_string();
    assert!(std::net::TcpStream::connect(&addr).is_ok(), "{line:?}");
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        match child.try_wait().unwrap() {
            Some(s) => break s,
            None if std::time::Instant::now() > deadline => {
                panic!("still running 15 s after SIGTERM")
            }
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} still accepts"
    );
}

/// `serve` needs certificates or an explicit --insecure, refuses another
/// role's certificate, and with certificates serves its API over mutual
/// TLS only, registered with a coordinator or not.
#[test]
fn serve_takes_certificates_or_insecure_and_then_speaks_only_tls() {
    use llmos_tls::dev::{self, Holder};
    use llmos_tls::{Role, Tls, TlsFiles};
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    dev::init(
        dir.path(),
        &[
            Holder::bound(Role::Worker, "w"),
            Holder::bound(Role::Coordinator, "1"),
        ],
        &["127.0.0.1".into()],
    )
    .unwrap();
    let flags = |name: &str| -> Vec<String> {
        let f = TlsFiles::in_dir(dir.path(), name);
        [
            ("--tls-cert", f.cert),
            ("--tls-key", f.key),
            ("--tls-ca", f.ca),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v.display().to_string()])
        .collect()
    };
    let refused = |extra: &[String]| {
        let out = Command::new(env!("CARGO_BIN_EXE_llmos-worker"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("LLMOS_INSECURE")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(&[]);
    assert!(e.contains("--tls-cert") && e.contains("--insecure"), "{e}");
    let e = refused(&flags("coordinator-1"));
    assert!(e.contains("not of a worker"), "{e}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_llmos-worker"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(flags("worker-w"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!("http://{}", line.trim().trim_start_matches("listening on "));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (plain, coordinator) = rt.block_on(async {
        use llmos_proto::worker::v1 as wk;
        let stats = |ch| async move {
            wk::worker_client::WorkerClient::new(ch)
                .stats(wk::StatsRequest {})
                .await
        };
        let e = tonic::transport::Endpoint::from_shared(url.clone()).unwrap();
        let plain = match e.connect().await {
            Err(_) => true,
            Ok(ch) => stats(ch).await.is_err(),
        };
        let c = Tls::load(TlsFiles::in_dir(dir.path(), "coordinator-1")).unwrap();
        let ch = llmos_tls::client::connect(
            e,
            Some(&c),
            Role::Worker,
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
        (plain, stats(ch).await.map(|_| ()))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(plain, "a plaintext client read the worker's stats");
    coordinator.unwrap();
}
