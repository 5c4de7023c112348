//! The router: the published routing table, batched commits, and the GSI allocator.
//!
//! Readers (the userspace delivery path) load the current table through `arc-swap`: they never
//! block and never see half a table. Writers build a [`RouteBatch`] under the writer lock and
//! commit it with exactly one backend call; the table is published only after the backend took
//! it, so the kernel and userspace views never disagree about a committed table.
//!
//! GSIs are handed out as RAII [`GsiHandle`]s. Dropping one never blocks: the GSI is queued,
//! its routes are removed at the next commit, and only then can it be handed out again (so a
//! new owner never inherits a stale kernel route).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::{ArcSwap, Guard};
use thiserror::Error;

use crate::backend::{Backend, BackendError, IrqchipMode, KernelRoute};
use crate::msi::MsiMessage;
use crate::route::{Gsi, Route, RouteError, RoutingTable, MAX_GSIS};

/// Errors from changing routes or allocating GSIs.
#[derive(Debug, Error)]
pub enum RouterError {
    #[error("the hypervisor refused the routing table: {0}")]
    Backend(#[from] BackendError),
    #[error("all {0} allocatable GSIs are in use")]
    GsiExhausted(u32),
    #[error("{gsi} has a kernel irqfd, and its new route {route:?} is one the hypervisor cannot deliver; deassign the irqfd first")]
    KernelIrqfdCannotDeliver { gsi: Gsi, route: Route },
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
    /// GSIs served by a kernel irqfd: their routes must stay deliverable by the hypervisor.
    kernel_irqfd_gsis: Vec<u32>,
}

/// GSIs whose handles were dropped; reclaimed at the next commit. A separate lock so that
/// dropping a handle never waits for (or deadlocks with) an open batch.
#[derive(Default)]
struct Released(Mutex<Vec<u32>>);

/// Owns the routing table of one VM.
pub struct Router {
    backend: Arc<dyn Backend>,
    mode: IrqchipMode,
    published: ArcSwap<RoutingTable>,
    writer: Mutex<Writer>,
    released: Arc<Released>,
    allocatable: u32,
}

impl Router {
    /// A router whose allocator hands out GSIs `first_dynamic..limit` (`limit` ≤ 4096). In the
    /// kernel irqchip mode the table starts as KVM's default (GSI n → IOAPIC pin n, GSIs 0-15
    /// also to the PICs); in split mode GSIs below the pin count belong to the IOAPIC.
    pub fn new(
        backend: Arc<dyn Backend>,
        first_dynamic: u32,
        limit: u32,
    ) -> Result<Self, RouterError> {
        let mode = backend.irqchip_mode();
        let pins = mode.ioapic_pins();
        let mut table = RoutingTable::new(pins);
        // Linux arch/x86/kvm/irq_comm.c default_routing: GSI n → IOAPIC pin n, and GSIs 0-15
        // also to the PICs (kernel irqchip only: a split irqchip has no PIC).
        use crate::route::IrqChip;
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
        let limit = limit.min(MAX_GSIS);
        let first = first_dynamic.max(pins).min(limit);
        let writer = Writer {
            table: table.clone(),
            free: (first..limit).collect(),
            pin_msis: vec![
                None;
                if mode == IrqchipMode::Kernel {
                    0
                } else {
                    pins as usize
                }
            ],
            kernel_irqfd_gsis: Vec::new(),
        };
        let router = Self {
            backend,
            mode,
            published: ArcSwap::from_pointee(table),
            writer: Mutex::new(writer),
            released: Arc::default(),
            allocatable: limit - first,
        };
        router.batch().commit_always()?;
        Ok(router)
    }

    /// The current table; lock-free, never half-written.
    pub fn load(&self) -> Guard<Arc<RoutingTable>> {
        self.published.load()
    }

