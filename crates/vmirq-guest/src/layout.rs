//! Guest-physical layout of the real-mode test guest, and its I/O ports.
//!
//! Everything lives below 64 KiB so CS = 0 reaches all code. Data above 64 KiB (LAPIC,
//! IOAPIC, MSI-X BARs) is reached with 32-bit addresses through the host-set 4 GiB data
//! segment limits ("unreal mode").
//!
//! ```text
//! 0x0000 ..0x0400  IVT: 256 × (offset, segment), written by the host loader
//! 0x0500 ..0x0704  boot MMIO script: u32 count, then 64 × {u32 addr, u32 value}
//! 0x0800 ..0x0808  runtime command sequence / done numbers
//! 0x0C00 ..0x0F00  hypercall mailboxes: 48 vCPUs × {u32 cmd, u32 args_gpa, i32 result, pad}
//! 0x1000 ..0x8000  code
//! 0x9000 ..0xF000  stacks, 0x200 bytes per vCPU, vCPU 0 on top
//! 0x20000..0x21000 Xen shared_info page (32-bit compat layout)
//! 0x22000..0x22400 Xen vcpu_info of APIC IDs 32..48 (they have no slot in shared_info)
//! 0x30000..0x31000 Xen event channel port counters: u32 [1024 ports]
//! 0x40000..0x4C000 interrupt counters: u32 [48 vCPUs][256 vectors]
//! 0x50000..0x60000 scratch for the host (hypercall arguments the tests write)
//! ```
//!
//! The guest acts as a 32-bit Xen HVM guest: the stub of [`XEN_UPCALL_VECTOR`] runs the Linux
//! 2-level event channel consumer on the `shared_info` page at [`XEN_SHARED_INFO`] (counting
//! every port it acks at [`XEN_PORT_COUNTERS`]) before the common counting path, and runtime
//! MMIO scripts may issue hypercalls through the mailbox at [`HYPERCALL_MAILBOX`] and the
//! doorbell port [`XEN_DOORBELL_PORT`].

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
/// First byte after the code area (below the stacks; CS = 0 reaches 64 KiB).
pub const CODE_END: u64 = 0x8000;

/// Interrupt counters: u32 at `COUNTERS_ADDR + vcpu * 1024 + vector * 4`, incremented with
/// `lock inc` by the ISR of the vCPU whose APIC ID is `vcpu` (clamped to `MAX_VCPUS - 1`).
pub const COUNTERS_ADDR: u64 = 0x40000;
/// Bytes of counters per vCPU (256 vectors × 4).
pub const COUNTERS_PER_VCPU: u64 = 1024;
/// Bytes of the whole counter block.
pub const COUNTERS_SIZE: u64 = COUNTERS_PER_VCPU * MAX_VCPUS as u64;

/// vCPUs the layout has stacks and counters for (a Xen guest with more than 32 vCPUs).
pub const MAX_VCPUS: usize = 48;
/// Initial SP of vCPU 0; vCPU `i` starts `i * STACK_SIZE` lower.
pub const STACK_TOP: u16 = 0xF000;
/// Bytes of stack per vCPU (no handler nests: each runs with interrupts off).
pub const STACK_SIZE: u16 = 0x200;

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

/// Hypercall mailboxes, one per APIC ID (clamped to `MAX_VCPUS - 1`) at
/// `HYPERCALL_MAILBOX + apic_id * HYPERCALL_MAILBOX_SIZE`: u32 cmd @0, u32 args_gpa @4,
/// i32 result @8. The guest fills cmd and args_gpa, presets result to `-ENOSYS`, writes its
/// APIC ID to [`XEN_DOORBELL_PORT`] and reads result after the `out` completes: the host's exit
/// handler runs the hypercall synchronously and writes result before the vCPU resumes.
pub const HYPERCALL_MAILBOX: u64 = 0x0C00;
/// Bytes of one hypercall mailbox.
pub const HYPERCALL_MAILBOX_SIZE: u64 = 16;
/// Offsets inside a mailbox.
pub const HYPERCALL_CMD_OFFSET: u64 = 0;
pub const HYPERCALL_ARGS_OFFSET: u64 = 4;
pub const HYPERCALL_RESULT_OFFSET: u64 = 8;
/// The hypercall doorbell: a one-byte `out` of the caller's APIC ID.
pub const XEN_DOORBELL_PORT: u16 = 0x520;
/// What a hypercall returns when no handler is installed (Linux/Xen `-ENOSYS`).
pub const HYPERCALL_ENOSYS: i32 = -38;

