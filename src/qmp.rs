//! A QMP server in QEMU 7.2's framing: the greeting, capability negotiation
//! (`qmp_capabilities`), `id` echo, `{"error": {"class", "desc"}}` with QEMU's
//! error classes and wording for malformed input, and events with QEMU's
//! `timestamp` ({seconds, microseconds} of wall-clock time) sent to every
//! negotiated client. What the commands do is a [`Handler`]'s business (`qmig
//! vm`'s is [`crate::vm`]).
//!
//! Input is a stream of JSON objects (any spacing, several per line or one over
//! several lines, as QEMU's streaming parser takes them); a syntax error is
//! answered with `JSON parse error, ...` and the rest of that line dropped.
//!
//! File descriptors passed with SCM_RIGHTS are kept for `getfd` (QEMU's
//! semantics: named, replaced on the same name, closed by `closefd`), in the
//! handler's [`Fds`]. Each client's output queue is bounded: QEMU 7.2 buffers a
//! monitor's output without limit; a client that falls [`MAX_QUEUED_LINES`]
//! lines behind is disconnected instead, with a warning (dropping events
//! silently would leave it with a wrong picture of the migration).

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// The most input one command may take before it is refused (QEMU's parser limit is 64 MiB; ours is smaller).
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

/// The most lines (replies and events) queued for one client that is not
/// reading; an event that finds the queue full disconnects the client.
pub const MAX_QUEUED_LINES: usize = 4096;

/// The most descriptors taken from one SCM_RIGHTS message (more are closed).
const MAX_FDS_PER_MESSAGE: usize = 16;

/// The most descriptors `getfd` keeps (QEMU has no limit; ours bounds what a client can pin).
pub const MAX_NAMED_FDS: usize = 256;

/// File descriptors received by `getfd`, by name (QEMU's per-monitor list);
/// cloneable, shared by the server's clients.
#[derive(Clone, Default)]
pub struct Fds(Arc<Mutex<HashMap<String, OwnedFd>>>);

impl Fds {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, OwnedFd>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `fd` as `name`, closing the one that had the name (QEMU's `getfd`).
    pub fn insert(&self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        let mut m = self.lock();
        if !m.contains_key(name) && m.len() >= MAX_NAMED_FDS {
            return Err(QmpError::generic(format!(
                "Too many file descriptors kept by getfd (at most {MAX_NAMED_FDS})"
            )));
        }
        m.insert(name.to_string(), fd);
        Ok(())
    }

    /// Take the descriptor named `name` out of the list (as QEMU's `fd:NAME` does).
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        self.lock().remove(name)
    }

    /// The names kept now.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }
}

/// QEMU's `QapiErrorClass` values (the `class` of an error reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// `GenericError`: everything else.
    GenericError,
    /// `CommandNotFound`: no such command (or not before negotiation).
    CommandNotFound,
    /// `DeviceNotActive`.
    DeviceNotActive,
    /// `DeviceNotFound`.
    DeviceNotFound,
    /// `KVMMissingCap`.
    KvmMissingCap,
}

impl ErrorClass {
    /// QEMU's name of the class.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

/// A refused command: QEMU's error class and its human-readable `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({})", desc, class.as_str())]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` saying `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }

    /// A `CommandNotFound` saying `desc`.
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }

    /// `{"class", "desc"}`.
    pub fn to_json(&self) -> Value {
        json!({ "class": self.class.as_str(), "desc": self.desc })
    }
}

/// What a command returns: its `return` value or an error.
pub type QmpResult = Result<Value, QmpError>;

