//! The NCCL backend, through cudarc with the library loaded at run time
//! (the binary builds and runs where there is no CUDA; `nccl_available`
//! says whether this machine can form a group). The group's unique id is
//! drawn by rank 0 and handed to the others over the group's TCP links
//! (the coordinator links no CUDA library, so it cannot draw one).
//!
//! Tensors must be contiguous CUDA tensors of the process's current device;
//! operations are enqueued on libtorch's default (legacy) stream and waited
//! for with a deadline: past it the communicator is aborted and the group
//! is broken, so a dead rank ends requests instead of hanging a kernel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::{result, sys};
use tch::{Kind, Tensor};

use super::{check_rank, no_peer, Collective, TcpGroup};
use super::{CommError, Result};

/// Whether both the CUDA driver and NCCL can be loaded (cudarc panics on
/// first use of a library that is absent, so ask before).
pub fn nccl_available() -> bool {
    // SAFETY: these only try to open the shared libraries.
    unsafe { cu::is_culib_present() && sys::is_culib_present() }
}

struct Comm(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread; the group
// serialises its use with `op`.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

pub struct NcclGroup {
    comm: Comm,
    rank: usize,
    world: usize,
    op_timeout: Duration,
    op: Mutex<()>,
    broken: Mutex<Option<String>>,
    sent: AtomicU64,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Failed(format!("nccl {what}: {e:?}"))
}

/// An enqueue call's status as this crate's error.
fn enqueued(
    what: &str,
    r: std::result::Result<result::NcclStatus, result::NcclError>,
) -> Result<()> {
    r.map(drop).map_err(|e| nccl_err(what, e))
}

impl NcclGroup {
    /// Forms the communicator of `tcp`'s ranks (each process on its own
    /// current CUDA device).
    pub fn form(tcp: &TcpGroup, op_timeout: Duration) -> Result<Self> {
        if !nccl_available() {
            return Err(CommError::DeviceUnavailable(
                "nccl".into(),
                "libcuda.so or libnccl.so cannot be loaded (the pip NCCL ships libnccl.so.2: \
                 link it as libnccl.so on the library path)"
                    .into(),
            ));
        }
        let (rank, world) = (tcp.rank(), tcp.world_size());
        let mut id = if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| nccl_err("unique id", e))?;
            id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            vec![0u8; 128]
        };
        id = tcp.broadcast_bytes(&id, 0)?;
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != 128 {
            return Err(CommError::Failed(format!(
                "nccl unique id of {} bytes from rank 0",
                id.len()
            )));
        }
        for (d, s) in uid.internal.iter_mut().zip(&id) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; every rank passes the same
        // id and world size.
        unsafe { result::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }
            .map_err(|e| nccl_err("init", e))?;
        Ok(NcclGroup {
            comm: Comm(comm),
            rank,
            world,
            op_timeout,
            op: Mutex::new(()),
            broken: Mutex::new(None),
            sent: AtomicU64::new(0),
        })
    }

    fn dtype(t: &Tensor) -> Result<sys::ncclDataType_t> {
        if !t.device().is_cuda() || !t.is_contiguous() {
            return Err(CommError::Invalid(format!(
                "nccl needs a contiguous CUDA tensor, got {:?} on {:?}",
                t.size(),
                t.device()
            )));
        }
        Ok(match t.kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            Kind::Half => sys::ncclDataType_t::ncclFloat16,
            Kind::Int64 => sys::ncclDataType_t::ncclInt64,
            k => {
                return Err(CommError::Invalid(format!(
                    "nccl collectives on {k:?} tensors are not supported"
                )))
            }
        })
    }

    /// Runs `enqueue` under the lock and waits for the default stream with
    /// the group's deadline.
    fn run(&self, bytes: usize, enqueue: impl FnOnce() -> Result<()>) -> Result<()> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(CommError::Failed(format!("nccl group is broken: {why}")));
        }
        enqueue()?;
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        let deadline = Instant::now() + self.op_timeout;
        loop {
            // SAFETY: the null stream is the legacy default stream libtorch
            // enqueues on; the thread has libtorch's context current.
            match unsafe { cu::cuStreamQuery(std::ptr::null_mut()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.abort(format!("the stream failed: {e:?}"))),
            }
            if Instant::now() >= deadline {
                return Err(self.abort(format!(
                    "a collective did not complete within {:?} (a rank is gone?)",
                    self.op_timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn abort(&self, why: String) -> CommError {
        // SAFETY: aborting a live communicator ends its pending kernels.
        unsafe {
            let _ = result::comm_abort(self.comm.0);
        }
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        b.get_or_insert_with(|| why.clone());
        CommError::Failed(format!("nccl: {why}"))
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if self.broken.lock().map(|b| b.is_none()).unwrap_or(false) {
            // SAFETY: the communicator is not used after drop.
            unsafe {
                let _ = result::comm_destroy(self.comm.0);
            }
        }
    }
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let dt = Self::dtype(t)?;
        let ptr = t.data_ptr();
        self.run(bytes_of(t), || {
            // SAFETY: in place on a contiguous device tensor of numel elements.
            enqueued("all_reduce", unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    t.numel(),
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    std::ptr::null_mut(),
                )
            })
        })
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let dt = Self::dtype(t)?;
        let mut size = t.size();
        size[0] *= self.world as i64;
        let out = Tensor::empty(size.as_slice(), (t.kind(), t.device()));
        self.run(bytes_of(t), || {
            // SAFETY: `out` holds world x numel elements, contiguous.
            enqueued("all_gather", unsafe {
                result::all_gather(
                    t.data_ptr(),
                    out.data_ptr(),
                    t.numel(),
                    dt,
                    self.comm.0,
                    std::ptr::null_mut(),
                )
            })
        })?;
        Ok(out)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        check_rank(root, self.world)?;
        let dt = Self::dtype(t)?;
        let ptr = t.data_ptr();
        self.run(bytes_of(t), || {
            // SAFETY: in place on a contiguous device tensor.
            enqueued("broadcast", unsafe {
                result::broadcast(
                    ptr,
                    ptr,
                    t.numel(),
                    dt,
                    root as i32,
                    self.comm.0,
                    std::ptr::null_mut(),
                )
            })
        })
    }

    fn send(&self, t: &Tensor, peer: usize) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(no_peer(peer, self.rank));
        }
        let dt = Self::dtype(t)?;
        self.run(bytes_of(t), || {
            // SAFETY: a contiguous device tensor of numel elements.
            enqueued("send", unsafe {
                result::send(
                    t.data_ptr(),
                    t.numel(),
                    dt,
                    peer as i32,
                    self.comm.0,
                    std::ptr::null_mut(),
                )
            })
        })
    }

    fn recv(&self, t: &mut Tensor, peer: usize) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(no_peer(peer, self.rank));
        }
        let dt = Self::dtype(t)?;
        let ptr = t.data_ptr();
        self.run(0, || {
            // SAFETY: a contiguous device tensor of numel elements.
            enqueued("recv", unsafe {
                result::recv(
                    ptr,
                    t.numel(),
                    dt,
                    peer as i32,
                    self.comm.0,
                    std::ptr::null_mut(),
                )
            })
        })
    }

    fn barrier(&self) -> Result<()> {
        let mut one = Tensor::ones([1], (Kind::Float, tch::Device::Cuda(0)));
        self.all_reduce_sum(&mut one)
    }

    fn all_reduce_host(&self, _buf: &mut [f32]) -> Result<()> {
        Err(CommError::Invalid(
            "the nccl group reduces device tensors, not host buffers".into(),
        ))
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn is_broken(&self) -> bool {
        self.broken.lock().map(|b| b.is_some()).unwrap_or(true)
    }
}
