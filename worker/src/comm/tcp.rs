//! The TCP backend: a full mesh of links between the ranks of a group.
//!
//! `Rendezvous` is the worker's collective listener (bound at start-up, its
//! address registered with the coordinator). A group forms when each rank
//! dials every lower rank and waits for every higher one to dial it; a
//! handshake names the group, the dialling rank and the dialled one, so one
//! listener serves any number of groups. Frames are `tag u8 | len u64 |
//! payload`; each link has a writer thread (sends never block the caller,
//! so two ranks sending large buffers to each other cannot deadlock) and is
//! read by the caller under a read deadline.
//!
//! With the worker's TLS material, every link is mutual TLS: the dialler
//! expects a worker's certificate of the cluster's CA, the listener
//! refuses any other (a coordinator's included), and the handshake naming
//! the group travels inside it.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::stream::{LinkReader, Stream};
use super::{check_rank, no_peer, Collective};
use super::{CommError, Result};

const MAGIC: &[u8; 8] = b"LLMOSCL1";
/// Frames of data (collectives) and of control (the leader's steps).
const DATA: u8 = 1;
const CONTROL: u8 = 2;
/// All-reduces up to this many bytes exchange whole buffers in one round
/// (latency-bound decode steps); larger ones run a ring.
const DIRECT_BYTES: usize = 64 << 10;

type Key = (String, usize);

#[derive(Default)]
struct Pending {
    /// (group, dialled rank) -> dialling rank -> its stream.
    links: Mutex<HashMap<Key, HashMap<usize, Stream>>>,
    arrived: Condvar,
}

/// The worker's collective listener: accepts links for any group.
pub struct Rendezvous {
    addr: SocketAddr,
    pending: Arc<Pending>,
    tls: Option<Arc<llmos_tls::Tls>>,
}

impl Rendezvous {
    /// Binds `addr` (port 0: any free port) and accepts plaintext links in
    /// the background for the life of the process.
    pub fn bind(addr: &str) -> std::io::Result<Self> {
        Self::bind_with(addr, None)
    }

    /// [`Rendezvous::bind`]; with `tls`, links in and out are mutual TLS
    /// between worker certificates.
    pub fn bind_with(addr: &str, tls: Option<Arc<llmos_tls::Tls>>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let pending = Arc::new(Pending::default());
        let p = pending.clone();
        let t = tls.clone();
        std::thread::Builder::new()
            .name("llmos-collective-accept".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let p = p.clone();
                    let t = t.clone();
                    // A slow or bogus dialler must not hold up the others.
                    std::thread::spawn(move || {
                        let peer = conn.peer_addr().ok();
                        if let Err(e) = accept(conn, &p, t.as_deref()) {
                            tracing::warn!(?peer, error = %e, "refused a collective link");
                        }
                    });
                }
            })?;
        Ok(Rendezvous { addr, pending, tls })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forms `group` as `rank` of `peers.len()` ranks (`peers[i]` is rank
    /// i's rendezvous address), waiting up to `timeout` for the others.
    /// Operations of the formed group fail after `op_timeout` without an
    /// answer.
    pub fn form(
        &self,
        group: &str,
        rank: usize,
        peers: &[String],
        timeout: Duration,
        op_timeout: Duration,
    ) -> Result<TcpGroup> {
        let world = peers.len();
        check_rank(rank, world)?;
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<Stream>> = (0..world).map(|_| None).collect();
        for (j, addr) in peers.iter().enumerate().take(rank) {
            links[j] = Some(dial(
                group,
                rank,
                j,
                world,
                addr,
                deadline,
                self.tls.as_deref(),
            )?);
        }
        let key = (group.to_string(), rank);
        let mut map = self.pending.links.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let have = map.get(&key).map_or(0, |m| m.len());
            if have >= world - rank - 1 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (rank + 1..world)
                    .filter(|r| !map.get(&key).is_some_and(|m| m.contains_key(r)))
                    .collect();
                map.remove(&key);
                return Err(CommError::Failed(format!(
                    "group {group}: ranks {missing:?} did not connect to rank {rank} within {timeout:?}"
                )));
            }
            map = self
                .pending
                .arrived
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        for (from, s) in map.remove(&key).unwrap_or_default() {
            links[from] = Some(s);
        }
        drop(map);
        let g = TcpGroup::new(group, rank, links, op_timeout)?;
        // Every link answers before the group is used.
        g.barrier()?;
        Ok(g)
    }
}

