//! NVRTC compilation with an on-disk PTX cache.
//!
//! A module's PTX is stored as `<module>-<arch>-<hash>.ptx`, the hash
//! covering the source, the compiler options and the NVRTC version: a
//! changed kernel, flag or compiler never reuses a stale file, and a second
//! start of a worker loads its kernels without compiling. Files are written
//! to a temporary name and renamed, so workers sharing the directory never
//! read half a file. Compilation needs only `libnvrtc` (the venv's
//! `nvidia/cu13/lib`), not a GPU.

use std::path::{Path, PathBuf};

use crate::cuda::Module;
use crate::{KernelError, Result};

/// Options every module is compiled with (besides the architecture).
const OPTIONS: &[&str] = &["--std=c++17", "--fmad=true"];

/// Whether `libnvrtc` can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(KernelError::Unavailable(
            "libnvrtc not found: put the venv's nvidia/cu13/lib on LD_LIBRARY_PATH".into(),
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; two valid out-pointers.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::Unavailable(format!(
            "nvrtcVersion failed: {status:?}"
        )));
    }
    Ok((major, minor))
}

/// The cache directory: `$LLMOS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/llmos/kernels`,
/// else `~/.cache/llmos/kernels`, else the system temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LLMOS_KERNEL_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("llmos").join("kernels")
}

/// `sm_90`, `compute_90` or `90` → `compute_90` (PTX for that virtual
/// architecture; the driver finishes it for the GPU at load).
pub fn normalize_arch(arch: &str) -> Result<String> {
    let digits = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .unwrap_or(arch);
    if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(KernelError::Invalid {
            op: "compile",
            arg: "arch",
            problem: format!("{arch:?} is not a GPU architecture (expected e.g. sm_90)"),
        });
    }
    Ok(format!("compute_{digits}"))
}

/// FNV-1a (the project's stable hash) over `parts`, each followed by a
/// 0xff separator.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = llmos_meta::hash::Fnv1a::new();
    for part in parts {
        h.write(part);
        h.write(&[0xff]);
    }
    h.finish()
}

/// A module's PTX and where it is cached.
#[derive(Debug)]
pub struct Compiled {
    pub ptx: String,
    pub path: PathBuf,
    /// Read from the cache rather than compiled now.
    pub cache_hit: bool,
}

/// Compiles one of llmos's modules for `arch` (through the cache in `dir`).
pub fn compile(module: Module, arch: &str, dir: &Path) -> Result<Compiled> {
    compile_source(module.name(), &module.source(), arch, dir)
}

