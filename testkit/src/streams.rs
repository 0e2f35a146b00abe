//! Hand-built migration streams for destination tests: any target page size, any
//! block list, records written by the caller.

use savevm_format::{section_ids, write_guest_epilogue, Configuration, RamBlock, StoppedGuest, StreamWriter};

/// A complete stream (QEMU 7.2's layout) for machine `none` with target pages of
/// `1 << bits` bytes (`configuration/target-page-bits` is sent when `bits` is not
/// 12), RAM blocks `blocks` (name, length), then one PART section whose records
/// `part` writes, then the epilogue (END, `timer`, `globalstate`, EOF, vmdesc).
/// Panics on a record the writer refuses (a test's own mistake).
pub fn paged_stream(bits: u32, blocks: &[(&str, u64)], part: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut s = StreamWriter::new(Vec::new());
    s.header().expect("header");
    let cfg =
        Configuration { machine: "none".into(), target_page_bits: (bits != 12).then_some(bits), ..Default::default() };
    s.configuration(&cfg).expect("configuration");
    s.section_start(section_ids::RAM, "ram", 0, 4).expect("RAM START");
    let list: Vec<RamBlock> = blocks.iter().enumerate().map(|(i, (n, l))| RamBlock::new(i, *n, *l)).collect();
    s.ram_block_list(&list).expect("block list");
    s.ram_eos().expect("EOS");
    s.footer(section_ids::RAM).expect("footer");
    s.section_part(section_ids::RAM).expect("RAM PART");
    part(&mut s);
    write_guest_epilogue(&mut s, &StoppedGuest::default()).expect("epilogue");
    s.finish().expect("finish")
}
