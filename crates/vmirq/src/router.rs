//! The router: the published routing table, batched commits, and the GSI allocator.
//!
//! Readers (the userspace delivery path) load the current table through `arc-swap`: they never
//! block and never see half a table. Writers build a [`RouteBatch`] under the writer lock and
//! commit it with exactly one backend call; the table is published only after the backend took
//! it, so the kernel and userspace views never disagree about a committed table.
//!
//! GSIs are leased ([`GsiLease`]): the owning [`crate::GsiRoute`] holds one, and so does every
//! irqfd bound to it while it is bound. When the last lease goes, the GSI is queued; the next
//! commit removes its routes, and only after that commit can it be handed out again. So a GSI
//! is never reused while an irqfd still points at it, and a new owner never inherits a stale
//! kernel route (REFERENCE §7).
//!
//! # Locks
//!
//! `writer` guards the allocator and the table being built; it is never held across a
//! backend call. A batch is built under it and given a generation; the thread that finds no
//! commit in flight becomes the committer: it releases the lock, hands the newest built table
//! to the backend (`KVM_SET_GSI_ROUTING`), re-takes the lock, publishes, and repeats while
//! newer tables were built meanwhile. Other committers wait on a condition variable (holding
//! no lock) for their generation's outcome, so tables reach the hypervisor in the order they
//! were built, concurrent batches combine into one call, and nothing that only needs the lock
//! (allocation, an irqfd's bookkeeping) waits behind a hypervisor call. A refused table fails
//! every generation built on it and the table reverts to the one in force. No delivery path
//! takes `writer`: triggers, EOIs and level changes read the published table lock-free.
//! `released` is a leaf lock (a lease's drop takes only it). Lock order: `writer`, then
//! `released`; the IOAPIC's lock may be taken briefly inside `writer` to read the pins'
//! current messages, never the other way round.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use arc_swap::{ArcSwap, Guard};
use thiserror::Error;

use crate::backend::{Backend, BackendError, IrqchipMode, KernelRoute};
use crate::msi::MsiMessage;
use crate::route::{Gsi, IrqChip, Route, RouteError, RoutingTable, MAX_GSIS};

