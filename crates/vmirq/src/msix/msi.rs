//! The MSI capability in PCI configuration space (PCI 3.0 §6.8.1).

use super::spec;
use super::table::VectorEffects;
use crate::msi::MsiMessage;

/// An MSI capability's registers in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiCapabilityState {
    /// MMC: log2 of the vectors the function has.
    pub log2_capable: u16,
    /// 64-bit address capable.
    pub is_64bit: bool,
    /// Per-vector masking capable.
    pub per_vector_mask: bool,
    /// The next-capability pointer.
    pub next: u8,
    /// MSI enable.
    pub enabled: bool,
    /// MME: log2 of the vectors software granted.
    pub log2_enabled: u16,
    /// Message address, low dword.
    pub address_lo: u32,
    /// Message address, high dword.
    pub address_hi: u32,
    /// Message data.
    pub data: u16,
    /// Per-vector mask bits.
    pub mask: u32,
    /// Per-vector pending bits.
    pub pending: u32,
}

/// An MSI capability: message control, address, data and (optionally) per-vector mask and
/// pending bits, as the guest sees them in config space.
///
/// A pure state machine like [`super::MsixTable`], reporting in the same [`VectorEffects`].
/// One rule decides delivery, [`MsiCapability::is_masked`]: vector `v` is deliverable when MSI
/// is enabled, `v < 2^MME`, and (with per-vector masking) its mask bit is clear.
///
/// Effects of a config write, all computed once around the whole write:
/// - enable 1 → 0: `disabled` only;
/// - otherwise every vector whose deliverability changed is in `unmasked`/`masked`, and every
///   vector deliverable before and after whose message changed is in `message_changed`. That
///   one rule also covers an MME change while enabled (Linux never does it; PCI leaves it
///   undefined): vectors leaving `0..2^MME` are masked, new ones unmasked, and vectors whose
///   data bits the new MME rewrites get `message_changed`.
///
/// Layout (offsets within the capability; [`MsiCapability::len`] bytes, rounded to dwords):
///
/// | offset         | 32-bit       | 64-bit         |
/// |----------------|--------------|----------------|
/// | 0x00           | ID 0x05, next pointer, message control (u16 @ 0x02) | same |
/// | 0x04           | address low  | address low    |
/// | 0x08           | data (u16)   | address high   |
/// | 0x0C           | mask bits*   | data (u16)     |
/// | 0x10           | pending bits*| mask bits*     |
/// | 0x14           |              | pending bits*  |
///
/// (*) only with per-vector masking. Accesses may have any size and alignment: each byte inside
/// the capability reads its register byte, each byte past its end reads 0xFF and is not written.
#[derive(Clone, Debug)]
pub struct MsiCapability {
    /// Multiple message capable: log2 of the vectors the function has. Read-only.
    log2_capable: u16,
    is_64bit: bool,
    per_vector_mask: bool,
    /// The next-capability pointer, owned by whoever lays out config space.
    next: u8,
    enabled: bool,
    /// Multiple message enable: log2 of the vectors software granted, at most `log2_capable`.
    log2_enabled: u16,
    /// Bits 1:0 are always 0: the address is dword-aligned (§6.8.1.4).
    address_lo: u32,
    /// Always 0 on a 32-bit capability.
    address_hi: u32,
    data: u16,
    mask: u32,
    pending: u32,
}

impl MsiCapability {
    /// A capability with `max_vectors` vectors (rounded down to a power of two and clamped to
    /// `1..=32`), in its reset state: disabled, MME 0, address, data, mask and pending 0.
    pub fn new(max_vectors: u8, is_64bit: bool, per_vector_mask: bool) -> Self {
        let max_vectors = max_vectors.clamp(1, spec::MSI_MAX_VECTORS);
        Self {
            log2_capable: max_vectors.ilog2() as u16,
            is_64bit,
            per_vector_mask,
            next: 0,
            enabled: false,
            log2_enabled: 0,
            address_lo: 0,
            address_hi: 0,
            data: 0,
            mask: 0,
            pending: 0,
        }
    }

    /// Everything the capability holds, for a snapshot.
    pub fn save(&self) -> MsiCapabilityState {
        let Self {
            log2_capable,
            is_64bit,
            per_vector_mask,
            next,
            enabled,
            log2_enabled,
            address_lo,
            address_hi,
            data,
            mask,
            pending,
        } = *self;
        MsiCapabilityState {
            log2_capable,
            is_64bit,
            per_vector_mask,
            next,
            enabled,
            log2_enabled,
            address_lo,
            address_hi,
            data,
            mask,
            pending,
        }
    }

