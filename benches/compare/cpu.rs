//! Machine load and process CPU: `/proc` and `wait4` figures.

use super::*;

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub(crate) fn cpus() -> usize {
    thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// System-wide user + nice + system time of all CPUs (seconds).
pub(crate) fn system_busy() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0.0 };
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 3 {
        return 0.0;
    }
    (v[0] + v[1] + v[2]) as f64 / clock_ticks()
}

/// CPU seconds (utime + stime) and minor faults of a live process, from `/proc/PID/stat`.
pub(crate) fn proc_cpu(pid: u32) -> (f64, u64) {
    let Ok(st) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0.0, 0) };
    let Some((_, rest)) = st.rsplit_once(')') else { return (0.0, 0) };
    // After ")": state (field 3) ... minflt is field 10, utime 14, stime 15.
    let f: Vec<u64> = rest.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    if f.len() < 12 {
        return (0.0, 0);
    }
    ((f[10] + f[11]) as f64 / clock_ticks(), f[6])
}

/// This process's CPU seconds (all threads).
pub(crate) fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub(crate) fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// A snapshot to compute the share of the machine others used.
#[derive(Clone, Copy)]
pub(crate) struct MachineSample {
    pub(crate) at: Instant,
    pub(crate) busy: f64,
    pub(crate) own: f64,
}

impl MachineSample {
    pub(crate) fn now() -> MachineSample {
        MachineSample { at: Instant::now(), busy: system_busy(), own: self_cpu() }
    }

    /// Share of all cores used outside this bench and `measured` CPU seconds since `self`.
    pub(crate) fn others_since(&self, measured: f64) -> f64 {
        let end = MachineSample::now();
        let wall = end.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let others = (end.busy - self.busy) - (end.own - self.own) - measured;
        (others / (wall * cpus() as f64)).clamp(0.0, 1.0)
    }
}
