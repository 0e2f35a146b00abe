//! Recovery after an agent restart, as libvirt's QEMU driver does it
//! (`qemuProcessRecoverMigrationIn/Out`): a pure decision from what the agent
//! recorded (its side and the job's last phase) and what it sees now (the VM's
//! run state and `query-migrate` status, and whether the other side took over) to
//! one action. The rule: exactly one running copy of the VM. A source that never
//! reached Confirm3 resumes its VM unless the destination took over; a destination
//! that never reached Finish3 kills its incoming VM.
//!
//! Where libvirt cannot know whether the destination took over (the source in
//! `perform3_done`), it leaves the VM paused for a third party; the agent knows the
//! destination agent's address (the job's `peer`) and asks it ([`PeerState`]), and
//! only when it cannot be reached does it leave the VM paused as libvirt does.
//! The table is in `docs/control-plane.md`, "Recovery after a restart".

use crate::agent::Agent;
use crate::rpc::{Client, ErrorClass, RpcError};
use crate::state::{Job, Phase, Role, StateDir};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long recovery waits to reach the other agent.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the other side of the migration says now (asked by the source at recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// The destination finished (Finish3 succeeded): its VM is the one that runs.
    TookOver,
    /// The destination's job ended without taking over (cancelled, failed, or its VM is gone).
    NotTakenOver,
    /// The destination's job is still open (in Prepare or Finish3, e.g. its driver died):
    /// it did not take over yet and has to be told to give up (Finish3, cancelled).
    Waiting,
    /// The destination could not be asked (no address recorded, unreachable).
    Unknown,
}

/// What the VM looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The VM's process is alive.
    pub alive: bool,
    /// `query-status`'s `status` (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub run_state: String,
    /// `query-migrate`'s `status` (`none` when it has none).
    pub migration: String,
}

/// The recovery action for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Nothing to do to the VM (it is gone, or it is as it should be); the job ends.
    Nothing,
    /// Source: `migrate_cancel` if a migration still runs, tell a waiting destination to
    /// give up (Finish3 cancelled), and `cont` the VM if it ran at Begin3.
    ResumeSource,
    /// Source: the destination took over; stop (quit/kill) the source VM and forget it.
    KillSource,
    /// Destination: kill the incoming VM and forget it.
    KillIncoming,
    /// Leave the VM paused for a third party (the destination's fate is unknown, or a
    /// postcopy migration left neither side whole); the job ends with that error.
    LeavePaused,
}

/// Whether a `query-migrate` status is a migration still in flight.
fn in_flight(status: &str) -> bool {
    matches!(status, "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling")
}

/// Whether it is past postcopy's switch (the guest's state is split between the hosts).
fn in_postcopy(status: &str) -> bool {
    status.starts_with("postcopy")
}

/// The action for a job of `role` last recorded in `phase`, given the VM now and the
/// other side's state (`peer`, asked by sources; ignored for destinations).
pub fn decide(role: Role, phase: Phase, vm: &Observed, peer: PeerState) -> Action {
    if !vm.alive {
        return Action::Nothing;
    }
    match role {
        Role::Destination => match phase {
            // Incoming migration never finished: the source keeps (or resumes) the VM.
            Phase::Prepare => Action::KillIncoming,
            // Finish3 started: a guest already running here (it was resumed, or postcopy
            // runs it) took over; a stopped one is killed (libvirt: "killing it seems safest").
            Phase::Finish3 if vm.run_state == "running" || in_postcopy(&vm.migration) => Action::Nothing,
            Phase::Finish3 => Action::KillIncoming,
            // Source phases on a destination job: not possible; leave the VM alone.
            _ => Action::Nothing,
        },
        Role::Source => match phase {
            // Nothing was done to the VM yet: forget the job.
            Phase::Begin3 => Action::Nothing,
            // Migrating, or done migrating without knowing the destination's outcome.
            Phase::Perform3 | Phase::Perform3Done => {
                if in_postcopy(&vm.migration) {
                    // No way back after the switch; the destination runs the guest if it took over.
                    return if peer == PeerState::TookOver { Action::KillSource } else { Action::LeavePaused };
                }
                if in_flight(&vm.migration) {
                    // Still streaming (libvirt: cancel it and resume); the destination cannot have
                    // taken over a migration that has not completed.
                    return Action::ResumeSource;
                }
                match (vm.migration.as_str(), peer) {
                    (_, PeerState::TookOver) => Action::KillSource,
                    ("completed", PeerState::Unknown) => Action::LeavePaused,
                    _ => Action::ResumeSource,
                }
            }
            // The destination took over (Finish3 succeeded): the source copy goes.
            Phase::Confirm3 => Action::KillSource,
            // Finish3 failed or was skipped: resume, unless postcopy made that impossible.
            Phase::Confirm3Cancelled if in_postcopy(&vm.migration) => Action::LeavePaused,
            Phase::Confirm3Cancelled => Action::ResumeSource,
            // Destination phases on a source job: not possible; leave the VM alone.
            Phase::Prepare | Phase::Finish3 => Action::Nothing,
        },
    }
}

