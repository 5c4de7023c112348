//! The MSI and MSI-X registers, as the PCI Local Bus Specification 3.0 (§6.8.1, §6.8.2) and
//! Linux `include/uapi/linux/pci_regs.h` lay them out.
//!
//! Only layout lives here: offsets, bit masks and sizes. What the functions do with them is in
//! [`super::MsixTable`] (MSI-X) and [`super::MsiCapability`] (MSI).

// ---------------------------------------------------------------------------------------------
// MSI-X (§6.8.2)
// ---------------------------------------------------------------------------------------------

/// Capability ID of the MSI-X capability.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Offset of the message control word in the MSI-X capability.
pub const MSIX_MESSAGE_CONTROL: u64 = 0x02;
/// Offset of the table offset / BIR dword in the MSI-X capability.
pub const MSIX_TABLE_OFFSET_BIR: u64 = 0x04;
/// Offset of the PBA offset / BIR dword in the MSI-X capability.
pub const MSIX_PBA_OFFSET_BIR: u64 = 0x08;
/// Size of the MSI-X capability structure.
pub const MSIX_CAP_LEN: u64 = 0x0C;

/// Message control bits 10:0: table size, encoded as N - 1. Read-only.
pub const MSIX_CTRL_TABLE_SIZE: u16 = 0x07ff;
/// Message control bit 14: function mask. Masks every vector without touching their mask bits.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control bit 15: MSI-X enable.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;

/// Most vectors an MSI-X function can have: the table size field is 11 bits.
pub const MAX_VECTORS: u16 = MSIX_CTRL_TABLE_SIZE + 1;
/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Offset of the message address (low dword) inside a table entry.
pub const ENTRY_ADDRESS_LO: u64 = 0x0;
/// Offset of the message upper address inside a table entry.
pub const ENTRY_ADDRESS_HI: u64 = 0x4;
/// Offset of the message data inside a table entry.
pub const ENTRY_DATA: u64 = 0x8;
/// Offset of the vector control dword inside a table entry.
pub const ENTRY_VECTOR_CONTROL: u64 = 0xC;
/// Vector control bit 0: the vector's mask bit. Set at reset. Bits 31:1 are reserved (read 0;
/// the steering-tag bits of later revisions are not implemented).
pub const VECTOR_CONTROL_MASK: u32 = 1;

/// Bytes of the pending bit array for `vectors` vectors: one bit each, in whole qwords.
pub const fn pba_bytes(vectors: u16) -> u64 {
    (vectors as u64).div_ceil(64) * 8
}

// ---------------------------------------------------------------------------------------------
// MSI (§6.8.1)
// ---------------------------------------------------------------------------------------------

/// Capability ID of the MSI capability.
pub const CAP_ID_MSI: u8 = 0x05;
/// Offset of the next-capability pointer.
pub const CAP_NEXT: u64 = 0x01;
/// Offset of the message control word.
pub const MSI_MESSAGE_CONTROL: u64 = 0x02;
/// Offset of the message address (low dword; bits 1:0 are reserved and read 0).
pub const MSI_ADDRESS_LO: u64 = 0x04;
/// Offset of the message upper address (64-bit capable functions only).
pub const MSI_ADDRESS_HI: u64 = 0x08;
/// Offset of the 16-bit message data of a 32-bit capability.
pub const MSI_DATA_32: u64 = 0x08;
/// Offset of the 16-bit message data of a 64-bit capability.
pub const MSI_DATA_64: u64 = 0x0C;
/// Offset of the mask bits of a 32-bit capability with per-vector masking.
pub const MSI_MASK_32: u64 = 0x0C;
/// Offset of the mask bits of a 64-bit capability with per-vector masking.
pub const MSI_MASK_64: u64 = 0x10;
/// Offset of the pending bits of a 32-bit capability with per-vector masking.
pub const MSI_PENDING_32: u64 = 0x10;
/// Offset of the pending bits of a 64-bit capability with per-vector masking.
pub const MSI_PENDING_64: u64 = 0x14;

/// Message control bit 0: MSI enable.
pub const MSI_CTRL_ENABLE: u16 = 1;
/// Message control bits 3:1: multiple message capable (log2 of the vectors the function has).
/// Read-only.
pub const MSI_CTRL_MMC_SHIFT: u32 = 1;
/// Message control bits 6:4: multiple message enable (log2 of the vectors software granted).
pub const MSI_CTRL_MME_SHIFT: u32 = 4;
/// Width mask of the MMC and MME fields.
pub const MSI_CTRL_LOG2_MASK: u16 = 0x7;
/// Message control bit 7: 64-bit address capable. Read-only.
pub const MSI_CTRL_64BIT: u16 = 1 << 7;
/// Message control bit 8: per-vector masking capable. Read-only.
pub const MSI_CTRL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Most vectors an MSI function can have (MMC = 5).
pub const MSI_MAX_VECTORS: u8 = 32;
/// The largest meaningful MMC/MME value: log2(32). 6 and 7 are reserved.
pub const MSI_MAX_LOG2: u16 = 5;

/// Length of an MSI capability, rounded up to whole dwords. Capabilities start on dword
/// boundaries, so the two bytes after a 16-bit data register (extended message data, not
/// implemented) can belong to no other structure; they read 0.
pub const fn msi_cap_len(is_64bit: bool, per_vector_mask: bool) -> u64 {
    match (is_64bit, per_vector_mask) {
        (false, false) => 0x0C,
        (true, false) => 0x10,
        (false, true) => 0x14,
        (true, true) => 0x18,
    }
}
