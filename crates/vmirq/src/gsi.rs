//! The owned objects an interrupt is: a [`GsiRoute`] (a GSI the caller allocated, its route
//! and the irqfds bound to it) and an [`IoapicPin`] (a pin's fixed GSI, shared by its devices).
//!
//! A `GsiRoute` is the only way to route or bind a dynamic GSI (OpenVMM's `GsiRoute` is the
//! model). Dropping it disables its irqfds (nothing fires from them after drop returns),
//! removes its route in a commit, and gives the GSI back only after that commit, and only once
//! no irqfd holds a lease on it: a GSI is never reused while anything can still fire it.

use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::restore_check_irqfd as check_irqfd;
use crate::interrupts::{Error, Interrupts};
use crate::irqfd::{EdgeIrqfd, IrqfdCore, IrqfdPath, LevelIrqfd};
use crate::line::{IrqSource, Line};
use crate::route::{Gsi, Route};
use crate::router::{lock, GsiLease, Router};
use crate::snapshot::{IrqfdState, ObjectState, Save};

/// An allocated GSI with its route and the irqfds bound to it. See the module docs.
///
/// ```
/// use std::sync::Arc;
/// use vmirq::{Interrupts, IrqchipMode, Route, SimBackend, X86Msi};
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// let sim = SimBackend::new(1, IrqchipMode::Kernel);
/// let irq = Interrupts::new(sim.clone(), Default::default())?;
/// let msi = X86Msi::fixed(0, 0x40).encode()?;
/// let route = irq.new_route(Route::msi(msi))?;
/// let fd = EventFd::new(EFD_NONBLOCK)?;
/// let irqfd = route.assign_irqfd(&fd)?;   // kernel path: the hypervisor delivers MSIs
/// fd.write(1)?;
/// sim.run_until_idle();
/// assert_eq!(sim.count(0, 0x40), 1);
/// drop(route);                            // irqfd disabled, route removed, GSI freed
/// assert!(!irqfd.is_bound());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct GsiRoute {
    interrupts: Arc<Interrupts>,
    gsi: Gsi,
    /// Taken only by drop.
    lease: Option<Arc<GsiLease>>,
    /// Irqfds bound to this GSI (weak: their handles own them).
    irqfds: Mutex<Vec<Weak<IrqfdCore>>>,
}

impl GsiRoute {
    pub(crate) fn new(interrupts: Arc<Interrupts>, lease: GsiLease) -> Self {
        Self {
            interrupts,
            gsi: lease.gsi(),
            lease: Some(Arc::new(lease)),
            irqfds: Mutex::new(Vec::new()),
        }
    }

    /// The GSI (for the VMM's own records; nothing public takes it back).
    pub fn gsi(&self) -> Gsi {
        self.gsi
    }

    /// The GSI's routes as published now.
    pub fn routes(&self) -> Vec<Route> {
        self.interrupts.router().load().get(self.gsi()).to_vec()
    }

    /// Makes `route` this GSI's only route (one commit).
    pub fn set(&self, route: Route) -> Result<(), Error> {
        let mut batch = self.interrupts.routes();
        batch.set(self, route)?;
        Ok(batch.commit()?)
    }

    /// Removes this GSI's route (one commit); the GSI stays allocated.
    pub fn clear(&self) -> Result<(), Error> {
        let mut batch = self.interrupts.routes();
        batch.clear(self)?;
        Ok(batch.commit()?)
    }

    /// Binds `fd` as an edge irqfd. The path is chosen now: kernel when the hypervisor can
    /// deliver the route, userspace otherwise. The GSI must have a route already (routes
    /// before irqfds: Cloud Hypervisor #3827). An event counted before this call is delivered
    /// by it.
    pub fn assign_irqfd(&self, fd: &EventFd) -> Result<EdgeIrqfd, Error> {
        self.assign_irqfd_on(fd, None)
    }

    /// [`GsiRoute::assign_irqfd`] with the path forced: `Some(User)` always dispatches in
    /// userspace; `Some(Kernel)` fails with [`Error::Unsupported`] if the hypervisor cannot
    /// deliver the route; `None` picks the fastest.
    pub fn assign_irqfd_on(
        &self,
        fd: &EventFd,
        path: Option<IrqfdPath>,
    ) -> Result<EdgeIrqfd, Error> {
        self.bind_edge(fd, None, path)
    }

    /// Binds a level irqfd with a resamplefd; the route must be an IOAPIC pin. See
    /// [`IoapicPin::assign_level_irqfd`].
    pub fn assign_level_irqfd(
        &self,
        trigger: &EventFd,
        resample: &EventFd,
    ) -> Result<LevelIrqfd, Error> {
        let core =
            self.interrupts
                .bind_level(trigger, resample, self.gsi(), self.lease.as_ref())?;
        self.track(&core);
        Ok(LevelIrqfd::from_core(core))
    }

