//! QEMU 7.2's `timer` and `globalstate` descriptions (the device sections of a
//! `-machine none` guest), with helpers to build their states.

use crate::error::ErrorKind;
use crate::vmstate::{Kind, Needed, State, Value, Vmsd};

/// Run states QEMU 7.2 accepts in `globalstate` (`qapi/run-state.json`).
pub const RUN_STATES: &[&str] = &[
    "debug",
    "inmigrate",
    "internal-error",
    "io-error",
    "paused",
    "postmigrate",
    "prelaunch",
    "finish-migrate",
    "restore-vm",
    "running",
    "save-vm",
    "shutdown",
    "suspended",
    "watchdog",
    "guest-panicked",
    "colo",
];

fn icount_needed(s: &State) -> bool {
    s.subsection("timer/icount").is_some()
}

/// `timer` v2 (minimum 1): `cpu_ticks_offset`, 8 unused bytes, `cpu_clock_offset` (v2),
/// and the `timer/icount` subsection tree used with `-icount`.
pub fn timer() -> Vmsd {
    let warp = Vmsd::new("timer/icount/warp_timer", 1, 1)
        .field("vm_clock_warp_start", Kind::Int(8))
        .field("icount_warp_timer", Kind::Timer);
    let timers = Vmsd::new("timer/icount/timers", 1, 1)
        .field("icount_rt_timer", Kind::Timer)
        .field("icount_vm_timer", Kind::Timer);
    let shift = Vmsd::new("timer/icount/shift", 2, 2)
        .field("icount_time_shift", Kind::Int(2))
        .field("last_delta", Kind::Int(8));
    let icount = Vmsd::new("timer/icount", 1, 1)
        .field("qemu_icount_bias", Kind::Int(8))
        .field("qemu_icount", Kind::Int(8))
        .subsection(warp, Needed::IfPresent)
        .subsection(timers, Needed::IfPresent)
        .subsection(shift, Needed::IfPresent);
    Vmsd::new("timer", 2, 1)
        .field("cpu_ticks_offset", Kind::Int(8))
        .field("unused", Kind::Unused(8))
        .field_v("cpu_clock_offset", Kind::Int(8), 2)
        .subsection(icount, Needed::When(icount_needed))
}

/// `globalstate` v1: `size` (strlen + 1) and the 100-byte NUL-padded runstate name.
pub fn globalstate() -> Vmsd {
    Vmsd::new("globalstate", 1, 1).field("size", Kind::Uint(4)).field("runstate", Kind::Text(100))
}

/// Every built-in description.
pub fn all() -> Vec<Vmsd> {
    vec![timer(), globalstate()]
}

/// A `timer` state with the given offsets (zeros for a guest paused from the start).
pub fn timer_state(cpu_ticks_offset: i64, cpu_clock_offset: i64) -> State {
    let mut s = State::default();
    s.set("cpu_ticks_offset", Value::Int(cpu_ticks_offset));
    s.set("cpu_clock_offset", Value::Int(cpu_clock_offset));
    s
}

/// A `globalstate` state for `runstate` (e.g. `prelaunch`, `running`, `paused`).
pub fn globalstate_state(runstate: &str) -> State {
    let mut s = State::default();
    s.set("size", Value::Uint(runstate.len() as u64 + 1));
    s.set("runstate", Value::Text(runstate.to_string()));
    s
}

/// The loader's check: the runstate must be one QEMU knows.
pub(crate) fn check_globalstate(s: &State) -> Result<(), ErrorKind> {
    match s.get("runstate") {
        Some(Value::Text(r)) if RUN_STATES.contains(&r.as_str()) => Ok(()),
        Some(Value::Text(r)) => Err(ErrorKind::BadField {
            field: "globalstate.runstate".into(),
            why: format!("invalid parameter value: {r}"),
        }),
        _ => Ok(()),
    }
}
