//! A small QMP client and `qemu-system-x86_64` launcher for interop tests.
//!
//! [`QemuProcess`] starts a stopped (`-S`) `-machine none` guest whose RAM is
//! file backed (`memory-backend-file`, `share=on`) and connects a [`Qmp`]
//! client to it; the child is killed and reaped on drop. Nothing QEMU sends is
//! trusted: every malformed reply becomes a [`QemuError`].

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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

fn stderr_summary(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        "(empty)".to_string()
    } else {
        t.replace('\n', " / ")
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> QemuError {
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

    /// Like [`Qmp::connect`], calling `alive` between attempts so a dead QEMU aborts the wait.
    fn connect_checked(
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

    fn wait_migration_checked(
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

/// One file-backed RAM block: backend id (= RAM block name), file path and length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBackend {
    /// Backend id; for the machine's memory backend this is the RAM block name in the stream.
    pub name: String,
    /// The `mem-path` file.
    pub path: PathBuf,
    /// Size in bytes.
    pub len: u64,
}

/// How to start a [`QemuProcess`]; builder style, e.g. `QemuConfig::new().ram("mem", path, len)`.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// RAM backends; the first is the machine's memory backend. The others are only
    /// created: QEMU 7.2 `-machine none` does not migrate them (no device can map them).
    pub ram: Vec<RamBackend>,
    /// Start with `-incoming defer` (a migration destination).
    pub incoming: bool,
    /// Extra command-line arguments appended at the end.
    pub extra_args: Vec<OsString>,
    /// Machine type (default `none`).
    pub machine: String,
    /// QEMU binary; `None` means [`qemu_binary`].
    pub binary: Option<PathBuf>,
    /// Time allowed for QMP to come up and for each QMP reply.
    pub timeout: Duration,
    /// `prealloc=on` on every memory backend: QEMU populates the RAM at startup.
    pub prealloc: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            ram: Vec::new(),
            incoming: false,
            extra_args: Vec::new(),
            machine: "none".into(),
            binary: None,
            timeout: DEFAULT_TIMEOUT,
            prealloc: false,
        }
    }
}

impl QemuConfig {
    /// A `-machine none` guest without RAM, not incoming.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a `memory-backend-file` RAM block `name` of `len` bytes backed by `path` (share=on).
    pub fn ram(mut self, name: impl Into<String>, path: impl Into<PathBuf>, len: u64) -> Self {
        self.ram.push(RamBackend { name: name.into(), path: path.into(), len });
        self
    }

    /// Sets whether QEMU starts with `-incoming defer`.
    pub fn incoming(mut self, incoming: bool) -> Self {
        self.incoming = incoming;
        self
    }

    /// Appends one extra command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Sets the machine type (default `none`).
    pub fn machine(mut self, machine: impl Into<String>) -> Self {
        self.machine = machine.into();
        self
    }

    /// Uses `binary` instead of looking up `qemu-system-x86_64` on `PATH`.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Sets `prealloc=on` on the memory backends (QEMU populates its RAM at startup).
    pub fn prealloc(mut self, on: bool) -> Self {
        self.prealloc = on;
        self
    }

