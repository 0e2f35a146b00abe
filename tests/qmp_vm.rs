//! `qmig vm` over QMP, against QEMU 7.2 over QMP: the same client code (testkit's
//! QMP client) migrates QEMU 7.2 -> QEMU 7.2 (`-machine none`, 16 MiB) and `qmig
//! vm` -> `qmig vm` (the KVM guest, 64 MiB), and the two are compared: the event
//! sequences (names and order; `MIGRATION_PASS` by its place), `query-migrate`'s
//! fields (names and JSON types, per status) on both sides, the run states after;
//! the qmig guest must have gone on from where it stopped with its checksum intact.
//! Then the same script of commands that QEMU refuses in some state runs against
//! both, and every answer must agree (refused or not, error class, QEMU's words).

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::{qemu_or_skip, TestDir};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::qemu::{QemuConfig, QemuError, QemuProcess, Qmp};

/// Time allowed for any one wait (generous: a loaded 2-core machine).
const T: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// A `qmig vm` process (64 MiB, one slot, an 8 MiB working set, `-S`); killed on drop.
struct QmigVm {
    child: Child,
    qmp: Option<Qmp>,
    sock: std::path::PathBuf,
}

impl QmigVm {
    fn start(dir: &TestDir, name: &str, extra: &[&str]) -> QmigVm {
        let sock = dir.join(&format!("{name}.qmp"));
        let stderr = std::fs::File::create(dir.join(&format!("{name}.stderr"))).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_qmig"))
            .args(["vm", "--qmp", &format!("unix:{},server=on,wait=off", sock.display())])
            .args(["--ram-size", "64M", "--slots", "1", "--working-set", "8M", "--dirty-rate", "16", "-S"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start qmig vm");
        let mut vm = QmigVm { child, qmp: None, sock: sock.clone() };
        vm.qmp = Some(Qmp::connect(&sock, T).unwrap_or_else(|e| panic!("qmig vm {name}: QMP: {e}")));
        vm
    }

    fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().expect("connected")
    }

    /// The exit status within `T`, or `None` if it still runs.
    fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < T {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(POLL);
        }
        None
    }
}

impl Drop for QmigVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `-machine none` QEMU with 16 MiB of file RAM (a quarter random), `-S`.
fn qemu(dir: &TestDir, name: &str, incoming: Option<&str>) -> QemuProcess {
    let ram = dir.join(&format!("{name}.ram"));
    let len = 16usize << 20;
    std::fs::write(&ram, testkit::pattern::generate(testkit::pattern::Pattern::Mixed { every: 4 }, 1, len))
        .expect("RAM file");
    let mut c = QemuConfig::new().ram("mem", &ram, len as u64).timeout(T);
    c = match incoming {
        Some("defer") => c.incoming(true),
        Some(uri) => c.arg("-incoming").arg(uri),
        None => c,
    };
    QemuProcess::start(&c).unwrap_or_else(|e| panic!("QEMU {name}: {e}"))
}

fn qmp_of(p: &mut QemuProcess) -> &mut Qmp {
    p.qmp().expect("QMP of QEMU")
}

fn exec(q: &mut Qmp, cmd: &str, args: Option<Value>) -> Value {
    q.execute(cmd, args.clone()).unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"))
}

fn status_of(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("-")
}

fn run_state(q: &mut Qmp) -> String {
    q.query_status().expect("query-status")
}

/// Poll `query-migrate` until `done` holds for its status; every reply.
fn poll_until(q: &mut Qmp, what: &str, done: impl Fn(&str) -> bool) -> Vec<Value> {
    let t0 = Instant::now();
    let mut seen = vec![];
    loop {
        let r = exec(q, "query-migrate", None);
        let stop = done(status_of(&r));
        seen.push(r);
        if stop {
            return seen;
        }
        assert!(t0.elapsed() < T, "{what}: still {:?} after {T:?}", seen.last());
        std::thread::sleep(POLL);
    }
}

/// Events up to and including the first one `last` accepts.
fn events_until(q: &mut Qmp, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = vec![];
    loop {
        let e = q.next_event(T).unwrap_or_else(|e| panic!("waiting for an event after {out:?}: {e}"));
        let done = last(&e);
        out.push(e);
        if done {
            return out;
        }
    }
}

fn is_migration(e: &Value, status: &str) -> bool {
    e["event"] == "MIGRATION" && e["data"]["status"] == status
}

/// What one migration driven over QMP showed.
struct Trace {
    src_events: Vec<Value>,
    dst_events: Vec<Value>,
    src_replies: Vec<Value>,
    dst_replies: Vec<Value>,
    /// `query-status` of the source and the destination once both completed.
    states_after: (String, String),
    /// The destination's `query-status` after `cont`.
    dst_state_resumed: String,
}

/// Drive one live migration purely over QMP: `events` on both sides, the source
/// throttled to `max_bandwidth` and started (`cont`), the destination listening on
/// `uri` (`migrate-incoming`), `migrate`, `query-migrate` polled on both until
/// both completed; then `cont` on the destination. `between` runs once both completed.
fn drive_migration(
    src: &mut Qmp,
    dst: &mut Qmp,
    uri: &str,
    max_bandwidth: u64,
    postcopy: bool,
    between: &mut dyn FnMut(&mut Qmp, &mut Qmp),
) -> Trace {
    for q in [&mut *src, &mut *dst] {
        q.set_capabilities(&[("events", true), ("postcopy-ram", postcopy)]).expect("capabilities");
    }
    exec(src, "migrate-set-parameters", Some(json!({ "max-bandwidth": max_bandwidth })));
    exec(src, "cont", None);
    let mut dst_replies = vec![exec(dst, "query-migrate", None)];
    exec(dst, "migrate-incoming", Some(json!({ "uri": uri })));
    dst_replies.push(exec(dst, "query-migrate", None));
    exec(src, "migrate", Some(json!({ "uri": uri })));
    if postcopy {
        exec(src, "migrate-start-postcopy", None);
    }
    let mut src_replies = vec![];
    let t0 = Instant::now();
    loop {
        let s = exec(src, "query-migrate", None);
        let d = exec(dst, "query-migrate", None);
        let done = testkit::qemu::is_terminal_status(status_of(&s));
        src_replies.push(s);
        dst_replies.push(d);
        if done {
            break;
        }
        assert!(t0.elapsed() < T, "migration still {:?} after {T:?}", src_replies.last());
        std::thread::sleep(POLL);
    }
    let last = src_replies.last().cloned().unwrap_or_default();
    assert_eq!(status_of(&last), "completed", "source: {last}");
    dst_replies.extend(poll_until(dst, "destination", |s| s == "completed" || s == "failed"));
    assert_eq!(dst_replies.last().map(|r| status_of(r).to_string()), Some("completed".into()), "{dst_replies:?}");
    let states_after = (run_state(src), run_state(dst));
    between(src, dst);
    let src_events = events_until(src, |e| is_migration(e, "completed"));
    exec(dst, "cont", None);
    let dst_events = events_until(dst, |e| e["event"] == "RESUME");
    let dst_state_resumed = run_state(dst);
    Trace { src_events, dst_events, src_replies, dst_replies, states_after, dst_state_resumed }
}

