//! [`Interrupts`]: the interrupt path of one VM, assembled from the router, the userspace
//! IOAPIC (split irqchip), the irqfd dispatcher and a [`Backend`].

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

pub use crate::delivery::Stats;

use crate::backend::{Backend, BackendError, EoiSink, IrqchipMode};
use crate::delivery::{Delivery, EventChannelSink};
use crate::ioapic::{Ioapic, IOAPIC_BASE, IOAPIC_MMIO_SIZE};
use crate::irqfd::{Action, Dispatcher, Inject, IrqfdPath};
use crate::line::{IrqSource, Line};
use crate::msi::MsiMessage;
use crate::resample::Resampler;
use crate::route::{Gsi, IrqChip, Route, MAX_GSIS};
use crate::router::{lock, GsiHandle, RouteBatch, Router, RouterError};

/// Errors from the core's public API.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the eventfd is not a valid open file descriptor")]
    BadEventFd,
    #[error("could not start or feed the irqfd dispatcher: {0}")]
    Dispatcher(#[source] std::io::Error),
    #[error("eventfd {0} already backs an irqfd")]
    IrqfdBusy(RawFd),
    #[error("{0} has no route")]
    NoRoute(Gsi),
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("vmirq cannot {0}")]
    Unsupported(&'static str),
    #[error("Xen event channel: {0}")]
    Xen(String),
}

/// How an [`Interrupts`] is set up.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Lowest GSI the allocator hands out (raised to the IOAPIC pin count if below it).
    pub first_dynamic_gsi: u32,
    /// One past the highest GSI the allocator hands out (at most 4096).
    pub gsi_limit: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            first_dynamic_gsi: 0,
            gsi_limit: MAX_GSIS,
        }
    }
}

/// Caller descriptors that back an irqfd, with their GSI.
type Registry = HashMap<RawFd, Gsi>;

/// The interrupt path of one VM. Create with [`Interrupts::new`]; share as `Arc`.
pub struct Interrupts {
    delivery: Arc<Delivery>,
    dispatcher: Arc<Dispatcher>,
    /// Caller descriptors that back an irqfd (one irqfd per eventfd), with their GSI.
    irqfds: Mutex<Registry>,
}

impl Interrupts {
    pub fn new(backend: Arc<dyn Backend>, config: Config) -> Result<Arc<Self>, Error> {
        let mode = backend.irqchip_mode();
        let router = Router::new(
            Arc::clone(&backend),
            config.first_dynamic_gsi,
            config.gsi_limit,
        )?;
        let ioapic = match mode {
            IrqchipMode::Kernel => None,
            IrqchipMode::Split { ioapic_pins } => Some(Ioapic::new(ioapic_pins)),
        };
        let delivery = Delivery::new(router, ioapic);
        let sink: Weak<dyn EoiSink> = Arc::downgrade(&delivery) as Weak<dyn EoiSink>;
        backend.set_eoi_sink(sink);
        Ok(Arc::new(Self {
            delivery,
            dispatcher: Arc::new(Dispatcher::new().map_err(Error::Dispatcher)?),
            irqfds: Mutex::new(HashMap::new()),
        }))
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.delivery.router.backend()
    }

    pub fn mode(&self) -> IrqchipMode {
        self.delivery.router.mode()
    }

    pub fn router(&self) -> &Router {
        &self.delivery.router
    }