fn accept(s: TcpStream, p: &Pending, tls: Option<&llmos_tls::Tls>) -> std::io::Result<()> {
    let mut s = match tls {
        None => Stream::Plain(s),
        Some(tls) => {
            let (r, w, who) = llmos_tls::blocking::accept(tls, s)?;
            if who.role != llmos_tls::Role::Worker {
                return Err(std::io::Error::other(format!(
                    "collective links are between workers; {who} dialled"
                )));
            }
            Stream::Tls(r, w)
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(std::io::Error::other("not an llmos collective link"));
    }
    let group = String::from_utf8_lossy(&read_bytes(&mut s, 4096)?).into_owned();
    let mut nums = [0u8; 12];
    s.read_exact(&mut nums)?;
    let num = |i: usize| u32::from_le_bytes(nums[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
    let (from, to) = (num(0), num(1));
    s.set_read_timeout(None)?;
    let mut map = p.links.lock().unwrap_or_else(|e| e.into_inner());
    // A newer link from the same rank replaces one of an earlier attempt.
    map.entry((group, to)).or_default().insert(from, s);
    p.arrived.notify_all();
    Ok(())
}

fn read_bytes(s: &mut Stream, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_le_bytes(len) as usize;
    if n > limit {
        return Err(std::io::Error::other(format!("{n} bytes (limit {limit})")));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn dial(
    group: &str,
    from: usize,
    to: usize,
    world: usize,
    addr: &str,
    deadline: Instant,
    tls: Option<&llmos_tls::Tls>,
) -> Result<Stream> {
    let mut last = String::new();
    while Instant::now() < deadline {
        let target = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                CommError::Failed(format!(
                    "group {group}: rank {to}'s address {addr:?} does not resolve"
                ))
            })?;
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(s) => {
                let mut s = match tls {
                    None => Stream::Plain(s),
                    Some(tls) => {
                        // A TLS failure is not a slow peer: no retry.
                        let (r, w, _) =
                            llmos_tls::blocking::connect(tls, s, llmos_tls::Role::Worker).map_err(
                                |e| {
                                    CommError::Failed(format!(
                                        "group {group}: rank {to} at {addr}: TLS: {e}"
                                    ))
                                },
                            )?;
                        Stream::Tls(r, w)
                    }
                };
                let mut hello = MAGIC.to_vec();
                hello.extend((group.len() as u32).to_le_bytes());
                hello.extend(group.as_bytes());
                for n in [from, to, world] {
                    hello.extend((n as u32).to_le_bytes());
                }
                s.write_all(&hello).map_err(|e| {
                    CommError::Failed(format!("group {group}: rank {to} at {addr}: {e}"))
                })?;
                return Ok(s);
            }
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Err(CommError::Failed(format!(
        "group {group}: rank {from} could not reach rank {to} at {addr}: {last}"
    )))
}

struct Link {
    reader: LinkReader,
    /// The socket, to end reads from another thread (close).
    socket: TcpStream,
    /// Taken on close: the writer thread sends what is queued, then ends
    /// the stream.
    writer: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    flushed: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A formed group over TCP.
pub struct TcpGroup {
    group: String,
    rank: usize,
    world: usize,
    op_timeout: Duration,
    links: Vec<Option<Link>>,
    /// Collectives run one at a time, in the order every rank calls them.
    op: Mutex<()>,
    /// Set by the first failure: the links' framing is unknown afterwards.
    broken: Mutex<Option<String>>,
    closed: AtomicBool,
    sent: Arc<AtomicU64>,
}

impl TcpGroup {
    fn new(
        group: &str,
        rank: usize,
        streams: Vec<Option<Stream>>,
        op_timeout: Duration,
    ) -> Result<Self> {
        let sent = Arc::new(AtomicU64::new(0));
        let io = |e: std::io::Error| CommError::Failed(format!("group {group}: {e}"));
        let mut links = Vec::with_capacity(streams.len());
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                links.push(None);
                continue;
            };
            let (reader, mut w, socket) = s.split().map_err(io)?;
            socket.set_nodelay(true).map_err(io)?;
            // A peer that stops reading cannot block the writer for ever.
            w.set_write_timeout(Some(op_timeout)).map_err(io)?;
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            let flushed = std::thread::Builder::new()
                .name(format!("llmos-collective-send-{peer}"))
                .spawn(move || {
                    // Ends when the group closes (after sending what is
                    // queued) or the peer goes; the reader side reports the
                    // failure.
                    while let Ok(frame) = rx.recv() {
                        if w.write_all(&frame).is_err() {
                            break;
                        }
                    }
                    w.shutdown();
                })
                .map_err(io)?;
            links.push(Some(Link {
                reader,
                socket,
                writer: Mutex::new(Some(tx)),
                flushed: Mutex::new(Some(flushed)),
            }));
        }
        Ok(TcpGroup {
            group: group.to_string(),
            rank,
            world: links.len(),
            op_timeout,
            links,
            op: Mutex::new(()),
            broken: Mutex::new(None),
            closed: AtomicBool::new(false),
            sent,
        })
    }

    /// Fails at once if an earlier operation broke the group.
    fn healthy(&self) -> Result<()> {
        if let Some(why) = self
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(CommError::Failed(format!(
                "group {} is broken: {why}",
                self.group
            )));
        }
        Ok(())
    }

    fn fail(&self, why: String) -> CommError {
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        b.get_or_insert_with(|| why.clone());
        CommError::Failed(format!("group {}: {why}", self.group))
    }

    fn link(&self, peer: usize) -> Result<&Link> {
        self.links
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| no_peer(peer, self.rank))
    }

    fn send_frame(&self, peer: usize, tag: u8, payload: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.push(tag);
        frame.extend((payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(payload);
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        let link = self.link(peer)?;
        let w = link.writer.lock().unwrap_or_else(|e| e.into_inner());
        match w.as_ref().map(|w| w.send(frame)) {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(self.fail(format!("rank {peer}'s link is closed"))),
            None => Err(self.fail("the group was closed".into())),
        }
    }

    /// Reads one frame from `peer`; `deadline` None waits for ever (a
    /// follower waiting for its next step).
    fn recv_frame(&self, peer: usize, tag: u8, deadline: Option<Instant>) -> Result<Vec<u8>> {
        self.recv_frame_from(peer, tag, deadline, false)
    }

    /// `recv_frame`; with `idle_ok`, a deadline that passes before the
    /// frame's first byte arrived fails this call only (nothing of the
    /// stream was consumed, so the framing is intact).
    fn recv_frame_from(
        &self,
        peer: usize,
        tag: u8,
        deadline: Option<Instant>,
        idle_ok: bool,
    ) -> Result<Vec<u8>> {
        let link = self.link(peer)?;
        let r = &link.reader;
        if idle_ok {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let waited = match left {
                Some(Duration::ZERO) => Err(std::io::ErrorKind::TimedOut.into()),
                _ => r.set_read_timeout(left).and_then(|()| r.wait_readable()),
            };
            if let Err(e) = &waited {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && !self.closed.load(Ordering::Relaxed)
                {
                    return Err(CommError::PeerStepFailed(format!(
                        "group {}: rank {peer} sent nothing to rank {} within {:?}",
                        self.group, self.rank, self.op_timeout
                    )));
                }
            }
            // Data, end of stream or another error: the reads below tell.
        }
        let read = |r: &LinkReader, buf: &mut [u8]| -> std::io::Result<()> {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            r.set_read_timeout(left)?;
            r.read_exact(buf)
        };
        let explain = |e: std::io::Error| {
            if self.closed.load(Ordering::Relaxed) {
                return self.fail("the group was closed".into());
            }
            self.fail(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "rank {peer} did not answer rank {} within {:?}",
                    self.rank, self.op_timeout
                ),
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => {
                    format!("rank {peer} closed its link (its process ended?)")
                }
                _ => format!("link to rank {peer}: {e}"),
            })
        };
        let mut head = [0u8; 9];
        read(r, &mut head).map_err(explain)?;
        let len = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
        if head[0] != tag {
            return Err(self.fail(format!(
                "rank {peer} sent a frame of kind {} where kind {tag} was due (ranks out of step)",
                head[0]
            )));
        }
        let mut payload = vec![0u8; len];
        read(r, &mut payload).map_err(explain)?;
        Ok(payload)
    }

    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.op_timeout)
    }

    /// Runs one collective under the group's lock, failing fast when the
    /// group is already broken.
    fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        self.healthy()?;
        f()
    }

    fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.world).filter(move |&r| r != self.rank)
    }

    /// Sends `payload` to every other rank and returns every rank's payload
    /// (this one's included) in rank order.
    fn exchange(&self, payload: &[u8]) -> Result<Vec<Vec<u8>>> {
        for p in self.peers() {
            self.send_frame(p, DATA, payload)?;
        }
        let deadline = self.deadline();
        let mut all = Vec::with_capacity(self.world);
        for r in 0..self.world {
            all.push(if r == self.rank {
                payload.to_vec()
            } else {
                let got = self.recv_frame(r, DATA, deadline)?;
                if got.len() != payload.len() {
                    return Err(self.fail(format!(
                        "rank {r} sent {} bytes where this rank has {} (shapes differ)",
                        got.len(),
                        payload.len()
                    )));
                }
                got
            });
        }
        Ok(all)
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        if buf.len() * 4 <= DIRECT_BYTES || buf.len() < self.world {
            // One round: every rank sums the same buffers in rank order.
            let all = self.exchange(as_bytes(buf))?;
            buf.fill(0.0);
            for b in &all {
                for (x, c) in buf.iter_mut().zip(b.chunks_exact(4)) {
                    *x += f32::from_le_bytes(c.try_into().unwrap());
                }
            }
            return Ok(());
        }
        // Ring: reduce-scatter, then all-gather of the reduced chunks; each
        // chunk's sum is computed once, so every rank ends bitwise equal.
        let w = self.world;
        let n = buf.len();
        let bounds = |c: usize| (c * n / w, (c + 1) * n / w);
        let (right, left) = ((self.rank + 1) % w, (self.rank + w - 1) % w);
        for s in 0..w - 1 {
            let (a, b) = bounds((self.rank + w - s) % w);
            self.send_frame(right, DATA, as_bytes(&buf[a..b]))?;
            let (a, b) = bounds((self.rank + 2 * w - s - 1) % w);
            let got = self.recv_frame(left, DATA, self.deadline())?;
            if got.len() != (b - a) * 4 {
                return Err(self.fail(format!("rank {left} sent a chunk of another size")));
            }
            for (x, c) in buf[a..b].iter_mut().zip(got.chunks_exact(4)) {
                *x += f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        for s in 0..w - 1 {
            let (a, b) = bounds((self.rank + 1 + w - s) % w);
            self.send_frame(right, DATA, as_bytes(&buf[a..b]))?;
            let (a, b) = bounds((self.rank + w - s) % w);
            let got = self.recv_frame(left, DATA, self.deadline())?;
            if got.len() != (b - a) * 4 {
                return Err(self.fail(format!("rank {left} sent a chunk of another size")));
            }
            for (x, c) in buf[a..b].iter_mut().zip(got.chunks_exact(4)) {
                *x = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        Ok(())
    }

    /// Leader: sends a control message (a step) to every other rank.
    pub fn send_control(&self, msg: &[u8]) -> Result<()> {
        self.run(|| {
            for p in self.peers() {
                self.send_frame(p, CONTROL, msg)?;
            }
            Ok(())
        })
    }

    /// Follower: waits (without deadline) for the leader's next control
    /// message; fails when the leader goes or the group is closed.
    pub fn recv_control(&self) -> Result<Vec<u8>> {
        self.healthy()?;
        self.recv_frame(0, CONTROL, None)
    }

    /// Root's bytes to every rank (small set-up messages, e.g. NCCL's id).
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        check_rank(root, self.world)?;
        self.run(|| {
            if self.rank == root {
                for p in self.peers() {
                    self.send_frame(p, DATA, bytes)?;
                }
                Ok(bytes.to_vec())
            } else {
                self.recv_frame(root, DATA, self.deadline())
            }
        })
    }

    /// Closes every link: what was sent is still delivered, then the peers'
    /// reads end; blocked operations here fail.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        for l in self.links.iter().flatten() {
            drop(l.writer.lock().unwrap_or_else(|e| e.into_inner()).take());
            let _ = l.socket.shutdown(Shutdown::Read);
        }
    }

    /// How long an operation waits for a peer.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    pub fn is_broken(&self) -> bool {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// `recv`, except that a deadline passing before `peer` began sending
    /// fails this call only and leaves the group intact: a pipeline link
    /// waits for a step's header this way, since a previous stage that is
    /// merely slow has not broken the link (its late frames are read, and
    /// drained by step id, later).
    pub fn recv_when_sent(&self, t: &mut Tensor, peer: usize) -> Result<()> {
        self.recv_tensor(t, peer, true)
    }

    fn recv_tensor(&self, t: &mut Tensor, peer: usize, idle_ok: bool) -> Result<()> {
        let got = self.run(|| self.recv_frame_from(peer, DATA, self.deadline(), idle_ok))?;
        let want = t.numel() * t.kind().elt_size_in_bytes();
        if got.len() != want {
            return Err(self.fail(format!(
                "rank {peer} sent {} bytes for a tensor of {want}",
                got.len()
            )));
        }
        t.copy_(&from_bytes(&got, t)?);
        Ok(())
    }
}