/// Compiles `source` for `arch`, or reads its PTX from the cache in `dir`.
pub fn compile_source(
    name: &'static str,
    source: &str,
    arch: &str,
    dir: &Path,
) -> Result<Compiled> {
    let arch = normalize_arch(arch)?;
    let (major, minor) = nvrtc_version()?;
    let version = format!("nvrtc {major}.{minor}");
    let key = fnv1a(&[
        source.as_bytes(),
        OPTIONS.join(" ").as_bytes(),
        version.as_bytes(),
        arch.as_bytes(),
    ]);
    let path = dir.join(format!("{name}-{arch}-{key:016x}.ptx"));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        if ptx.contains(".entry") {
            return Ok(Compiled {
                ptx,
                path,
                cache_hit: true,
            });
        }
        tracing::warn!(path = %path.display(), "ignoring a damaged cached PTX file");
    }
    let started = std::time::Instant::now();
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions {
        options,
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| KernelError::Compile {
            module: name,
            arch: arch.clone(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().trim().to_string()
                }
                other => other.to_string(),
            },
        })?
        .to_src();
    tracing::info!(module = name, %arch, ms = started.elapsed().as_millis() as u64, "compiled kernels");
    let cache_err = |error| KernelError::Cache {
        path: path.clone(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(cache_err)?;
    let tmp = dir.join(format!(
        ".{name}-{key:016x}.{}.{:?}.tmp",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, &ptx).map_err(cache_err)?;
    std::fs::rename(&tmp, &path).map_err(cache_err)?;
    Ok(Compiled {
        ptx,
        path,
        cache_hit: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module compiles for two architectures without a GPU, exports
    /// its three dtype variants (or its one f32 sampler), and the second
    /// compilation is a cache hit with the same PTX.
    #[test]
    fn every_module_compiles_and_is_cached_by_architecture() {
        if !nvrtc_available() {
            panic!("libnvrtc is part of the setup (venv nvidia/cu13/lib): not found");
        }
        let dir = tempfile::tempdir().unwrap();
        for module in Module::ALL {
            let mut paths = Vec::new();
            for arch in ["sm_80", "sm_90"] {
                let first = compile(module, arch, dir.path()).unwrap();
                assert!(!first.cache_hit, "{module:?} {arch}: nothing cached yet");
                let names: Vec<String> = match module {
                    Module::Sampling => vec!["sample_f32".into()],
                    _ => {
                        let base = match module {
                            Module::RmsNorm => "fused_add_rms_norm",
                            Module::Rotary => "rotary",
                            Module::Activation => "silu_and_mul",
                            Module::PagedAttention => "paged_attention",
                            Module::Int8Linear => "int8_linear",
                            Module::Sampling => unreachable!(),
                        };
                        ["f32", "bf16", "f16"]
                            .iter()
                            .map(|s| format!("{base}_{s}"))
                            .collect()
                    }
                };
                for n in names {
                    assert!(
                        first.ptx.contains(&format!(".entry {n}(")),
                        "{module:?} {arch}: no entry {n}"
                    );
                }
                let target = format!(".target sm_{}", &arch[3..]);
                assert!(
                    first.ptx.contains(&target),
                    "{module:?}: PTX not for {arch}"
                );
                let second = compile(module, arch, dir.path()).unwrap();
                assert!(second.cache_hit, "{module:?} {arch}: recompiled");
                assert_eq!(second.ptx, first.ptx);
                assert_eq!(second.path, first.path);
                paths.push(first.path);
            }
            assert_ne!(paths[0], paths[1], "one cache file for two architectures");
        }
        // Changing the source changes the file: a stale PTX is never reused.
        let a = compile_source(
            "probe",
            "extern \"C\" __global__ void k() {}",
            "sm_90",
            dir.path(),
        )
        .unwrap();
        let b = compile_source(
            "probe",
            "extern \"C\" __global__ void k() { }",
            "sm_90",
            dir.path(),
        )
        .unwrap();
        assert!(!b.cache_hit);
        assert_ne!(a.path, b.path);
    }

    #[test]
    fn a_compile_error_carries_the_nvrtc_log() {
        if !nvrtc_available() {
            panic!("libnvrtc is part of the setup (venv nvidia/cu13/lib): not found");
        }
        let dir = tempfile::tempdir().unwrap();
        let err = compile_source(
            "broken",
            "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
            "sm_90",
            dir.path(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("broken") && msg.contains("compute_90"),
            "{msg}"
        );
        assert!(msg.contains("undefined_name"), "no NVRTC log in {msg}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "cached a failure"
        );
        let err = compile(Module::RmsNorm, "ampere", dir.path()).unwrap_err();
        assert!(err.to_string().contains("\"ampere\""), "{err}");
    }

    #[test]
    fn a_damaged_cache_file_is_recompiled() {
        if !nvrtc_available() {
            panic!("libnvrtc is part of the setup (venv nvidia/cu13/lib): not found");
        }
        let dir = tempfile::tempdir().unwrap();
        let first = compile(Module::Activation, "sm_90", dir.path()).unwrap();
        std::fs::write(&first.path, "truncated").unwrap();
        let again = compile(Module::Activation, "sm_90", dir.path()).unwrap();
        assert!(!again.cache_hit);
        assert_eq!(again.ptx, first.ptx);
        assert_eq!(std::fs::read_to_string(&first.path).unwrap(), first.ptx);
    }
}