/// The test-only fault file in a state dir: `DIR/x-fault`, one line `exit-at POINT` or
/// `fail-at POINT`. Points: `prepare` (Prepare3, the incoming VM started), `perform3_done`
/// (recorded, before Perform3 answers), `finish3` (before Finish3 is recorded),
/// `finish3_resumed` (Finish3, right after `cont` at the postcopy switch), `confirm3`
/// (source: before Confirm3 is recorded, Finish3 having answered). At the
/// point the agent removes the file and exits at once (status 99: a crash, its VMs run
/// on) or fails the call. For the fault tests, where killing a process at the right
/// instant cannot be done from outside; never written by the agent itself.
pub const FAULT_FILE: &str = "x-fault";

/// Applies the fault file of `dir` at `point` (see [`FAULT_FILE`]).
pub fn fault_point(dir: &StateDir, point: &str) -> Result<(), RpcError> {
    let path = dir.root().join(FAULT_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let text = text.trim();
    let (exit, fail) = (text.strip_prefix("exit-at "), text.strip_prefix("fail-at "));
    if exit != Some(point) && fail != Some(point) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&path);
    if exit.is_some() {
        tracing::error!(point, "x-fault: exiting (test hook)");
        std::process::exit(99);
    }
    Err(RpcError::failed(format!("x-fault: failing at {point} (test hook)")))
}

/// What the VM looks like now; a QMP that does not answer counts as a dead VM only if the process is gone.
fn observe(agent: &Agent, name: &str) -> Observed {
    let Some(vm) = agent.proc_of(name).filter(|p| p.alive()) else {
        return Observed { alive: false, run_state: "shutoff".into(), migration: "none".into() };
    };
    let field = |cmd: &str, f: &str| {
        vm.execute(cmd, None).ok().and_then(|v| v[f].as_str().map(String::from)).unwrap_or_else(|| "unknown".into())
    };
    let run_state = field("query-status", "status");
    let mut migration = field("query-migrate", "status");
    if migration == "unknown" {
        migration = "none".into();
    }
    Observed { alive: true, run_state, migration }
}

/// Asks the destination agent at `peer` about VM `name`'s migration job.
pub fn ask_peer(peer: Option<&str>, name: &str) -> PeerState {
    let Some(peer) = peer else { return PeerState::Unknown };
    let Ok(mut c) = Client::connect(peer, PEER_TIMEOUT) else { return PeerState::Unknown };
    let _ = c.set_timeout(Some(PEER_TIMEOUT * 6));
    match c.call("jobinfo", json!({ "name": name })) {
        Ok(j) => peer_state(&j),
        // No job there: Prepare3 never ran (or the job was removed); nothing took over.
        Err(e) if matches!(e.class, ErrorClass::OperationInvalid | ErrorClass::NoDomain) => PeerState::NotTakenOver,
        Err(_) => PeerState::Unknown,
    }
}

/// The other side's state from its `jobinfo`.
pub fn peer_state(j: &Value) -> PeerState {
    match (j["role"].as_str(), j["finished"].as_bool()) {
        // The VM moved on from there: that side took over long ago.
        (Some("source"), _) => PeerState::TookOver,
        (Some("destination"), Some(false)) => PeerState::Waiting,
        (Some("destination"), Some(true)) if j["error"].is_null() => PeerState::TookOver,
        (Some("destination"), Some(true)) => PeerState::NotTakenOver,
        _ => PeerState::Unknown,
    }
}