    /// The capability as `state` saved it; refused (`Err` naming why) if it holds what no
    /// capability can: more than 32 vectors, MME above MMC, an unaligned address, an upper
    /// address on a 32-bit capability, mask or pending bits without per-vector masking or
    /// past the last vector.
    pub fn restore(state: &MsiCapabilityState) -> Result<Self, String> {
        let MsiCapabilityState {
            log2_capable,
            is_64bit,
            per_vector_mask,
            next,
            enabled,
            log2_enabled,
            address_lo,
            address_hi,
            data,
            mask,
            pending,
        } = *state;
        let max = u32::from(spec::MSI_MAX_VECTORS).ilog2() as u16;
        if log2_capable > max || log2_enabled > log2_capable {
            return Err(format!("MMC {log2_capable}, MME {log2_enabled}"));
        }
        if address_lo & 3 != 0 || (!is_64bit && address_hi != 0) {
            return Err(format!("address {address_hi:#x}:{address_lo:#x}"));
        }
        let vectors = 1u64 << (1u32 << log2_capable);
        let bits = u64::from(mask | pending);
        if (!per_vector_mask && bits != 0) || bits >= vectors {
            return Err(format!("mask {mask:#x}, pending {pending:#x}"));
        }
        Ok(Self {
            log2_capable,
            is_64bit,
            per_vector_mask,
            next,
            enabled,
            log2_enabled,
            address_lo,
            address_hi,
            data,
            mask,
            pending,
        })
    }

    /// Sets the next-capability pointer (offset 0x01), which the guest cannot write.
    pub fn set_next(&mut self, next: u8) {
        self.next = next;
    }

