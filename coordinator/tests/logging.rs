//! `--log-format json`: every line the coordinator logs is one JSON object
//! (level, fields with the message, target), for log pipelines.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmos-coordinator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--no-auth",
            "--insecure",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("LLMOS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Until it leads: a fresh single-node cluster elects itself.
    let mut seen = Vec::new();
    while !seen.iter().any(|v: &serde_json::Value| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("leading"))
    }) {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the coordinator exited: {seen:?}"))
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        seen.push(v);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_llmos-coordinator"))
        .args(["--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--log-format"));
}
