//! Every state a component refuses to restore, refused with a typed error: the IOAPIC, MSI-X
//! tables, MSI capabilities and Xen event channels (on the simulated backend).

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmirq::ioapic::Ioapic;
use vmirq::msix::{MsiCapability, MsixTable};
use vmirq::snapshot::ObjectState;
use vmirq::xen::{attach, Callback, PortState, Remote, XenConfig, XenState};
use vmirq::{Config, Error, Interrupts, IrqchipMode, SimBackend, SnapshotError};

#[test]
fn an_ioapic_refuses_a_storm_count_at_the_limit_and_keeps_its_state() {
    let mut io = Ioapic::new(24);
    let saved = io.save();
    let mut bad = saved.clone();
    bad.pins[3].redeliveries = vmirq::ioapic::REDELIVERY_STORM_LIMIT;
    assert!(matches!(io.restore(&bad), Err(SnapshotError::Invalid(_))));
    bad.pins[3].redeliveries = vmirq::ioapic::REDELIVERY_STORM_LIMIT - 1;
    bad.ioregsel = 0x13;
    // The extremes an IOAPIC holds: ID 15, a level entry waiting for EOI (Remote IRR).
    bad.id = 15;
    bad.pins[4].entry = 0x30 | 1 << 15 | 1 << 14;
    io.restore(&bad).unwrap();
    assert_eq!(io.save(), bad, "a valid state is taken as it is");
    let before = io.save();
    let mut worse = bad.clone();
    worse.pins[0].entry = 1 << 12; // delivery status: never held
    assert!(io.restore(&worse).is_err());
    assert_eq!(io.save(), before, "a refused restore changed the IOAPIC");
    // The largest IOAPIC there is restores too.
    let mut big = Ioapic::new(vmirq::ioapic::MAX_PINS);
    let state = big.save();
    big.restore(&state).unwrap();
}

#[test]
fn an_msix_table_refuses_what_no_function_holds() {
    let table = MsixTable::new(70);
    let good = table.save();
    let restored = MsixTable::restore(&good).unwrap();
    assert_eq!(restored.save(), good);
    let bad = |f: &dyn Fn(&mut vmirq::msix::MsixTableState)| {
        let mut s = good.clone();
        f(&mut s);
        MsixTable::restore(&s).is_err()
    };
    assert!(bad(&|s| s.entries.clear()), "no vectors");
    assert!(
        bad(&|s| s.entries.resize(2049, [0, 0, 0, 1])),
        "2049 vectors"
    );
    assert!(bad(&|s| s.pba.push(0)), "a PBA qword too many");
    assert!(
        bad(&|s| s.entries[5][3] = 2),
        "a reserved vector-control bit"
    );
    assert!(bad(&|s| s.pba[1] = 1 << 6), "pending past the last vector");
    assert!(
        !bad(&|s| s.pba[1] = 1 << 5),
        "the last vector's pending bit"
    );
}

#[test]
fn an_msi_capability_refuses_what_no_capability_holds() {
    let cap = MsiCapability::new(8, false, true);
    let good = cap.save();
    assert_eq!(MsiCapability::restore(&good).unwrap().save(), good);
    let bad = |f: &dyn Fn(&mut vmirq::msix::MsiCapabilityState)| {
        let mut s = good;
        f(&mut s);
        MsiCapability::restore(&s).is_err()
    };
    assert!(bad(&|s| s.log2_capable = 6), "64 vectors");
    assert!(bad(&|s| s.log2_enabled = 4), "MME above MMC");
    assert!(bad(&|s| s.address_lo = 0xfee0_0002), "an unaligned address");
    assert!(
        bad(&|s| s.address_hi = 1),
        "an upper address on a 32-bit capability"
    );
    assert!(bad(&|s| s.mask = 1 << 8), "a mask bit past the last vector");
    assert!(
        bad(&|s| s.pending = 1 << 8),
        "a pending bit past the last vector"
    );
    assert!(
        !bad(&|s| s.pending = 1 << 7),
        "the last vector's pending bit"
    );
    let no_pvm = MsiCapability::new(8, false, false).save();
    let mut s = no_pvm;
    s.mask = 1;
    assert!(
        MsiCapability::restore(&s).is_err(),
        "mask bits without per-vector masking"
    );
}

