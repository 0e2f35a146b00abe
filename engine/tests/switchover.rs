//! `pause-before-switchover`: the migration waits in `pre-switchover` with the
//! guest stopped until continued, then goes `device` -> `completed`; a cancel
//! while waiting resumes the guest.

use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing};
use engine::state::{MigrationStatus as S, Notification, Role};
use savevm_format::{Decoder, Event};
use std::time::{Duration, Instant};
use testkit::check_sequence;
use testkit::synthetic::SyntheticGuest;
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

fn uri(name: &str) -> MigrationUri {
    MigrationUri::Unix(std::env::temp_dir().join(format!("qmig-switch-{}-{name}.sock", std::process::id())))
}

fn sink_thread(l: Listener) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let Ok(ch) = l.accept() else { return false };
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut eof = false;
        while let Ok(Some(ev)) = d.next() {
            eof |= matches!(ev, Event::Eof);
        }
        eof
    })
}

fn setup(name: &str) -> (SyntheticGuest, Outgoing, std::thread::JoinHandle<bool>, transports::Channel) {
    let mut guest = SyntheticGuest::new(4 << 20, |p, page| page.fill(p as u8));
    guest.start(1, 4 << 20, 1);
    let params = SharedParameters::new(MigrationParameters { max_bandwidth: 0, ..Default::default() }).expect("params");
    let caps = MigrationCapabilities { pause_before_switchover: true, ..Default::default() };
    let out = Outgoing::new(params, caps).expect("out");
    let cancel = CancelToken::new().expect("token");
    let l = Listener::bind(&uri(name), &cancel).expect("listen");
    let dst = sink_thread(l);
    let ch = connect(&uri(name), &cancel).expect("connect");
    (guest, out, dst, ch)
}

#[test]
fn waits_in_pre_switchover_until_continued() {
    let (guest, out, dst, ch) = setup("cont");
    let notes = out.state().subscribe();
    assert!(out.continue_switchover().is_err(), "nothing to continue yet");
    let o = out.clone();
    let ctl = std::thread::spawn(move || {
        let t0 = Instant::now();
        while o.state().status() != S::PreSwitchover {
            assert!(t0.elapsed() < Duration::from_secs(10), "never reached pre-switchover");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(o.state().status(), S::PreSwitchover, "it waits");
        o.continue_switchover().expect("continue");
    });
    let region = guest.region("mem").expect("region");
    let mut vcpus = guest.vcpus();
    let info =
        out.run(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())], &mut vcpus).expect("run");
    ctl.join().expect("controller");
    assert_eq!(info.status, S::Completed);
    assert!(dst.join().expect("dst"), "destination saw EOF");
    let states: Vec<S> =
        notes.try_iter().filter_map(|n| if let Notification::State { to, .. } = n { Some(to) } else { None }).collect();
    assert_eq!(states, [S::Setup, S::Active, S::PreSwitchover, S::Device, S::Completed]);
    assert!(info.downtime.is_some_and(|d| d >= Duration::from_millis(200)), "the pause counts as downtime");
}

#[test]
fn cancel_in_pre_switchover_resumes_the_guest() {
    let (guest, out, dst, ch) = setup("cancel");
    let notes = out.state().subscribe();
    let o = out.clone();
    let ctl = std::thread::spawn(move || {
        while o.state().status() != S::PreSwitchover {
            std::thread::sleep(Duration::from_millis(5));
        }
        o.cancel().cancel();
        Instant::now()
    });
    let region = guest.region("mem").expect("region");
    let mut vcpus = guest.vcpus();
    let r = out.run(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())], &mut vcpus);
    let at = ctl.join().expect("controller");
    assert!(at.elapsed() < Duration::from_secs(1));
    assert!(matches!(r, Err(EngineError::Cancelled)), "{r:?}");
    assert!(vcpus.running(), "guest resumed");
    assert!(!dst.join().expect("dst"), "no complete stream at the destination");
    assert_eq!(check_sequence(Role::Source, &notes.try_iter().collect::<Vec<_>>()), Ok(()));
    assert_eq!(out.state().status(), S::Cancelled);
}
