//! Level lines and the userspace IOAPIC on the simulated backend, where every step is
//! deterministic: the storm guard, resample notification and deassign semantics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vmirq::ioapic::IOAPIC_BASE;
use vmirq::{Config, Interrupts, IrqchipMode, IrqfdPath, SimBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PIN: u32 = 18;
const VECTOR: u8 = 0x5A;

/// A split-irqchip VM whose IOAPIC pin 18 is programmed level, vector 0x5A, to APIC 0.
fn split_vm() -> (std::sync::Arc<SimBackend>, std::sync::Arc<Interrupts>) {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let w = |reg: u32, val: u32| {
        assert!(irq.mmio_write(IOAPIC_BASE, &reg.to_le_bytes()));
        assert!(irq.mmio_write(IOAPIC_BASE + 0x10, &val.to_le_bytes()));
    };
    w(0x11 + 2 * PIN, 0);
    w(0x10 + 2 * PIN, u32::from(VECTOR) | 1 << 15);
    (sim, irq)
}

#[test]
fn a_level_storm_is_deferred_after_ten_thousand_redeliveries() {
    let (sim, irq) = split_vm();
    let stats = irq.stats();
    let source = irq.pin(PIN).unwrap().source().unwrap();
    source.assert();
    sim.run_until_idle();
    // The first delivery plus 9,999 EOI re-deliveries; the 10,000th waits ~10 ms.
    assert_eq!(sim.count(0, VECTOR), 10_000);
    assert_eq!(stats.storm_deferrals.load(Ordering::Relaxed), 1);
    // The deferred re-delivery runs (the line is still high: it delivers, and the storm goes
    // on until it is deferred again).
    let redelivered = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stats.storm_redeliveries.load(Ordering::Relaxed) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "deferral {n} never ran"
            );
            std::thread::yield_now();
        }
    };
    redelivered(1);
    sim.run_until_idle();
    assert_eq!(sim.count(0, VECTOR), 20_000);
    assert_eq!(stats.storm_deferrals.load(Ordering::Relaxed), 2);
    // The line falls while deferral 2 is pending: when it runs, it finds the line low.
    let at_drop = sim.count(0, VECTOR);
    drop(source);
    redelivered(2);
    sim.run_until_idle();
    assert_eq!(
        sim.count(0, VECTOR),
        at_drop,
        "re-delivered after the line fell"
    );
}

#[test]
fn eoi_deasserts_once_and_signals_every_resamplefd_of_the_gsi() {
    let (sim, irq) = split_vm();
    let fds: Vec<(EventFd, EventFd)> = (0..3)
        .map(|_| {
            (
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            )
        })
        .collect();
    let irqfds: Vec<_> = fds
        .iter()
        .map(|(t, r)| irq.pin(PIN).unwrap().assign_level_irqfd(t, r).unwrap())
        .collect();
    assert!(irqfds.iter().all(|i| i.path() == IrqfdPath::User));
    // Two devices assert; the line is their OR: one interrupt. The simulated vCPU takes
    // interrupts only when pumped, so let the dispatcher handle both writes first.
    fds[0].0.write(1).unwrap();
    fds[1].0.write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while irq.stats().user_injections.load(Ordering::Relaxed) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dispatcher never asserted both"
        );
        std::thread::yield_now();
    }
    sim.run_until_idle();
    assert_eq!(sim.count(0, VECTOR), 1);
    for (_, r) in &fds {
        assert_eq!(
            r.read().unwrap(),
            1,
            "every resamplefd hears of the EOI, once"
        );
    }
    assert_eq!(irq.stats().resamples.load(Ordering::Relaxed), 1);
}

#[test]
fn deassigning_the_last_level_irqfd_leaves_the_line_low() {
    let (sim, irq) = split_vm();
    let (t, r) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    // Mask the pin so the assertion stays pending, then deassign.
    irq.mmio_write(IOAPIC_BASE, &(0x10 + 2 * PIN).to_le_bytes());
    irq.mmio_write(
        IOAPIC_BASE + 0x10,
        &(u32::from(VECTOR) | 1 << 15 | 1 << 16).to_le_bytes(),
    );
    let irqfd = irq.pin(PIN).unwrap().assign_level_irqfd(&t, &r).unwrap();
    t.write(1).unwrap();
    // The dispatcher asserted the line (masked: pending, not delivered) before the deassign.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while irq.stats().user_injections.load(Ordering::Relaxed) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the trigger was never served"
        );
        std::thread::yield_now();
    }
    irqfd.deassign().unwrap();
    // Unmask: nothing is delivered, because no source asserts the line any more.
    irq.mmio_write(
        IOAPIC_BASE + 0x10,
        &(u32::from(VECTOR) | 1 << 15).to_le_bytes(),
    );
    sim.run_until_idle();
    assert_eq!(sim.count(0, VECTOR), 0);
    assert!(r.read().is_err(), "a deassigned irqfd was notified");
}

