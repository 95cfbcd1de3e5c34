//! `llmos local` as a user runs it: a coordinator and two worker processes,
//! the embedded model split over both, one generation (`--once`); without
//! `--once` it keeps serving the endpoint it prints; and Ctrl-C stops every
//! process it started.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every address `llmos local` announced (`... on ADDR`, and the
/// coordinator's `(HTTP ADDR)`).
fn addresses(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.split(" on ").nth(1))
        .flat_map(|rest| {
            rest.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
                .filter(|w| w.contains(':') && w != &"HTTP")
                // host:port, without a path (a worker's metrics URL).
                .map(|a| {
                    let a = a.trim_start_matches("http://").trim_end_matches(',');
                    a.split('/').next().unwrap_or(a).to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn all_closed(addrs: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for a in addrs {
        while TcpStream::connect(a).is_ok() {
            assert!(Instant::now() < deadline, "{a} still accepts connections");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads `stderr` until a line contains `what`: (everything read, that line).
fn read_until(stderr: &mut impl BufRead, what: &str) -> (String, String) {
    let mut seen = String::new();
    let mut line = String::new();
    while !line.contains(what) {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited before printing {what:?}: {seen}"
        );
        seen.push_str(&line);
    }
    (seen, line)
}

#[test]
fn local_cluster_streams_a_generation_over_two_stages() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmos"))
        .args([
            "local",
            "--once",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "24",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("layers 0-15") && stderr.contains("layers 15-30"),
        "{stderr}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, tokens) = lines.split_last().unwrap();
    let text: String = tokens.iter().filter_map(|t| t["text"].as_str()).collect();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(last["finish_reason"], "eos");
    assert_eq!(
        last["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        tokens.len()
    );
    let addrs = addresses(&stderr);
    assert_eq!(
        addrs.len(),
        7,
        "gRPC, HTTP and internal of the coordinator, 2 workers and their metrics: {stderr}"
    );
    all_closed(&addrs);
}

#[test]
fn ctrl_c_stops_every_process() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmos"))
        .args([
            "local",
            "--prompt",
            "Count to a thousand.",
            "--max-tokens",
            "2000",
            "--ignore-eos",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (seen, _) = read_until(&mut stderr, "deployed");
    // Mid-generation, not before it: wait for the first streamed text (the
    // 2000-token budget cannot be spent before the signal).
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut stdout, &mut first).unwrap(),
        1,
        "no generated text before the signal: {seen}"
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let _ = drain.join();
    all_closed(&addresses(&seen));
}

#[test]
fn without_once_it_keeps_serving_the_endpoint_it_prints_until_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmos"))
        .args(["local", "--prompt", "Say hi.", "--max-tokens", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (seen, mut line) = read_until(&mut stderr, "serving until Ctrl-C");
    let url = line
        .split(" at ")
        .nth(1)
        .expect("the endpoint on the serving line")
        .trim()
        .to_string();
    // The printed command, run as a user would paste it.
    line.clear();
    stderr.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("llmos --coordinator {url} generate")),
        "{line}"
    );
    // The cluster takes the admin key it printed, and nothing else.
    let key = seen
        .split("export LLMOS_API_KEY=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the admin key line")
        .to_string();
    let generate = |key: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_llmos"));
        c.args(["--coordinator", &url, "generate", "--model", "smollm2"])
            .args([
                "--prompt",
                "What is the capital of France?",
                "--max-tokens",
                "24",
            ])
            .env_remove("LLMOS_API_KEY");
        if let Some(k) = key {
            c.env("LLMOS_API_KEY", k);
        }
        c.output().unwrap()
    };
    let refused = generate(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = generate(Some(&key));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    // The internal plane is mutual TLS (certificates made for this run),
    // and status says so.
    let status = Command::new(env!("CARGO_BIN_EXE_llmos"))
        .args(["--coordinator", &url, "status"])
        .env("LLMOS_API_KEY", &key)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("mutual TLS (this coordinator: coordinator 1)")
            && status.contains("NCCL traffic between GPUs is not encrypted"),
        "{status}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    all_closed(&addresses(&seen));
}