/// Recovers one job found unfinished at startup: decides ([`decide`]) and acts; the job
/// ends, its error saying what recovery did (none when the migration had succeeded).
pub fn recover(agent: &Agent, job: &Job) {
    let r = job.record();
    let now = observe(agent, &r.name);
    let needs_peer = r.role == Role::Source && matches!(r.phase, Phase::Perform3 | Phase::Perform3Done);
    let peer = if needs_peer { ask_peer(r.peer.as_deref(), &r.name) } else { PeerState::Unknown };
    let action = decide(r.role, r.phase, &now, peer);
    tracing::warn!(vm = %r.name, role = ?r.role, phase = r.phase.as_str(), run_state = %now.run_state,
        migration = %now.migration, peer = ?peer, action = ?action, "recovering a migration job");
    let why = format!("the agent restarted in phase {}", r.phase.as_str());
    let outcome: Result<Option<String>, RpcError> = (|| match action {
        Action::Nothing => {
            let took_over = (r.role == Role::Source && r.phase == Phase::Confirm3)
                || (r.role == Role::Destination && r.phase == Phase::Finish3 && now.alive);
            Ok((!took_over).then(|| format!("{why}; nothing to do")))
        }
        Action::KillSource => {
            job.set_phase(Phase::Confirm3)?;
            if let Some(vm) = agent.proc_of(&r.name) {
                vm.quit(crate::agent::QUIT_TIMEOUT);
            }
            agent.forget(&r.name);
            Ok(None)
        }
        Action::KillIncoming => {
            if let Some(vm) = agent.proc_of(&r.name) {
                vm.kill();
            }
            agent.forget(&r.name);
            Ok(Some(format!("{why}; the incoming VM was killed")))
        }
        Action::LeavePaused => Ok(Some(format!("{why}; the VM is left paused (the destination's outcome is unknown)"))),
        Action::ResumeSource => {
            job.set_phase(Phase::Confirm3Cancelled)?;
            resume_source(agent, &r.name, r.was_running, r.saved_parameters.as_ref(), &now, peer, r.peer.as_deref())?;
            Ok(Some(format!("{why}; the migration was cancelled and the source VM resumed")))
        }
    })();
    let error = match outcome {
        Ok(e) => e,
        Err(e) => Some(format!("{why}; recovery failed: {}", e.desc)),
    };
    if let Err(e) = job.finish(error) {
        tracing::warn!(vm = %r.name, error = %e, "recovery: cannot record the job's end");
    }
}

