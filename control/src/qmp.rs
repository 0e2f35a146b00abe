//! The one QMP client of the tree: a connection to a QEMU 7.2 (or `qmig vm`)
//! monitor over a unix socket, past capability negotiation, with the
//! `query-migrate` helpers the agents and the tests use.
//!
//! Nothing the peer sends is trusted: a malformed reply is a [`QemuError`], never
//! a panic. Asynchronous events that arrive while a command waits for its reply
//! are kept in arrival order ([`Qmp::take_events`], [`Qmp::next_event`]).

use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
/// Name of the QEMU binary looked up on `PATH` by [`qemu_binary`].
pub const QEMU_BINARY_NAME: &str = "qemu-system-x86_64";

/// Interval between two `query-migrate` polls in [`Qmp::wait_migration`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Default time allowed for one QMP reply and for the QMP socket to appear.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from launching QEMU or talking QMP to it.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// `qemu-system-x86_64` is not on `PATH` and no binary was configured.
    #[error("{QEMU_BINARY_NAME} not found on PATH")]
    BinaryNotFound,
    /// The QEMU process could not be started.
    #[error("failed to start {}", binary.display())]
    Spawn {
        /// The binary that was executed.
        binary: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A local I/O operation failed (temp dir, socket, file); `context` says which.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The QMP socket did not accept a connection in time.
    #[error("could not connect to QMP socket {} within {timeout:?}: {last_error}", path.display())]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// The time allowed.
        timeout: Duration,
        /// The last connection error seen.
        last_error: io::Error,
    },
    /// QEMU closed the QMP connection (usually because it exited).
    #[error("QMP connection closed by QEMU")]
    Closed,
    /// QEMU sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// A QMP command returned an error object; `desc` is QEMU's `error.desc`.
    #[error("QMP command {command} failed ({class}): {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's `error.class`, e.g. `GenericError`.
        class: String,
        /// QEMU's `error.desc`, the human-readable message.
        desc: String,
    },
    /// Waiting for something took longer than allowed.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited (includes the last state seen).
        what: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The QEMU process exited; `stderr` is everything it printed.
    #[error("QEMU exited ({status}); stderr: {}", stderr_summary(stderr))]
    Exited {
        /// The exit status.
        status: ExitStatus,
        /// QEMU's captured standard error.
        stderr: String,
    },
    /// A migration ended in a state other than `completed`.
    #[error("migration ended with status {status}{}", desc.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    MigrationFailed {
        /// The final status (`failed`, `cancelled`, ...).
        status: String,
        /// QEMU's `error-desc`, when it gave one.
        desc: Option<String>,
        /// The whole final `query-migrate` reply.
        info: Value,
    },
}

/// Standard error text on one line (`(empty)` when there is none).
pub fn stderr_summary(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        "(empty)".to_string()
    } else {
        t.replace('\n', " / ")
    }
}

/// Maps an I/O error to [`QemuError::Io`] with `context`.
pub fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> QemuError {
    let context = context.into();
    move |source| QemuError::Io { context, source }
}

