//! A coordinator stops on SIGTERM (what Kubernetes sends a pod) as it does
//! on SIGINT: it stops accepting, joins its tasks and exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigterm_and_sigint_stop_the_coordinator_cleanly() {
    for sig in ["-TERM", "-INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmos-coordinator"))
            // Both planes, each on its own server: both stop.
            .args([
                "--listen",
                "127.0.0.1:0",
                "--internal-listen",
                "127.0.0.1:0",
                "--insecure",
            ])
            .args(["--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("no address: {line:?}"))
            .to_string();
        assert!(std::net::TcpStream::connect(&addr).is_ok(), "{addr}");
        let killed = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{sig}: still running after 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{sig}: {status}");
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "{sig}: {addr} still accepts"
        );
    }
}