/// Event names in order (`MIGRATION:<status>`), `MIGRATION_PASS` left out; and
/// checks the passes: in each migration numbered 1, 2, ... with the first between
/// `setup` and `active` and (when it completes) the last between `STOP` and
/// `completed`, as QEMU 7.2 emits them.
fn sequence(who: &str, evs: &[Value]) -> Vec<String> {
    for e in evs {
        let ts = &e["timestamp"];
        assert!(
            ts["seconds"].as_u64().is_some_and(|s| s > 1_600_000_000)
                && ts["microseconds"].as_u64().is_some_and(|u| u < 1_000_000),
            "{who}: timestamp of {e}"
        );
    }
    // Each migration (from its `setup`) numbers its passes from 1.
    let starts: Vec<usize> = (0..evs.len()).filter(|&i| is_migration(&evs[i], "setup")).collect();
    for (k, &from) in starts.iter().enumerate() {
        let seg = &evs[from..starts.get(k + 1).copied().unwrap_or(evs.len())];
        let pos = |f: &dyn Fn(&Value) -> bool| seg.iter().position(f);
        let passes: Vec<usize> = (0..seg.len()).filter(|&i| seg[i]["event"] == "MIGRATION_PASS").collect();
        for (n, &i) in passes.iter().enumerate() {
            assert_eq!(seg[i]["data"]["pass"], n as u64 + 1, "{who}: pass numbers {seg:?}");
        }
        let (Some(&first), Some(&last)) = (passes.first(), passes.last()) else { continue };
        let active = pos(&|e| is_migration(e, "active")).expect("active");
        assert!(first < active, "{who}: first pass between setup and active: {seg:?}");
        if let (Some(stop), Some(done)) = (pos(&|e| e["event"] == "STOP"), pos(&|e| is_migration(e, "completed"))) {
            assert!(stop < last && last < done, "{who}: last pass between STOP and completed: {seg:?}");
        }
    }
    evs.iter()
        .filter(|e| e["event"] != "MIGRATION_PASS")
        .map(|e| match e["event"].as_str() {
            Some("MIGRATION") => format!("MIGRATION:{}", e["data"]["status"].as_str().unwrap_or("?")),
            Some(n) => n.to_string(),
            None => format!("not an event: {e}"),
        })
        .collect()
}

