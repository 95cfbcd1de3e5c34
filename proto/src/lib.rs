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

/// Server reflection, v1 and v1alpha (grpcio-reflection and several common
/// tools speak only v1alpha), advertising exactly the services `served`
/// (full names) plus health checking and reflection itself, with the
/// descriptors of every llmos and health message.
#[allow(clippy::type_complexity)]
pub fn reflection(
    served: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false);
        for name in served.iter().copied().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            b = b.with_service_name(name);
        }
        b
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// A worker label or a deployment's required label as the command lines
/// take it: `key=value` (the key not empty).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}
