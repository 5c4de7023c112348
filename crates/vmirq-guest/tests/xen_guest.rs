//! The test guest's Xen side, without any Xen emulation: hypercalls through the mailbox and
//! doorbell, and the 2-level event channel consumer the upcall vector runs on a `shared_info`
//! page set up by hand. Written once and run on the simulated backend and real KVM, each with
//! the in-kernel and the split irqchip.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmirq::X86Msi;
use vmirq_guest::layout::{
    hypercall_mailbox, xen_vcpu_info, HYPERCALL_ARGS_OFFSET, HYPERCALL_CMD_OFFSET,
    HYPERCALL_ENOSYS, HYPERCALL_RESULT_OFFSET, XEN_EVTCHN_MASK_OFFSET, XEN_EVTCHN_PENDING_OFFSET,
    XEN_PENDING_SEL_OFFSET, XEN_SHARED_INFO, XEN_UPCALL_PENDING_OFFSET, XEN_UPCALL_VECTOR,
};
use vmirq_guest::machine::{hypercall_op, mmio_read_op, Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmirq_guest::xen::{read_u32, write_u32};

const WAIT: Duration = Duration::from_secs(5);

fn two_vcpus(mode: Mode) -> MachineConfig {
    MachineConfig::new(2, mode.irqchip())
}

fn read_u8(m: &dyn Machine, gpa: u64) -> u8 {
    let mut b = [0; 1];
    m.read_guest(gpa, &mut b).unwrap();
    b[0]
}

fn pending_word(word: u64) -> u64 {
    XEN_SHARED_INFO + XEN_EVTCHN_PENDING_OFFSET + word * 4
}

fn mask_word(word: u64) -> u64 {
    XEN_SHARED_INFO + XEN_EVTCHN_MASK_OFFSET + word * 4
}

/// Sends the upcall vector to `vcpu` and waits until the guest took it (its consumer ran).
fn upcall(m: &dyn Machine, vcpu: u32) {
    let msg = X86Msi::fixed(vcpu, XEN_UPCALL_VECTOR).encode().unwrap();
    m.interrupts().signal_msi(msg).unwrap();
    let ev = m
        .wait_isr(Some(vcpu as usize), XEN_UPCALL_VECTOR, WAIT)
        .unwrap_or_else(|| panic!("{}: upcall never taken on vCPU {vcpu}", m.kind()));
    assert_eq!(ev.vcpu, vcpu as usize);
}

/// Records every hypercall and answers with a fixed value.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(usize, u32, u64)>>,
    answer: i64,
}

impl vmirq_guest::machine::HypercallHandler for Recorder {
    fn hypercall(&self, vcpu: usize, cmd: u32, args_gpa: u64) -> i64 {
        self.calls.lock().unwrap().push((vcpu, cmd, args_gpa));
        self.answer
    }
}

on_every_machine!(
    hypercall_round_trips_through_the_doorbell,
    two_vcpus,
    |m: &dyn Machine, _| {
        // No handler yet: -ENOSYS.
        let r = m.guest_mmio(&[hypercall_op(4, 0x5_0000)]).unwrap();
        assert_eq!(r, vec![HYPERCALL_ENOSYS as u32], "{}", m.kind());

        let rec = Arc::new(Recorder {
            answer: 42,
            ..Recorder::default()
        });
        m.set_hypercall_handler(rec.clone());
        write_u32(m, 0x5_0000, 0xA5A5_0001);
        // A hypercall between a read and a second hypercall: each entry keeps its own result.
        let r = m
            .guest_mmio(&[
                mmio_read_op(0x5_0000),
                hypercall_op(29, 0x5_0000),
                hypercall_op(32, 0x5_0ABF), // args_gpa's low two bits are dropped
            ])
            .unwrap();
        assert_eq!(r, vec![0xA5A5_0001, 42, 42], "{}", m.kind());
        assert_eq!(
            *rec.calls.lock().unwrap(),
            vec![(0, 29, 0x5_0000), (0, 32, 0x5_0ABC)],
            "{}",
            m.kind()
        );
        // The mailbox of APIC ID 0 holds the last call.
        let mb = hypercall_mailbox(0);
        assert_eq!(read_u32(m, mb + HYPERCALL_CMD_OFFSET), 32);
        assert_eq!(read_u32(m, mb + HYPERCALL_ARGS_OFFSET), 0x5_0ABC);
        assert_eq!(read_u32(m, mb + HYPERCALL_RESULT_OFFSET), 42);

        // Negative results reach the guest as its 32-bit long; closures are handlers too.
        m.set_hypercall_handler(Arc::new(|_vcpu: usize, cmd: u32, _args: u64| {
            -i64::from(cmd)
        }));
        let r = m.guest_mmio(&[hypercall_op(22, 0)]).unwrap();
        assert_eq!(r[0] as i32, -22, "{}", m.kind());
    }
);