    /// Sets the time allowed for QMP to come up and for each QMP reply.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The arguments (without the binary) for a QMP socket at `qmp_socket`.
    pub fn args(&self, qmp_socket: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut machine = self.machine.clone();
        if let Some(first) = self.ram.first() {
            machine.push_str(",memory-backend=");
            machine.push_str(&first.name);
        }
        a.push("-machine".into());
        a.push(machine.into());
        for r in &self.ram {
            let mut o = OsString::from(format!("memory-backend-file,id={},size={},mem-path=", r.name, size_arg(r.len)));
            o.push(r.path.as_os_str());
            o.push(",share=on");
            if self.prealloc {
                o.push(",prealloc=on");
            }
            a.push("-object".into());
            a.push(o);
        }
        if let Some(first) = self.ram.first() {
            a.push("-m".into());
            a.push(size_arg(first.len).into());
        }
        for s in ["-nodefaults", "-display", "none", "-S"] {
            a.push(s.into());
        }
        if self.incoming {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a.push("-qmp".into());
        let mut q = OsString::from("unix:");
        q.push(qmp_socket.as_os_str());
        q.push(",server=on,wait=off");
        a.push(q);
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// Formats a byte count for QEMU's size parser (`64M`, or `12345B` when not a MiB multiple).
pub fn size_arg(len: u64) -> String {
    const MIB: u64 = 1 << 20;
    if len != 0 && len.is_multiple_of(MIB) {
        format!("{}M", len / MIB)
    } else {
        format!("{len}B")
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A private temp dir (QMP socket, stderr log) removed on drop.
#[derive(Debug)]
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<RunDir, QemuError> {
        let base = std::env::temp_dir();
        for _ in 0..100 {
            let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir = base.join(format!("qmig-qemu-{}-{n}-{nanos:x}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(RunDir(dir)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(QemuError::Io {
                        context: format!("cannot create temp dir {}", dir.display()),
                        source: e,
                    })
                }
            }
        }
        Err(QemuError::Io {
            context: format!("cannot create a unique temp dir in {}", base.display()),
            source: io::Error::from(ErrorKind::AlreadyExists),
        })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running QEMU with a connected QMP client; killed and reaped on drop.
#[derive(Debug)]
pub struct QemuProcess {
    // Field order matters for drop: the child is reaped in Drop::drop, the dir goes last.
    child: Child,
    qmp: Option<Qmp>,
    exit: Option<ExitStatus>,
    command_line: String,
    stderr_path: PathBuf,
    dir: RunDir,
}

impl QemuProcess {
    /// Spawns QEMU as described by `config` and connects QMP; on failure reports QEMU's stderr.
    pub fn start(config: &QemuConfig) -> Result<QemuProcess, QemuError> {
        let binary = match &config.binary {
            Some(b) => b.clone(),
            None => qemu_binary().ok_or(QemuError::BinaryNotFound)?,
        };
        let dir = RunDir::create()?;
        let sock = dir.0.join("qmp.sock");
        let stderr_path = dir.0.join("stderr.log");
        let stderr_file = File::create(&stderr_path)
            .map_err(io_err(format!("cannot create QEMU stderr log {}", stderr_path.display())))?;
        let args = config.args(&sock);
        let command_line = std::iter::once(binary.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr_file))
            .spawn()
            .map_err(|source| QemuError::Spawn { binary: binary.clone(), source })?;
        let mut proc = QemuProcess { child, qmp: None, exit: None, command_line, stderr_path, dir };
        let qmp = {
            let p = &mut proc;
            Qmp::connect_checked(&sock, config.timeout, &mut || p.check_alive())
        }?;
        proc.qmp = Some(qmp);
        Ok(proc)
    }

    /// The full command line QEMU was started with (for error reports).
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// The private temp dir holding the QMP socket and the stderr log (removed on drop).
    pub fn run_dir(&self) -> &Path {
        &self.dir.0
    }

    /// The process id of QEMU.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything QEMU has written to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The QMP client, or [`QemuError::Closed`] after [`QemuProcess::quit`] dropped it.
    pub fn qmp(&mut self) -> Result<&mut Qmp, QemuError> {
        self.qmp.as_mut().ok_or(QemuError::Closed)
    }

    /// Runs a QMP command; if the connection broke because QEMU exited, reports [`QemuError::Exited`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QemuError> {
        let r = self.qmp()?.execute(cmd, args);
        self.explain(r)
    }

    /// Returns the exit status if QEMU has exited (non-blocking).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, QemuError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(io_err("cannot query the QEMU process"))?;
        }
        Ok(self.exit)
    }

    /// `Ok` while QEMU runs, [`QemuError::Exited`] with its stderr once it has exited.
    pub fn check_alive(&mut self) -> Result<(), QemuError> {
        match self.try_wait()? {
            None => Ok(()),
            Some(status) => Err(QemuError::Exited { status, stderr: self.stderr() }),
        }
    }

