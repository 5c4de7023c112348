//! Snapshot encoding, versioning and the refusals of bad states, on the simulated backend.

use std::sync::Arc;

use vmirq::snapshot::{ObjectState, VERSION};
use vmirq::{
    Config, Error, Interrupts, IrqchipMode, Route, SimBackend, Snapshot, SnapshotError, X86Msi,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn split() -> IrqchipMode {
    IrqchipMode::Split { ioapic_pins: 24 }
}

fn msi(vector: u8) -> Route {
    Route::msi(X86Msi::fixed(0, vector).encode().unwrap())
}

/// A paused split VM with one MSI route (vector 0x50) and a user irqfd with a waiting signal,
/// pin 3 programmed level (vector 0x43), saved with both objects.
fn saved() -> Snapshot {
    let sim = SimBackend::new(1, split());
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    for (off, value) in [(0x00u64, 0x16u32), (0x10, 0x8043)] {
        irq.mmio_write(0xFEC0_0000 + off, &value.to_le_bytes());
    }
    let route = irq.new_route(msi(0x50)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route
        .assign_irqfd_on(&fd, Some(vmirq::IrqfdPath::User))
        .unwrap();
    irq.pause();
    fd.write(1).unwrap();
    let mut snapshot = irq.save().unwrap();
    snapshot.insert("dev/route", &route).unwrap();
    snapshot.insert("dev/irqfd", &irqfd).unwrap();
    snapshot
}

/// Restores `snapshot` into a fresh split VM, takes both objects back, resumes; returns the
/// vector-0x50 interrupts taken.
fn restore_and_run(snapshot: Snapshot) -> u64 {
    let sim = SimBackend::new(1, split());
    let restored = Interrupts::restore(sim.clone(), Config::default(), snapshot).unwrap();
    let route = restored.route("dev/route").unwrap();
    let state = restored.irqfd("dev/irqfd").unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let _irqfd = route.restore_irqfd(&fd, &state).unwrap();
    let irq = restored.finish().unwrap();
    assert_eq!(route.routes(), [msi(0x50)]);
    let mut entry = [0u8; 4];
    irq.mmio_write(0xFEC0_0000, &0x16u32.to_le_bytes());
    irq.mmio_read(0xFEC0_0010, &mut entry);
    assert_eq!(
        u32::from_le_bytes(entry),
        0x8043,
        "pin 3's entry did not travel"
    );
    irq.resume().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sim.count(0, 0x50) == 0 && std::time::Instant::now() < deadline {
        sim.run_until_idle();
        std::thread::yield_now();
    }
    sim.run_until_idle();
    sim.count(0, 0x50)
}

#[test]
fn a_snapshot_survives_its_byte_encoding_and_restores() {
    let snapshot = saved();
    let bytes = snapshot.to_bytes();
    assert_eq!(Snapshot::from_bytes(&bytes).unwrap(), snapshot);
    assert_eq!(restore_and_run(Snapshot::from_bytes(&bytes).unwrap()), 1);
}

/// The version-1 state file checked in with the first snapshot format (`saved().to_bytes()`
/// of the commit that introduced it, frozen since): it must restore in every later vmirq.
#[test]
fn the_version_1_state_file_restores() {
    let bytes = include_bytes!("data/snapshot-v1.bin");
    let snapshot = Snapshot::from_bytes(bytes).unwrap();
    assert_eq!(restore_and_run(snapshot), 1);
}

#[test]
fn truncated_or_corrupted_bytes_are_refused_never_misread() {
    let bytes = saved().to_bytes();
    for len in 0..bytes.len() {
        let e = Snapshot::from_bytes(&bytes[..len]).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Truncated { .. }),
            "{len} bytes: {e}"
        );
    }
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << bit;
            assert!(
                Snapshot::from_bytes(&bad).is_err(),
                "bit {bit} of byte {at} flipped and the snapshot still decodes"
            );
        }
    }
    let mut longer = bytes.clone();
    longer.push(b' ');
    assert!(matches!(
        Snapshot::from_bytes(&longer),
        Err(SnapshotError::Corrupted(_))
    ));
    assert_eq!(
        Snapshot::from_bytes(b"not a snapshot at all"),
        Err(SnapshotError::NotASnapshot)
    );
}