/// The Xen `shared_info` page (guest physical, page aligned, below 1 MiB), 32-bit compat
/// layout (xen/include/public/xen.h): `vcpu_info[32]` of 64 bytes each, then
/// `evtchn_pending[32]` u32 words at +0x800 and `evtchn_mask[32]` at +0x880.
pub const XEN_SHARED_INFO: u64 = 0x20000;
/// Bytes of the shared_info page.
pub const XEN_SHARED_INFO_SIZE: u64 = 0x1000;
/// Bytes of one compat `vcpu_info`.
pub const XEN_VCPU_INFO_SIZE: u64 = 64;
/// Offsets inside a compat `vcpu_info`: u8 upcall_pending, u8 upcall_mask, u32 pending_sel.
pub const XEN_UPCALL_PENDING_OFFSET: u64 = 0;
pub const XEN_UPCALL_MASK_OFFSET: u64 = 1;
pub const XEN_PENDING_SEL_OFFSET: u64 = 4;
/// Offsets of the compat 2-level bitmaps inside shared_info (32 words of 32 bits each).
pub const XEN_EVTCHN_PENDING_OFFSET: u64 = 0x800;
pub const XEN_EVTCHN_MASK_OFFSET: u64 = 0x880;
/// Ports of the compat 2-level ABI (32 words × 32 bits).
pub const XEN_2L_PORTS: usize = 1024;
/// Most passes the guest's consumer makes before returning, however often the host sets
/// upcall_pending again meanwhile (bounds an event storm).
pub const XEN_CONSUMER_MAX_PASSES: u32 = 64;
/// The per-vCPU event channel upcall vector the guest serves.
pub const XEN_UPCALL_VECTOR: u8 = 0xF3;
/// Per-port counters of the guest's consumer: u32 at `XEN_PORT_COUNTERS + port * 4`,
/// `lock inc`ed once per pending bit the guest cleared (acked) for that port.
pub const XEN_PORT_COUNTERS: u64 = 0x30000;
/// Bytes of the port counter block.
pub const XEN_PORT_COUNTERS_SIZE: u64 = XEN_2L_PORTS as u64 * 4;

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

/// The per-vCPU slot of APIC ID `apic_id`, clamped to the last one like the guest does.
const fn slot(apic_id: usize) -> u64 {
    (if apic_id < MAX_VCPUS {
        apic_id
    } else {
        MAX_VCPUS - 1
    }) as u64
}

/// Guest address of the hypercall mailbox of APIC ID `apic_id` (clamped, like the guest does).
pub const fn hypercall_mailbox(apic_id: usize) -> u64 {
    HYPERCALL_MAILBOX + slot(apic_id) * HYPERCALL_MAILBOX_SIZE
}