    /// Starts a batch of route changes; nothing reaches the backend until [`RouteBatch::commit`].
    /// Other writers wait until the batch is committed or dropped.
    pub fn batch(&self) -> RouteBatch<'_> {
        let writer = lock(&self.writer);
        let table = writer.table.clone();
        RouteBatch {
            router: self,
            writer,
            table,
            dirty: false,
        }
    }

    /// Hands out the lowest free GSI. If only released-but-unreclaimed GSIs remain, commits once
    /// to reclaim them.
    pub fn allocate(&self) -> Result<GsiHandle, RouterError> {
        let mut batch = self.batch();
        if batch.writer.free.is_empty() && !lock(&self.released.0).is_empty() {
            batch.dirty = true;
            batch = batch.commit_and_continue()?;
        }
        let gsi = batch
            .writer
            .free
            .pop_first()
            .ok_or(RouterError::GsiExhausted(self.allocatable))?;
        Ok(GsiHandle {
            gsi: Gsi(gsi),
            released: Arc::clone(&self.released),
        })
    }

    /// Commits pending releases (routes of dropped handles) now.
    pub fn flush(&self) -> Result<(), RouterError> {
        let mut batch = self.batch();
        batch.dirty = !lock(&self.released.0).is_empty();
        batch.commit()
    }

    /// GSIs the allocator can still hand out (excluding released-but-unreclaimed ones).
    pub fn free_gsis(&self) -> usize {
        lock(&self.writer).free.len()
    }

    /// Split irqchip: records the MSI an IOAPIC pin now produces (its kernel route, which tells
    /// KVM which vectors are level and need an EOI exit), committing if it changed.
    pub fn set_pin_msi(&self, pin: u32, msi: Option<MsiMessage>) -> Result<(), RouterError> {
        let mut batch = self.batch();
        if let Some(slot) = batch.writer.pin_msis.get_mut(pin as usize) {
            if *slot != msi {
                *slot = msi;
                batch.dirty = true;
            }
        }
        batch.commit()
    }

    /// Runs `assign` with the routes of `gsi`, holding off commits meanwhile, so the irqfd
    /// path it picks matches the routes in force. A kernel-path result pins the GSI's routes to
    /// ones the hypervisor can deliver until [`Router::forget_kernel_irqfd`].
    pub(crate) fn with_routes<T, E>(
        &self,
        gsi: Gsi,
        assign: impl FnOnce(&[Route]) -> Result<(crate::irqfd::IrqfdPath, T), E>,
    ) -> Result<(crate::irqfd::IrqfdPath, T), E> {
        let mut w = lock(&self.writer);
        let result = assign(w.table.get(gsi))?;
        if result.0 == crate::irqfd::IrqfdPath::Kernel {
            w.kernel_irqfd_gsis.push(gsi.0);
        }
        Ok(result)
    }

    /// A kernel irqfd on `gsi` is going away.
    pub(crate) fn forget_kernel_irqfd(&self, gsi: Gsi) {
        let mut w = lock(&self.writer);
        if let Some(i) = w.kernel_irqfd_gsis.iter().position(|g| *g == gsi.0) {
            w.kernel_irqfd_gsis.swap_remove(i);
        }
    }

    pub fn mode(&self) -> IrqchipMode {
        self.mode
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

/// A set of route changes committed with one backend call.
pub struct RouteBatch<'a> {
    router: &'a Router,
    writer: MutexGuard<'a, Writer>,
    table: RoutingTable,
    dirty: bool,
}

impl RouteBatch<'_> {
    /// Adds a route to `gsi` (KVM's sharing rules apply).
    pub fn add(&mut self, gsi: Gsi, route: Route) -> Result<(), RouterError> {
        self.check_reserved(gsi, &route)?;
        self.table.add(gsi, route)?;
        self.dirty = true;
        Ok(())
    }

    /// Makes `route` the only route of `gsi`.
    pub fn set(&mut self, gsi: Gsi, route: Route) -> Result<(), RouterError> {
        self.check_reserved(gsi, &route)?;
        self.table.set(gsi, route)?;
        self.dirty = true;
        Ok(())
    }