#[test]
fn a_newer_version_is_refused_with_a_typed_error() {
    let mut snapshot = saved();
    snapshot.version = VERSION + 1;
    let newer = SnapshotError::UnknownVersion {
        found: VERSION + 1,
        supported: VERSION,
    };
    assert_eq!(
        Snapshot::from_bytes(&snapshot.to_bytes()),
        Err(newer.clone())
    );
    let sim = SimBackend::new(1, split());
    let e = Interrupts::restore(sim.clone(), Config::default(), snapshot).unwrap_err();
    assert!(matches!(e, Error::Snapshot(ref s) if *s == newer), "{e}");
    assert_eq!(sim.commits(), 0, "the refused restore touched the target");
}

/// Every refusal leaves the target VM untouched: no route commit, no irqfd.
fn refused(snapshot: Snapshot, config: Config, mode: IrqchipMode) -> SnapshotError {
    let sim = SimBackend::new(1, mode);
    let e = Interrupts::restore(sim.clone(), config, snapshot).unwrap_err();
    assert_eq!(
        sim.commits(),
        0,
        "the refused restore touched the target: {e}"
    );
    match e {
        Error::Snapshot(e) => e,
        e => panic!("not a snapshot error: {e}"),
    }
}

#[test]
fn states_the_target_cannot_hold_are_refused_and_leave_it_untouched() {
    let config = Config::default();
    // Another irqchip mode.
    assert!(matches!(
        refused(saved(), config, IrqchipMode::Kernel),
        SnapshotError::ModeMismatch { .. }
    ));
    // More GSIs than the target hands out.
    let small = Config {
        gsi_limit: 24,
        ..Config::default()
    };
    assert!(matches!(
        refused(saved(), small, split()),
        SnapshotError::GsiOutOfRange { .. }
    ));
    // A route on a GSI the snapshot does not lease.
    let mut s = saved();
    s.core.allocated.clear();
    assert!(matches!(
        refused(s, config, split()),
        SnapshotError::Invalid(_)
    ));
    // IOAPIC: another pin count, a reserved bit, Remote IRR on an edge entry, a 5-bit ID.
    let ioapic = |f: &dyn Fn(&mut vmirq::ioapic::IoapicState)| {
        let mut s = saved();
        f(s.core.ioapic.as_mut().unwrap());
        refused(s, config, split())
    };
    for bad in [
        ioapic(&|io| io.pins.truncate(23)),
        ioapic(&|io| io.pins[0].entry |= 1 << 40),
        ioapic(&|io| io.pins[0].entry = 0x30 | 1 << 14),
        ioapic(&|io| io.id = 0x10),
    ] {
        assert!(matches!(bad, SnapshotError::Invalid(_)), "{bad}");
    }
    // An object on a GSI nobody leases.
    let mut s = saved();
    s.objects.insert(
        "stray".into(),
        ObjectState::Route {
            gsi: vmirq::Gsi::from_raw(4000),
        },
    );
    assert!(matches!(
        refused(s, config, split()),
        SnapshotError::Invalid(_)
    ));
}