/// Errors from changing routes or allocating GSIs.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RouterError {
    /// The hypervisor refused the table; nothing was published.
    #[error("the hypervisor refused the routing table: {0}")]
    Backend(#[from] BackendError),
    /// Every allocatable GSI is leased.
    #[error("all {0} allocatable GSIs are in use")]
    GsiExhausted(u32),
    /// A kernel irqfd serves the GSI, and the hypervisor could not deliver the new route.
    #[error("{gsi} has a kernel irqfd, and its new route {route:?} is one the hypervisor cannot deliver; deassign the irqfd first")]
    KernelIrqfdCannotDeliver {
        /// The GSI.
        gsi: Gsi,
        /// The refused route.
        route: Route,
    },
    /// In the kernel irqchip mode, an IOAPIC pin with a level [`crate::Line`] would also be
    /// reached by a kernel edge irqfd, or by another GSI. KVM gives `KVM_IRQ_LINE` and irqfd
    /// pulses one source bit per pin, so the other's writes would drop the level a device
    /// holds. Edges on the line's own GSI are served through the line (user path).
    #[error("{gsi} would share IOAPIC pin {pin} with a level line, and KVM gives both one source bit (an edge would drop the level); bind edges to the line's own GSI on the user path")]
    SharedLineSource {
        /// The GSI whose change or binding was refused.
        gsi: Gsi,
        /// The shared pin.
        pin: u32,
    },
    /// The route object belongs to another VM's interrupts.
    #[error("{0} belongs to another VM's interrupts")]
    ForeignRoute(Gsi),
    /// The route breaks KVM's table rules.
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// State only writers touch, under [`Router::writer`].
struct Writer {
    table: RoutingTable,
    /// GSIs free for allocation, lowest first.
    free: BTreeSet<u32>,
    /// Split irqchip: the MSI each IOAPIC pin's redirection entry produces (its kernel route).
    pin_msis: Vec<Option<MsiMessage>>,
    /// GSIs served by kernel irqfds, with how many: their routes must stay deliverable by the
    /// hypervisor.
    kernel_irqfds: HashMap<u32, u32>,
    /// Kernel irqchip: of those, the edge irqfds (their pulses use KVM's userspace source ID).
    kernel_edges: HashMap<u32, u32>,
    /// Kernel irqchip: GSIs whose level line drives `KVM_IRQ_LINE` (the same source ID). A
    /// pin is reached by edges or by lines, never both (see [`RouterError::SharedLineSource`]).
    level_lines: HashSet<u32>,
    /// Generation of `table` (one per built batch).
    built: u64,
    /// The newest built table not yet handed to the backend.
    pending: Option<Pending>,
    /// Whether a thread is committing (in the backend, or about to be).
    committing: bool,
    /// Waiting committers' generations and, once known, their outcomes.
    waiting: HashMap<u64, Option<Result<(), RouterError>>>,
}

/// A built table waiting for the backend.
struct Pending {
    generation: u64,
    kernel: Vec<KernelRoute>,
    table: RoutingTable,
    /// GSIs whose routes this table removes: free once it is in force.
    reclaimed: Vec<u32>,
}

/// Owns the routing table of one VM.
pub(crate) struct Router {
    backend: Arc<dyn Backend>,
    mode: IrqchipMode,
    published: ArcSwap<RoutingTable>,
    writer: Mutex<Writer>,
    /// Signalled when a commit's outcome is known.
    committed: Condvar,
    /// GSIs whose last lease went; reclaimed (routes removed, then free) at the next commit.
    released: Arc<Mutex<Vec<u32>>>,
    allocatable: u32,
    /// The allocator's range: `first..limit`.
    range: std::ops::Range<u32>,
    /// Xen event channels are attached: an MSI encoding a PIRQ marks an event channel, which
    /// only vmirq can do, so such routes are not the hypervisor's to deliver.
    divert_pirqs: std::sync::atomic::AtomicBool,
    /// IOAPIC pins (below 64) whose GSI the guest mapped to a Xen PIRQ: their levels mark an
    /// event channel instead, so no kernel irqfd may reach them. Written under `writer`.
    diverted_pins: std::sync::atomic::AtomicU64,
}

/// The GSIs the allocator of a VM in `mode` hands out, for a configured first dynamic GSI
/// and limit: above the IOAPIC pins, at most [`MAX_GSIS`].
pub(crate) fn dynamic_gsis(
    mode: IrqchipMode,
    first_dynamic: u32,
    limit: u32,
) -> std::ops::Range<u32> {
    let limit = limit.min(MAX_GSIS);
    first_dynamic.max(mode.ioapic_pins()).min(limit)..limit
}

impl Router {
    /// From now on MSIs encoding a Xen PIRQ are vmirq's to deliver (event channels attached).
    pub(crate) fn divert_pirqs(&self) {
        self.divert_pirqs
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether MSIs encoding a Xen PIRQ are vmirq's to deliver.
    pub(crate) fn diverts_pirqs(&self) -> bool {
        self.divert_pirqs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// IOAPIC pin `pin`'s levels go to vmirq's Xen PIRQ from now on: refused (false) while a
    /// kernel irqfd reaches the pin, since KVM would drive it directly.
    pub(crate) fn divert_pin(&self, pin: u32) -> bool {
        let w = lock(&self.writer);
        if pin >= 64 {
            return false;
        }
        let reached = w.kernel_irqfds.keys().any(|gsi| {
            w.table
                .get(Gsi(*gsi))
                .iter()
                .any(|r| r.ioapic_pin() == Some(pin))
        });
        if reached {
            return false;
        }
        self.diverted_pins
            .fetch_or(1 << pin, std::sync::atomic::Ordering::SeqCst);
        true
    }

    /// IOAPIC pin `pin` is the IOAPIC's again.
    pub(crate) fn undivert_pin(&self, pin: u32) {
        let _w = lock(&self.writer);
        if pin < 64 {
            self.diverted_pins
                .fetch_and(!(1 << pin), std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The pins whose levels go to a Xen PIRQ.
    pub(crate) fn diverted_pins(&self) -> u64 {
        self.diverted_pins.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A router whose allocator hands out GSIs `first_dynamic..limit` (`limit` ≤ 4096). In the
    /// kernel irqchip mode the table starts as KVM's default (GSI n → IOAPIC pin n, GSIs 0-15
    /// also to the PICs); in split mode GSIs below the pin count belong to the IOAPIC.
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        first_dynamic: u32,
        limit: u32,
    ) -> Result<Self, RouterError> {
        let mode = backend.irqchip_mode();
        let pins = mode.ioapic_pins();
        let mut table = RoutingTable::new(pins);
        // Linux arch/x86/kvm/irq_comm.c default_routing: GSI n → IOAPIC pin n, and GSIs 0-15
        // also to the PICs (kernel irqchip only: a split irqchip has no PIC).
        for gsi in 0..pins {
            if mode == IrqchipMode::Kernel && gsi < 16 {
                let chip = if gsi < 8 {
                    IrqChip::PicMaster
                } else {
                    IrqChip::PicSlave
                };
                table.add(Gsi(gsi), Route::Irqchip { chip, pin: gsi % 8 })?;
            }
            table.add(Gsi(gsi), Route::ioapic(gsi))?;
        }
        let range = dynamic_gsis(mode, first_dynamic, limit);
        let (first, limit) = (range.start, range.end);
        let pin_msis = match mode {
            IrqchipMode::Kernel => Vec::new(),
            IrqchipMode::Split { .. } => vec![None; pins as usize],
        };
        let writer = Writer {
            table: table.clone(),
            free: (first..limit).collect(),
            pin_msis,
            kernel_irqfds: HashMap::new(),
            kernel_edges: HashMap::new(),
            level_lines: HashSet::new(),
            built: 0,
            pending: None,
            committing: false,
            waiting: HashMap::new(),
        };
        let router = Self {
            backend,
            mode,
            published: ArcSwap::from_pointee(table),
            writer: Mutex::new(writer),
            committed: Condvar::new(),
            released: Arc::default(),
            allocatable: limit - first,
            range,
            divert_pirqs: std::sync::atomic::AtomicBool::new(false),
            diverted_pins: std::sync::atomic::AtomicU64::new(0),
        };
        let mut batch = router.batch();
        batch.dirty = true;
        batch.commit()?;
        Ok(router)
    }

    /// The current table; lock-free, never half-written.
    pub(crate) fn load(&self) -> Guard<Arc<RoutingTable>> {
        self.published.load()
    }

    /// Starts a batch of route changes; nothing reaches the backend until [`RouteBatch::commit`].
    /// Other writers wait until the batch is committed or dropped.
    pub(crate) fn batch(&self) -> RouteBatch<'_> {
        let writer = lock(&self.writer);
        let table = writer.table.clone();
        RouteBatch {
            router: self,
            writer,
            table,
            dirty: false,
            _held: BatchHeld::new(),
        }
    }

    /// Removes `gsi`'s routes in a commit now (unless this thread holds a batch: then they go
    /// when the GSI is reclaimed, at a commit after its last lease).
    pub(crate) fn remove_route(&self, gsi: Gsi) -> Result<(), RouterError> {
        if BATCHES_HELD.with(Cell::get) > 0 {
            return Ok(());
        }
        let mut batch = self.batch();
        batch.remove_gsi(gsi);
        batch.commit()
    }

    /// Commits the removal of released GSIs' routes now, unless this thread holds a batch
    /// (then that batch's commit does it: waiting here would deadlock).
    pub(crate) fn flush_released(&self) -> Result<(), RouterError> {
        if BATCHES_HELD.with(Cell::get) > 0 || lock(&self.released).is_empty() {
            return Ok(());
        }
        let mut batch = self.batch();
        batch.dirty = true;
        batch.commit()
    }

    /// Leases the lowest free GSI. O(log n): the table is not touched. If only released but not
    /// yet reclaimed GSIs remain, commits once to reclaim them.
    pub(crate) fn allocate(&self) -> Result<GsiLease, RouterError> {
        let mut writer = lock(&self.writer);
        // Lock order: `writer`, then `released` (a leaf).
        if writer.free.is_empty() && !lock(&self.released).is_empty() {
            drop(writer);
            let mut batch = self.batch();
            batch.dirty = true;
            batch.commit()?;
            writer = lock(&self.writer);
        }
        let gsi = writer
            .free
            .pop_first()
            .ok_or(RouterError::GsiExhausted(self.allocatable))?;
        Ok(GsiLease {
            gsi: Gsi(gsi),
            released: Arc::clone(&self.released),
        })
    }

    /// Commits `table` (built under `w`): see the module docs. Returns when this batch's
    /// table, or a newer one containing it, is in force, or was refused.
    fn commit<'a>(
        &'a self,
        mut w: MutexGuard<'a, Writer>,
        mut table: RoutingTable,
    ) -> Result<(), RouterError> {
        let mut reclaimed = std::mem::take(&mut *lock(&self.released));
        for gsi in &reclaimed {
            table.remove(Gsi(*gsi));
        }
        let divert = (self.diverts_pirqs(), self.diverted_pins());
        let kernel = match validate(&w, &table, &*self.backend, divert) {
            Ok(kernel) => kernel,
            Err(e) => {
                lock(&self.released).extend(reclaimed);
                return Err(e);
            }
        };
        w.built += 1;
        let generation = w.built;
        w.table = table.clone();
        if let Some(superseded) = w.pending.take() {
            reclaimed.extend(superseded.reclaimed);
        }
        w.pending = Some(Pending {
            generation,
            kernel,
            table,
            reclaimed,
        });
        if w.committing {
            // The committer hands the newest table to the backend when its call returns.
            w.waiting.insert(generation, None);
            loop {
                w = self.committed.wait(w).unwrap_or_else(|e| e.into_inner());
                if let Some(Some(_)) = w.waiting.get(&generation) {
                    let outcome = w.waiting.remove(&generation).flatten();
                    return outcome.unwrap_or(Ok(()));
                }
            }
        }
        w.committing = true;
        let mut own = None;
        while let Some(p) = w.pending.take() {
            drop(w);
            let result = self.backend.commit_routes(&p.kernel);
            w = lock(&self.writer);
            let (resolved, outcome) = match result {
                Ok(()) => {
                    w.free.extend(p.reclaimed);
                    self.published.store(Arc::new(p.table));
                    (p.generation, Ok(()))
                }
                Err(e) => {
                    // Every table built so far contains the refused one's changes.
                    let mut back = p.reclaimed;
                    if let Some(newer) = w.pending.take() {
                        back.extend(newer.reclaimed);
                    }
                    lock(&self.released).extend(back);
                    w.table = RoutingTable::clone(&self.published.load());
                    (w.built, Err(RouterError::from(e)))
                }
            };
            for (g, slot) in w.waiting.iter_mut() {
                if *g <= resolved && slot.is_none() {
                    *slot = Some(outcome.as_ref().map(|_| ()).map_err(RouterError::duplicate));
                }
            }
            if own.is_none() && generation <= resolved {
                own = Some(outcome);
            }
            self.committed.notify_all();
        }
        w.committing = false;
        own.unwrap_or(Ok(()))
    }

    /// GSIs leased now (released ones included until a commit reclaims them), lowest first.
    pub(crate) fn leased(&self) -> Vec<Gsi> {
        let w = lock(&self.writer);
        self.range
            .clone()
            .filter(|g| !w.free.contains(g))
            .map(Gsi)
            .collect()
    }

    /// Leases `gsi` if it is free (a restored VM takes back the GSIs its snapshot names).
    pub(crate) fn claim(&self, gsi: Gsi) -> Option<GsiLease> {
        lock(&self.writer).free.remove(&gsi.0).then(|| GsiLease {
            gsi,
            released: Arc::clone(&self.released),
        })
    }

    /// Adds `routes` for `gsi`s the caller holds leases on, in one commit (a restore).
    pub(crate) fn add_routes(&self, routes: &[(Gsi, Vec<Route>)]) -> Result<(), RouterError> {
        let mut batch = self.batch();
        for (gsi, list) in routes {
            batch.table.remove(*gsi);
            for route in list {
                batch.check_reserved(*gsi, route)?;
                batch.table.add(*gsi, *route)?;
            }
            batch.dirty = true;
        }
        batch.commit()
    }

    /// GSIs the allocator can still hand out (excluding released-but-unreclaimed ones).
    pub(crate) fn free_gsis(&self) -> usize {
        lock(&self.writer).free.len()
    }

    /// Split irqchip: republishes the kernel routes of `pins` from `current` (the IOAPIC's
    /// message for a pin, read now, under the writer lock), committing if any changed. Reading
    /// the current message here, not the one the caller saw, keeps two racing redirection-entry
    /// writes from committing in the wrong order.
    pub(crate) fn refresh_pin_msis(
        &self,
        pins: &[u32],
        current: impl Fn(u32) -> Option<MsiMessage>,
    ) -> Result<(), RouterError> {
        let mut batch = self.batch();
        for &pin in pins {
            let msi = current(pin);
            if let Some(slot) = batch.writer.pin_msis.get_mut(pin as usize) {
                if *slot != msi {
                    *slot = msi;
                    batch.dirty = true;
                }
            }
        }
        batch.commit()
    }

    /// A kernel irqfd now serves `gsi`, assigned when its routes were `expected`. Records it
    /// (pinning the GSI's routes to deliverable ones) if the routes are unchanged; returns
    /// false if they changed meanwhile and the caller must undo and decide again.
    /// An `edge` irqfd that shares a pin with a level line counts as changed routes.
    pub(crate) fn register_kernel_irqfd(&self, gsi: Gsi, expected: &[Route], edge: bool) -> bool {
        let mut w = lock(&self.writer);
        let diverted = self.diverted_pins();
        if w.table.get(gsi) != expected
            || (edge && shared_pin(&w.table, [gsi.0], w.level_lines.iter().copied()).is_some())
            || expected.iter().any(|r| reaches(diverted, r))
        {
            return false;
        }
        *w.kernel_irqfds.entry(gsi.0).or_default() += 1;
        if edge {
            *w.kernel_edges.entry(gsi.0).or_default() += 1;
        }
        true
    }

    /// A kernel irqfd on `gsi` is going away.
    pub(crate) fn forget_kernel_irqfd(&self, gsi: Gsi, edge: bool) {
        let mut guard = lock(&self.writer);
        let w = &mut *guard;
        let mut maps = vec![&mut w.kernel_irqfds];
        if edge {
            maps.push(&mut w.kernel_edges);
        }
        for map in maps {
            if let Some(n) = map.get_mut(&gsi.0) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&gsi.0);
                }
            }
        }
    }

    /// Kernel irqchip: the IOAPIC pin an edge irqfd on `gsi` with `routes` would share with a
    /// level line, if any (then it must be served on the user path).
    pub(crate) fn edge_shares_pin(&self, routes: &[Route]) -> Option<u32> {
        if self.mode != IrqchipMode::Kernel {
            return None;
        }
        let w = lock(&self.writer);
        let line_pins = pins_of(&w.table, w.level_lines.iter().copied());
        routes
            .iter()
            .filter_map(Route::ioapic_pin)
            .find(|p| line_pins.contains(p))
    }

    /// Kernel irqchip: `gsi`'s level line will drive `KVM_IRQ_LINE`. Refused if a kernel edge
    /// irqfd reaches one of its pins.
    pub(crate) fn register_level_line(&self, gsi: Gsi) -> Result<(), RouterError> {
        if self.mode != IrqchipMode::Kernel {
            return Ok(());
        }
        let mut w = lock(&self.writer);
        if let Some((gsi, pin)) = line_conflict(&pin_reach(&w.table), gsi, &w.kernel_edges) {
            return Err(RouterError::SharedLineSource { gsi, pin });
        }
        w.level_lines.insert(gsi.0);
        Ok(())
    }

    /// `gsi`'s level line is gone.
    pub(crate) fn forget_level_line(&self, gsi: Gsi) {
        lock(&self.writer).level_lines.remove(&gsi.0);
    }

    pub(crate) fn mode(&self) -> IrqchipMode {
        self.mode
    }

    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Identifies this router (route objects check they belong to it).
    pub(crate) fn released_queue(&self) -> &Arc<Mutex<Vec<u32>>> {
        &self.released
    }
}

/// A set of route changes committed with one backend call. Obtain from
/// [`crate::Interrupts::routes`]; it changes only GSIs the caller owns ([`crate::GsiRoute`]).
/// Other writers wait until it is committed or dropped; delivery never does.
///
/// While a thread holds a batch it must not start another route operation (as with any lock);
/// dropping a [`crate::GsiRoute`] is safe: its removal joins the held batch's commit.
pub struct RouteBatch<'a> {
    router: &'a Router,
    writer: MutexGuard<'a, Writer>,
    table: RoutingTable,
    dirty: bool,
    _held: BatchHeld,
}

