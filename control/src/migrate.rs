//! libvirt's version 3 migration protocol, driven from one place
//! (virDomainMigrateVersion3Full): Begin3 on the source, Prepare3 on the
//! destination, Perform3 on the source, Finish3 on the destination, Confirm3 on
//! the source, each phase's cookie handed to the next.
//!
//! [`run_v3`] talks to two [`Peer`]s: in the `--direct` shape both are agents the
//! client is connected to; in the `--p2p` shape the source agent runs it with
//! itself as the source peer. A failure ends the sequence as libvirt's does: a
//! failed Prepare is followed by Confirm3 (cancelled) on the source, a failed
//! Perform by Finish3 (cancelled) and Confirm3 (cancelled), a failed Finish by
//! Confirm3 (cancelled); so exactly one VM runs at the end.

use crate::rpc::{Client, RpcError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Mutex;

/// How the migration stream travels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// VM to VM over its own TCP connection (the URI Prepare returns).
    #[default]
    Direct,
    /// Through the agents' connection (`--tunnelled`).
    Tunnelled,
}

/// The options of one migration (`qmig migrate`'s flags, virsh's meanings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrateFlags {
    /// `--live`: the source runs during the migration (else it is paused first).
    pub live: bool,
    /// `--postcopy`: capability `postcopy-ram`, and `migrate-start-postcopy` after the first pass.
    pub postcopy: bool,
    /// `--parallel N`: capability `multifd` with `multifd-channels` N.
    pub parallel: Option<u8>,
    /// `--compressed`: multifd with `multifd-compression` `zstd`.
    pub compressed: bool,
    /// `--bandwidth`: `max-bandwidth` in MiB/s.
    pub bandwidth: Option<u64>,
    /// `--postcopy-bandwidth` (virsh's): `max-postcopy-bandwidth` in MiB/s.
    pub postcopy_bandwidth: Option<u64>,
    /// The stream's path.
    pub transport: Transport,
    /// `--p2p`: the source agent drives the destination agent.
    pub p2p: bool,
    /// The destination stays paused (set when the source VM was not running, as virsh does).
    pub paused: bool,
}

impl MigrateFlags {
    /// Whether capability `multifd` is on.
    pub fn multifd(&self) -> bool {
        self.parallel.is_some() || self.compressed
    }

    /// The capabilities both VMs get (`events` always, for the agents' event log).
    pub fn capabilities(&self) -> Value {
        let caps: Vec<Value> = [("events", true), ("postcopy-ram", self.postcopy), ("multifd", self.multifd())]
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        json!({ "capabilities": caps })
    }

    /// The parameters both VMs get (`max-bandwidth` matters on the source only).
    pub fn parameters(&self) -> Value {
        let mut p = Map::new();
        if let Some(n) = self.parallel {
            p.insert("multifd-channels".into(), n.into());
        }
        if self.compressed {
            p.insert("multifd-compression".into(), "zstd".into());
        }
        if let Some(mib) = self.bandwidth {
            p.insert("max-bandwidth".into(), mib.saturating_mul(1 << 20).into());
        }
        if let Some(mib) = self.postcopy_bandwidth {
            p.insert("max-postcopy-bandwidth".into(), mib.saturating_mul(1 << 20).into());
        }
        Value::Object(p)
    }
}

/// The `mem-path`s of the `memory-backend-file` objects in QEMU arguments.
pub fn memory_backend_paths(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("memory-backend-file"))
        .flat_map(|a| a.split(',').filter_map(|kv| kv.strip_prefix("mem-path=")).map(String::from))
        .collect()
}

/// Refuses, before anything starts, an option the source VM cannot do: a
/// capability or parameter it does not offer (`caps`: its
/// `query-migrate-capabilities`, `params`: its `query-migrate-parameters`),
/// postcopy with multifd (QEMU 7.2 refuses the pair), and postcopy for a QEMU
/// whose RAM is a file userfaultfd cannot serve (`ram_files`: not tmpfs or hugetlbfs).
pub fn check_supported(
    vm: &str,
    flags: &MigrateFlags,
    caps: &Value,
    params: &Value,
    ram_files: &[String],
) -> Result<(), RpcError> {
    let unsupported =
        |what: &str| RpcError::new(crate::rpc::ErrorClass::ArgumentUnsupported, format!("VM {vm}: {what}"));
    let offered = |name: &str| {
        caps.as_array().is_some_and(|l| l.iter().any(|c| c.get("capability").and_then(Value::as_str) == Some(name)))
    };
    if flags.parallel == Some(0) {
        return Err(RpcError::invalid("--parallel needs at least 1 channel"));
    }
    if flags.multifd() && !offered("multifd") {
        return Err(unsupported("cannot do --parallel/--compressed: it offers no capability multifd"));
    }
    if flags.compressed && params.get("multifd-compression").is_none() {
        return Err(unsupported("cannot do --compressed: it has no parameter multifd-compression"));
    }
    if flags.postcopy {
        if !offered("postcopy-ram") {
            return Err(unsupported("cannot do --postcopy: it offers no capability postcopy-ram"));
        }
        if flags.multifd() {
            return Err(unsupported(
                "cannot do --postcopy with --parallel/--compressed: Postcopy is not yet compatible with multifd",
            ));
        }
        for f in ram_files {
            use nix::sys::statfs::{statfs, HUGETLBFS_MAGIC, TMPFS_MAGIC};
            match statfs(Path::new(f)).map(|s| s.filesystem_type()) {
                Ok(t) if t == TMPFS_MAGIC || t == HUGETLBFS_MAGIC => {}
                Ok(_) => {
                    return Err(unsupported(&format!(
                        "cannot do --postcopy: its RAM file {f} is on a filesystem userfaultfd cannot serve (only tmpfs and hugetlbfs)"
                    )))
                }
                Err(e) => return Err(unsupported(&format!("cannot do --postcopy: RAM file {f}: {e}"))),
            }
        }
    }
    Ok(())
}

