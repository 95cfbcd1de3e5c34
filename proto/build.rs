fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("llmos_descriptor.bin"))
        .compile_protos(
            &[
                "llmos/v1/inference.proto",
                "llmos/v1/admin.proto",
                "llmos/worker/v1/worker.proto",
                "llmos/coordinator/v1/peer.proto",
            ],
            &["."],
        )?;
    Ok(())
}
