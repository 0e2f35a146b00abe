//! How guest RAM is laid out in guest-physical memory: one RAM block (`pc.ram`,
//! one host mapping, one block in the migration stream) mapped into one or two
//! KVM memory slots, the second split the way x86 PCs split RAM around the PCI
//! hole below 4 GiB, scaled down by 16 (RAM below 192 MiB, a hole up to 256 MiB,
//! the rest from 256 MiB).

/// Bytes of RAM below the scaled-down PCI hole.
pub const LOW_RAM_MAX: u64 = 192 << 20;
/// Guest-physical start of RAM above the scaled-down PCI hole.
pub const HIGH_RAM_START: u64 = 256 << 20;
/// Largest guest RAM the identity page tables cover with the hole.
pub const MAX_RAM: u64 = (4 << 30) - HIGH_RAM_START;

/// One KVM memory slot: a range of the RAM block at a guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Guest-physical address.
    pub gpa: u64,
    /// Offset in the RAM block.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The RAM block's slots, in guest-physical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// RAM block size.
    pub ram_size: u64,
    /// Its slots (they cover the block exactly, in order).
    pub slots: Vec<Slot>,
}

/// Layout errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The size is unusable.
    #[error("guest RAM size {0} bytes: must be a multiple of 2 MiB between 4 MiB and {MAX_RAM} bytes")]
    Size(u64),
    /// The slots do not cover the block in order (a hand-built layout).
    #[error("bad slot layout: {0}")]
    Slots(String),
    /// Two slots were asked for but the RAM fits below the hole.
    #[error("a two-slot layout needs more than {LOW_RAM_MAX} bytes of RAM (got {0})")]
    TooSmallForTwoSlots(u64),
    /// A firmware image does not fit.
    #[error("firmware image: {0}")]
    Firmware(String),
}

impl Layout {
    /// All RAM in one slot at guest-physical 0.
    pub fn one_slot(ram_size: u64) -> Result<Self, LayoutError> {
        check(ram_size)?;
        Ok(Layout { ram_size, slots: vec![Slot { gpa: 0, offset: 0, len: ram_size }] })
    }

    /// RAM below the scaled-down PCI hole in slot 0, the rest above it in slot 1.
    pub fn pc_split(ram_size: u64) -> Result<Self, LayoutError> {
        check(ram_size)?;
        if ram_size <= LOW_RAM_MAX {
            return Err(LayoutError::TooSmallForTwoSlots(ram_size));
        }
        Ok(Layout {
            ram_size,
            slots: vec![
                Slot { gpa: 0, offset: 0, len: LOW_RAM_MAX },
                Slot { gpa: HIGH_RAM_START, offset: LOW_RAM_MAX, len: ram_size - LOW_RAM_MAX },
            ],
        })
    }

    /// `slots` = 1 or 2.
    pub fn with_slots(ram_size: u64, slots: u32) -> Result<Self, LayoutError> {
        if slots >= 2 {
            Self::pc_split(ram_size)
        } else {
            Self::one_slot(ram_size)
        }
    }

    /// Check a layout built by hand: at least one slot, page-aligned, covering the
    /// block in order without gaps, within the identity-mapped 4 GiB.
    pub fn validate(&self) -> Result<(), LayoutError> {
        check(self.ram_size)?;
        let mut next = 0;
        let mut last_end = 0;
        for s in &self.slots {
            let aligned = [s.gpa, s.offset, s.len].iter().all(|v| v.is_multiple_of(4096));
            let end = s.gpa.checked_add(s.len);
            if !aligned || s.len == 0 || s.offset != next || s.gpa < last_end || end.is_none_or(|e| e > 4 << 30) {
                return Err(LayoutError::Slots(format!("{s:?}")));
            }
            next += s.len;
            last_end = s.gpa + s.len;
        }
        if self.slots.is_empty() || next != self.ram_size {
            return Err(LayoutError::Slots(format!("slots cover {next} of {} bytes", self.ram_size)));
        }
        Ok(())
    }

    /// The block offset of guest-physical `gpa`, if it is RAM.
    pub fn offset_of(&self, gpa: u64) -> Option<u64> {
        self.slots.iter().find(|s| gpa >= s.gpa && gpa - s.gpa < s.len).map(|s| s.offset + (gpa - s.gpa))
    }
}

/// Largest firmware image (`-bios`) accepted.
pub const FIRMWARE_MAX: u64 = 16 << 20;
/// Bytes of the firmware's legacy alias below 1 MiB (its last 128 KiB, as QEMU's PC machines map it).
pub const FIRMWARE_ALIAS_MAX: u64 = 128 << 10;