thread_local! {
    /// Batches this thread holds (0 or 1 in correct use).
    static BATCHES_HELD: Cell<usize> = const { Cell::new(0) };
}

/// Counts a batch held by this thread for as long as it lives.
struct BatchHeld;

impl BatchHeld {
    fn new() -> Self {
        BATCHES_HELD.with(|n| n.set(n.get() + 1));
        BatchHeld
    }
}

impl Drop for BatchHeld {
    fn drop(&mut self) {
        BATCHES_HELD.with(|n| n.set(n.get() - 1));
    }
}

impl RouteBatch<'_> {
    /// Makes `to` the only route of `route`'s GSI.
    pub fn set(&mut self, route: &crate::GsiRoute, to: Route) -> Result<(), RouterError> {
        let gsi = self.owned(route)?;
        self.set_gsi(gsi, to)
    }

    /// Removes every route of `route`'s GSI (it stays allocated).
    pub fn clear(&mut self, route: &crate::GsiRoute) -> Result<(), RouterError> {
        let gsi = self.owned(route)?;
        self.dirty |= self.table.remove(gsi);
        Ok(())
    }

    /// The table as this batch would commit it.
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// Validates, commits to the backend (once) and publishes. A batch with no change commits
    /// nothing. On error nothing is published and the previous table stays in force. The
    /// writer lock is released for the backend call (see the module docs).
    pub fn commit(self) -> Result<(), RouterError> {
        if self.dirty || !lock(&self.router.released).is_empty() {
            self.router.commit(self.writer, self.table)
        } else {
            Ok(())
        }
    }

    fn owned(&self, route: &crate::GsiRoute) -> Result<Gsi, RouterError> {
        if route.belongs_to(self.router) {
            Ok(route.gsi())
        } else {
            Err(RouterError::ForeignRoute(route.gsi()))
        }
    }

    pub(crate) fn set_gsi(&mut self, gsi: Gsi, route: Route) -> Result<(), RouterError> {
        self.check_reserved(gsi, &route)?;
        self.table.set(gsi, route)?;
        self.dirty = true;
        Ok(())
    }

    pub(crate) fn remove_gsi(&mut self, gsi: Gsi) {
        self.dirty |= self.table.remove(gsi);
    }

    /// Split irqchip: GSIs below the pin count carry the pins' kernel MSI routes, so the table
    /// may give them only (userspace) IOAPIC routes.
    fn check_reserved(&self, gsi: Gsi, route: &Route) -> Result<(), RouterError> {
        match self.router.mode {
            IrqchipMode::Split { ioapic_pins }
                if gsi.0 < ioapic_pins && route.ioapic_pin().is_none() =>
            {
                Err(RouteError::GsiReserved { gsi }.into())
            }
            _ => Ok(()),
        }
    }
}

