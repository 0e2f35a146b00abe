//! A raw firmware image (`-bios`): mapped read-only below 4 GiB and aliased below
//! 1 MiB, and run from the reset vector (the fixtures' busy-bios.bin: a loop
//! writing a 16-bit counter into pages 16..143).

use engine::vm::VcpuControl;
use minivmm::layout::Layout;
use minivmm::Vm;
use std::time::{Duration, Instant};

fn busy_bios() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/busy-bios.bin");
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn firmware_is_mapped_and_runs_from_the_reset_vector() {
    if !testkit::kvm_or_skip("firmware_is_mapped_and_runs_from_the_reset_vector") {
        return;
    }
    let image = busy_bios();
    let mut vm = Vm::new(Layout::one_slot(16 << 20).unwrap()).unwrap();
    let fw = vm.map_firmware(&image, true).unwrap();
    assert_eq!(fw.rom_gpa, (4 << 30) - image.len() as u64);
    // The top-of-4-GiB mapping holds the whole image...
    let (placed, rom) = vm.firmware().unwrap();
    assert_eq!(placed, fw);
    let mut top = vec![0u8; image.len()];
    rom.copy_to(&mut top);
    assert!(top == image, "the read-only mapping differs from the image");
    // ...and RAM below 1 MiB its last 128 KiB (all of a 64 KiB image).
    let mut alias = vec![0u8; fw.alias_len as usize];
    vm.read_ram(fw.alias_gpa, &mut alias).unwrap();
    assert!(alias[..] == image[fw.alias_from as usize..], "the alias below 1 MiB differs from the image");
    assert_eq!(fw.alias_gpa + fw.alias_len, 1 << 20);

    // From KVM's reset state the vCPU jumps to f000:0 and starts writing page 16.
    let mut v = vm.vcpus();
    v.resume().unwrap();
    let word = |vm: &Vm| {
        let mut w = [0u8; 2];
        vm.read_ram(16 * 4096, &mut w).unwrap();
        u16::from_le_bytes(w)
    };
    let start = Instant::now();
    let mut seen = vec![];
    while seen.len() < 3 && start.elapsed() < Duration::from_secs(60) {
        let w = word(&vm);
        if w != 0 && seen.last() != Some(&w) {
            seen.push(w);
        }
        std::thread::yield_now();
    }
    v.stop().unwrap();
    assert_eq!(vm.vcpus().error(), None);
    assert!(seen.len() >= 3, "the firmware's counter at page 16 did not advance: {seen:?}");
    // Page 143's second word is written too; page 144 is not.
    let mut w = [0u8; 2];
    vm.read_ram(143 * 4096 + 0x800, &mut w).unwrap();
    assert_ne!(w, [0, 0]);
    vm.read_ram(144 * 4096, &mut w).unwrap();
    assert_eq!(w, [0, 0]);
}
