//! The guest's view of the IOAPIC through real MMIO: vmirq's userspace IOAPIC (split irqchip)
//! must read back exactly as KVM's in-kernel one does.

use vmirq_guest::machine::{mmio_read_op, Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;

const IOREGSEL: u32 = 0xFEC0_0000;
const IOWIN: u32 = 0xFEC0_0010;

fn config(mode: Mode) -> MachineConfig {
    MachineConfig::new(1, mode.irqchip()).ioapic_pin(7, 0x47, 0, true)
}

on_every_machine!(
    guest_reads_the_ioapic_registers_as_kvm_has_them,
    config,
    |m: &dyn Machine, _| {
        let r = m
            .guest_mmio(&[
                (IOREGSEL, 0x01),
                mmio_read_op(IOWIN),
                (IOREGSEL, 0x10 + 2 * 7),
                mmio_read_op(IOWIN),
                (IOREGSEL, 0x11 + 2 * 7),
                mmio_read_op(IOWIN),
                // Read-only bits: delivery status (12) and Remote IRR (14) ignore writes.
                (IOREGSEL, 0x10 + 2 * 9),
                (IOWIN, 0x0001_5033),
                mmio_read_op(IOWIN),
                mmio_read_op(IOREGSEL),
            ])
            .unwrap();
        assert_eq!(r[1], 0x0017_0011, "version 0x11, 24 redirection entries");
        assert_eq!(r[3], 0x0000_8047, "pin 7: level, vector 0x47, unmasked");
        assert_eq!(r[5], 0, "pin 7 goes to APIC 0");
        assert_eq!(
            r[8],
            0x0001_1033 & !(1 << 12),
            "RO bits stay clear, mask and vector kept"
        );
        assert_eq!(r[9] & 0xff, 0x10 + 2 * 9, "IOREGSEL reads back");
    }
);
