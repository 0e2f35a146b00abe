//! Dirty-page tracking: a page-granular atomic bitmap the VMM (or device
//! emulation) marks, and sources the engine harvests at every sync. Sources
//! combine by OR. Bitmaps are sized once; a sync allocates nothing.

mod bitmap;

pub use bitmap::{count_bits, set_bits, DirtyBitmap};
#[cfg(target_os = "linux")]
mod uffd;
#[cfg(target_os = "linux")]
pub use uffd::{UffdSyncStats, UffdWriteProtect};

/// Page size used for dirty tracking: [`savevm_format::TARGET_PAGE_SIZE`].
pub const PAGE_SIZE: u64 = savevm_format::TARGET_PAGE_SIZE as u64;

/// A source of dirty pages for one RAM block, harvested at each bitmap sync.
pub trait DirtySource: Send {
    /// Start tracking (e.g. write-protect the memory); pages written from now on
    /// are reported by the next [`sync`](Self::sync).
    fn start(&mut self) -> Result<(), DirtyError>;

    /// OR every page dirtied since the previous sync (or `start`) into `out`
    /// (bit i = page i of the block, `u64` words, LSB first) and re-arm tracking.
    /// `out` has one bit per page of the block; must not allocate.
    fn sync(&mut self, out: &mut [u64]) -> Result<(), DirtyError>;

    /// Stop tracking and release what `start` set up.
    fn stop(&mut self) -> Result<(), DirtyError>;
}

/// A source borrowed for one migration (`&mut KvmDirtyLog`, say).
impl<T: DirtySource + ?Sized> DirtySource for &mut T {
    fn start(&mut self) -> Result<(), DirtyError> {
        (**self).start()
    }
    fn sync(&mut self, out: &mut [u64]) -> Result<(), DirtyError> {
        (**self).sync(out)
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        (**self).stop()
    }
}

/// A bitmap the VMM marks (shared with its writers) as a source: marks made before
/// the migration started are covered by the bulk pass and dropped at `start`.
impl DirtySource for std::sync::Arc<DirtyBitmap> {
    fn start(&mut self) -> Result<(), DirtyError> {
        self.clear();
        Ok(())
    }
    fn sync(&mut self, out: &mut [u64]) -> Result<(), DirtyError> {
        self.drain_into(out);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
}

/// Dirty tracking failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// The kernel refused an operation.
    #[error("{op}")]
    Os {
        /// What was being done (e.g. `UFFDIO_REGISTER`).
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The feature is not available on this kernel or for this memory.
    #[error("dirty tracking unavailable: {0}")]
    Unsupported(String),
}
