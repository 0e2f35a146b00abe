//! A bad network for tests: two network namespaces joined by a veth pair
//! ([`NetPair`]: rate limited with `tbf`, cut with `ip link set ... down`) and a
//! fault-injecting TCP proxy ([`FaultProxy`]: delay with jitter, a stall, a reset
//! after N bytes, a flipped byte at offset K). The kernel here has no `netem`, so
//! delay, stalls, resets and corruption live in the proxy.
//!
//! Namespaces need root and `ip` (iproute2). [`NetPair::create_or_skip`] prints
//! `SKIP <test>: <reason>` where they cannot be made, except under `CI=true`
//! with `ip` present, where that is a failure.

use crate::rng::SplitMix64;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Address of side A on the veth link.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// Address of side B on the veth link.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

/// Where `ip` is, if anywhere.
pub fn ip_binary() -> Option<&'static str> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].into_iter().find(|p| Path::new(p).exists())
}

fn run(args: &[&str]) -> io::Result<()> {
    let ip = ip_binary().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "ip (iproute2) not found"))?;
    let prog = if args.first() == Some(&"tc") { ip.replace("/ip", "/tc") } else { ip.to_string() };
    let args = if args.first() == Some(&"tc") { &args[1..] } else { args };
    let out: Output = Command::new(&prog).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{prog} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// A named network namespace (a handle: cheap to clone, does not delete it).
#[derive(Debug, Clone)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Its name (`ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `f` on a thread that entered this namespace: sockets it creates
    /// (listeners, connections) belong to the namespace, wherever they are used later.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let ns = File::open(&path)?;
        std::thread::spawn(move || -> io::Result<T> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread in the namespace panicked"))?
    }

    /// `program` to be run inside this namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(ip_binary().unwrap_or("ip"));
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

/// Two network namespaces, A and B, joined by a veth pair ([`ADDR_A`] and
/// [`ADDR_B`], /24); deleted (with the link) on drop.
#[derive(Debug)]
pub struct NetPair {
    a: NetNs,
    b: NetNs,
    veth_a: String,
    veth_b: String,
}

static PAIRS: AtomicU64 = AtomicU64::new(0);

impl NetPair {
    /// Create the pair (root, `ip` needed).
    pub fn create() -> io::Result<NetPair> {
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 1_000_000);
        let pair = NetPair {
            a: NetNs { name: format!("qmig-{tag}-a") },
            b: NetNs { name: format!("qmig-{tag}-b") },
            veth_a: format!("qv{tag}a"),
            veth_b: format!("qv{tag}b"),
        };
        // Dropped on any failure below: deletes whatever was made.
        run(&["netns", "add", &pair.a.name])?;
        run(&["netns", "add", &pair.b.name])?;
        run(&[
            "link",
            "add",
            &pair.veth_a,
            "netns",
            &pair.a.name,
            "type",
            "veth",
            "peer",
            "name",
            &pair.veth_b,
            "netns",
            &pair.b.name,
        ])?;
        for (ns, dev, addr) in [(&pair.a, &pair.veth_a, ADDR_A), (&pair.b, &pair.veth_b, ADDR_B)] {
            run(&["-n", &ns.name, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            run(&["-n", &ns.name, "link", "set", dev, "up"])?;
            run(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// [`create`](Self::create), or `None` after printing `SKIP <test>: <reason>`
    /// where namespaces cannot be made; under `CI=true` with `ip` present that
    /// panics instead.
    pub fn create_or_skip(test: &str) -> Option<NetPair> {
        match NetPair::create() {
            Ok(p) => Some(p),
            Err(e) => {
                if std::env::var("CI").as_deref() == Ok("true") && ip_binary().is_some() {
                    panic!("{test}: cannot create network namespaces under CI=true: {e}");
                }
                println!("SKIP {test}: cannot create network namespaces: {e}");
                None
            }
        }
    }

    /// Namespace A.
    pub fn a(&self) -> &NetNs {
        &self.a
    }

    /// Namespace B.
    pub fn b(&self) -> &NetNs {
        &self.b
    }

    /// Shape both directions of the link to `bits_per_s` with a `tbf` qdisc
    /// (burst 64 KiB, 100 ms of queue).
    pub fn shape(&self, bits_per_s: u64) -> io::Result<()> {
        for (ns, dev) in [(&self.a, &self.veth_a), (&self.b, &self.veth_b)] {
            let rate = format!("{bits_per_s}bit");
            run(&[
                "tc", "-n", &ns.name, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "64kb",
                "latency", "100ms",
            ])?;
        }
        Ok(())
    }

    /// Cut the cable: both ends of the veth link down (packets are dropped, no
    /// reset is sent to either end).
    pub fn link_down(&self) -> io::Result<()> {
        run(&["-n", &self.a.name, "link", "set", &self.veth_a, "down"])?;
        run(&["-n", &self.b.name, "link", "set", &self.veth_b, "down"])
    }

    /// Plug it back in.
    pub fn link_up(&self) -> io::Result<()> {
        run(&["-n", &self.a.name, "link", "set", &self.veth_a, "up"])?;
        run(&["-n", &self.b.name, "link", "set", &self.veth_b, "up"])
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and the peer with it.
        let _ = run(&["netns", "del", &self.a.name]);
        let _ = run(&["netns", "del", &self.b.name]);
    }
}

/// What the proxy does to the bytes going from the client to the server (the
/// migration stream). The other direction (a return path) gets the delay only.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Each chunk is delivered this long after it was read (one-way latency;
    /// chunks keep their order and do not slow each other down).
    pub delay: Duration,
    /// Up to this much more, at random per chunk (never reordering).
    pub jitter: Duration,
    /// After this many bytes, forward nothing for this long (once).
    pub stall: Option<(u64, Duration)>,
    /// After this many bytes, reset both connections (TCP RST to both ends).
    pub reset_after: Option<u64>,
    /// XOR the byte at this stream offset with the mask.
    pub flip: Option<(u64, u8)>,
    /// Seed of the jitter.
    pub seed: u64,
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Bytes forwarded client -> server.
    pub forwarded: AtomicU64,
    /// Bytes forwarded server -> client.
    pub returned: AtomicU64,
    /// Set when the reset was done.
    pub reset: AtomicBool,
    /// Set when the byte was flipped.
    pub flipped: AtomicBool,
}

/// A TCP proxy that injects [`Faults`] into every connection it accepts, each
/// forwarded to a new connection made by its `connect` function. Stopped on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type Connect = dyn Fn() -> io::Result<TcpStream> + Send + Sync;

impl FaultProxy {
    /// Proxy on 127.0.0.1 (a free port) to `target`.
    pub fn start(target: SocketAddr, faults: Faults) -> io::Result<FaultProxy> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        FaultProxy::start_on(l, Arc::new(move || TcpStream::connect(target)), faults)
    }

    /// Proxy accepting on `listener` (made in any namespace) and connecting with
    /// `connect` (which may enter another one, see [`NetNs::run`]).
    pub fn start_on(listener: TcpListener, connect: Arc<Connect>, faults: Faults) -> io::Result<FaultProxy> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stats = Arc::new(ProxyStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("fault-proxy".into()).spawn(move || {
            let mut conns = Vec::new();
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        st.connections.fetch_add(1, Ordering::SeqCst);
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = connect() else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        // A small send buffer towards the server: the proxy should hold
                        // the delay line's bytes, not a bloated socket queue.
                        let _ = nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::SndBuf, &(256 << 10));
                        conns.extend(pipe_pair(client, server, &faults, &st, &sp));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                    Err(_) => break,
                }
            }
            for c in conns {
                let _ = c.join();
            }
        })?;
        Ok(FaultProxy { addr, stats, stop, thread: Some(thread) })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it saw so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Send an RST on `s` now, whatever other descriptors of it exist: a TCP
/// socket connected to AF_UNSPEC is disconnected with a reset (Linux).
fn reset(s: &TcpStream) {
    // SAFETY: `sa` is a valid, zeroed sockaddr of the size passed; the descriptor is
    // an open socket owned by `s` for the duration of the call.
    unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(s.as_raw_fd(), &sa, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t);
    }
}