impl Drop for TcpGroup {
    fn drop(&mut self) {
        self.close();
        // Bounded by the writers' write timeout.
        for l in self.links.iter().flatten() {
            if let Some(h) = l.flushed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = h.join();
            }
        }
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no invalid bit patterns or padding; the byte view
    // covers exactly the slice (hosts are little-endian, as the frames).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let c = t.to_device(Device::Cpu).contiguous();
    let mut b = vec![0u8; c.numel() * c.kind().elt_size_in_bytes()];
    c.f_copy_data_u8(&mut b, c.numel())
        .expect("a contiguous CPU tensor copies out");
    b
}

fn from_bytes(bytes: &[u8], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_from_data_size(bytes, &like.size(), like.kind())?.to_device(like.device()))
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let mut v = Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]))?;
        self.all_reduce_host(&mut v)?;
        let r = Tensor::from_slice(&v)
            .view(t.size().as_slice())
            .to_kind(t.kind())
            .to_device(t.device());
        t.copy_(&r);
        Ok(())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mine = tensor_bytes(t);
        let all = self.run(|| self.exchange(&mine))?;
        let parts = all
            .iter()
            .map(|b| from_bytes(b, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0))
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let mine = tensor_bytes(t);
        let got = self.broadcast_bytes(&mine, root)?;
        if got.len() != mine.len() {
            return Err(self.fail(format!("rank {root} broadcast a tensor of another size")));
        }
        if self.rank != root {
            t.copy_(&from_bytes(&got, t)?);
        }
        Ok(())
    }

    fn send(&self, t: &Tensor, peer: usize) -> Result<()> {
        let b = tensor_bytes(t);
        self.run(|| self.send_frame(peer, DATA, &b))
    }

    fn recv(&self, t: &mut Tensor, peer: usize) -> Result<()> {
        self.recv_tensor(t, peer, false)
    }

    fn barrier(&self) -> Result<()> {
        self.run(|| self.exchange(&[1]).map(drop))
    }

    fn all_reduce_host(&self, buf: &mut [f32]) -> Result<()> {
        self.run(|| self.all_reduce_f32(buf))
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn is_broken(&self) -> bool {
        TcpGroup::is_broken(self)
    }
}