/// Where a raw firmware image (QEMU's `-bios FILE`) goes: the whole image
/// read-only just below 4 GiB, and its last [`FIRMWARE_ALIAS_MAX`] bytes (the
/// whole image if smaller) again just below 1 MiB, where real-mode code at
/// `f000:xxxx` runs. In this VMM the alias is a copy in guest RAM (so it migrates
/// as RAM); the top-of-4-GiB copy is a KVM read-only slot outside `pc.ram`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firmware {
    /// Image size in bytes.
    pub size: u64,
    /// Guest-physical address of the read-only image (4 GiB - size).
    pub rom_gpa: u64,
    /// Guest-physical address of the alias below 1 MiB (1 MiB - alias length).
    pub alias_gpa: u64,
    /// Offset in the image where the alias starts.
    pub alias_from: u64,
    /// Alias length in bytes.
    pub alias_len: u64,
}

impl Firmware {
    /// The placement of an image of `size` bytes in a guest with `layout`: the size
    /// must be a non-zero multiple of 4 KiB up to [`FIRMWARE_MAX`], the alias must lie
    /// in RAM and the RAM must end below the image.
    pub fn place(size: u64, layout: &Layout) -> Result<Self, LayoutError> {
        if size == 0 || !size.is_multiple_of(4096) || size > FIRMWARE_MAX {
            return Err(LayoutError::Firmware(format!(
                "{size} bytes: must be a non-zero multiple of 4 KiB up to {FIRMWARE_MAX}"
            )));
        }
        let alias_len = size.min(FIRMWARE_ALIAS_MAX);
        let fw = Firmware {
            size,
            rom_gpa: (4 << 30) - size,
            alias_gpa: (1 << 20) - alias_len,
            alias_from: size - alias_len,
            alias_len,
        };
        if layout.offset_of(fw.alias_gpa).is_none() || layout.offset_of((1 << 20) - 1).is_none() {
            return Err(LayoutError::Firmware("its alias below 1 MiB is not in RAM".into()));
        }
        if layout.slots.iter().any(|s| s.gpa + s.len > fw.rom_gpa) {
            return Err(LayoutError::Firmware(format!("RAM overlaps the image at {:#x}", fw.rom_gpa)));
        }
        Ok(fw)
    }
}

fn check(ram_size: u64) -> Result<(), LayoutError> {
    if !((4 << 20)..=MAX_RAM).contains(&ram_size) || !ram_size.is_multiple_of(2 << 20) {
        return Err(LayoutError::Size(ram_size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_block() {
        let l = Layout::pc_split(1 << 30).unwrap();
        assert_eq!(l.slots.iter().map(|s| s.len).sum::<u64>(), 1 << 30);
        assert_eq!(l.offset_of(HIGH_RAM_START), Some(LOW_RAM_MAX));
        assert_eq!(l.offset_of(LOW_RAM_MAX), None);
        assert_eq!(Layout::pc_split(64 << 20), Err(LayoutError::TooSmallForTwoSlots(64 << 20)));
        assert!(Layout::one_slot(3 << 20).is_err());
        assert_eq!(l.validate(), Ok(()));
        let mut gap = l.clone();
        gap.slots[1].offset += 4096;
        assert!(gap.validate().is_err());
        let empty = Layout { ram_size: 64 << 20, slots: vec![] };
        assert!(empty.validate().is_err());
    }

    #[test]
    fn firmware_goes_below_4g_and_1m() {
        let l = Layout::one_slot(16 << 20).unwrap();
        let fw = Firmware::place(64 << 10, &l).unwrap();
        assert_eq!((fw.rom_gpa, fw.alias_gpa, fw.alias_from, fw.alias_len), (0xffff_0000, 0xf_0000, 0, 64 << 10));
        let big = Firmware::place(256 << 10, &l).unwrap();
        assert_eq!(
            (big.rom_gpa, big.alias_gpa, big.alias_from, big.alias_len),
            (0xfffc_0000, 0xe_0000, 128 << 10, 128 << 10)
        );
        assert!(Firmware::place(0, &l).is_err());
        assert!(Firmware::place(1000, &l).is_err());
        assert!(Firmware::place(32 << 20, &l).is_err());
        // RAM reaching into the image's place.
        let high = Layout {
            ram_size: 8 << 20,
            slots: vec![
                Slot { gpa: 0, offset: 0, len: 4 << 20 },
                Slot { gpa: (4 << 30) - (4 << 20), offset: 4 << 20, len: 4 << 20 },
            ],
        };
        assert_eq!(high.validate(), Ok(()));
        assert!(Firmware::place(64 << 10, &high).is_err());
    }
}
