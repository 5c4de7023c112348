//! A Xen guest's vCPU surface end to end: single-shot and periodic timers raising VIRQ_TIMER,
//! SCHEDOP_poll blocking the vCPU until its port is pending, and shared_info mapped where the
//! guest asks (Linux's resume order). The guest makes its hypercalls through the doorbell,
//! served by `vmirq::xen::Hypercalls`. Sim and KVM, both irqchips.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmirq::xen::hypercall::{hvmop, nr, schedop, vcpuop, xenmem};
use vmirq::xen::{EventChannels, Hypercalls, Upcalls};
use vmirq_guest::layout::{XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
use vmirq_guest::machine::{Machine, MachineConfig, Mode};
use vmirq_guest::migration::mask_xen_port;
use vmirq_guest::on_every_machine;
use vmirq_guest::xen::{serve_xen, xen_cmd};

const WAIT: Duration = Duration::from_secs(5);
/// A port array, past the argument structs the guest's hypercalls read at the scratch area.
const PORTS: u32 = vmirq_guest::layout::SCRATCH as u32 + 0x100;
const VIRQ_TIMER: u32 = 0;
const BIND_VIRQ: u32 = 1;
const BIND_IPI: u32 = 7;

fn two_vcpus(mode: Mode) -> MachineConfig {
    MachineConfig::new(2, mode.irqchip())
}

struct Xen {
    channels: Arc<EventChannels>,
    upcalls: Arc<Upcalls>,
}

/// Event channels with shared_info at `shared_info`, every hypercall served, upcall vectors set
/// (their injection waited for).
fn xen_at(m: &dyn Machine, shared_info: u64) -> Xen {
    let (channels, upcalls) = vmirq_guest::xen::attach_compat(m, 2, shared_info);
    serve_xen(
        m,
        Arc::new(Hypercalls::new(Arc::clone(&channels), Arc::clone(&upcalls))),
    );
    for vcpu in 0..2 {
        upcalls
            .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
            .unwrap();
        assert!(m
            .wait_isr(Some(vcpu as usize), XEN_UPCALL_VECTOR, WAIT)
            .is_some());
    }
    Xen { channels, upcalls }
}

/// The guest makes hypercall `cmd` (a [`xen_cmd`] word) with `args`.
fn hypercall(m: &dyn Machine, cmd: u32, args: &[u8]) -> (i64, Vec<u8>) {
    vmirq_guest::xen::hypercall(m, cmd, args).unwrap()
}

fn le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn bind(m: &dyn Machine, cmd: u32, args: &[u32], out_at: usize) -> u32 {
    let (r, out) = hypercall(m, cmd, &le(args));
    assert_eq!(r, 0, "EVTCHNOP {cmd}");
    u32::from_le_bytes(out[out_at..out_at + 4].try_into().unwrap())
}

on_every_machine!(
    timers_raise_virq_timer_on_their_vcpu,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen_at(m, XEN_SHARED_INFO);
        let t0 = bind(m, BIND_VIRQ, &[VIRQ_TIMER, 0, 0], 8);
        let t1 = bind(m, BIND_VIRQ, &[VIRQ_TIMER, 1, 0], 8);
        // vCPU 0 arms its own single-shot timer 2 ms ahead, through its hypercall.
        let at = x.channels.guest_time() + 2_000_000;
        let set = xen_cmd(nr::VCPU_OP, vcpuop::SET_SINGLESHOT_TIMER, 0);
        let armed = Instant::now();
        assert_eq!(
            hypercall(m, set, &le(&[at as u32, (at >> 32) as u32, 0])).0,
            0
        );
        assert_eq!(m.wait_port_count(t0, 1, WAIT), 1, "vCPU 0's timer");
        assert!(armed.elapsed() >= Duration::from_millis(1), "fired early");
        // Another vCPU's single-shot timer is refused; vCPU 1's own is armed as its
        // dispatcher would (the test guest's hypercalls come from vCPU 0).
        let other = xen_cmd(nr::VCPU_OP, vcpuop::SET_SINGLESHOT_TIMER, 1);
        assert_eq!(hypercall(m, other, &le(&[at as u32, 0, 0])).0, -22);
        let at = x.channels.guest_time() + 1_000_000;
        x.channels.set_singleshot_timer(1, 1, at).unwrap();
        assert_eq!(m.wait_port_count(t1, 1, WAIT), 1, "vCPU 1's timer");
        // vCPU 1's periodic timer, every millisecond, until stopped.
        let periodic = xen_cmd(nr::VCPU_OP, vcpuop::SET_PERIODIC_TIMER, 1);
        assert_eq!(hypercall(m, periodic, &le(&[1_000_000, 0])).0, 0);
        assert!(m.wait_port_count(t1, 4, WAIT) >= 4, "periodic ticks");
        let stop = xen_cmd(nr::VCPU_OP, vcpuop::STOP_PERIODIC_TIMER, 1);
        assert_eq!(hypercall(m, stop, &[0; 8]).0, 0);
        // Nothing fires once stop returned (it waits out a firing in flight): after a control
        // on vCPU 1 (the guest took every tick raised before), a second one three periods
        // later finds the count unchanged.
        let ctl = bind(m, BIND_IPI, &[1, 0], 4);
        x.channels.notify_port(ctl).unwrap();
        assert_eq!(m.wait_port_count(ctl, 1, WAIT), 1);
        let ticks = m.port_counter(t1);
        let due = Instant::now() + Duration::from_millis(3);
        assert!(m.wait_until(WAIT, &mut || Instant::now() >= due));
        x.channels.notify_port(ctl).unwrap();
        assert_eq!(m.wait_port_count(ctl, 2, WAIT), 2);
        assert_eq!(
            m.port_counter(t1),
            ticks,
            "the periodic timer ticked after stop"
        );
        assert_eq!(m.port_counter(t0), 1, "vCPU 0's timer fired twice");
        let _ = &x.upcalls;
    }
);

