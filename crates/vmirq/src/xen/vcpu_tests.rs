//! Timers, polls, shared_info moves and width switches, on event channels over plain guest
//! memory (the upcalls recorded).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::abi::{self, op};
use super::tests::{vm_with, Vm, ARGS, RAM, SHINFO};
use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn vm(long_mode: bool, vcpus: u32) -> Vm {
    vm_with(long_mode, vcpus)
}

impl Vm {
    /// Plays the guest: clears the port's pending bit and the vCPU's upcall_pending.
    fn consume(&self, port: u32, vcpu: u32) {
        let l = self.ec.layout();
        let base = self.ec.config().shared_info_gpa;
        let word = base + l.pending + u64::from(port / l.word_bits()) * l.word_bytes;
        let bit = 1u64 << (port % l.word_bits());
        if l.word_bytes == 8 {
            let w: u64 = self.mem.read_obj(GuestAddress(word)).unwrap();
            self.mem.write_obj(w & !bit, GuestAddress(word)).unwrap();
        } else {
            let w: u32 = self.mem.read_obj(GuestAddress(word)).unwrap();
            self.mem
                .write_obj(w & !(bit as u32), GuestAddress(word))
                .unwrap();
        }
        let info = base + l.vcpu_info(vcpu);
        self.mem.write_obj(0u8, GuestAddress(info)).unwrap();
        self.mem
            .write_obj(0u64, GuestAddress(info + l.pending_sel))
            .unwrap();
    }

    fn wait_pending(&self, port: u32) {
        let deadline = Instant::now() + WAIT;
        while !self.pending(port) {
            assert!(
                Instant::now() < deadline,
                "port {port} never became pending"
            );
            std::thread::yield_now();
        }
    }
}

#[test]
fn a_singleshot_timer_raises_virq_timer_on_its_vcpu_at_its_deadline() {
    let vm = vm(true, 2);
    let timer = vm.bind_virq(abi::VIRQ_TIMER, 1).1;
    let now = vm.ec.guest_time();
    assert_eq!(
        vm.ec.set_singleshot_timer(0, 1, now + 1_000_000),
        Err(XenError::Invalid),
        "another vCPU's timer"
    );
    assert_eq!(
        vm.ec.set_singleshot_timer(2, 2, now),
        Err(XenError::NoEntry)
    );
    let armed_at = Instant::now();
    vm.ec.set_singleshot_timer(1, 1, now + 2_000_000).unwrap();
    vm.wait_pending(timer);
    assert!(
        armed_at.elapsed() >= Duration::from_millis(1),
        "fired early"
    );
    // The timer thread raises the upcall right after it marks the port.
    let deadline = Instant::now() + WAIT;
    while vm.up.0.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no upcall for the timer");
        std::thread::yield_now();
    }
    assert_eq!(vm.up.take(), [1]);
    // A deadline already past raises VIRQ_TIMER at once (Xen common_vcpu_op).
    vm.consume(timer, 1);
    vm.ec.set_singleshot_timer(1, 1, 1).unwrap();
    assert!(vm.pending(timer));
    assert_eq!(vm.up.take(), [1]);
}

#[test]
fn a_stopped_or_rearmed_singleshot_timer_does_not_fire_its_old_deadline() {
    let vm = vm(true, 2);
    let (t0, t1) = (
        vm.bind_virq(abi::VIRQ_TIMER, 0).1,
        vm.bind_virq(abi::VIRQ_TIMER, 1).1,
    );
    let now = vm.ec.guest_time();
    vm.ec.set_singleshot_timer(0, 0, now + 20_000_000).unwrap();
    vm.ec.stop_singleshot_timer(0, 0).unwrap();
    vm.ec.set_singleshot_timer(1, 1, now + 20_000_000).unwrap();
    vm.ec
        .set_singleshot_timer(1, 1, now + 3_600_000_000_000)
        .unwrap();
    // Control: a third deadline after both old ones, on vCPU 0 again.
    let ctl = vm.bind_ipi(1);
    let ec = Arc::clone(&vm.ec);
    let fired = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fired);
    let control = super::timer_service().timer(move || {
        ec.notify_port(ctl).unwrap();
        f.store(true, Ordering::SeqCst);
    });
    control.arm(Instant::now() + Duration::from_millis(40));
    let deadline = Instant::now() + WAIT;
    while !fired.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the control timer never fired");
        std::thread::yield_now();
    }
    assert!(vm.pending(ctl));
    assert!(!vm.pending(t0), "a stopped timer fired");
    assert!(!vm.pending(t1), "a re-armed timer fired its old deadline");
    assert_eq!(
        vm.ec.save_timers().len(),
        1,
        "vCPU 1's far deadline is still armed"
    );
}