    /// Waits up to `timeout` for QEMU to exit on its own; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Turns a connection loss into [`QemuError::Exited`] when QEMU has (just) exited.
    fn explain<T>(&mut self, r: Result<T, QemuError>) -> Result<T, QemuError> {
        match r {
            Err(QemuError::Closed) | Err(QemuError::Io { .. }) => {
                // QEMU closes QMP while exiting; give it a moment to be reaped.
                let _ = self.wait_exit(Duration::from_secs(2));
                self.check_alive()?;
                r
            }
            other => other,
        }
    }

    /// Runs `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value, QemuError> {
        self.execute("query-migrate", None)
    }

    /// Runs `query-status` and returns the runstate.
    pub fn query_status(&mut self) -> Result<String, QemuError> {
        let r = self.qmp()?.query_status();
        self.explain(r)
    }

    /// Starts an outgoing migration to `uri`.
    pub fn migrate(&mut self, uri: &str) -> Result<(), QemuError> {
        let r = self.qmp()?.migrate(uri);
        self.explain(r)
    }

    /// Starts an incoming migration from `uri` (needs [`QemuConfig::incoming`]).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QemuError> {
        let r = self.qmp()?.migrate_incoming(uri);
        self.explain(r)
    }

    /// Like [`Qmp::wait_migration`], but fails with [`QemuError::Exited`] as soon as QEMU exits.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QemuError> {
        let mut qmp = self.qmp.take().ok_or(QemuError::Closed)?;
        let r = qmp.wait_migration_checked(timeout, &mut || self.check_alive());
        self.qmp = Some(qmp);
        self.explain(r)
    }

    /// Sends `quit` and waits up to `timeout` for a clean exit, killing QEMU otherwise.
    pub fn quit(mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        if let Some(mut qmp) = self.qmp.take() {
            // QEMU may close the socket before or after replying; both are fine.
            match qmp.execute("quit", None) {
                Ok(_) | Err(QemuError::Closed) | Err(QemuError::Io { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(s) = self.wait_exit(timeout)? {
            return Ok(s);
        }
        self.kill()
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, QemuError> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.qmp = None;
        // Ignore "already exited" races: wait() below is the authority.
        let _ = self.child.kill();
        let s = self.child.wait().map_err(io_err("cannot reap the QEMU process"))?;
        self.exit = Some(s);
        Ok(s)
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Write all of `bytes` to `sock`, the first chunk carrying `fd` (SCM_RIGHTS).
fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::{AsFd, AsRawFd};
    let raw = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(bytes)];
    let n =
        sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
    let mut w = sock;
    w.write_all(&bytes[n..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_args() {
        assert_eq!(size_arg(64 << 20), "64M");
        assert_eq!(size_arg(4096), "4096B");
        assert_eq!(size_arg(0), "0B");
    }

    #[test]
    fn command_line_shape() {
        let c = QemuConfig::new().ram("mem", "/tmp/a.ram", 16 << 20).incoming(true).arg("-name").arg("x");
        let args: Vec<String> =
            c.args(Path::new("/tmp/q.sock")).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "-machine none,memory-backend=mem \
             -object memory-backend-file,id=mem,size=16M,mem-path=/tmp/a.ram,share=on \
             -m 16M -nodefaults -display none -S -incoming defer \
             -qmp unix:/tmp/q.sock,server=on,wait=off -name x"
        );
    }

    #[test]
    fn migration_result() {
        assert!(expect_completed(json!({"status": "completed"})).is_ok());
        match expect_completed(json!({"status": "failed", "error-desc": "boom"})) {
            Err(QemuError::MigrationFailed { status, desc, .. }) => {
                assert_eq!(status, "failed");
                assert_eq!(desc.as_deref(), Some("boom"));
            }
            other => panic!("{other:?}"),
        }
        assert!(is_terminal_status("cancelled"));
        assert!(!is_terminal_status("active"));
    }

    #[test]
    fn missing_binary_is_reported() {
        let r = QemuProcess::start(&QemuConfig::new().binary("/nonexistent/qemu"));
        assert!(matches!(r, Err(QemuError::Spawn { .. })), "{r:?}");
    }
}
