//! The agents' RPC: JSON lines over TCP.
//!
//! A client sends one object per line, `{"id": N, "call": NAME, "args": {...}}`
//! (`args` may be left out), and the agent answers each, in order, with
//! `{"id": N, "return": VALUE}` or `{"id": N, "error": {"class": CLASS, "desc":
//! TEXT}}`. A line that is not such an object gets an `InvalidArg` error with
//! `"id": null`; a line longer than [`MAX_LINE`] closes the connection. A call that
//! reports its progress (the p2p `migrate`) may send lines `{"id": N, "progress":
//! VALUE}` before its reply ([`Conn::progress`], [`Client::call_with_progress`]).
//! The handler learns which connection a call came on ([`Conn::id`]) and when a
//! connection closes ([`Handler::closed`]). The calls are listed in
//! [`crate::agent`] and `docs/control-plane.md`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest request or reply line accepted (bytes).
pub const MAX_LINE: u64 = 4 << 20;

/// How long a client waits for one reply by default (a `perform3` lasts as long as the migration).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The error classes of the RPC, after libvirt's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// No VM of that name (libvirt's `VIR_ERR_NO_DOMAIN`).
    NoDomain,
    /// The call is not valid in the current state (`VIR_ERR_OPERATION_INVALID`).
    OperationInvalid,
    /// A missing or malformed argument or cookie (`VIR_ERR_INVALID_ARG`).
    InvalidArg,
    /// An option the VM cannot do (`VIR_ERR_ARGUMENT_UNSUPPORTED`).
    ArgumentUnsupported,
    /// The operation was tried and failed (`VIR_ERR_OPERATION_FAILED`).
    OperationFailed,
    /// A system call, a process or a connection failed (`VIR_ERR_SYSTEM_ERROR`).
    SystemError,
    /// Anything else.
    InternalError,
}

/// An error as the RPC carries it: a class and one line of text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{desc}")]
pub struct RpcError {
    /// The class.
    pub class: ErrorClass,
    /// What failed and why.
    pub desc: String,
}

impl RpcError {
    /// An error of `class` saying `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        RpcError { class, desc: desc.into() }
    }

    /// `InvalidArg`.
    pub fn invalid(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidArg, desc)
    }

    /// `OperationInvalid`.
    pub fn op_invalid(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::OperationInvalid, desc)
    }

    /// `OperationFailed`.
    pub fn failed(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::OperationFailed, desc)
    }

    /// `SystemError` from an I/O error, with what was being done.
    pub fn system(context: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Self::new(ErrorClass::SystemError, format!("{context}: {e}"))
    }

    /// The same error with `prefix: ` before its text.
    pub fn context(self, prefix: impl std::fmt::Display) -> Self {
        RpcError { class: self.class, desc: format!("{prefix}: {}", self.desc) }
    }

    /// The `error` object of a reply.
    pub fn to_json(&self) -> Value {
        json!({ "class": self.class, "desc": self.desc })
    }
}

/// A call's arguments, with typed getters whose errors name the argument.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a>(pub &'a Map<String, Value>);

impl<'a> Args<'a> {
    /// The raw value of `name`.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A required string.
    pub fn str(&self, name: &str) -> Result<&'a str, RpcError> {
        match self.get(name) {
            None => Err(RpcError::invalid(format!("argument '{name}' is missing"))),
            Some(v) => v.as_str().ok_or_else(|| RpcError::invalid(format!("argument '{name}' must be a string"))),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, RpcError> {
        self.get(name).map(|_| self.str(name)).transpose()
    }

    /// A required unsigned integer.
    pub fn u64(&self, name: &str) -> Result<u64, RpcError> {
        match self.get(name) {
            None => Err(RpcError::invalid(format!("argument '{name}' is missing"))),
            Some(v) => {
                v.as_u64().ok_or_else(|| RpcError::invalid(format!("argument '{name}' must be an unsigned integer")))
            }
        }
    }

    /// An optional boolean (absent: false).
    pub fn flag(&self, name: &str) -> Result<bool, RpcError> {
        match self.get(name) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| RpcError::invalid(format!("argument '{name}' must be a boolean"))),
        }
    }
}