#[test]
fn a_periodic_timer_raises_virq_timer_every_period_until_stopped() {
    let vm = vm(false, 1);
    let timer = vm.bind_virq(abi::VIRQ_TIMER, 0).1;
    assert_eq!(vm.ec.set_periodic_timer(0, 999_999), Err(XenError::Invalid));
    assert_eq!(
        vm.ec.set_periodic_timer(0, STIME_DELTA_MAX + 1),
        Err(XenError::Invalid)
    );
    vm.ec.set_periodic_timer(0, MIN_PERIOD_NS).unwrap();
    for _ in 0..3 {
        vm.wait_pending(timer);
        vm.consume(timer, 0);
    }
    vm.ec.stop_periodic_timer(0).unwrap();
    assert!(vm.ec.save_timers().is_empty());
}

#[test]
fn a_poll_returns_when_its_port_is_pending_and_not_for_another_port() {
    let vm = vm(true, 2);
    let (p, q) = (vm.bind_ipi(1), vm.bind_ipi(0));
    // Masked: Linux's xen_poll_irq polls masked ports; the pending bit alone wakes it.
    let mask = SHINFO + vm.ec.layout().mask;
    vm.mem.write_obj(1u64 << p, GuestAddress(mask)).unwrap();
    let ec = Arc::clone(&vm.ec);
    let poller = std::thread::spawn(move || ec.poll(1, &[p], 0));
    let deadline = Instant::now() + WAIT;
    while vm.ec.pollers() == 0 {
        assert!(Instant::now() < deadline, "the poll never blocked");
        std::thread::yield_now();
    }
    // Another port's event on another vCPU leaves a single-port poll blocked.
    vm.ec.notify_port(q).unwrap();
    assert_eq!(vm.ec.pollers(), 1);
    vm.ec.notify_port(p).unwrap();
    assert_eq!(poller.join().unwrap(), Ok(()));
    assert_eq!(vm.ec.pollers(), 0);
    assert!(vm.up.take() == [0], "the masked port raised no upcall");
}

#[test]
fn polls_end_on_any_port_a_kick_an_upcall_or_a_timeout() {
    let vm = vm(true, 2);
    let (a, b, c) = (vm.bind_ipi(0), vm.bind_ipi(0), vm.bind_ipi(1));
    let wait_blocked = |n| {
        let deadline = Instant::now() + WAIT;
        while vm.ec.pollers() != n {
            assert!(Instant::now() < deadline, "pollers never reached {n}");
            std::thread::yield_now();
        }
    };
    // Several ports: any port of the domain wakes it (Xen evtchn_check_pollers).
    let ec = Arc::clone(&vm.ec);
    let t = std::thread::spawn(move || ec.poll(1, &[a, b], 0));
    wait_blocked(1);
    vm.ec.notify_port(c).unwrap();
    assert_eq!(t.join().unwrap(), Ok(()));
    vm.consume(c, 1);
    // A kick (the VMM pausing vCPUs).
    let ec = Arc::clone(&vm.ec);
    let t = std::thread::spawn(move || ec.poll(1, &[a], 0));
    wait_blocked(1);
    vm.ec.kick(1);
    assert_eq!(t.join().unwrap(), Ok(()));
    // An upcall raised on the polling vCPU (Xen vcpu_kick).
    let ec = Arc::clone(&vm.ec);
    let t = std::thread::spawn(move || ec.poll(1, &[a], 0));
    wait_blocked(1);
    vm.ec.notify_port(c).unwrap();
    assert_eq!(t.join().unwrap(), Ok(()));
    // An upcall already pending returns at once (local_events_need_delivery).
    assert_eq!(vm.ec.poll(1, &[a], 0), Ok(()));
    vm.consume(c, 1);
    // Timeouts: one in the past, one shortly after now.
    assert_eq!(vm.ec.poll(1, &[a], 1), Ok(()));
    let start = Instant::now();
    let now = vm.ec.guest_time();
    assert_eq!(vm.ec.poll(1, &[a], now + 2_000_000), Ok(()));
    assert!(start.elapsed() >= Duration::from_millis(1));
    // Bad input.
    assert_eq!(vm.ec.poll(1, &[4096], 1), Err(XenError::Invalid));
    assert_eq!(vm.ec.poll(1, &[1; 129], 1), Err(XenError::Invalid));
    assert_eq!(vm.ec.poll(2, &[a], 1), Err(XenError::NoEntry));
    assert_eq!(vm.ec.pollers(), 0);
}

