//! Migration states with QEMU's names, the legal transitions of each side, and
//! notifiers (callbacks and crossbeam channels) told of every transition and pass.

use crossbeam_channel::{Receiver, Sender};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// `MigrationStatus` values, named as `query-migrate` reports them (also in serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// `none`.
    None,
    /// `setup`.
    Setup,
    /// `cancelling`.
    Cancelling,
    /// `cancelled`.
    Cancelled,
    /// `active`.
    Active,
    /// `postcopy-active` (reserved).
    PostcopyActive,
    /// `completed`.
    Completed,
    /// `failed`.
    Failed,
    /// `pre-switchover`.
    PreSwitchover,
    /// `device`.
    Device,
}

impl MigrationStatus {
    /// QEMU's string.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
        }
    }

    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which end of the migration a state machine belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The source (outgoing).
    Source,
    /// The destination (incoming).
    Destination,
}

/// Is `from -> to` a transition QEMU 7.2 makes on this side?
pub fn is_legal(role: Role, from: MigrationStatus, to: MigrationStatus) -> bool {
    use MigrationStatus::*;
    match role {
        Role::Source => matches!(
            (from, to),
            (None, Setup)
                | (Setup, Active | Failed | Cancelling)
                | (Active, Completed | PreSwitchover | PostcopyActive | Failed | Cancelling)
                | (PreSwitchover, Device | PostcopyActive | Failed | Cancelling)
                | (Device, Completed | Failed | Cancelling)
                | (PostcopyActive, Completed | Failed | Cancelling)
                | (Cancelling, Cancelled | Failed)
        ),
        Role::Destination => {
            matches!(
                (from, to),
                (None, Active | Failed)
                    | (Active, PostcopyActive | Completed | Failed)
                    | (PostcopyActive, Completed | Failed)
            )
        }
    }
}

/// What notifiers are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A state change.
    State {
        /// Previous state.
        from: MigrationStatus,
        /// New state.
        to: MigrationStatus,
    },
    /// A dirty-bitmap sync closed pass `pass` (QEMU's `MIGRATION_PASS`, = dirty-sync-count).
    Pass {
        /// The dirty-sync count after this sync.
        pass: u64,
    },
    /// Auto-converge set the vCPU throttle.
    Throttle {
        /// The new percentage.
        percentage: u8,
    },
}

/// A refused transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal migration state change {from} -> {to} (state is {current})")]
pub struct IllegalTransition {
    /// Expected current state.
    pub from: MigrationStatus,
    /// Requested state.
    pub to: MigrationStatus,
    /// Actual current state.
    pub current: MigrationStatus,
}

type Callback = Box<dyn Fn(&Notification) + Send>;

struct Inner {
    status: MigrationStatus,
    callbacks: Vec<Callback>,
    channels: Vec<Sender<Notification>>,
}

/// The state of one migration, shared with the threads that watch or drive it.
#[derive(Clone)]
pub struct StateMachine {
    role: Role,
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateMachine({:?}, {})", self.role, self.status())
    }
}

impl StateMachine {
    /// A machine in state `none`.
    pub fn new(role: Role) -> Self {
        StateMachine {
            role,
            inner: Arc::new(Mutex::new(Inner { status: MigrationStatus::None, callbacks: vec![], channels: vec![] })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    /// Call `f` on every notification (under the state lock, so in order; keep it short).
    pub fn on_notify(&self, f: impl Fn(&Notification) + Send + 'static) {
        self.lock().callbacks.push(Box::new(f));
    }

    /// A channel receiving every notification from now on.
    pub fn subscribe(&self) -> Receiver<Notification> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.lock().channels.push(tx);
        rx
    }

    fn notify(inner: &mut Inner, n: Notification) {
        for c in &inner.callbacks {
            c(&n);
        }
        inner.channels.retain(|tx| tx.send(n.clone()).is_ok());
    }

    /// Move `from -> to` if the state is `from` and the change is legal for this role
    /// (QEMU's compare-and-swap `migrate_set_state`, made strict).
    pub fn transition(&self, from: MigrationStatus, to: MigrationStatus) -> Result<(), IllegalTransition> {
        let mut g = self.lock();
        if g.status != from || !is_legal(self.role, from, to) {
            return Err(IllegalTransition { from, to, current: g.status });
        }
        g.status = to;
        Self::notify(&mut g, Notification::State { from, to });
        Ok(())
    }

    /// Move from whatever the state is to `to`, if legal (used for failure and cancel paths).
    pub fn transition_from_current(&self, to: MigrationStatus) -> Result<MigrationStatus, IllegalTransition> {
        let mut g = self.lock();
        let from = g.status;
        if !is_legal(self.role, from, to) {
            return Err(IllegalTransition { from, to, current: from });
        }
        g.status = to;
        Self::notify(&mut g, Notification::State { from, to });
        Ok(from)
    }

    /// Tell notifiers about something other than a state change.
    pub fn announce(&self, n: Notification) {
        let mut g = self.lock();
        Self::notify(&mut g, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationStatus::*;

    #[test]
    fn source_paths_of_qemu_7_2() {
        for path in [
            &[None, Setup, Active, Completed][..],
            &[None, Setup, Active, PreSwitchover, Device, Completed],
            &[None, Setup, Active, Cancelling, Cancelled],
            &[None, Setup, Cancelling, Cancelled],
            &[None, Setup, Active, PreSwitchover, Cancelling, Cancelled],
            &[None, Setup, Failed],
            &[None, Setup, Active, Failed],
        ] {
            let sm = StateMachine::new(Role::Source);
            let rx = sm.subscribe();
            for w in path.windows(2) {
                sm.transition(w[0], w[1]).unwrap_or_else(|e| panic!("{e}"));
            }
            let seen: Vec<_> = rx.try_iter().collect();
            let want: Vec<_> = path.windows(2).map(|w| Notification::State { from: w[0], to: w[1] }).collect();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn illegal_changes_are_refused() {
        let sm = StateMachine::new(Role::Source);
        assert!(sm.transition(None, Active).is_err(), "setup first");
        sm.transition(None, Setup).unwrap_or_default();
        assert!(sm.transition(Active, Completed).is_err(), "wrong current state");
        sm.transition(Setup, Active).unwrap_or_default();
        sm.transition(Active, Completed).unwrap_or_default();
        for to in [Active, Failed, Cancelling, Cancelled, Setup] {
            assert!(sm.transition_from_current(to).is_err(), "completed is terminal ({to})");
        }
        let d = StateMachine::new(Role::Destination);
        assert!(d.transition(None, Setup).is_err(), "7.2 destinations go none -> active");
        assert!(d.transition(None, Active).is_ok());
        assert!(d.transition(Active, Cancelled).is_err());
        assert!(d.transition(Active, Failed).is_ok());
    }

    #[test]
    fn callbacks_see_states_and_passes_in_order() {
        let sm = StateMachine::new(Role::Source);
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        sm.on_notify(move |n| l.lock().unwrap_or_else(|e| e.into_inner()).push(n.clone()));
        sm.transition(None, Setup).unwrap_or_default();
        sm.announce(Notification::Pass { pass: 1 });
        sm.transition(Setup, Active).unwrap_or_default();
        let got = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(
            got,
            vec![
                Notification::State { from: None, to: Setup },
                Notification::Pass { pass: 1 },
                Notification::State { from: Setup, to: Active }
            ]
        );
    }
}
