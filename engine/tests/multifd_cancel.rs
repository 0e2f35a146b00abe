//! Cancelling a multifd source whose destination stopped reading.

mod common;

use transports::{CancelToken, Listener};

/// A source with multifd into a destination that accepts every connection and
/// never reads: a cancel ends it within a second or two (sender threads blocked in
/// writes and the migration thread waiting for a free channel both wake).
#[test]
fn cancel_a_multifd_source_blocked_on_a_stalled_destination() {
    use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
    use engine::source::{EngineError, Outgoing};
    let _s = common::serial();
    let uri = common::sock("multifd-hostile", "stalled");
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("bind");
    let guest = testkit::synthetic::SyntheticGuest::new(32 << 20, |p, b| b.fill((p % 251) as u8 + 1));
    let region = guest.region("mem").expect("region");
    let params = SharedParameters::new(MigrationParameters { max_bandwidth: 0, ..Default::default() }).expect("params");
    let caps = MigrationCapabilities { multifd: true, ..Default::default() };
    let out = Outgoing::new(params, caps).expect("outgoing");
    let src_cancel = CancelToken::new().expect("token");
    let ch = transports::connect(&uri, &src_cancel).expect("main");
    let chans: Vec<_> = (0..2).map(|_| transports::connect(&uri, &src_cancel).expect("channel")).collect();
    // Accepted and held, never read.
    let held: Vec<_> = (0..3).map(|_| listener.accept_another().expect("accept")).collect();
    let mut vcpus = guest.vcpus();
    let (r, elapsed) = std::thread::scope(|s| {
        let run = s.spawn(|| {
            let mut ram = [engine::memory::RamRegion::new(&region)];
            out.run_multifd(ch, chans, &mut ram, &mut vcpus, &mut Default::default())
        });
        common::wait_for("the migration to be active", std::time::Duration::from_secs(20), || {
            out.info().get().status == engine::state::MigrationStatus::Active
        });
        // Give the channels time to fill their socket buffers and block.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        out.cancel().cancel();
        let r = run.join().expect("migration thread");
        (r, t0.elapsed())
    });
    drop(held);
    assert!(matches!(r, Err(EngineError::Cancelled)), "{:?}", r.err().map(|e| engine::error::report(&e)));
    assert!(elapsed < std::time::Duration::from_secs(3), "cancel took {elapsed:?}");
}
