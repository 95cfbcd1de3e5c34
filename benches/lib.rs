//! End-to-end benchmarks (see `pipeline.rs`; the single-process comparison
//! with peers is `single_process.sh`).
