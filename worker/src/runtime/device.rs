//! Device and dtype selection.

use tch::{Device, Kind};

use super::error::{Result, RuntimeError};

/// Parses `f32` / `bf16` / `f16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => Err(RuntimeError::Invalid(format!(
            "unknown dtype {s:?} (supported: f32, bf16, f16)"
        ))),
    }
}

/// Loads libtorch's CUDA backend (see [`llmos_kernels::load_torch_cuda`]).
pub fn load_torch_cuda() -> Result<()> {
    llmos_kernels::load_torch_cuda().map_err(|e| {
        RuntimeError::DeviceUnavailable("cuda".into(), format!("cannot load libtorch_cuda.so: {e}"))
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
                RuntimeError::Invalid(format!("unknown device {s:?} (cpu, cuda, cuda:N)"))
            })?,
    };
    load_torch_cuda()?;
    let n = tch::Cuda::device_count() as usize;
    if idx >= n {
        return Err(RuntimeError::DeviceUnavailable(
            s.into(),
            format!("libtorch sees {n} CUDA devices"),
        ));
    }
    Ok(Device::Cuda(idx))
}

/// Memory a worker offers for shards on `device`, `(total, available)`
/// bytes: the host's (`MemTotal`, `MemAvailable`) for the CPU, the GPU's
/// (total, free) as the CUDA driver reports them for a GPU. Zeros where it
/// cannot be read (logged), which placement treats as unknown.
pub fn memory(device: Device) -> (u64, u64) {
    match device {
        Device::Cuda(i) => llmos_kernels::device_memory(i).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the GPU's memory");
            (0, 0)
        }),
        _ => host_memory(),
    }
}

/// `memory` for a device named as a worker registers it (`cpu`, `cuda`,
/// `cuda:N`).
pub fn memory_of(name: &str) -> (u64, u64) {
    let device = match name.strip_prefix("cuda") {
        Some("") => Device::Cuda(0),
        Some(n) => Device::Cuda(n.trim_start_matches(':').parse().unwrap_or(0)),
        None => Device::Cpu,
    };
    memory(device)
}

/// (MemTotal, MemAvailable) in bytes from /proc/meminfo.
pub fn host_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (get("MemTotal:"), get("MemAvailable:"))
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
        let (total, free) = memory(Device::Cpu);
        assert!(total > 0 && free > 0 && free <= total, "{total} {free}");
        assert_eq!(memory_of("cpu").0, total);
        if n == 0 {
            // No GPU: the CUDA figures are unknown, not the host's.
            assert_eq!(memory(Device::Cuda(0)), (0, 0));
        } else {
            let (t, f) = memory(Device::Cuda(0));
            assert!(t > 0 && f <= t && t != total, "GPU memory {t} {f}");
        }
        assert!(parse_dtype("f8")
            .unwrap_err()
            .to_string()
            .contains("f32, bf16"));
    }
}