/// Nonzero once the host switched the guest to the FIFO ABI: the upcall then runs the FIFO
/// consumer instead of the 2-level one. With [`XEN_FIFO_RECORD`] also set, the consumer
/// records each event in [`XEN_FIFO_SEEN`] and [`XEN_FIFO_LOG`].
pub const XEN_FIFO_FLAG: u64 = 0x0808;
/// The FIFO flag's bit asking the consumer to record every event (tests); without it the
/// consumer only counts (bench: the guest runs emulated, every instruction shows).
pub const XEN_FIFO_RECORD: u32 = 2;
/// FIFO control blocks: the one of APIC ID `a` at `XEN_FIFO_CONTROL + a * 0x80` (72 bytes,
/// 8-byte aligned).
pub const XEN_FIFO_CONTROL: u64 = 0x6_0000;
/// Bytes between two control blocks.
pub const XEN_FIFO_CONTROL_STRIDE: u64 = 0x80;
/// The FIFO consumer's own copy of each queue's next head (Linux's per-CPU `q->head[]`):
/// 16 u32 per APIC ID.
pub const XEN_FIFO_HEADS: u64 = 0x6_2000;
/// One bit per port the FIFO consumer handled (2^17 bits); a bit found set is a duplicate.
pub const XEN_FIFO_SEEN: u64 = 0x6_4000;
/// Events the FIFO consumer handled (u32).
pub const XEN_FIFO_TOTAL: u64 = 0x6_8000;
/// Events the FIFO consumer handled whose bit in [`XEN_FIFO_SEEN`] was already set (u32).
pub const XEN_FIFO_DUPS: u64 = 0x6_8004;
/// Entries written to [`XEN_FIFO_LOG`] so far (u32; may pass the capacity).
pub const XEN_FIFO_LOG_COUNT: u64 = 0x6_8008;
/// The ports the FIFO consumer handled, in order, up to [`XEN_FIFO_LOG_CAP`].
pub const XEN_FIFO_LOG: u64 = 0x6_8010;
/// Entries the log holds.
pub const XEN_FIFO_LOG_CAP: u32 = 4096;
/// The event array: the guest adds its pages in order from here, so port `p`'s word is at
/// `XEN_FIFO_ARRAY + 4 p`; 128 pages hold all 2^17 ports.
pub const XEN_FIFO_ARRAY: u64 = 0x7_0000;
/// Ports of the FIFO ABI.
pub const XEN_FIFO_PORTS: u32 = 1 << 17;
/// Events one FIFO upcall pass handles at most before handing READY back.
pub const XEN_FIFO_BUDGET: u32 = 1 << 18;

/// The FIFO control block of APIC ID `apic_id` (clamped like the guest does).
pub const fn xen_fifo_control(apic_id: usize) -> u64 {
    XEN_FIFO_CONTROL + slot(apic_id) * XEN_FIFO_CONTROL_STRIDE
}

/// The FIFO consumer's head copies of APIC ID `apic_id`.
pub const fn xen_fifo_heads(apic_id: usize) -> u64 {
    XEN_FIFO_HEADS + slot(apic_id) * 64
}

/// Guest memory the guest's code never touches, where hosts put hypercall arguments.
pub const SCRATCH: u64 = 0x50000;

/// Where the consumer of APIC IDs from 32 on reads their `vcpu_info`: shared_info has slots
/// for 32 vCPUs only (the test registers these with VCPUOP_register_vcpu_info).
pub const XEN_VCPU_INFO_EXT: u64 = 0x22000;

/// Guest address of the compat `vcpu_info` the consumer of APIC ID `apic_id` reads (clamped,
/// like the guest): its legacy slot in shared_info below 32, else at [`XEN_VCPU_INFO_EXT`].
pub const fn xen_vcpu_info(apic_id: usize) -> u64 {
    let slot = slot(apic_id);
    if slot < 32 {
        XEN_SHARED_INFO + slot * XEN_VCPU_INFO_SIZE
    } else {
        XEN_VCPU_INFO_EXT + (slot - 32) * XEN_VCPU_INFO_SIZE
    }
}

