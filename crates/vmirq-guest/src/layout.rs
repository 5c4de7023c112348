//! Guest-physical layout of the real-mode test guest, and its I/O ports.
//!
//! Everything lives below 64 KiB so CS = 0 reaches all code. Data above 64 KiB (LAPIC,
//! IOAPIC, MSI-X BARs) is reached with 32-bit addresses through the host-set 4 GiB data
//! segment limits ("unreal mode").
//!
//! ```text
//! 0x0000 ..0x0400  IVT: 256 × (offset, segment), written by the host loader
//! 0x0500 ..0x0704  boot MMIO script: u32 count, then 64 × {u32 addr, u32 value}
//! 0x1000 ..0x4000  code
//! 0x4000 ..0x6000  interrupt counters: u32 [8 vCPUs][256 vectors]
//! 0xB000 ..0xF000  stacks, 0x800 bytes per vCPU, vCPU 0 on top
//! ```

/// Real-mode interrupt vector table: 256 entries of (u16 offset, u16 segment), read by the
/// CPU through IDTR (base 0, limit 0x3FF). Every entry points at that vector's stub.
pub const IVT_ADDR: u64 = 0x0000;
/// Bytes of one IVT entry.
pub const IVT_ENTRY_SIZE: u64 = 4;
/// Number of interrupt vectors.
pub const VECTORS: usize = 256;

/// Boot MMIO script: a u32 entry count here, written by the host before start.
pub const MMIO_SCRIPT_COUNT_ADDR: u64 = 0x0500;
/// Script entries `{u32 addr, u32 value}`, performed as 32-bit writes by APIC ID 0 at boot,
/// in order, before it reports ready (programs the IOAPIC, an MSI-X table, ...).
pub const MMIO_SCRIPT_ENTRIES_ADDR: u64 = 0x0504;
/// Bytes of one script entry.
pub const MMIO_SCRIPT_ENTRY_SIZE: u64 = 8;
/// Most entries a script may hold; the guest also clamps the count to this.
pub const MMIO_SCRIPT_MAX: usize = 64;

/// Where the guest code is loaded (CS = 0, so this is also the first IP).
pub const CODE_ADDR: u64 = 0x1000;
/// First byte after the code area.
pub const CODE_END: u64 = COUNTERS_ADDR;

/// Interrupt counters: u32 at `COUNTERS_ADDR + vcpu * 1024 + vector * 4`, incremented with
/// `lock inc` by the ISR of the vCPU whose APIC ID is `vcpu` (clamped to `MAX_VCPUS - 1`).
pub const COUNTERS_ADDR: u64 = 0x4000;
/// Bytes of counters per vCPU (256 vectors × 4).
pub const COUNTERS_PER_VCPU: u64 = 1024;
/// Bytes of the whole counter block.
pub const COUNTERS_SIZE: u64 = COUNTERS_PER_VCPU * MAX_VCPUS as u64;

/// vCPUs the layout has stacks and counters for.
pub const MAX_VCPUS: usize = 8;
/// Initial SP of vCPU 0; vCPU `i` starts `i * STACK_SIZE` lower.
pub const STACK_TOP: u16 = 0xF000;
/// Bytes of stack per vCPU.
pub const STACK_SIZE: u16 = 0x800;

/// LAPIC registers (Intel SDM vol. 3 table 11-1), reached with 32-bit addresses.
pub const LAPIC_BASE: u32 = 0xFEE0_0000;
pub const LAPIC_ID: u32 = LAPIC_BASE + 0x20;
pub const LAPIC_TPR: u32 = LAPIC_BASE + 0x80;
pub const LAPIC_EOI: u32 = LAPIC_BASE + 0xB0;
pub const LAPIC_SVR: u32 = LAPIC_BASE + 0xF0;
/// SVR value written at boot: APIC software-enabled (bit 8), spurious vector 0xFF.
pub const LAPIC_SVR_ENABLE: u32 = 0x1FF;

/// IOAPIC register select and window (82093AA datasheet §3.1), for boot scripts.
pub const IOAPIC_BASE: u32 = 0xFEC0_0000;
pub const IOAPIC_IOREGSEL: u32 = IOAPIC_BASE;
pub const IOAPIC_IOWIN: u32 = IOAPIC_BASE + 0x10;

/// 8259 PIC data ports; the guest writes 0xFF to both to mask every PIC input.
pub const PIC_MASTER_DATA_PORT: u16 = 0x21;
pub const PIC_SLAVE_DATA_PORT: u16 = 0xA1;

/// The ISR writes its vector here (one byte, `out dx, al`) after counting, before EOI.
pub const ISR_PORT: u16 = 0x510;
/// Each vCPU writes its APIC ID here (one byte) once, after setup, right before `sti`.
pub const READY_PORT: u16 = 0x511;
/// vCPU 0 writes the completed command's sequence number (low byte) here after running a
/// runtime MMIO script.
pub const DONE_PORT: u16 = 0x512;

/// Runtime MMIO commands: the host writes a script into the MMIO script area, bumps the u32 at
/// [`CMD_SEQ_ADDR`] and sends [`DOORBELL_VECTOR`] to vCPU 0, which runs the script after the
/// interrupt, stores the sequence number at [`CMD_DONE_ADDR`] and writes [`DONE_PORT`].
pub const CMD_SEQ_ADDR: u64 = 0x0800;
pub const CMD_DONE_ADDR: u64 = 0x0804;
/// The vector that wakes vCPU 0 for a runtime command (lowest priority class in use).
pub const DOORBELL_VECTOR: u8 = 0x2F;

/// Initial SP of `vcpu`. The layout has stacks for [`MAX_VCPUS`]; later vCPUs would share
/// the last one, which is why [`crate::program::GuestImage::boot`] refuses them.
pub const fn stack_top(vcpu: usize) -> u16 {
    let slot = if vcpu < MAX_VCPUS {
        vcpu
    } else {
        MAX_VCPUS - 1
    };
    STACK_TOP - slot as u16 * STACK_SIZE
}

/// Guest address of the counter of (`vcpu`, `vector`), or `None` beyond [`MAX_VCPUS`].
pub const fn counter_addr(vcpu: usize, vector: u8) -> Option<u64> {
    if vcpu < MAX_VCPUS {
        Some(COUNTERS_ADDR + vcpu as u64 * COUNTERS_PER_VCPU + vector as u64 * 4)
    } else {
        None
    }
}

/// The IOAPIC register index of the low dword of pin `pin`'s redirection entry.
pub const fn ioapic_redtbl_lo(pin: u32) -> u32 {
    0x10 + 2 * pin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        assert!(IVT_ADDR + IVT_ENTRY_SIZE * VECTORS as u64 <= MMIO_SCRIPT_COUNT_ADDR);
        let script_end = MMIO_SCRIPT_ENTRIES_ADDR + MMIO_SCRIPT_ENTRY_SIZE * MMIO_SCRIPT_MAX as u64;
        assert!(script_end <= CODE_ADDR);
        let lowest_stack = u64::from(stack_top(MAX_VCPUS - 1) - STACK_SIZE);
        assert!(COUNTERS_ADDR + COUNTERS_SIZE <= lowest_stack);
    }

    #[test]
    fn stacks_and_counters_follow_the_documented_formula() {
        assert_eq!(stack_top(0), 0xF000);
        assert_eq!(stack_top(1), 0xE800);
        assert_eq!(stack_top(MAX_VCPUS), stack_top(MAX_VCPUS - 1));
        assert_eq!(counter_addr(1, 0x40), Some(0x4000 + 1024 + 0x100));
        assert_eq!(counter_addr(MAX_VCPUS, 0), None);
    }
}