/// Whether `route` drives one of the `diverted` IOAPIC pins (a bitmask).
pub(crate) fn reaches(diverted: u64, route: &Route) -> bool {
    route
        .ioapic_pin()
        .is_some_and(|p| p < 64 && diverted & 1 << p != 0)
}

/// Whether the hypervisor delivers `route` by itself: the backend says so, and it is not an
/// MSI encoding a Xen PIRQ while event channels are attached (vmirq marks those ports).
pub(crate) fn kernel_delivers(backend: &dyn Backend, divert_pirqs: bool, route: &Route) -> bool {
    let pirq = matches!(route, Route::Msi { msg, .. } if crate::xen::msi_pirq(*msg).is_some());
    backend.delivers(route) && !(divert_pirqs && pirq)
}

/// Checks `table` against the irqfds in force and builds the hypervisor's view.
fn validate(
    w: &Writer,
    table: &RoutingTable,
    backend: &dyn Backend,
    (divert_pirqs, diverted_pins): (bool, u64),
) -> Result<Vec<KernelRoute>, RouterError> {
    for gsi in w.kernel_irqfds.keys() {
        let undeliverable =
            |r: &&Route| !kernel_delivers(backend, divert_pirqs, r) || reaches(diverted_pins, r);
        if let Some(route) = table.get(Gsi(*gsi)).iter().find(undeliverable) {
            return Err(RouterError::KernelIrqfdCannotDeliver {
                gsi: Gsi(*gsi),
                route: *route,
            });
        }
    }
    if !w.level_lines.is_empty() {
        let reach = pin_reach(table);
        for line in &w.level_lines {
            if let Some((gsi, pin)) = line_conflict(&reach, Gsi(*line), &w.kernel_edges) {
                return Err(RouterError::SharedLineSource { gsi, pin });
            }
        }
    }
    let mut kernel: Vec<KernelRoute> = table
        .iter()
        .filter(|(_, r)| backend.delivers(r))
        .map(|(gsi, route)| KernelRoute { gsi, route: *route })
        .collect();
    for (pin, msi) in w.pin_msis.iter().enumerate() {
        if let Some(msg) = msi {
            kernel.push(KernelRoute {
                gsi: Gsi(pin as u32),
                route: Route::msi(*msg),
            });
        }
    }
    Ok(kernel)
}