/// Finds `qemu-system-x86_64` on `PATH`; `None` when it is not installed.
pub fn qemu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(QEMU_BINARY_NAME)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Whether a `query-migrate` status is final (`completed`, `failed` or `cancelled`).
pub fn is_terminal_status(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// A QMP connection over a unix socket, past capability negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    partial: Vec<u8>,
    greeting: Value,
    events: Vec<Value>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until it exists (up to `timeout`), and negotiates capabilities.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Qmp, QemuError> {
        Qmp::connect_checked(path.as_ref(), timeout, &mut || Ok(()))
    }

    /// Like [`Qmp::connect`], calling `alive` between attempts so a dead peer aborts the wait.
    pub fn connect_checked(
        path: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> Result<(), QemuError>,
    ) -> Result<Qmp, QemuError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    alive()?;
                    if Instant::now() >= deadline {
                        return Err(QemuError::ConnectTimeout { path: path.to_path_buf(), timeout, last_error: e });
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let writer = stream.try_clone().map_err(io_err("cannot clone QMP socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            greeting: Value::Null,
            events: Vec::new(),
            timeout: timeout.max(Duration::from_millis(100)),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The greeting QEMU sent on connect (`{"QMP": {"version": ..}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets how long [`Qmp::execute`] waits for a reply (default: the connect timeout).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
    }

    /// Returns and clears the asynchronous events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Runs `cmd` with optional `args`; returns its `return` value or [`QemuError::Command`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QemuError> {
        self.execute_passing(cmd, args, None)
    }

    /// Runs `cmd` (e.g. `getfd`) with `fd` passed alongside it (SCM_RIGHTS), as QEMU's `getfd` expects.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QemuError> {
        self.execute_passing(cmd, args, Some(fd))
    }

    fn execute_passing(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value, QemuError> {
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(cmd.to_string()));
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        let sent = match fd {
            None => self.writer.write_all(line.as_bytes()),
            Some(fd) => send_with_fd(&self.writer, line.as_bytes(), fd),
        };
        sent.map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => QemuError::Closed,
            _ => QemuError::Io { context: format!("cannot send QMP command {cmd}"), source: e },
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QemuError::Timeout {
                    what: format!("the reply to QMP command {cmd}"),
                    timeout: self.timeout,
                });
            }
            let reply = self.read_message_within(remaining, cmd)?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("(missing)").to_string();
                return Err(QemuError::Command {
                    command: cmd.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QemuError::Protocol(format!("unexpected reply to {cmd}: {reply}")));
        }
    }

    /// The next asynchronous event: one already received, else the next message,
    /// waiting at most `timeout` (a reply with no command pending is a protocol error).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Value, QemuError> {
        if !self.events.is_empty() {
            return Ok(self.events.remove(0));
        }
        let msg = self.read_message_within(timeout, "an event")?;
        if msg.get("event").is_some() {
            Ok(msg)
        } else {
            Err(QemuError::Protocol(format!("expected an event, got {msg}")))
        }
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let t = self.timeout;
        self.read_message_within(t, "the QMP greeting")
    }

    /// Reads one JSON line, waiting at most `limit`; `what` names the awaited reply for errors.
    fn read_message_within(&mut self, limit: Duration, what: &str) -> Result<Value, QemuError> {
        let deadline = Instant::now() + limit;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QemuError::Timeout { what: format!("{what} from QEMU"), timeout: limit });
            }
            self.reader.get_ref().set_read_timeout(Some(remaining)).map_err(io_err("cannot set QMP socket timeout"))?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(QemuError::Closed),
                Ok(_) => {
                    if self.partial.last() != Some(&b'\n') {
                        // EOF in the middle of a line.
                        return Err(QemuError::Closed);
                    }
                    let line = std::mem::take(&mut self.partial);
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim();
                    if text.is_empty() {
                        continue;
                    }
                    return serde_json::from_str(text)
                        .map_err(|e| QemuError::Protocol(format!("invalid JSON from QEMU ({e}): {text}")));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(QemuError::Closed),
                Err(e) => return Err(QemuError::Io { context: "cannot read from QMP socket".into(), source: e }),
            }
        }
    }

    /// Runs `query-migrate` and returns its reply object.
    pub fn query_migrate(&mut self) -> Result<Value, QemuError> {
        self.execute("query-migrate", None)
    }

    /// Runs `query-status` and returns the runstate (e.g. `prelaunch`, `paused`).
    pub fn query_status(&mut self) -> Result<String, QemuError> {
        let v = self.execute("query-status", None)?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QemuError::Protocol(format!("query-status without status: {v}")))
    }

    /// Starts an outgoing migration to `uri` (e.g. `exec:cat > FILE`, `unix:SOCK`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QemuError> {
        self.execute("migrate", Some(json!({ "uri": uri }))).map(drop)
    }

    /// Starts an incoming migration from `uri` on a QEMU started with `-incoming defer`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QemuError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri }))).map(drop)
    }

    /// Sets migration capabilities, e.g. `&[("xbzrle", true)]`.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QemuError> {
        let list: Vec<Value> = caps.iter().map(|(c, s)| json!({ "capability": c, "state": s })).collect();
        self.execute("migrate-set-capabilities", Some(json!({ "capabilities": list }))).map(drop)
    }

    /// Polls `query-migrate` every 20 ms until completed/failed/cancelled; returns the final reply.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QemuError> {
        self.wait_migration_checked(timeout, &mut || Ok(()))
    }

    /// Like [`Qmp::wait_migration`], calling `alive` before each poll so a dead peer aborts the wait.
    pub fn wait_migration_checked(
        &mut self,
        timeout: Duration,
        alive: &mut dyn FnMut() -> Result<(), QemuError>,
    ) -> Result<Value, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            alive()?;
            let info = self.query_migrate()?;
            let status = info.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
            if is_terminal_status(&status) {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    what: format!("the migration to finish (last status {status})"),
                    timeout,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Checks that a final `query-migrate` reply says `completed`, else [`QemuError::MigrationFailed`].
pub fn expect_completed(info: Value) -> Result<Value, QemuError> {
    let status = info.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
    if status == "completed" {
        return Ok(info);
    }
    let desc = info.get("error-desc").and_then(Value::as_str).map(str::to_string);
    Err(QemuError::MigrationFailed { status, desc, info })
}

/// Write all of `bytes` to `sock`, the first chunk carrying `fd` (SCM_RIGHTS).
fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::{AsFd, AsRawFd};
    let raw = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [io::IoSlice::new(bytes)];
    let n = sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(io::Error::from)?;
    let mut w = sock;
    w.write_all(&bytes[n..])
}
