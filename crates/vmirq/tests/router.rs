//! The router on the simulated backend: batching, atomic publication, the GSI allocator,
//! and KVM's validation rules surfacing as typed errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmirq::{
    Config, Error, Gsi, Interrupts, IrqchipMode, IrqfdPath, Route, RouteError, RouterError,
    SimBackend, X86Msi,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn split() -> IrqchipMode {
    IrqchipMode::Split { ioapic_pins: 24 }
}

fn msi(vector: u8) -> Route {
    Route::msi(X86Msi::fixed(0, vector).encode().unwrap())
}

#[test]
fn a_batch_of_many_routes_costs_one_commit() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let before = sim.commits();
    let handles: Vec<_> = (0..500).map(|_| irq.allocate_route().unwrap()).collect();
    assert_eq!(sim.commits(), before, "allocating a GSI commits nothing");
    let mut batch = irq.routes();
    for (i, h) in handles.iter().enumerate() {
        batch.set(h, msi(0x20 + (i % 200) as u8)).unwrap();
    }
    batch.commit().unwrap();
    assert_eq!(sim.commits() - before, 1);
    assert_eq!(irq.routing_table().get(handles[7].gsi()), &[msi(0x27)]);
    // A batch that changes nothing commits nothing.
    irq.routes().commit().unwrap();
    assert_eq!(sim.commits() - before, 1);
}

#[test]
fn a_refused_commit_publishes_nothing() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let gsi = irq.allocate_route().unwrap();
    sim.refuse_next_commits(1);
    let mut batch = irq.routes();
    batch.set(&gsi, msi(0x30)).unwrap();
    let err = batch.commit().unwrap_err();
    assert!(matches!(err, RouterError::Backend(_)), "{err}");
    assert!(irq.routing_table().get(gsi.gsi()).is_empty());
    // The next batch starts from the published table, not the refused one.
    let batch = irq.routes();
    assert!(batch.table().get(gsi.gsi()).is_empty());
}

#[test]
fn readers_never_see_half_a_batch() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let gsis: Vec<_> = (0..64).map(|_| irq.allocate_route().unwrap()).collect();
    let ids: Vec<Gsi> = gsis.iter().map(|h| h.gsi()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (irq, ids, stop) = (irq.clone(), ids.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let table = irq.routing_table();
                let first = table.get(ids[0]).first().copied();
                for gsi in &ids {
                    assert_eq!(table.get(*gsi).first().copied(), first, "torn table");
                }
                seen += 1;
            }
            seen
        })
    };
    for round in 0..300u32 {
        let mut batch = irq.routes();
        for gsi in &gsis {
            batch.set(gsi, msi(0x20 + (round % 200) as u8)).unwrap();
        }
        batch.commit().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

#[test]
fn gsi_exhaustion_is_an_error_and_dropped_routes_are_reused() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let config = Config {
        first_dynamic_gsi: 24,
        gsi_limit: 28,
        ..Config::default()
    };
    let irq = Interrupts::new(sim, config).unwrap();
    let mut handles: Vec<_> = (0..4).map(|_| irq.allocate_route().unwrap()).collect();
    assert_eq!(
        handles.iter().map(|h| h.gsi().raw()).collect::<Vec<_>>(),
        [24, 25, 26, 27],
        "lowest free first"
    );
    match irq.allocate_route() {
        Err(Error::Router(RouterError::GsiExhausted(4))) => {}
        other => panic!("expected exhaustion, got {other:?}"),
    }
    handles[1].set(msi(0x40)).unwrap();
    handles.remove(1);
    // Dropping the route removed it in a commit and gave the GSI back.
    assert!(irq.routing_table().get(Gsi::from_raw(25)).is_empty());
    let again = irq.allocate_route().unwrap();
    assert_eq!(again.gsi().raw(), 25);
}

#[test]
fn hot_plug_loop_leaks_no_gsi() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let free = irq.free_gsis();
    for i in 0..10_000u32 {
        let h = irq.allocate_route().unwrap();
        h.set(msi(0x20 + (i % 200) as u8)).unwrap();
    }
    assert_eq!(irq.free_gsis(), free);
    assert_eq!(
        irq.routing_table().len(),
        24 + 16,
        "only the default routes remain"
    );
}

