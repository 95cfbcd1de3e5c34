//! Device and dtype selection.

use tch::{Device, Kind};

use crate::error::{Result, WorkerError};

/// Parses `f32` / `bf16` / `f16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => Err(WorkerError::InvalidRequest(format!(
            "unknown dtype {s:?} (supported: f32, bf16, f16)"
        ))),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`, checking the GPU is there.
pub fn parse_device(s: &str) -> Result<Device> {
    let idx = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                WorkerError::InvalidRequest(format!("unknown device {s:?} (cpu, cuda, cuda:N)"))
            })?,
    };
    let n = tch::Cuda::device_count() as usize;
    if idx >= n {
        return Err(WorkerError::DeviceUnavailable(
            s.into(),
            format!("libtorch sees {n} CUDA devices"),
        ));
    }
    Ok(Device::Cuda(idx))
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
