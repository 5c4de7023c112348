//! MSI and MSI-X vectors wired to the interrupt path, allocated lazily and one at a time.
//!
//! [`Vectors`] owns a capability model ([`MsixTable`] or [`MsiCapability`]) and, per vector,
//! the eventfd the device signals. Enabling allocates nothing. A vector gets its GSI, route and
//! kernel irqfd when it first becomes deliverable with a valid message, keeps its GSI while
//! masked (only the irqfd goes), and gives everything back when the capability is disabled,
//! reset, or the device dropped. Adding a vector never touches an active one (Linux 6.5
//! vfio-pci dynamic allocation; REFERENCE §4).
//!
//! Masking loses nothing: while a vector has no irqfd its eventfd keeps counting, and the count
//! becomes the pending bit when the guest reads the PBA or unmasks (the eventfd is the pending
//! state's source of truth; peers lost interrupts by deleting the route instead, REFERENCE §7).
//! Ordering with KVM (Cloud Hypervisor #3827): on mask the irqfd goes first, and routes never
//! change on mask; on unmask the route is committed before the irqfd is assigned, and the
//! kernel injects any count left in the eventfd at assign.
//!
//! Every operation's route changes go to the backend in one commit, so a guest clearing the
//! function mask over 2048 unmasked entries costs one `KVM_SET_GSI_ROUTING`, not 2048.
//! Host failures (GSI exhaustion, a refused commit or irqfd) leave the vector pending and are
//! returned as [`MsixEvent`]s for the VMM: defined, visible, never a silent loss.
//!
//! Locking: the device's config lock (`inner`) guards the model and the vectors' routes and
//! irqfds, so the guest's accesses to one device's table are handled one at a time, as its
//! config space is; a guest's table write holds it across the route commit and `KVM_IRQFD`.
//! The trigger side never takes it: each vector's eventfd lives outside it, so a device's
//! `fire` or a producer's write never waits behind a table write or a commit. Lock order:
//! `inner`, then the router's writer.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{MsiCapability, MsixTable, VectorEffects};
use crate::gsi::GsiRoute;
use crate::interrupts::{Error, Interrupts};
use crate::irqfd::{eventfd_id, EdgeIrqfd, EventfdId};
use crate::msi::MsiMessage;
use crate::route::Route;
use crate::router::lock;

mod snapshot;
pub use snapshot::{MsiState, MsixState, VectorState};

/// The part of a capability model the vector manager needs.
pub trait VectorTable: Send {
    /// How many vectors the device has (capacity, enabled or not).
    fn capacity(&self) -> u16;
    /// The vector's message as programmed, if the vector exists (and is enabled, for MSI).
    fn message(&self, vector: u16) -> Option<MsiMessage>;
    /// Not deliverable now (masked, function-masked or disabled).
    fn is_masked(&self, vector: u16) -> bool;
    /// The vector's pending bit.
    fn is_pending(&self, vector: u16) -> bool;
    /// Sets or clears the vector's pending bit.
    fn set_pending(&mut self, vector: u16, pending: bool);
}

/// Both capability models expose the trait's operations as inherent methods.
macro_rules! vector_table {
    ($model:ty, $capacity:expr) => {
        impl VectorTable for $model {
            fn capacity(&self) -> u16 {
                $capacity(self)
            }
            fn message(&self, vector: u16) -> Option<MsiMessage> {
                <$model>::message(self, vector)
            }
            fn is_masked(&self, vector: u16) -> bool {
                <$model>::is_masked(self, vector)
            }
            fn is_pending(&self, vector: u16) -> bool {
                <$model>::is_pending(self, vector)
            }
            fn set_pending(&mut self, vector: u16, pending: bool) {
                <$model>::set_pending(self, vector, pending)
            }
        }
    };
}

vector_table!(MsixTable, MsixTable::vectors);
// MSI: up to 32 vectors; the enabled count (MME) can change while vectors exist.
vector_table!(MsiCapability, |_: &MsiCapability| 32);

