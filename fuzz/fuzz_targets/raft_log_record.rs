//! Committed log records (one command's JSON a line) applied in order to
//! the cluster state, which must then survive a snapshot round trip: the
//! state machine refuses what it cannot apply, it never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmos_coordinator::state::{ClusterState, Command};

fuzz_target!(|data: &[u8]| {
    let mut state = ClusterState::default();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(cmd) = serde_json::from_slice::<Command>(line) {
            let _ = state.apply(&cmd);
        }
    }
    let json = serde_json::to_vec(&state).expect("a state encodes");
    let back: ClusterState = serde_json::from_slice(&json).expect("a state decodes");
    assert_eq!(serde_json::to_vec(&back).unwrap(), json);
});