/// The connection a call arrived on: its id (unique in this process) and a way to
/// send progress lines to the caller before the reply.
#[derive(Debug)]
pub struct Conn<'a> {
    id: u64,
    writer: &'a TcpStream,
    req_id: Value,
}

impl Conn<'_> {
    /// The connection's id ([`Handler::closed`] is told the same when it closes).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends `{"id": N, "progress": value}` to the caller before the reply (N: the call's
    /// id); [`Client::call_with_progress`] hands them over, [`Client::call`] skips them.
    pub fn progress(&self, value: Value) -> std::io::Result<()> {
        let mut line = json!({ "id": self.req_id, "progress": value }).to_string();
        line.push('\n');
        let mut w = self.writer;
        w.write_all(line.as_bytes())
    }
}

/// Where connection ids come from.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// What serves the calls: `call` with its arguments, to a return value or an error.
pub trait Handler: Send + Sync {
    /// Runs one call.
    fn call(&self, call: &str, args: Args<'_>) -> Result<Value, RpcError>;

    /// Runs one call that arrived on `conn` (by default [`Handler::call`]).
    fn call_on(&self, conn: &Conn<'_>, call: &str, args: Args<'_>) -> Result<Value, RpcError> {
        let _ = conn;
        self.call(call, args)
    }

    /// Connection `conn_id` closed (the peer went away or sent garbage); its calls are over.
    fn closed(&self, conn_id: u64) {
        let _ = conn_id;
    }

    /// Whether `call` turns its connection into a data connection (the tunnel's): its
    /// request line is then handed to [`Handler::stream`] with the connection.
    fn is_stream(&self, call: &str) -> bool {
        let _ = call;
        false
    }

    /// Serves a data connection whose request is `req`; `pending` are the bytes read past
    /// the request line. It owns the connection from then on (it answers itself).
    fn stream(&self, req: &Value, conn: TcpStream, pending: Vec<u8>) {
        let _ = (req, conn, pending);
    }
}

/// Parses `tcp:HOST:PORT` (`HOST` a name, an IPv4 address or `[IPv6]`) into `HOST:PORT`.
pub fn tcp_address(uri: &str) -> Result<String, RpcError> {
    let rest = uri.strip_prefix("tcp:").ok_or_else(|| RpcError::invalid(format!("{uri}: expected tcp:HOST:PORT")))?;
    let ok = rest.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !ok {
        return Err(RpcError::invalid(format!("{uri}: expected tcp:HOST:PORT")));
    }
    Ok(rest.to_string())
}

/// Binds the listening socket of `tcp:HOST:PORT` (port 0 picks one); returns it and its actual `tcp:` address.
pub fn listen(uri: &str) -> Result<(TcpListener, String), RpcError> {
    let addr = tcp_address(uri)?;
    let l = TcpListener::bind(&addr).map_err(|e| RpcError::system(format!("cannot listen on {uri}"), e))?;
    let local = l.local_addr().map_err(|e| RpcError::system("listening socket", e))?;
    Ok((l, format!("tcp:{local}")))
}

/// TCP keepalive on an agent connection: a peer whose host or network vanished without
/// closing (no FIN, no RST) is found dead after about [`KEEPALIVE_IDLE`] plus three
/// unanswered probes [`KEEPALIVE_INTERVAL`] apart, as libvirt's keepalive finds it.
pub fn keepalive(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let r = setsockopt(s, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(s, sockopt::TcpKeepIdle, &(KEEPALIVE_IDLE.as_secs() as u32)))
        .and_then(|()| setsockopt(s, sockopt::TcpKeepInterval, &(KEEPALIVE_INTERVAL.as_secs() as u32)))
        .and_then(|()| setsockopt(s, sockopt::TcpKeepCount, &3u32));
    if let Err(e) = r {
        tracing::debug!(error = %e, "rpc: cannot set TCP keepalive");
    }
}

/// How long a connection may be silent before keepalive probes start.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// The time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `handler` on `listener`, one thread per connection, until the listener fails.
pub fn serve(listener: TcpListener, handler: Arc<dyn Handler>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                keepalive(&stream);
                let h = handler.clone();
                let spawned = std::thread::Builder::new().name("rpc".into()).spawn(move || serve_client(stream, &*h));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "rpc: cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "rpc: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at end of stream.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r.take(MAX_LINE + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        let what = if n as u64 > MAX_LINE { "line longer than the limit" } else { "end of stream inside a line" };
        return Err(std::io::Error::new(ErrorKind::InvalidData, what));
    }
    Ok(Some(line))
}

/// Tells the handler its connection closed, however [`serve_client`] returns.
struct CloseGuard<'a> {
    handler: &'a dyn Handler,
    id: u64,
    stream: bool,
}