/// The commands of a QMP server.
pub trait Handler: Send + Sync {
    /// Run `command` with its (possibly empty) `arguments`.
    fn execute(&self, command: &str, args: &Args<'_>) -> QmpResult;
    /// The names of the commands [`execute`](Self::execute) knows (for `query-commands`).
    fn commands(&self) -> Vec<&'static str>;
    /// Called once the reply to a successful `quit` has been written out.
    fn after_quit(&self) {}
    /// Where `getfd` keeps descriptors (`None`: no `getfd`/`closefd`).
    fn fds(&self) -> Option<&Fds> {
        None
    }
}

/// A command's `arguments`, with QEMU's wording for missing, unexpected and mistyped members.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a>(pub &'a Map<String, Value>);

impl<'a> Args<'a> {
    /// Refuse members not in `allowed` (`Parameter 'X' is unexpected`).
    pub fn only(&self, allowed: &[&str]) -> Result<(), QmpError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }

    /// Member `name`, if present.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name)
    }

    /// A required string member.
    pub fn str(&self, name: &str) -> Result<&'a str, QmpError> {
        match self.0.get(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(v) => v.as_str().ok_or_else(|| mistyped(name, "string")),
        }
    }

    /// An optional boolean member.
    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| mistyped(name, "boolean")),
        }
    }
}

/// QEMU's `Invalid parameter type for 'NAME', expected: TYPE`.
pub fn mistyped(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!("Invalid parameter type for '{name}', expected: {expected}"))
}

/// Wall-clock time as QEMU stamps events: `{"seconds", "microseconds"}`.
pub fn timestamp() -> Value {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({ "seconds": t.as_secs(), "microseconds": t.subsec_micros() })
}

/// One client's outgoing lines, and its socket (shut down to disconnect it).
#[derive(Clone)]
struct Outbox {
    tx: crossbeam_channel::Sender<Out>,
    socket: Arc<UnixStream>,
}

enum Out {
    Line(String),
    /// Everything before has been written (or the client is gone).
    Flushed(crossbeam_channel::Sender<()>),
}

/// Sends events to every client past negotiation; cloneable, cheap to call from
/// any thread (never blocks on a slow client: each has its own writer thread).
#[derive(Clone, Default)]
pub struct Events {
    clients: Arc<Mutex<Vec<Outbox>>>,
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Vec<Outbox>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Emit event `name` (with `data`, if any), stamped now.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let mut ev = Map::new();
        ev.insert("timestamp".into(), timestamp());
        ev.insert("event".into(), name.into());
        if let Some(d) = data {
            ev.insert("data".into(), d);
        }
        let line = Value::Object(ev).to_string();
        tracing::debug!(event = %line, "QMP event");
        self.lock().retain(|c| match c.tx.try_send(Out::Line(line.clone())) {
            Ok(()) => true,
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                tracing::warn!(queued = MAX_QUEUED_LINES, "QMP client is not reading its events: disconnecting it");
                let _ = c.socket.shutdown(std::net::Shutdown::Both);
                false
            }
        });
    }

    /// How many clients receive events now.
    pub fn clients(&self) -> usize {
        self.lock().len()
    }

    fn add(&self, c: Outbox) {
        self.lock().push(c);
    }
}

/// The greeting: QEMU 7.2's command set, our package name, no `oob`.
pub fn greeting() -> Value {
    json!({ "QMP": { "version": version(), "capabilities": [] } })
}

/// `query-version`'s reply: the QEMU version whose QMP this speaks, and qmig's.
pub fn version() -> Value {
    json!({
        "qemu": { "micro": 0, "minor": 2, "major": 7 },
        "package": concat!("qmig ", env!("CARGO_PKG_VERSION")),
    })
}

/// A QMP server on a unix socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    events: Events,
}

