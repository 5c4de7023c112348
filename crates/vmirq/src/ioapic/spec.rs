//! The 82093AA IOAPIC's registers, as the datasheet (Intel 290566-001, §3) lays them out.
//!
//! Only layout lives here: MMIO offsets, register indices and the redirection entry's bits. What
//! the device does with them is in the parent module.

use crate::msi::{DeliveryMode, MsiMessage, X86Msi};

/// MMIO offset of IOREGSEL, the 8-bit register index.
pub const IOREGSEL: u64 = 0x00;
/// MMIO offset of IOWIN, the 32-bit window onto the selected register.
pub const IOWIN: u64 = 0x10;

/// Register index of the IOAPIC ID (bits 27:24).
pub const REG_ID: u8 = 0x00;
/// Register index of the version register (read-only).
pub const REG_VERSION: u8 = 0x01;
/// Register index of the arbitration ID (read-only).
pub const REG_ARBITRATION: u8 = 0x02;
/// Register index of redirection entry 0's low dword; entry n is at `0x10 + 2n` (low) and
/// `0x11 + 2n` (high).
pub const REG_REDIRECTION_BASE: u8 = 0x10;

/// The version the 82093AA reports (bits 7:0). Version 0x11 has no EOI register, so guests
/// EOI level pins only through the LAPIC broadcast.
pub const VERSION: u32 = 0x11;
/// Version register: maximum redirection entry (pins - 1) in bits 23:16.
pub const VERSION_MAX_ENTRY_SHIFT: u32 = 16;
/// ID and arbitration registers: the 4-bit ID sits in bits 27:24.
pub const ID_SHIFT: u32 = 24;
/// The ID's 4 bits, after shifting right by [`ID_SHIFT`].
pub const ID_MASK: u32 = 0xf;

/// Most pins an IOAPIC can expose: IOREGSEL is 8 bits wide, so the last reachable redirection
/// register is 0xFF = 0x11 + 2 * 119.
pub const MAX_PINS: u32 = (0x100 - REG_REDIRECTION_BASE as u32) / 2;

/// Where the register index of pin `pin`'s low dword is, if an 8-bit IOREGSEL can name it.
pub const fn redirection_low(pin: u32) -> Option<u8> {
    if pin < MAX_PINS {
        Some(REG_REDIRECTION_BASE + 2 * pin as u8)
    } else {
        None
    }
}

/// One redirection table entry (datasheet §3.2.4).
///
/// | bits  | field                                              | guest access |
/// |-------|----------------------------------------------------|--------------|
/// | 7:0   | vector                                             | R/W          |
/// | 10:8  | delivery mode                                      | R/W          |
/// | 11    | destination mode (1 = logical)                     | R/W          |
/// | 12    | delivery status                                    | RO, reads 0  |
/// | 13    | polarity (1 = active low)                          | R/W          |
/// | 14    | remote IRR                                         | RO           |
/// | 15    | trigger mode (1 = level)                           | R/W          |
/// | 16    | mask                                               | R/W          |
/// | 48    | remappable format (needs an IOMMU)                 | reserved, 0  |
/// | 55:49 | extended destination ID (KVM_FEATURE_MSI_EXT_DEST_ID) | R/W       |
/// | 63:56 | destination                                        | R/W          |
///
/// All other bits are reserved and read as 0.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RedirectionEntry(u64);

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u64 = 0x7 << DELIVERY_MODE_SHIFT;
const DEST_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const ACTIVE_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const EXT_DEST_SHIFT: u32 = 49;
const EXT_DEST_MASK: u64 = 0x7f << EXT_DEST_SHIFT;
const DEST_SHIFT: u32 = 56;
const DEST_MASK: u64 = 0xff << DEST_SHIFT;

impl RedirectionEntry {
    /// The state at reset: masked, everything else 0 (datasheet §3.2.4: "mask bit set").
    pub const RESET: Self = Self(MASKED);

    /// Bits a guest write may change; delivery status, remote IRR and reserved bits keep their
    /// value (Linux `ioapic_write_indirect`: "Preserve read-only fields").
    pub const GUEST_WRITABLE: u64 = VECTOR_MASK
        | DELIVERY_MODE_MASK
        | DEST_LOGICAL
        | ACTIVE_LOW
        | TRIGGER_LEVEL
        | MASKED
        | EXT_DEST_MASK
        | DEST_MASK;

    /// The entry with raw 64-bit value `bits`, reserved and read-only bits included.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw 64-bit value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The dword at register `0x10 + 2n`.
    pub const fn low(self) -> u32 {
        self.0 as u32
    }

    /// The dword at register `0x11 + 2n`.
    pub const fn high(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The entry after a guest wrote `value` to its low (`high == false`) or high dword: only
    /// [`Self::GUEST_WRITABLE`] bits change.
    pub const fn guest_write(self, high: bool, value: u32) -> Self {
        let written = if high {
            (self.0 & 0xffff_ffff) | (value as u64) << 32
        } else {
            (self.0 & !0xffff_ffff) | value as u64
        };
        Self((written & Self::GUEST_WRITABLE) | (self.0 & !Self::GUEST_WRITABLE))
    }

    /// Vector (bits 7:0).
    pub const fn vector(self) -> u8 {
        (self.0 & VECTOR_MASK) as u8
    }

    /// Delivery mode (bits 10:8).
    pub const fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits(((self.0 & DELIVERY_MODE_MASK) >> DELIVERY_MODE_SHIFT) as u32)
    }