    /// Delivers one edge interrupt through the current route, in userspace.
    pub fn inject(&self) -> Result<(), Error> {
        self.interrupts.delivery().inject_edge(self.gsi())
    }

    /// Binds `fd` as the edge irqfd a snapshot saved on this GSI
    /// ([`crate::Restored::irqfd`]); a signal that waited unserved at save is delivered at
    /// [`Interrupts::resume`], once: by `fd`'s own count if it is the same eventfd, still
    /// counting (an in-process migration), else by a signal vmirq gives it.
    pub fn restore_irqfd(&self, fd: &EventFd, state: &IrqfdState) -> Result<EdgeIrqfd, Error> {
        restore_bound(&self.interrupts, self.gsi(), state, false, fd, || {
            self.assign_irqfd(fd)
        })
    }

    /// [`GsiRoute::restore_irqfd`] for a level irqfd.
    pub fn restore_level_irqfd(
        &self,
        trigger: &EventFd,
        resample: &EventFd,
        state: &IrqfdState,
    ) -> Result<LevelIrqfd, Error> {
        restore_bound(&self.interrupts, self.gsi(), state, true, trigger, || {
            self.assign_level_irqfd(trigger, resample)
        })
    }

    /// The GSI's level line (for a route to an IOAPIC pin): the OR of any number of sources.
    /// On the kernel irqchip it is refused ([`crate::RouterError::SharedLineSource`]) if a
    /// kernel edge irqfd reaches the same pin: KVM would let its pulses drop the level.
    pub fn line(&self) -> Result<Arc<Line>, Error> {
        self.interrupts.delivery().level_line(self.gsi())
    }

    /// Crate use: binds `fd` with a precomputed identity (MSI-X vectors cache theirs).
    pub(crate) fn assign_known(
        &self,
        fd: &EventFd,
        id: crate::irqfd::EventfdId,
    ) -> Result<EdgeIrqfd, Error> {
        self.bind_edge(fd, Some(id), None)
    }

    fn bind_edge(
        &self,
        fd: &EventFd,
        id: Option<crate::irqfd::EventfdId>,
        path: Option<IrqfdPath>,
    ) -> Result<EdgeIrqfd, Error> {
        let core = self
            .interrupts
            .bind_edge(fd, id, self.gsi, self.lease.as_ref(), path)?;
        self.track(&core);
        Ok(EdgeIrqfd::from_core(core))
    }

    fn track(&self, core: &Arc<IrqfdCore>) {
        let mut irqfds = lock(&self.irqfds);
        irqfds.retain(|w| w.strong_count() > 0);
        irqfds.push(Arc::downgrade(core));
    }

    pub(crate) fn belongs_to(&self, router: &Router) -> bool {
        self.lease.as_ref().is_some_and(|l| l.same_router(router))
    }

    /// Disables every irqfd still bound to this GSI (no lock held while unbinding).
    pub(crate) fn disable_irqfds(&self) {
        let irqfds = std::mem::take(&mut *lock(&self.irqfds));
        for core in irqfds.iter().filter_map(Weak::upgrade) {
            if let Err(e) = core.disable() {
                tracing::warn!("irqfd on {}: deassign failed: {e}", self.gsi());
            }
        }
    }

    /// Takes the route apart without its drop's commit: irqfds must be disabled already; the
    /// caller removes the route in its own batch. Returns the GSI; its lease is gone.
    pub(crate) fn dismantle(mut self) -> Gsi {
        drop(self.lease.take());
        self.gsi
    }
}

impl Drop for GsiRoute {
    fn drop(&mut self) {
        if self.lease.is_none() {
            return; // dismantled
        }
        self.disable_irqfds();
        // The last lease queues the GSI: the commit that removes its route then frees it. If
        // an irqfd being unbound elsewhere still holds a lease, the route goes now and the GSI
        // is freed at a commit after that unbinding ends.
        let lease = self.lease.take();
        let last = lease.as_ref().is_none_or(|l| Arc::strong_count(l) == 1);
        drop(lease);
        let router = self.interrupts.router();
        let removed = if last {
            router.flush_released()
        } else {
            router.remove_route(self.gsi)
        };
        if let Err(e) = removed {
            let gsi = self.gsi;
            tracing::warn!("{gsi}: removing the route failed (retried at the next commit): {e}");
        }
    }
}

/// Binds, with `bind`, the irqfd a snapshot saved as `state` on `gsi` (an edge one, or a
/// level one with `level`), `trigger` being its eventfd: a signal that waited unserved at save
/// is given at [`Interrupts::resume`], once. The same eventfd, its count still there (an
/// in-process migration), delivers by itself once bound.
fn restore_bound<T>(
    interrupts: &Interrupts,
    gsi: Gsi,
    state: &IrqfdState,
    level: bool,
    trigger: &EventFd,
    bind: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    check_irqfd(state, gsi, level)?;
    let owed = state.pending && !crate::snapshot::has_count(trigger);
    let irqfd = bind()?;
    if owed {
        interrupts.signal_at_resume(trigger)?;
    }
    Ok(irqfd)
}