const SHINFO: u64 = 0x2_0000;

/// A saved Xen state with two IPI ports and a VIRQ, from event channels on the simulator.
fn xen_state() -> XenState {
    let irq = Interrupts::new(SimBackend::new(2, IrqchipMode::Kernel), Config::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let config = XenConfig {
        vcpus: 2,
        long_mode: true,
        shared_info_gpa: SHINFO,
        domid: 1,
    };
    let (channels, upcalls) = attach(&irq, mem.clone(), config);
    for vcpu in [0u64, 1] {
        mem.write_obj(vcpu, GuestAddress(0x1000)).unwrap();
        assert_eq!(channels.hypercall(0, 7, 0x1000), 0, "bind_ipi");
    }
    // bind_virq {virq, vcpu, port out}: the timer (per vCPU) on vCPU 1, Argo's (per domain)
    // on vCPU 0.
    for (virq, vcpu) in [(0u64, 1u64), (11, 0)] {
        mem.write_obj(virq | vcpu << 32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0u32, GuestAddress(0x1008)).unwrap();
        assert_eq!(channels.hypercall(0, 1, 0x1000), 0, "bind_virq");
    }
    upcalls.set_upcall_vector(1, Some(0xf3)).unwrap();
    // A backend endpoint, not yet connected.
    let _backend = channels.alloc_backend_unbound().unwrap();
    channels.save(&upcalls)
}

/// Restores `state` as a snapshot object into a fresh VM with `vcpus` vCPUs.
fn restore_xen(state: XenState, vcpus: u32) -> Result<(), Error> {
    let irq = Interrupts::new(SimBackend::new(2, IrqchipMode::Kernel), Config::default()).unwrap();
    irq.pause();
    let mut snapshot = irq.save().unwrap();
    snapshot
        .insert_state("xen", ObjectState::Xen(state))
        .unwrap();
    let restored = Interrupts::restore(
        SimBackend::new(2, IrqchipMode::Kernel),
        Config::default(),
        snapshot,
    )?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (channels, _, _) = restored.xen("xen", mem, vcpus)?;
    let _ = Arc::clone(&channels);
    restored.finish()?;
    Ok(())
}

#[test]
fn xen_event_channels_refuse_impossible_states() {
    let good = xen_state();
    assert_eq!((good.ports.len(), good.backends.len()), (4, 1));
    restore_xen(good.clone(), 2).unwrap();
    let backend = good.backends[0].0;
    let peer = good.ports[1].0;
    // Valid extremes restore: vector 0x10 for the callback and an upcall, a placed vcpu_info.
    let mut s = good.clone();
    s.callback = Callback::Vector(0x10);
    s.upcall_vectors[0] = Some(0x10);
    s.vcpu_info[1] = Some(0x3000);
    s.vcpu_info[0] = Some(0);
    s.ports[0].1 = PortState::Pirq(255);
    s.pirqs = vec![16, 24, 255];
    s.gsi_pirqs = vec![(16, 10, 1)];
    restore_xen(s, 2).unwrap();
    // A snapshot from before vcpu_info at address 0 was honoured (placements as `placed`, 0
    // for the legacy slot, no APIC IDs) restores.
    let mut s = good.clone();
    s.placed = vec![0, 0x3000];
    s.vcpu_info.clear();
    s.apic_ids.clear();
    restore_xen(s, 2).unwrap();
    // Valid variations restore: loopback and backend peers that exist.
    for state in [
        PortState::Interdomain {
            remote: Remote::Guest,
            remote_port: peer,
        },
        PortState::Interdomain {
            remote: Remote::Backend,
            remote_port: backend,
        },
    ] {
        let mut s = good.clone();
        s.ports[0].1 = state;
        restore_xen(s, 2).unwrap_or_else(|e| panic!("{state:?}: {e}"));
    }
    let refused = |f: &dyn Fn(&mut XenState), vcpus: u32| {
        let mut s = good.clone();
        f(&mut s);
        matches!(
            restore_xen(s, vcpus),
            Err(Error::Snapshot(SnapshotError::Invalid(_)))
        )
    };
    assert!(refused(&|_| {}, 1), "more vCPUs than the target has");
    assert!(
        refused(&|s| s.vcpu_info.pop().map(drop).unwrap_or(()), 2),
        "a table size"
    );
    assert!(
        refused(&|s| s.apic_ids.push(2), 2),
        "an APIC ID for a vCPU that does not exist"
    );
    assert!(
        refused(
            &|s| {
                s.ports[0].1 = PortState::Interdomain {
                    remote: Remote::Domain(9),
                    remote_port: 1,
                }
            },
            2
        ),
        "connected to a domain that does not exist"
    );
    assert!(refused(&|s| s.ports[0].0 = 0, 2), "port 0 open");
    assert!(
        refused(&|s| s.ports[0].0 = 4096, 2),
        "a port past the layout"
    );
    assert!(refused(&|s| s.ports.swap(0, 1), 2), "ports out of order");
    assert!(
        refused(&|s| s.ports.insert(1, s.ports[0]), 2),
        "a port listed twice"
    );
    assert!(
        refused(&|s| s.ports.push((4096, PortState::Ipi, 0)), 2),
        "the port just past the layout"
    );
    assert!(
        refused(
            &|s| {
                s.ports[0].1 = PortState::Interdomain {
                    remote: Remote::Guest,
                    remote_port: 4096,
                }
            },
            2
        ),
        "a loopback peer past the layout"
    );
    assert!(
        refused(&|s| s.ports[1].2 = 2, 2),
        "a port on a vCPU that does not exist"
    );
    assert!(
        refused(&|s| s.ports[0].1 = PortState::Closed, 2),
        "a closed port listed"
    );
    assert!(
        refused(&|s| s.ports[0].1 = PortState::Pirq(256), 2),
        "PIRQ 256"
    );
    assert!(
        refused(
            &|s| {
                s.ports[0].1 = PortState::Pirq(3);
                s.ports[1].1 = PortState::Pirq(3);
            },
            2
        ),
        "a PIRQ bound twice"
    );
    assert!(refused(&|s| s.pirqs = vec![30, 20], 2), "PIRQs unordered");
    assert!(refused(&|s| s.pirqs = vec![256], 2), "PIRQ 256 handed out");
    assert!(
        refused(&|s| s.gsi_pirqs = vec![(16, 10, 1)], 2),
        "a GSI PIRQ never handed out"
    );
    assert!(
        refused(
            &|s| {
                s.pirqs = vec![16, 17];
                s.gsi_pirqs = vec![(16, 10, 0), (17, 10, 0)];
            },
            2
        ),
        "a GSI mapped twice"
    );
    assert!(
        refused(
            &|s| {
                s.pirqs = vec![16];
                s.gsi_pirqs = vec![(16, 24, 0)];
            },
            2
        ),
        "GSI 24"
    );
    assert!(
        refused(&|s| s.ports[0].1 = PortState::Virq(24), 2),
        "VIRQ 24"
    );
    assert!(
        refused(
            &|s| {
                s.ports[0].1 = PortState::Interdomain {
                    remote: Remote::Backend,
                    remote_port: 7,
                }
            },
            2
        ),
        "a backend peer that does not exist"
    );
    assert!(
        refused(&|s| s.virqs[1] = 4096, 2),
        "a VIRQ on a port past the layout"
    );
    assert!(
        refused(&|s| s.virqs[24 + 2] = 5, 2),
        "a global VIRQ bound on vCPU 1"
    );
    assert!(
        refused(&|s| s.vcpu_info[0] = Some(0x3004), 2),
        "an unaligned vcpu_info"
    );
    assert!(
        refused(&|s| s.vcpu_info[0] = Some(0x3fc8), 2),
        "a vcpu_info crossing a page"
    );
    assert!(
        refused(&|s| s.upcall_vectors[0] = Some(0x0f), 2),
        "upcall vector 0x0f"
    );
    assert!(
        refused(&|s| s.callback = Callback::Vector(0x0f), 2),
        "callback vector 0x0f"
    );
    assert!(
        refused(&|s| s.callback = Callback::Gsi(24), 2),
        "callback GSI 24"
    );
    assert!(
        !refused(&|s| s.callback = Callback::Gsi(23), 2),
        "callback GSI 23"
    );
}