/// Guest address of the consumer's counter of event channel `port`, or `None` beyond the
/// 2-level ports.
pub const fn port_counter_addr(port: u32) -> Option<u64> {
    if (port as usize) < XEN_2L_PORTS {
        Some(XEN_PORT_COUNTERS + port as u64 * 4)
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
        const { assert!(COUNTERS_ADDR + COUNTERS_SIZE <= SCRATCH) };
        const { assert!(SCRATCH + 0x10000 <= XEN_FIFO_CONTROL) };
        assert!(xen_fifo_control(MAX_VCPUS) + 72 <= XEN_FIFO_HEADS);
        assert!(xen_fifo_heads(MAX_VCPUS) + 64 <= XEN_FIFO_SEEN);
        const { assert!(XEN_FIFO_SEEN + (XEN_FIFO_PORTS / 8) as u64 <= XEN_FIFO_TOTAL) };
        const { assert!(XEN_FIFO_LOG + XEN_FIFO_LOG_CAP as u64 * 4 <= XEN_FIFO_ARRAY) };
        const { assert!(XEN_FIFO_ARRAY + XEN_FIFO_PORTS as u64 * 4 <= 1 << 20) };
        const { assert!(CMD_DONE_ADDR + 4 <= XEN_FIFO_FLAG) };
        const { assert!(XEN_FIFO_FLAG + 4 <= HYPERCALL_MAILBOX) };
        const { assert!(CMD_DONE_ADDR + 4 <= HYPERCALL_MAILBOX) };
        assert!(hypercall_mailbox(MAX_VCPUS - 1) + HYPERCALL_MAILBOX_SIZE <= CODE_ADDR);
        assert!(u64::from(STACK_TOP) <= XEN_SHARED_INFO);
        assert_eq!(XEN_SHARED_INFO % 0x1000, 0);
        const { assert!(XEN_SHARED_INFO + XEN_SHARED_INFO_SIZE <= XEN_PORT_COUNTERS) };

        // The compat bitmaps: 32 words each, mask right after pending, both inside the page.
        assert_eq!(XEN_EVTCHN_MASK_OFFSET, XEN_EVTCHN_PENDING_OFFSET + 32 * 4);
        const { assert!(XEN_EVTCHN_MASK_OFFSET + 32 * 4 <= XEN_SHARED_INFO_SIZE) };
        assert!(xen_vcpu_info(31) + XEN_VCPU_INFO_SIZE <= XEN_SHARED_INFO + 0x800);
        const { assert!(XEN_SHARED_INFO + XEN_SHARED_INFO_SIZE <= XEN_VCPU_INFO_EXT) };
        assert!(xen_vcpu_info(MAX_VCPUS) + XEN_VCPU_INFO_SIZE <= XEN_PORT_COUNTERS);
        const { assert!(XEN_PORT_COUNTERS + XEN_PORT_COUNTERS_SIZE <= COUNTERS_ADDR) };
        const { assert!(CODE_END <= 0x10000) };
        assert!(u64::from(stack_top(MAX_VCPUS - 1) - STACK_SIZE) >= CODE_END);
    }

    #[test]
    fn xen_addresses_follow_the_documented_formulas() {
        assert_eq!(hypercall_mailbox(0), 0x0C00);
        assert_eq!(hypercall_mailbox(3), 0x0C30);
        assert_eq!(hypercall_mailbox(99), hypercall_mailbox(MAX_VCPUS - 1));
        assert_eq!(xen_vcpu_info(1), 0x20040);
        assert_eq!(xen_vcpu_info(33), 0x22040);
        assert_eq!(port_counter_addr(37), Some(0x30000 + 37 * 4));
        assert_eq!(port_counter_addr(1024), None);
    }

    #[test]
    fn stacks_and_counters_follow_the_documented_formula() {
        assert_eq!(stack_top(0), 0xF000);
        assert_eq!(stack_top(1), 0xEE00);
        assert_eq!(stack_top(MAX_VCPUS), stack_top(MAX_VCPUS - 1));
        assert_eq!(counter_addr(1, 0x40), Some(0x40000 + 1024 + 0x100));
        assert_eq!(counter_addr(MAX_VCPUS, 0), None);
    }
}