    /// Starts a batch of route changes (one backend commit).
    pub fn routes(&self) -> RouteBatch<'_> {
        self.delivery.router.batch()
    }

    /// Allocates a GSI (lowest free first); dropping the handle frees it.
    pub fn allocate_gsi(&self) -> Result<GsiHandle, Error> {
        Ok(self.delivery.router.allocate()?)
    }

    /// Allocates a GSI and gives it `route` in one commit: what a device model needs before
    /// it assigns an irqfd. Dropping the handle frees both.
    pub fn allocate_routed_gsi(&self, route: Route) -> Result<GsiHandle, Error> {
        let gsi = self.allocate_gsi()?;
        let mut batch = self.routes();
        batch.set(gsi.gsi(), route)?;
        batch.commit()?;
        Ok(gsi)
    }

    /// Injects an MSI now.
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<(), Error> {
        Ok(self.backend().signal_msi(msg, None)?)
    }

    /// Delivers one edge interrupt on `gsi` through the current routes, in userspace.
    pub fn inject_edge(&self, gsi: Gsi) -> Result<(), Error> {
        self.delivery.inject_edge(gsi)
    }

    pub fn stats(&self) -> &Stats {
        &self.delivery.stats
    }

    /// Userspace irqfds the dispatcher serves.
    pub fn user_irqfds(&self) -> usize {
        self.dispatcher.len()
    }

    /// Binds `fd` to `gsi` as an edge irqfd. The path is chosen now: kernel when the
    /// hypervisor can deliver every route of `gsi`, userspace otherwise. `gsi` must have a
    /// route already (routes before irqfds: Cloud Hypervisor #3827). An event counted before
    /// this call is delivered by it. The dispatcher sets `fd` non-blocking.
    pub fn assign_irqfd(self: &Arc<Self>, fd: &EventFd, gsi: Gsi) -> Result<Irqfd, Error> {
        self.assign_irqfd_on(fd, gsi, None)
    }

    /// [`Interrupts::assign_irqfd`] with the path forced: `Some(User)` always dispatches in
    /// userspace; `Some(Kernel)` fails with [`Error::Unsupported`] if the hypervisor cannot
    /// deliver the GSI's routes; `None` picks the fastest.
    pub fn assign_irqfd_on(
        self: &Arc<Self>,
        fd: &EventFd,
        gsi: Gsi,
        path: Option<IrqfdPath>,
    ) -> Result<Irqfd, Error> {
        let (mut registry, key, own) = self.claim(fd)?;
        let backend = Arc::clone(self.backend());
        let inject: Arc<dyn Inject> = Arc::clone(&self.delivery) as Arc<dyn Inject>;
        let (path, token) = self.delivery.router.with_routes(gsi, |routes| {
            if routes.is_empty() {
                return Err(Error::NoRoute(gsi));
            }
            let kernel_can = routes.iter().all(|r| backend.delivers(r));
            if path == Some(IrqfdPath::Kernel) && !kernel_can {
                return Err(Error::Unsupported(
                    "deliver these routes from a kernel irqfd",
                ));
            }
            if kernel_can && path != Some(IrqfdPath::User) {
                backend.assign_irqfd(&own, gsi, None)?;
                Ok((IrqfdPath::Kernel, None))
            } else {
                let dup = own.try_clone().map_err(|_| Error::BadEventFd)?;
                let token = self
                    .dispatcher
                    .add(dup, Action::Edge(gsi), &inject)
                    .map_err(Error::Dispatcher)?;
                Ok((IrqfdPath::User, Some(token)))
            }
        })?;
        registry.insert(key, gsi);
        Ok(Irqfd::new(self, own, key, gsi, path, token, None))
    }

    /// Binds `trigger` to `gsi` as a level irqfd with a resamplefd ("on ack, de-assert and
    /// notify"): a trigger signal asserts the line, which stays high until the guest EOIs it;
    /// then the line is de-asserted once and every resamplefd of `gsi` is signalled. A device
    /// that still needs service signals `trigger` again. `gsi` must be routed to an IOAPIC pin.
    ///
    /// On an in-kernel irqchip this is KVM's resample irqfd ([`IrqfdPath::Kernel`]); on a split
    /// irqchip, where KVM refuses resample, vmirq's IOAPIC and one shared resampler per GSI do it
    /// ([`IrqfdPath::User`]).
    pub fn assign_irqfd_with_resample(
        self: &Arc<Self>,
        trigger: &EventFd,
        resample: &EventFd,
        gsi: Gsi,
    ) -> Result<Irqfd, Error> {
        let resample = resample.try_clone().map_err(|_| Error::BadEventFd)?;
        let (mut registry, key, own) = self.claim(trigger)?;
        let backend = Arc::clone(self.backend());
        let inject: Arc<dyn Inject> = Arc::clone(&self.delivery) as Arc<dyn Inject>;
        let (path, ()) = self.delivery.router.with_routes(gsi, |routes| {
            if routes.is_empty() {
                return Err(Error::NoRoute(gsi));
            }
            let on_ioapic = routes.iter().any(|r| {
                matches!(
                    r,
                    Route::Irqchip {
                        chip: IrqChip::Ioapic,
                        ..
                    }
                )
            });
            if !on_ioapic {
                return Err(Error::Unsupported(
                    "resample a GSI that is not routed to an IOAPIC pin",
                ));
            }
            if backend.supports_resample() && routes.iter().all(|r| backend.delivers(r)) {
                backend.assign_irqfd(&own, gsi, Some(&resample))?;
                return Ok((IrqfdPath::Kernel, ()));
            }
            if self.delivery.ioapic.is_none() {
                return Err(Error::Unsupported("resample without an IOAPIC to ack it"));
            }
            Ok((IrqfdPath::User, ()))
        })?;
        // The user path joins the resampler outside the router's lock (lock order: resamplers
        // before the IOAPIC and the router).
        let (token, resampler) = match path {
            IrqfdPath::Kernel => (None, None),
            IrqfdPath::User => {
                let (token, r, id) = self.join_resampler(&own, resample, gsi, &inject)?;
                (Some(token), Some((r, id)))
            }
        };
        registry.insert(key, gsi);
        let mut irqfd = Irqfd::new(self, own, key, gsi, path, token, resampler);
        irqfd.level = true;
        Ok(irqfd)
    }

    /// Checks that `fd` is open and backs no irqfd yet; returns the registry (locked, for the
    /// caller to record the new irqfd in), the caller's descriptor as key, and vmirq's own
    /// duplicate of the eventfd.
    fn claim(&self, fd: &EventFd) -> Result<(MutexGuard<'_, Registry>, RawFd, EventFd), Error> {
        let key = fd.as_raw_fd();
        if !crate::irqfd::is_open(key) {
            return Err(Error::BadEventFd);
        }
        let registry = lock(&self.irqfds);
        if registry.contains_key(&key) {
            return Err(Error::IrqfdBusy(key));
        }
        let own = fd.try_clone().map_err(|_| Error::BadEventFd)?;
        Ok((registry, key, own))
    }

    /// Joins `gsi`'s one resampler (under the map lock, so a leaving last member cannot
    /// retire it between lookup and join) and hands the trigger to the dispatcher.
    fn join_resampler(
        &self,
        trigger: &EventFd,
        resample: EventFd,
        gsi: Gsi,
        inject: &Arc<dyn Inject>,
    ) -> Result<(u64, Arc<Resampler<EventFd>>, u64), Error> {
        let delivery = &self.delivery;
        let (r, id) = {
            let mut resamplers = lock(&delivery.resamplers);
            let r = Arc::clone(
                resamplers
                    .entry(gsi)
                    .or_insert_with(|| Arc::new(Resampler::new(gsi))),
            );
            let id = r.join(resample);
            (r, id)
        };
        let token = trigger
            .try_clone()
            .map_err(|_| Error::BadEventFd)
            .and_then(|dup| {
                self.dispatcher
                    .add(dup, Action::Level(Arc::clone(&r)), inject)
                    .map_err(Error::Dispatcher)
            });
        match token {
            Ok(token) => Ok((token, r, id)),
            Err(e) => {
                leave_resampler(delivery, &r, id);
                Err(e)
            }
        }
    }

    /// Attaches the emulated Xen event channels: routes of kind [`Route::XenEvtchn`] deliver
    /// through `sink` from now on (userspace irqfd path, lock-free marking).
    pub fn attach_event_channels(&self, sink: Box<dyn EventChannelSink>) {
        self.delivery.xen.store(Some(Arc::new(sink)));
    }

    /// Runs `f` on the dispatcher thread each time `fd` is signalled (its count consumed),
    /// until the returned token is passed to [`Interrupts::unwatch`]. For internal consumers
    /// such as a Xen callback GSI's resamplefd.
    pub fn watch(
        self: &Arc<Self>,
        fd: &EventFd,
        f: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<u64, Error> {
        let dup = fd.try_clone().map_err(|_| Error::BadEventFd)?;
        let inject: Arc<dyn Inject> = Arc::clone(&self.delivery) as Arc<dyn Inject>;
        self.dispatcher
            .add(dup, Action::Callback(f), &inject)
            .map_err(Error::Dispatcher)
    }

    /// Stops a [`Interrupts::watch`]; when this returns its callback will not run again.
    pub fn unwatch(&self, token: u64) {
        self.dispatcher.remove(token);
    }

    /// The level line of `gsi`: the OR of any number of [`IrqSource`]s.
    pub fn line(&self, gsi: Gsi) -> Arc<Line> {
        self.delivery.line(gsi)
    }

    /// A new source on `gsi`'s line (shorthand for `line(gsi).source()`).
    pub fn irq_source(&self, gsi: Gsi) -> IrqSource {
        self.line(gsi).source()
    }

    /// Split irqchip: a guest MMIO read. Returns false if the address is not the IOAPIC's.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match (&self.delivery.ioapic, ioapic_offset(addr)) {
            (Some(ioapic), Some(off)) => {
                lock(ioapic).mmio_read(off, data);
                true
            }
            _ => false,
        }
    }

    /// Split irqchip: a guest MMIO write. Returns false if the address is not the IOAPIC's.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match (&self.delivery.ioapic, ioapic_offset(addr)) {
            (Some(_), Some(off)) => {
                self.delivery.ioapic_mmio_write(off, data);
                true
            }
            _ => false,
        }
    }

    /// Reports a guest EOI of a level vector (what `KVM_EXIT_IOAPIC_EOI` carries).
    pub fn eoi(&self, vector: u8) {
        self.delivery.eoi(vector);
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.dispatcher.shutdown();
    }
}