    /// Removes every route of `gsi`.
    pub fn remove(&mut self, gsi: Gsi) {
        self.dirty |= self.table.remove(gsi);
    }

    /// The table as this batch would commit it.
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// Validates, commits to the backend (once) and publishes. A batch with no change commits
    /// nothing. On error nothing is published and the previous table stays in force.
    pub fn commit(self) -> Result<(), RouterError> {
        if self.dirty || !lock(&self.router.released.0).is_empty() {
            self.commit_always()
        } else {
            Ok(())
        }
    }

    fn commit_and_continue(mut self) -> Result<Self, RouterError> {
        self.publish()?;
        Ok(self)
    }

    fn commit_always(mut self) -> Result<(), RouterError> {
        self.publish()
    }

    fn publish(&mut self) -> Result<(), RouterError> {
        let released = std::mem::take(&mut *lock(&self.router.released.0));
        for gsi in &released {
            self.table.remove(Gsi(*gsi));
        }
        let result = self.validate().and_then(|kernel| {
            self.router
                .backend
                .commit_routes(&kernel)
                .map_err(RouterError::from)
        });
        if let Err(e) = result {
            // Keep the releases for the next successful commit.
            lock(&self.router.released.0).extend(released);
            return Err(e);
        }
        self.writer.free.extend(released);
        self.writer.table = self.table.clone();
        self.router.published.store(Arc::new(self.table.clone()));
        self.dirty = false;
        Ok(())
    }

    /// Checks the batch against the irqfds in force and builds the hypervisor's view.
    fn validate(&self) -> Result<Vec<KernelRoute>, RouterError> {
        let backend = &self.router.backend;
        for gsi in &self.writer.kernel_irqfd_gsis {
            if let Some(route) = self
                .table
                .get(Gsi(*gsi))
                .iter()
                .find(|r| !backend.delivers(r))
            {
                return Err(RouterError::KernelIrqfdCannotDeliver {
                    gsi: Gsi(*gsi),
                    route: *route,
                });
            }
        }
        let mut kernel: Vec<KernelRoute> = self
            .table
            .iter()
            .filter(|(_, r)| backend.delivers(r))
            .map(|(gsi, route)| KernelRoute { gsi, route: *route })
            .collect();
        for (pin, msi) in self.writer.pin_msis.iter().enumerate() {
            if let Some(msg) = msi {
                kernel.push(KernelRoute {
                    gsi: Gsi(pin as u32),
                    route: Route::msi(*msg),
                });
            }
        }
        Ok(kernel)
    }

    /// Split irqchip: GSIs below the pin count carry the pins' kernel MSI routes, so the table
    /// may give them only (userspace) IOAPIC routes.
    fn check_reserved(&self, gsi: Gsi, route: &Route) -> Result<(), RouterError> {
        let is_ioapic = matches!(
            route,
            Route::Irqchip {
                chip: crate::route::IrqChip::Ioapic,
                ..
            }
        );
        match self.router.mode {
            IrqchipMode::Split { ioapic_pins } if gsi.0 < ioapic_pins && !is_ioapic => {
                Err(RouteError::GsiReserved { gsi }.into())
            }
            _ => Ok(()),
        }
    }
}

/// An allocated GSI. Dropping it frees the GSI and (at the next commit) its routes.
#[derive(Debug)]
pub struct GsiHandle {
    gsi: Gsi,
    released: Arc<Released>,
}

impl GsiHandle {
    pub fn gsi(&self) -> Gsi {
        self.gsi
    }
}

impl Drop for GsiHandle {
    fn drop(&mut self) {
        lock(&self.released.0).push(self.gsi.0);
    }
}

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Released")
    }
}

/// Locks, recovering from poisoning: every critical section here leaves the state consistent
/// before anything that can panic, so a panicked holder leaves nothing half-done.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