on_every_machine!(
    sched_poll_blocks_the_vcpu_until_its_port_is_pending,
    two_vcpus,
    |m: &dyn Machine, _| {
        let x = xen_at(m, XEN_SHARED_INFO);
        let p = bind(m, BIND_IPI, &[0, 0], 4);
        // Linux's xen_poll_irq polls a masked port: the pending bit wakes it, no upcall.
        mask_xen_port(m, p).unwrap();
        m.write_guest(u64::from(PORTS), &p.to_le_bytes()).unwrap();
        let waker = vmirq_guest::xen::wake_poller(&x.channels, p, WAIT);
        // struct sched_poll (compat): ports handle, nr_ports, u64 timeout (0: none).
        let poll = xen_cmd(nr::SCHED_OP, schedop::POLL, 0);
        assert_eq!(hypercall(m, poll, &le(&[PORTS, 1, 0, 0])).0, 0);
        waker.join().unwrap();
        assert!(x.channels.port_status(p).pending, "woken by its port");
        assert_eq!(m.port_counter(p), 0, "a masked port was consumed");
        // A timeout already past returns at once; a bad port is -EINVAL.
        assert_eq!(hypercall(m, poll, &le(&[PORTS, 1, 1, 0])).0, 0);
        m.write_guest(u64::from(PORTS), &1024u32.to_le_bytes())
            .unwrap();
        assert_eq!(hypercall(m, poll, &le(&[PORTS, 1, 0, 0])).0, -22);
        assert_eq!(x.channels.pollers(), 0);
    }
);

on_every_machine!(
    shared_info_moves_where_the_guest_maps_it,
    two_vcpus,
    |m: &dyn Machine, _| {
        // The VMM placed shared_info elsewhere; the guest's consumer reads it at
        // XEN_SHARED_INFO, where the guest maps it (XENMAPSPACE_shared_info), as at resume.
        let elsewhere = XEN_SHARED_INFO + 0x8000;
        let x = xen_at(m, elsewhere);
        let p = bind(m, BIND_IPI, &[1, 0], 4);
        x.channels.notify_port(p).unwrap();
        // struct xen_add_to_physmap (compat): domid, size, space, idx, gpfn.
        let add = xen_cmd(nr::MEMORY_OP, xenmem::ADD_TO_PHYSMAP, 0);
        let gpfn = (XEN_SHARED_INFO >> 12) as u32;
        assert_eq!(hypercall(m, add, &le(&[0x7FF0, 0, 0, gpfn])).0, 0);
        assert_eq!(x.channels.config().shared_info_gpa, XEN_SHARED_INFO);
        // Linux then sets its upcall vector again, which injects: the event sent before the
        // move is found on the page where the guest looks.
        let set = xen_cmd(nr::HVM_OP, hvmop::SET_EVTCHN_UPCALL_VECTOR, 0);
        assert_eq!(
            hypercall(m, set, &le(&[1, u32::from(XEN_UPCALL_VECTOR)])).0,
            0
        );
        assert_eq!(
            m.wait_port_count(p, 1, WAIT),
            1,
            "the event sent before the move"
        );
        // Events after the move land there too.
        x.channels.notify_port(p).unwrap();
        assert_eq!(m.wait_port_count(p, 2, WAIT), 2);
        let q = bind(m, BIND_IPI, &[0, 0], 4);
        x.channels.notify_port(q).unwrap();
        assert_eq!(m.wait_port_count(q, 1, WAIT), 1);
        assert_eq!(m.port_counter(p), 2, "consumed twice");
    }
);

