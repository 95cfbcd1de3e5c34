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

/// Loads libtorch's CUDA backend (see [`llmos_kernels::load_torch_cuda`]).
pub fn load_torch_cuda() -> Result<()> {
    llmos_kernels::load_torch_cuda().map_err(|e| {
        WorkerError::DeviceUnavailable("cuda".into(), format!("cannot load libtorch_cuda.so: {e}"))
    })
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
    load_torch_cuda()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_backend_loads_and_a_missing_gpu_is_a_clear_error() {
        load_torch_cuda().unwrap();
        let n = tch::Cuda::device_count();
        match parse_device("cuda:0") {
            Ok(d) => assert!(n > 0 && d == Device::Cuda(0)),
            Err(e) => {
                assert_eq!(n, 0);
                assert!(e.to_string().contains("0 CUDA devices"), "{e}");
            }
        }
        assert!(parse_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("cpu, cuda, cuda:N"));
        assert!(parse_dtype("f8")
            .unwrap_err()
            .to_string()
            .contains("f32, bf16"));
    }
}
