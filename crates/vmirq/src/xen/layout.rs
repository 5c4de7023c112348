//! Where the 2-level event-channel bits live in `shared_info` / `vcpu_info` (xen.h; QEMU
//! xen_evtchn.c `compat_shared_info` for 32-bit guests), and checked atomic read-modify-writes
//! on them in guest memory.
//!
//! ```text
//!                         64-bit guest         32-bit compat guest
//! vcpu_info[32]           0x000, 64 B each     0x000, 64 B each
//!   evtchn_upcall_pending +0 (u8)              +0 (u8)
//!   evtchn_upcall_mask    +1 (u8)              +1 (u8)
//!   evtchn_pending_sel    +8 (u64)             +4 (u32)
//! evtchn_pending[]        0x800, 64 x u64      0x800, 32 x u32
//! evtchn_mask[]           0xA00, 64 x u64      0x880, 32 x u32
//! wc_version              0xC00                0x900
//! ports                   4096                 1024
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use super::abi::XenError;

/// `XEN_LEGACY_MAX_VCPUS`: vCPUs whose `vcpu_info` sits in `shared_info`.
pub const LEGACY_MAX_VCPUS: u32 = 32;
/// vCPUs of an HVM guest (Xen `HVM_MAX_VCPUS`); those from [`LEGACY_MAX_VCPUS`] on have a
/// `vcpu_info` only once they register one.
pub const MAX_VCPUS: u32 = 128;
/// A vCPU's entry in the placement table while it has registered no `vcpu_info` (any
/// guest address, 0 included, can be registered; this one is never 8-byte aligned).
pub const NOT_PLACED: u64 = u64::MAX;
/// Bytes of one `struct vcpu_info`, in `shared_info` or wherever the guest placed it.
pub const VCPU_INFO_SIZE: u64 = 64;
/// Offset of the `evtchn_upcall_pending` byte in `vcpu_info`.
pub const UPCALL_PENDING: u64 = 0;
/// Offset of the `evtchn_upcall_mask` byte in `vcpu_info`.
pub const UPCALL_MASK: u64 = 1;

/// The 2-level layout of one guest word size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of one `xen_ulong_t` word: 8, or 4 for compat guests.
    pub word_bytes: u64,
    /// Ports the 2-level ABI addresses: word bits squared.
    pub ports: u32,
    /// Offset of `evtchn_pending[]` in `shared_info`.
    pub pending: u64,
    /// Offset of `evtchn_mask[]` in `shared_info`.
    pub mask: u64,
    /// Offset of `evtchn_pending_sel` in `vcpu_info`.
    pub pending_sel: u64,
    /// Offset of `wc_version` in `shared_info` (first field after the mask words).
    pub wallclock: u64,
}

impl Layout {
    /// A 64-bit guest: 64-bit words, 4096 ports.
    pub const LONG_MODE: Layout = Layout {
        word_bytes: 8,
        ports: 4096,
        pending: 0x800,
        mask: 0xA00,
        pending_sel: 8,
        wallclock: 0xC00,
    };
    /// A 32-bit compat guest: 32-bit words, 1024 ports.
    pub const COMPAT: Layout = Layout {
        word_bytes: 4,
        ports: 1024,
        pending: 0x800,
        mask: 0x880,
        pending_sel: 4,
        wallclock: 0x900,
    };

    /// [`Self::LONG_MODE`] for a 64-bit guest, else [`Self::COMPAT`].
    pub fn new(long_mode: bool) -> Self {
        if long_mode {
            Self::LONG_MODE
        } else {
            Self::COMPAT
        }
    }

    /// Bits of one `xen_ulong_t` word: 64, or 32 for compat guests.
    pub fn word_bits(&self) -> u32 {
        (self.word_bytes * 8) as u32
    }

    /// The index of `port`'s word in `evtchn_pending[]` / `evtchn_mask[]` (and so its bit in
    /// `evtchn_pending_sel`), and the port's bit in that word.
    pub fn word_and_bit(&self, port: u32) -> (u32, u32) {
        (port / self.word_bits(), port % self.word_bits())
    }

    /// Offset of `vcpu`'s legacy `vcpu_info` slot in `shared_info`.
    pub fn vcpu_info(&self, vcpu: u32) -> u64 {
        u64::from(vcpu) * VCPU_INFO_SIZE
    }
}

/// The 2-level bits of one guest, reached through checked guest-memory accessors. Every access
/// is an atomic RMW on the guest's page (the guest changes these bits concurrently); an
/// address outside guest RAM or misaligned is `XenError::Fault`, never a panic.
pub struct SharedInfo<'a> {
    memory: &'a GuestMemoryMmap,
    /// The shared_info page, resolved once per operation (one region lookup, then only
    /// offset checks); `None` if it is not wholly in guest RAM.
    page: Option<vm_memory::VolatileSlice<'a, ()>>,
    /// Per vCPU: the guest physical address of a `vcpu_info` the guest placed itself
    /// (VCPUOP_register_vcpu_info), or [`NOT_PLACED`] for the legacy slot in shared_info.
    placed: &'a [AtomicU64],
    /// The layout of the guest's word size.
    pub layout: Layout,
}

