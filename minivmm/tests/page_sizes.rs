//! Issue 13 bug 1 on minivmm's incoming RAM sink: pages land at the stream's target
//! page size (1 KiB, 4 KiB, 8 KiB, 64 KiB), both into a fresh VM (whose still-zero
//! pages are tracked in 4 KiB units) and into one already written; a stream whose
//! block is not this VM's RAM is refused before any page. Streams are built here
//! and loaded through the engine's `Incoming`.

use engine::incoming::Incoming;
use engine::vm::{VcpuControl, VmParts};
use minivmm::layout::Layout;
use minivmm::{Vm, RAM_BLOCK};
use testkit::streams::paged_stream;

struct NoVcpus;
impl VcpuControl for NoVcpus {}

fn ram_bytes(vm: &Vm) -> Vec<u8> {
    let mut v = vec![0u8; vm.ram().len()];
    vm.ram().copy_to(&mut v[..]);
    v
}

fn load(vm: &mut Vm, stream: &[u8]) -> Result<(), engine::incoming::IncomingError> {
    Incoming::new(false).run(stream, &mut vm.sink(), &mut VmParts::default(), &mut NoVcpus).map(|_| ())
}

#[test]
fn pages_land_at_the_streams_target_page_size() {
    if !testkit::kvm_or_skip("pages_land_at_the_streams_target_page_size") {
        return;
    }
    for bits in [10u32, 12, 13, 16] {
        let mut vm = Vm::new(Layout::one_slot(16 << 20).expect("layout")).expect("vm");
        let len = vm.ram().len() as u64;
        let t = 1usize << bits;
        let tps = t as u64;
        let mut want = vec![0u8; len as usize];
        // A fresh VM: pages at the start and the end, a non-zero fill, a ZERO
        // inside a 4 KiB page just written (it must clear only its own target page).
        let first = paged_stream(bits, &[(RAM_BLOCK, len)], |s| {
            for p in 0..8u64 {
                for off in [p * tps, len - (p + 1) * tps] {
                    let v = (off / tps % 250) as u8 + 1;
                    s.ram_page(0, off, &vec![v; t]).expect("page");
                    want[off as usize..][..t].fill(v);
                }
            }
            s.ram_zero(0, 2 * tps).expect("zero");
            want[2 * t..3 * t].fill(0);
        });
        load(&mut vm, &first).unwrap_or_else(|e| panic!("{t}-byte pages, fresh VM: {e}"));
        assert!(ram_bytes(&vm) == want, "{t}-byte pages: RAM differs after the first load");
        // The same VM again (no longer fresh): ZERO records in the block's last target
        // page and in the middle of written ones, and a page between them.
        let second = paged_stream(bits, &[(RAM_BLOCK, len)], |s| {
            s.ram_zero(0, len - tps).expect("last zero");
            s.ram_zero(0, 4 * tps).expect("zero");
            s.ram_page(0, 5 * tps, &vec![0x5a; t]).expect("page");
        });
        want[len as usize - t..].fill(0);
        want[4 * t..5 * t].fill(0);
        want[5 * t..6 * t].fill(0x5a);
        load(&mut vm, &second).unwrap_or_else(|e| panic!("{t}-byte pages, second load: {e}"));
        let got = ram_bytes(&vm);
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!("{t}-byte pages: byte {i:#x} is {:#x}, want {:#x}", got[i], want[i]);
        }
    }
}

#[test]
fn a_block_that_is_not_this_vms_ram_is_refused_before_any_page() {
    if !testkit::kvm_or_skip("a_block_that_is_not_this_vms_ram_is_refused_before_any_page") {
        return;
    }
    let mut vm = Vm::new(Layout::one_slot(16 << 20).expect("layout")).expect("vm");
    let len = vm.ram().len() as u64;
    for blocks in [vec![(RAM_BLOCK, 1u64 << 44)], vec![(RAM_BLOCK, len), ("other", 4096)], vec![("mem", len)]] {
        let stream = paged_stream(12, &blocks, |s| s.ram_page(0, 0, &[0xab; 4096]).expect("page"));
        let e = load(&mut vm, &stream).expect_err("a foreign block list was accepted");
        assert!(e.to_string().contains("this VM has one RAM block 'pc.ram'"), "{e}");
        assert!(ram_bytes(&vm).iter().all(|&b| b == 0), "RAM was written");
    }
}