on_every_machine!(
    a_device_msi_encoding_a_pirq_marks_its_port,
    two_vcpus,
    |m: &dyn Machine, _| {
        use vmirq::xen::hypercall::physdevop;
        use vmirq::xen::{map_type, pirq_msi};
        use vmirq::{IrqfdPath, Route};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let _x = xen_at(m, XEN_SHARED_INFO);
        // Linux's xen_hvm_setup_msi_irqs: a free PIRQ, then a port bound to it.
        let get = xen_cmd(nr::PHYSDEV_OP, physdevop::GET_FREE_PIRQ, 0);
        let pirq = bind(m, get, &[map_type::MSI as u32, 0], 4);
        assert_eq!(pirq, 255, "MSIs count down from the top");
        const BIND_PIRQ: u32 = 2;
        let p = bind(m, BIND_PIRQ, &[pirq, 0, 0], 8);
        // The device's MSI carries the PIRQ message: its irqfd takes vmirq's path, which marks
        // the port instead of injecting vector 0.
        let irq = m.interrupts();
        let route = irq.new_route(Route::msi(pirq_msi(pirq))).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(route.assign_irqfd_on(&fd, Some(IrqfdPath::Kernel)).is_err());
        let irqfd = route.assign_irqfd(&fd).unwrap();
        assert_eq!(irqfd.path(), IrqfdPath::User);
        for n in 1..=3 {
            fd.write(1).unwrap();
            assert_eq!(m.wait_port_count(p, n, WAIT), n, "device MSI {n}");
        }
        irq.signal_msi(pirq_msi(pirq)).unwrap();
        assert_eq!(m.wait_port_count(p, 4, WAIT), 4, "a signalled MSI");
        // Closed: the device's MSIs go nowhere. The control is an event channel route's
        // irqfd, signalled after the device's: the dispatcher serves them in that order.
        const CLOSE: u32 = 3;
        let q = bind(m, BIND_IPI, &[0, 0], 4);
        let ctl_route = irq
            .new_route(Route::XenEvtchn {
                port: q,
                vcpu: 0,
                priority: Route::XEN_PRIO_2LEVEL,
            })
            .unwrap();
        let ctl = EventFd::new(EFD_NONBLOCK).unwrap();
        let _ctl_irqfd = ctl_route.assign_irqfd(&ctl).unwrap();
        assert_eq!(hypercall(m, CLOSE, &le(&[p])).0, 0);
        fd.write(1).unwrap();
        ctl.write(1).unwrap();
        assert_eq!(m.wait_port_count(q, 1, WAIT), 1);
        assert_eq!(m.port_counter(p), 4, "an MSI reached a closed PIRQ port");
        assert!(irqfd.take_error().is_none(), "the dispatcher failed an MSI");
    }
);

const GSI_PIN: u32 = 10;
const GSI_VECTOR: u8 = 0x4A;
const KERNEL_PIN: u32 = 11;

fn two_vcpus_with_pins(mode: Mode) -> MachineConfig {
    MachineConfig::new(2, mode.irqchip())
        .ioapic_pin(GSI_PIN, GSI_VECTOR, 0, true)
        .ioapic_pin(KERNEL_PIN, 0x4B, 0, false)
}