/// Bytes of the shared_info page.
const SHARED_INFO_SIZE: usize = 0x1000;

type Slice<'a> = vm_memory::VolatileSlice<'a, ()>;

impl<'a> SharedInfo<'a> {
    /// The bits of the `shared_info` page at guest physical address `base`, with `vcpu_info`s
    /// placed as `placed` says (one entry per vCPU, [`NOT_PLACED`] for the legacy slot, which
    /// only vCPUs below [`LEGACY_MAX_VCPUS`] have). Never fails: a page
    /// not wholly in guest RAM makes the accesses to it return `XenError::Fault`.
    pub fn new(
        memory: &'a GuestMemoryMmap,
        base: u64,
        layout: Layout,
        placed: &'a [AtomicU64],
    ) -> Self {
        let page = memory.get_slice(GuestAddress(base), SHARED_INFO_SIZE).ok();
        Self {
            memory,
            page,
            placed,
            layout,
        }
    }

    fn page(&self) -> Result<Slice<'a>, XenError> {
        self.page.ok_or(XenError::Fault)
    }

    /// Where `vcpu`'s `vcpu_info` is: placed by the guest, the legacy slot, or nowhere (a vCPU
    /// from [`LEGACY_MAX_VCPUS`] on that registered none: Xen's `dummy_vcpu_info`).
    fn placement(&self, vcpu: u32) -> Option<u64> {
        match self.placed.get(vcpu as usize)?.load(Ordering::Acquire) {
            NOT_PLACED => (vcpu < LEGACY_MAX_VCPUS).then_some(NOT_PLACED),
            gpa => Some(gpa),
        }
    }

    /// Whether `vcpu` has a `vcpu_info` to receive selector bits and `upcall_pending`.
    pub fn has_vcpu_info(&self, vcpu: u32) -> bool {
        self.placement(vcpu).is_some()
    }

    /// The slice holding `vcpu`'s `vcpu_info`, and the offset of the `vcpu_info` in it.
    fn vcpu_area(&self, vcpu: u32) -> Result<(Slice<'a>, u64), XenError> {
        match self.placement(vcpu).ok_or(XenError::Fault)? {
            NOT_PLACED => Ok((self.page()?, self.layout.vcpu_info(vcpu))),
            gpa => Ok((
                self.memory
                    .get_slice(GuestAddress(gpa), VCPU_INFO_SIZE as usize)
                    .map_err(|_| XenError::Fault)?,
                0,
            )),
        }
    }

    /// Atomically `word = op(word)` on the shared_info word at `offset`; returns the old word.
    fn rmw(&self, offset: u64, op: Rmw, bits: u64) -> Result<u64, XenError> {
        self.rmw_in(self.page()?, offset, op, bits)
    }

    fn rmw_in(&self, slice: Slice<'a>, offset: u64, op: Rmw, bits: u64) -> Result<u64, XenError> {
        let offset = usize::try_from(offset).map_err(|_| XenError::Fault)?;
        let order = Ordering::SeqCst;
        if self.layout.word_bytes == 8 {
            let w = slice
                .get_atomic_ref::<AtomicU64>(offset)
                .map_err(|_| XenError::Fault)?;
            Ok(match op {
                Rmw::Or => w.fetch_or(bits, order),
                Rmw::AndNot => w.fetch_and(!bits, order),
                Rmw::Load => w.load(order),
            })
        } else {
            let w = slice
                .get_atomic_ref::<AtomicU32>(offset)
                .map_err(|_| XenError::Fault)?;
            let bits = bits as u32;
            Ok(u64::from(match op {
                Rmw::Or => w.fetch_or(bits, order),
                Rmw::AndNot => w.fetch_and(!bits, order),
                Rmw::Load => w.load(order),
            }))
        }
    }

    fn port_op(&self, array: u64, port: u32, op: Rmw) -> Result<bool, XenError> {
        let (word, bit) = self.layout.word_and_bit(port);
        let offset = array + u64::from(word) * self.layout.word_bytes;
        Ok(self.rmw(offset, op, 1 << bit)? & (1 << bit) != 0)
    }

    /// Sets the port's pending bit; returns whether it was already set.
    pub fn test_and_set_pending(&self, port: u32) -> Result<bool, XenError> {
        self.port_op(self.layout.pending, port, Rmw::Or)
    }

    /// The port's pending bit.
    pub fn test_pending(&self, port: u32) -> Result<bool, XenError> {
        self.port_op(self.layout.pending, port, Rmw::Load)
    }

    /// Clears the port's pending bit.
    pub fn clear_pending(&self, port: u32) -> Result<(), XenError> {
        self.port_op(self.layout.pending, port, Rmw::AndNot)
            .map(drop)
    }

    /// The port's mask bit.
    pub fn test_mask(&self, port: u32) -> Result<bool, XenError> {
        self.port_op(self.layout.mask, port, Rmw::Load)
    }

    /// Clears the port's mask bit; returns whether it was set.
    pub fn test_and_clear_mask(&self, port: u32) -> Result<bool, XenError> {
        self.port_op(self.layout.mask, port, Rmw::AndNot)
    }

    /// Sets bit `word` of the vCPU's `evtchn_pending_sel`; returns whether it was already set.
    ///
    /// Reads before it writes: a bit already set needs no locked RMW (the common case under
    /// load, many ports per word). That is as good as Xen's `test_and_set_bit`: the caller set
    /// the port's pending bit with a full barrier first, so a guest that takes the selector
    /// word (xchg with 0) after this load still scans the port; one that took it before the
    /// load left the bit clear, and then we set it.
    pub fn test_and_set_selector(&self, vcpu: u32, word: u32) -> Result<bool, XenError> {
        let (slice, at) = self.vcpu_area(vcpu)?;
        let offset = at + self.layout.pending_sel;
        let bit = 1 << word;
        if self.rmw_in(slice, offset, Rmw::Load, 0)? & bit != 0 {
            return Ok(true);
        }
        Ok(self.rmw_in(slice, offset, Rmw::Or, bit)? & bit != 0)
    }

    /// Runs `op` on the vCPU's `evtchn_upcall_pending` byte.
    fn upcall_byte<R>(&self, vcpu: u32, op: impl FnOnce(&AtomicU8) -> R) -> Result<R, XenError> {
        let (slice, at) = self.vcpu_area(vcpu)?;
        let offset = usize::try_from(at + UPCALL_PENDING).map_err(|_| XenError::Fault)?;
        let byte = slice
            .get_atomic_ref::<AtomicU8>(offset)
            .map_err(|_| XenError::Fault)?;
        Ok(op(byte))
    }

    /// Sets bit 0 of the vCPU's `evtchn_upcall_pending`; returns whether it was already set
    /// (Xen `vcpu_mark_events_pending`: `test_and_set_bit(0, ...)`).
    pub fn test_and_set_upcall_pending(&self, vcpu: u32) -> Result<bool, XenError> {
        self.upcall_byte(vcpu, |b| b.fetch_or(1, Ordering::SeqCst) & 1 != 0)
    }

    /// Bit 0 of the vCPU's `evtchn_upcall_pending`.
    pub fn upcall_pending(&self, vcpu: u32) -> Result<bool, XenError> {
        self.upcall_byte(vcpu, |b| b.load(Ordering::SeqCst) & 1 != 0)
    }

    /// ORs into this page every pending bit, and into each legacy `vcpu_info` slot the
    /// selector bits and `upcall_pending`, that `old` has: what deliveries set on a page that
    /// was moved away from after it was copied. Returns the vCPUs whose `upcall_pending` this
    /// set (those below `vcpus` in the legacy slots).
    pub fn merge_from(&self, old: &SharedInfo<'_>, vcpus: u32) -> Result<Vec<u32>, XenError> {
        let words = u64::from(self.layout.ports / self.layout.word_bits());
        for w in 0..words {
            let offset = self.layout.pending + w * self.layout.word_bytes;
            let bits = old.rmw(offset, Rmw::Load, 0)?;
            if bits != 0 {
                self.rmw(offset, Rmw::Or, bits)?;
            }
        }
        let mut raised = Vec::new();
        for vcpu in 0..vcpus.min(LEGACY_MAX_VCPUS) {
            if self.placement(vcpu) != Some(NOT_PLACED) {
                continue;
            }
            let sel = self.layout.vcpu_info(vcpu) + self.layout.pending_sel;
            let bits = old.rmw(sel, Rmw::Load, 0)?;
            if bits != 0 {
                self.rmw(sel, Rmw::Or, bits)?;
            }
            if old.upcall_pending(vcpu)? && !self.test_and_set_upcall_pending(vcpu)? {
                raised.push(vcpu);
            }
        }
        Ok(raised)
    }

    /// Marks every selector bit of `vcpu` (Xen map_vcpu_info: "mark everything as being
    /// pending just to make sure nothing gets lost").
    pub fn set_all_selectors(&self, vcpu: u32) -> Result<(), XenError> {
        let (slice, at) = self.vcpu_area(vcpu)?;
        self.rmw_in(slice, at + self.layout.pending_sel, Rmw::Or, u64::MAX)
            .map(drop)
    }
}

#[derive(Clone, Copy)]
enum Rmw {
    Or,
    AndNot,
    Load,
}