#[test]
fn shared_info_moves_while_events_are_sent_and_carries_every_bit() {
    let vm = vm(true, 2);
    let ports: Vec<u32> = (0..300).map(|i| vm.bind_ipi(i % 2)).collect();
    // Some masks set by the guest before the move travel with the copy.
    let mask = SHINFO + vm.ec.layout().mask;
    vm.mem.write_obj(0b110u64, GuestAddress(mask)).unwrap();
    let ec = Arc::clone(&vm.ec);
    let sent = ports.clone();
    let moved = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&moved);
    // Each send lands somewhere inside the move that follows the previous one.
    let sender = std::thread::spawn(move || {
        for p in sent {
            let before = seen.load(Ordering::SeqCst);
            ec.notify_port(p).unwrap();
            while seen.load(Ordering::SeqCst) == before {
                std::hint::spin_loop();
            }
        }
    });
    let pages = [SHINFO, SHINFO + 0x4000, SHINFO + 0x8000];
    let mut moves = 0;
    while !sender.is_finished() || moves < 3 {
        moves += 1;
        vm.ec.move_shared_info(pages[moves % 3]).unwrap();
        moved.store(moves, Ordering::SeqCst);
    }
    sender.join().unwrap();
    let now = vm.ec.config().shared_info_gpa;
    assert_eq!(now, pages[moves % 3]);
    for &p in &ports {
        assert!(vm.pending(p), "port {p} lost after {moves} moves");
    }
    let masks: u64 = vm.mem.read_obj(GuestAddress(now + 0xA00)).unwrap();
    assert_eq!(masks & 0b110, 0b110, "masks carried");
    for vcpu in 0..2 {
        assert!(vm.ec.upcall_pending(vcpu), "vCPU {vcpu}'s upcall_pending");
        let sel: u64 = vm
            .mem
            .read_obj(GuestAddress(now + u64::from(vcpu) * 64 + 8))
            .unwrap();
        assert_ne!(sel, 0, "vCPU {vcpu}'s selectors");
    }
    // Bad pages.
    assert_eq!(vm.ec.move_shared_info(SHINFO + 8), Err(XenError::Invalid));
    assert_eq!(vm.ec.move_shared_info(RAM as u64), Err(XenError::Invalid));
}

#[test]
fn the_width_switches_at_run_time_and_refuses_compat_with_a_high_port_open() {
    let vm = vm(true, 1);
    for _ in 1..1024 {
        vm.bind_ipi(0);
    }
    let high = vm.bind_ipi(0);
    assert_eq!(high, 1024);
    assert_eq!(vm.ec.set_long_mode(false), Err(XenError::Busy));
    vm.mem
        .write_obj(abi::PortArg { port: high }, GuestAddress(ARGS))
        .unwrap();
    assert_eq!(vm.ec.hypercall(0, op::CLOSE, ARGS), 0);
    vm.ec.set_long_mode(false).unwrap();
    assert_eq!(vm.ec.layout(), Layout::COMPAT);
    assert!(!vm.ec.config().long_mode);
    // Compat: 1024 ports, so the table is full now.
    vm.mem
        .write_obj(abi::BindIpi::default(), GuestAddress(ARGS))
        .unwrap();
    assert_eq!(vm.ec.hypercall(0, op::BIND_IPI, ARGS), -abi::errno::ENOSPC);
    // The compat layout is used from now on: port 33's pending bit is word 1, bit 1.
    vm.consume(33, 0);
    vm.ec.notify_port(33).unwrap();
    let word: u32 = vm.mem.read_obj(GuestAddress(SHINFO + 0x804)).unwrap();
    assert_eq!(word & 2, 2);
    vm.ec.set_long_mode(true).unwrap();
    assert_eq!(vm.ec.layout(), Layout::LONG_MODE);
}

