//! MSI messages and their x86 encoding.
//!
//! An [`MsiMessage`] is the raw (address, data) pair a device writes. [`X86Msi`] is its decoded
//! x86 form (Intel SDM vol. 3 §11.11; Linux `arch/x86/include/asm/msi.h`). Decoding never fails
//! on a guest-chosen value except for formats the host cannot deliver (remappable messages).

use thiserror::Error;

/// Base of the x86 interrupt message window: address bits 31:20 must be 0xFEE.
pub const MSI_ADDRESS_BASE: u32 = 0xFEE0_0000;
const MSI_ADDRESS_BASE_MASK: u32 = 0xFFF0_0000;
const ADDR_DEST_ID_SHIFT: u32 = 12;
const ADDR_EXT_DEST_ID_SHIFT: u32 = 5;
const ADDR_EXT_DEST_ID_MASK: u32 = 0x7f;
const ADDR_REMAPPABLE: u32 = 1 << 4;
const ADDR_REDIRECTION_HINT: u32 = 1 << 3;
const ADDR_DEST_MODE_LOGICAL: u32 = 1 << 2;
const DATA_DELIVERY_MODE_SHIFT: u32 = 8;
const DATA_LEVEL_ASSERT: u32 = 1 << 14;
const DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// Highest destination ID an x86 MSI can name: 8 bits plus 7 extended bits (address 11:5,
/// KVM_FEATURE_MSI_EXT_DEST_ID).
pub const MAX_DEST_ID: u32 = 0x7fff;

/// Errors decoding an MSI message.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MsiError {
    /// The destination ID exceeds [`MAX_DEST_ID`] and cannot be encoded.
    #[error("destination ID {0:#x} does not fit in 15 bits")]
    DestinationTooLarge(u32),
    /// The address is not in the 0xFEExxxxx window, so it is a memory write, not an interrupt.
    #[error("MSI address {0:#x} is outside the 0xFEExxxxx interrupt window")]
    NotInterruptWindow(u64),
    /// The address has the interrupt-remapping format bit (address bit 4) set.
    #[error("MSI address {0:#x} uses the remappable format, which needs an IOMMU")]
    Remappable(u64),
}

/// A raw MSI message: what a device writes, and what a route or `KVM_SIGNAL_MSI` carries.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct MsiMessage {
    /// Full 64-bit address (address_hi in bits 63:32).
    pub address: u64,
    /// Message data: vector, delivery mode and trigger bits.
    pub data: u32,
}

impl MsiMessage {
    /// A message with the full 64-bit `address` and `data`.
    pub const fn new(address: u64, data: u32) -> Self {
        Self { address, data }
    }

    /// Address bits 31:0 (the capability's Message Address register).
    pub const fn address_lo(&self) -> u32 {
        self.address as u32
    }

    /// Address bits 63:32 (the capability's Message Upper Address register).
    pub const fn address_hi(&self) -> u32 {
        (self.address >> 32) as u32
    }

    /// True when the message asks for level-triggered delivery (data bit 15). On a split
    /// irqchip KVM then exits with `KVM_EXIT_IOAPIC_EOI` when the guest EOIs the vector.
    pub const fn is_level(&self) -> bool {
        self.data & DATA_TRIGGER_LEVEL != 0
    }

    /// Decodes the x86 fields.
    pub fn decode(&self) -> Result<X86Msi, MsiError> {
        X86Msi::decode(*self)
    }
}

/// x86 APIC delivery modes (MSI data bits 10:8, also the IOAPIC redirection entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeliveryMode {
    /// Deliver `vector` to every destination.
    Fixed = 0,
    /// Deliver `vector` to the lowest-priority processor among the destinations.
    LowestPriority = 1,
    /// System management interrupt; the vector is ignored.
    Smi = 2,
    /// Reserved encoding 3.
    Reserved3 = 3,
    /// Non-maskable interrupt; the vector is ignored.
    Nmi = 4,
    /// INIT signal; the vector is ignored.
    Init = 5,
    /// Reserved encoding 6.
    Reserved6 = 6,
    /// External interrupt: the vector comes from an 8259A-compatible PIC's acknowledge cycle.
    ExtInt = 7,
}

impl DeliveryMode {
    /// Decodes three bits; every value has a variant, so this cannot fail.
    pub const fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            3 => Self::Reserved3,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::Reserved6,
            _ => Self::ExtInt,
        }
    }
}

/// The decoded x86 form of an MSI message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct X86Msi {
    /// Destination APIC ID (physical mode) or logical mask; up to 15 bits with the extended ID.
    pub dest_id: u32,
    /// Address bit 3 (RH): with logical mode, lowest-priority redirection among the destinations.
    pub redirection_hint: bool,
    /// Address bit 2 (DM): `dest_id` is a logical destination; else a physical APIC ID.
    pub dest_logical: bool,
    /// Data bits 7:0: the interrupt vector.
    pub vector: u8,
    /// Data bits 10:8.
    pub delivery_mode: DeliveryMode,
    /// Data bit 14 (assert). Edge messages ignore it; KVM treats it as the level for level ones.
    pub level_assert: bool,
    /// Data bit 15: 1 = level-triggered.
    pub trigger_level: bool,
}

impl X86Msi {
    /// A fixed, physical-mode, edge message to `dest_id` with `vector`.
    pub const fn fixed(dest_id: u32, vector: u8) -> Self {
        Self {
            dest_id,
            redirection_hint: false,
            dest_logical: false,
            vector,
            delivery_mode: DeliveryMode::Fixed,
            level_assert: false,
            trigger_level: false,
        }
    }