on_every_machine!(
    upcall_runs_the_2level_consumer,
    two_vcpus,
    |m: &dyn Machine, _| {
        // Ports 5 and 37 pending and unmasked, port 6 pending but masked; selector words 0
        // and 1; upcall_pending set on vCPU 0.
        write_u32(m, pending_word(0), 1 << 5 | 1 << 6);
        write_u32(m, pending_word(1), 1 << 5);
        write_u32(m, mask_word(0), 1 << 6);
        let info = xen_vcpu_info(0);
        write_u32(m, info + XEN_PENDING_SEL_OFFSET, 0b11);
        m.write_guest(info + XEN_UPCALL_PENDING_OFFSET, &[1])
            .unwrap();

        upcall(m, 0);
        let k = m.kind();
        assert_eq!((m.port_counter(5), m.port_counter(37)), (1, 1), "{k}");
        assert_eq!(m.port_counter(6), 0, "{k}: a masked port is not handled");
        assert_eq!(read_u32(m, pending_word(0)), 1 << 6, "{k}: 5 acked, 6 left");
        assert_eq!(read_u32(m, pending_word(1)), 0, "{k}: 37 acked");
        assert_eq!(read_u32(m, info + XEN_PENDING_SEL_OFFSET), 0, "{k}");
        assert_eq!(read_u8(m, info + XEN_UPCALL_PENDING_OFFSET), 0, "{k}");
        assert_eq!(
            m.count(0, XEN_UPCALL_VECTOR),
            1,
            "{k}: the upcall is counted"
        );

        // vCPU 1 reads its own vcpu_info: port 100 (word 3, bit 4) through selector bit 3;
        // vCPU 0's stays untouched.
        write_u32(m, pending_word(3), 1 << 4);
        let info1 = xen_vcpu_info(1);
        write_u32(m, info1 + XEN_PENDING_SEL_OFFSET, 1 << 3);
        m.write_guest(info1 + XEN_UPCALL_PENDING_OFFSET, &[1])
            .unwrap();
        write_u32(m, info + XEN_PENDING_SEL_OFFSET, 1 << 3);
        upcall(m, 1);
        assert_eq!(m.port_counter(100), 1, "{k}");
        assert_eq!(read_u32(m, pending_word(3)), 0, "{k}");
        assert_eq!(read_u32(m, info1 + XEN_PENDING_SEL_OFFSET), 0, "{k}");
        assert_eq!(read_u8(m, info1 + XEN_UPCALL_PENDING_OFFSET), 0, "{k}");
        assert_eq!(read_u32(m, info + XEN_PENDING_SEL_OFFSET), 1 << 3, "{k}");
        // Masked port 6 is still pending; the counts of 5 and 37 did not move.
        assert_eq!(read_u32(m, pending_word(0)), 1 << 6, "{k}");
        assert_eq!((m.port_counter(5), m.port_counter(37)), (1, 1), "{k}");

        // Unmask 6 by hand and raise the upcall again: now it is handled.
        write_u32(m, mask_word(0), 0);
        write_u32(m, info + XEN_PENDING_SEL_OFFSET, 1);
        m.write_guest(info + XEN_UPCALL_PENDING_OFFSET, &[1])
            .unwrap();
        upcall(m, 0);
        assert_eq!(m.port_counter(6), 1, "{k}");
        assert_eq!(read_u32(m, pending_word(0)), 0, "{k}");
        assert_eq!(m.count(0, XEN_UPCALL_VECTOR), 2, "{k}");
    }
);