#[test]
fn a_device_msi_encoding_a_pirq_marks_the_port_bound_to_it() {
    let vm = vm(false, 2);
    let hooked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = Arc::clone(&hooked);
    vm.ec
        .set_pirq_bind_hook(move |pirq| h.lock().unwrap().push(pirq));
    let bind = |pirq: u32| {
        let a = abi::BindPirq {
            pirq,
            ..Default::default()
        };
        vm.mem.write_obj(a, GuestAddress(ARGS)).unwrap();
        let rc = vm.ec.hypercall(0, op::BIND_PIRQ, ARGS);
        let out: abi::BindPirq = vm.mem.read_obj(GuestAddress(ARGS)).unwrap();
        (rc, out.port)
    };
    let (pirq, other) = (255, 254);
    // No port bound yet: the MSI is dropped, as Xen drops an unbound PIRQ.
    assert_eq!(vm.ec.deliver_pirq_msi(pirq_msi(pirq)), Ok(()));
    let (rc, port) = bind(pirq);
    assert_eq!(rc, 0);
    assert_eq!(
        hooked.lock().unwrap().as_slice(),
        [pirq],
        "the bind hook ran"
    );
    assert_eq!(bind(pirq).0, -abi::errno::EEXIST);
    assert_eq!(bind(NR_PIRQS).0, -abi::errno::EINVAL);
    let status = vm.ec.port_status(port);
    assert_eq!((status.state, status.vcpu), (PortState::Pirq(pirq), 0));
    vm.up.take();
    assert_eq!(vm.ec.deliver_pirq_msi(pirq_msi(pirq)), Ok(()));
    assert!(vm.pending(port));
    assert_eq!(vm.up.take(), [0]);
    // Another PIRQ's MSI marks nothing; a message with a vector is not a PIRQ.
    vm.consume(port, 0);
    assert_eq!(vm.ec.deliver_pirq_msi(pirq_msi(other)), Ok(()));
    assert_eq!(
        vm.ec
            .deliver_pirq_msi(crate::MsiMessage::new(0xFEE0_0000, 0x41)),
        Err(XenError::Invalid)
    );
    assert!(!vm.pending(port));
    // Closed: the PIRQ is free to bind again, and its MSIs go nowhere meanwhile.
    vm.mem
        .write_obj(abi::PortArg { port }, GuestAddress(ARGS))
        .unwrap();
    assert_eq!(vm.ec.hypercall(0, op::CLOSE, ARGS), 0);
    assert_eq!(vm.ec.deliver_pirq_msi(pirq_msi(pirq)), Ok(()));
    assert!(!vm.pending(port));
    assert_eq!(bind(pirq).0, 0);
}