#[test]
fn objects_come_back_once_by_name_and_kind_and_all_of_them() {
    let sim = SimBackend::new(1, split());
    let restored = Interrupts::restore(sim.clone(), Config::default(), saved()).unwrap();
    match restored.irqfd("dev/route") {
        Err(Error::Snapshot(SnapshotError::WrongObject { key, found, wanted })) => {
            assert_eq!(key, "dev/route");
            assert!(found.starts_with("the route of"), "{found}");
            assert_eq!(wanted, "an irqfd");
        }
        other => panic!("a route taken back as an irqfd: {other:?}"),
    }
    match restored.route("dev/irqfd") {
        Err(Error::Snapshot(SnapshotError::WrongObject { found, .. })) => {
            assert!(found.starts_with("an edge irqfd on"), "{found}");
        }
        other => panic!("an irqfd taken back as a route: {other:?}"),
    }
    assert!(matches!(
        restored.route("nobody"),
        Err(Error::Snapshot(SnapshotError::NoSuchObject(_)))
    ));
    let route = restored.route("dev/route").unwrap();
    assert!(matches!(
        restored.route("dev/route"),
        Err(Error::Snapshot(SnapshotError::NoSuchObject(_)))
    ));
    // An irqfd restored on the wrong GSI is refused.
    let state = restored.irqfd("dev/irqfd").unwrap();
    let pin = restored.interrupts().pin(3).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(matches!(
        pin.restore_irqfd(&fd, &state),
        Err(Error::Snapshot(SnapshotError::IrqfdMismatch { .. }))
    ));
    drop(route);
    let irq = restored.finish().unwrap();
    // The dropped route's GSI is free again.
    assert_eq!(
        irq.free_gsis(),
        Interrupts::new(SimBackend::new(1, split()), Config::default())
            .unwrap()
            .free_gsis()
    );

    let restored = Interrupts::restore(sim_again(), Config::default(), saved()).unwrap();
    let _route = restored.route("dev/route").unwrap();
    assert!(matches!(
        restored.finish(),
        Err(Error::Snapshot(SnapshotError::NotRestored(ref left))) if left == &["dev/irqfd".to_string()]
    ));
}

fn sim_again() -> Arc<SimBackend> {
    SimBackend::new(1, split())
}

#[test]
fn saving_needs_a_paused_vm() {
    let irq = Interrupts::new(SimBackend::new(1, split()), Config::default()).unwrap();
    assert!(matches!(
        irq.save(),
        Err(Error::Snapshot(SnapshotError::NotPaused))
    ));
    irq.pause();
    assert!(irq.save().is_ok());
}

#[test]
fn two_objects_cannot_share_a_name() {
    let irq = Interrupts::new(SimBackend::new(1, split()), Config::default()).unwrap();
    let route = irq.new_route(msi(0x50)).unwrap();
    irq.pause();
    let mut s = irq.save().unwrap();
    s.insert("a", &route).unwrap();
    assert_eq!(
        s.insert("a", &route),
        Err(SnapshotError::DuplicateObject("a".into()))
    );
}