impl Drop for CloseGuard<'_> {
    fn drop(&mut self) {
        if !self.stream {
            self.handler.closed(self.id);
        }
    }
}

/// Serves one connection: a reply per request line, in order; tells the handler when it closes.
pub fn serve_client(stream: TcpStream, handler: &dyn Handler) {
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let mut guard = CloseGuard { handler, id, stream: false };
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "rpc: connection dropped");
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match serde_json::from_slice::<Value>(&line) {
            Err(e) => json!({ "id": null, "error": RpcError::invalid(format!("not JSON: {e}")).to_json() }),
            Ok(req) if req["call"].as_str().is_some_and(|c| handler.is_stream(c)) => {
                // A data connection: no calls ran on it, and it is the stream's from now on.
                guard.stream = true;
                let pending = reader.buffer().to_vec();
                handler.stream(&req, reader.into_inner(), pending);
                return;
            }
            Ok(req) => {
                let conn = Conn { id, writer: &writer, req_id: req.get("id").cloned().unwrap_or(Value::Null) };
                answer(&req, handler, &conn)
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn answer(req: &Value, handler: &dyn Handler, conn: &Conn<'_>) -> Value {
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let empty = Map::new();
    let parsed = (|| {
        let obj = req.as_object().ok_or_else(|| RpcError::invalid("a request must be an object"))?;
        if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "id" | "call" | "args")) {
            return Err(RpcError::invalid(format!("unknown request member '{k}'")));
        }
        let call = obj
            .get("call")
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid("request member 'call' (a string) is missing"))?;
        let args = match obj.get("args") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return Err(RpcError::invalid("request member 'args' must be an object")),
        };
        Ok((call, args))
    })();
    let result = parsed.and_then(|(call, args)| handler.call_on(conn, call, Args(args)));
    match result {
        Ok(v) => json!({ "id": id, "return": v }),
        Err(e) => json!({ "id": id, "error": e.to_json() }),
    }
}

/// A connection to an agent.
#[derive(Debug)]
pub struct Client {
    addr: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_id: u64,
}

