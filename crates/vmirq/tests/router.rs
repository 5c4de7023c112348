//! The router on the simulated backend: batching, atomic publication, the GSI allocator,
//! and KVM's validation rules surfacing as typed errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmirq::{
    Config, Error, Gsi, Interrupts, IrqchipMode, Route, RouteError, RouterError, SimBackend, X86Msi,
};

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
    let handles: Vec<_> = (0..500).map(|_| irq.allocate_gsi().unwrap()).collect();
    let before = sim.commits();
    let mut batch = irq.routes();
    for (i, h) in handles.iter().enumerate() {
        batch.set(h.gsi(), msi(0x20 + (i % 200) as u8)).unwrap();
    }
    batch.commit().unwrap();
    assert_eq!(sim.commits() - before, 1);
    assert_eq!(irq.router().load().get(handles[7].gsi()), &[msi(0x27)]);
    // A batch that changes nothing commits nothing.
    irq.routes().commit().unwrap();
    assert_eq!(sim.commits() - before, 1);
}

#[test]
fn a_refused_commit_publishes_nothing() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let gsi = irq.allocate_gsi().unwrap();
    sim.refuse_next_commits(1);
    let mut batch = irq.routes();
    batch.set(gsi.gsi(), msi(0x30)).unwrap();
    let err = batch.commit().unwrap_err();
    assert!(matches!(err, RouterError::Backend(_)), "{err}");
    assert!(irq.router().load().get(gsi.gsi()).is_empty());
    // The next batch starts from the published table, not the refused one.
    let batch = irq.routes();
    assert!(batch.table().get(gsi.gsi()).is_empty());
}

#[test]
fn readers_never_see_half_a_batch() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let gsis: Vec<_> = (0..64).map(|_| irq.allocate_gsi().unwrap()).collect();
    let ids: Vec<Gsi> = gsis.iter().map(|h| h.gsi()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (irq, ids, stop) = (irq.clone(), ids.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let table = irq.router().load();
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
        for gsi in &ids {
            batch.set(*gsi, msi(0x20 + (round % 200) as u8)).unwrap();
        }
        batch.commit().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

#[test]
fn gsi_exhaustion_is_an_error_and_dropped_handles_are_reused() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let config = Config {
        first_dynamic_gsi: 24,
        gsi_limit: 28,
    };
    let irq = Interrupts::new(sim, config).unwrap();
    let mut handles: Vec<_> = (0..4).map(|_| irq.allocate_gsi().unwrap()).collect();
    assert_eq!(
        handles.iter().map(|h| h.gsi().0).collect::<Vec<_>>(),
        [24, 25, 26, 27],
        "lowest free first"
    );
    match irq.allocate_gsi() {
        Err(Error::Router(RouterError::GsiExhausted(4))) => {}
        other => panic!("expected exhaustion, got {other:?}"),
    }
    let mut batch = irq.routes();
    batch.set(Gsi(25), msi(0x40)).unwrap();
    batch.commit().unwrap();
    handles.remove(1);
    // The dropped GSI comes back only after its route is gone from the committed table.
    let again = irq.allocate_gsi().unwrap();
    assert_eq!(again.gsi(), Gsi(25));
    assert!(irq.router().load().get(Gsi(25)).is_empty());
}

#[test]
fn hot_plug_loop_leaks_no_gsi() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let free = irq.router().free_gsis();
    for i in 0..10_000u32 {
        let h = irq.allocate_gsi().unwrap();
        let mut batch = irq.routes();
        batch.set(h.gsi(), msi(0x20 + (i % 200) as u8)).unwrap();
        batch.commit().unwrap();
    }
    irq.router().flush().unwrap();
    assert_eq!(irq.router().free_gsis(), free);
    assert_eq!(
        irq.router().load().len(),
        24 + 16,
        "only the default routes remain"
    );
}

#[test]
fn split_irqchip_reserves_pin_gsis_for_the_ioapic() {
    let sim = SimBackend::new(1, split());
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    assert_eq!(irq.allocate_gsi().unwrap().gsi(), Gsi(24));
    let mut batch = irq.routes();
    let err = batch.set(Gsi(3), msi(0x33)).unwrap_err();
    assert!(
        matches!(
            err,
            RouterError::Route(RouteError::GsiReserved { gsi: Gsi(3) })
        ),
        "{err}"
    );
    batch.set(Gsi(3), Route::ioapic(3)).unwrap();
    assert!(matches!(
        batch.set(Gsi(3), Route::ioapic(24)),
        Err(RouterError::Route(RouteError::PinOutOfRange { .. }))
    ));
    batch.commit().unwrap();
}

#[test]
fn a_kernel_irqfd_pins_its_gsi_to_deliverable_routes() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let gsi = irq.allocate_gsi().unwrap();
    let mut batch = irq.routes();
    batch.set(gsi.gsi(), msi(0x44)).unwrap();
    batch.commit().unwrap();
    let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let irqfd = irq.assign_irqfd(&fd, gsi.gsi()).unwrap();
    let xen = Route::XenEvtchn {
        port: 1,
        vcpu: 0,
        priority: 7,
    };
    let mut batch = irq.routes();
    batch.set(gsi.gsi(), xen).unwrap();
    assert!(matches!(
        batch.commit(),
        Err(RouterError::KernelIrqfdCannotDeliver { .. })
    ));
    irqfd.deassign().unwrap();
    let mut batch = irq.routes();
    batch.set(gsi.gsi(), xen).unwrap();
    batch.commit().unwrap();
}

#[test]
fn user_injection_of_an_unroutable_or_unknown_gsi_is_a_typed_error() {
    let sim = SimBackend::new(1, split());
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    assert!(matches!(
        irq.inject_edge(Gsi(100)),
        Err(Error::NoRoute(Gsi(100)))
    ));
}