    /// Destination mode (bit 11): true for logical, false for physical.
    pub const fn dest_logical(self) -> bool {
        self.0 & DEST_LOGICAL != 0
    }

    /// Always false here: delivery is immediate, nothing is ever "send pending".
    pub const fn delivery_status(self) -> bool {
        self.0 & DELIVERY_STATUS != 0
    }

    /// Informational only: the model takes logical assertion levels (see [`super::Ioapic`]).
    pub const fn active_low(self) -> bool {
        self.0 & ACTIVE_LOW != 0
    }

    /// Set while a level interrupt waits for its EOI.
    pub const fn remote_irr(self) -> bool {
        self.0 & REMOTE_IRR != 0
    }

    /// The trigger mode bit as programmed.
    pub const fn trigger_level(self) -> bool {
        self.0 & TRIGGER_LEVEL != 0
    }

    /// Mask (bit 16): a masked pin delivers nothing.
    pub const fn masked(self) -> bool {
        self.0 & MASKED != 0
    }

    /// Destination field (bits 63:56): an APIC ID, or a logical mask in logical mode.
    pub const fn destination(self) -> u8 {
        (self.0 >> DEST_SHIFT) as u8
    }

    /// Destination ID bits 14:8 (bits 55:49), as Linux guests program them with
    /// KVM_FEATURE_MSI_EXT_DEST_ID; 0 otherwise.
    pub const fn extended_destination(self) -> u8 {
        ((self.0 & EXT_DEST_MASK) >> EXT_DEST_SHIFT) as u8
    }

    /// The full destination ID (up to 15 bits) the MSI carries.
    pub const fn dest_id(self) -> u32 {
        self.destination() as u32 | (self.extended_destination() as u32) << 8
    }

    /// Whether the pin behaves level-triggered: trigger mode level *and* a delivery mode that
    /// supports it. Datasheet §3.2.4: SMI, NMI, INIT and ExtINT are treated as edge even when
    /// programmed level (so they never set remote IRR, which nothing would EOI).
    pub const fn is_level(self) -> bool {
        self.trigger_level()
            && matches!(
                self.delivery_mode(),
                DeliveryMode::Fixed | DeliveryMode::LowestPriority
            )
    }

    /// The MSI a delivery from this entry sends (Intel ICH9 datasheet §13.5: the IOxAPIC
    /// turns redirection entries into interrupt messages). Ignores the mask.
    pub fn msi(self) -> MsiMessage {
        let level = self.is_level();
        X86Msi {
            dest_id: self.dest_id(),
            redirection_hint: false,
            dest_logical: self.dest_logical(),
            vector: self.vector(),
            delivery_mode: self.delivery_mode(),
            level_assert: level,
            trigger_level: level,
        }
        .encode()
        // dest_id() is at most 15 bits, so encoding cannot fail; a default beats a panic.
        .unwrap_or_default()
    }

    /// The entry with its vector replaced.
    pub const fn with_vector(self, vector: u8) -> Self {
        Self((self.0 & !VECTOR_MASK) | vector as u64)
    }

    /// The entry with its delivery mode replaced.
    pub const fn with_delivery_mode(self, mode: DeliveryMode) -> Self {
        Self((self.0 & !DELIVERY_MODE_MASK) | (mode as u64) << DELIVERY_MODE_SHIFT)
    }

    /// The entry with its destination mode bit set to `logical`.
    pub const fn with_dest_logical(self, logical: bool) -> Self {
        self.with_bit(DEST_LOGICAL, logical)
    }

    /// The entry with its polarity bit set to `active_low`.
    pub const fn with_active_low(self, active_low: bool) -> Self {
        self.with_bit(ACTIVE_LOW, active_low)
    }

    /// The entry with its trigger mode bit set to `level`.
    pub const fn with_trigger_level(self, level: bool) -> Self {
        self.with_bit(TRIGGER_LEVEL, level)
    }

    /// The entry with its mask bit set to `masked`.
    pub const fn with_masked(self, masked: bool) -> Self {
        self.with_bit(MASKED, masked)
    }

    /// The entry with its destination field (bits 63:56) replaced.
    pub const fn with_destination(self, dest: u8) -> Self {
        Self((self.0 & !DEST_MASK) | (dest as u64) << DEST_SHIFT)
    }

    /// The entry with its extended destination ID (bits 55:49) replaced; `ext` bit 7 is dropped.
    pub const fn with_extended_destination(self, ext: u8) -> Self {
        Self((self.0 & !EXT_DEST_MASK) | ((ext as u64) << EXT_DEST_SHIFT & EXT_DEST_MASK))
    }

    /// Device-side only: the guest cannot write remote IRR.
    pub(super) const fn with_remote_irr(self, pending: bool) -> Self {
        self.with_bit(REMOTE_IRR, pending)
    }

    const fn with_bit(self, bit: u64, set: bool) -> Self {
        if set {
            Self(self.0 | bit)
        } else {
            Self(self.0 & !bit)
        }
    }
}

impl std::fmt::Debug for RedirectionEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedirectionEntry")
            .field("vector", &format_args!("{:#04x}", self.vector()))
            .field("delivery_mode", &self.delivery_mode())
            .field("dest_logical", &self.dest_logical())
            .field("active_low", &self.active_low())
            .field("remote_irr", &self.remote_irr())
            .field("trigger_level", &self.trigger_level())
            .field("masked", &self.masked())
            .field("dest_id", &format_args!("{:#x}", self.dest_id()))
            .finish()
    }
}
