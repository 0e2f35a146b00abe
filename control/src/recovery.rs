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

use crate::state::{Phase, Role};
use serde::Serialize;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(run_state: &str, migration: &str) -> Observed {
        Observed { alive: true, run_state: run_state.into(), migration: migration.into() }
    }

    const ALL_PEERS: [PeerState; 4] =
        [PeerState::TookOver, PeerState::NotTakenOver, PeerState::Waiting, PeerState::Unknown];
    const ALL_PHASES: [Phase; 7] = [
        Phase::Begin3,
        Phase::Perform3,
        Phase::Perform3Done,
        Phase::Confirm3,
        Phase::Confirm3Cancelled,
        Phase::Prepare,
        Phase::Finish3,
    ];

    #[test]
    fn a_dead_vm_needs_nothing() {
        let dead = Observed { alive: false, run_state: "shutoff".into(), migration: "none".into() };
        for role in [Role::Source, Role::Destination] {
            for phase in ALL_PHASES {
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