/// Errors from the device-facing API.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MsixError {
    /// A vector's eventfd could not be created or used.
    #[error("cannot create the eventfd for vector {vector}: {source}")]
    Eventfd {
        /// The vector.
        vector: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The table and the PBA the device declares overlap.
    #[error("the MSI-X table (offset {table:#x}) and PBA (offset {pba:#x}) overlap")]
    Layout {
        /// Table offset in the BAR.
        table: u64,
        /// PBA offset in the BAR.
        pba: u64,
    },
    /// The device has no such vector.
    #[error("the device has no vector {0}")]
    NoSuchVector(u16),
    /// Tags change only while masked.
    #[error("vector {0} is unmasked: its tag may change only while it is masked")]
    TagWhileUnmasked(u16),
}

/// What the VMM must hear about after a guest access: the host could not give a vector what
/// it needs. The vector stays pending (its eventfd keeps counting, its PBA bit shows it) until
/// it is unmasked again or [`Vectors::retry`] succeeds.
#[derive(Debug)]
#[non_exhaustive]
pub enum MsixEvent {
    /// No GSI, a refused route commit, or a refused irqfd.
    AllocationFailed {
        /// The vector.
        vector: u16,
        /// What the host refused.
        error: Error,
    },
    /// The guest unmasked a vector whose message is not an x86 interrupt message.
    InvalidMessage {
        /// The vector.
        vector: u16,
        /// Its message.
        message: MsiMessage,
    },
}

/// The producer side of a vector: the device (or VFIO, vhost) signals it to raise the vector.
struct Trigger {
    fd: EventFd,
    /// The eventfd's identity, read once (at first bind).
    id: OnceLock<EventfdId>,
}

#[derive(Default)]
struct Vector {
    /// Opaque per-vector tag (IMS-style PASID), settable only while masked.
    tag: Option<u64>,
    /// The GSI and its route's message, from first deliverable use until release.
    route: Option<(GsiRoute, MsiMessage)>,
    /// Present exactly while the vector is deliverable and routed.
    irqfd: Option<EdgeIrqfd>,
}

struct Inner<T> {
    table: T,
    vectors: Vec<Vector>,
}

/// Where the MSI-X table and PBA sit in the device's BAR (PCI 3.0 §6.8.2.4-5: the device
/// declares both offsets; they may be anywhere that does not overlap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixLayout {
    /// Offset of the table in the BAR.
    pub table: u64,
    /// Offset of the PBA in the BAR.
    pub pba: u64,
}

/// A device's vectors on the interrupt path. See the module docs.
///
/// ```
/// use std::sync::Arc;
/// use vmirq::msix::{MsixTable, MsixVectors};
/// use vmirq::{Interrupts, IrqchipMode, SimBackend, X86Msi};
///
/// let sim = SimBackend::new(1, IrqchipMode::Kernel);
/// let irq = Interrupts::new(sim.clone(), Default::default())?;
/// let msix = MsixVectors::new(Arc::clone(&irq), MsixTable::new(4))?;
/// msix.write_message_control(1 << 15);               // config space: enable
/// let msg = X86Msi::fixed(0, 0x60).encode()?;        // the guest programs entry 2...
/// msix.bar_write(2 * 16, &msg.address_lo().to_le_bytes());
/// msix.bar_write(2 * 16 + 8, &msg.data.to_le_bytes());
/// msix.fire(2)?;                                     // ...fires while it is still masked...
/// sim.run_until_idle();
/// assert_eq!(sim.count(0, 0x60), 0);
/// let events = msix.bar_write(2 * 16 + 12, &0u32.to_le_bytes());   // ...and unmasks it
/// assert!(events.is_empty());                        // GSI, route and irqfd: no host failure
/// sim.run_until_idle();
/// assert_eq!(sim.count(0, 0x60), 1);                 // the masked fire, delivered once
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Vectors<T: VectorTable> {
    interrupts: Arc<Interrupts>,
    /// Immutable after construction: the trigger side takes no lock.
    triggers: Box<[Trigger]>,
    inner: Mutex<Inner<T>>,
    layout: Option<MsixLayout>,
}

