//! MSI-X and MSI devices in a snapshot: the capability model's registers, each vector's tag
//! and GSI, and whether a signal waited unserved; restored on a fresh VM's interrupts with
//! each vector back on its GSI and deliverable vectors given their irqfds.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{Inner, MsixEvent, MsixLayout, Trigger, Vector, VectorTable, Vectors};
use crate::gsi::GsiRoute;
use crate::interrupts::{Error, Interrupts};
use crate::msix::msi::MsiCapabilityState;
use crate::msix::{
    MsiCapability, MsiVectors, MsixTable, MsixTableState, MsixVectors, VectorEffects,
};
use crate::route::{Gsi, Route};
use crate::router::lock;
use crate::snapshot::{has_count, ObjectState, Save, SnapshotError};

/// An MSI-X device's vectors in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The function: message control, table, PBA (with every count nobody injected latched).
    pub table: MsixTableState,
    /// Where the device declared the table and PBA, if not the default.
    pub layout: Option<MsixLayout>,
    /// Per vector, vector 0 first.
    pub vectors: Vec<VectorState>,
}

/// An MSI device's vectors in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiState {
    /// The capability's registers (pending bits with every masked vector's count latched).
    pub capability: MsiCapabilityState,
    /// Per vector (32), vector 0 first.
    pub vectors: Vec<VectorState>,
}

/// One vector in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorState {
    /// Its tag.
    pub tag: Option<u64>,
    /// The GSI it holds (its route is in the core's state).
    pub gsi: Option<Gsi>,
    /// A signal waited unserved in its eventfd while it was deliverable (a user-path irqfd
    /// while paused): delivered at resume after restore.
    #[serde(default)]
    pub pending: bool,
}

impl<T: VectorTable> Vectors<T> {
    /// Latches every count nobody injects (a masked vector's becomes its pending bit, as a
    /// PBA read would), then gives the model to `save` and each vector's state.
    fn save_with<S>(&self, save: impl FnOnce(&T) -> S) -> (S, Vec<VectorState>) {
        let mut inner = lock(&self.inner);
        self.latch_all(&mut inner);
        let Inner { table, vectors } = &*inner;
        let states = vectors
            .iter()
            .zip(self.triggers.iter())
            .map(|(vector, trigger)| {
                let Vector { tag, route, irqfd } = vector;
                VectorState {
                    tag: *tag,
                    gsi: route.as_ref().map(|(r, _)| r.gsi()),
                    pending: irqfd.is_some() && has_count(&trigger.fd),
                }
            })
            .collect();
        (save(table), states)
    }

    /// The saved vectors on `self` (a device just built from the saved model): producers'
    /// `triggers` taken over if given, each GSI taken back through `lease`, deliverable
    /// vectors given their irqfds. A vector pending while deliverable is signalled at
    /// [`Interrupts::resume`], not now (unless its trigger still holds a count: that
    /// delivers by itself). Returns what the host could not give, as a guest access would.
    fn restore_vectors(
        mut self,
        interrupts: &Interrupts,
        saved: &[VectorState],
        triggers: Option<Vec<EventFd>>,
        mut lease: impl FnMut(Gsi) -> Result<GsiRoute, Error>,
        invalid: impl Fn(String) -> Error,
    ) -> Result<(Self, Vec<MsixEvent>), Error> {
        if saved.len() != self.triggers.len() {
            return Err(invalid(format!(
                "{} vector states for {} vectors",
                saved.len(),
                self.triggers.len()
            )));
        }
        if let Some(fds) = triggers {
            if fds.len() != self.triggers.len() {
                return Err(invalid(format!(
                    "{} trigger eventfds for {} vectors",
                    fds.len(),
                    self.triggers.len()
                )));
            }
            self.triggers = fds
                .into_iter()
                .map(|fd| Trigger {
                    fd,
                    id: OnceLock::new(),
                })
                .collect();
        }
        let mut deliverable = Vec::new();
        let mut inner = lock(&self.inner);
        for (v, state) in saved.iter().enumerate() {
            let vector = v as u16;
            inner.vectors[v].tag = state.tag;
            if let Some(gsi) = state.gsi {
                let route = lease(gsi)?;
                let message = match route.routes().as_slice() {
                    [Route::Msi { msg, .. }] => *msg,
                    _ => return Err(invalid(format!("vector {v}'s {gsi} has no MSI route"))),
                };
                inner.vectors[v].route = Some((route, message));
            }
            if inner.table.is_masked(vector) {
                continue;
            }
            if inner.table.is_pending(vector) || state.pending {
                inner.table.set_pending(vector, false);
                let fd = &self.triggers[v].fd;
                if !has_count(fd) {
                    interrupts.signal_at_resume(fd)?;
                }
            }
            deliverable.push(vector);
        }
        let fx = VectorEffects {
            unmasked: deliverable,
            ..VectorEffects::default()
        };
        let events = self.apply(&mut inner, fx);
        drop(inner);
        Ok((self, events))
    }
}

impl Save for MsixVectors {
    fn save(&self) -> ObjectState {
        let (table, vectors) = self.save_with(MsixTable::save);
        ObjectState::Msix(MsixState {
            table,
            layout: self.layout,
            vectors,
        })
    }
}

impl Save for MsiVectors {
    fn save(&self) -> ObjectState {
        let (capability, vectors) = self.save_with(MsiCapability::save);
        ObjectState::Msi(MsiState {
            capability,
            vectors,
        })
    }
}

impl MsixVectors {
    /// The device `state` saved, on the interrupts of a VM being restored (see
    /// [`crate::Restored::msix`]).
    pub(crate) fn restore(
        interrupts: Arc<Interrupts>,
        state: &MsixState,
        triggers: Option<Vec<EventFd>>,
        lease: impl FnMut(Gsi) -> Result<GsiRoute, Error>,
    ) -> Result<(Self, Vec<MsixEvent>), Error> {
        let invalid = |what: String| Error::from(SnapshotError::Invalid(format!("MSI-X: {what}")));
        let table = MsixTable::restore(&state.table).map_err(invalid)?;
        let made = match state.layout {
            Some(layout) => Self::with_layout(Arc::clone(&interrupts), table, layout),
            None => Self::new(Arc::clone(&interrupts), table),
        };
        let vectors = made.map_err(|e| invalid(e.to_string()))?;
        vectors.restore_vectors(&interrupts, &state.vectors, triggers, lease, invalid)
    }
}

impl MsiVectors {
    /// The device `state` saved, on the interrupts of a VM being restored (see
    /// [`crate::Restored::msi`]).
    pub(crate) fn restore(
        interrupts: Arc<Interrupts>,
        state: &MsiState,
        triggers: Option<Vec<EventFd>>,
        lease: impl FnMut(Gsi) -> Result<GsiRoute, Error>,
    ) -> Result<(Self, Vec<MsixEvent>), Error> {
        let invalid = |what: String| Error::from(SnapshotError::Invalid(format!("MSI: {what}")));
        let capability = MsiCapability::restore(&state.capability).map_err(invalid)?;
        let vectors =
            Self::new(Arc::clone(&interrupts), capability).map_err(|e| invalid(e.to_string()))?;
        vectors.restore_vectors(&interrupts, &state.vectors, triggers, lease, invalid)
    }
}
