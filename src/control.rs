//! The control socket of `qmig send --control unix:PATH`: a second command
//! (`qmig migrate-continue`, `qmig migrate-start-postcopy`) steering a running
//! send, in the manner of QMP.
//!
//! Protocol: the client connects to the unix socket and writes one JSON object on
//! one line, `{"execute": NAME}` (with `"arguments"` where QMP has them); the
//! server answers one line, `{"return": {}}` or `{"error": {"class":
//! "GenericError", "desc": TEXT}}`, and closes. Commands, by their QMP names:
//!
//! - `migrate-continue` (`arguments.state`, default `pre-switchover`, must be the
//!   current state): let a send held by `--pause-before-switchover` go on;
//! - `migrate-start-postcopy`: switch to postcopy (needs `--postcopy`);
//! - `query-migrate`: the current statistics.
//!
//! The socket file is created when the send starts (an existing file is refused)
//! and removed when it ends.

use crate::error::{Error, Result};
use engine::source::Outgoing;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the server looks for a connection or the end of the send.
const POLL: Duration = Duration::from_millis(20);
/// How long either side waits for the other's line.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `unix:PATH` (or a bare path) as given to `--control`.
pub fn parse_control(s: &str) -> Result<PathBuf> {
    let path = s.strip_prefix("unix:").unwrap_or(s);
    if path.is_empty() {
        return Err(Error::Usage(format!("--control {s}: expected unix:PATH")));
    }
    Ok(PathBuf::from(path))
}

/// The server beside a running send; dropping it stops it and removes the socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listen on `path` for commands to `out`.
    pub fn bind(path: &Path, out: &Outgoing) -> Result<Self> {
        if path.exists() {
            return Err(Error::Usage(format!("--control {}: the file exists already", path.display())));
        }
        let listener = UnixListener::bind(path).map_err(|e| Error::file(path, e))?;
        listener.set_nonblocking(true).map_err(Error::Io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, out) = (stop.clone(), out.clone());
        let thread = std::thread::Builder::new()
            .name("qmig-control".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => serve(conn, &out),
                        // Nothing waiting (or a failed accept): look again shortly.
                        Err(_) => std::thread::sleep(POLL),
                    }
                }
            })
            .map_err(Error::Io)?;
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn error_reply(desc: impl std::fmt::Display) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc.to_string()}})
}

/// The reply to one command line.
fn answer(line: &str, out: &Outgoing) -> Value {
    let cmd: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error_reply(format!("the command is not JSON: {e}")),
    };
    match cmd["execute"].as_str() {
        Some("migrate-continue") => {
            let want = cmd["arguments"]["state"].as_str().unwrap_or("pre-switchover");
            let now = out.state().status();
            if want != now.as_str() {
                return error_reply(format!("Migration not in expected state: {now}"));
            }
            match out.continue_switchover() {
                Ok(()) => json!({"return": {}}),
                Err(e) => error_reply(e),
            }
        }
        Some("migrate-start-postcopy") => match out.start_postcopy() {
            Ok(()) => json!({"return": {}}),
            Err(e) => error_reply(e),
        },
        Some("query-migrate") => json!({"return": out.info().get().to_json()}),
        Some(other) => error_reply(format!("The command {other} has not been found")),
        None => error_reply("expected {\"execute\": NAME}"),
    }
}

fn serve(conn: UnixStream, out: &Outgoing) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut line = String::new();
    let reply = match BufReader::new(&conn).read_line(&mut line) {
        Ok(_) => answer(line.trim(), out),
        Err(e) => error_reply(format!("reading the command: {e}")),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{reply}");
}

/// Send `command` (with `arguments`, if any) to the control socket at `path`;
/// returns its `return` value, or its error as [`Error::Usage`].
pub fn execute(path: &Path, command: &str, arguments: Option<Value>) -> Result<Value> {
    let conn = UnixStream::connect(path).map_err(|e| Error::file(path, e))?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(Error::Io)?;
    let mut msg = json!({"execute": command});
    if let Some(a) = arguments {
        msg["arguments"] = a;
    }
    let mut w = &conn;
    writeln!(w, "{msg}").map_err(Error::Io)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(Error::Io)?;
    let reply: Value = serde_json::from_str(line.trim())
        .map_err(|e| Error::Usage(format!("{}: the reply is not JSON: {e}", path.display())))?;
    match (reply.get("return"), reply["error"]["desc"].as_str()) {
        (Some(r), _) => Ok(r.clone()),
        (None, Some(desc)) => Err(Error::Usage(format!("{command}: {desc}"))),
        (None, None) => Err(Error::Usage(format!("{command}: unexpected reply {reply}"))),
    }
}