/// One side of the protocol: an agent that runs calls.
pub trait Peer {
    /// Runs `call` with `args` on this side.
    fn call(&self, call: &str, args: Value) -> Result<Value, RpcError>;
}

impl Peer for Mutex<Client> {
    fn call(&self, call: &str, args: Value) -> Result<Value, RpcError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).call(call, args)
    }
}

/// A failed migration: the phase (`begin3`, `prepare3`, `perform3`, `finish3`, `confirm3`) and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{phase} failed: {error}")]
pub struct PhaseError {
    /// The phase that failed.
    pub phase: String,
    /// Its error.
    pub error: RpcError,
}

fn at(phase: &str) -> impl FnOnce(RpcError) -> PhaseError + '_ {
    move |error| PhaseError { phase: phase.to_string(), error }
}

/// Runs the v3 protocol for VM `name` from `src` to `dst`; `phase` is told each phase as it
/// starts. Returns the summary: `status`, `vm`, `phases`, `source` and `destination` with
/// their `statistics` and `events` (from the Perform and Finish cookies).
pub fn run_v3(
    src: &dyn Peer,
    dst: &dyn Peer,
    name: &str,
    flags: &MigrateFlags,
    peer: Option<&str>,
    phase: &mut dyn FnMut(&str),
) -> Result<Value, PhaseError> {
    let mut done: Vec<&str> = vec![];
    phase("begin3");
    let begin = src.call("begin3", json!({ "name": name, "flags": flags, "peer": peer })).map_err(at("begin3"))?;
    done.push("begin3");
    // As virDomainMigrateVersion3Full: a paused source stays paused on the destination.
    let mut flags = flags.clone();
    if begin["cookie"]["running"] == json!(false) {
        flags.paused = true;
    }
    phase("prepare3");
    let prep =
        dst.call("prepare3", json!({ "description": begin["description"], "cookie": begin["cookie"], "flags": flags }));
    let prep = match prep {
        Ok(p) => p,
        Err(e) => {
            phase("confirm3");
            let _ = src.call("confirm3", json!({ "name": name, "cookie": null, "cancelled": true }));
            return Err(at("prepare3")(e));
        }
    };
    done.push("prepare3");
    phase("perform3");
    let perf =
        src.call("perform3", json!({ "name": name, "uri": prep["uri"], "cookie": prep["cookie"], "flags": flags }));
    let perform_err = perf.as_ref().err().cloned();
    if perform_err.is_none() {
        done.push("perform3");
    }
    phase("finish3");
    let cookie = perf.as_ref().map(|p| p["cookie"].clone()).unwrap_or(Value::Null);
    let fin = dst.call("finish3", json!({ "name": name, "cookie": cookie, "cancelled": perform_err.is_some() }));
    let finish_err = if perform_err.is_none() { fin.as_ref().err().cloned() } else { None };
    let cancelled = perform_err.is_some() || finish_err.is_some();
    if !cancelled {
        done.push("finish3");
    }
    phase("confirm3");
    let fin_cookie = fin.as_ref().map(|f| f["cookie"].clone()).unwrap_or(Value::Null);
    let conf = src.call("confirm3", json!({ "name": name, "cookie": fin_cookie, "cancelled": cancelled }));
    if let Some(e) = perform_err {
        return Err(at("perform3")(e));
    }
    if let Some(e) = finish_err {
        return Err(at("finish3")(e));
    }
    let conf = conf.map_err(at("confirm3"))?;
    done.push("confirm3");
    let side = |c: &Value| json!({ "hostname": c["hostname"], "statistics": c["statistics"], "events": c["events"] });
    let mut perf = perf.unwrap_or(Value::Null);
    // After a postcopy switch Perform's cookie is from the switch; Confirm has the end.
    if conf["statistics"].is_object() {
        perf["cookie"]["statistics"] = conf["statistics"].clone();
    }
    if let (Some(more), Some(events)) = (conf["events"].as_array(), perf["cookie"]["events"].as_array_mut()) {
        events.extend(more.iter().cloned());
    }
    Ok(json!({
        "status": "completed",
        "vm": name,
        "phases": done,
        "source": side(&perf["cookie"]),
        "destination": side(&fin_cookie),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A peer that records its calls and fails the one named `fail`.
    struct Fake {
        calls: RefCell<Vec<String>>,
        fail: &'static str,
    }

    impl Peer for Fake {
        fn call(&self, call: &str, args: Value) -> Result<Value, RpcError> {
            let cancelled = args["cancelled"].as_bool().map(|c| format!("({c})")).unwrap_or_default();
            self.calls.borrow_mut().push(format!("{call}{cancelled}"));
            if call == self.fail {
                return Err(RpcError::failed("boom"));
            }
            Ok(json!({ "cookie": { "running": true }, "uri": "tcp:x:1", "description": {} }))
        }
    }

    fn run(fail: &'static str) -> (Result<Value, PhaseError>, Vec<String>, Vec<String>) {
        let s = Fake { calls: RefCell::new(vec![]), fail };
        let d = Fake { calls: RefCell::new(vec![]), fail };
        let r = run_v3(&s, &d, "g", &MigrateFlags::default(), None, &mut |_| {});
        (r, s.calls.into_inner(), d.calls.into_inner())
    }

    #[test]
    fn phase_order_and_failure_paths() {
        let (r, s, d) = run("none");
        assert_eq!(r.expect("ok")["phases"], json!(["begin3", "prepare3", "perform3", "finish3", "confirm3"]));
        assert_eq!(s, ["begin3", "perform3", "confirm3(false)"]);
        assert_eq!(d, ["prepare3", "finish3(false)"]);
        let (r, s, d) = run("prepare3");
        assert_eq!(r.expect_err("fails").to_string(), "prepare3 failed: boom");
        assert_eq!((s, d), (vec!["begin3".to_string(), "confirm3(true)".into()], vec!["prepare3".to_string()]));
        let (r, s, d) = run("perform3");
        assert_eq!(r.expect_err("fails").phase, "perform3");
        assert_eq!(s, ["begin3", "perform3", "confirm3(true)"]);
        assert_eq!(d, ["prepare3", "finish3(true)"]);
        let (r, s, _) = run("finish3");
        assert_eq!(r.expect_err("fails").phase, "finish3");
        assert_eq!(s, ["begin3", "perform3", "confirm3(true)"]);
        let (r, _, d) = run("begin3");
        assert_eq!(r.expect_err("fails").phase, "begin3");
        assert!(d.is_empty());
    }

    #[test]
    fn refusals() {
        let caps = json!([{"capability": "multifd", "state": false}, {"capability": "postcopy-ram", "state": false}]);
        let p = json!({"multifd-compression": "none"});
        let ok = |f: &MigrateFlags| check_supported("g", f, &caps, &p, &[]);
        assert!(ok(&MigrateFlags { postcopy: true, ..Default::default() }).is_ok());
        assert!(ok(&MigrateFlags { compressed: true, parallel: Some(4), ..Default::default() }).is_ok());
        assert!(ok(&MigrateFlags { postcopy: true, parallel: Some(2), ..Default::default() }).is_err());
        assert!(ok(&MigrateFlags { parallel: Some(0), ..Default::default() }).is_err());
        let none = json!([]);
        let e = check_supported("g", &MigrateFlags { postcopy: true, ..Default::default() }, &none, &p, &[]);
        assert!(e.expect_err("no cap").desc.contains("postcopy-ram"));
        // `qmig vm` migrates over multifd channels as QEMU does: refused only when it lacks the capability or parameter.
        let par = MigrateFlags { parallel: Some(2), compressed: true, ..Default::default() };
        assert!(check_supported("g", &par, &caps, &p, &[]).is_ok());
        let e = check_supported("g", &par, &none, &p, &[]).expect_err("no multifd");
        assert!(e.desc.contains("capability multifd"), "{}", e.desc);
        let e = check_supported("g", &par, &caps, &json!({}), &[]).expect_err("no multifd-compression");
        assert!(e.desc.contains("multifd-compression"), "{}", e.desc);
        let pp = MigrateFlags { postcopy: true, parallel: Some(2), ..Default::default() };
        let e = check_supported("g", &pp, &caps, &p, &[]).expect_err("postcopy+multifd");
        assert!(e.desc.contains("Postcopy is not yet compatible with multifd"), "{}", e.desc);
        let f = MigrateFlags { bandwidth: Some(2), compressed: true, parallel: Some(3), ..Default::default() };
        assert_eq!(
            f.parameters(),
            json!({"multifd-channels": 3, "multifd-compression": "zstd", "max-bandwidth": 2 << 20})
        );
        assert_eq!(
            memory_backend_paths(&["memory-backend-file,id=m,size=1M,mem-path=/a/b,share=on".into(), "x".into()]),
            ["/a/b"]
        );
    }
}
