//! Snapshot and restore of a VM's interrupts into a fresh VM, written once and run on the
//! simulated backend and real KVM, each with the in-kernel and the split irqchip.

use std::time::Duration;

use vmirq::{IrqfdPath, MsiMessage, Route, Save, Snapshot, X86Msi};
use vmirq_guest::machine::{boot_another, mmio_read_op, wait_fd, Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmm_sys_util::eventfd::EventFd;

const WAIT: Duration = Duration::from_secs(5);
const IOREGSEL: u32 = 0xFEC0_0000;
const IOWIN: u32 = 0xFEC0_0010;
const USER_VECTOR: u8 = 0x50;
const KERNEL_VECTOR: u8 = 0x52;
const PIN: u32 = 7;
const PIN_VECTOR: u8 = 0x47;

fn one_vcpu(mode: Mode) -> MachineConfig {
    MachineConfig::new(1, mode.irqchip())
}

fn msi(vector: u8) -> MsiMessage {
    X86Msi::fixed(0, vector).encode().unwrap()
}

/// Saves `m`'s interrupts (paused) with `objects`, through the byte encoding.
fn save(m: &dyn Machine, objects: &[(&str, &dyn Save)]) -> Snapshot {
    let mut snapshot = m.interrupts().save().unwrap();
    for (key, object) in objects {
        snapshot.insert(*key, *object).unwrap();
    }
    Snapshot::from_bytes(&snapshot.to_bytes()).unwrap()
}

on_every_machine!(
    a_restored_vm_keeps_its_routes_and_delivers_what_waited_at_save_once,
    one_vcpu,
    |m: &dyn Machine, mode: Mode| {
        let irq = m.interrupts();
        let user_route = irq.new_route(Route::msi(msi(USER_VECTOR))).unwrap();
        let user_fd = EventFd::new(0).unwrap();
        let user = user_route
            .assign_irqfd_on(&user_fd, Some(IrqfdPath::User))
            .unwrap();
        let kernel_route = irq.new_route(Route::msi(msi(KERNEL_VECTOR))).unwrap();
        let kernel_fd = EventFd::new(0).unwrap();
        let kernel = kernel_route
            .assign_irqfd_on(&kernel_fd, Some(IrqfdPath::Kernel))
            .unwrap();
        user_fd.write(1).unwrap();
        m.wait_isr(Some(0), USER_VECTOR, WAIT)
            .expect("the source's user irqfd never delivered");

        irq.pause();
        user_fd.write(1).unwrap(); // waits in the eventfd, unserved
        let snapshot = save(
            m,
            &[
                ("user/route", &user_route),
                ("user/irqfd", &user),
                ("kernel/route", &kernel_route),
                ("kernel/irqfd", &kernel),
            ],
        );
        let (user_gsi, kernel_gsi) = (user_route.gsi(), kernel_route.gsi());

        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().expect("booted from a snapshot");
        let user_route = restored.route("user/route").unwrap();
        let kernel_route = restored.route("kernel/route").unwrap();
        assert_eq!(
            (user_route.gsi(), kernel_route.gsi()),
            (user_gsi, kernel_gsi)
        );
        assert_eq!(user_route.routes(), [Route::msi(msi(USER_VECTOR))]);
        let user_state = restored.irqfd("user/irqfd").unwrap();
        let kernel_state = restored.irqfd("kernel/irqfd").unwrap();
        assert!(user_state.pending, "the waiting signal was not saved");
        assert!(
            !kernel_state.pending,
            "KVM takes kernel irqfds' signals at once"
        );
        let (user_fd, kernel_fd) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let _user = user_route.restore_irqfd(&user_fd, &user_state).unwrap();
        let _kernel = kernel_route
            .restore_irqfd(&kernel_fd, &kernel_state)
            .unwrap();
        let irq = restored.finish().unwrap();

        // Paused: nothing yet (the control proves the target is live).
        target.control(0);
        assert_eq!(target.count(0, USER_VECTOR), 0);
        target.log().clear();
        irq.resume().unwrap();
        target
            .wait_isr(Some(0), USER_VECTOR, WAIT)
            .expect("the signal that waited at save was lost");
        target.control(0);
        assert_eq!(target.count(0, USER_VECTOR), 1, "delivered twice");
        // The restored irqfds serve the new eventfds.
        user_fd.write(1).unwrap();
        target
            .wait_isr(Some(0), USER_VECTOR, WAIT)
            .expect("the restored user irqfd does not deliver");
        kernel_fd.write(1).unwrap();
        target
            .wait_isr(Some(0), KERNEL_VECTOR, WAIT)
            .expect("the restored kernel irqfd does not deliver");
    }
);

on_every_machine!(
    a_restored_level_irqfd_and_ioapic_pin_deliver_and_resample_after_resume,
    |mode: Mode| one_vcpu(mode).ioapic_pin(PIN, PIN_VECTOR, 0, true),
    |m: &dyn Machine, mode: Mode| {
        let irq = m.interrupts();
        let pin = irq.pin(PIN).unwrap();
        let (trigger, resample) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let level = pin.assign_level_irqfd(&trigger, &resample).unwrap();
        irq.pause();
        m.log().clear();
        trigger.write(1).unwrap();
        if level.path() == IrqfdPath::Kernel {
            // KVM's resample irqfd takes the signal at once, paused or not: the source takes it.
            m.wait_isr(Some(0), PIN_VECTOR, WAIT)
                .expect("KVM's level irqfd never delivered");
            // The guest ends its handler (its EOI acks the pin) before the snapshot: the
            // LAPIC's in-service vector is vCPU state this test does not carry over.
            m.control(0);
            assert!(wait_fd(m, &resample, WAIT).is_some());
        }
        let snapshot = save(m, &[("pin/level", &level)]);
        let entry = |m: &dyn Machine| {
            m.guest_mmio(&[(IOREGSEL, 0x10 + 2 * PIN), mmio_read_op(IOWIN)])
                .unwrap()[1]
        };
        let source_entry = entry(m);

        // The IOAPIC (vmirq's, or the in-kernel one) comes from the snapshot: the target's
        // guest programs nothing.
        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().unwrap();
        let state = restored.irqfd("pin/level").unwrap();
        assert_eq!(state.pending, level.path() == IrqfdPath::User);
        let (trigger, resample) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let pin = restored.interrupts().pin(PIN).unwrap();
        let _level = pin
            .restore_level_irqfd(&trigger, &resample, &state)
            .unwrap();
        let irq = restored.finish().unwrap();
        assert_eq!(
            entry(&*target),
            source_entry,
            "the IOAPIC entry did not travel"
        );
        target.log().clear();
        irq.resume().unwrap();
        if state.pending {
            target
                .wait_isr(Some(0), PIN_VECTOR, WAIT)
                .expect("the level signal that waited at save was lost");
            assert!(
                wait_fd(&*target, &resample, WAIT).is_some(),
                "the guest's EOI never reached the restored resamplefd"
            );
        }
        // The restored level irqfd works from now on.
        target.log().clear();
        trigger.write(1).unwrap();
        target
            .wait_isr(Some(0), PIN_VECTOR, WAIT)
            .expect("the restored level irqfd does not deliver");
        assert!(wait_fd(&*target, &resample, WAIT).is_some());
        target.control(0);
    }
);

on_every_machine!(
    a_restored_msix_device_keeps_its_table_pba_and_tags_and_delivers_on,
    one_vcpu,
    |m: &dyn Machine, mode: Mode| {
        use vmirq::msix::{MsixTable, MsixVectors};
        const VECTORS: u16 = 8;
        let vector_of = |v: u16| 0x60 + v as u8;
        let msix = MsixVectors::new(
            std::sync::Arc::clone(m.interrupts()),
            MsixTable::new(VECTORS),
        )
        .unwrap();
        assert!(msix.write_message_control(1 << 15).is_empty());
        for v in 0..VECTORS {
            let msg = msi(vector_of(v));
            let at = u64::from(v) * 16;
            let masked = u32::from(v >= 4);
            msix.bar_write(at, &msg.address_lo().to_le_bytes());
            msix.bar_write(at + 8, &msg.data.to_le_bytes());
            assert!(msix.bar_write(at + 12, &masked.to_le_bytes()).is_empty());
        }
        msix.set_tag(6, Some(0xabc)).unwrap();
        msix.fire(1).unwrap();
        m.wait_isr(Some(0), vector_of(1), WAIT)
            .expect("an unmasked vector never delivered");
        m.interrupts().pause();
        msix.fire(5).unwrap(); // masked: pending after restore
        let table_before: Vec<u8> = (0..VECTORS * 16)
            .map(|off| {
                let mut b = [0u8; 1];
                msix.bar_read(u64::from(off), &mut b);
                b[0]
            })
            .collect();
        let snapshot = save(m, &[("dev/msix", &msix)]);

        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().unwrap();
        let (msix, events) = restored.msix("dev/msix").unwrap();
        assert!(events.is_empty(), "{events:?}");
        let irq = restored.finish().unwrap();
        for off in 0..VECTORS * 16 {
            let mut b = [0u8; 1];
            msix.bar_read(u64::from(off), &mut b);
            assert_eq!(b[0], table_before[usize::from(off)], "table byte {off}");
        }
        let mut pba = [0u8; 8];
        msix.bar_read(msix.pba_offset(), &mut pba);
        assert_eq!(
            u64::from_le_bytes(pba),
            1 << 5,
            "the masked fire's pending bit"
        );
        assert_eq!(msix.tag(6).unwrap(), Some(0xabc));
        assert_eq!(msix.routed_vectors(), 4, "the unmasked vectors' GSIs");
        irq.resume().unwrap();
        // Unmasking the pending vector delivers it, once.
        assert!(msix.bar_write(5 * 16 + 12, &0u32.to_le_bytes()).is_empty());
        target
            .wait_isr(Some(0), vector_of(5), WAIT)
            .expect("the pending masked vector was lost");
        for v in [0, 2, 5] {
            target.log().clear();
            msix.fire(v).unwrap();
            target
                .wait_isr(Some(0), vector_of(v), WAIT)
                .unwrap_or_else(|| panic!("restored vector {v} does not deliver"));
        }
        target.control(0);
        assert_eq!(target.count(0, vector_of(5)), 2);
    }
);

mod xen {
    use super::*;
    use vmirq::snapshot::ObjectState;
    use vmirq::xen::{attach, XenConfig};
    use vmirq_guest::layout::{XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
    use vmirq_guest::migration::{mask_xen_port, serve_hypercalls, xen_hypercall};

    const BIND_IPI: u32 = 7;
    const UNMASK: u32 = 9;

    pub fn two_vcpus(mode: Mode) -> MachineConfig {
        MachineConfig::new(2, mode.irqchip())
    }

    fn config() -> XenConfig {
        XenConfig {
            vcpus: 2,
            long_mode: false,
            shared_info_gpa: XEN_SHARED_INFO,
            domid: 1,
        }
    }

    fn hypercall(m: &dyn Machine, cmd: u32, first: u32) -> (i64, u32) {
        xen_hypercall(m, cmd, first).unwrap()
    }

    on_every_machine!(
        restored_xen_ports_keep_their_bindings_and_deliver_what_waited,
        two_vcpus,
        |m: &dyn Machine, mode: Mode| {
            let (channels, upcalls) =
                attach(m.interrupts(), m.guest_memory().unwrap().clone(), config());
            for vcpu in 0..2 {
                upcalls
                    .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
                    .unwrap();
            }
            serve_hypercalls(m, &channels);
            let (r, port) = hypercall(m, BIND_IPI, 1);
            assert_eq!(r, 0);
            let route = m
                .interrupts()
                .new_route(Route::XenEvtchn {
                    port,
                    vcpu: 1,
                    priority: 7,
                })
                .unwrap();
            let fd = EventFd::new(0).unwrap();
            let irqfd = route.assign_irqfd(&fd).unwrap();
            fd.write(1).unwrap();
            assert_eq!(
                m.wait_port_count(port, 1, WAIT),
                1,
                "the port never delivered"
            );
            mask_xen_port(m, port).unwrap();
            m.interrupts().pause();
            fd.write(1).unwrap(); // waits unserved: delivered at resume, then owed at unmask
            let mut snapshot = m.interrupts().save().unwrap();
            snapshot.insert("xen/route", &route).unwrap();
            snapshot.insert("xen/irqfd", &irqfd).unwrap();
            snapshot
                .insert_state("xen", ObjectState::Xen(channels.save(&upcalls)))
                .unwrap();
            let snapshot = Snapshot::from_bytes(&snapshot.to_bytes()).unwrap();
            let mut shared_info = vec![0u8; 4096];
            m.read_guest(XEN_SHARED_INFO, &mut shared_info).unwrap();

            let target = boot_another(m, &two_vcpus(mode).restored_from(snapshot)).unwrap();
            // Guest RAM travels with the VM: here, the page the 2-level bits live in.
            target.write_guest(XEN_SHARED_INFO, &shared_info).unwrap();
            let restored = target.take_restored().unwrap();
            let (channels, _upcalls, backends) = restored
                .xen("xen", target.guest_memory().unwrap().clone(), 2)
                .unwrap();
            assert!(backends.is_empty());
            serve_hypercalls(&*target, &channels);
            let route = restored.route("xen/route").unwrap();
            let state = restored.irqfd("xen/irqfd").unwrap();
            assert!(state.pending);
            let fd = EventFd::new(0).unwrap();
            let _irqfd = route.restore_irqfd(&fd, &state).unwrap();
            let irq = restored.finish().unwrap();
            let status = channels.port_status(port);
            assert_eq!(
                (status.state, status.vcpu, status.masked),
                (vmirq::xen::PortState::Ipi, 1, true)
            );
            irq.resume().unwrap();
            // The waiting event reaches the masked port at resume; unmasking delivers it.
            assert!(
                target.wait_until(WAIT, &mut || channels.port_status(port).pending),
                "the waiting event was lost"
            );
            assert_eq!(hypercall(&*target, UNMASK, port).0, 0);
            assert_eq!(
                target.wait_port_count(port, 1, WAIT),
                1,
                "the owed event never came"
            );
            fd.write(1).unwrap();
            assert_eq!(
                target.wait_port_count(port, 2, WAIT),
                2,
                "the restored route is dead"
            );
        }
    );

    /// Guest RAM the FIFO ABI and the test guest's consumer use: travels with the VM.
    const FIFO_RAM: [(u64, usize); 4] = [
        (XEN_SHARED_INFO, 0x1000),
        (vmirq_guest::layout::XEN_FIFO_FLAG, 4),
        (vmirq_guest::layout::XEN_FIFO_CONTROL, 0x3000),
        (vmirq_guest::layout::XEN_FIFO_ARRAY, 0x1000),
    ];

    fn fifo_call(m: &dyn Machine, cmd: u32, words: &[u32]) -> Vec<u32> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let (r, out) = vmirq_guest::xen::hypercall(m, cmd, &bytes).unwrap();
        assert_eq!(r, 0, "EVTCHNOP {cmd} {words:?}");
        out.chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    on_every_machine!(
        restored_fifo_queues_keep_their_order_tails_and_masked_events,
        two_vcpus,
        |m: &dyn Machine, mode: Mode| {
            use vmirq_guest::layout::{xen_fifo_control, XEN_FIFO_ARRAY, XEN_FIFO_FLAG};
            let (channels, upcalls) =
                attach(m.interrupts(), m.guest_memory().unwrap().clone(), config());
            serve_hypercalls(m, &channels);
            m.write_guest(XEN_FIFO_FLAG, &1u32.to_le_bytes()).unwrap();
            for v in 0..2u32 {
                let cb = xen_fifo_control(v as usize);
                fifo_call(m, 11, &[(cb >> 12) as u32, 0, (cb & 0xfff) as u32, v, 0, 0]);
            }
            m.write_guest(XEN_FIFO_ARRAY, &[0u8; 0x1000]).unwrap();
            fifo_call(m, 12, &[(XEN_FIFO_ARRAY >> 12) as u32, 0]);
            for v in 0..2 {
                upcalls
                    .set_upcall_vector(v, Some(XEN_UPCALL_VECTOR))
                    .unwrap();
            }
            let ipi = |prio: u32| {
                let port = fifo_call(m, BIND_IPI, &[1, 0])[1];
                fifo_call(m, 13, &[port, prio]);
                port
            };
            let (a, b, c) = (ipi(3), ipi(9), ipi(3));
            channels.notify_port(a).unwrap();
            assert_eq!(m.wait_port_count(a, 1, WAIT), 1, "the path is live");
            // b masked and pending; vCPU 1's upcall off: c then a queue up at priority 3.
            let word_b = XEN_FIFO_ARRAY + u64::from(b) * 4;
            m.write_guest(word_b, &(1u32 << 30).to_le_bytes()).unwrap();
            channels.notify_port(b).unwrap();
            upcalls.set_upcall_vector(1, None).unwrap();
            channels.notify_port(c).unwrap();
            channels.notify_port(a).unwrap();
            m.interrupts().pause();
            let mut snapshot = m.interrupts().save().unwrap();
            let state = channels.save(&upcalls);
            assert!(state.fifo.is_some());
            snapshot
                .insert_state("xen", ObjectState::Xen(state))
                .unwrap();
            let snapshot = Snapshot::from_bytes(&snapshot.to_bytes()).unwrap();
            let ram: Vec<Vec<u8>> = FIFO_RAM
                .iter()
                .map(|&(at, len)| {
                    let mut b = vec![0u8; len];
                    m.read_guest(at, &mut b).unwrap();
                    b
                })
                .collect();

            let target = boot_another(m, &two_vcpus(mode).restored_from(snapshot)).unwrap();
            for ((at, _), bytes) in FIFO_RAM.iter().zip(&ram) {
                target.write_guest(*at, bytes).unwrap();
            }
            let restored = target.take_restored().unwrap();
            let (channels, upcalls, _) = restored
                .xen("xen", target.guest_memory().unwrap().clone(), 2)
                .unwrap();
            serve_hypercalls(&*target, &channels);
            let irq = restored.finish().unwrap();
            irq.resume().unwrap();
            assert!(channels.is_fifo());
            // vCPU 1's upcall back: its queue, restored, gives c then a.
            upcalls
                .set_upcall_vector(1, Some(XEN_UPCALL_VECTOR))
                .unwrap();
            assert_eq!(target.wait_port_count(c, 1, WAIT), 1, "c was lost");
            assert_eq!(target.wait_port_count(a, 1, WAIT), 1, "a was lost");
            // The masked event waits for its unmask.
            assert_eq!(target.port_counter(b), 0);
            target
                .write_guest(word_b, &(1u32 << 31).to_le_bytes())
                .unwrap();
            assert_eq!(hypercall(&*target, UNMASK, b).0, 0);
            assert_eq!(target.wait_port_count(b, 1, WAIT), 1, "b was lost");
            // The restored tail is consumed: the next events start the queue again.
            channels.notify_port(c).unwrap();
            channels.notify_port(a).unwrap();
            assert_eq!(target.wait_port_count(c, 2, WAIT), 2);
            assert_eq!(target.wait_port_count(a, 2, WAIT), 2);
            assert_eq!(channels.fifo_give_ups(), [0; 4]);
        }
    );
}

const SOURCE_PIN: u32 = 9;
const SOURCE_VECTOR: u8 = 0x49;

on_every_machine!(
    a_restored_source_holding_an_edge_pin_high_gives_no_second_edge,
    |mode: Mode| one_vcpu(mode).ioapic_pin(SOURCE_PIN, SOURCE_VECTOR, 0, false),
    |m: &dyn Machine, mode: Mode| {
        let line = m.interrupts().pin(SOURCE_PIN).unwrap().line().unwrap();
        let (held, idle) = (line.source(), line.source());
        held.assert();
        m.wait_isr(Some(0), SOURCE_VECTOR, WAIT)
            .expect("the rising edge was never delivered");
        m.control(0);
        m.interrupts().pause();
        let snapshot = save(m, &[("uart/held", &held), ("uart/idle", &idle)]);
        assert_eq!(snapshot.core.lines, [line.gsi()]);

        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().unwrap();
        let line = restored
            .interrupts()
            .pin(SOURCE_PIN)
            .unwrap()
            .line()
            .unwrap();
        let held = line
            .restore_source(&restored.source("uart/held").unwrap())
            .unwrap();
        let idle = line
            .restore_source(&restored.source("uart/idle").unwrap())
            .unwrap();
        assert!(held.is_asserted() && !idle.is_asserted());
        let irq = restored.finish().unwrap();
        irq.resume().unwrap();
        target.control(0);
        assert_eq!(
            target.count(0, SOURCE_VECTOR),
            0,
            "the restored source gave a second edge"
        );
        // The line is still high: another source asserting gives no edge either; dropping
        // both and asserting again does.
        idle.assert();
        idle.deassert();
        held.deassert();
        target.control(0);
        assert_eq!(target.count(0, SOURCE_VECTOR), 0);
        target.log().clear();
        held.assert();
        target
            .wait_isr(Some(0), SOURCE_VECTOR, WAIT)
            .expect("a new rising edge after restore was lost");
        target.control(0);
        assert_eq!(target.count(0, SOURCE_VECTOR), 1);
    }
);

on_every_machine!(
    a_restored_line_no_source_holds_drops,
    |mode: Mode| one_vcpu(mode).ioapic_pin(SOURCE_PIN, SOURCE_VECTOR, 0, false),
    |m: &dyn Machine, mode: Mode| {
        let line = m.interrupts().pin(SOURCE_PIN).unwrap().line().unwrap();
        let held = line.source();
        held.assert();
        m.wait_isr(Some(0), SOURCE_VECTOR, WAIT)
            .expect("the rising edge was never delivered");
        m.interrupts().pause();
        // The device that held it is not restored (hot-unplugged across the migration).
        let snapshot = save(m, &[]);
        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().unwrap();
        let irq = restored.finish().unwrap();
        irq.resume().unwrap();
        // Dropped at finish: a new source's assertion is a rising edge.
        let line = irq.pin(SOURCE_PIN).unwrap().line().unwrap();
        let source = line.source();
        target.log().clear();
        source.assert();
        target
            .wait_isr(Some(0), SOURCE_VECTOR, WAIT)
            .expect("the line stayed high with no source holding it");
    }
);

on_every_machine!(
    a_restored_msi_device_keeps_its_capability_and_a_masked_vectors_pending_bit,
    one_vcpu,
    |m: &dyn Machine, mode: Mode| {
        use vmirq::msix::{MsiCapability, MsiVectors};
        let base = msi(0x70);
        let device = MsiVectors::new(
            std::sync::Arc::clone(m.interrupts()),
            MsiCapability::new(4, true, true),
        )
        .unwrap();
        // 64-bit, per-vector mask: address @4/@8, data @0xC, mask @0x10; 4 vectors; vector
        // 2 masked.
        let (_, events) = device.update(|c, fx| {
            c.config_write(0x04, &base.address_lo().to_le_bytes(), fx);
            c.config_write(0x08, &0u32.to_le_bytes(), fx);
            c.config_write(0x0C, &(base.data as u16).to_le_bytes(), fx);
            c.config_write(0x10, &(1u32 << 2).to_le_bytes(), fx);
            c.config_write(0x02, &(1u16 | 2 << 4).to_le_bytes(), fx);
        });
        assert!(events.is_empty());
        device.fire(1).unwrap();
        m.wait_isr(Some(0), 0x71, WAIT).expect("MSI vector 1");
        m.interrupts().pause();
        device.fire(2).unwrap(); // masked: pending after restore
        let snapshot = save(m, &[("dev/msi", &device)]);
        let mut before = [0u8; 0x18];
        device.read(|c| c.config_read(0, &mut before));

        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().unwrap();
        let (device, events) = restored.msi("dev/msi", None).unwrap();
        assert!(events.is_empty());
        let irq = restored.finish().unwrap();
        let mut after = [0u8; 0x18];
        device.read(|c| c.config_read(0, &mut after));
        assert_eq!(after, before, "the capability did not travel");
        assert!(
            device.read(|c| c.is_pending(2)),
            "the masked fire's pending bit"
        );
        irq.resume().unwrap();
        let (_, events) = device.update(|c, fx| c.config_write(0x10, &0u32.to_le_bytes(), fx));
        assert!(events.is_empty());
        target
            .wait_isr(Some(0), 0x72, WAIT)
            .expect("the pending masked vector was lost");
        device.fire(3).unwrap();
        target.wait_isr(Some(0), 0x73, WAIT).expect("vector 3");
        target.control(0);
        assert_eq!(target.count(0, 0x72), 1);
    }
);

on_every_machine!(
    a_restored_interrupt_group_keeps_its_sources_and_what_waited,
    one_vcpu,
    |m: &dyn Machine, mode: Mode| {
        use vmirq::{InterruptGroup, InterruptSourceConfig};
        let cfg = |v: u8| InterruptSourceConfig::Msi {
            msg: msi(v),
            devid: None,
        };
        let group = InterruptGroup::new(m.interrupts(), 2).unwrap();
        group.update(0, cfg(0x80), false).unwrap();
        group.update(1, cfg(0x81), true).unwrap();
        group.enable().unwrap();
        group.trigger(0).unwrap();
        m.wait_isr(Some(0), 0x80, WAIT).expect("source 0");
        m.interrupts().pause();
        group.trigger(1).unwrap(); // masked: waits in its notifier
        let snapshot = save(m, &[("dev/group", &group)]);

        let target = boot_another(m, &one_vcpu(mode).restored_from(snapshot)).unwrap();
        let restored = target.take_restored().unwrap();
        let group = restored.group("dev/group", None).unwrap();
        let irq = restored.finish().unwrap();
        irq.resume().unwrap();
        target.control(0);
        assert_eq!(target.count(0, 0x81), 0, "a masked source delivered");
        group.update(1, cfg(0x81), false).unwrap();
        target
            .wait_isr(Some(0), 0x81, WAIT)
            .expect("the masked source's signal was lost");
        group.trigger(0).unwrap();
        target
            .wait_isr(Some(0), 0x80, WAIT)
            .expect("source 0 after restore");
        target.control(0);
        assert_eq!(target.count(0, 0x81), 1);
    }
);
