//! The relay of a tunnelled migration (`qmig migrate --p2p --tunnelled`, libvirt's
//! `VIR_MIGRATE_TUNNELLED`): the migration stream travels through the agents
//! instead of a VM-to-VM socket.
//!
//! ```text
//! source VM --unix--> source agent ==tcp (agent port)==> destination agent --unix--> destination VM
//!           tunnel-out.sock                                                   tunnel-in.sock
//! ```
//!
//! - Prepare3 (destination): the incoming VM listens on `unix:DIR/vms/NAME/tunnel-in.sock`
//!   (`migrate-incoming`); the agent registers the job with a random token and
//!   returns the URI `tunnel:TOKEN`.
//! - Perform3 (source): the agent listens on `DIR/vms/NAME/tunnel-out.sock` and tells
//!   the VM to `migrate` to `unix:` that path. When the VM connects, the agent opens a
//!   second TCP connection to the destination agent's RPC port whose first line is
//!   the request `{"id":1,"call":"tunnel","args":{"job":NAME,"token":TOKEN}}`. The
//!   destination agent connects to its VM's incoming socket, answers
//!   `{"id":1,"return":{}}` and from then on that connection carries raw stream
//!   bytes, both ways (QEMU's return path uses the reverse direction). libvirt
//!   carries the stream inside its RPC connection as a virStream; a connection of
//!   its own per job keeps the agents' JSON-lines RPC simple and lets a cancel
//!   close exactly the data path.
//!
//! Each direction is one thread copying through one fixed buffer of
//! [`BUF_SIZE`]: it reads again only once the previous read is written, so a slow
//! reader stops the writer (back-pressure through the socket buffers) and no queue
//! grows. [`Tunnel::cancel`] shuts down (shutdown(2)) every socket of the tunnel
//! from the calling thread, so a relay thread blocked in a read or in a write on a
//! full pipe returns at once, and so does the VM writing into it.

use crate::rpc::{ErrorClass, RpcError};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The buffer of each direction (bytes): the most a relay thread holds at any time.
pub const BUF_SIZE: usize = 256 << 10;

/// The RPC call that turns a connection into a tunnel's data connection.
pub const TUNNEL_CALL: &str = "tunnel";

/// The URI scheme Prepare3 returns for a tunnelled migration: `tunnel:TOKEN`.
pub const URI_SCHEME: &str = "tunnel:";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One socket of a tunnel: a TCP connection between agents or a unix connection to a VM.
#[derive(Debug)]
pub enum Sock {
    /// A TCP stream.
    Tcp(TcpStream),
    /// A unix stream.
    Unix(UnixStream),
}

impl Sock {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    /// shutdown(2).
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both directions reached end of stream.
    Done,
    /// [`Tunnel::cancel`] closed it.
    Cancelled,
    /// A read or write failed (a peer closed mid-stream, a connection broke).
    Failed(String),
}

/// One tunnel: its sockets (for cancel), byte counts, and how it ended.
#[derive(Debug, Default)]
pub struct Tunnel {
    socks: Mutex<Vec<Sock>>,
    cancelled: AtomicBool,
    forward: AtomicU64,
    backward: AtomicU64,
    state: Mutex<(u8, Option<End>)>,
    ended: Condvar,
}

impl Tunnel {
    /// A tunnel with no socket yet.
    pub fn new() -> Arc<Tunnel> {
        Arc::new(Tunnel::default())
    }

    /// Adds a socket that [`Tunnel::cancel`] shuts down (at once if already cancelled).
    pub fn watch(&self, s: &Sock) -> std::io::Result<()> {
        let c = s.try_clone()?;
        if self.is_cancelled() {
            let _ = c.shutdown(Shutdown::Both);
        }
        lock(&self.socks).push(c);
        Ok(())
    }

