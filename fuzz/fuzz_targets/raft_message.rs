//! What a coordinator's `Peer.Raft` receives: the batch (prost), each Raft
//! message in it (rust-protobuf), and snapshot files as the log store
//! reads them back (magic, checksum, protobuf, the state's JSON).
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use protobuf::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = llmos_proto::coordinator::v1::RaftRequest::decode(data) {
        for m in &batch.messages {
            let _ = raft::eraftpb::Message::parse_from_bytes(m);
        }
    }
    let _ = raft::eraftpb::Message::parse_from_bytes(data);
    let _ = llmos_coordinator::consensus::log_store::check_snapshot(data);
});
