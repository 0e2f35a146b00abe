//! The engine's `tracing` spans and events: a subscriber installed by the embedder
//! sees the migration, its setup, each pass, the switchover (with its reason) and
//! the device phase on the source, and the incoming load on the destination.
//! Without a subscriber nothing is printed (the library never installs one).

use engine::incoming::Incoming;
use engine::memory::{GuestRegion, RamRegion};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::vm::{VcpuControl, VmParts, VmmError};
use savevm_format::{PageSink, PageSlot, RamBlock};
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

#[derive(Clone, Default)]
struct Record(Arc<Mutex<Vec<String>>>);

struct Messages(String);

impl Visit for Messages {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        } else if field.name() == "reason" {
            self.0.push_str(&format!(" reason={value:?}"));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "reason" {
            self.0.push_str(&format!(" reason={value}"));
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Record {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(format!("span {}", attrs.metadata().name()));
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut m = Messages(String::new());
        event.record(&mut m);
        let parent = ctx.event_span(event).map(|s| s.name()).unwrap_or("-");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(format!("event {parent}: {}", m.0));
    }
}

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

struct Mem(Vec<u8>);
impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<PageSlot<'_>> {
        self.0.get_mut(off as usize..off as usize + 4096).map(PageSlot::from)
    }
}

#[test]
fn spans_and_events_follow_the_migration() {
    let rec = Record::default();
    let subscriber = tracing_subscriber::registry().with(rec.clone());
    let mut mem = vec![7u8; 1 << 20];
    let base = mem.as_mut_ptr();
    let mut stream = Vec::new();
    tracing::subscriber::with_default(subscriber, || {
        // SAFETY: `mem` outlives `region` and is not otherwise accessed while it is read.
        let region = unsafe { GuestRegion::new("mem", base, 1 << 20) }.expect("region");
        let params = SharedParameters::new(MigrationParameters::default()).expect("params");
        let out = Outgoing::new(params, MigrationCapabilities::default()).expect("outgoing");
        out.run_on(&mut stream, &mut [RamRegion::new(&region)], &mut Stopped, &mut VmParts::default())
            .expect("migration");
        let mut dst = Mem(vec![0; 1 << 20]);
        Incoming::new(false).run(&stream[..], &mut dst, &mut VmParts::default(), &mut Stopped).expect("incoming");
        assert!(dst.0.iter().all(|&b| b == 7));
    });
    let seen = rec.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let has = |s: &str| seen.iter().any(|l| l.starts_with(s));
    for span in
        ["span migration", "span setup", "span pass", "span switchover", "span devices", "span incoming", "span load"]
    {
        assert!(has(span), "{span} missing from {seen:#?}");
    }
    assert!(has("event setup: setup done"), "{seen:#?}");
    assert!(has("event pass: switchover reason=the rest fits in downtime-limit"), "{seen:#?}");
    assert!(has("event switchover: stream complete"), "{seen:#?}");
    assert!(has("event migration: migration completed"), "{seen:#?}");
    assert!(has("event incoming: incoming migration loaded"), "{seen:#?}");
    // Order: setup before the first pass, the switchover after it.
    let pos = |s: &str| seen.iter().position(|l| l.starts_with(s)).unwrap_or(usize::MAX);
    assert!(pos("span setup") < pos("span pass") && pos("span pass") < pos("span switchover"));
    assert!(pos("span switchover") < pos("span devices"));
}