/// Cancels the source's migration if it still runs, tells a waiting destination to give
/// up (Finish3, cancelled: it kills its incoming VM), and resumes a VM that ran at Begin3.
fn resume_source(
    agent: &Agent,
    name: &str,
    was_running: bool,
    saved_parameters: Option<&Value>,
    now: &Observed,
    peer: PeerState,
    peer_addr: Option<&str>,
) -> Result<(), RpcError> {
    let vm = agent.proc_of(name).ok_or_else(|| RpcError::failed(format!("VM '{name}' is gone")))?;
    if in_flight(&now.migration) {
        vm.execute("migrate_cancel", None)?;
        let t0 = Instant::now();
        while in_flight(vm.execute("query-migrate", None)?["status"].as_str().unwrap_or("none")) {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(RpcError::failed(format!("VM {name}: the migration does not end after migrate_cancel")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if peer == PeerState::Waiting {
        if let Some(addr) = peer_addr {
            let r = Client::connect(addr, PEER_TIMEOUT)
                .and_then(|mut c| c.call("finish3", json!({ "name": name, "cookie": null, "cancelled": true })));
            if let Err(e) = r {
                tracing::warn!(vm = name, error = %e, "recovery: the destination did not take the cancel");
            }
        }
    }
    // As libvirt's recovery (qemuMigrationParamsReset): the parameters the job set go back.
    if let Some(saved) = saved_parameters.filter(|p| p.as_object().is_some_and(|o| !o.is_empty())) {
        if let Err(e) = vm.execute("migrate-set-parameters", Some(saved.clone())) {
            tracing::warn!(vm = name, error = %e, "recovery: cannot restore the migration parameters");
        }
    }
    if was_running && vm.execute("query-status", None)?["status"] != "running" {
        vm.execute("cont", None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(run_state: &str, migration: &str) -> Observed {
        Observed { alive: true, run_state: run_state.into(), migration: migration.into() }
    }

    const ALL_PEERS: [PeerState; 4] =
        [PeerState::TookOver, PeerState::NotTakenOver, PeerState::Waiting, PeerState::Unknown];

    #[test]
    fn a_dead_vm_needs_nothing() {
        let dead = Observed { alive: false, run_state: "shutoff".into(), migration: "none".into() };
        for role in [Role::Source, Role::Destination] {
            for phase in Phase::ALL {
                for peer in ALL_PEERS {
                    assert_eq!(decide(role, phase, &dead, peer), Action::Nothing, "{role:?} {phase:?} {peer:?}");
                }
            }
        }
    }

    #[test]
    fn destination_table() {
        use Action::*;
        let d = |phase, run: &str, mig: &str| decide(Role::Destination, phase, &vm(run, mig), PeerState::Unknown);
        // Prepare: whatever the incoming VM did, it goes.
        for (run, mig) in
            [("inmigrate", "active"), ("paused", "completed"), ("inmigrate", "none"), ("paused", "failed")]
        {
            assert_eq!(d(Phase::Prepare, run, mig), KillIncoming, "{run} {mig}");
        }
        // Finish3: a running guest took over; a stopped one is killed.
        assert_eq!(d(Phase::Finish3, "running", "completed"), Nothing);
        assert_eq!(d(Phase::Finish3, "running", "postcopy-active"), Nothing);
        assert_eq!(d(Phase::Finish3, "inmigrate", "postcopy-active"), Nothing);
        assert_eq!(d(Phase::Finish3, "paused", "completed"), KillIncoming);
        assert_eq!(d(Phase::Finish3, "inmigrate", "active"), KillIncoming);
        assert_eq!(d(Phase::Finish3, "inmigrate", "failed"), KillIncoming);
        // Source phases never occur on a destination job.
        for p in [Phase::Begin3, Phase::Perform3, Phase::Perform3Done, Phase::Confirm3, Phase::Confirm3Cancelled] {
            assert_eq!(d(p, "paused", "completed"), Nothing, "{p:?}");
        }
    }

    #[test]
    fn source_table() {
        use Action::*;
        use PeerState::*;
        let s = |phase, run: &str, mig: &str, peer| decide(Role::Source, phase, &vm(run, mig), peer);
        for peer in ALL_PEERS {
            // Begin3: nothing happened to the VM yet.
            assert_eq!(s(Phase::Begin3, "running", "none", peer), Nothing);
            // Confirm3: the destination took over; Confirm3 cancelled: resume.
            assert_eq!(s(Phase::Confirm3, "postmigrate", "completed", peer), KillSource);
            assert_eq!(s(Phase::Confirm3Cancelled, "postmigrate", "completed", peer), ResumeSource);
            assert_eq!(s(Phase::Confirm3Cancelled, "paused", "cancelled", peer), ResumeSource);
            assert_eq!(s(Phase::Confirm3Cancelled, "paused", "postcopy-active", peer), LeavePaused);
            // Perform3 still streaming: cancel and resume (nobody can have taken over).
            for mig in ["setup", "active", "pre-switchover", "device", "cancelling"] {
                assert_eq!(s(Phase::Perform3, "running", mig, peer), ResumeSource, "{mig} {peer:?}");
                assert_eq!(s(Phase::Perform3Done, "paused", mig, peer), ResumeSource, "{mig} {peer:?}");
            }
            // A migration that failed or was cancelled: resume unless the peer took over.
            for mig in ["failed", "cancelled", "none"] {
                let want = if peer == TookOver { KillSource } else { ResumeSource };
                assert_eq!(s(Phase::Perform3, "paused", mig, peer), want, "{mig} {peer:?}");
            }
            // Destination phases never occur on a source job.
            assert_eq!(s(Phase::Prepare, "running", "none", peer), Nothing);
            assert_eq!(s(Phase::Finish3, "running", "none", peer), Nothing);
        }
        // Completed, Finish3's outcome unknown to the recorded phase: ask the destination.
        for phase in [Phase::Perform3, Phase::Perform3Done] {
            assert_eq!(s(phase, "postmigrate", "completed", TookOver), KillSource);
            assert_eq!(s(phase, "postmigrate", "completed", NotTakenOver), ResumeSource);
            assert_eq!(s(phase, "postmigrate", "completed", Waiting), ResumeSource);
            // As libvirt: unknown destination, the VM stays paused for a third party.
            assert_eq!(s(phase, "postmigrate", "completed", Unknown), LeavePaused);
            // Postcopy: no way back; the source goes only if the destination took over.
            assert_eq!(s(phase, "paused", "postcopy-active", TookOver), KillSource);
            for peer in [NotTakenOver, Waiting, Unknown] {
                assert_eq!(s(phase, "paused", "postcopy-active", peer), LeavePaused);
                assert_eq!(s(phase, "paused", "postcopy-paused", peer), LeavePaused);
            }
        }
    }
}
