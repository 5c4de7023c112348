//! Xen event channels end to end: the real-mode guest (a 32-bit Xen HVM guest with Linux's
//! 2-level consumer on its upcall vector) issues EVTCHNOPs through the test doorbell; vmirq's
//! emulation marks ports in its shared_info and raises upcalls. Sim and KVM, both irqchips.

use std::sync::Arc;
use std::time::Duration;

use vmirq::xen::{Callback, EventChannels, Upcalls};
use vmirq::{IrqfdPath, Route};
use vmirq_guest::layout::{xen_vcpu_info, XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
use vmirq_guest::machine::{hypercall_op, Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WAIT: Duration = Duration::from_secs(5);
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

/// Event channels on `m`'s guest memory and hypercalls from the guest's doorbell; no upcall
/// configured yet.
fn xen_unconfigured(m: &dyn Machine) -> Xen {
    let (channels, upcalls) = vmirq_guest::xen::attach_compat(m, 2, XEN_SHARED_INFO);
    let ch = Arc::clone(&channels);
    m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, args: u64| {
        ch.hypercall(vcpu as u32, cmd, args)
    }));
    Xen { channels, upcalls }
}

/// [`xen_unconfigured`], then upcalls on each vCPU's vector. Setting a vector injects it (Xen
/// `hvmop_set_evtchn_upcall_vector` → `hvm_assert_evtchn_irq`): waited for here, so the tests'
/// upcall counts start from a machine at rest.
fn xen(m: &dyn Machine) -> Xen {
    let x = xen_unconfigured(m);
    for vcpu in 0..2 {
        x.upcalls
            .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
            .unwrap();
        assert!(
            m.wait_isr(Some(vcpu as usize), XEN_UPCALL_VECTOR, WAIT)
                .is_some(),
            "setting vCPU {vcpu}'s upcall vector injected nothing"
        );
    }
    x
}

/// The guest issues EVTCHNOP `cmd` with `args`; returns its result and the args as the
/// hypercall left them.
fn hypercall(m: &dyn Machine, cmd: u32, args: &[u8]) -> (i64, Vec<u8>) {
    vmirq_guest::xen::hypercall(m, cmd, args).unwrap()
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
        let upcalls = m.count(0, XEN_UPCALL_VECTOR);
        assert_eq!(send(m, p), 0);
        // Control: an unmasked port on the same vCPU, sent after, is consumed; the consumer's
        // pass scans every port, so a deliverable p would have been consumed with it.
        let q = bind_ipi(m, 0);
        assert_eq!(send(m, q), 0);
        assert_eq!(wait_port(m, q, 1), 1, "the control port");
        assert_eq!(m.port_counter(p), 0, "a masked port was consumed");
        // The vector is counted after the handler counted the port: wait out that handler.
        m.control(0);
        assert_eq!(
            m.count(0, XEN_UPCALL_VECTOR) - upcalls,
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
            // The value a VMM hands a KVM with KVM_CAP_XEN_HVM: the same route works here.
            priority: Route::XEN_PRIO_2LEVEL,
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
        // Setting the callback asserts every vCPU's event-channel interrupt: vCPU 1 still has
        // its vector and takes it; vCPU 0 has no upcall pending, so its GSI stays low.
        x.upcalls.set_callback(Callback::Gsi(20)).unwrap();
        assert!(m.wait_isr(Some(1), XEN_UPCALL_VECTOR, WAIT).is_some());
        let base = m.count(0, XEN_UPCALL_VECTOR);
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
        let upcalls = m.count(0, XEN_UPCALL_VECTOR) - base;
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
        let after = m.count(0, XEN_UPCALL_VECTOR) - base - upcalls;
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

// Linux's boot order (arch/x86/xen/enlighten_hvm.c): events are pending and every vCPU's
// `vcpu_info` is registered (which sets `upcall_pending`) before the upcall vector is set.
// Only the injection at `set_upcall_vector` (Xen `hvm_assert_evtchn_irq`) lets the guest see
// them; an emulation injecting only on `upcall_pending` 0→1 leaves every vCPU silent.
on_every_machine!(
    setting_the_upcall_vector_delivers_events_pending_since_registration,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen_unconfigured(m);
        let ports = [bind_ipi(m, 0), bind_ipi(m, 1)];
        for p in ports {
            assert_eq!(send(m, p), 0);
        }
        for vcpu in 0..2u32 {
            // Registered where the test guest's consumer reads it (its legacy slot's address):
            // the registration copies it, sets every selector bit and upcall_pending.
            x.channels
                .register_vcpu_info(vcpu, xen_vcpu_info(vcpu as usize))
                .unwrap();
            assert!(x.channels.upcall_pending(vcpu));
        }
        assert_eq!(m.port_counter(ports[0]) + m.port_counter(ports[1]), 0);
        for vcpu in 0..2u32 {
            x.upcalls
                .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
                .unwrap();
            assert_eq!(
                wait_port(m, ports[vcpu as usize], 1),
                1,
                "vCPU {vcpu}'s event never reached the guest"
            );
        }
        port_control(m, 0);
        port_control(m, 1);
        assert_eq!((m.port_counter(ports[0]), m.port_counter(ports[1])), (1, 1));
    }
);

// A callback vector (HVM_PARAM_CALLBACK_IRQ type 2) set while upcalls are pending injects
// on the vCPUs that have one (Xen `hvm_set_callback_via` → `hvm_assert_evtchn_irq`).
on_every_machine!(
    setting_the_callback_vector_injects_where_an_upcall_is_pending,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen_unconfigured(m);
        let p = bind_ipi(m, 1);
        assert_eq!(send(m, p), 0);
        assert!(x.channels.upcall_pending(1) && !x.channels.upcall_pending(0));
        x.upcalls
            .set_callback(Callback::Vector(XEN_UPCALL_VECTOR))
            .unwrap();
        let ev = m
            .wait_isr(None, XEN_UPCALL_VECTOR, WAIT)
            .expect("no injection when the callback was set");
        assert_eq!(ev.vcpu, 1, "only the vCPU with an upcall pending");
        assert_eq!(wait_port(m, p, 1), 1);
        port_control(m, 1);
        port_control(m, 0);
        assert_eq!(m.port_counter(p), 1);
    }
);

// KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID: the vCPU id Xen sees and the APIC ID vmirq delivers to are
// mapped, not assumed equal. Here Xen vCPU 0 is APIC 1 and Xen vCPU 1 is APIC 0, each with
// its `vcpu_info` where that APIC's consumer reads.
on_every_machine!(
    upcalls_go_to_the_apic_a_xen_vcpu_is_mapped_to,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen_unconfigured(m);
        for (xen_vcpu, apic) in [(0u32, 1usize), (1, 0)] {
            x.upcalls.set_apic_id(xen_vcpu, apic as u32).unwrap();
            assert_eq!(x.upcalls.apic_id(xen_vcpu), Some(apic as u32));
            x.channels
                .register_vcpu_info(xen_vcpu, xen_vcpu_info(apic))
                .unwrap();
        }
        for (xen_vcpu, apic) in [(0u32, 1usize), (1, 0)] {
            x.upcalls
                .set_upcall_vector(xen_vcpu, Some(XEN_UPCALL_VECTOR))
                .unwrap();
            assert!(
                m.wait_isr(Some(apic), XEN_UPCALL_VECTOR, WAIT).is_some(),
                "Xen vCPU {xen_vcpu}'s vector did not reach APIC {apic}"
            );
        }
        for (xen_vcpu, apic) in [(1u32, 0usize), (0, 1)] {
            let before = (m.count(0, XEN_UPCALL_VECTOR), m.count(1, XEN_UPCALL_VECTOR));
            let p = bind_ipi(m, xen_vcpu);
            assert_eq!(send(m, p), 0);
            assert_eq!(wait_port(m, p, 1), 1, "Xen vCPU {xen_vcpu}'s port");
            // The port was consumed by the APIC its vcpu_info belongs to; the other APIC got
            // no upcall (checked after a control on it, which proves it is running).
            let other = 1 - apic;
            let q = bind_ipi(m, 1 - xen_vcpu);
            assert_eq!(send(m, q), 0);
            assert_eq!(wait_port(m, q, 1), 1, "the control port");
            // The guest counts a port inside its upcall handler, the vector on the way out: a
            // control interrupt (lower vector) on each APIC is taken only after that handler
            // returned.
            m.control(apic);
            m.control(other);
            let after = (m.count(0, XEN_UPCALL_VECTOR), m.count(1, XEN_UPCALL_VECTOR));
            let taken = |c: usize| [after.0 - before.0, after.1 - before.1][c];
            assert_eq!(
                taken(apic),
                1,
                "APIC {apic} took Xen vCPU {xen_vcpu}'s upcall"
            );
            assert_eq!(taken(other), 1, "APIC {other}: its control's upcall only");
        }
    }
);