/// The simulator exits on a level EOI only for vectors a committed pin route names, as KVM's
/// `kvm_scan_ioapic_routes` does on a split irqchip: a level MSI delivered before its pin's
/// route is committed would leave Remote IRR set forever. Proves both sides on one VM.
#[test]
fn split_mode_eoi_exits_only_for_vectors_the_pin_routes_name() {
    let (sim, irq) = split_vm();
    let source = irq.pin(PIN).unwrap().source().unwrap();
    // The pin's own level vector: delivered, its EOI reaches the IOAPIC, which re-delivers
    // while the line is high (so more than one interrupt).
    source.assert();
    sim.run_until_idle();
    assert!(
        sim.count(0, VECTOR) > 1,
        "the pin's EOI never reached vmirq's IOAPIC"
    );
    drop(source);
    sim.run_until_idle();
    // The guest moves the pin to vector 0x6B, but the host refuses the route commit: the
    // IOAPIC delivers 0x6B, whose EOI KVM never exits on (no committed route names it), so
    // Remote IRR stays set and the asserted line is not re-delivered. A simulator that
    // forwarded every level EOI would re-deliver it thousands of times.
    sim.refuse_next_commits(1);
    let lo = 0x6Bu32 | 1 << 15;
    irq.mmio_write(IOAPIC_BASE, &(0x10 + 2 * PIN).to_le_bytes());
    irq.mmio_write(IOAPIC_BASE + 0x10, &lo.to_le_bytes());
    let source = irq.pin(PIN).unwrap().source().unwrap();
    source.assert();
    sim.run_until_idle();
    assert_eq!(
        sim.count(0, 0x6B),
        1,
        "an EOI exited for a vector no committed route names"
    );
}

/// A VM in `mode` whose IOAPIC (vmirq's or the in-"kernel" one) has pin 18 level, vector 0x5A,
/// to APIC 0, with its vCPU retiring interrupts at `timing`.
fn level_vm(
    mode: IrqchipMode,
    timing: vmirq::EoiTiming,
) -> (std::sync::Arc<SimBackend>, std::sync::Arc<Interrupts>) {
    let sim = SimBackend::with_eoi_timing(1, mode, timing);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let w = |reg: u32, val: u32| {
        for (addr, data) in [(IOAPIC_BASE, reg), (IOAPIC_BASE + 0x10, val)] {
            let data = data.to_le_bytes();
            assert!(sim.mmio_write(addr, &data) || irq.mmio_write(addr, &data));
        }
    };
    w(0x11 + 2 * PIN, 0);
    w(0x10 + 2 * PIN, u32::from(VECTOR) | 1 << 15);
    (sim, irq)
}

#[test]
fn eoi_timing_decides_whether_a_held_level_redelivers_before_the_handler_ends() {
    for mode in [IrqchipMode::Kernel, IrqchipMode::Split { ioapic_pins: 24 }] {
        // At the guest's EOI: one interrupt per handler while the line stays high, none once
        // the device lowered it before the handler ended.
        let (sim, irq) = level_vm(mode, vmirq::EoiTiming::GuestEoi);
        let source = irq.pin(PIN).unwrap().source().unwrap();
        source.assert();
        assert_eq!(sim.run_until_idle(), 1, "{mode:?}: first delivery");
        assert_eq!(sim.run_until_idle(), 1, "{mode:?}: EOI with the line high");
        source.deassert();
        assert_eq!(sim.run_until_idle(), 0, "{mode:?}: EOI with the line low");
        source.assert();
        assert_eq!(sim.run_until_idle(), 1, "{mode:?}: the line works again");
        assert_eq!(sim.count(0, VECTOR), 3, "{mode:?}");

        // At delivery: the EOI comes before any handler could lower the line, so a held line
        // re-delivers at once until the storm guard defers it (10,000, as KVM's IOAPIC).
        let (sim, irq) = level_vm(mode, vmirq::EoiTiming::AtDelivery);
        let source = irq.pin(PIN).unwrap().source().unwrap();
        source.assert();
        assert_eq!(sim.run_until_idle(), 10_000, "{mode:?}: storm");
        drop(source);
    }
}

#[test]
fn a_pin_with_a_level_line_is_reached_by_no_other_gsi_on_the_kernel_irqchip() {
    use vmirq::{Error, Route, RouterError};
    let shared = |r: Result<(), Error>| {
        matches!(r, Err(Error::Router(RouterError::SharedLineSource { .. })))
    };
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let line = irq.pin(PIN).unwrap().line().unwrap();
    // Another GSI routed to the pin would share KVM's per-pin source bit with the line.
    let other = irq.allocate_route().unwrap();
    let before = sim.commits();
    assert!(shared(other.set(Route::ioapic(PIN))));
    assert_eq!(sim.commits(), before, "a refused table reaches the backend");
    assert!(other.routes().is_empty());
    // Any other pin is fine; and once the line is gone, so is this one.
    other.set(Route::ioapic(PIN + 1)).unwrap();
    drop(line);
    other.set(Route::ioapic(PIN)).unwrap();
    // Now the pin is reached by two GSIs: a line on either is refused.
    assert!(shared(irq.pin(PIN).unwrap().line().map(drop)));
    assert!(shared(other.line().map(drop)));
    // A split irqchip keeps lines in vmirq's IOAPIC: no such rule.
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let _line = irq.pin(PIN).unwrap().line().unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(
        irq.pin(PIN).unwrap().assign_irqfd(&fd).unwrap().path(),
        IrqfdPath::User
    );
}
