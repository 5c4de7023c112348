//! Restoring a snapshot a caller hands over (a migration stream from another host): any bytes
//! through the checked encoding, or any JSON body straight to `Interrupts::restore` (past the
//! checksum, so every value reaches the validation), then every object taken back by its
//! kind, the restore finished and the VM resumed. Invariants: no panic; every refusal is a
//! typed error; nothing left running after the objects drop.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmirq::snapshot::ObjectState;
use vmirq::{Config, GsiRoute, Interrupts, IrqchipMode, SimBackend, Snapshot};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|input: (bool, &[u8])| {
    let (encoded, data) = input;
    let snapshot = if encoded {
        Snapshot::from_bytes(data)
    } else {
        serde_json::from_slice::<Snapshot>(data).map_err(|_| vmirq::SnapshotError::NotASnapshot)
    };
    let Ok(snapshot) = snapshot else { return };
    // A target VM of the snapshot's mode, within reason (else the mode check refuses it).
    let mode = match snapshot.core.mode {
        IrqchipMode::Split { ioapic_pins } if ioapic_pins <= 120 => snapshot.core.mode,
        IrqchipMode::Split { .. } => IrqchipMode::Split { ioapic_pins: 24 },
        IrqchipMode::Kernel => IrqchipMode::Kernel,
    };
    let sim = SimBackend::new(2, mode);
    let keys: Vec<(String, ObjectState)> = snapshot
        .objects
        .iter()
        .map(|(k, o)| (k.clone(), o.clone()))
        .collect();
    let Ok(restored) = Interrupts::restore(sim.clone(), Config::default(), snapshot) else {
        return;
    };
    let irq = Arc::clone(restored.interrupts());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut routes: Vec<GsiRoute> = Vec::new();
    for (key, object) in &keys {
        if let ObjectState::Route { .. } = object {
            if let Ok(r) = restored.route(key) {
                routes.push(r);
            }
        }
    }
    let fd = || EventFd::new(EFD_NONBLOCK).unwrap();
    let mut kept: Vec<Box<dyn std::any::Any>> = Vec::new();
    for (key, object) in &keys {
        match object {
            ObjectState::Irqfd(_) => {
                let Ok(state) = restored.irqfd(key) else { continue };
                let (trigger, resample) = (fd(), fd());
                let on_route = routes.iter().find(|r| r.gsi() == state.gsi);
                let bound = match (on_route, state.level) {
                    (Some(r), false) => r.restore_irqfd(&trigger, &state).map(|i| Box::new(i) as Box<dyn std::any::Any>),
                    (Some(r), true) => r
                        .restore_level_irqfd(&trigger, &resample, &state)
                        .map(|i| Box::new(i) as Box<dyn std::any::Any>),
                    (None, level) => match irq.pin(state.gsi.raw()) {
                        Ok(pin) if level => pin
                            .restore_level_irqfd(&trigger, &resample, &state)
                            .map(|i| Box::new(i) as Box<dyn std::any::Any>),
                        Ok(pin) => pin
                            .restore_irqfd(&trigger, &state)
                            .map(|i| Box::new(i) as Box<dyn std::any::Any>),
                        Err(e) => Err(e),
                    },
                };
                if let Ok(b) = bound {
                    kept.push(b);
                }
                kept.push(Box::new((trigger, resample)));
            }
            ObjectState::Msix(_) => {
                if let Ok((m, _)) = restored.msix(key) {
                    m.fire(0).ok();
                    kept.push(Box::new(m));
                }
            }
            ObjectState::Msi(_) => {
                if let Ok((m, _)) = restored.msi(key, None) {
                    m.fire(0).ok();
                    kept.push(Box::new(m));
                }
            }
            ObjectState::Group(_) => {
                if let Ok(g) = restored.group(key, None) {
                    g.trigger(0).ok();
                    kept.push(Box::new(g));
                }
            }
            ObjectState::Xen(_) => {
                if let Ok(x) = restored.xen(key, mem.clone(), 2) {
                    kept.push(Box::new(x));
                }
            }
            ObjectState::Source(_) => {
                let Ok(state) = restored.source(key) else { continue };
                let line = match routes.iter().find(|r| r.gsi() == state.gsi) {
                    Some(r) => r.line(),
                    None => irq.pin(state.gsi.raw()).and_then(|p| p.line()),
                };
                if let Ok(Ok(source)) = line.map(|l| l.restore_source(&state)) {
                    kept.push(Box::new(source));
                }
            }
            _ => {}
        }
    }
    if let Ok(irq) = restored.finish() {
        let _ = irq.resume();
        sim.run_until_idle();
    }
    drop(kept);
    drop(routes);
});