impl Server {
    /// Listen on `path` (a stale socket there is replaced, as QEMU does).
    pub fn bind(path: &Path) -> std::io::Result<Server> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path)?;
        Ok(Server { listener, path: path.to_path_buf(), events: Events::default() })
    }

    /// The event sender of this server's clients.
    pub fn events(&self) -> Events {
        self.events.clone()
    }

    /// Accept clients for ever, each served on its own thread by `handler`.
    pub fn serve(&self, handler: Arc<dyn Handler>) {
        for conn in self.listener.incoming() {
            let Ok(stream) = conn else {
                // E.g. out of descriptors: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            };
            let (h, ev) = (handler.clone(), self.events.clone());
            std::thread::spawn(move || serve_client(stream, &*h, &ev));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serve one client until it disconnects: greeting, then commands.
pub fn serve_client(stream: UnixStream, handler: &dyn Handler, events: &Events) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let Ok(socket) = stream.try_clone() else { return };
    let (tx, rx) = crossbeam_channel::bounded::<Out>(MAX_QUEUED_LINES);
    let writer_thread = std::thread::spawn(move || {
        for out in rx {
            match out {
                Out::Line(mut l) => {
                    l.push_str("\r\n");
                    if writer.write_all(l.as_bytes()).is_err() {
                        break;
                    }
                }
                Out::Flushed(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    });
    let _ = tx.send(Out::Line(greeting().to_string()));
    let outbox = Outbox { tx: tx.clone(), socket: Arc::new(socket) };
    let mut session =
        Session { negotiated: false, tx: outbox, events: events.clone(), skip_line: false, received_fds: Vec::new() };
    let reader = stream;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match recv_with_fds(&reader, &mut chunk) {
            Ok((0, _)) | Err(_) => break,
            Ok((n, fds)) => {
                if !fds.is_empty() {
                    // As QEMU's socket chardev: the newest message's descriptors replace unclaimed ones.
                    session.received_fds = fds;
                }
                n
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        if session.skip_line {
            match buf.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    buf.drain(..=p);
                    session.skip_line = false;
                }
                None => {
                    buf.clear();
                    continue;
                }
            }
        }
        if buf.len() > MAX_COMMAND_BYTES {
            // One command this long is refused whole; input resumes after its line.
            session.reply_err(None, QmpError::generic("JSON parse error, input too long"));
            match buf.iter().position(|&b| b == b'\n') {
                Some(p) => drop(buf.drain(..=p)),
                None => {
                    buf.clear();
                    session.skip_line = true;
                    continue;
                }
            }
        }
        session.consume(&mut buf, handler);
    }
    drop(session);
    drop(tx);
    let _ = writer_thread.join();
}

/// Read from `sock` into `buf`, with any descriptors passed alongside (close-on-exec).
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(sock.as_fd().as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(std::io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel has just installed these descriptors in this
                // process for us (SCM_RIGHTS); nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
    }
    Ok((msg.bytes, fds))
}

struct Session {
    negotiated: bool,
    /// Descriptors from the last SCM_RIGHTS message, not yet claimed by `getfd`.
    received_fds: Vec<OwnedFd>,
    /// Drop input up to the next newline (the rest of a refused, too long command).
    skip_line: bool,
    tx: Outbox,
    events: Events,
}

impl Session {
    fn send(&self, v: Value) {
        // A reply waits for room: a client that sends commands without reading is held back.
        let _ = self.tx.tx.send(Out::Line(v.to_string()));
    }

    fn reply_err(&self, id: Option<Value>, e: QmpError) {
        let mut m = Map::new();
        if let Some(id) = id {
            m.insert("id".into(), id);
        }
        m.insert("error".into(), e.to_json());
        self.send(Value::Object(m));
    }

    /// Handle every complete JSON value at the front of `buf`; keep an incomplete tail.
    fn consume(&mut self, buf: &mut Vec<u8>, handler: &dyn Handler) {
        loop {
            let start = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
            buf.drain(..start);
            if buf.is_empty() {
                return;
            }
            let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    buf.drain(..used);
                    self.dispatch(v, handler);
                }
                Some(Err(e)) if e.is_eof() => return,
                Some(Err(e)) => {
                    self.reply_err(None, QmpError::generic(format!("JSON parse error, {e}")));
                    // Resynchronise at the next line.
                    let nl = buf.iter().position(|&b| b == b'\n').map_or(buf.len(), |p| p + 1);
                    buf.drain(..nl);
                }
                None => return,
            }
        }
    }

    fn dispatch(&mut self, v: Value, handler: &dyn Handler) {
        let Value::Object(req) = v else {
            return self.reply_err(None, QmpError::generic("QMP input must be a JSON object"));
        };
        let id = req.get("id").cloned();
        let checked = (|| {
            let mut command = None;
            let mut args = None;
            for (k, v) in &req {
                match k.as_str() {
                    "execute" => {
                        command = Some(
                            v.as_str()
                                .ok_or_else(|| QmpError::generic("QMP input member 'execute' must be a string"))?,
                        )
                    }
                    "arguments" => {
                        args = Some(
                            v.as_object()
                                .ok_or_else(|| QmpError::generic("QMP input member 'arguments' must be an object"))?,
                        )
                    }
                    "id" => {}
                    other => return Err(QmpError::generic(format!("QMP input member '{other}' is unexpected"))),
                }
            }
            let command = command.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
            Ok((command, args))
        })();
        let empty = Map::new();
        let (command, args) = match checked {
            Ok((c, a)) => (c, Args(a.unwrap_or(&empty))),
            Err(e) => return self.reply_err(id, e),
        };
        let result = self.run(command, args, handler);
        tracing::debug!(command, ok = result.is_ok(), "QMP command");
        let quit_ok = result.is_ok();
        match result {
            Ok(ret) => {
                let mut m = Map::new();
                m.insert("return".into(), ret);
                if let Some(id) = id {
                    m.insert("id".into(), id);
                }
                self.send(Value::Object(m));
            }
            Err(e) => self.reply_err(id, e),
        }
        if command == "quit" && quit_ok {
            // The reply must be out before the process ends.
            let (ack, done) = crossbeam_channel::bounded(1);
            let _ = self.tx.tx.send(Out::Flushed(ack));
            let _ = done.recv_timeout(std::time::Duration::from_secs(1));
            handler.after_quit();
        }
    }

    fn run(&mut self, command: &str, args: Args<'_>, handler: &dyn Handler) -> QmpResult {
        if !self.negotiated {
            if command != "qmp_capabilities" {
                return Err(QmpError::not_found("Expecting capabilities negotiation with 'qmp_capabilities'"));
            }
            args.only(&["enable"])?;
            if let Some(en) = args.get("enable") {
                let list = en.as_array().ok_or_else(|| mistyped("enable", "array"))?;
                if let Some(c) = list.first() {
                    let c = c.as_str().unwrap_or("?");
                    return Err(QmpError::generic(format!("Capability '{c}' not available")));
                }
            }
            self.negotiated = true;
            self.events.add(self.tx.clone());
            return Ok(json!({}));
        }
        match command {
            "qmp_capabilities" => {
                Err(QmpError::not_found("Capabilities negotiation is already complete, command ignored"))
            }
            "query-version" => {
                args.only(&[])?;
                Ok(version())
            }
            "getfd" if handler.fds().is_some() => self.getfd(&args, handler.fds()),
            "closefd" if handler.fds().is_some() => {
                args.only(&["fdname"])?;
                let name = args.str("fdname")?;
                match handler.fds().and_then(|f| f.take(name)) {
                    Some(fd) => {
                        drop(fd);
                        Ok(json!({}))
                    }
                    None => Err(QmpError::generic(format!("File descriptor named '{name}' not found"))),
                }
            }
            "query-commands" => {
                args.only(&[])?;
                let mut names = vec!["qmp_capabilities", "query-version", "query-commands"];
                if handler.fds().is_some() {
                    names.extend(["getfd", "closefd"]);
                }
                names.extend(handler.commands());
                Ok(Value::Array(names.into_iter().map(|n| json!({ "name": n })).collect()))
            }
            c if handler.commands().contains(&c) => handler.execute(c, &args),
            c => Err(QmpError::not_found(format!("The command {c} has not been found"))),
        }
    }

    /// QEMU's `getfd`: the descriptor passed with this command (SCM_RIGHTS) is kept as `fdname`.
    fn getfd(&mut self, args: &Args<'_>, fds: Option<&Fds>) -> QmpResult {
        args.only(&["fdname"])?;
        let name = args.str("fdname")?;
        // QEMU takes the first descriptor of the message and closes the others.
        let mut received = std::mem::take(&mut self.received_fds).into_iter();
        let Some(fd) = received.next() else {
            return Err(QmpError::generic("No file descriptor supplied via SCM_RIGHTS"));
        };
        drop(received);
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic("Parameter 'fdname' expects a name not starting with a digit"));
        }
        match fds {
            Some(f) => f.insert(name, fd).map(|()| json!({})),
            None => Err(QmpError::not_found("The command getfd has not been found")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    struct Echo;
    impl Handler for Echo {
        fn execute(&self, command: &str, args: &Args<'_>) -> QmpResult {
            match command {
                "echo" => {
                    args.only(&["text"])?;
                    Ok(json!({ "text": args.str("text")? }))
                }
                _ => Err(QmpError::generic("unreachable")),
            }
        }
        fn commands(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
    }

    fn session() -> (UnixStream, BufReader<UnixStream>, Events) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let events = Events::default();
        let ev = events.clone();
        std::thread::spawn(move || serve_client(b, &Echo, &ev));
        let r = BufReader::new(a.try_clone().expect("clone"));
        (a, r, events)
    }

    fn line(r: &mut BufReader<UnixStream>) -> Value {
        let mut l = String::new();
        r.read_line(&mut l).expect("read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }

    #[test]
    fn framing_negotiation_ids_and_errors_as_qemu() {
        let (mut w, mut r, events) = session();
        let g = line(&mut r);
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        let mut ask = |text: &str| {
            w.write_all(text.as_bytes()).expect("write");
            line(&mut r)
        };
        assert_eq!(
            ask("{\"execute\":\"echo\"}\n")["error"],
            json!({"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"})
        );
        assert_eq!(ask("{\"execute\":\"qmp_capabilities\",\"id\":7}\n"), json!({"return": {}, "id": 7}));
        events.emit("STOP", None);
        let ev = ask("");
        assert_eq!(ev["event"], "STOP");
        assert!(ev["timestamp"]["seconds"].as_u64().is_some() && ev["timestamp"]["microseconds"].is_u64());
        assert!(ev.get("data").is_none());
        assert_eq!(ask("{\"execute\":\"qmp_capabilities\"}\n")["error"]["class"], "CommandNotFound");
        assert_eq!(
            ask("{\"execute\":\"nosuch\",\"id\":\"x\"}\n"),
            json!({"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}})
        );
        assert_eq!(ask("[1]\n")["error"]["desc"], "QMP input must be a JSON object");
        assert_eq!(ask("{\"foo\":1}\n")["error"]["desc"], "QMP input member 'foo' is unexpected");
        assert_eq!(ask("{\"execute\":1}\n")["error"]["desc"], "QMP input member 'execute' must be a string");
        assert_eq!(
            ask("{\"execute\":\"echo\",\"arguments\":[]}\n")["error"]["desc"],
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(ask("{\"execute\":\"echo\"}\n")["error"]["desc"], "Parameter 'text' is missing");
        assert_eq!(
            ask("{\"execute\":\"echo\",\"arguments\":{\"text\":1}}\n")["error"]["desc"],
            "Invalid parameter type for 'text', expected: string"
        );
        assert_eq!(
            ask("{\"execute\":\"echo\",\"arguments\":{\"a\":1}}\n")["error"]["desc"],
            "Parameter 'a' is unexpected"
        );
        // Split over lines, and two on one line.
        assert_eq!(ask("{\"execute\": \"echo\",\n \"arguments\": {\"text\": \"hi\"}, \"id\": 3}\n")["id"], 3);
        assert_eq!(ask("{\"execute\":\"echo\",\"arguments\":{\"text\":\"a\"}} {\"execute\":\"echo\",\"arguments\":{\"text\":\"b\"}}\n")["return"]["text"], "a");
        assert_eq!(ask("")["return"]["text"], "b");
        // A syntax error, then the stream goes on.
        assert!(ask("{\"execute\": bad}\n")["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.starts_with("JSON parse error")));
        assert_eq!(ask("{\"execute\":\"query-version\"}\n")["return"]["qemu"]["minor"], 2);
        let cmds = ask("{\"execute\":\"query-commands\"}\n");
        assert!(cmds["return"].as_array().is_some_and(|c| c.contains(&json!({"name": "echo"}))));
    }

    #[test]
    fn an_endless_command_is_refused_and_the_session_goes_on() {
        let (mut w, mut r, _) = session();
        line(&mut r);
        let mut big = b"{\"execute\": \"echo\", \"arguments\": {\"text\": \"".to_vec();
        big.resize(MAX_COMMAND_BYTES + 200_000, b'a');
        big.extend_from_slice(b"\"}}\n{\"execute\":\"qmp_capabilities\",\"id\":1}\n");
        let writer = std::thread::spawn(move || w.write_all(&big).map(|()| w));
        assert_eq!(line(&mut r)["error"]["desc"], "JSON parse error, input too long");
        assert_eq!(line(&mut r), json!({"return": {}, "id": 1}));
        assert!(writer.join().is_ok_and(|w| w.is_ok()));
    }

    /// A negotiated client on `events` (greeting and reply read).
    fn negotiated(events: &Events) -> (UnixStream, BufReader<UnixStream>) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let ev = events.clone();
        std::thread::spawn(move || serve_client(b, &Echo, &ev));
        let mut r = BufReader::new(a.try_clone().expect("clone"));
        line(&mut r);
        let mut w = a;
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").expect("write");
        assert_eq!(line(&mut r), json!({"return": {}}));
        (w, r)
    }

    #[test]
    fn a_client_that_never_reads_is_disconnected_and_others_go_on() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let events = Events::default();
        let (_w_slow, mut slow) = negotiated(&events);
        let (w_fast, mut fast) = negotiated(&events);
        assert_eq!(events.clients(), 2);
        let read = Arc::new(AtomicUsize::new(0));
        let r = read.clone();
        let reader = std::thread::spawn(move || {
            let mut l = String::new();
            while fast.read_line(&mut l).is_ok_and(|k| k > 0) {
                if l.contains("\"TEST\"") {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                l.clear();
            }
        });
        let data = json!({ "pad": "x".repeat(1024) });
        // The queue plus what the socket buffers: far fewer than this many events.
        // In batches, each read by the reading client before the next (it must not
        // fall behind on a loaded machine: only the client that never reads is cut).
        let limit = 200_000;
        let mut emitted = 0;
        while events.clients() == 2 && emitted < limit {
            for _ in 0..64 {
                events.emit("TEST", Some(data.clone()));
                emitted += 1;
            }
            let t0 = std::time::Instant::now();
            while read.load(Ordering::SeqCst) < emitted && t0.elapsed() < std::time::Duration::from_secs(30) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        assert_eq!(events.clients(), 1, "the slow client is still served after {emitted} events");
        assert_eq!(read.load(Ordering::SeqCst), emitted, "the reading client got every event");
        println!("slow client disconnected after {emitted} events");
        // The slow client finds its stream ended (after what was already written).
        let mut l = String::new();
        let mut drained = 0;
        while slow.read_line(&mut l).is_ok_and(|k| k > 0) {
            drained += 1;
            l.clear();
        }
        assert!(drained < emitted, "{drained} of {emitted}");
        // The reading client is still connected and served.
        events.emit("TEST", None);
        let t0 = std::time::Instant::now();
        while read.load(Ordering::SeqCst) <= emitted && t0.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(read.load(Ordering::SeqCst), emitted + 1);
        let _ = w_fast.shutdown(std::net::Shutdown::Both);
        reader.join().expect("reader");
    }
}