/// Start both directions of one proxied connection (each a reader and a
/// delayed writer thread).
fn pipe_pair(
    client: TcpStream,
    server: TcpStream,
    faults: &Faults,
    stats: &Arc<ProxyStats>,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return Vec::new() };
    let back = Faults { delay: faults.delay, jitter: faults.jitter, seed: faults.seed ^ 1, ..Default::default() };
    let mut v = pipe(client, server, faults.clone(), stats.clone(), stop.clone(), true);
    v.extend(pipe(s2, c2, back, stats.clone(), stop.clone(), false));
    v
}

/// Forward `from` -> `to` with `faults`.
fn pipe(
    mut from: TcpStream,
    to: TcpStream,
    faults: Faults,
    stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
    forward: bool,
) -> Vec<JoinHandle<()>> {
    // At most 128 chunks of up to 16 KiB in flight (2 MiB: more than the
    // bandwidth-delay product of 200 Mbit/s x 60 ms, far less than a bloated buffer).
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(128);
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(peer) = from.try_clone() else { return Vec::new() };
    let reader = std::thread::spawn(move || {
        let mut rng = SplitMix64::new(faults.seed);
        let mut last = Instant::now();
        let mut buf = vec![0u8; 16 << 10];
        while !stop.load(Ordering::SeqCst) {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let jitter_ns = faults.jitter.as_nanos() as u64;
                    let extra =
                        if jitter_ns > 0 { Duration::from_nanos(rng.next_u64() % jitter_ns) } else { Duration::ZERO };
                    // Never before the chunk ahead of it: order is kept.
                    last = last.max(Instant::now() + faults.delay + extra);
                    if tx.send((last, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Dropping `tx` lets the writer drain and end.
    });
    let writer = std::thread::spawn(move || {
        let mut to = to;
        let mut done = 0u64;
        let mut stalled = false;
        let close = |to: &TcpStream| {
            let _ = to.shutdown(Shutdown::Write);
        };
        while let Ok((at, mut chunk)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let end = done + chunk.len() as u64;
            if forward {
                if let Some((k, mask)) = faults.flip {
                    if (done..end).contains(&k) {
                        chunk[(k - done) as usize] ^= mask;
                        stats.flipped.store(true, Ordering::SeqCst);
                    }
                }
                if let Some(n) = faults.reset_after {
                    if end > n {
                        let keep = (n - done) as usize;
                        let _ = to.write_all(&chunk[..keep]);
                        std::thread::sleep(Duration::from_millis(50));
                        reset(&to);
                        reset(&peer);
                        stats.reset.store(true, Ordering::SeqCst);
                        stats.forwarded.fetch_add(keep as u64, Ordering::SeqCst);
                        return;
                    }
                }
                if let Some((after, pause)) = faults.stall {
                    if !stalled && end > after {
                        let keep = (after.saturating_sub(done)) as usize;
                        if to.write_all(&chunk[..keep]).is_err() {
                            break;
                        }
                        stats.forwarded.fetch_add(keep as u64, Ordering::SeqCst);
                        std::thread::sleep(pause);
                        stalled = true;
                        chunk.drain(..keep);
                        done += keep as u64;
                    }
                }
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
            done += chunk.len() as u64;
            let counter = if forward { &stats.forwarded } else { &stats.returned };
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        close(&to);
    });
    vec![reader, writer]
}
