//! Edge interrupts end to end, written once and run on the simulated backend and real KVM,
//! each with the in-kernel and the split irqchip.

use std::time::Duration;

use vmirq::{EdgeIrqfd, Error, GsiRoute, IrqfdPath, MsiMessage, Route, X86Msi};
use vmirq_guest::machine::{drain_burst, Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmm_sys_util::eventfd::EventFd;

const WAIT: Duration = Duration::from_secs(5);
const PIN: u32 = 5;
const PIN_VECTOR: u8 = 0x45;

fn two_vcpus(mode: Mode) -> MachineConfig {
    MachineConfig::new(2, mode.irqchip()).ioapic_pin(PIN, PIN_VECTOR, 0, false)
}

fn msi(dest: u32, vector: u8) -> MsiMessage {
    X86Msi::fixed(dest, vector).encode().unwrap()
}

/// Allocates a GSI, routes it to `msg`, and binds a fresh eventfd to it.
fn msi_irqfd(
    m: &dyn Machine,
    msg: MsiMessage,
    path: Option<IrqfdPath>,
) -> (GsiRoute, EventFd, EdgeIrqfd) {
    let irq = m.interrupts();
    let gsi = irq.new_route(Route::msi(msg)).unwrap();
    let fd = EventFd::new(0).unwrap();
    let irqfd = gsi.assign_irqfd_on(&fd, path).unwrap();
    (gsi, fd, irqfd)
}

/// Whether `fd` holds a count nobody consumed (poll with a zero timeout).
fn has_count(fd: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    pfd.revents & libc::POLLIN != 0
}

/// Fires `n` times, waiting for each interrupt before the next; returns how many arrived.
fn paced(m: &dyn Machine, n: u64, vcpu: usize, vector: u8, fire: impl Fn()) -> u64 {
    m.log().clear();
    let before = m.count(vcpu, vector);
    for i in 0..n {
        fire();
        assert!(
            m.wait_isr(Some(vcpu), vector, WAIT).is_some(),
            "{}: trigger {i} of {n} on vector {vector:#x} was never taken",
            m.kind()
        );
    }
    // No duplicate still to come: the control is taken after anything pending above it.
    m.control(vcpu);
    m.count(vcpu, vector) - before
}

on_every_machine!(
    msi_signal_reaches_the_named_vcpu,
    two_vcpus,
    |m: &dyn Machine, _| {
        m.interrupts().signal_msi(msi(1, 0x40)).unwrap();
        let ev = m.wait_isr(None, 0x40, WAIT).expect("MSI never taken");
        assert_eq!(ev.vcpu, 1);
        m.control(0);
        m.control(1);
        assert_eq!((m.count(0, 0x40), m.count(1, 0x40)), (0, 1));
        let n = paced(m, 50, 0, 0x41, || {
            m.interrupts().signal_msi(msi(0, 0x41)).unwrap()
        });
        assert_eq!(n, 50);
    }
);

on_every_machine!(
    msi_irqfd_kernel_delivers_every_paced_trigger,
    two_vcpus,
    |m: &dyn Machine, _| {
        let (_gsi, fd, irqfd) = msi_irqfd(m, msi(1, 0x50), None);
        assert_eq!(irqfd.path(), IrqfdPath::Kernel);
        assert_eq!(paced(m, 100, 1, 0x50, || fd.write(1).unwrap()), 100);
        m.control(0);
        assert_eq!(m.count(0, 0x50), 0, "MSIs to vCPU 1 reach vCPU 1 only");
    }
);

on_every_machine!(
    msi_irqfd_user_delivers_every_paced_trigger,
    two_vcpus,
    |m: &dyn Machine, _| {
        let (_gsi, fd, irqfd) = msi_irqfd(m, msi(0, 0x51), Some(IrqfdPath::User));
        assert_eq!(irqfd.path(), IrqfdPath::User);
        assert_eq!(paced(m, 100, 0, 0x51, || fd.write(1).unwrap()), 100);
        assert_eq!(m.interrupts().user_irqfds(), 1);
        assert_eq!(
            m.interrupts()
                .stats()
                .user_inject_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
);

on_every_machine!(
    ioapic_pin_edge_route_delivers_every_paced_trigger,
    two_vcpus,
    |m: &dyn Machine, mode| {
        let fd = EventFd::new(0).unwrap();
        let irqfd = m.interrupts().pin(PIN).unwrap().assign_irqfd(&fd).unwrap();
        // The kernel's IOAPIC serves its own pins; the split irqchip's IOAPIC is vmirq's.
        let expected = match mode {
            Mode::Kernel => IrqfdPath::Kernel,
            Mode::Split => IrqfdPath::User,
        };
        assert_eq!(irqfd.path(), expected);
        assert_eq!(paced(m, 50, 0, PIN_VECTOR, || fd.write(1).unwrap()), 50);
        assert_eq!(
            paced(m, 10, 0, PIN_VECTOR, || m
                .interrupts()
                .pin(PIN)
                .unwrap()
                .inject()
                .unwrap()),
            10
        );
    }
);

fn burst(m: &dyn Machine, path: IrqfdPath, vector: u8) {
    let (_gsi, fd, _irqfd) = msi_irqfd(m, msi(0, vector), Some(path));
    m.log().clear();
    // An interrupt taken after the last trigger was issued proves it was not lost.
    let mut last_trigger = std::time::Instant::now();
    for _ in 0..200 {
        last_trigger = std::time::Instant::now();
        fd.write(1).unwrap();
    }
    // At least one delivery after the last trigger: nothing is lost, only coalesced.
    let last_isr = drain_burst(
        m,
        Some(0),
        vector,
        last_trigger,
        WAIT,
        Duration::from_millis(300),
    )
    .expect("a burst produced no interrupt");
    assert!(
        last_isr >= last_trigger,
        "no delivery after the last trigger"
    );
    m.control(0);
    // A range by design: the eventfd's counter merges writes, and KVM injects once per
    // wakeup (the user path once per read), so 200 writes are 1 to 200 interrupts.
    let n = m.count(0, vector);
    assert!((1..=200).contains(&n), "{n} interrupts from 200 triggers");
}

on_every_machine!(
    burst_on_the_kernel_path_delivers_after_the_last_trigger,
    two_vcpus,
    |m: &dyn Machine, _| {
        burst(m, IrqfdPath::Kernel, 0x60);
    }
);

on_every_machine!(
    burst_on_the_user_path_delivers_after_the_last_trigger,
    two_vcpus,
    |m: &dyn Machine, _| {
        burst(m, IrqfdPath::User, 0x61);
    }
);

fn deassign_then_silence(m: &dyn Machine, path: IrqfdPath, vector: u8) {
    let (_gsi, fd, irqfd) = msi_irqfd(m, msi(0, vector), Some(path));
    assert_eq!(paced(m, 3, 0, vector, || fd.write(1).unwrap()), 3);
    irqfd.deassign().unwrap();
    // Control: an irqfd on the same path to a lower vector, written after the deassigned one.
    let (_ctl_gsi, ctl, _ctl_irqfd) = msi_irqfd(m, msi(0, 0x32), Some(path));
    for _ in 0..10 {
        fd.write(1).unwrap();
    }
    ctl.write(1).unwrap();
    assert!(
        m.wait_isr(Some(0), 0x32, WAIT).is_some(),
        "the control irqfd"
    );
    assert_eq!(m.count(0, vector), 3, "an event fired after deassign");
    // The eventfd is free again: a new irqfd on it works and picks up the counted events.
    let again = _gsi.assign_irqfd_on(&fd, Some(path)).unwrap();
    assert!(
        m.wait_isr(Some(0), vector, WAIT).is_some(),
        "counted events not delivered at assign"
    );
    // The ten writes were counted, never consumed, and now delivered as one.
    m.control(0);
    assert_eq!(m.count(0, vector), 4);
    assert!(
        !has_count(&fd),
        "the count served at assign is still in the eventfd (a snapshot would call it owed)"
    );
    // The count served at that assign is gone: binding the eventfd once more delivers nothing
    // (KVM's assign injects a waiting count but leaves it in the eventfd; vmirq consumes it).
    drop(again);
    let once_more = _gsi.assign_irqfd_on(&fd, Some(path)).unwrap();
    m.control(0);
    assert_eq!(
        m.count(0, vector),
        4,
        "a count served at assign was delivered again"
    );
    // And the binding is live.
    assert_eq!(paced(m, 1, 0, vector, || fd.write(1).unwrap()), 1);
    drop(once_more);
}

on_every_machine!(
    deassign_on_the_kernel_path_stops_delivery,
    two_vcpus,
    |m: &dyn Machine, _| {
        deassign_then_silence(m, IrqfdPath::Kernel, 0x62);
    }
);

on_every_machine!(
    deassign_on_the_user_path_stops_delivery,
    two_vcpus,
    |m: &dyn Machine, _| {
        deassign_then_silence(m, IrqfdPath::User, 0x63);
    }
);

on_every_machine!(
    an_eventfd_backs_at_most_one_irqfd,
    two_vcpus,
    |m: &dyn Machine, _| {
        let (gsi, fd, _irqfd) = msi_irqfd(m, msi(0, 0x64), None);
        let err = gsi.assign_irqfd(&fd).unwrap_err();
        assert!(matches!(err, Error::IrqfdBusy), "{err}");
        let err = gsi.assign_irqfd_on(&fd, Some(IrqfdPath::User)).unwrap_err();
        assert!(matches!(err, Error::IrqfdBusy), "{err}");
        // A dup() of the bound eventfd is the same eventfd: the same error on either path,
        // whichever path holds it.
        let dup = fd.try_clone().unwrap();
        for path in [None, Some(IrqfdPath::User), Some(IrqfdPath::Kernel)] {
            let err = gsi.assign_irqfd_on(&dup, path).unwrap_err();
            assert!(matches!(err, Error::IrqfdBusy), "{path:?}: {err}");
        }
        let (user_gsi, user_fd, _user) = msi_irqfd(m, msi(0, 0x65), Some(IrqfdPath::User));
        let dup = user_fd.try_clone().unwrap();
        for path in [None, Some(IrqfdPath::User), Some(IrqfdPath::Kernel)] {
            let err = user_gsi.assign_irqfd_on(&dup, path).unwrap_err();
            assert!(matches!(err, Error::IrqfdBusy), "{path:?}: {err}");
        }
    }
);

/// The GSI-reuse bug: device A's irqfd must never fire device B's vector after A's GSI is
/// given to B. The route owns its irqfds, so dropping it disables A's irqfd before the GSI
/// can be reused; an irqfd kept alive past its route holds the GSI back.
fn reused_gsi_never_fires_for_the_old_device(m: &dyn Machine, path: IrqfdPath) {
    let irq = m.interrupts();
    // B, the control, is the lower vector: a pending A is taken before B is seen.
    let (a_vec, b_vec) = (0x67, 0x66);
    let (route_a, fd_a, irqfd_a) = msi_irqfd(m, msi(0, a_vec), Some(path));
    // The path is live: A's trigger reaches A's vector.
    assert_eq!(paced(m, 1, 0, a_vec, || fd_a.write(1).unwrap()), 1);
    let gsi_a = route_a.gsi();
    drop(route_a);
    assert!(
        !irqfd_a.is_bound(),
        "dropping the route left its irqfd bound"
    );
    // Take GSIs until A's comes back, route them to B's vector, and bind B.
    let mut held = Vec::new();
    let route_b = loop {
        let r = irq.new_route(Route::msi(msi(0, b_vec))).unwrap();
        if r.gsi() == gsi_a {
            break r;
        }
        held.push(r);
        assert!(held.len() < 4096, "{gsi_a} was never handed out again");
    };
    let fd_b = EventFd::new(0).unwrap();
    let _irqfd_b = route_b.assign_irqfd_on(&fd_b, Some(path)).unwrap();
    // B's own trigger works (the negative check below is meaningful)...
    assert_eq!(paced(m, 1, 0, b_vec, || fd_b.write(1).unwrap()), 1);
    // ...and A's eventfd fires nothing, on either vector.
    let (a_before, b_before) = (m.count(0, a_vec), m.count(0, b_vec));
    for _ in 0..20 {
        fd_a.write(1).unwrap();
    }
    // Positive evidence the machine ran past A's writes: one more B interrupt arrives.
    assert_eq!(paced(m, 1, 0, b_vec, || fd_b.write(1).unwrap()), 1);
    assert_eq!(
        m.count(0, a_vec),
        a_before,
        "A's eventfd fired A's old vector"
    );
    assert_eq!(
        m.count(0, b_vec),
        b_before + 1,
        "A's eventfd fired B's vector"
    );
    drop(irqfd_a);
}

on_every_machine!(
    a_reused_gsi_never_fires_for_the_old_device_kernel_path,
    two_vcpus,
    |m: &dyn Machine, _| reused_gsi_never_fires_for_the_old_device(m, IrqfdPath::Kernel)
);

on_every_machine!(
    a_reused_gsi_never_fires_for_the_old_device_user_path,
    two_vcpus,
    |m: &dyn Machine, _| reused_gsi_never_fires_for_the_old_device(m, IrqfdPath::User)
);

on_every_machine!(
    dropping_a_route_then_its_irqfd_frees_the_gsi_exactly_once,
    two_vcpus,
    |m: &dyn Machine, _| {
        let irq = m.interrupts();
        let (route, _fd, irqfd) = msi_irqfd(m, msi(0, 0x68), Some(IrqfdPath::User));
        let gsi = route.gsi();
        // The route's drop disables the irqfd and frees the GSI; the irqfd handle's later drop
        // must not free it a second time. (The race in which an irqfd still holds the GSI's
        // lease while the route drops is not driven by this test.)
        drop(route);
        let free_after_route = irq.free_gsis();
        drop(irqfd);
        assert_eq!(irq.free_gsis(), free_after_route, "a GSI was freed twice");
        let again = irq.new_route(Route::msi(msi(0, 0x68))).unwrap();
        assert_eq!(again.gsi(), gsi, "the lowest free GSI is the one released");
    }
);

on_every_machine!(
    bad_irqfd_requests_get_typed_errors,
    two_vcpus,
    |m: &dyn Machine, _| {
        let irq = m.interrupts();
        let fd = EventFd::new(0).unwrap();
        let unrouted = irq.allocate_route().unwrap();
        assert!(matches!(unrouted.assign_irqfd(&fd), Err(Error::NoRoute(_))));
        // A descriptor that is no longer an eventfd: replaced behind the EventFd's back (with
        // dup2, atomically: closing it instead would free its number for another test thread
        // to reuse, and that thread's file would then be closed twice).
        let replaced = EventFd::new(0).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&replaced);
        // SAFETY: dup2 onto a descriptor this test owns; `replaced` still owns (and closes) it.
        assert_eq!(
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), raw) },
            raw
        );
        let err = irq.pin(PIN).unwrap().assign_irqfd(&replaced).unwrap_err();
        assert!(matches!(err, Error::BadEventFd), "{err}");
        // A Xen route cannot be served by a kernel irqfd on this host.
        unrouted
            .set(Route::XenEvtchn {
                port: 3,
                vcpu: 0,
                priority: 7,
            })
            .unwrap();
        let err = unrouted
            .assign_irqfd_on(&fd, Some(IrqfdPath::Kernel))
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
    }
);
