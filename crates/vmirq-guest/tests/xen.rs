//! Xen event channels end to end: the real-mode guest (a 32-bit Xen HVM guest with Linux's
//! 2-level consumer on its upcall vector) issues EVTCHNOPs through the test doorbell; vmirq's
//! emulation marks ports in its shared_info and raises upcalls. Sim and KVM, both irqchips.

use std::sync::Arc;
use std::time::Duration;

use vmirq::xen::{attach, Callback, EventChannels, Upcalls, XenConfig};
use vmirq::{IrqfdPath, Route};
use vmirq_guest::layout::{XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
use vmirq_guest::machine::{hypercall_op, Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WAIT: Duration = Duration::from_secs(5);
const ARGS: u32 = 0x9000;
const DOMID_SELF: u16 = 0x7FF0;
// EVTCHNOP numbers (xen/include/public/event_channel.h).
const BIND_INTERDOMAIN: u32 = 0;
const BIND_VIRQ: u32 = 1;
const CLOSE: u32 = 3;
const SEND: u32 = 4;
const STATUS: u32 = 5;
const ALLOC_UNBOUND: u32 = 6;
const BIND_IPI: u32 = 7;
const BIND_VCPU: u32 = 8;
const UNMASK: u32 = 9;
const EINVAL: i64 = -22;
const ENOENT: i64 = -2;
const EEXIST: i64 = -17;

fn two_vcpus(mode: Mode) -> MachineConfig {
    // Pin 20 (level, vector 0xF3, vCPU 0) is the callback GSI when a test selects it.
    MachineConfig::new(2, mode.irqchip()).ioapic_pin(20, XEN_UPCALL_VECTOR, 0, true)
}

struct Xen {
    channels: Arc<EventChannels>,
    upcalls: Arc<Upcalls>,
}

/// Event channels on `m`'s guest memory, upcalls on each vCPU's vector, hypercalls from the
/// guest's doorbell.
fn xen(m: &dyn Machine) -> Xen {
    let memory = m.guest_memory().expect("guest RAM").clone();
    let config = XenConfig {
        vcpus: 2,
        long_mode: false,
        shared_info_gpa: XEN_SHARED_INFO,
        domid: 1,
    };
    let (channels, upcalls) = attach(m.interrupts(), memory, config);
    for vcpu in 0..2 {
        upcalls
            .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
            .unwrap();
    }
    let ch = Arc::clone(&channels);
    m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, args: u64| {
        ch.hypercall(vcpu as u32, cmd, args)
    }));
    Xen { channels, upcalls }
}