impl Save for GsiRoute {
    fn save(&self) -> ObjectState {
        ObjectState::Route { gsi: self.gsi }
    }
}

impl std::fmt::Debug for GsiRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiRoute")
            .field("gsi", &self.gsi())
            .finish()
    }
}

/// An IOAPIC pin and its fixed GSI (pin n is GSI n on both irqchip modes). Pins are shared:
/// any number of irqfds and sources may drive one, and its route never changes. Obtain with
/// [`Interrupts::pin`].
#[derive(Clone)]
pub struct IoapicPin {
    interrupts: Arc<Interrupts>,
    pin: u32,
}

impl IoapicPin {
    pub(crate) fn new(interrupts: Arc<Interrupts>, pin: u32) -> Self {
        Self { interrupts, pin }
    }

    /// The pin number.
    pub fn pin(&self) -> u32 {
        self.pin
    }

    /// The pin's GSI.
    pub fn gsi(&self) -> Gsi {
        Gsi(self.pin)
    }

    /// Binds `fd` as an edge irqfd on the pin (kernel path on an in-kernel irqchip, vmirq's
    /// IOAPIC on a split one).
    pub fn assign_irqfd(&self, fd: &EventFd) -> Result<EdgeIrqfd, Error> {
        self.assign_irqfd_on(fd, None)
    }

    /// [`IoapicPin::assign_irqfd`] with the path forced (see [`GsiRoute::assign_irqfd_on`]).
    pub fn assign_irqfd_on(
        &self,
        fd: &EventFd,
        path: Option<IrqfdPath>,
    ) -> Result<EdgeIrqfd, Error> {
        let core = self
            .interrupts
            .bind_edge(fd, None, self.gsi(), None, path)?;
        Ok(EdgeIrqfd::from_core(core))
    }

    /// Binds `trigger` as a level irqfd with a resamplefd ("on ack, de-assert and notify"): a
    /// trigger signal asserts the line, which stays high until the guest EOIs it; then the
    /// line is de-asserted once and every resamplefd of the pin is signalled. A device that
    /// still needs service signals `trigger` again.
    ///
    /// On an in-kernel irqchip this is KVM's resample irqfd ([`IrqfdPath::Kernel`]); on a split
    /// irqchip, where KVM refuses resample, vmirq's IOAPIC and one shared resampler per GSI do
    /// it ([`IrqfdPath::User`]).
    pub fn assign_level_irqfd(
        &self,
        trigger: &EventFd,
        resample: &EventFd,
    ) -> Result<LevelIrqfd, Error> {
        let core = self
            .interrupts
            .bind_level(trigger, resample, self.gsi(), None)?;
        Ok(LevelIrqfd::from_core(core))
    }

    /// Binds `fd` as the edge irqfd a snapshot saved on this pin (see
    /// [`GsiRoute::restore_irqfd`]).
    pub fn restore_irqfd(&self, fd: &EventFd, state: &IrqfdState) -> Result<EdgeIrqfd, Error> {
        restore_bound(&self.interrupts, self.gsi(), state, false, fd, || {
            self.assign_irqfd(fd)
        })
    }

    /// Binds the level irqfd a snapshot saved on this pin (see [`GsiRoute::restore_irqfd`]).
    pub fn restore_level_irqfd(
        &self,
        trigger: &EventFd,
        resample: &EventFd,
        state: &IrqfdState,
    ) -> Result<LevelIrqfd, Error> {
        restore_bound(&self.interrupts, self.gsi(), state, true, trigger, || {
            self.assign_level_irqfd(trigger, resample)
        })
    }

    /// The pin's level line: the OR of any number of [`IrqSource`]s. On the kernel irqchip it
    /// is refused ([`crate::RouterError::SharedLineSource`]) while a kernel edge irqfd reaches
    /// the pin: KVM would let its pulses drop the level. While the line lives, edge irqfds
    /// bound to the pin are served through it on the user path.
    pub fn line(&self) -> Result<Arc<Line>, Error> {
        self.interrupts.delivery().level_line(self.gsi())
    }

    /// A new source on the pin's line (shorthand for `line()?.source()`).
    pub fn source(&self) -> Result<IrqSource, Error> {
        Ok(self.line()?.source())
    }

    /// Delivers one edge on the pin, in userspace (no edge if a source holds the line high).
    pub fn inject(&self) -> Result<(), Error> {
        self.interrupts.delivery().inject_edge(self.gsi())
    }
}

impl std::fmt::Debug for IoapicPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoapicPin").field("pin", &self.pin).finish()
    }
}