/// A VM with every kind of object saves, survives both encodings (the checked bytes and a
/// bare serde body) and restores with each object taken back. With `VMIRQ_WRITE_FUZZ_SEEDS`
/// set it also writes both as seeds of the `snapshot` fuzz target (`fuzz/corpus/snapshot/`;
/// the target's first byte picks the encoding).
#[test]
fn a_snapshot_of_every_object_kind_survives_both_encodings_and_restores() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmirq::msix::{MsixTable, MsixVectors};
    use vmirq::xen::{attach, XenConfig};
    let sim = SimBackend::new(2, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let route = irq.new_route(msi(0x50)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    let (t, r) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let level = irq.pin(7).unwrap().assign_level_irqfd(&t, &r).unwrap();
    let source = irq.pin(9).unwrap().line().unwrap().source();
    source.assert();
    let msix = MsixVectors::new(Arc::clone(&irq), MsixTable::new(4)).unwrap();
    msix.write_message_control(1 << 15);
    let m = X86Msi::fixed(1, 0x60).encode().unwrap();
    msix.bar_write(0, &m.address_lo().to_le_bytes());
    msix.bar_write(8, &m.data.to_le_bytes());
    msix.bar_write(12, &0u32.to_le_bytes());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let config = XenConfig {
        vcpus: 2,
        long_mode: false,
        shared_info_gpa: 0x2_0000,
        domid: 1,
    };
    let (channels, upcalls) = attach(&irq, mem.clone(), config);
    upcalls.set_upcall_vector(1, Some(0xf3)).unwrap();
    upcalls.set_apic_id(1, 0).unwrap();
    channels.register_vcpu_info(1, 0).unwrap();
    for vcpu in [0u64, 1] {
        mem.write_obj(vcpu, GuestAddress(0x1000)).unwrap();
        assert_eq!(channels.hypercall(0, 7, 0x1000), 0);
    }
    irq.pause();
    let mut s = irq.save().unwrap();
    s.insert("route", &route).unwrap();
    s.insert("irqfd", &irqfd).unwrap();
    s.insert("level", &level).unwrap();
    s.insert("source", &source).unwrap();
    s.insert("msix", &msix).unwrap();
    s.insert_state("xen", ObjectState::Xen(channels.save(&upcalls)))
        .unwrap();
    let encoded = s.to_bytes();
    let json = serde_json::to_vec(&s).unwrap();
    assert_eq!(Snapshot::from_bytes(&encoded).unwrap(), s);
    assert_eq!(serde_json::from_slice::<Snapshot>(&json).unwrap(), s);
    let restored = Interrupts::restore(
        SimBackend::new(2, IrqchipMode::Kernel),
        Config::default(),
        s.clone(),
    )
    .unwrap();
    let route = restored.route("route").unwrap();
    let state = restored.irqfd("irqfd").unwrap();
    let _irqfd = route.restore_irqfd(&fd, &state).unwrap();
    let level_state = restored.irqfd("level").unwrap();
    let pin = restored.interrupts().pin(7).unwrap();
    let _level = pin.restore_level_irqfd(&t, &r, &level_state).unwrap();
    let source_state = restored.source("source").unwrap();
    let line = restored.interrupts().pin(9).unwrap().line().unwrap();
    let source = line.restore_source(&source_state).unwrap();
    assert!(source.is_asserted());
    let (msix, events) = restored.msix("msix").unwrap();
    assert!(events.is_empty() && msix.routed_vectors() == 1);
    let (channels, upcalls, _) = restored.xen("xen", mem, 2).unwrap();
    assert_eq!(channels.port_status(1).state, vmirq::xen::PortState::Ipi);
    assert_eq!((upcalls.apic_id(0), upcalls.apic_id(1)), (Some(0), Some(0)));
    assert_eq!(
        (channels.vcpu_info_gpa(0), channels.vcpu_info_gpa(1)),
        (None, Some(0))
    );
    restored.finish().unwrap().resume().unwrap();
    if std::env::var_os("VMIRQ_WRITE_FUZZ_SEEDS").is_some() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/snapshot");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(format!("{dir}/full.bin"), [&[1u8][..], &encoded].concat()).unwrap();
        std::fs::write(format!("{dir}/full.json"), [&[0u8][..], &json].concat()).unwrap();
    }
}

#[test]
fn a_level_irqfd_taken_back_as_another_kind_is_named_a_level_irqfd() {
    let irq = Interrupts::new(SimBackend::new(1, split()), Config::default()).unwrap();
    let (trigger, resample) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let level = irq
        .pin(5)
        .unwrap()
        .assign_level_irqfd(&trigger, &resample)
        .unwrap();
    irq.pause();
    let mut s = irq.save().unwrap();
    s.insert("level", &level).unwrap();
    let restored = Interrupts::restore(SimBackend::new(1, split()), Config::default(), s).unwrap();
    match restored.route("level") {
        Err(Error::Snapshot(SnapshotError::WrongObject { found, .. })) => {
            assert!(found.starts_with("a level irqfd on"), "{found}");
        }
        other => panic!("a level irqfd taken back as a route: {other:?}"),
    }
}