    /// Encodes into a raw message. Destination IDs above 255 use the extended bits 11:5.
    pub fn encode(&self) -> Result<MsiMessage, MsiError> {
        if self.dest_id > MAX_DEST_ID {
            return Err(MsiError::DestinationTooLarge(self.dest_id));
        }
        let mut address = MSI_ADDRESS_BASE
            | (self.dest_id & 0xff) << ADDR_DEST_ID_SHIFT
            | ((self.dest_id >> 8) & ADDR_EXT_DEST_ID_MASK) << ADDR_EXT_DEST_ID_SHIFT;
        if self.redirection_hint {
            address |= ADDR_REDIRECTION_HINT;
        }
        if self.dest_logical {
            address |= ADDR_DEST_MODE_LOGICAL;
        }
        let mut data =
            u32::from(self.vector) | (self.delivery_mode as u32) << DATA_DELIVERY_MODE_SHIFT;
        if self.level_assert {
            data |= DATA_LEVEL_ASSERT;
        }
        if self.trigger_level {
            data |= DATA_TRIGGER_LEVEL;
        }
        Ok(MsiMessage::new(u64::from(address), data))
    }

    /// Decodes a raw message. Bits the x86 format reserves are ignored, as the LAPIC does.
    pub fn decode(msg: MsiMessage) -> Result<Self, MsiError> {
        let lo = msg.address_lo();
        if lo & MSI_ADDRESS_BASE_MASK != MSI_ADDRESS_BASE {
            return Err(MsiError::NotInterruptWindow(msg.address));
        }
        if lo & ADDR_REMAPPABLE != 0 {
            return Err(MsiError::Remappable(msg.address));
        }
        let dest_id = (lo >> ADDR_DEST_ID_SHIFT) & 0xff
            | ((lo >> ADDR_EXT_DEST_ID_SHIFT) & ADDR_EXT_DEST_ID_MASK) << 8;
        Ok(Self {
            dest_id,
            redirection_hint: lo & ADDR_REDIRECTION_HINT != 0,
            dest_logical: lo & ADDR_DEST_MODE_LOGICAL != 0,
            vector: msg.data as u8,
            delivery_mode: DeliveryMode::from_bits(msg.data >> DATA_DELIVERY_MODE_SHIFT),
            level_assert: msg.data & DATA_LEVEL_ASSERT != 0,
            trigger_level: msg.data & DATA_TRIGGER_LEVEL != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_message_to_apic_1_encodes_like_linux() {
        let msg = X86Msi::fixed(1, 0x41).encode().unwrap();
        assert_eq!(msg.address, 0xFEE0_1000);
        assert_eq!(msg.data, 0x41);
    }

    #[test]
    fn extended_destination_uses_address_bits_11_to_5() {
        let msg = X86Msi::fixed(0x1ff, 0x30).encode().unwrap();
        assert_eq!(msg.address, 0xFEE0_0000 | 0xff << 12 | 1 << 5);
        assert_eq!(msg.decode().unwrap().dest_id, 0x1ff);
    }

    #[test]
    fn level_trigger_sets_data_bits_14_and_15() {
        let mut m = X86Msi::fixed(0, 0x50);
        m.trigger_level = true;
        m.level_assert = true;
        let msg = m.encode().unwrap();
        assert_eq!(msg.data, 0xC050);
        assert!(msg.is_level());
    }

    #[test]
    fn decode_rejects_addresses_outside_the_window_and_remappable() {
        assert_eq!(
            MsiMessage::new(0x1000, 0).decode(),
            Err(MsiError::NotInterruptWindow(0x1000))
        );
        assert_eq!(
            MsiMessage::new(0xFEE0_0010, 0).decode(),
            Err(MsiError::Remappable(0xFEE0_0010))
        );
        assert_eq!(
            X86Msi::fixed(0x8000, 0).encode(),
            Err(MsiError::DestinationTooLarge(0x8000))
        );
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(dest in 0u32..=MAX_DEST_ID, vector: u8, dm in 0u32..8,
                                     rh: bool, logical: bool, assert: bool, level: bool) {
            let m = X86Msi { dest_id: dest, redirection_hint: rh, dest_logical: logical, vector,
                delivery_mode: DeliveryMode::from_bits(dm), level_assert: assert, trigger_level: level };
            prop_assert_eq!(m.encode().unwrap().decode().unwrap(), m);
        }

        #[test]
        fn decode_never_panics(address: u64, data: u32) {
            let _ = MsiMessage::new(address, data).decode();
        }
    }

    // Written to kill mutants cargo-mutants found surviving (docs/mutants.md).

    #[test]
    fn address_halves_and_the_trigger_bit_read_back() {
        let msg = MsiMessage::new(0x3_FEE0_1000, 0x8041);
        assert_eq!((msg.address_hi(), msg.address_lo()), (3, 0xFEE0_1000));
        assert!(msg.is_level());
        assert!(!MsiMessage::new(0xFEE0_0000, 0x4041).is_level());
    }

    #[test]
    fn every_delivery_mode_encoding_decodes_to_itself() {
        for bits in 0..8u32 {
            assert_eq!(DeliveryMode::from_bits(bits) as u32, bits);
            assert_eq!(
                DeliveryMode::from_bits(bits | 8) as u32,
                bits,
                "only 3 bits count"
            );
        }
    }

    #[test]
    fn the_largest_extended_destination_encodes() {
        let msg = X86Msi::fixed(MAX_DEST_ID, 0x30).encode().unwrap();
        assert_eq!(msg.decode().unwrap().dest_id, MAX_DEST_ID);
        assert!(X86Msi::fixed(MAX_DEST_ID + 1, 0x30).encode().is_err());
    }
}