/// MSI-X vectors.
pub type MsixVectors = Vectors<MsixTable>;
/// MSI vectors.
pub type MsiVectors = Vectors<MsiCapability>;

impl<T: VectorTable> Vectors<T> {
    /// Wraps `table` (in its reset state); creates one eventfd per vector, nothing else.
    pub fn new(interrupts: Arc<Interrupts>, table: T) -> Result<Self, MsixError> {
        let triggers = (0..table.capacity())
            .map(|vector| {
                Ok(Trigger {
                    fd: EventFd::new(EFD_NONBLOCK)
                        .map_err(|source| MsixError::Eventfd { vector, source })?,
                    id: OnceLock::new(),
                })
            })
            .collect::<Result<_, MsixError>>()?;
        let vectors = (0..table.capacity()).map(|_| Vector::default()).collect();
        Ok(Self {
            interrupts,
            triggers,
            inner: Mutex::new(Inner { table, vectors }),
            layout: None,
        })
    }

    /// A handle on vector `vector`'s eventfd, for the producer to signal.
    pub fn trigger(&self, vector: u16) -> Result<EventFd, MsixError> {
        self.on_trigger(vector, EventFd::try_clone)
    }

    /// Raises vector `vector` (as the device would through its eventfd). Lock-free: never waits
    /// behind a guest's table write or a route commit.
    pub fn fire(&self, vector: u16) -> Result<(), MsixError> {
        self.on_trigger(vector, |fd| fd.write(1))
    }

    /// Runs `op` on vector `vector`'s eventfd.
    fn on_trigger<R>(
        &self,
        vector: u16,
        op: impl FnOnce(&EventFd) -> std::io::Result<R>,
    ) -> Result<R, MsixError> {
        let t = self
            .triggers
            .get(usize::from(vector))
            .ok_or(MsixError::NoSuchVector(vector))?;
        op(&t.fd).map_err(|source| MsixError::Eventfd { vector, source })
    }

    /// Sets the opaque tag of a masked vector (refused while it is deliverable).
    pub fn set_tag(&self, vector: u16, tag: Option<u64>) -> Result<(), MsixError> {
        let mut inner = lock(&self.inner);
        if usize::from(vector) >= inner.vectors.len() {
            return Err(MsixError::NoSuchVector(vector));
        }
        if !inner.table.is_masked(vector) {
            return Err(MsixError::TagWhileUnmasked(vector));
        }
        inner.vectors[usize::from(vector)].tag = tag;
        Ok(())
    }

    /// The vector's tag, for producers.
    pub fn tag(&self, vector: u16) -> Result<Option<u64>, MsixError> {
        lock(&self.inner)
            .vectors
            .get(usize::from(vector))
            .map(|v| v.tag)
            .ok_or(MsixError::NoSuchVector(vector))
    }

    /// Vectors holding a GSI now.
    pub fn routed_vectors(&self) -> usize {
        lock(&self.inner)
            .vectors
            .iter()
            .filter(|v| v.route.is_some())
            .count()
    }

    /// Reads the model.
    pub fn read<R>(&self, op: impl FnOnce(&T) -> R) -> R {
        op(&lock(&self.inner).table)
    }

    /// Runs a guest access on the model and carries out what it changed (one route commit).
    pub fn update<R>(
        &self,
        op: impl FnOnce(&mut T, &mut VectorEffects) -> R,
    ) -> (R, Vec<MsixEvent>) {
        // Lock order: the device's config lock, then the router's writer (in apply's batch).
        let mut inner = lock(&self.inner);
        let mut fx = VectorEffects::default();
        let r = op(&mut inner.table, &mut fx);
        let events = self.apply(&mut inner, fx);
        (r, events)
    }