#[test]
fn a_gsi_pirq_marks_its_port_on_a_rising_level_and_again_at_eoi_while_high() {
    let vm = vm(true, 2);
    // Unmapped pins are the IOAPIC's.
    assert!(!vm.ec.set_gsi_level(10, false, true));
    assert!(!vm.ec.set_gsi_level(24, false, true), "past the 24 pins");
    let mut t = vm.ec.lock();
    assert_eq!(vm.ec.map_gsi_pirq(&mut t, 24, -1), Err(XenError::Invalid));
    assert_eq!(vm.ec.map_gsi_pirq(&mut t, 23, 256), Err(XenError::Invalid));
    assert_eq!(
        vm.ec.map_gsi_pirq(&mut t, 23, 0),
        Err(XenError::Invalid),
        "PIRQ 0"
    );
    assert_eq!(vm.ec.map_gsi_pirq(&mut t, 23, 255), Ok(255));
    assert_eq!(vm.ec.map_gsi_pirq(&mut t, 10, -1), Ok(16));
    assert_eq!(vm.ec.map_gsi_pirq(&mut t, 11, 16), Err(XenError::Busy));
    drop(t);
    let a = abi::BindPirq {
        pirq: 16,
        ..Default::default()
    };
    vm.mem.write_obj(a, GuestAddress(ARGS)).unwrap();
    assert_eq!(vm.ec.hypercall(0, op::BIND_PIRQ, ARGS), 0);
    let port: u32 = vm.mem.read_obj(GuestAddress(ARGS + 8)).unwrap();
    vm.up.take();
    // The line rises: one event; the resampled input rising meanwhile adds none.
    assert!(vm.ec.set_gsi_level(10, false, true));
    assert!(vm.pending(port));
    assert_eq!(vm.up.take(), [0]);
    vm.consume(port, 0);
    assert!(vm.ec.set_gsi_level(10, true, true));
    assert!(!vm.pending(port), "a second input of a high pin marked it");
    // EOI: the resampled input drops; the line still high marks the port again.
    assert_eq!(vm.ec.eoi_pirq(&vm.ec.lock(), 16), Ok(10));
    vm.ec.reassert_gsi(10);
    assert!(vm.pending(port), "still high at EOI");
    vm.consume(port, 0);
    // The line drops too: the next EOI marks nothing; a new rise marks once.
    assert!(vm.ec.set_gsi_level(10, false, false));
    assert_eq!(vm.ec.eoi_pirq(&vm.ec.lock(), 16), Ok(10));
    vm.ec.reassert_gsi(10);
    assert!(!vm.pending(port), "a low pin marked at EOI");
    assert!(vm.ec.set_gsi_level(10, true, true));
    assert!(vm.pending(port), "the resampled input's rise");
    // Unmapped: the levels go back to the IOAPIC, and the pin is not the PIRQ's any more.
    assert_eq!(
        vm.ec.unmap_gsi(&mut vm.ec.lock(), 16),
        Some((10, false, true))
    );
    assert_eq!(vm.ec.unmap_gsi(&mut vm.ec.lock(), 16), None);
    assert!(!vm.ec.set_gsi_level(10, false, true));
    assert!(!vm.ec.gsi_mapped(10) && vm.ec.gsi_mapped(23));
    // A GSI mapped again moves to the new PIRQ.
    let mut t = vm.ec.lock();
    assert_eq!(vm.ec.map_gsi_pirq(&mut t, 23, 100), Ok(100));
    assert_eq!(
        vm.ec.map_gsi_pirq(&mut t, 7, 255),
        Ok(255),
        "255 is free again"
    );
    assert_eq!(vm.ec.unmap_gsi(&mut t, 100), Some((23, false, false)));
    assert_eq!(
        vm.ec.eoi_pirq(&t, 100),
        Err(XenError::Invalid),
        "an MSI PIRQ now"
    );
    assert_eq!(vm.ec.eoi_pirq(&t, 50), Err(XenError::NoEntry));
    drop(t);
    assert!(vm.ec.gsi_mapped(7));
}

#[test]
fn a_stale_pirq_map_never_marks_a_port_bound_to_something_else() {
    let vm = vm(true, 2);
    // VIRQ_ARGO is VIRQ 11: a port whose binding byte reads 11 but is no PIRQ's.
    let (rc, argo) = vm.bind_virq(abi::VIRQ_ARGO, 0);
    assert_eq!(rc, 0);
    vm.ec.pirq_ports[11].store(argo, Ordering::SeqCst);
    assert_eq!(vm.ec.deliver_pirq_msi(pirq_msi(11)), Ok(()));
    assert!(!vm.pending(argo));
    // Linux's message: vector 0, ExtINT delivery mode.
    assert_eq!(pirq_msi(11).data, 0x700);
}
