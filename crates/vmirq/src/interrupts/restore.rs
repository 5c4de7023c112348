//! Saving a VM's interrupts into a [`Snapshot`] and restoring them into a fresh VM.
//!
//! The order a VMM follows (the REFERENCE's restore order: routes before the irqchip state,
//! the vCPUs' LAPICs before anything can inject):
//!
//! 1. source: stop the vCPUs and devices, [`Interrupts::pause`], [`Interrupts::save`], then
//!    [`Snapshot::insert`] each object it holds, under its own names;
//! 2. target: create the VM and its vCPUs and restore their state (LAPICs included), then
//!    [`Interrupts::restore`] (paused, routes committed, IOAPIC restored without delivering);
//!    take every object back by name ([`Restored::route`], [`Restored::irqfd`], then
//!    `restore_irqfd` on its GSI with the VMM's eventfd); [`Restored::finish`];
//! 3. [`Interrupts::resume`], then run the vCPUs: level pins that should deliver do, and
//!    every signal that waited unserved at save is delivered, once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{Config, Error, Interrupts};
use crate::backend::Backend;
use crate::gsi::GsiRoute;
use crate::ioapic::Ioapic;
use crate::irqfd::duplicate;
use crate::msix::{MsixEvent, MsixVectors};
use crate::route::Gsi;
use crate::router::{dynamic_gsis, lock, GsiLease};
use crate::snapshot::{
    CoreState, IrqfdState, ObjectState, Objects, Snapshot, SnapshotError, VERSION,
};

impl Interrupts {
    /// The core's state: GSI leases, their routes and the userspace IOAPIC. Needs the
    /// userspace path paused ([`Interrupts::pause`]) so that nothing changes under it; add the
    /// VMM's objects with [`Snapshot::insert`].
    pub fn save(&self) -> Result<Snapshot, Error> {
        if !self.is_paused() {
            return Err(SnapshotError::NotPaused.into());
        }
        // Every field named: a new one must be saved here or said to be runtime-only.
        let Interrupts {
            delivery,
            // Runtime: re-created by the target; its waiting signals are saved by the irqfds.
            dispatcher: _,
            // Runtime: rebuilt as the VMM binds its eventfds again.
            irqfds: _,
            // Only a restored VM has these, until its resume.
            on_resume: _,
            evaluate_at_resume: _,
        } = self;
        // GSIs whose last lease went are reclaimed first, so only live leases are saved.
        delivery.router.flush_released()?;
        let allocated = delivery.router.leased();
        let table = delivery.router.load();
        let routes = allocated
            .iter()
            .map(|gsi| (*gsi, table.get(*gsi).to_vec()))
            .filter(|(_, routes)| !routes.is_empty())
            .collect();
        let (ioapic, lines) = delivery.save_state();
        Ok(Snapshot {
            version: VERSION,
            core: CoreState {
                mode: self.mode(),
                allocated,
                routes,
                ioapic,
                kernel_irqchip: self.backend().save_irqchip()?,
                lines,
            },
            objects: BTreeMap::new(),
        })
    }