    /// Turns the counts of `range`'s undelivered vectors into pending bits (before the guest
    /// reads them).
    pub fn latch(&self, range: Range<u16>) {
        let mut inner = lock(&self.inner);
        self.latch_locked(&mut inner, range);
    }

    /// Tries again to give deliverable but unrouted vectors (after an [`MsixEvent`]) their
    /// GSI, route and irqfd.
    pub fn retry(&self) -> Vec<MsixEvent> {
        let mut inner = lock(&self.inner);
        let stuck: Vec<u16> = (0..inner.table.capacity())
            .filter(|&v| !inner.table.is_masked(v) && inner.vectors[usize::from(v)].irqfd.is_none())
            .collect();
        let fx = VectorEffects {
            unmasked: stuck,
            ..VectorEffects::default()
        };
        self.apply(&mut inner, fx)
    }

    fn latch_locked(&self, inner: &mut Inner<T>, range: Range<u16>) {
        let end = range.end.min(inner.table.capacity());
        for v in range.start..end {
            let vector = &inner.vectors[usize::from(v)];
            // A count left in an eventfd nobody injects from is a pending interrupt.
            if vector.irqfd.is_none() && self.triggers[usize::from(v)].fd.read().is_ok() {
                inner.table.set_pending(v, true);
            }
        }
    }

    fn apply(&self, inner: &mut Inner<T>, fx: VectorEffects) -> Vec<MsixEvent> {
        let mut events = Vec::new();
        if fx.disabled || fx.reset {
            release(&self.interrupts, &mut inner.vectors);
            if fx.reset {
                // The old life's counts are not the new life's interrupts.
                for t in self.triggers.iter() {
                    let _ = t.fd.read();
                }
            } else {
                self.latch_all(inner);
            }
        }
        // Mask: the irqfd goes first; the route stays (nothing to re-route on unmask).
        for v in fx.masked {
            if let Some(vector) = inner.vectors.get_mut(usize::from(v)) {
                vector.irqfd = None;
            }
        }
        let mut wanted: Vec<u16> = fx.unmasked.clone();
        wanted.extend(fx.message_changed.iter().copied());
        wanted.sort_unstable();
        wanted.dedup();
        wanted.retain(|&v| v < inner.table.capacity() && !inner.table.is_masked(v));
        // Vectors the host cannot serve now: they stop delivering (no irqfd: their fires count
        // in the eventfd and show in the PBA), and a retry or the next unmask tries again.
        let mut stuck: Vec<u16> = Vec::new();
        // Allocate GSIs for first use, then one batch for every route that must change.
        let mut fresh: Vec<(u16, GsiRoute, MsiMessage)> = Vec::new();
        let mut changed: Vec<(u16, MsiMessage)> = Vec::new();
        for &v in &wanted {
            let Some(message) = inner.table.message(v) else {
                continue;
            };
            if message.decode().is_err() {
                stuck.push(v);
                events.push(MsixEvent::InvalidMessage { vector: v, message });
                continue;
            }
            match &inner.vectors[usize::from(v)].route {
                Some((_, m)) if *m == message => {}
                Some(_) => changed.push((v, message)),
                None => match self.interrupts.allocate_route() {
                    Ok(gsi) => fresh.push((v, gsi, message)),
                    Err(error) => {
                        stuck.push(v);
                        events.push(MsixEvent::AllocationFailed { vector: v, error });
                    }
                },
            }
        }
        if !fresh.is_empty() || !changed.is_empty() {
            if let Err(e) = self.commit_routes(inner, &fresh, &changed) {
                // Nothing was published: no vector of this batch got its new route. A changed
                // vector keeps its old route but must not deliver the old message.
                tracing::warn!("MSI vectors: route commit failed: {e}");
                for v in fresh
                    .drain(..)
                    .map(|(v, _, _)| v)
                    .chain(changed.drain(..).map(|(v, _)| v))
                {
                    stuck.push(v);
                    events.push(MsixEvent::AllocationFailed {
                        vector: v,
                        error: e.duplicate(),
                    });
                }
            }
        }
        for (v, gsi, message) in fresh {
            inner.vectors[usize::from(v)].route = Some((gsi, message));
        }
        for (v, message) in changed {
            if let Some((_, m)) = &mut inner.vectors[usize::from(v)].route {
                *m = message;
            }
        }
        for &v in &stuck {
            inner.vectors[usize::from(v)].irqfd = None;
            self.latch_locked(inner, v..v + 1);
        }
        // Every deliverable, routed vector without an irqfd gets one: newly unmasked ones, and
        // ones whose first valid message arrived while unmasked.
        for v in wanted.into_iter().filter(|v| !stuck.contains(v)) {
            if let Err(error) = self.activate(inner, v) {
                self.latch_locked(inner, v..v + 1);
                events.push(MsixEvent::AllocationFailed { vector: v, error });
            }
        }
        events
    }