impl Client {
    /// Connects to the agent at `tcp:HOST:PORT`, trying for at most `timeout`.
    pub fn connect(uri: &str, timeout: Duration) -> Result<Client, RpcError> {
        let addr = tcp_address(uri)?;
        let unreachable = |e: &dyn std::fmt::Display| RpcError::system(format!("cannot reach the agent at {uri}"), e);
        let sockaddrs: Vec<_> = addr.to_socket_addrs().map_err(|e| unreachable(&e))?.collect();
        let mut last: Option<std::io::Error> = None;
        for sa in sockaddrs {
            match TcpStream::connect_timeout(&sa, timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    keepalive(&s);
                    let writer = s.try_clone().map_err(|e| unreachable(&e))?;
                    writer.set_read_timeout(Some(DEFAULT_CALL_TIMEOUT)).map_err(|e| unreachable(&e))?;
                    return Ok(Client { addr: uri.to_string(), reader: BufReader::new(s), writer, next_id: 1 });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(unreachable(&last.map_or_else(|| "no address".to_string(), |e| e.to_string())))
    }

    /// The agent's address (`tcp:HOST:PORT`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sets how long [`Client::call`] waits for a reply (`None`: for ever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), RpcError> {
        self.writer.set_read_timeout(t).map_err(|e| RpcError::system("socket timeout", e))
    }

    /// Runs `call` with `args` (an object) on the agent; its return value or its error.
    pub fn call(&mut self, call: &str, args: Value) -> Result<Value, RpcError> {
        self.call_with_progress(call, args, &mut |_| {}).and_then(|r| r)
    }

    /// Runs `call`, handing each progress line's value to `on_progress` as it comes. The
    /// outer error is the connection failing (the agent never answered: lost, closed,
    /// timed out); the inner result is the agent's answer.
    pub fn call_with_progress(
        &mut self,
        call: &str,
        args: Value,
        on_progress: &mut dyn FnMut(&Value),
    ) -> Result<Result<Value, RpcError>, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = json!({ "id": id, "call": call, "args": args }).to_string();
        line.push('\n');
        let lost = |e: &dyn std::fmt::Display| {
            RpcError::system(format!("connection to the agent at {} ({call})", self.addr), e)
        };
        self.writer.write_all(line.as_bytes()).map_err(|e| lost(&e))?;
        let reply = loop {
            let line = match read_line(&mut self.reader) {
                Ok(Some(l)) => l,
                Ok(None) => return Err(lost(&"closed by the agent")),
                Err(e) => return Err(lost(&e)),
            };
            let v: Value = serde_json::from_slice(&line).map_err(|e| lost(&format!("reply is not JSON: {e}")))?;
            if v.get("id") != Some(&json!(id)) {
                continue;
            }
            match v.get("progress") {
                Some(p) => on_progress(p),
                None => break v,
            }
        };
        if let Some(r) = reply.get("return") {
            return Ok(Ok(r.clone()));
        }
        match reply.get("error") {
            Some(e) => Ok(Err(serde_json::from_value::<RpcError>(e.clone())
                .unwrap_or_else(|_| RpcError::new(ErrorClass::InternalError, e.to_string())))),
            None => Err(lost(&format!("reply without return or error: {reply}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn call(&self, call: &str, args: Args<'_>) -> Result<Value, RpcError> {
            match call {
                "echo" => Ok(Value::Object(args.0.clone())),
                "need" => args.str("x").map(|s| json!(s)),
                _ => Err(RpcError::new(ErrorClass::OperationInvalid, format!("unknown call {call}"))),
            }
        }
    }

    #[test]
    fn round_trip_and_errors() {
        let (l, addr) = listen("tcp:127.0.0.1:0").expect("listen");
        std::thread::spawn(move || serve(l, Arc::new(Echo)));
        let mut c = Client::connect(&addr, Duration::from_secs(5)).expect("connect");
        assert_eq!(c.call("echo", json!({"a": 1})).expect("echo"), json!({"a": 1}));
        let e = c.call("need", json!({})).expect_err("missing arg");
        assert_eq!(e.class, ErrorClass::InvalidArg);
        assert!(e.desc.contains("'x'"), "{e}");
        let e = c.call("nope", json!({})).expect_err("unknown");
        assert_eq!(e.class, ErrorClass::OperationInvalid);
        // A malformed line gets an error with a null id; the connection stays usable.
        let mut raw = TcpStream::connect(tcp_address(&addr).expect("addr")).expect("raw");
        raw.write_all(b"{\"id\":1}\nnot json\n{\"id\":2,\"call\":\"echo\"}\n").expect("write");
        let mut r = BufReader::new(raw);
        let lines: Vec<Value> = (0..3)
            .map(|_| {
                let mut s = String::new();
                r.read_line(&mut s).expect("read");
                serde_json::from_str(&s).expect("json")
            })
            .collect();
        assert_eq!(lines[0]["error"]["class"], "InvalidArg");
        assert_eq!(lines[1]["id"], Value::Null);
        assert_eq!(lines[2], json!({"id": 2, "return": {}}));
    }

    /// Sends two progress lines before its reply; records the connections that closed.
    #[derive(Default)]
    struct Steps {
        closed: std::sync::Mutex<Vec<u64>>,
        ids: std::sync::Mutex<Vec<u64>>,
    }
    impl Handler for Steps {
        fn call(&self, _: &str, _: Args<'_>) -> Result<Value, RpcError> {
            Err(RpcError::failed("call_on is used"))
        }
        fn call_on(&self, conn: &Conn<'_>, call: &str, _: Args<'_>) -> Result<Value, RpcError> {
            self.ids.lock().expect("ids").push(conn.id());
            for step in ["one", "two"] {
                conn.progress(json!(step)).map_err(|e| RpcError::system("progress", e))?;
            }
            match call {
                "ok" => Ok(json!("done")),
                _ => Err(RpcError::failed("no")),
            }
        }
        fn closed(&self, conn_id: u64) {
            self.closed.lock().expect("closed").push(conn_id);
        }
    }

    #[test]
    fn progress_lines_and_closed_connections() {
        let (l, addr) = listen("tcp:127.0.0.1:0").expect("listen");
        let h = Arc::new(Steps::default());
        let served = h.clone();
        std::thread::spawn(move || serve(l, served));
        let mut c = Client::connect(&addr, Duration::from_secs(5)).expect("connect");
        let mut seen = vec![];
        let r = c.call_with_progress("ok", json!({}), &mut |p| seen.push(p.clone())).expect("answered");
        assert_eq!((r.expect("ok"), seen), (json!("done"), vec![json!("one"), json!("two")]));
        // The agent's error is the inner one; plain call skips the progress lines.
        let inner = c.call_with_progress("bad", json!({}), &mut |_| {}).expect("answered");
        assert_eq!(inner.expect_err("its error").desc, "no");
        assert_eq!(c.call("ok", json!({})).expect("plain call"), json!("done"));
        let id = h.ids.lock().expect("ids")[0];
        assert!(h.ids.lock().expect("ids").iter().all(|&i| i == id), "one connection, one id");
        drop(c);
        let t0 = std::time::Instant::now();
        while !h.closed.lock().expect("closed").contains(&id) {
            assert!(t0.elapsed() < Duration::from_secs(30), "the handler is told the connection closed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A connection that is gone is the outer error.
        let (l2, addr2) = listen("tcp:127.0.0.1:0").expect("listen");
        let mut c2 = Client::connect(&addr2, Duration::from_secs(5)).expect("connect");
        drop(l2);
        let lost = c2.call_with_progress("ok", json!({}), &mut |_| {});
        assert_eq!(lost.expect_err("lost").class, ErrorClass::SystemError);
    }

    #[test]
    fn overlong_line_closes_the_connection() {
        let (l, addr) = listen("tcp:127.0.0.1:0").expect("listen");
        std::thread::spawn(move || serve(l, Arc::new(Echo)));
        let mut raw = TcpStream::connect(tcp_address(&addr).expect("addr")).expect("raw");
        raw.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let chunk = vec![b'x'; 1 << 20];
        // The server stops reading after MAX_LINE bytes; a write may then fail: either way it closes.
        for _ in 0..=(MAX_LINE >> 20) {
            if raw.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut buf = Vec::new();
        match raw.read_to_end(&mut buf) {
            Ok(_) => assert!(buf.is_empty(), "no reply to an over-long line"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(tcp_address("tcp:127.0.0.1:4444").expect("v4"), "127.0.0.1:4444");
        assert_eq!(tcp_address("tcp:[::1]:1").expect("v6"), "[::1]:1");
        assert!(tcp_address("unix:/x").is_err());
        assert!(tcp_address("tcp:host").is_err());
        assert!(tcp_address("tcp::80").is_err());
    }
}