fn ioapic_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(IOAPIC_BASE)
        .filter(|off| *off < IOAPIC_MMIO_SIZE)
}

/// An assigned edge irqfd. Dropping it deassigns.
pub struct Irqfd {
    owner: Arc<Interrupts>,
    /// vmirq's own duplicate of the eventfd: stays valid however the caller's descriptor fares.
    fd: EventFd,
    key: RawFd,
    gsi: Gsi,
    path: IrqfdPath,
    token: Option<u64>,
    /// A userspace level irqfd's resampler and its membership id there.
    resampler: Option<(Arc<Resampler<EventFd>>, u64)>,
    level: bool,
    assigned: bool,
}

impl Irqfd {
    fn new(
        owner: &Arc<Interrupts>,
        fd: EventFd,
        key: RawFd,
        gsi: Gsi,
        path: IrqfdPath,
        token: Option<u64>,
        resampler: Option<(Arc<Resampler<EventFd>>, u64)>,
    ) -> Self {
        Self {
            owner: Arc::clone(owner),
            fd,
            key,
            gsi,
            path,
            token,
            resampler,
            level: false,
            assigned: true,
        }
    }

    pub fn gsi(&self) -> Gsi {
        self.gsi
    }

    /// Which path delivers this irqfd's events.
    pub fn path(&self) -> IrqfdPath {
        self.path
    }