/// The guest issues EVTCHNOP `cmd` with `args` at [`ARGS`]; returns its result and the args
/// as the hypercall left them.
fn hypercall(m: &dyn Machine, cmd: u32, args: &[u8]) -> (i64, Vec<u8>) {
    m.write_guest(u64::from(ARGS), args).unwrap();
    let r = m.guest_mmio(&[hypercall_op(cmd, ARGS)]).unwrap()[0] as i32;
    let mut out = vec![0; args.len()];
    m.read_guest(u64::from(ARGS), &mut out).unwrap();
    (i64::from(r), out)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn args(fields: &[(usize, u32)], len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    for &(off, v) in fields {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn bind_ipi(m: &dyn Machine, vcpu: u32) -> u32 {
    let (r, out) = hypercall(m, BIND_IPI, &args(&[(0, vcpu)], 8));
    assert_eq!(r, 0);
    u32_at(&out, 4)
}

fn send(m: &dyn Machine, port: u32) -> i64 {
    hypercall(m, SEND, &args(&[(0, port)], 4)).0
}

/// The control of a negative check on ports: an event on a fresh port bound to `vcpu`,
/// waited for. The guest's consumer scans every port in one pass, so once it has consumed the
/// control, a port event sent before it has been consumed too (or never will be).
fn port_control(m: &dyn Machine, vcpu: u32) {
    let q = bind_ipi(m, vcpu);
    assert_eq!(send(m, q), 0);
    assert_eq!(wait_port(m, q, 1), 1, "the control port's event");
}

fn wait_port(m: &dyn Machine, port: u32, n: u32) -> u32 {
    m.wait_port_count(port, n, WAIT)
}

/// Sets or clears the guest's mask bit for `port` the way the guest does (a plain write to
/// its own shared_info, compat layout).
fn guest_mask(m: &dyn Machine, port: u32, masked: bool) {
    let word = XEN_SHARED_INFO + 0x880 + u64::from(port / 32) * 4;
    let mut b = [0u8; 4];
    m.read_guest(word, &mut b).unwrap();
    let mut w = u32::from_le_bytes(b);
    if masked {
        w |= 1 << (port % 32);
    } else {
        w &= !(1 << (port % 32));
    }
    m.write_guest(word, &w.to_le_bytes()).unwrap();
}

on_every_machine!(
    send_to_self_by_ipi_reaches_the_bound_vcpu,
    two_vcpus,
    |m: &dyn Machine, _| {
        let _x = xen(m);
        let p0 = bind_ipi(m, 0);
        let p1 = bind_ipi(m, 1);
        assert!(
            p0 >= 1 && p1 == p0 + 1,
            "lowest free ports, never 0: {p0} {p1}"
        );
        assert_eq!(send(m, p1), 0);
        let ev = m
            .wait_isr(None, XEN_UPCALL_VECTOR, WAIT)
            .expect("no upcall");
        assert_eq!(
            ev.vcpu, 1,
            "the per-vCPU upcall vector reaches the port's vCPU"
        );
        assert_eq!(wait_port(m, p1, 1), 1);
        assert_eq!(send(m, p0), 0);
        assert_eq!(wait_port(m, p0, 1), 1);
        port_control(m, 0);
        port_control(m, 1);
        assert_eq!(
            (m.port_counter(p0), m.port_counter(p1)),
            (1, 1),
            "consumed twice"
        );
    }
);

on_every_machine!(
    a_masked_port_is_pending_without_upcall_until_unmasked,
    two_vcpus,
    |m: &dyn Machine, _| {
        let _x = xen(m);
        let p = bind_ipi(m, 0);
        guest_mask(m, p, true);
        assert_eq!(send(m, p), 0);
        // Control: an unmasked port on the same vCPU, sent after, is consumed; the consumer's
        // pass scans every port, so a deliverable p would have been consumed with it.
        let q = bind_ipi(m, 0);
        assert_eq!(send(m, q), 0);
        assert_eq!(wait_port(m, q, 1), 1, "the control port");
        assert_eq!(m.port_counter(p), 0, "a masked port was consumed");
        assert_eq!(
            m.count(0, XEN_UPCALL_VECTOR),
            1,
            "a masked port raised an upcall of its own"
        );
        let mut b = [0u8; 4];
        m.read_guest(XEN_SHARED_INFO + 0x800 + u64::from(p / 32) * 4, &mut b)
            .unwrap();
        assert_ne!(
            u32::from_le_bytes(b) & 1 << (p % 32),
            0,
            "its pending bit is set"
        );
        assert_eq!(hypercall(m, UNMASK, &args(&[(0, p)], 4)).0, 0);
        assert_eq!(wait_port(m, p, 1), 1, "unmask raised the pending event");
    }
);

on_every_machine!(
    loopback_interdomain_send_marks_the_other_end,
    two_vcpus,
    |m: &dyn Machine, _| {
        let _x = xen(m);
        let self_dom = u32::from(DOMID_SELF);
        let (r, out) = hypercall(
            m,
            ALLOC_UNBOUND,
            &args(&[(0, self_dom | self_dom << 16)], 8),
        );
        assert_eq!(r, 0);
        let a = u32_at(&out, 4);
        let (r, out) = hypercall(m, BIND_INTERDOMAIN, &args(&[(0, self_dom), (4, a)], 12));
        assert_eq!(r, 0);
        let b = u32_at(&out, 8);
        // Xen event_channel.c: a freshly bound interdomain port is marked pending (an event may
        // have been sent while the other end was unbound).
        assert_eq!(wait_port(m, b, 1), 1);
        assert_eq!(send(m, b), 0);
        assert_eq!(wait_port(m, a, 1), 1);
        assert_eq!(send(m, a), 0);
        assert_eq!(wait_port(m, b, 2), 2);
        port_control(m, 0);
        assert_eq!(
            (m.port_counter(a), m.port_counter(b)),
            (1, 2),
            "consumed twice"
        );
        // Status of each end: interdomain (2); of a closed port: 0, successfully.
        let (r, out) = hypercall(m, STATUS, &args(&[(0, self_dom), (4, a)], 24));
        assert_eq!((r, u32_at(&out, 8)), (0, 2));
        assert_eq!(hypercall(m, CLOSE, &args(&[(0, b)], 4)).0, 0);
        let (r, out) = hypercall(m, STATUS, &args(&[(0, self_dom), (4, b)], 24));
        assert_eq!((r, u32_at(&out, 8)), (0, 0));
        let (r, out) = hypercall(m, STATUS, &args(&[(0, self_dom), (4, a)], 24));
        assert_eq!(
            (r, u32_at(&out, 8)),
            (0, 1),
            "the other end is unbound again"
        );
    }
);

on_every_machine!(
    an_eventfd_route_marks_its_port,
    two_vcpus,
    |m: &dyn Machine, _| {
        let _x = xen(m);
        let p = bind_ipi(m, 1);
        let irq = m.interrupts();
        let route = Route::XenEvtchn {
            port: p,
            vcpu: 1,
            priority: 7,
        };
        let gsi = irq.new_route(route).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let irqfd = gsi.assign_irqfd(&fd).unwrap();
        assert_eq!(
            irqfd.path(),
            IrqfdPath::User,
            "no XEN_HVM in this KVM: vmirq emulates"
        );
        for n in 1..=5 {
            fd.write(1).unwrap();
            assert_eq!(wait_port(m, p, n), n);
        }
        port_control(m, 1);
        assert_eq!(m.port_counter(p), 5, "an event consumed twice");
    }
);

on_every_machine!(
    guest_sends_reach_a_backend_eventfd_and_back,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen(m);
        // The guest allocates a port for dom0 (the VMM), which binds its backend to it.
        let (r, out) = hypercall(m, ALLOC_UNBOUND, &args(&[(0, u32::from(DOMID_SELF))], 8));
        assert_eq!(r, 0);
        let p = u32_at(&out, 4);
        let backend = x.channels.bind_backend(p).unwrap();
        assert_eq!(send(m, p), 0);
        assert_eq!(
            backend.notify.read().unwrap(),
            1,
            "guest send → backend eventfd"
        );
        x.channels.notify_port(p).unwrap();
        assert_eq!(wait_port(m, p, 1), 1, "backend signal → guest port");
    }
);

on_every_machine!(
    virqs_bind_once_per_vcpu_and_are_raised_by_the_vmm,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen(m);
        const VIRQ_TIMER: u32 = 0;
        let (r, out) = hypercall(m, BIND_VIRQ, &args(&[(0, VIRQ_TIMER), (4, 1)], 12));
        assert_eq!(r, 0);
        let p = u32_at(&out, 8);
        assert_eq!(
            hypercall(m, BIND_VIRQ, &args(&[(0, VIRQ_TIMER), (4, 1)], 12)).0,
            EEXIST
        );
        assert_eq!(
            hypercall(m, BIND_VIRQ, &args(&[(0, VIRQ_TIMER), (4, 9)], 12)).0,
            ENOENT
        );
        assert_eq!(
            hypercall(m, BIND_VCPU, &args(&[(0, p), (4, 0)], 8)).0,
            EINVAL,
            "per-vCPU VIRQ"
        );
        x.channels.raise_virq(VIRQ_TIMER, 1).unwrap();
        let ev = m
            .wait_isr(None, XEN_UPCALL_VECTOR, WAIT)
            .expect("no upcall");
        assert_eq!(ev.vcpu, 1);
        assert_eq!(wait_port(m, p, 1), 1);
        // Errnos the guest sees through the doorbell.
        assert_eq!(send(m, 4095), EINVAL, "send on a port never allocated");
        assert_eq!(hypercall(m, CLOSE, &args(&[(0, 4095)], 4)).0, EINVAL);
    }
);

on_every_machine!(
    the_callback_gsi_is_asserted_while_upcall_pending,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen(m);
        x.upcalls.set_upcall_vector(0, None).unwrap();
        x.upcalls.set_callback(Callback::Gsi(20)).unwrap();
        let p = bind_ipi(m, 0);
        for n in 1..=3 {
            assert_eq!(send(m, p), 0);
            assert_eq!(wait_port(m, p, n), n, "event {n} through the callback GSI");
        }
        // Each event: one upcall, and when the LAPIC retires the upcall at delivery (this
        // host's KVM, the at-delivery simulator) the resample comes before the handler clears
        // upcall_pending, so the pin is re-asserted once more and the guest takes one empty
        // upcall. At the guest's EOI (standard KVM) the handler has cleared it: exactly one.
        let per_event = |n: u64| match m.eoi_timing() {
            Some(vmirq::EoiTiming::GuestEoi) => n..=n,
            _ => n..=2 * n,
        };
        // Control: an event on a second port, waited for, proves the path is live and that
        // any re-assert still owed for the first port's events has been taken.
        let q = bind_ipi(m, 0);
        assert_eq!(send(m, q), 0);
        assert_eq!(wait_port(m, q, 1), 1, "the control event");
        // The guest counts a port inside the upcall's handler, before the vector itself: a
        // control interrupt (lower vector) is taken only after that handler returned.
        m.control(0);
        let upcalls = m.count(0, XEN_UPCALL_VECTOR);
        assert!(
            per_event(4).contains(&upcalls),
            "{upcalls} upcalls for 4 events"
        );
        assert!(!x.channels.upcall_pending(0));
        assert_eq!(m.port_counter(p), 3, "an event consumed twice");
        // Nothing storms once upcall_pending is clear: a second control takes exactly its own
        // upcall(s).
        assert_eq!(send(m, q), 0);
        assert_eq!(wait_port(m, q, 2), 2, "the second control event");
        m.control(0);
        let after = m.count(0, XEN_UPCALL_VECTOR) - upcalls;
        // At-delivery retiring: the first control's own re-assert can land after `upcalls`
        // was read (its resample races the guest's handler), so it may be counted here.
        let owed = match m.eoi_timing() {
            Some(vmirq::EoiTiming::GuestEoi) => 0,
            _ => 1,
        };
        let (low, high) = per_event(1).into_inner();
        assert!(
            (low..=high + owed).contains(&after),
            "{after} upcalls for 1 event"
        );
        assert_eq!((m.port_counter(p), m.port_counter(q)), (3, 2));
    }
);