    fn commit_routes(
        &self,
        inner: &Inner<T>,
        fresh: &[(u16, GsiRoute, MsiMessage)],
        changed: &[(u16, MsiMessage)],
    ) -> Result<(), Error> {
        let mut batch = self.interrupts.routes();
        for (_, route, message) in fresh {
            batch.set(route, Route::msi(*message))?;
        }
        for (v, message) in changed {
            if let Some((route, _)) = &inner.vectors[usize::from(*v)].route {
                batch.set(route, Route::msi(*message))?;
            }
        }
        batch.commit()?;
        Ok(())
    }

    /// A routed vector became deliverable: deliver what it latched, then hand its eventfd to
    /// the kernel (which injects whatever counted since).
    fn activate(&self, inner: &mut Inner<T>, v: u16) -> Result<(), Error> {
        let Some(vector) = inner.vectors.get(usize::from(v)) else {
            return Ok(());
        };
        if inner.table.is_masked(v) {
            // Unmasked and masked again within one batch.
            return Ok(());
        }
        let (Some((_, message)), None) = (&vector.route, &vector.irqfd) else {
            return Ok(());
        };
        let message = *message;
        self.latch_locked(inner, v..v + 1);
        if inner.table.is_pending(v) {
            self.interrupts.signal_msi(message)?;
            inner.table.set_pending(v, false);
        }
        let trigger = &self.triggers[usize::from(v)];
        let id = match trigger.id.get() {
            Some(id) => *id,
            None => {
                let id = eventfd_id(trigger.fd.as_raw_fd())?;
                *trigger.id.get_or_init(|| id)
            }
        };
        let vector = &mut inner.vectors[usize::from(v)];
        if let Some((route, _)) = &vector.route {
            vector.irqfd = Some(route.assign_known(&trigger.fd, id)?);
        }
        Ok(())
    }

    /// After a disable: counts left in the eventfds become pending bits, which survive a
    /// disable as in QEMU (msix.c treats disabled as one more mask) and are delivered when the
    /// vector is deliverable again.
    fn latch_all(&self, inner: &mut Inner<T>) {
        let all = 0..inner.table.capacity();
        self.latch_locked(inner, all);
    }
}

/// Drops every vector's irqfd, then releases all their routes in one commit.
fn release(interrupts: &Interrupts, vectors: &mut [Vector]) {
    for vector in vectors.iter_mut() {
        vector.irqfd = None;
    }
    let routes = vectors
        .iter_mut()
        .filter_map(|v| v.route.take())
        .map(|(route, _)| route);
    if let Err(e) = interrupts.release_routes(routes) {
        tracing::warn!("MSI vectors: releasing routes failed: {e}");
    }
}

impl<T: VectorTable> Drop for Vectors<T> {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        release(&self.interrupts, &mut inner.vectors);
    }
}