    /// Size of the capability in config space, in whole dwords.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        spec::msi_cap_len(self.is_64bit, self.per_vector_mask)
    }

    /// Vectors the function supports (2^MMC).
    pub fn max_vectors(&self) -> u16 {
        1 << self.log2_capable
    }

    /// Message control bit 0: MSI enable.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The message control word.
    pub fn message_control(&self) -> u16 {
        let mut value = self.log2_capable << spec::MSI_CTRL_MMC_SHIFT
            | self.log2_enabled << spec::MSI_CTRL_MME_SHIFT;
        if self.enabled {
            value |= spec::MSI_CTRL_ENABLE;
        }
        if self.is_64bit {
            value |= spec::MSI_CTRL_64BIT;
        }
        if self.per_vector_mask {
            value |= spec::MSI_CTRL_PER_VECTOR_MASK;
        }
        value
    }

    /// A guest config read at `offset` within the capability. Never panics.
    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(at) if at < self.len() => (self.dword(at & !3) >> ((at & 3) * 8)) as u8,
                _ => 0xff,
            };
        }
    }

    /// A guest config write at `offset` within the capability. Never panics. Writable: enable
    /// (control bit 0), MME (bits 6:4, clamped to MMC as QEMU `msi_write_config` does), the
    /// address (low bits 1:0 read 0; high only when 64-bit), the 16-bit data and the mask bits
    /// of existing vectors. Everything else is read-only.
    pub fn config_write(&mut self, offset: u64, data: &[u8], fx: &mut VectorEffects) {
        let was_enabled = self.enabled;
        let before = self.states();
        for (i, &byte) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64).filter(|&at| at < self.len()) else {
                continue;
            };
            let shift = (at & 3) * 8;
            let old = self.dword(at & !3);
            let new = old & !(0xff << shift) | u32::from(byte) << shift;
            self.write_dword(at & !3, new);
        }
        if was_enabled && !self.enabled {
            fx.disabled = true;
            return;
        }
        let after = self.states();
        for (v, (b, a)) in before.into_iter().zip(after).enumerate() {
            fx.record(v as u16, b, a);
        }
    }

    /// Vectors software enabled: 2^MME while MSI is enabled, else 0.
    pub fn enabled_vectors(&self) -> u16 {
        if self.enabled {
            1 << self.log2_enabled
        } else {
            0
        }
    }

    /// The message vector `vector` sends: the programmed address, and the data with its low
    /// MME bits replaced by the vector number (§6.8.1.6). `None` for `vector >= 2^MME`; whether
    /// MSI is enabled or the vector masked does not matter.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        if vector >= 1 << self.log2_enabled {
            return None;
        }
        let low = (1u16 << self.log2_enabled) - 1;
        let data = self.data & !low | vector;
        let address = u64::from(self.address_hi) << 32 | u64::from(self.address_lo);
        Some(MsiMessage::new(address, u32::from(data)))
    }

    /// Whether `vector` is not deliverable: MSI disabled, `vector >= 2^MME`, or its mask bit
    /// set (per-vector masking only).
    pub fn is_masked(&self, vector: u16) -> bool {
        !self.enabled || vector >= 1 << self.log2_enabled || self.mask_bit(vector)
    }

    /// The vector's pending bit. Always false without per-vector masking: there is no register.
    pub fn is_pending(&self, vector: u16) -> bool {
        vector < self.max_vectors() && self.pending & 1 << vector != 0
    }

    /// Sets or clears the vector's pending bit (the manager latches and clears it). Ignored
    /// without per-vector masking and for vectors past 2^MMC.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        if !self.per_vector_mask || vector >= self.max_vectors() {
            return;
        }
        if pending {
            self.pending |= 1 << vector;
        } else {
            self.pending &= !(1 << vector);
        }
    }

    /// Back to the reset state (QEMU `msi_reset`: enable, MME, address, data, mask and pending
    /// cleared). The next pointer is layout and is kept. Reports `reset`, and `disabled` if MSI was
    /// enabled.
    pub fn reset(&mut self, fx: &mut VectorEffects) {
        let Self {
            log2_capable: _,
            is_64bit: _,
            per_vector_mask: _,
            next: _,
            enabled,
            log2_enabled,
            address_lo,
            address_hi,
            data,
            mask,
            pending,
        } = self;
        fx.reset = true;
        if *enabled {
            fx.disabled = true;
        }
        *enabled = false;
        *log2_enabled = 0;
        *address_lo = 0;
        *address_hi = 0;
        *data = 0;
        *mask = 0;
        *pending = 0;
    }

    fn mask_bit(&self, vector: u16) -> bool {
        self.per_vector_mask && vector < self.max_vectors() && self.mask & 1 << vector != 0
    }

    /// Mask bits that exist: one per vector the function has (QEMU `msi_init` wmask).
    fn mask_writable(&self) -> u32 {
        u32::MAX >> (32 - u32::from(self.max_vectors()))
    }

    fn data_offset(&self) -> u64 {
        if self.is_64bit {
            spec::MSI_DATA_64
        } else {
            spec::MSI_DATA_32
        }
    }

    /// Offset of the mask bits, if the capability has them; the pending bits follow.
    fn mask_offset(&self) -> Option<u64> {
        match (self.per_vector_mask, self.is_64bit) {
            (false, _) => None,
            (true, false) => Some(spec::MSI_MASK_32),
            (true, true) => Some(spec::MSI_MASK_64),
        }
    }

    /// The dword at `offset` (a multiple of 4 below `len()`).
    fn dword(&self, offset: u64) -> u32 {
        let mask = self.mask_offset();
        match offset {
            0 => {
                u32::from(spec::CAP_ID_MSI)
                    | u32::from(self.next) << 8
                    | u32::from(self.message_control()) << 16
            }
            spec::MSI_ADDRESS_LO => self.address_lo,
            spec::MSI_ADDRESS_HI if self.is_64bit => self.address_hi,
            o if o == self.data_offset() => u32::from(self.data),
            o if Some(o) == mask => self.mask,
            o if Some(o) == mask.map(|m| m + 4) => self.pending,
            _ => 0,
        }
    }

    /// Stores `value` into the dword at `offset`, keeping read-only bits.
    fn write_dword(&mut self, offset: u64, value: u32) {
        let mask = self.mask_offset();
        match offset {
            0 => {
                let control = (value >> 16) as u16;
                self.enabled = control & spec::MSI_CTRL_ENABLE != 0;
                let mme = control >> spec::MSI_CTRL_MME_SHIFT & spec::MSI_CTRL_LOG2_MASK;
                self.log2_enabled = mme.min(self.log2_capable);
            }
            spec::MSI_ADDRESS_LO => self.address_lo = value & !3,
            spec::MSI_ADDRESS_HI if self.is_64bit => self.address_hi = value,
            // Bits 31:16 would be extended message data, which this capability lacks.
            o if o == self.data_offset() => self.data = value as u16,
            o if Some(o) == mask => {
                let writable = self.mask_writable();
                self.mask = value & writable | self.mask & !writable;
            }
            // Pending bits are read-only (§6.8.1.8).
            _ => {}
        }
    }

    /// Each vector's (deliverable, message), for effect reporting.
    fn states(&self) -> [(bool, MsiMessage); spec::MSI_MAX_VECTORS as usize] {
        std::array::from_fn(|v| {
            let v = v as u16;
            (!self.is_masked(v), self.message(v).unwrap_or_default())
        })
    }
}
