//! Lock discipline, checked with a hypervisor call that does not return: the simulated
//! backend holds route commits (`KVM_SET_GSI_ROUTING`) while the test drives the run-time
//! paths that must not wait for them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmirq::ioapic::IOAPIC_BASE;
use vmirq::msix::{MsixTable, MsixVectors};
use vmirq::{Config, Interrupts, IrqchipMode, IrqfdPath, Route, SimBackend, X86Msi};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// Runs `f` on another thread with the backend's route commits held, once `f` is parked in
/// one; then runs `check` (which must complete while the commit is still parked), then lets
/// the commit through.
fn while_a_commit_is_parked(
    sim: &Arc<SimBackend>,
    f: impl FnOnce() + Send + 'static,
    check: impl FnOnce(),
) {
    sim.hold_commits(true);
    let parked = std::thread::spawn(f);
    wait_until("the commit to park in the backend", || {
        sim.commits_held() == 1
    });
    check();
    assert_eq!(
        sim.commits_held(),
        1,
        "the check ran while the commit was parked"
    );
    sim.hold_commits(false);
    parked.join().unwrap();
}

fn msi(vector: u8) -> Route {
    Route::msi(X86Msi::fixed(0, vector).encode().unwrap())
}

#[test]
fn a_trigger_never_waits_behind_a_routing_commit() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let route = irq.new_route(msi(0x41)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let _irqfd = route.assign_irqfd_on(&fd, Some(IrqfdPath::User)).unwrap();
    let other = Arc::clone(&irq);
    while_a_commit_is_parked(
        &sim,
        move || drop(other.new_route(msi(0x42)).unwrap()),
        || {
            fd.write(1).unwrap();
            wait_until("the user path to inject", || {
                irq.stats().user_injections.load(Ordering::SeqCst) == 1
            });
            sim.run_until_idle();
            assert_eq!(sim.count(0, 0x41), 1);
        },
    );
}

#[test]
fn a_device_trigger_never_waits_behind_the_guests_msix_table_write() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let vectors = Arc::new(MsixVectors::new(Arc::clone(&irq), MsixTable::new(4)).unwrap());
    let write_entry = |v: &MsixVectors, n: u64, vector: u32, masked: bool| {
        let msg = X86Msi::fixed(0, vector as u8).encode().unwrap();
        let words = [
            msg.address_lo(),
            msg.address_hi(),
            msg.data,
            u32::from(masked),
        ];
        for (i, w) in words.iter().enumerate() {
            v.bar_write(n * 16 + 4 * i as u64, &w.to_le_bytes());
        }
    };
    vectors.write_message_control(1 << 15);
    write_entry(&vectors, 0, 0x50, false);
    write_entry(&vectors, 1, 0x51, true);
    let guest = Arc::clone(&vectors);
    while_a_commit_is_parked(
        &sim,
        // The guest unmasks vector 1: its first route commit parks, holding the device's
        // config lock.
        move || write_entry(&guest, 1, 0x51, false),
        || {
            vectors.fire(0).unwrap();
            sim.run_until_idle();
            assert_eq!(sim.count(0, 0x50), 1, "vector 0 was not delivered");
        },
    );
    vectors.fire(1).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x51), 1);
}

/// Programs IOAPIC pin `pin`: `vector`, level, masked or not, to APIC 0.
fn program(irq: &Interrupts, pin: u32, vector: u8, masked: bool) {
    let lo = u32::from(vector) | 1 << 15 | u32::from(masked) << 16;
    for (reg, value) in [(0x11 + 2 * pin, 0), (0x10 + 2 * pin, lo)] {
        assert!(irq.mmio_write(IOAPIC_BASE, &reg.to_le_bytes()));
        assert!(irq.mmio_write(IOAPIC_BASE + 0x10, &value.to_le_bytes()));
    }
}