    /// Closes the tunnel: every socket is shut down, so every blocked read and write
    /// on it (the relay threads', the VMs') returns now. Idempotent.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        for s in lock(&self.socks).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.set_end(End::Cancelled);
    }

    /// Whether [`Tunnel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Bytes relayed from `a` to `b` (the migration stream's direction).
    pub fn forward_bytes(&self) -> u64 {
        self.forward.load(Ordering::Relaxed)
    }

    /// Bytes relayed from `b` to `a` (the return path's direction).
    pub fn backward_bytes(&self) -> u64 {
        self.backward.load(Ordering::Relaxed)
    }

    /// Records the first non-`Done` end (a failure or a cancel wins over a clean end of the other direction).
    fn set_end(&self, e: End) {
        let mut st = lock(&self.state);
        if st.1.is_none() || (st.1 == Some(End::Done) && e != End::Done) {
            st.1 = Some(e);
        }
        self.ended.notify_all();
    }

    /// Relays between `a` and `b` on two threads: `a`'s bytes (after `a_pending`,
    /// bytes already read from `a`) to `b`, and `b`'s to `a`. End of stream on one
    /// side half-closes the other; an error on either closes the whole tunnel.
    pub fn relay(self: &Arc<Self>, a: Sock, a_pending: Vec<u8>, b: Sock) -> Result<(), RpcError> {
        let sys = |e: std::io::Error| RpcError::system("tunnel", e);
        self.watch(&a).map_err(sys)?;
        self.watch(&b).map_err(sys)?;
        let (a2, b2) = (a.try_clone().map_err(sys)?, b.try_clone().map_err(sys)?);
        lock(&self.state).0 = 2;
        for (name, from, pending, to, forward) in
            [("tunnel-fwd", a, a_pending, b, true), ("tunnel-back", b2, vec![], a2, false)]
        {
            let t = self.clone();
            let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
                let counter = if forward { &t.forward } else { &t.backward };
                let end = match copy(from, &pending, to, counter) {
                    Ok(()) => End::Done,
                    Err(_) if t.is_cancelled() => End::Cancelled,
                    Err(e) => {
                        t.cancel_quietly();
                        End::Failed(e.to_string())
                    }
                };
                let mut st = lock(&t.state);
                st.0 = st.0.saturating_sub(1);
                drop(st);
                t.set_end(end);
            });
            if let Err(e) = spawned {
                self.cancel();
                return Err(sys(e));
            }
        }
        Ok(())
    }

    /// Shuts every socket down without marking the tunnel cancelled (after a failure).
    fn cancel_quietly(&self) {
        for s in lock(&self.socks).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Waits until both relay threads are done (or `timeout`); how it ended, `None` on timeout.
    pub fn wait(&self, timeout: Duration) -> Option<End> {
        let t0 = Instant::now();
        let mut st = lock(&self.state);
        loop {
            if st.0 == 0 && st.1.is_some() {
                return st.1.clone();
            }
            let left = timeout.checked_sub(t0.elapsed())?;
            st = self.ended.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// How it ended so far (`None` while it runs).
    pub fn end(&self) -> Option<End> {
        let st = lock(&self.state);
        if st.0 == 0 {
            st.1.clone()
        } else {
            None
        }
    }
}

/// Copies `pending` then `from` into `to` through one [`BUF_SIZE`] buffer until end of
/// stream, then half-closes `to` (its reader sees the end).
fn copy(mut from: Sock, pending: &[u8], mut to: Sock, counter: &AtomicU64) -> std::io::Result<()> {
    if !pending.is_empty() {
        to.write_all(pending)?;
        counter.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    match to.shutdown(Shutdown::Write) {
        Err(e) if e.kind() != ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// A unix listening socket for one VM connection, removed when dropped; the accept
/// can be cancelled through the [`Tunnel`] (a cancel before the VM connects ends it too).
#[derive(Debug)]
pub struct UnixEndpoint {
    listener: UnixListener,
    path: PathBuf,
}

impl UnixEndpoint {
    /// Listens on `path` (a stale file there is replaced).
    pub fn bind(path: &Path) -> Result<UnixEndpoint, RpcError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| RpcError::system(path.display(), e))?;
        listener.set_nonblocking(true).map_err(|e| RpcError::system(path.display(), e))?;
        Ok(UnixEndpoint { listener, path: path.to_path_buf() })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for one connection, for at most `timeout`, giving up when `tunnel` is cancelled.
    pub fn accept(&self, tunnel: &Tunnel, timeout: Duration) -> Result<UnixStream, RpcError> {
        let t0 = Instant::now();
        loop {
            if tunnel.is_cancelled() {
                return Err(RpcError::new(ErrorClass::OperationFailed, "the tunnel was cancelled"));
            }
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| RpcError::system(self.path.display(), e))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(RpcError::system(self.path.display(), e)),
            }
            if t0.elapsed() > timeout {
                return Err(RpcError::failed(format!("nobody connected to {} in {timeout:?}", self.path.display())));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for UnixEndpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The tunnels of one agent, by VM (job) name: the incoming ones Prepare3 announced
/// (token and the incoming VM's socket), and the live ones (for cancel).
#[derive(Debug, Default)]
pub struct Registry {
    incoming: Mutex<std::collections::BTreeMap<String, (String, PathBuf)>>,
    live: Mutex<std::collections::BTreeMap<String, Arc<Tunnel>>>,
}

impl Registry {
    /// Announces job `name`'s incoming tunnel: a data connection presenting `token`
    /// is relayed into `vm_socket`.
    pub fn expect(&self, name: &str, token: &str, vm_socket: &Path) {
        lock(&self.incoming).insert(name.to_string(), (token.to_string(), vm_socket.to_path_buf()));
    }

    /// Takes job `name`'s announced incoming tunnel if `token` is its token (once).
    pub fn claim(&self, name: &str, token: &str) -> Option<PathBuf> {
        let mut g = lock(&self.incoming);
        match g.get(name) {
            Some((t, _)) if t == token => g.remove(name).map(|(_, p)| p),
            _ => None,
        }
    }

    /// Records job `name`'s live tunnel (a previous one is cancelled).
    pub fn insert(&self, name: &str, t: Arc<Tunnel>) {
        if let Some(old) = lock(&self.live).insert(name.to_string(), t) {
            old.cancel();
        }
    }

    /// Job `name`'s live tunnel.
    pub fn get(&self, name: &str) -> Option<Arc<Tunnel>> {
        lock(&self.live).get(name).cloned()
    }

    /// Cancels and forgets everything of job `name`; whether a live tunnel was closed.
    pub fn close(&self, name: &str) -> bool {
        lock(&self.incoming).remove(name);
        match lock(&self.live).remove(name) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }
}

/// Source side: relays the VM connection accepted on `endpoint` to the destination
/// agent at `peer` (`tcp:HOST:PORT`), presenting job `name`'s `token`. Runs until the
/// tunnel ends; errors before the relay starts close the VM's connection (its
/// migration fails) and are returned.
pub fn run_source(
    tunnel: &Arc<Tunnel>,
    endpoint: &UnixEndpoint,
    peer: &str,
    name: &str,
    token: &str,
    timeout: Duration,
) -> Result<(), RpcError> {
    let vm = endpoint.accept(tunnel, timeout)?;
    let vm = Sock::Unix(vm);
    tunnel.watch(&vm).map_err(|e| RpcError::system("tunnel", e))?;
    match open_data_connection(tunnel, peer, name, token, timeout) {
        Ok(conn) => tunnel.relay(vm, vec![], conn),
        Err(e) => {
            let _ = vm.shutdown(Shutdown::Both);
            Err(e)
        }
    }
}

/// Opens the data connection to the destination agent: the `tunnel` request line and
/// its answer, read byte by byte so that no stream byte after it is taken.
fn open_data_connection(
    tunnel: &Tunnel,
    peer: &str,
    name: &str,
    token: &str,
    timeout: Duration,
) -> Result<Sock, RpcError> {
    let addr = crate::rpc::tcp_address(peer)?;
    let lost = |e: &dyn std::fmt::Display| RpcError::system(format!("tunnel to the agent at {peer}"), e);
    use std::net::ToSocketAddrs;
    let sa = addr.to_socket_addrs().map_err(|e| lost(&e))?.next().ok_or_else(|| lost(&"no address"))?;
    let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| lost(&e))?;
    let _ = s.set_nodelay(true);
    let sock = Sock::Tcp(s.try_clone().map_err(|e| lost(&e))?);
    tunnel.watch(&sock).map_err(|e| lost(&e))?;
    let mut line =
        serde_json::json!({ "id": 1, "call": TUNNEL_CALL, "args": { "job": name, "token": token } }).to_string();
    line.push('\n');
    (&s).write_all(line.as_bytes()).map_err(|e| lost(&e))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
    // The answer line, byte by byte: nothing after it may be swallowed.
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match (&s).read(&mut b) {
            Ok(0) => return Err(lost(&"closed before answering the tunnel request")),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if answer.len() > 64 << 10 => return Err(lost(&"answer line too long")),
            Ok(_) => answer.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(lost(&e)),
        }
    }
    s.set_read_timeout(None).map_err(|e| lost(&e))?;
    let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| lost(&format!("answer: {e}")))?;
    if let Some(err) = v.get("error") {
        let e = serde_json::from_value::<RpcError>(err.clone())
            .unwrap_or_else(|_| RpcError::new(ErrorClass::InternalError, err.to_string()));
        return Err(e.context(format!("the agent at {peer} refused the tunnel")));
    }
    Ok(sock)
}

/// Destination side: the connection `conn` asked for job `name`'s tunnel with
/// `token` (`pending`: bytes already read past the request line). Connects to the
/// incoming VM's socket, answers, and relays (returns once the relay runs); a refusal
/// is answered with an error line and returned.
pub fn serve_destination(
    registry: &Registry,
    name: &str,
    token: &str,
    id: &serde_json::Value,
    mut conn: TcpStream,
    pending: Vec<u8>,
) -> Result<Arc<Tunnel>, RpcError> {
    let answer = |conn: &mut TcpStream, r: Result<(), &RpcError>| {
        let v = match r {
            Ok(()) => serde_json::json!({ "id": id, "return": {} }),
            Err(e) => serde_json::json!({ "id": id, "error": e.to_json() }),
        };
        let mut line = v.to_string();
        line.push('\n');
        conn.write_all(line.as_bytes())
    };
    let vm = registry
        .claim(name, token)
        .ok_or_else(|| RpcError::op_invalid(format!("no tunnelled migration of VM '{name}' awaits this token")))
        .and_then(|path| UnixStream::connect(&path).map_err(|e| RpcError::system(path.display(), e)));
    let vm = match vm {
        Ok(v) => v,
        Err(e) => {
            let _ = answer(&mut conn, Err(&e));
            return Err(e);
        }
    };
    answer(&mut conn, Ok(())).map_err(|e| RpcError::system("tunnel answer", e))?;
    let _ = conn.set_nodelay(true);
    let tunnel = Tunnel::new();
    registry.insert(name, tunnel.clone());
    tunnel.relay(Sock::Tcp(conn), pending, Sock::Unix(vm))?;
    Ok(tunnel)
}

/// A token naming one tunnelled job (16 random bytes, hex).
pub fn new_token() -> Result<String, RpcError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| RpcError::system("/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// How long the source agent waits for its VM to connect, and for the destination agent to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Refuses, in Begin3 and Prepare3, what a tunnelled migration cannot do (as libvirt):
/// it needs the p2p shape (the source agent opens the data connection), and neither
/// postcopy nor multifd (both need more than the one stream the tunnel carries).
pub fn check_flags(flags: &crate::migrate::MigrateFlags) -> Result<(), RpcError> {
    let no = |what: &str| Err(RpcError::new(ErrorClass::ArgumentUnsupported, what.to_string()));
    if !flags.p2p {
        return no("--tunnelled needs --p2p (the source agent carries the stream), as virsh");
    }
    if flags.postcopy {
        return no("--postcopy is not supported with --tunnelled");
    }
    if flags.multifd() {
        return no("--parallel/--compressed (multifd) is not supported with --tunnelled");
    }
    Ok(())
}

/// Prepare3, destination: the incoming VM listens on `DIR/vms/NAME/tunnel-in.sock`;
/// the job is announced with a fresh token; returns the URI `tunnel:TOKEN`.
pub fn incoming(
    registry: &Registry,
    name: &str,
    vm: &crate::vmproc::VmProc,
    dir: &crate::state::StateDir,
) -> Result<String, RpcError> {
    let path = dir.vm_dir(name).join("tunnel-in.sock");
    let _ = std::fs::remove_file(&path);
    vm.execute("migrate-incoming", Some(serde_json::json!({ "uri": format!("unix:{}", path.display()) })))?;
    let token = new_token()?;
    registry.expect(name, &token, &path);
    Ok(format!("{URI_SCHEME}{token}"))
}

/// Perform3, source: listens on `DIR/vms/NAME/tunnel-out.sock` and starts the relay
/// to the destination agent (the job's `peer`) in the background; returns the URI
/// the source VM migrates to (`unix:` that socket).
pub fn outgoing(
    registry: &Registry,
    job: &crate::state::JobRecord,
    uri: &str,
    dir: &crate::state::StateDir,
) -> Result<String, RpcError> {
    let token = uri
        .strip_prefix(URI_SCHEME)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| RpcError::invalid(format!("a tunnelled migration needs a {URI_SCHEME} URI, got '{uri}'")))?;
    let peer = job.peer.clone().ok_or_else(|| {
        RpcError::op_invalid("a tunnelled migration needs the destination agent's address (the p2p shape)")
    })?;
    let endpoint = UnixEndpoint::bind(&dir.vm_dir(&job.name).join("tunnel-out.sock"))?;
    let out = format!("unix:{}", endpoint.path().display());
    let tunnel = Tunnel::new();
    registry.insert(&job.name, tunnel.clone());
    let (name, token) = (job.name.clone(), token.to_string());
    std::thread::Builder::new()
        .name("tunnel-src".into())
        .spawn(move || {
            if let Err(e) = run_source(&tunnel, &endpoint, &peer, &name, &token, CONNECT_TIMEOUT) {
                tracing::warn!(vm = %name, error = %e, "tunnel: the relay did not start");
                tunnel.cancel();
                return;
            }
            let end = tunnel.wait(Duration::from_secs(86_400));
            tracing::info!(vm = %name, forward = tunnel.forward_bytes(), back = tunnel.backward_bytes(), end = ?end, "tunnel ended");
        })
        .map_err(|e| RpcError::system("tunnel thread", e))?;
    Ok(out)
}

/// Serves a `tunnel` data connection on the destination agent (see [`serve_destination`]).
pub fn accept_data_connection(registry: &Registry, req: &serde_json::Value, conn: TcpStream, pending: Vec<u8>) {
    let args = &req["args"];
    let (Some(name), Some(token)) = (args["job"].as_str(), args["token"].as_str()) else {
        let mut conn = conn;
        let e = RpcError::invalid("tunnel: arguments 'job' and 'token' (strings) are required");
        let _ = writeln!(conn, "{}", serde_json::json!({ "id": req["id"], "error": e.to_json() }));
        return;
    };
    match serve_destination(registry, name, token, &req["id"], conn, pending) {
        Ok(t) => {
            let name = name.to_string();
            let _ = std::thread::Builder::new().name("tunnel-dst".into()).spawn(move || {
                let end = t.wait(Duration::from_secs(86_400));
                tracing::info!(vm = %name, forward = t.forward_bytes(), back = t.backward_bytes(), end = ?end, "tunnel ended");
            });
        }
        Err(e) => tracing::warn!(vm = name, error = %e, "tunnel refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected TCP pair on loopback.
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s)
    }

    /// Byte `i` of the test stream (not periodic in any buffer size).
    fn byte(i: u64) -> u8 {
        (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i >> 20) as u8
    }

    #[test]
    fn integrity_over_two_relays() {
        // writer -unix-> relay A -tcp-> relay B -unix-> reader: 256 MiB, byte-exact.
        const LEN: u64 = 256 << 20;
        let (w, a_in) = UnixStream::pair().expect("pair");
        let (a_out, b_in) = tcp_pair();
        let (b_out, r) = UnixStream::pair().expect("pair");
        let ta = Tunnel::new();
        let tb = Tunnel::new();
        // Relay A gets 3 bytes "already read" (as the destination has after the request line).
        let head: Vec<u8> = (0..3).map(byte).collect();
        ta.relay(Sock::Unix(a_in), head, Sock::Tcp(a_out)).expect("relay a");
        tb.relay(Sock::Tcp(b_in), vec![], Sock::Unix(b_out)).expect("relay b");
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let mut buf = vec![0u8; 100_003];
            let mut i = 3u64;
            while i < LEN {
                let n = buf.len().min((LEN - i) as usize);
                for (k, b) in buf[..n].iter_mut().enumerate() {
                    *b = byte(i + k as u64);
                }
                w.write_all(&buf[..n]).expect("write");
                i += n as u64;
            }
            w.shutdown(Shutdown::Write).expect("half close");
            // The back direction: the reader's reply comes through both relays.
            let mut reply = String::new();
            w.read_to_string(&mut reply).expect("reply");
            reply
        });
        let mut r = r;
        let mut buf = vec![0u8; 65_536];
        let mut i = 0u64;
        loop {
            let n = r.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, byte(i + k as u64), "byte {}", i + k as u64);
            }
            i += n as u64;
        }
        assert_eq!(i, LEN);
        r.write_all(b"ok").expect("reply");
        r.shutdown(Shutdown::Write).expect("half close");
        assert_eq!(writer.join().expect("writer"), "ok");
        assert_eq!(ta.wait(Duration::from_secs(30)), Some(End::Done));
        assert_eq!(tb.wait(Duration::from_secs(30)), Some(End::Done));
        assert_eq!((ta.forward_bytes(), tb.forward_bytes()), (LEN, LEN));
        assert_eq!((ta.backward_bytes(), tb.backward_bytes()), (2, 2));
    }

    #[test]
    fn cancel_ends_a_full_pipe_at_once() {
        // The far end never reads: the relay fills the socket buffers and blocks in a
        // write, the writer blocks behind it. Cancel frees both within a second.
        let (w, a_in) = UnixStream::pair().expect("pair");
        let (a_out, stuck) = tcp_pair();
        let t = Tunnel::new();
        t.relay(Sock::Unix(a_in), vec![], Sock::Tcp(a_out)).expect("relay");
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![0x5a; 64 << 10];
            let mut sent = 0u64;
            loop {
                match w.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(e) => return (sent, e.kind()),
                }
            }
        });
        // Wait until the pipe is full: the relay's count stops moving.
        let mut last = u64::MAX;
        let t0 = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = t.forward_bytes();
            if now == last && now > 0 {
                break;
            }
            last = now;
            assert!(t0.elapsed() < Duration::from_secs(60), "the pipe never filled");
        }
        assert!(!writer.is_finished(), "the writer is blocked on the full pipe");
        let t1 = Instant::now();
        t.cancel();
        assert_eq!(t.wait(Duration::from_secs(1)), Some(End::Cancelled), "relay threads still blocked");
        let (sent, kind) = writer.join().expect("writer");
        assert!(t1.elapsed() < Duration::from_secs(1), "cancel took {:?}", t1.elapsed());
        assert!(sent >= t.forward_bytes(), "{sent} < {}", t.forward_bytes());
        assert!(matches!(kind, ErrorKind::BrokenPipe | ErrorKind::ConnectionReset), "{kind:?}");
        drop(stuck);
    }

    #[test]
    fn a_peer_closing_mid_stream_fails_the_tunnel() {
        let (w, a_in) = UnixStream::pair().expect("pair");
        let (a_out, far) = tcp_pair();
        let t = Tunnel::new();
        t.relay(Sock::Unix(a_in), vec![], Sock::Tcp(a_out)).expect("relay");
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![1u8; 64 << 10];
            loop {
                if let Err(e) = w.write_all(&chunk) {
                    return e.kind();
                }
            }
        });
        // The far end reads a little, then closes with data unread (a reset).
        let mut far = far;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 1 << 20 {
            got += far.read(&mut buf).expect("read");
        }
        drop(far);
        match t.wait(Duration::from_secs(30)) {
            Some(End::Failed(why)) => assert!(!why.is_empty()),
            other => panic!("expected a failure, got {other:?}"),
        }
        let kind = writer.join().expect("writer");
        assert!(matches!(kind, ErrorKind::BrokenPipe | ErrorKind::ConnectionReset), "{kind:?}");
        assert!(!t.is_cancelled());
    }

    #[test]
    fn registry_and_endpoint() {
        let r = Registry::default();
        r.expect("g", "t1", Path::new("/x"));
        assert_eq!(r.claim("g", "bad"), None);
        assert_eq!(r.claim("g", "t1"), Some(PathBuf::from("/x")));
        assert_eq!(r.claim("g", "t1"), None, "a token is good once");
        let t = Tunnel::new();
        r.insert("g", t.clone());
        assert!(r.close("g"));
        assert!(t.is_cancelled());
        assert!(!r.close("g"));
        let tok = new_token().expect("token");
        assert_eq!(tok.len(), 32);
        // A cancel ends an accept nobody answers.
        let path = std::env::temp_dir().join(format!("qmig-tunnel-test-{}.sock", std::process::id()));
        let ep = UnixEndpoint::bind(&path).expect("bind");
        let t = Tunnel::new();
        let t2 = t.clone();
        let c = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            t2.cancel();
        });
        let t0 = Instant::now();
        assert!(ep.accept(&t, Duration::from_secs(30)).is_err());
        assert!(t0.elapsed() < Duration::from_secs(5));
        c.join().expect("cancel thread");
        drop(ep);
        assert!(!path.exists(), "the socket file is removed");
    }
}