    /// The interrupts of a fresh VM (`backend`, with no interrupt state yet) as `snapshot`
    /// saved them, paused: the GSIs leased again and their routes committed, the userspace
    /// IOAPIC restored without delivering. Take the VMM's objects back from the returned
    /// [`Restored`], then [`Restored::finish`] and [`Interrupts::resume`].
    ///
    /// Everything is checked before the backend is touched: a snapshot of a newer version,
    /// of another irqchip mode, leasing GSIs outside `config`'s range, routing a GSI it does
    /// not lease, or holding register values no IOAPIC can hold is refused with
    /// [`Error::Snapshot`], and the target VM is left untouched.
    pub fn restore(
        backend: Arc<dyn Backend>,
        config: Config,
        snapshot: Snapshot,
    ) -> Result<Restored, Error> {
        let Snapshot {
            version: _,
            core,
            objects,
        } = snapshot.migrate()?;
        let CoreState {
            mode,
            allocated,
            routes,
            ioapic,
            kernel_irqchip,
            lines,
        } = core;
        let target = backend.irqchip_mode();
        if mode != target {
            return Err(SnapshotError::ModeMismatch {
                saved: mode,
                target,
            }
            .into());
        }
        check_gsis(&allocated, &lines, &routes, &objects, &config, &target)?;
        if let Some(state) = &ioapic {
            Ioapic::new(target.ioapic_pins()).restore(state)?;
        }
        if let Some(chip) = kernel_irqchip
            .as_ref()
            .filter(|c| c.backend != backend.name())
        {
            return Err(SnapshotError::Invalid(format!(
                "in-kernel irqchip state of a {} VM for a {} VM",
                chip.backend,
                backend.name()
            ))
            .into());
        }
        let interrupts = Interrupts::new(backend, config)?;
        interrupts.pause();
        let leases = allocated
            .iter()
            .map(|gsi| {
                let lease = interrupts.router().claim(*gsi);
                // check_gsis proved each is in range and named once; a fresh VM has them free.
                lease
                    .map(|l| (*gsi, l))
                    .ok_or(SnapshotError::Invalid(format!(
                        "{gsi} is not free in the target VM"
                    )))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        interrupts.router().add_routes(&routes)?;
        if let Some(chip) = &kernel_irqchip {
            interrupts.backend().restore_irqchip(chip)?;
        }
        // Lines held high: the irqchip has their level (restored above); the sources the VMM
        // restores re-assert them without pushing anything.
        let lines = lines
            .iter()
            .map(|gsi| {
                let line = interrupts.delivery.level_line(*gsi)?;
                line.seed(true);
                Ok(line)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if let Some(state) = &ioapic {
            interrupts.delivery.restore_ioapic(state)?;
            interrupts.evaluate_at_resume.store(true, Ordering::Release);
        }
        Ok(Restored {
            interrupts,
            leases: Mutex::new(leases),
            objects: Objects::new(objects),
            lines,
        })
    }

    /// Signals `fd` at the next [`Interrupts::resume`] (now, if not paused).
    pub(crate) fn signal_at_resume(&self, fd: &EventFd) -> Result<(), Error> {
        let mut on_resume = lock(&self.on_resume);
        if self.is_paused() {
            on_resume.push(duplicate(fd)?);
            Ok(())
        } else {
            fd.write(1).map_err(|_| Error::BadEventFd)
        }
    }
}

/// Every leased GSI in the target's range and named once; routes and objects only on leased
/// GSIs or pins.
fn check_gsis(
    allocated: &[Gsi],
    lines: &[Gsi],
    routes: &[(Gsi, Vec<crate::Route>)],
    objects: &BTreeMap<String, ObjectState>,
    config: &Config,
    mode: &crate::IrqchipMode,
) -> Result<(), SnapshotError> {
    let range = dynamic_gsis(*mode, config.first_dynamic_gsi, config.gsi_limit);
    let mut seen = BTreeSet::new();
    for gsi in allocated {
        if !range.contains(&gsi.raw()) {
            return Err(SnapshotError::GsiOutOfRange {
                gsi: *gsi,
                first: range.start,
                limit: range.end,
            });
        }
        if !seen.insert(*gsi) {
            return Err(SnapshotError::Invalid(format!("{gsi} leased twice")));
        }
    }
    let pins = mode.ioapic_pins();
    let known = |gsi: &Gsi| seen.contains(gsi) || gsi.raw() < pins;
    if let Some(gsi) = lines.iter().find(|g| !known(g)) {
        return Err(SnapshotError::Invalid(format!(
            "a line on {gsi}, which the snapshot does not lease"
        )));
    }
    if let Some((gsi, _)) = routes.iter().find(|(gsi, _)| !seen.contains(gsi)) {
        return Err(SnapshotError::Invalid(format!(
            "a route for {gsi}, which the snapshot does not lease"
        )));
    }
    for (key, object) in objects {
        let gsis: Vec<Gsi> = match object {
            ObjectState::Route { gsi } => vec![*gsi],
            ObjectState::Irqfd(s) => vec![s.gsi],
            ObjectState::Msix(s) => s.vectors.iter().filter_map(|v| v.gsi).collect(),
            ObjectState::Msi(s) => s.vectors.iter().filter_map(|v| v.gsi).collect(),
            ObjectState::Group(g) => g.sources.iter().filter_map(|s| s.gsi).collect(),
            ObjectState::Xen(_) => Vec::new(),
            ObjectState::Source(s) => vec![s.gsi],
        };
        if let Some(gsi) = gsis.iter().find(|g| !known(g)) {
            return Err(SnapshotError::Invalid(format!(
                "object {key:?} is on {gsi}, which the snapshot does not lease"
            )));
        }
    }
    Ok(())
}

/// A restored VM's interrupts, paused, with the snapshot's objects waiting to be taken back
/// by name. GSIs whose route object is not taken back are freed at [`Restored::finish`].
pub struct Restored {
    interrupts: Arc<Interrupts>,
    leases: Mutex<BTreeMap<Gsi, GsiLease>>,
    objects: Objects,
    /// Lines restored high, held until [`Restored::finish`] settles them.
    lines: Vec<Arc<crate::Line>>,
}

impl Restored {
    /// The restored interrupts (paused until [`Interrupts::resume`]).
    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.interrupts
    }

    /// The [`GsiRoute`] saved under `key`, with its GSI and routes as they were.
    pub fn route(&self, key: &str) -> Result<GsiRoute, Error> {
        let gsi = self.objects.take(key, "a route", |o| match o {
            ObjectState::Route { gsi } => Some(*gsi),
            _ => None,
        })?;
        self.take_gsi(gsi)
    }

    /// The lease on `gsi`, as a route object (once).
    fn take_gsi(&self, gsi: Gsi) -> Result<GsiRoute, Error> {
        let lease = lock(&self.leases)
            .remove(&gsi)
            .ok_or_else(|| SnapshotError::Invalid(format!("two objects own {gsi}")))?;
        Ok(GsiRoute::new(Arc::clone(&self.interrupts), lease))
    }

    /// The MSI-X device saved under `key`: its table, PBA and tags as they were, each vector
    /// on its GSI, deliverable vectors with their irqfds (new eventfds: producers fetch them
    /// again with [`MsixVectors::trigger`]). A vector pending while deliverable is delivered
    /// at resume. The events say what the host could not give, as after a guest access.
    pub fn msix(&self, key: &str) -> Result<(MsixVectors, Vec<MsixEvent>), Error> {
        self.msix_on(key, None)
    }

    /// [`Restored::msix`] on the producers' existing eventfds (`triggers`, one per vector,
    /// clones of the source device's [`MsixVectors::trigger`]s): an in-process migration
    /// whose producers keep signalling the same eventfds. Counts still in them are delivered
    /// (or latched, for a masked vector), once.
    pub fn msix_on(
        &self,
        key: &str,
        triggers: Option<Vec<EventFd>>,
    ) -> Result<(MsixVectors, Vec<MsixEvent>), Error> {
        let state = self.objects.take(key, "MSI-X vectors", |o| match o {
            ObjectState::Msix(s) => Some(s.clone()),
            _ => None,
        })?;
        MsixVectors::restore(Arc::clone(&self.interrupts), &state, triggers, |gsi| {
            self.take_gsi(gsi)
        })
    }

    /// The state of the irqfd saved under `key`: bind it again on its GSI with
    /// [`GsiRoute::restore_irqfd`] / [`crate::IoapicPin::restore_irqfd`] (or the level
    /// variants), with the VMM's eventfd.
    pub fn irqfd(&self, key: &str) -> Result<IrqfdState, Error> {
        Ok(self.objects.take(key, "an irqfd", |o| match o {
            ObjectState::Irqfd(s) => Some(*s),
            _ => None,
        })?)
    }

    /// The MSI device saved under `key` (see [`Restored::msix`]; `triggers` as in
    /// [`Restored::msix_on`]).
    pub fn msi(
        &self,
        key: &str,
        triggers: Option<Vec<EventFd>>,
    ) -> Result<(crate::msix::MsiVectors, Vec<MsixEvent>), Error> {
        let state = self.objects.take(key, "MSI vectors", |o| match o {
            ObjectState::Msi(s) => Some(s.clone()),
            _ => None,
        })?;
        crate::msix::MsiVectors::restore(Arc::clone(&self.interrupts), &state, triggers, |gsi| {
            self.take_gsi(gsi)
        })
    }

    /// The interrupt group saved under `key`: sources configured, masked and enabled as they
    /// were, on their GSIs; `notifiers` are the producers' eventfds to keep (an in-process
    /// migration), else new ones (hand them out again with `InterruptGroup::notifier`).
    pub fn group(
        &self,
        key: &str,
        notifiers: Option<Vec<EventFd>>,
    ) -> Result<crate::InterruptGroup, Error> {
        let state = self.objects.take(key, "an interrupt group", |o| match o {
            ObjectState::Group(g) => Some(g.clone()),
            _ => None,
        })?;
        crate::InterruptGroup::restore(&self.interrupts, &state, notifiers, |gsi| {
            self.take_gsi(gsi)
        })
    }

    /// The Xen event channels saved under `key`, attached to the restored interrupts over the
    /// restored guest RAM `memory` of a VM with `vcpus` vCPUs (refused if the snapshot names
    /// more): ports, VIRQs, `vcpu_info` placement and the upcall configuration as they were,
    /// backend endpoints with new eventfds (in backend-port order).
    pub fn xen(
        &self,
        key: &str,
        memory: vm_memory::GuestMemoryMmap,
        vcpus: u32,
    ) -> Result<XenRestored, Error> {
        let state = self.objects.take(key, "Xen event channels", |o| match o {
            ObjectState::Xen(s) => Some(s.clone()),
            _ => None,
        })?;
        crate::xen::restore(&self.interrupts, memory, vcpus, &state)
    }

    /// The state of the level source saved under `key`: restore it on its line with
    /// [`crate::Line::restore_source`].
    pub fn source(&self, key: &str) -> Result<crate::snapshot::SourceState, Error> {
        Ok(self.objects.take(key, "a level source", |o| match o {
            ObjectState::Source(s) => Some(*s),
            _ => None,
        })?)
    }

    /// Ends the restore: every object must have been taken back (else
    /// [`SnapshotError::NotRestored`] names them and the restored VM is dropped); GSIs no
    /// route object claimed are freed. The interrupts stay paused.
    pub fn finish(self) -> Result<Arc<Interrupts>, Error> {
        let left = self.objects.left();
        if !left.is_empty() {
            return Err(SnapshotError::NotRestored(left).into());
        }
        // A line no restored source holds drops now.
        for line in &self.lines {
            line.settle();
        }
        let unclaimed = std::mem::take(&mut *lock(&self.leases));
        if !unclaimed.is_empty() {
            drop(unclaimed);
            self.interrupts.router().flush_released()?;
        }
        Ok(self.interrupts)
    }
}

impl std::fmt::Debug for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("left", &self.objects.left())
            .finish()
    }
}

/// Restored Xen event channels: the channels, their upcalls, the backend endpoints.
pub type XenRestored = (
    Arc<crate::xen::EventChannels>,
    Arc<crate::xen::Upcalls>,
    Vec<crate::xen::BackendPort>,
);

/// Checks that `state` is an irqfd of `level` kind on `gsi`, for a restore.
pub(crate) fn check_irqfd(state: &IrqfdState, gsi: Gsi, level: bool) -> Result<(), Error> {
    if state.gsi != gsi || state.level != level {
        let kind = |level| {
            if level {
                "a level irqfd"
            } else {
                "an edge irqfd"
            }
        };
        return Err(SnapshotError::IrqfdMismatch {
            saved: format!("{} on {}", kind(state.level), state.gsi),
            target: format!("{} on {gsi}", kind(level)),
        }
        .into());
    }
    Ok(())
}