#[test]
fn split_irqchip_reserves_pin_gsis_for_the_ioapic() {
    let sim = SimBackend::new(1, split());
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let first = irq.allocate_route().unwrap();
    assert_eq!(first.gsi().raw(), 24);
    // Pins are reached through their own handle; their GSIs are never handed out.
    assert!(matches!(
        irq.pin(24),
        Err(Error::NoSuchPin { pin: 24, pins: 24 })
    ));
    assert!(matches!(
        first.set(Route::ioapic(24)),
        Err(Error::Router(RouterError::Route(
            RouteError::PinOutOfRange { .. }
        )))
    ));
    first.set(Route::ioapic(3)).unwrap();
}

#[test]
fn a_route_of_another_vm_is_refused() {
    let a = Interrupts::new(SimBackend::new(1, IrqchipMode::Kernel), Config::default()).unwrap();
    let b = Interrupts::new(SimBackend::new(1, IrqchipMode::Kernel), Config::default()).unwrap();
    let route_a = a.allocate_route().unwrap();
    let mut batch = b.routes();
    assert!(matches!(
        batch.set(&route_a, msi(0x21)),
        Err(RouterError::ForeignRoute(_))
    ));
    drop(batch);
    assert!(matches!(
        b.release_routes([route_a]),
        Err(Error::Router(RouterError::ForeignRoute(_)))
    ));
}

#[test]
fn a_kernel_irqfd_pins_its_gsi_to_deliverable_routes() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let gsi = irq.new_route(msi(0x44)).unwrap();
    let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let irqfd = gsi.assign_irqfd(&fd).unwrap();
    let xen = Route::XenEvtchn {
        port: 1,
        vcpu: 0,
        priority: 7,
    };
    assert!(matches!(
        gsi.set(xen),
        Err(Error::Router(RouterError::KernelIrqfdCannotDeliver { .. }))
    ));
    irqfd.deassign().unwrap();
    gsi.set(xen).unwrap();
}

#[test]
fn user_injection_without_a_route_is_a_typed_error() {
    let sim = SimBackend::new(1, split());
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let unrouted = irq.allocate_route().unwrap();
    assert!(matches!(unrouted.inject(), Err(Error::NoRoute(_))));
}

/// The leak bug: a line (and a userspace pin irqfd's pulse) kept the delivery state alive
/// through an `Arc` cycle, so the router, the backend and, on KVM, the VM and guest RAM were
/// never freed. After the last handle goes, the backend must be gone.
#[test]
fn dropping_every_handle_frees_the_backend() {
    for mode in [IrqchipMode::Kernel, split()] {
        let sim = SimBackend::new(1, mode);
        let weak = Arc::downgrade(&sim);
        let irq = Interrupts::new(sim, Config::default()).unwrap();
        let pin = irq.pin(5).unwrap();
        let source = pin.source().unwrap();
        source.assert();
        source.deassert();
        pin.inject().unwrap();
        let route = irq.new_route(msi(0x30)).unwrap();
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let user = route
            .assign_irqfd_on(&fd, Some(vmirq::IrqfdPath::User))
            .unwrap();
        let pin_fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let pin_irqfd = pin.assign_irqfd(&pin_fd).unwrap();
        pin_fd.write(1).unwrap();
        fd.write(1).unwrap();
        let line = pin.line().unwrap();
        drop((source, line, user, pin_irqfd, route, pin, irq));
        assert!(
            weak.upgrade().is_none(),
            "{mode:?}: the backend outlived every handle"
        );
    }
}

/// A userspace injection that fails reaches the irqfd's owner, not only a counter.
#[test]
fn a_failed_user_injection_reaches_the_irqfds_owner() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    // A Xen route, and no event channels attached: every injection fails.
    let route = irq
        .new_route(Route::XenEvtchn {
            port: 3,
            vcpu: 0,
            priority: 7,
        })
        .unwrap();
    let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    assert_eq!(irqfd.path(), vmirq::IrqfdPath::User);
    assert!(irqfd.take_error().is_none());
    fd.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while irqfd.failures() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure never reached the owner"
        );
        std::thread::yield_now();
    }
    assert!(matches!(irqfd.take_error(), Some(Error::Unsupported(_))));
    assert!(irqfd.take_error().is_none(), "taken once");
    assert_eq!(irq.stats().user_inject_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn dropping_a_route_while_holding_a_batch_joins_that_batch() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let doomed = irq.new_route(msi(0x31)).unwrap();
    let kept = irq.allocate_route().unwrap();
    let gsi = doomed.gsi();
    let free = irq.free_gsis();
    let mut batch = irq.routes();
    batch.set(&kept, msi(0x32)).unwrap();
    drop(doomed); // would deadlock if it waited for the writer lock this thread holds
    let before = sim.commits();
    batch.commit().unwrap();
    assert_eq!(sim.commits() - before, 1, "one commit for both");
    assert!(irq.routing_table().get(gsi).is_empty());
    assert_eq!(irq.routing_table().get(kept.gsi()), [msi(0x32)]);
    assert_eq!(
        irq.free_gsis(),
        free + 1,
        "the dropped route's GSI is free again"
    );
}

