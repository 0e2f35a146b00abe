//! `Outgoing::begin_setup`: a caller (QMP's `migrate`) moves the migration to
//! `setup` before the channel exists, as QEMU 7.2 does; the run then goes on from
//! there with one `setup` notification in all, and a cancel before the run ends it
//! `cancelled`.

use engine::memory::{GuestRegion, RamRegion};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing};
use engine::state::{MigrationStatus as S, Notification};
use engine::vm::{VcpuControl, VmParts, VmmError};

struct Stopped;

impl VcpuControl for Stopped {
    fn stop(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmmError> {
        Ok(())
    }
}

fn outgoing() -> Outgoing {
    let params = SharedParameters::new(MigrationParameters::default()).expect("params");
    Outgoing::new(params, MigrationCapabilities::default()).expect("outgoing")
}

#[test]
fn a_run_goes_on_from_a_setup_begun_by_its_caller() {
    let mut mem = vec![7u8; 1 << 20];
    let base = mem.as_mut_ptr();
    // SAFETY: `mem` outlives `region` and is not otherwise accessed while it is read.
    let region = unsafe { GuestRegion::new("mem", base, 1 << 20) }.expect("region");

    let out = outgoing();
    let seen = out.state().subscribe();
    out.begin_setup().expect("none -> setup");
    assert_eq!(out.state().status(), S::Setup);
    assert!(out.begin_setup().is_err(), "only from none");
    let mut stream = Vec::new();
    out.run_on(&mut stream, &mut [RamRegion::new(&region)], &mut Stopped, &mut VmParts::default()).expect("migration");
    let states: Vec<(S, S)> = seen
        .try_iter()
        .filter_map(|n| match n {
            Notification::State { from, to } => Some((from, to)),
            _ => None,
        })
        .collect();
    assert_eq!(states, [(S::None, S::Setup), (S::Setup, S::Active), (S::Active, S::Completed)]);

    // Cancelled between begin_setup and the run.
    let out = outgoing();
    out.begin_setup().expect("none -> setup");
    out.cancel().cancel();
    let mut stream = Vec::new();
    let r = out.run_on(&mut stream, &mut [RamRegion::new(&region)], &mut Stopped, &mut VmParts::default());
    assert!(matches!(r, Err(EngineError::Cancelled)), "{r:?}");
    assert_eq!(out.state().status(), S::Cancelled);
    drop(mem);
}