#[test]
fn a_redirection_entry_write_stalls_no_eoi_or_assert_on_other_pins() {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let (a, b) = (18, 19);
    program(&irq, a, 0x5A, false);
    program(&irq, b, 0x5B, true);
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let _level = irq
        .pin(a)
        .unwrap()
        .assign_level_irqfd(&trigger, &resample)
        .unwrap();
    // Pin B is asserted while masked; the guest unmasks it with a new vector in one write,
    // which changes B's kernel route (its message) and delivers.
    let b_source = irq.pin(b).unwrap().source().unwrap();
    b_source.assert();
    let guest = Arc::clone(&irq);
    while_a_commit_is_parked(
        &sim,
        move || program(&guest, b, 0x5C, false),
        || {
            // Pin A's whole round trip: assert, delivery, the guest's EOI, the resample.
            trigger.write(1).unwrap();
            wait_until("pin A's assert", || {
                irq.stats().user_injections.load(Ordering::SeqCst) == 1
            });
            sim.run_until_idle();
            assert_eq!(sim.count(0, 0x5A), 1);
            assert_eq!(resample.read().unwrap(), 1, "pin A's EOI was not resampled");
            // Routes before delivery: B's interrupt waits for B's route commit.
            assert_eq!(
                sim.count(0, 0x5C),
                0,
                "pin B delivered before its route was committed"
            );
        },
    );
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x5B), 0);
    // Delivered after its commit, and held high: the first delivery and 9,999 EOI
    // re-deliveries, then the storm guard defers (this simulator retires at delivery).
    assert_eq!(sim.count(0, 0x5C), 10_000, "pin B after its commit");
}

#[test]
fn allocation_and_irqfd_bookkeeping_never_wait_behind_a_commit() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let kernel_route = irq.new_route(msi(0x43)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let kernel_irqfd = kernel_route.assign_irqfd(&fd).unwrap();
    let other = Arc::clone(&irq);
    let mut unrouted = None;
    while_a_commit_is_parked(
        &sim,
        move || drop(other.new_route(msi(0x44)).unwrap()),
        || {
            let free = irq.free_gsis();
            unrouted = Some(irq.allocate_route().unwrap());
            assert_eq!(irq.free_gsis(), free - 1);
            // A kernel irqfd's unbinding updates the router's bookkeeping, then KVM_IRQFD.
            kernel_irqfd.deassign().unwrap();
            assert!(!kernel_route.routes().is_empty());
        },
    );
    // (Dropping a route commits its removal: that one waits for the commit in flight.)
    drop(unrouted);
}

type SetResult = Result<(), vmirq::Error>;

/// Sets `a` and `b` from two threads so that A's commit is in the backend while B's batch is
/// built (B's table then holds A's change too); `before_release` runs just before A's call
/// returns.
fn race_two_batches(
    sim: &Arc<SimBackend>,
    irq: &Interrupts,
    (a, b): (&Arc<vmirq::GsiRoute>, &Arc<vmirq::GsiRoute>),
    before_release: impl FnOnce(),
) -> (SetResult, SetResult) {
    let set = |r: &Arc<vmirq::GsiRoute>, vector| {
        let r = Arc::clone(r);
        std::thread::spawn(move || r.set(msi(vector)))
    };
    sim.hold_commits(true);
    let ta = set(a, 0x45);
    wait_until("A's commit to park", || sim.commits_held() == 1);
    let tb = set(b, 0x46);
    wait_until("B's batch to be built", || {
        irq.routes().table().get(b.gsi()) == [msi(0x46)]
    });
    before_release();
    sim.hold_commits(false);
    (ta.join().unwrap(), tb.join().unwrap())
}

#[test]
fn concurrent_batches_combine_and_a_refused_table_fails_every_batch_built_on_it() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let a = Arc::new(irq.allocate_route().unwrap());
    let b = Arc::new(irq.allocate_route().unwrap());
    let before = sim.commits();
    let (ra, rb) = race_two_batches(&sim, &irq, (&a, &b), || sim.refuse_next_commits(1));
    assert!(ra.is_err(), "A's table was refused");
    assert!(rb.is_err(), "B was built on A's refused table");
    assert_eq!(
        sim.commits(),
        before,
        "nothing reached the backend after the refusal"
    );
    assert!(irq.routing_table().get(a.gsi()).is_empty());
    assert!(irq.routing_table().get(b.gsi()).is_empty());
    assert!(
        irq.routes().table().get(b.gsi()).is_empty(),
        "the built table reverted"
    );
    // Tried again, both land: B waited for A's call and went in with one more.
    let (ra, rb) = race_two_batches(&sim, &irq, (&a, &b), || {});
    ra.unwrap();
    rb.unwrap();
    assert_eq!(sim.commits() - before, 2);
    assert_eq!(irq.routing_table().get(a.gsi()), [msi(0x45)]);
    assert_eq!(irq.routing_table().get(b.gsi()), [msi(0x46)]);
}