/// JSON type of every member path (`ram.total`, `socket-address[].path`), our
/// `x-` additions left out.
fn schema(v: &Value, prefix: &str, out: &mut BTreeMap<String, &'static str>) {
    let ty = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if !prefix.is_empty() {
        out.insert(prefix.to_string(), ty);
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter().filter(|(k, _)| !k.starts_with("x-")) {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                schema(x, &p, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                schema(x, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// Per status (`-` for none shown), the union of the member paths and types of the replies.
fn schemas(replies: &[Value]) -> BTreeMap<String, BTreeMap<String, &'static str>> {
    let mut by: BTreeMap<String, BTreeMap<String, &'static str>> = BTreeMap::new();
    for r in replies {
        schema(r, "", by.entry(status_of(r).to_string()).or_default());
    }
    by
}

fn compare_schemas(side: &str, qemu: &[Value], qmig: &[Value], required: &[&str]) {
    let (a, b) = (schemas(qemu), schemas(qmig));
    for s in required {
        assert!(a.contains_key(*s) && b.contains_key(*s), "{side}: status {s} seen by both: QEMU {a:?}, qmig {b:?}");
    }
    for (status, qs) in &a {
        if let Some(ms) = b.get(status) {
            assert_eq!(qs, ms, "{side}: query-migrate members in status {status} (QEMU left, qmig vm right)");
        }
    }
}

fn guest(q: &mut Qmp) -> Value {
    exec(q, "x-qmig-query-guest", None)
}

#[test]
fn qmp_migration_of_qemu_and_qmig_vm_agree() {
    let Some(_) = qemu_or_skip("qmp_migration_of_qemu_and_qmig_vm_agree") else { return };
    if !testkit::kvm_or_skip("qmp_migration_of_qemu_and_qmig_vm_agree") {
        return;
    }
    let dir = TestDir::new("qmp-vm-migrate");

    let (mut qs, mut qd) = (qemu(&dir, "qemu-src", None), qemu(&dir, "qemu-dst", Some("defer")));
    let uri = format!("unix:{}", dir.join("qemu-mig.sock").display());
    // 4 MiB of data at 8 MiB/s: the source is `active` for about half a second.
    let q = drive_migration(qmp_of(&mut qs), qmp_of(&mut qd), &uri, 8 << 20, false, &mut |_, _| {});
    drop((qs, qd));

    const UUID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    let mut ms = QmigVm::start(&dir, "vm-src", &["--name", "guest1", "--uuid", UUID]);
    let mut md = QmigVm::start(&dir, "vm-dst", &["--incoming", "defer"]);
    assert_eq!(exec(ms.qmp(), "query-name", None), json!({ "name": "guest1" }));
    assert_eq!(exec(ms.qmp(), "query-uuid", None), json!({ "UUID": UUID }));
    // A second client sees the same events.
    let mut watcher = Qmp::connect(&ms.sock, T).expect("second QMP client");
    let uri = format!("unix:{}", dir.join("vm-mig.sock").display());
    let mut at_stop = Value::Null;
    // 12 MiB at 32 MiB/s (the guest dirties its 8 MiB at 16 MiB/s: this converges).
    let m = drive_migration(ms.qmp.as_mut().expect("qmp"), md.qmp(), &uri, 32 << 20, false, &mut |src, dst| {
        // Stopped on both sides: the destination holds the guest exactly as the source left it.
        let (s, d) = (guest(src), guest(dst));
        assert_eq!(s["counter"], d["counter"], "counter at stop (source) and as loaded (destination)");
        assert!(s["counter"].as_u64().unwrap_or(0) > 0, "the guest ran on the source: {s}");
        // (null: stopped in the middle of a write, which the guest completes once resumed)
        assert_ne!(d["checksum_ok"], false, "loaded guest's checksum: {d}");
        at_stop = s;
    });

    // The guest runs on at the destination, from where it stopped, checksum intact.
    let t0 = Instant::now();
    let stopped_at = at_stop["counter"].as_u64().unwrap_or(u64::MAX);
    let after = loop {
        let g = guest(md.qmp());
        if g["counter"].as_u64().is_some_and(|c| c > stopped_at + 1000) || t0.elapsed() > T {
            break g;
        }
        std::thread::sleep(POLL);
    };
    assert!(after["counter"].as_u64().unwrap_or(0) > stopped_at, "counter {stopped_at} -> {after}");
    assert_eq!(after["checksum_ok"], true, "{after}");

    let watched = events_until(&mut watcher, |e| is_migration(e, "completed"));
    assert_eq!(sequence("watcher", &watched), sequence("qmig vm", &m.src_events), "both clients get every event");
    for (side, a, b) in [("source", &q.src_events, &m.src_events), ("destination", &q.dst_events, &m.dst_events)] {
        let (qa, mb) = (sequence("QEMU", a), sequence("qmig vm", b));
        assert_eq!(qa, mb, "{side} events (QEMU left, qmig vm right)");
    }
    assert_eq!(
        sequence("QEMU", &q.src_events),
        ["RESUME", "MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:completed"]
    );
    assert_eq!(
        sequence("QEMU", &q.dst_events),
        ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:completed", "RESUME"]
    );
    compare_schemas("source", &q.src_replies, &m.src_replies, &["active", "completed"]);
    compare_schemas("destination", &q.dst_replies, &m.dst_replies, &["-", "completed"]);
    assert_eq!(q.states_after, m.states_after, "run states once completed (source, destination)");
    assert_eq!(m.states_after, ("postmigrate".to_string(), "paused".to_string()));
    assert_eq!((q.dst_state_resumed.as_str(), m.dst_state_resumed.as_str()), ("running", "running"));

    for mut vm in [ms, md] {
        exec(vm.qmp(), "quit", None);
        assert!(vm.wait_exit().is_some_and(|s| s.success()), "qmig vm exits 0 on quit");
    }
}

/// A command's outcome: its return value, or the error's class and desc.
type Outcome = Result<Value, (String, String)>;

fn attempt(q: &mut Qmp, cmd: &str, args: Option<Value>) -> Outcome {
    match q.execute(cmd, args) {
        Ok(v) => Ok(v),
        Err(QemuError::Command { class, desc, .. }) => Err((class, desc)),
        Err(e) => panic!("{cmd}: {e}"),
    }
}

type Log = Vec<(&'static str, Outcome)>;

/// Each step of the same script answered alike by QEMU 7.2 and `qmig vm`: equal
/// replies, or errors of the same class whose text starts with QEMU's words (qmig
/// may add a clarification after them).
fn assert_same_answers(qemu_log: &Log, qmig_log: &Log) {
    let mut report = String::new();
    for ((what, q), (_, m)) in qemu_log.iter().zip(qmig_log) {
        let same = match (q, m) {
            (Ok(a), Ok(b)) => a == b,
            (Err((qc, qd)), Err((mc, md))) => qc == mc && md.starts_with(qd.as_str()),
            _ => false,
        };
        if !same {
            report.push_str(&format!("\n{what}: QEMU {q:?}, qmig vm {m:?}"));
        }
    }
    assert!(report.is_empty(), "qmig vm answers differently from QEMU 7.2:{report}");
}

fn u(x: &str) -> Option<Value> {
    Some(json!({ "uri": x }))
}

/// Three VMs: a source `s` (started here), a destination `d` (`-incoming defer`)
/// and a destination `e` started with `-incoming <e_uri>`. The same commands, in
/// the same states, on QEMU and on qmig vm: first up to a migration to `d`
/// cancelled in pre-switchover (after which `d`'s load has failed).
fn refusals_until_cancel(s: &mut Qmp, d: &mut Qmp, e: &mut Qmp, d_uri: &str, e_uri: &str, log: &mut Log) {
    log.push(("cont", attempt(s, "cont", None)));
    log.push(("capabilities at start", attempt(s, "query-migrate-capabilities", None)));
    log.push(("migrate-incoming on a source", attempt(s, "migrate-incoming", u(d_uri))));
    log.push(("migrate resume", attempt(s, "migrate", Some(json!({ "uri": d_uri, "resume": true })))));
    log.push(("migrate bogus uri", attempt(s, "migrate", u("bogus:x"))));
    log.push(("migrate no uri", attempt(s, "migrate", Some(json!({})))));
    log.push(("migrate uri not a string", attempt(s, "migrate", Some(json!({ "uri": 5 })))));
    log.push(("continue with none", attempt(s, "migrate-continue", Some(json!({ "state": "pre-switchover" })))));
    log.push(("continue bogus state", attempt(s, "migrate-continue", Some(json!({ "state": "bogus" })))));
    log.push(("start postcopy", attempt(s, "migrate-start-postcopy", None)));
    let nosuch = json!({ "capabilities": [{ "capability": "nosuch", "state": true }] });
    log.push(("unknown capability", attempt(s, "migrate-set-capabilities", Some(nosuch))));
    let badstate = json!({ "capabilities": [{ "capability": "events", "state": 1 }] });
    log.push(("capability state not a boolean", attempt(s, "migrate-set-capabilities", Some(badstate))));
    let dl = json!({ "downtime-limit": 3_000_000 });
    log.push(("downtime-limit out of range", attempt(s, "migrate-set-parameters", Some(dl))));
    log.push(("unknown parameter", attempt(s, "migrate-set-parameters", Some(json!({ "nosuch": 1 })))));
    let mct = json!({ "max-cpu-throttle": 5 });
    log.push(("max-cpu-throttle below initial", attempt(s, "migrate-set-parameters", Some(mct))));
    for (what, p) in [
        ("a uint8 parameter over 255", json!({ "cpu-throttle-initial": 300 })),
        ("a string for a size", json!({ "max-bandwidth": "x" })),
        ("a fraction for a uint64", json!({ "downtime-limit": 1.5 })),
        ("a negative downtime-limit (wraps, out of range)", json!({ "downtime-limit": -1 })),
        ("a number for a boolean", json!({ "cpu-throttle-tailslow": 1 })),
        ("throttle-trigger-threshold 0", json!({ "throttle-trigger-threshold": 0 })),
    ] {
        log.push((what, attempt(s, "migrate-set-parameters", Some(p))));
    }
    log.push(("query-status with an argument", attempt(s, "query-status", Some(json!({ "a": 1 })))));
    log.push(("unknown command", attempt(s, "nosuch", None)));
    log.push(("query-name without a name", attempt(s, "query-name", None)));
    log.push(("query-uuid without a UUID", attempt(s, "query-uuid", None)));
    log.push(("migrate from inmigrate", attempt(d, "migrate", u(d_uri))));
    log.push(("migrate-incoming after -incoming URI", attempt(e, "migrate-incoming", u(e_uri))));
    // `cont` while inmigrate: start the guest once loaded (autostart), `stop`: do not.
    log.push(("cont while inmigrate", attempt(e, "cont", None)));
    log.push(("stop while inmigrate", attempt(d, "stop", None)));
    log.push(("query-status while inmigrate", attempt(e, "query-status", None)));
    log.push(("migrate-incoming", attempt(d, "migrate-incoming", u(d_uri))));
    log.push(("migrate-incoming twice", attempt(d, "migrate-incoming", u(d_uri))));

    // A migration waiting in pre-switchover (source stopped), then cancelled.
    let caps = json!({ "capabilities": [
        { "capability": "pause-before-switchover", "state": true }, { "capability": "events", "state": true } ] });
    log.push(("set pause-before-switchover", attempt(s, "migrate-set-capabilities", Some(caps))));
    log.push(("capabilities as set", attempt(s, "query-migrate-capabilities", None)));
    log.push(("migrate", attempt(s, "migrate", u(d_uri))));
    poll_until(s, "pre-switchover", |st| st == "pre-switchover");
    log.push(("query-status in pre-switchover", attempt(s, "query-status", None)));
    log.push(("migrate while one runs", attempt(s, "migrate", u(e_uri))));
    let ev = json!({ "capabilities": [{ "capability": "events", "state": false }] });
    log.push(("capabilities while one runs", attempt(s, "migrate-set-capabilities", Some(ev))));
    log.push(("cont in finish-migrate", attempt(s, "cont", None)));
    log.push(("continue from the wrong state", attempt(s, "migrate-continue", Some(json!({ "state": "active" })))));
    log.push((
        "parameters while one runs",
        attempt(s, "migrate-set-parameters", Some(json!({ "max-bandwidth": 1u64 << 30 }))),
    ));
    let bw = attempt(s, "query-migrate-parameters", None).map(|p| p["max-bandwidth"].clone());
    log.push(("max-bandwidth as set while running", bw));
    log.push(("migrate_cancel", attempt(s, "migrate_cancel", None)));
    let end = poll_until(s, "cancelled", testkit::qemu::is_terminal_status);
    log.push(("status after cancel", Ok(json!(end.last().map(status_of)))));
    log.push(("query-status after cancel", attempt(s, "query-status", None)));
}

/// Then a migration to `e`, continued from pre-switchover, and what follows completion.
fn refusals_after_cancel(s: &mut Qmp, e: &mut Qmp, d_uri: &str, e_uri: &str, log: &mut Log) {
    log.push(("migrate to e", attempt(s, "migrate", u(e_uri))));
    poll_until(s, "pre-switchover", |st| st == "pre-switchover");
    log.push(("migrate-continue", attempt(s, "migrate-continue", Some(json!({ "state": "pre-switchover" })))));
    let end = poll_until(s, "completed", testkit::qemu::is_terminal_status);
    log.push(("status after continue", Ok(json!(end.last().map(status_of)))));
    log.push(("query-status after completion", attempt(s, "query-status", None)));
    log.push(("migrate from postmigrate", attempt(s, "migrate", u(d_uri))));
    poll_until(e, "destination e", |st| st == "completed" || st == "failed");
    log.push(("destination state", attempt(e, "query-status", None)));
    log.push(("migrate_cancel with none running", attempt(s, "migrate_cancel", None)));
    log.push(("cont after completion", attempt(s, "cont", None)));
    log.push(("query-status resumed", attempt(s, "query-status", None)));
}

/// The capabilities the engine implements; `qmig vm` refuses the rest of QEMU 7.2's.
const ENGINE_CAPABILITIES: &[&str] =
    &["xbzrle", "auto-converge", "events", "postcopy-ram", "return-path", "pause-before-switchover", "multifd"];

/// Every capability `query-migrate-capabilities` lists that the engine lacks is
/// refused when turned on (GenericError, naming it), accepted when turned off,
/// and still reported `false` afterwards.
fn refused_capabilities(q: &mut Qmp) {
    let listed = exec(q, "query-migrate-capabilities", None);
    let names: Vec<String> =
        listed.as_array().expect("a list").iter().filter_map(|c| c["capability"].as_str().map(String::from)).collect();
    assert_eq!(names.len(), 21, "QEMU 7.2 has 21 capabilities: {names:?}");
    let mut refused = 0;
    for name in names.iter().filter(|n| !ENGINE_CAPABILITIES.contains(&n.as_str())) {
        let on = json!({ "capabilities": [{ "capability": name, "state": true }] });
        match attempt(q, "migrate-set-capabilities", Some(on)) {
            Err((class, desc)) => {
                assert_eq!(class, "GenericError", "{name}: {desc}");
                assert!(desc.contains(name.as_str()) && desc.contains("not supported"), "{name}: {desc}");
                refused += 1;
            }
            Ok(v) => panic!("qmig vm accepted capability {name}: {v}"),
        }
        let off = json!({ "capabilities": [{ "capability": name, "state": false }] });
        exec(q, "migrate-set-capabilities", Some(off));
    }
    assert_eq!(refused, 21 - ENGINE_CAPABILITIES.len());
    let after = exec(q, "query-migrate-capabilities", None);
    for c in after.as_array().expect("a list") {
        if !ENGINE_CAPABILITIES.contains(&c["capability"].as_str().unwrap_or("")) {
            assert_eq!(c["state"], false, "{c}");
        }
    }
}

#[test]
fn qmp_refusals_match_qemu() {
    let Some(_) = qemu_or_skip("qmp_refusals_match_qemu") else { return };
    if !testkit::kvm_or_skip("qmp_refusals_match_qemu") {
        return;
    }
    let dir = TestDir::new("qmp-vm-refusals");
    let sock = |n: &str| format!("unix:{}", dir.join(n).display());

    let (d_uri, e_uri) = (sock("qd.sock"), sock("qe.sock"));
    let (mut s, mut d, mut e) =
        (qemu(&dir, "qs", None), qemu(&dir, "qd", Some("defer")), qemu(&dir, "qe", Some(&e_uri)));
    let mut qemu_log = Log::new();
    refusals_until_cancel(qmp_of(&mut s), qmp_of(&mut d), qmp_of(&mut e), &d_uri, &e_uri, &mut qemu_log);
    // The destination's load failed: the process ends with status 1.
    let code = d.wait_exit(T).ok().flatten().and_then(|s| s.code());
    qemu_log.push(("destination exit status after the cancel", Ok(json!(code))));
    refusals_after_cancel(qmp_of(&mut s), qmp_of(&mut e), &d_uri, &e_uri, &mut qemu_log);
    let qemu_events = sequence("QEMU", &qmp_of(&mut s).take_events());
    drop((s, d, e));

    let (d_uri, e_uri) = (sock("md.sock"), sock("me.sock"));
    let mut s = QmigVm::start(&dir, "ms", &[]);
    let mut d = QmigVm::start(&dir, "md", &["--incoming", "defer"]);
    let mut e = QmigVm::start(&dir, "me", &["--incoming", &e_uri]);
    let mut qmig_log = Log::new();
    refusals_until_cancel(s.qmp(), d.qmp(), e.qmp(), &d_uri, &e_uri, &mut qmig_log);
    let code = d.wait_exit().and_then(|s| s.code());
    qmig_log.push(("destination exit status after the cancel", Ok(json!(code))));
    refusals_after_cancel(s.qmp(), e.qmp(), &d_uri, &e_uri, &mut qmig_log);
    let qmig_events = sequence("qmig vm", &s.qmp().take_events());
    refused_capabilities(s.qmp());

    assert_eq!(qemu_log.len(), qmig_log.len());
    assert_same_answers(&qemu_log, &qmig_log);
    // The script refuses something in every state it visits.
    assert!(qmig_log.iter().filter(|(_, o)| o.is_err()).count() >= 20, "{qmig_log:?}");
    assert_eq!(qmig_log.iter().find(|(w, _)| w.starts_with("destination exit")).map(|x| &x.1), Some(&Ok(json!(1))));
    let e_state = qmig_log.iter().find(|(w, _)| *w == "destination state").map(|x| x.1.clone());
    assert_eq!(e_state.and_then(Result::ok).map(|v| v["status"].clone()), Some(json!("running")), "autostart");
    // The source's events over the whole script (events on from the first migration).
    // QEMU's cancel in pre-switchover races its own migration thread, which may
    // move on to `device` just before `cancelling`: that `device` is not compared.
    let raced = |v: Vec<String>| -> Vec<String> {
        let keep =
            |i: usize| !(v[i] == "MIGRATION:device" && v.get(i + 1).is_some_and(|n| n == "MIGRATION:cancelling"));
        (0..v.len()).filter(|&i| keep(i)).map(|i| v[i].clone()).collect()
    };
    let (qemu_events, qmig_events) = (raced(qemu_events), raced(qmig_events));
    assert_eq!(qemu_events, qmig_events, "source events (QEMU left, qmig vm right)");
    println!("source events: {qmig_events:?}");
}

#[test]
fn qmig_vm_refuses_a_qmp_address_that_is_not_a_unix_socket() {
    let dir = TestDir::new("qmp-vm-usage");
    let r = common::run_qmig(&dir, &["vm", "--qmp", "tcp:127.0.0.1:4444"], Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("--qmp tcp:127.0.0.1:4444: expected unix:PATH"), "{}", r.stderr);
}

#[test]
fn qmig_vm_with_an_unusable_incoming_uri_says_so() {
    if !testkit::kvm_or_skip("qmig_vm_with_an_unusable_incoming_uri_says_so") {
        return;
    }
    let dir = TestDir::new("qmp-vm-bad-incoming");
    let sock = format!("unix:{}", dir.join("q.sock").display());
    let args = ["vm", "--qmp", &sock, "--ram-size", "64M", "--slots", "1", "--incoming", "bogus:x"];
    let r = common::run_qmig(&dir, &args, Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("-incoming bogus:x: Parameter 'uri' expects a valid migration protocol"), "{}", r.stderr);
    assert!(!dir.join("q.sock").exists(), "the QMP socket is removed");
}

#[test]
fn qmp_postcopy_of_qemu_and_qmig_vm_agree() {
    let Some(_) = qemu_or_skip("qmp_postcopy_of_qemu_and_qmig_vm_agree") else { return };
    if !testkit::kvm_or_skip("qmp_postcopy_of_qemu_and_qmig_vm_agree") {
        return;
    }
    let dir = TestDir::new("qmp-vm-postcopy");
    // Destination RAM on tmpfs (TestDir is on /dev/shm), as QEMU's postcopy needs.
    let (mut qs, mut qd) = (qemu(&dir, "qemu-src", None), qemu(&dir, "qemu-dst", Some("defer")));
    let uri = format!("unix:{}", dir.join("qemu-mig.sock").display());
    let q = drive_migration(qmp_of(&mut qs), qmp_of(&mut qd), &uri, 8 << 20, true, &mut |_, _| {});
    drop((qs, qd));

    let (mut ms, mut md) =
        (QmigVm::start(&dir, "vm-src", &[]), QmigVm::start(&dir, "vm-dst", &["--incoming", "defer"]));
    let uri = format!("unix:{}", dir.join("vm-mig.sock").display());
    let mut stopped_at = u64::MAX;
    let m = drive_migration(ms.qmp(), md.qmp(), &uri, 8 << 20, true, &mut |src, _| {
        stopped_at = guest(src)["counter"].as_u64().unwrap_or(u64::MAX);
    });
    let t0 = Instant::now();
    let after = loop {
        let g = guest(md.qmp());
        if g["counter"].as_u64().is_some_and(|c| c > stopped_at + 1000) || t0.elapsed() > T {
            break g;
        }
        std::thread::sleep(POLL);
    };
    assert!(after["counter"].as_u64().unwrap_or(0) > stopped_at, "counter {stopped_at} -> {after}");
    assert_eq!(after["checksum_ok"], true, "{after}");

    for (side, a, b) in [("source", &q.src_events, &m.src_events), ("destination", &q.dst_events, &m.dst_events)] {
        let (qa, mb) = (sequence("QEMU", a), sequence("qmig vm", b));
        assert!(qa.iter().any(|e| e == "MIGRATION:postcopy-active"), "{side}: QEMU went through postcopy: {qa:?}");
        assert_eq!(qa, mb, "{side} events (QEMU left, qmig vm right)");
    }
    compare_schemas("source", &q.src_replies, &m.src_replies, &["completed"]);
    compare_schemas("destination", &q.dst_replies, &m.dst_replies, &["completed"]);
    assert_eq!(q.states_after, m.states_after, "run states once completed (source, destination)");
}

/// Open descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// `getfd`/`closefd` and `fd:NAME`, the same client and script on a source `s`
/// (pid `s_pid`) and a destination `d` (`-incoming defer`): refusals, a name
/// replaced (the process holds one descriptor for it, not two), and a migration
/// over a socketpair passed to both ends with `getfd`. Returns every outcome.
fn getfd_script(s: &mut Qmp, s_pid: u32, d: &mut Qmp) -> Log {
    use std::os::fd::AsFd;
    let mut log = Log::new();
    let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
    let name = |n: &str| Some(json!({ "fdname": n }));
    log.push(("getfd without a descriptor", attempt(s, "getfd", name("x"))));
    let digit = s.execute_with_fd("getfd", name("1x"), devnull.as_fd());
    log.push(("getfd with a name starting with a digit", digit.map_err(command_err)));
    log.push(("closefd of an unknown name", attempt(s, "closefd", name("nosuch"))));
    log.push(("migrate to an unknown fd name", attempt(s, "migrate", u("fd:nosuch"))));
    log.push(("status after that", Ok(json!(status_of(&exec(s, "query-migrate", None))))));
    log.push(("migrate-incoming from an unknown fd name", attempt(d, "migrate-incoming", u("fd:nosuch"))));
    let before = fd_count(s_pid);
    log.push(("getfd", s.execute_with_fd("getfd", name("dn"), devnull.as_fd()).map_err(command_err)));
    log.push(("getfd the same name", s.execute_with_fd("getfd", name("dn"), devnull.as_fd()).map_err(command_err)));
    log.push(("descriptors held for one name", Ok(json!(fd_count(s_pid) - before))));
    log.push(("closefd", attempt(s, "closefd", name("dn"))));
    log.push(("descriptors after closefd", Ok(json!(fd_count(s_pid) - before))));
    log.push(("closefd twice", attempt(s, "closefd", name("dn"))));

    // A migration over a socketpair, each end passed with getfd.
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    for q in [&mut *s, &mut *d] {
        q.set_capabilities(&[("events", true)]).expect("capabilities");
    }
    log.push(("getfd destination end", d.execute_with_fd("getfd", name("mig"), b.as_fd()).map_err(command_err)));
    log.push(("getfd source end", s.execute_with_fd("getfd", name("mig"), a.as_fd()).map_err(command_err)));
    drop((a, b));
    log.push(("migrate-incoming fd:mig", attempt(d, "migrate-incoming", u("fd:mig"))));
    log.push(("migrate fd:mig", attempt(s, "migrate", u("fd:mig"))));
    let end = poll_until(s, "fd: migration", testkit::qemu::is_terminal_status);
    log.push(("source status", Ok(json!(end.last().map(status_of)))));
    let end = poll_until(d, "fd: destination", |st| st == "completed" || st == "failed");
    log.push(("destination status", Ok(json!(end.last().map(status_of)))));
    log.push(("the name is used up", attempt(s, "closefd", name("mig"))));
    log
}

fn command_err(e: QemuError) -> (String, String) {
    match e {
        QemuError::Command { class, desc, .. } => (class, desc),
        e => panic!("QMP: {e}"),
    }
}

#[test]
fn qmp_getfd_and_fd_migration_match_qemu() {
    let Some(_) = qemu_or_skip("qmp_getfd_and_fd_migration_match_qemu") else { return };
    if !testkit::kvm_or_skip("qmp_getfd_and_fd_migration_match_qemu") {
        return;
    }
    let dir = TestDir::new("qmp-vm-getfd");
    let (mut s, mut d) = (qemu(&dir, "qs", None), qemu(&dir, "qd", Some("defer")));
    let pid = s.pid();
    let qemu_log = getfd_script(qmp_of(&mut s), pid, qmp_of(&mut d));
    drop((s, d));
    let mut s = QmigVm::start(&dir, "ms", &[]);
    let mut d = QmigVm::start(&dir, "md", &["--incoming", "defer"]);
    let pid = s.child.id();
    let qmig_log = getfd_script(s.qmp(), pid, d.qmp());
    println!("QEMU:    {qemu_log:?}\nqmig vm: {qmig_log:?}");
    assert_same_answers(&qemu_log, &qmig_log);
    let get = |w: &str| qmig_log.iter().find(|(x, _)| *x == w).map(|x| x.1.clone());
    assert_eq!(get("descriptors held for one name"), Some(Ok(json!(1))));
    assert_eq!(get("descriptors after closefd"), Some(Ok(json!(0))));
    assert_eq!(get("source status"), Some(Ok(json!("completed"))));
    assert_eq!(get("destination status"), Some(Ok(json!("completed"))));
    let g = exec(d.qmp(), "x-qmig-query-guest", None);
    assert!(g.to_string().contains("checksum_ok"), "{g}");
}

/// A `qmig vm` -> `qmig vm` postcopy migration held in `postcopy-active` (1 MiB/s
/// for 64 MiB of RAM), then the `victim` side SIGKILLed; returns the survivor's
/// first `query-migrate` reply that is no longer active, how long after the kill
/// it came, and the survivor's run state then.
fn postcopy_then_kill(dir: &TestDir, tag: &str, kill_source: bool) -> (Value, Duration, String) {
    let mut s = QmigVm::start(dir, &format!("{tag}-src"), &[]);
    let mut d = QmigVm::start(dir, &format!("{tag}-dst"), &["--incoming", "defer"]);
    let uri = format!("unix:{}", dir.join(&format!("{tag}.sock")).display());
    for q in [s.qmp(), d.qmp()] {
        q.set_capabilities(&[("events", true), ("postcopy-ram", true)]).expect("capabilities");
    }
    let slow = json!({ "max-bandwidth": 1u64 << 20, "max-postcopy-bandwidth": 1u64 << 20 });
    exec(s.qmp(), "migrate-set-parameters", Some(slow));
    exec(s.qmp(), "cont", None);
    exec(d.qmp(), "migrate-incoming", u(&uri));
    exec(s.qmp(), "migrate", u(&uri));
    exec(s.qmp(), "migrate-start-postcopy", None);
    poll_until(s.qmp(), "source postcopy", |st| st == "postcopy-active" || testkit::qemu::is_terminal_status(st));
    poll_until(d.qmp(), "destination postcopy", |st| st == "postcopy-active" || st == "failed");
    assert_eq!(status_of(&exec(s.qmp(), "query-migrate", None)), "postcopy-active");
    let (victim, survivor) = if kill_source { (&mut s, &mut d) } else { (&mut d, &mut s) };
    victim.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = victim.child.wait();
    let survivor_name = if kill_source { format!("{tag}-dst") } else { format!("{tag}-src") };
    // A destination whose load failed ends (status 1, as QEMU's does): then its exit
    // and its last stderr line are the answer (also when it exits between the
    // `failed` reply and the `query-status` after it).
    let exited = |survivor: &mut QmigVm, e: String| {
        let code = survivor.wait_exit().and_then(|s| s.code());
        let took = killed.elapsed();
        let err = std::fs::read_to_string(dir.join(&format!("{survivor_name}.stderr"))).unwrap_or_default();
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        (json!({ "exit-code": code, "stderr": last, "qmp": e }), took, "exited".to_string())
    };
    let end = loop {
        let r = match survivor.qmp().execute("query-migrate", None) {
            Ok(r) => r,
            Err(e) => return exited(survivor, e.to_string()),
        };
        if !matches!(status_of(&r), "postcopy-active" | "active" | "device") {
            break r;
        }
        assert!(killed.elapsed() < T, "still {r} {T:?} after the kill");
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = killed.elapsed();
    match survivor.qmp().query_status() {
        Ok(state) => (end, took, state),
        Err(e) => exited(survivor, e.to_string()),
    }
}

/// Issue 10 test 6 on the KVM path (`qmig vm`, the guest running on KVM and
/// faulting its pages in on the destination): either side SIGKILLed in postcopy,
/// the survivor reaches `failed` promptly with a clear reason. The source's guest
/// cannot resume (its newest pages are on the dead destination): it stays stopped
/// and says so. (QEMU 7.2 goes to `postcopy-paused` for a later `migrate
/// -resume`; qmig has no postcopy recovery and fails.)
#[test]
fn qmig_vm_sigkilled_in_postcopy_fails_the_other_side_promptly() {
    if !testkit::kvm_or_skip("qmig_vm_sigkilled_in_postcopy_fails_the_other_side_promptly") {
        return;
    }
    let dir = TestDir::new("qmp-vm-postcopy-kill");
    let (end, took, state) = postcopy_then_kill(&dir, "kd", false);
    println!("destination killed: source {end} after {took:?}, run state {state}");
    assert_eq!(status_of(&end), "failed", "{end}");
    let why = end["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("postcopy") && why.contains("stays stopped"), "{end}");
    assert_ne!(state, "running", "the source's guest must not run on without its newest pages");
    assert!(took < Duration::from_secs(5), "the source took {took:?} to fail");

    let (end, took, state) = postcopy_then_kill(&dir, "ks", true);
    println!("source killed: destination {end} after {took:?}, run state {state}");
    // The destination either reports `failed` over QMP or ends with status 1 saying why.
    if state == "exited" {
        assert_eq!(end["exit-code"], 1, "{end}");
        assert!(end["stderr"].as_str().is_some_and(|l| l.contains("postcopy")), "{end}");
    } else {
        assert_eq!(status_of(&end), "failed", "{end}");
    }
    assert!(took < Duration::from_secs(5), "the destination took {took:?} to fail");
}

/// `attempt`'s error description, or a panic naming what was accepted.
fn refused(q: &mut Qmp, cmd: &str, args: Value) -> String {
    match attempt(q, cmd, Some(args.clone())) {
        Err((class, desc)) => {
            assert_eq!(class, "GenericError", "{cmd} {args}: {desc}");
            desc
        }
        Ok(v) => panic!("{cmd} {args} was accepted: {v}"),
    }
}

/// Issue 12's multifd on `qmig vm`: capability `multifd` and the `multifd-*`
/// parameters over QMP (QEMU 7.2's names, types, ranges and refusals), a
/// non-socket URI failing the migration as 7.2 does, then `qmig vm` -> `qmig vm`
/// over 2 channels with zstd: completed on both, `ram.multifd-bytes` counted on the
/// source, the guest going on on the destination with its checksum intact.
/// (`migrate-incoming` with multifd: `tests/agent_core.rs`, through the agents.)
#[test]
fn qmp_multifd_qmig_vm_to_qmig_vm() {
    if !testkit::kvm_or_skip("qmp_multifd_qmig_vm_to_qmig_vm") {
        return;
    }
    let dir = TestDir::new("qmp-vm-multifd");
    // The destination listens from the start (`--incoming URI`): the capability and
    // parameters set below are read when the source connects, as QEMU 7.2 reads them.
    let uri = format!("unix:{}", dir.join("vm-mig.sock").display());
    let (mut ms, mut md) = (QmigVm::start(&dir, "vm-src", &[]), QmigVm::start(&dir, "vm-dst", &["--incoming", &uri]));
    let (s, d) = (ms.qmp.as_mut().expect("source QMP"), md.qmp.as_mut().expect("destination QMP"));

    // The parameters: QEMU 7.2's defaults, names and types; out-of-range values refused in its words.
    let p = exec(s, "query-migrate-parameters", None);
    assert_eq!(
        (&p["multifd-channels"], &p["multifd-compression"], &p["multifd-zlib-level"], &p["multifd-zstd-level"]),
        (&json!(2), &json!("none"), &json!(1), &json!(1)),
        "{p}"
    );
    let mp = "migrate-set-parameters";
    assert_eq!(
        refused(s, mp, json!({"multifd-channels": 0})),
        "Parameter 'multifd_channels' expects a value between 1 and 255"
    );
    assert_eq!(refused(s, mp, json!({"multifd-channels": 256})), "Parameter 'multifd-channels' expects uint8_t");
    assert_eq!(
        refused(s, mp, json!({"multifd-zstd-level": 21})),
        "Parameter 'multifd_zstd_level' expects a value between 0 and 20"
    );
    assert_eq!(
        refused(s, mp, json!({"multifd-zlib-level": 10})),
        "Parameter 'multifd_zlib_level' expects a value between 0 and 9"
    );
    assert_eq!(
        refused(s, mp, json!({"multifd-compression": "lz4"})),
        "Parameter 'multifd-compression' does not accept value 'lz4'"
    );
    // Postcopy and multifd refuse each other, either way round.
    let both = json!({"capabilities": [{"capability": "multifd", "state": true}, {"capability": "postcopy-ram", "state": true}]});
    assert_eq!(refused(s, "migrate-set-capabilities", both), "Postcopy is not yet compatible with multifd");

    for q in [&mut *s, &mut *d] {
        q.set_capabilities(&[("events", true), ("multifd", true)]).expect("capabilities");
        exec(q, mp, Some(json!({"multifd-channels": 2, "multifd-compression": "zstd", "multifd-zstd-level": 3})));
        let caps = exec(q, "query-migrate-capabilities", None);
        assert!(
            caps.as_array().is_some_and(|l| l.contains(&json!({"capability": "multifd", "state": true}))),
            "{caps}"
        );
        let p = exec(q, "query-migrate-parameters", None);
        assert_eq!((&p["multifd-compression"], &p["multifd-zstd-level"]), (&json!("zstd"), &json!(3)), "{p}");
    }
    let on = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
    assert_eq!(refused(s, "migrate-set-capabilities", on), "Postcopy is not yet compatible with multifd");

    // multifd needs tcp: or unix:: as QEMU 7.2, `migrate` returns and the migration fails at once.
    exec(s, "cont", None);
    exec(s, "migrate", Some(json!({"uri": format!("exec:cat > {}", dir.join("nowhere").display())})));
    let r = poll_until(s, "multifd to exec:", |st| st == "failed");
    let last = r.last().cloned().unwrap_or_default();
    assert!(
        last["error-desc"].as_str().is_some_and(|e| e.contains("multifd is not supported by current protocol")),
        "{last}"
    );
    assert_eq!(run_state(s), "running");

    // qmig vm -> qmig vm over multifd, live (8 MiB/s: the migration runs a while).
    exec(s, mp, Some(json!({"max-bandwidth": 8 << 20})));
    exec(s, "migrate", Some(json!({"uri": uri})));
    // While it runs: capabilities are refused, parameters taken (for the next migration:
    // this one keeps its 2 channels, which the destination expects).
    let during = poll_until(s, "multifd source active", |st| st == "active" || testkit::qemu::is_terminal_status(st));
    let during = during.last().cloned().unwrap_or_default();
    assert_eq!(status_of(&during), "active", "the migration runs a while at 8 MiB/s: {during}");
    assert_eq!(
        refused(s, "migrate-set-capabilities", json!({"capabilities": [{"capability": "multifd", "state": false}]})),
        "There's a migration process in progress"
    );
    exec(s, mp, Some(json!({"multifd-channels": 3})));
    let src = poll_until(s, "multifd source", testkit::qemu::is_terminal_status);
    let last = src.last().cloned().unwrap_or_default();
    assert_eq!(status_of(&last), "completed", "{last}");
    let mf = last["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    assert!(mf > 1 << 20, "ram.multifd-bytes {mf}: the pages went over the channels ({last})");
    assert!(
        src.iter().filter(|r| status_of(r) == "active").all(|r| r["ram"]["multifd-bytes"].is_u64()),
        "multifd-bytes is shown while active"
    );
    let dst = poll_until(d, "multifd destination", |st| st == "completed" || st == "failed");
    assert_eq!(dst.last().map(|r| status_of(r).to_string()), Some("completed".into()), "{dst:?}");
    let stopped_at = guest(s)["counter"].as_u64().unwrap_or(u64::MAX);
    exec(d, "cont", None);
    let t0 = Instant::now();
    let after = loop {
        let g = guest(d);
        if g["counter"].as_u64().is_some_and(|c| c > stopped_at + 1000) || t0.elapsed() > T {
            break g;
        }
        std::thread::sleep(POLL);
    };
    assert!(after["counter"].as_u64().unwrap_or(0) > stopped_at, "counter {stopped_at} -> {after}");
    assert_eq!(after["checksum_ok"], true, "{after}");
    println!("multifd qmig vm -> qmig vm: multifd-bytes {mf}, counter {stopped_at} -> {}", after["counter"]);
}