// Written to kill mutants cargo-mutants found surviving in router.rs (docs/mutants.md).

#[test]
fn a_dropped_route_is_gone_and_its_gsi_free_at_once() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let free = irq.free_gsis();
    let route = irq.new_route(msi(0x40)).unwrap();
    let gsi = route.gsi();
    assert_eq!(irq.free_gsis(), free - 1);
    drop(route);
    assert_eq!(
        irq.free_gsis(),
        free,
        "the GSI is free once the drop returned"
    );
    assert!(irq.routing_table().get(gsi).is_empty());
    // Clearing a route removes it in a commit, and the GSI stays the owner's.
    let route = irq.new_route(msi(0x41)).unwrap();
    let commits = sim.commits();
    route.clear().unwrap();
    assert_eq!(sim.commits(), commits + 1);
    assert!(irq.routing_table().get(route.gsi()).is_empty());
    assert_eq!(irq.free_gsis(), free - 1);
}

#[test]
fn a_batch_waiting_behind_a_commit_returns_only_with_its_own_tables_outcome() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let (a, b) = (irq.allocate_route().unwrap(), irq.allocate_route().unwrap());
    let (a, b) = (Arc::new(a), Arc::new(b));
    let before = sim.commits();
    sim.hold_commits(true);
    let first = {
        let a = Arc::clone(&a);
        std::thread::spawn(move || a.set(msi(0x50)))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sim.commits_held() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first commit never parked"
        );
        std::thread::yield_now();
    }
    // A second batch, built while the first is in the backend, waits for it.
    let second = {
        let b = Arc::clone(&b);
        std::thread::spawn(move || b.set(msi(0x51)))
    };
    while irq.routes().table().get(b.gsi()) != [msi(0x51)] {
        assert!(
            std::time::Instant::now() < deadline,
            "the second batch was never built"
        );
        std::thread::yield_now();
    }
    // The first table goes in; its committer then brings the second to the backend, parked.
    sim.pass_held_commits(1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sim.commits() != before + 1 || sim.commits_held() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second table never reached the backend"
        );
        std::thread::yield_now();
    }
    // The second batch's outcome is not known yet: it must still be waiting, however long.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    while std::time::Instant::now() < deadline {
        assert!(
            !second.is_finished(),
            "returned with the first table's outcome"
        );
        assert!(
            !first.is_finished(),
            "the committer left with a table in the backend"
        );
        std::thread::yield_now();
    }
    // The backend refuses the second table: the second batch fails, the first keeps its own
    // outcome.
    sim.refuse_next_commits(1);
    sim.hold_commits(false);
    first
        .join()
        .unwrap()
        .expect("the first batch's table was committed");
    assert!(
        second.join().unwrap().is_err(),
        "the second table was refused"
    );
    assert_eq!(irq.routing_table().get(a.gsi()), &[msi(0x50)]);
    assert!(irq.routing_table().get(b.gsi()).is_empty());
}

/// Waits (bounded) until `n` kernel irqfd calls are parked inside the simulated backend.
fn wait_irqfd_calls_held(sim: &SimBackend, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sim.irqfd_calls_held() != n {
        assert!(
            std::time::Instant::now() < deadline,
            "the KVM_IRQFD call never parked"
        );
        std::thread::yield_now();
    }
}

/// Routes that change while an irqfd's `KVM_IRQFD` is in flight are seen when it registers:
/// the irqfd undoes the kernel assignment and decides its path again. Here the GSI became a
/// Xen port meanwhile, which only the user path serves.
#[test]
fn an_irqfd_decides_again_when_its_routes_change_during_its_assign() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let route = Arc::new(irq.new_route(msi(0x50)).unwrap());
    // Control: with the routes left alone, this GSI's irqfds are served by the kernel.
    let control = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(
        route.assign_irqfd(&control).unwrap().path(),
        IrqfdPath::Kernel
    );
    sim.hold_irqfd_calls(true);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let assign = {
        let (route, fd) = (Arc::clone(&route), fd.try_clone().unwrap());
        std::thread::spawn(move || route.assign_irqfd(&fd))
    };
    wait_irqfd_calls_held(&sim, 1);
    route
        .set(Route::XenEvtchn {
            port: 3,
            vcpu: 0,
            priority: 7,
        })
        .unwrap();
    sim.hold_irqfd_calls(false);
    let irqfd = assign.join().unwrap().unwrap();
    assert_eq!(
        irqfd.path(),
        IrqfdPath::User,
        "registered as a kernel irqfd on routes the kernel cannot deliver"
    );
}