/// The MSI-X BAR as a device embeds it: by default the table at offset 0 and the PBA at the
/// next 4 KiB boundary after it; [`MsixVectors::with_layout`] takes any placement the device
/// declares. Devices that put the table and the PBA in different BARs call the `table_*` and
/// `pba_read` accessors with offsets relative to each structure.
impl MsixVectors {
    /// Vectors of `table` with the table and PBA where the device declares them (offsets in
    /// one BAR). Refused if they overlap.
    pub fn with_layout(
        interrupts: Arc<Interrupts>,
        table: MsixTable,
        layout: MsixLayout,
    ) -> Result<Self, MsixError> {
        let (t, p) = (
            layout.table..layout.table.saturating_add(table.table_bytes()),
            layout.pba..layout.pba.saturating_add(table.pba_bytes()),
        );
        if t.start < p.end && p.start < t.end {
            return Err(MsixError::Layout {
                table: layout.table,
                pba: layout.pba,
            });
        }
        let mut vectors = Self::new(interrupts, table)?;
        vectors.layout = Some(layout);
        Ok(vectors)
    }

    /// Where the table and the PBA sit in the BAR.
    pub fn layout(&self) -> MsixLayout {
        self.layout.unwrap_or_else(|| MsixLayout {
            table: 0,
            pba: self.read(|t| t.table_bytes().next_multiple_of(4096)),
        })
    }

    /// Offset of the PBA in the BAR.
    pub fn pba_offset(&self) -> u64 {
        self.layout().pba
    }

    /// Bytes the BAR must decode (both structures, each rounded up to 4 KiB).
    pub fn bar_size(&self) -> u64 {
        let l = self.layout();
        let (table, pba) = self.read(|t| (t.table_bytes(), t.pba_bytes()));
        (l.table + table)
            .next_multiple_of(4096)
            .max((l.pba + pba).next_multiple_of(4096))
    }

    /// A guest read in the BAR. PBA reads first latch the counts of the vectors they cover;
    /// bytes that are neither table nor PBA read as zero.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
        let l = self.layout();
        let table = self.read(|t| t.table_bytes());
        if let Some(off) = offset.checked_sub(l.table).filter(|o| *o < table) {
            self.table_read(off, data);
        } else if let Some(off) = offset.checked_sub(l.pba) {
            self.pba_read(off, data);
        } else {
            data.fill(0);
        }
    }

    /// A guest write in the BAR (the PBA is read-only).
    pub fn bar_write(&self, offset: u64, data: &[u8]) -> Vec<MsixEvent> {
        let l = self.layout();
        let table = self.read(|t| t.table_bytes());
        match offset.checked_sub(l.table).filter(|o| *o < table) {
            Some(off) => self.table_write(off, data),
            None => Vec::new(),
        }
    }

    /// A guest read of the table, `offset` relative to the table's start.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        self.read(|t| t.table_read(offset, data));
    }

    /// A guest write of the table, `offset` relative to the table's start.
    pub fn table_write(&self, offset: u64, data: &[u8]) -> Vec<MsixEvent> {
        self.update(|t, fx| t.table_write(offset, data, fx)).1
    }

    /// A guest read of the PBA, `offset` relative to the PBA's start. Latches the counts of the
    /// vectors it covers first.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let first = (offset / 8).saturating_mul(64).min(u64::from(u16::MAX)) as u16;
        let mut inner = lock(&self.inner);
        self.latch_locked(&mut inner, first..first.saturating_add(64));
        inner.table.pba_read(offset, data);
    }

    /// Several table writes carried out as one batch (a VMM draining coalesced MMIO, or
    /// restoring a device): one route commit for all of them. Offsets are in the BAR.
    pub fn bar_write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<MsixEvent> {
        let l = self.layout();
        self.update(|t, fx| {
            let table = t.table_bytes();
            for (offset, data) in writes {
                if let Some(off) = offset.checked_sub(l.table).filter(|o| *o < table) {
                    t.table_write(off, data, fx);
                }
            }
        })
        .1
    }

    /// A guest write of the message control register (config space).
    pub fn write_message_control(&self, value: u16) -> Vec<MsixEvent> {
        self.update(|t, fx| t.write_message_control(value, fx)).1
    }
}