/// The IOAPIC pins `gsis` reach in `table`.
fn pins_of(table: &RoutingTable, gsis: impl IntoIterator<Item = u32>) -> HashSet<u32> {
    gsis.into_iter()
        .flat_map(|g| table.get(Gsi(g)).iter().filter_map(Route::ioapic_pin))
        .collect()
}

/// A pin both `a` and `b` reach in `table`.
fn shared_pin(
    table: &RoutingTable,
    a: impl IntoIterator<Item = u32>,
    b: impl IntoIterator<Item = u32>,
) -> Option<u32> {
    let b_pins = pins_of(table, b);
    if b_pins.is_empty() {
        return None;
    }
    pins_of(table, a).into_iter().find(|p| b_pins.contains(p))
}

/// The GSIs reaching each IOAPIC pin in `table`.
fn pin_reach(table: &RoutingTable) -> HashMap<u32, Vec<Gsi>> {
    let mut reach: HashMap<u32, Vec<Gsi>> = HashMap::new();
    for (gsi, route) in table.iter() {
        if let Some(pin) = route.ioapic_pin() {
            reach.entry(pin).or_default().push(gsi);
        }
    }
    reach
}

/// Kernel irqchip: why the level line of `line` (pushed with `KVM_IRQ_LINE`) cannot own its
/// pins (`reach`: the GSIs reaching each pin), as (offending GSI, pin). KVM keeps one
/// userspace source bit per pin, so a kernel edge irqfd on the line's GSI, or any other GSI
/// reaching the pin (its pulses or levels set the same bit), would clear the level the line
/// holds. Edges on the line's own GSI are fine on the user path: they pulse through the line.
fn line_conflict(
    reach: &HashMap<u32, Vec<Gsi>>,
    line: Gsi,
    kernel_edges: &HashMap<u32, u32>,
) -> Option<(Gsi, u32)> {
    let mut pins: Vec<u32> = reach
        .iter()
        .filter(|(_, gsis)| gsis.contains(&line))
        .map(|(pin, _)| *pin)
        .collect();
    pins.sort_unstable();
    for pin in pins {
        if kernel_edges.contains_key(&line.0) {
            return Some((line, pin));
        }
        if let Some(other) = reach[&pin].iter().find(|g| **g != line) {
            return Some((*other, pin));
        }
    }
    None
}