// Hypercall results as Xen gives them, through the guest's own doorbell.
on_every_machine!(
    hypercalls_answer_as_xen_does,
    two_vcpus,
    |m: &dyn Machine, _| {
        const EPERM: i64 = -1;
        const ESRCH: i64 = -3;
        const EFAULT: i64 = -14;
        const EBUSY: i64 = -16;
        const ENOSYS: i64 = -38;
        const EOPNOTSUPP: i64 = -95;
        let _x = xen(m);
        let self_dom = u32::from(DOMID_SELF);
        // Port 0 is reserved: status says closed, unmask succeeds, close and send do not.
        let (r, out) = hypercall(m, STATUS, &args(&[(0, self_dom), (4, 0)], 24));
        assert_eq!((r, u32_at(&out, 8)), (0, 0), "status of port 0");
        assert_eq!(hypercall(m, UNMASK, &args(&[(0, 0)], 4)).0, 0);
        assert_eq!(hypercall(m, CLOSE, &args(&[(0, 0)], 4)).0, EINVAL);
        assert_eq!(send(m, 0), EINVAL);
        // alloc_unbound: any remote domain, reported by status; dom0 may not be acted on.
        let (r, out) = hypercall(m, ALLOC_UNBOUND, &args(&[(0, self_dom | 9 << 16)], 8));
        assert_eq!(r, 0);
        let p = u32_at(&out, 4);
        let (r, out) = hypercall(m, STATUS, &args(&[(0, self_dom), (4, p)], 24));
        assert_eq!((r, u32_at(&out, 8), u32_at(&out, 16) & 0xffff), (0, 1, 9));
        assert_eq!(
            hypercall(m, ALLOC_UNBOUND, &args(&[(0, self_dom << 16)], 8)).0,
            EPERM
        );
        assert_eq!(hypercall(m, STATUS, &args(&[(0, 0), (4, p)], 24)).0, EPERM);
        assert_eq!(hypercall(m, STATUS, &args(&[(0, 9), (4, p)], 24)).0, ESRCH);
        // Global VIRQs are dom0's.
        const VIRQ_CONSOLE: u32 = 2;
        assert_eq!(
            hypercall(m, BIND_VIRQ, &args(&[(0, VIRQ_CONSOLE)], 12)).0,
            EBUSY
        );
        // FIFO before init_control; init_control's checks (none succeeds: this guest stays on
        // 2-level); set_priority checks the port; no reset to continue.
        const INIT_CONTROL: u32 = 11;
        const EXPAND_ARRAY: u32 = 12;
        const SET_PRIORITY: u32 = 13;
        const RESET_CONT: u32 = 14;
        assert_eq!(hypercall(m, EXPAND_ARRAY, &[0; 8]).0, EOPNOTSUPP);
        const ENOENT: i64 = -2;
        let init = |offset: u32, vcpu: u32| args(&[(8, offset), (12, vcpu)], 24);
        assert_eq!(hypercall(m, INIT_CONTROL, &init(0, 7)).0, ENOENT);
        assert_eq!(hypercall(m, INIT_CONTROL, &init(4, 0)).0, EINVAL);
        assert_eq!(hypercall(m, INIT_CONTROL, &init(4032, 0)).0, EINVAL);
        assert_eq!(hypercall(m, SET_PRIORITY, &args(&[(0, 1024)], 8)).0, EINVAL);
        assert_eq!(hypercall(m, SET_PRIORITY, &args(&[(0, p)], 8)).0, ENOSYS);
        assert_eq!(
            hypercall(m, RESET_CONT, &args(&[(0, self_dom)], 4)).0,
            EBUSY
        );
        // An argument outside guest RAM, for every command that reads one.
        for cmd in 0..=RESET_CONT {
            let r = m.guest_mmio(&[hypercall_op(cmd, 0xFFFF_F000)]).unwrap()[0] as i32;
            assert_eq!(i64::from(r), EFAULT, "cmd {cmd}");
        }
        // bind_vcpu moves the port and raises nothing on its own.
        let q = bind_ipi(m, 0);
        assert_eq!(hypercall(m, BIND_VCPU, &args(&[(0, p), (4, 1)], 8)).0, 0);
        let (r, out) = hypercall(m, STATUS, &args(&[(0, self_dom), (4, p)], 24));
        assert_eq!((r, u32_at(&out, 12)), (0, 1));
        assert_eq!(send(m, q), 0);
        assert_eq!(wait_port(m, q, 1), 1);
    }
);
