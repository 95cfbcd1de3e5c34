//! Generated gRPC types and stubs. `v1` is the public API; `worker::v1` is
//! internal (coordinator to workers, stage to stage); `coordinator::v1` is
//! internal (Raft between coordinator replicas).

pub mod v1 {
    tonic::include_proto!("llmos.v1");
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("llmos.worker.v1");
    }
}

pub mod coordinator {
    pub mod v1 {
        tonic::include_proto!("llmos.coordinator.v1");
    }
}

/// Encoded descriptors of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("llmos_descriptor");

/// A worker label or a deployment's required label as the command lines
/// take it: `key=value` (the key not empty).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}