impl RouterError {
    /// The same error for another waiter of a combined commit.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            RouterError::Backend(e) => RouterError::Backend(e.duplicate()),
            RouterError::GsiExhausted(n) => RouterError::GsiExhausted(*n),
            RouterError::KernelIrqfdCannotDeliver { gsi, route } => {
                RouterError::KernelIrqfdCannotDeliver {
                    gsi: *gsi,
                    route: *route,
                }
            }
            RouterError::ForeignRoute(g) => RouterError::ForeignRoute(*g),
            RouterError::SharedLineSource { gsi, pin } => RouterError::SharedLineSource {
                gsi: *gsi,
                pin: *pin,
            },
            RouterError::Route(e) => RouterError::Route(e.clone()),
        }
    }
}

/// One lease on an allocated GSI. The GSI is reclaimed (its routes removed at the next commit,
/// then reusable) only when its last lease drops: the owning route holds one, and so does each
/// irqfd while it is bound to the GSI.
#[derive(Debug)]
pub(crate) struct GsiLease {
    gsi: Gsi,
    released: Arc<Mutex<Vec<u32>>>,
}

impl GsiLease {
    pub(crate) fn gsi(&self) -> Gsi {
        self.gsi
    }

    pub(crate) fn same_router(&self, router: &Router) -> bool {
        Arc::ptr_eq(&self.released, router.released_queue())
    }
}

impl Drop for GsiLease {
    fn drop(&mut self) {
        lock(&self.released).push(self.gsi.0);
    }
}

/// Locks, recovering from poisoning: every critical section here leaves the state consistent
/// before anything that can panic, so a panicked holder leaves nothing half-done.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