on_every_machine!(
    a_gsi_mapped_to_a_pirq_marks_its_port_until_unmapped,
    two_vcpus_with_pins,
    |m: &dyn Machine, mode: Mode| {
        use vmirq::xen::hypercall::physdevop;
        use vmirq::xen::map_type;
        use vmirq::IrqfdPath;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let x = xen_at(m, XEN_SHARED_INFO);
        let irq = m.interrupts();
        let self_dom = 0x7FF0;
        // struct physdev_map_pirq {domid, type, index, pirq}: pirq -1 allocates one.
        let map = xen_cmd(nr::PHYSDEV_OP, physdevop::MAP_PIRQ, 0);
        let gsi = map_type::GSI as u32;
        let (r, out) = hypercall(m, map, &le(&[self_dom, gsi, GSI_PIN, u32::MAX, 0, 0, 0, 0]));
        assert_eq!(r, 0);
        let pirq = u32::from_le_bytes(out[12..16].try_into().unwrap());
        assert_eq!(pirq, 16, "GSIs take PIRQs from 16 up");
        const BIND_PIRQ: u32 = 2;
        let p = bind(m, BIND_PIRQ, &[pirq, 0, 0], 8);
        let status = xen_cmd(nr::PHYSDEV_OP, physdevop::IRQ_STATUS_QUERY, 0);
        let (r, out) = hypercall(m, status, &le(&[pirq, 0]));
        assert_eq!((r, out[4]), (0, 1), "a GSI PIRQ needs an EOI");
        // A pin a kernel irqfd drives cannot be a PIRQ's (on a split irqchip pin irqfds take
        // vmirq's path to its IOAPIC, and the pin can be mapped).
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let edge = irq.pin(KERNEL_PIN).unwrap().assign_irqfd(&fd).unwrap();
        let (r, out) = hypercall(
            m,
            map,
            &le(&[self_dom, gsi, KERNEL_PIN, u32::MAX, 0, 0, 0, 0]),
        );
        if edge.path() == IrqfdPath::Kernel {
            assert_eq!(r, -16, "-EBUSY");
        } else {
            assert_eq!(r, 0);
            let other = u32::from_le_bytes(out[12..16].try_into().unwrap());
            let unmap = xen_cmd(nr::PHYSDEV_OP, physdevop::UNMAP_PIRQ, 0);
            assert_eq!(hypercall(m, unmap, &le(&[self_dom, other])).0, 0);
        }
        // The pin's line marks the port instead of reaching the IOAPIC.
        let source = irq.pin(GSI_PIN).unwrap().line().unwrap().source();
        source.assert();
        assert_eq!(m.wait_port_count(p, 1, WAIT), 1, "the line's rising level");
        // The guest's EOI with the line still high marks it again (QEMU's re-assert).
        let eoi = xen_cmd(nr::PHYSDEV_OP, physdevop::EOI, 0);
        assert_eq!(hypercall(m, eoi, &le(&[pirq])).0, 0);
        assert_eq!(m.wait_port_count(p, 2, WAIT), 2, "still high at EOI");
        source.deassert();
        assert_eq!(hypercall(m, eoi, &le(&[pirq])).0, 0);
        // Level irqfds: on the in-kernel irqchip only KVM serves resample, so they are refused;
        // on a split irqchip the trigger marks the port and the EOI fires the resamplefd.
        let (trigger, resample) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        let level = irq
            .pin(GSI_PIN)
            .unwrap()
            .assign_level_irqfd(&trigger, &resample);
        let expected = match mode {
            Mode::Kernel => {
                assert!(level.is_err(), "a kernel resample irqfd on a PIRQ's pin");
                2
            }
            Mode::Split => {
                let _level = level.unwrap();
                trigger.write(1).unwrap();
                assert_eq!(m.wait_port_count(p, 3, WAIT), 3, "the level irqfd");
                assert!(resample.read().is_err(), "resampled before the EOI");
                assert_eq!(hypercall(m, eoi, &le(&[pirq])).0, 0);
                assert_eq!(resample.read().unwrap(), 1, "the EOI resamples");
                3
            }
        };
        assert_eq!(
            m.count(0, GSI_VECTOR),
            0,
            "the IOAPIC delivered while mapped"
        );
        // Unmapped, the pin is the IOAPIC's again: its line reaches the guest as a vector.
        let unmap = xen_cmd(nr::PHYSDEV_OP, physdevop::UNMAP_PIRQ, 0);
        assert_eq!(hypercall(m, unmap, &le(&[self_dom, pirq])).0, 0);
        source.assert();
        assert!(
            m.wait_isr(Some(0), GSI_VECTOR, WAIT).is_some(),
            "the IOAPIC's again"
        );
        source.deassert();
        assert_eq!(
            m.port_counter(p),
            expected,
            "the port got an event of the IOAPIC's"
        );
        drop((edge, x));
    }
);