    /// Deassigns. When this returns, nothing more is injected from the eventfd.
    pub fn deassign(mut self) -> Result<(), Error> {
        self.unbind()
    }

    fn unbind(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.assigned) {
            return Ok(());
        }
        lock(&self.owner.irqfds).remove(&self.key);
        match self.path {
            IrqfdPath::Kernel => {
                self.owner.router().forget_kernel_irqfd(self.gsi);
                self.owner.backend().deassign_irqfd(&self.fd, self.gsi)?;
            }
            IrqfdPath::User => {
                // Stop the trigger first, then leave the resampler: a deassigned irqfd neither
                // asserts nor is notified afterwards (model-checked in resample.rs).
                if let Some(token) = self.token {
                    self.owner.dispatcher.remove(token);
                }
                if let Some((r, id)) = self.resampler.take() {
                    leave_resampler(&self.owner.delivery, &r, id);
                }
            }
        }
        Ok(())
    }

    /// Whether this irqfd carries a resamplefd (level).
    pub fn is_level(&self) -> bool {
        self.level
    }
}

/// Leaves `r`; the last member retires the GSI's resampler (under the map lock, see
/// [`Interrupts::assign_irqfd_with_resample`]).
fn leave_resampler(delivery: &Delivery, r: &Arc<Resampler<EventFd>>, id: u64) {
    let mut resamplers = lock(&delivery.resamplers);
    if r.leave(id, delivery) {
        resamplers.remove(&r.gsi());
    }
}

impl Drop for Irqfd {
    fn drop(&mut self) {
        if let Err(e) = self.unbind() {
            tracing::warn!("irqfd on {}: deassign failed: {e}", self.gsi);
        }
    }
}

impl std::fmt::Debug for Irqfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Irqfd")
            .field("gsi", &self.gsi)
            .field("path", &self.path)
            .finish()
    }
}