/// A route dropped while one of its irqfds is still being unbound on another thread (that
/// thread holds a lease on the GSI) leaves the routing table before the drop returns; nothing
/// waits for the unbinding.
#[test]
fn a_route_dropped_while_its_irqfd_unbinds_elsewhere_leaves_the_table_at_once() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let route = irq.new_route(msi(0x50)).unwrap();
    let gsi = route.gsi();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    assert_eq!(irqfd.path(), IrqfdPath::Kernel);
    sim.hold_irqfd_calls(true);
    let unbind = std::thread::spawn(move || drop(irqfd));
    wait_irqfd_calls_held(&sim, 1);
    drop(route);
    assert!(
        irq.routing_table().get(gsi).is_empty(),
        "the route outlived its owner while an irqfd was being unbound"
    );
    sim.hold_irqfd_calls(false);
    unbind.join().unwrap();
}

/// The same, dropped by a thread that holds a batch: the drop returns (it must not take a
/// second batch behind the held one), and the route goes at the first commit after the
/// unbinding gave the GSI's last lease back.
#[test]
fn a_route_dropped_inside_a_batch_while_its_irqfd_unbinds_goes_after_the_unbinding() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let free = irq.free_gsis();
    let route = irq.new_route(msi(0x50)).unwrap();
    let gsi = route.gsi();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    sim.hold_irqfd_calls(true);
    let unbind = std::thread::spawn(move || drop(irqfd));
    wait_irqfd_calls_held(&sim, 1);
    let batch = irq.routes();
    drop(route);
    batch.commit().unwrap();
    sim.hold_irqfd_calls(false);
    unbind.join().unwrap();
    let other = irq.new_route(msi(0x51)).unwrap();
    assert!(
        irq.routing_table().get(gsi).is_empty(),
        "the route outlived its owner and its last lease"
    );
    assert_eq!(
        irq.free_gsis(),
        free - 1,
        "only the new route's GSI is taken"
    );
    drop(other);
}

/// On the in-kernel irqchip, a level line created on a pin while an edge irqfd of that pin's
/// GSI is inside `KVM_IRQFD` makes the irqfd decide again: edges on a line's pin go through
/// the line (user path), as KVM gives both one source bit.
#[test]
fn a_level_line_made_during_an_edge_irqfds_assign_sends_it_through_the_line() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let pin = irq.pin(5).unwrap();
    sim.hold_irqfd_calls(true);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let assign = {
        let (pin, fd) = (pin.clone(), fd.try_clone().unwrap());
        std::thread::spawn(move || pin.assign_irqfd(&fd))
    };
    wait_irqfd_calls_held(&sim, 1);
    let line = pin.line().unwrap();
    sim.hold_irqfd_calls(false);
    let irqfd = assign.join().unwrap().unwrap();
    assert_eq!(
        irqfd.path(),
        IrqfdPath::User,
        "a kernel edge irqfd on a pin a level line holds"
    );
    drop(line);
}

/// With every dynamic GSI leased, a GSI released but not yet reclaimed (its last lease went
/// with an irqfd unbound after the route's drop) is reclaimed by the allocator's own commit.
#[test]
fn allocation_reclaims_a_released_gsi_when_none_is_free() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let config = Config {
        gsi_limit: 25,
        ..Config::default()
    };
    let irq = Interrupts::new(sim.clone(), config).unwrap();
    assert_eq!(irq.free_gsis(), 1);
    let route = irq.new_route(msi(0x50)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    sim.hold_irqfd_calls(true);
    let unbind = std::thread::spawn(move || drop(irqfd));
    wait_irqfd_calls_held(&sim, 1);
    drop(route); // its route goes now; the GSI waits for the irqfd's lease
    sim.hold_irqfd_calls(false);
    unbind.join().unwrap();
    assert_eq!(irq.free_gsis(), 0, "released, not reclaimed yet");
    let again = irq
        .allocate_route()
        .expect("the released GSI was not reclaimed for the allocation");
    assert_eq!(again.gsi(), Gsi::from_raw(24));
}
