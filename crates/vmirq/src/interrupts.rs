//! [`Interrupts`]: the interrupt path of one VM, assembled from the router, the userspace
//! IOAPIC (split irqchip), the irqfd dispatcher and a [`Backend`].
//!
//! Everything an interrupt is comes out of it as an owned object: [`GsiRoute`] (an allocated
//! GSI and its route), [`IoapicPin`] (a pin's fixed GSI), [`EdgeIrqfd`] / [`LevelIrqfd`],
//! [`IrqSource`] (through a pin's [`Line`]) and [`Watch`]. Dropping an object undoes exactly
//! what it did; dropping every one of them and the `Arc<Interrupts>` frees the VM's interrupt
//! state and its backend.
//!
//! Locks here: `irqfds` (the identities of bound eventfds) is a leaf held for a set operation;
//! binding and unbinding call the hypervisor (`KVM_IRQFD`) with no lock held, and check the
//! routes they decided on afterwards (a generation check against the router's table).

mod restore;

pub(crate) use restore::check_irqfd as restore_check_irqfd;
pub use restore::{Restored, XenRestored};

use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use arc_swap::Guard;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

pub use crate::delivery::Stats;

use crate::backend::{Backend, BackendError, EoiSink, IrqchipMode};
use crate::delivery::{Delivery, EventChannelSink};
use crate::dispatch::{Action, Dispatch, Dispatcher, Inject, Report};
use crate::gsi::{GsiRoute, IoapicPin};
use crate::ioapic::{Ioapic, IOAPIC_BASE, IOAPIC_MMIO_SIZE};
use crate::irqfd::{duplicate, eventfd_id, Binding, EventfdId, IrqfdCore, IrqfdPath, Served};
use crate::msi::MsiMessage;
use crate::resample::Resampler;
use crate::route::{Gsi, Route, RoutingTable, MAX_GSIS};
use crate::router::{lock, GsiLease, RouteBatch, Router, RouterError};
use crate::xen::XenError;

#[allow(unused_imports)] // for doc links
use crate::{irqfd::EdgeIrqfd, irqfd::LevelIrqfd, line::IrqSource, line::Line};

/// Errors from the core's public API.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The hypervisor refused an operation.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The descriptor is not an open eventfd.
    #[error("the eventfd is not a valid open eventfd")]
    BadEventFd,
    /// The dispatcher could not be started or given the eventfd.
    #[error("could not start or feed the irqfd dispatcher: {0}")]
    Dispatcher(#[source] std::io::Error),
    /// The process (or system) has no file descriptors left (EMFILE / ENFILE).
    #[error("no file descriptors left to duplicate the eventfd: {0}")]
    FdExhausted(#[source] std::io::Error),
    /// The eventfd (or a `dup()` of it) already backs an irqfd (KVM: EBUSY).
    #[error("the eventfd already backs an irqfd")]
    IrqfdBusy,
    /// The GSI has no route to deliver through.
    #[error("{0} has no route")]
    NoRoute(Gsi),
    /// The IOAPIC has no such pin.
    #[error("the IOAPIC has no pin {pin} (it has {pins})")]
    NoSuchPin {
        /// The pin asked for.
        pin: u32,
        /// Pins it has.
        pins: u32,
    },
    /// Routing or allocation failed.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// What was asked is not possible in this configuration.
    #[error("vmirq cannot {0}")]
    Unsupported(&'static str),
    /// The emulated Xen event channels refused the event.
    #[error("Xen event channel: {0}")]
    Xen(#[from] XenError),
    /// A snapshot cannot be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

impl Error {
    /// The same error for a second party, where it can be rebuilt (route commits and backend
    /// refusals, what a batch of vectors shares); other kinds become a pointer to the first.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::Backend(e) => Error::Backend(e.duplicate()),
            Error::Router(e) => Error::Router(e.duplicate()),
            Error::NoRoute(g) => Error::NoRoute(*g),
            Error::Unsupported(what) => Error::Unsupported(what),
            _ => Error::Unsupported("serve this vector; see the error reported with it"),
        }
    }
}

/// How an [`Interrupts`] is set up.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Lowest GSI the allocator hands out (raised to the IOAPIC pin count if below it).
    pub first_dynamic_gsi: u32,
    /// One past the highest GSI the allocator hands out (at most 4096).
    pub gsi_limit: u32,
    /// Who serves userspace irqfds: vmirq's thread, or the VMM's event loop.
    pub dispatch: Dispatch,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            first_dynamic_gsi: 0,
            gsi_limit: MAX_GSIS,
            dispatch: Dispatch::Thread,
        }
    }
}

/// The interrupt path of one VM. Create with [`Interrupts::new`]; share as `Arc`.
///
/// ```
/// use vmirq::{Interrupts, IrqchipMode, SimBackend};
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
/// let irq = Interrupts::new(sim.clone(), Default::default())?;
/// // The guest programs pin 5 (edge, vector 0x31, APIC 0) through IOAPIC MMIO.
/// for (off, value) in [(0x00, 0x1a), (0x10, 0x31)] {
///     irq.mmio_write(0xFEC0_0000 + off, &u32::to_le_bytes(value));
/// }
/// let pin = irq.pin(5)?;
/// pin.inject()?;                       // one edge, through vmirq's IOAPIC
/// sim.run_until_idle();                // the simulated vCPU takes it
/// let source = pin.source()?;          // a level source on the same line
/// source.assert();                     // a rising edge: one more interrupt
/// sim.run_until_idle();
/// assert_eq!(sim.count(0, 0x31), 2);
/// # Ok::<(), vmirq::Error>(())
/// ```
pub struct Interrupts {
    delivery: Arc<Delivery>,
    dispatcher: Arc<Dispatcher>,
    /// Identities of the eventfds that back an irqfd (one irqfd per eventfd).
    irqfds: Mutex<HashSet<EventfdId>>,
    /// Eventfds to signal at [`Interrupts::resume`]: restored irqfds whose signal waited at save.
    on_resume: Mutex<Vec<EventFd>>,
    /// Restored: evaluate the userspace IOAPIC's pins at the next resume.
    evaluate_at_resume: std::sync::atomic::AtomicBool,
}

impl Interrupts {
    /// The interrupt path of the VM `backend` drives. Commits the initial routing table.
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
        let sink = Arc::downgrade(&delivery) as std::sync::Weak<dyn EoiSink>;
        backend.set_eoi_sink(sink);
        let inject: Arc<dyn Inject> = Arc::clone(&delivery) as Arc<dyn Inject>;
        let dispatcher =
            Arc::new(Dispatcher::new(config.dispatch, inject).map_err(Error::Dispatcher)?);
        let _ = delivery.dispatcher.set(Arc::downgrade(&dispatcher));
        Ok(Arc::new(Self {
            delivery,
            dispatcher,
            irqfds: Mutex::new(HashSet::new()),
            on_resume: Mutex::new(Vec::new()),
            evaluate_at_resume: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The backend this VM's interrupts reach the hypervisor through.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.delivery.router.backend()
    }

    /// Where the irqchip lives.
    pub fn mode(&self) -> IrqchipMode {
        self.delivery.router.mode()
    }

    pub(crate) fn router(&self) -> &Router {
        &self.delivery.router
    }

    pub(crate) fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// The routing table in force (lock-free; never half-written).
    pub fn routing_table(&self) -> Guard<Arc<RoutingTable>> {
        self.delivery.router.load()
    }

    /// GSIs the allocator can still hand out.
    pub fn free_gsis(&self) -> usize {
        self.delivery.router.free_gsis()
    }

    /// Starts a batch of route changes on GSIs the caller owns (one backend commit).
    pub fn routes(&self) -> RouteBatch<'_> {
        self.delivery.router.batch()
    }

    /// Allocates a GSI (lowest free first) with no route yet; give it one with
    /// [`GsiRoute::set`] or in a [`RouteBatch`]. O(log n): the table is not copied.
    pub fn allocate_route(self: &Arc<Self>) -> Result<GsiRoute, Error> {
        let lease = self.delivery.router.allocate()?;
        Ok(GsiRoute::new(Arc::clone(self), lease))
    }

    /// Allocates a GSI and gives it `route` in one commit: what a device model needs before it
    /// assigns an irqfd.
    pub fn new_route(self: &Arc<Self>, route: Route) -> Result<GsiRoute, Error> {
        let gsi = self.allocate_route()?;
        gsi.set(route)?;
        Ok(gsi)
    }

    /// Releases `routes` with one commit: their irqfds are disabled first, then every route
    /// goes, and the GSIs are reusable after that commit.
    pub fn release_routes(&self, routes: impl IntoIterator<Item = GsiRoute>) -> Result<(), Error> {
        let routes: Vec<GsiRoute> = routes.into_iter().collect();
        if let Some(r) = routes.iter().find(|r| !r.belongs_to(self.router())) {
            return Err(RouterError::ForeignRoute(r.gsi()).into());
        }
        for r in &routes {
            r.disable_irqfds();
        }
        let mut batch = self.routes();
        for r in routes {
            // The leases go before the one commit, which then also reclaims the GSIs.
            batch.remove_gsi(r.dismantle());
        }
        Ok(batch.commit()?)
    }

    /// IOAPIC pin `pin` (GSI `pin`): shared by any number of devices.
    pub fn pin(self: &Arc<Self>, pin: u32) -> Result<IoapicPin, Error> {
        let pins = self.mode().ioapic_pins();
        if pin >= pins {
            return Err(Error::NoSuchPin { pin, pins });
        }
        Ok(IoapicPin::new(Arc::clone(self), pin))
    }

    /// Injects an MSI now; one encoding a Xen PIRQ marks its event channel instead once event
    /// channels are attached.
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<(), Error> {
        self.delivery.signal_msi(msg, None)
    }

    /// Counters of the userspace path.
    pub fn stats(&self) -> &Stats {
        &self.delivery.stats
    }

    /// Stops the userspace path, as a VMM does before it saves or migrates a VM: when this
    /// returns, no userspace irqfd, watch or storm-guard timer is being served or will be
    /// until [`Interrupts::resume`], and nothing vmirq runs uses CPU. Devices may keep
    /// signalling: their eventfds keep the counts (edges coalesce, as they would in a busy
    /// dispatcher). Kernel irqfds stay assigned: KVM keeps taking their signals into the
    /// irqchip state, which the VMM pauses with its vCPUs. In [`Dispatch::EventLoop`] mode the
    /// VMM stops polling [`Interrupts::event_fd`] and [`Interrupts::irq_events`] meanwhile
    /// (nothing is served while paused). Idempotent.
    pub fn pause(&self) {
        self.dispatcher.pause();
    }

    /// Serves the userspace path again: every signal that arrived while paused is delivered
    /// now (once per eventfd, as edges coalesce). Idempotent.
    pub fn resume(&self) -> Result<(), Error> {
        if self
            .evaluate_at_resume
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.delivery.evaluate_pins();
        }
        // Written while the dispatcher still waits: it serves them once it resumes.
        for fd in std::mem::take(&mut *lock(&self.on_resume)) {
            fd.write(1).map_err(|_| Error::BadEventFd)?;
        }
        self.dispatcher.resume().map_err(Error::Dispatcher)
    }

    /// Whether [`Interrupts::pause`] is in force.
    pub fn is_paused(&self) -> bool {
        self.dispatcher.is_paused()
    }

    /// Userspace irqfds and watches the dispatcher serves.
    pub fn user_irqfds(&self) -> usize {
        self.dispatcher.len()
    }

    /// Event-loop mode: the one descriptor to wait on (readable while any userspace irqfd,
    /// watch or the storm timer has an event); then call [`Interrupts::service`].
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.dispatcher.event_fd()
    }

    /// Event-loop mode: serves every ready event without blocking; returns how many.
    pub fn service(&self) -> std::io::Result<usize> {
        self.dispatcher.service()
    }

    /// Event-loop mode, per descriptor (crosvm's `irq_event_tokens` shape): each userspace
    /// irqfd's or watch's (token, descriptor). Read it again after binding or dropping one.
    pub fn irq_events(&self) -> Vec<(u64, RawFd)> {
        self.dispatcher.tokens()
    }

    /// Event-loop mode: serves the entry `token` names if its descriptor has an event (crosvm's
    /// `service_irq_event`); returns whether it acted.
    pub fn service_irq_event(&self, token: u64) -> bool {
        self.dispatcher.serve(token)
    }

    /// Threads vmirq runs for this VM now: the dispatcher's, once a userspace irqfd exists in
    /// [`Dispatch::Thread`] mode; never any in [`Dispatch::EventLoop`] mode. (The storm guard
    /// uses one timer descriptor, no thread.)
    pub fn threads(&self) -> usize {
        self.dispatcher.threads()
    }

    /// Who serves userspace irqfds.
    pub fn dispatch(&self) -> Dispatch {
        self.dispatcher.mode()
    }

    /// Attaches the emulated Xen event channels: routes of kind [`Route::XenEvtchn`] deliver
    /// through `sink` from now on (userspace irqfd path, lock-free marking).
    pub fn attach_event_channels(&self, sink: Box<dyn EventChannelSink>) {
        self.delivery.xen.store(Some(Arc::new(sink)));
        // MSIs encoding a PIRQ now mark event channels: irqfds of such routes take the user
        // path, and a route change that would hand one to a kernel irqfd is refused.
        self.router().divert_pirqs();
    }

    /// Xen GSI PIRQs: IOAPIC pin `pin`'s inputs go to the event channels from now on; false
    /// while a kernel irqfd reaches the pin (KVM would drive it).
    pub(crate) fn divert_pin(&self, pin: u32) -> bool {
        self.router().divert_pin(pin)
    }

    /// Xen GSI PIRQs: pin `pin` is the IOAPIC's again, its inputs at `line` and `resampled`.
    pub(crate) fn undivert_pin(&self, pin: u32, line: bool, resampled: bool) {
        self.router().undivert_pin(pin);
        self.delivery
            .give_back_pin(Gsi::from_raw(pin), line, resampled);
    }

    /// Xen GSI PIRQs: the guest EOIed pin `pin`'s PIRQ; its resamplefds fire.
    pub(crate) fn resample_pin(&self, pin: u32) {
        self.delivery.resample_gsi(Gsi::from_raw(pin));
    }

    /// Runs `f` on the dispatcher each time `fd` is signalled (its count consumed), until the
    /// returned [`Watch`] is dropped. For internal consumers such as a Xen callback GSI's
    /// resamplefd.
    pub fn watch(
        self: &Arc<Self>,
        fd: &EventFd,
        f: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Watch, Error> {
        let dup = duplicate(fd)?;
        let token = self
            .dispatcher
            .add(dup, Action::Callback(f))
            .map_err(Error::Dispatcher)?;
        Ok(Watch {
            interrupts: Arc::clone(self),
            token,
        })
    }

    /// Split irqchip: a guest MMIO read. Returns false if the address is not the IOAPIC's.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match (&self.delivery.ioapic, ioapic_offset(addr)) {
            (Some(ioapic), Some(off)) => {
                lock(ioapic).chip.mmio_read(off, data);
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

    /// Claims `fd`'s identity for a new irqfd (one irqfd per eventfd, whatever descriptor
    /// names it).
    fn claim(&self, fd: &EventFd, id: Option<EventfdId>) -> Result<EventfdId, Error> {
        let id = match id {
            Some(id) => id,
            None => eventfd_id(fd.as_raw_fd())?,
        };
        if !lock(&self.irqfds).insert(id) {
            return Err(Error::IrqfdBusy);
        }
        Ok(id)
    }

    fn unclaim(&self, id: EventfdId) {
        lock(&self.irqfds).remove(&id);
    }

    /// Binds an edge irqfd on `gsi`. The caller owns `gsi` (its lease) or it is a pin's.
    pub(crate) fn bind_edge(
        self: &Arc<Self>,
        fd: &EventFd,
        id: Option<EventfdId>,
        gsi: Gsi,
        lease: Option<&Arc<GsiLease>>,
        path: Option<IrqfdPath>,
    ) -> Result<Arc<IrqfdCore>, Error> {
        let backend = Arc::clone(self.backend());
        self.bind(fd, id, gsi, lease, |own, report| {
            self.serve(
                own,
                gsi,
                |routes| {
                    let divert = self.router().diverts_pirqs();
                    let pins = self.router().diverted_pins();
                    let kernel_can = routes.iter().all(|r| {
                        crate::router::kernel_delivers(&*backend, divert, r)
                            && !crate::router::reaches(pins, r)
                    });
                    if path == Some(IrqfdPath::Kernel) && !kernel_can {
                        return Err(Error::Unsupported(
                            "deliver these routes from a kernel irqfd",
                        ));
                    }
                    // A pin with a level line takes edges through that line (user path): a
                    // kernel pulse would drop the line's level (one KVM source ID for both).
                    if let Some(pin) = self.router().edge_shares_pin(routes) {
                        if path == Some(IrqfdPath::Kernel) {
                            return Err(RouterError::SharedLineSource { gsi, pin }.into());
                        }
                        return Ok(false);
                    }
                    Ok(kernel_can && path != Some(IrqfdPath::User))
                },
                None,
                || {
                    let action = Action::Edge(gsi, Arc::clone(report));
                    let token = self
                        .dispatcher
                        .add(duplicate(own)?, action)
                        .map_err(Error::Dispatcher)?;
                    Ok(Served::User(token))
                },
            )
        })
    }

    /// Binds a level irqfd with a resamplefd on `gsi`, which must route to an IOAPIC pin.
    pub(crate) fn bind_level(
        self: &Arc<Self>,
        trigger: &EventFd,
        resample: &EventFd,
        gsi: Gsi,
        lease: Option<&Arc<GsiLease>>,
    ) -> Result<Arc<IrqfdCore>, Error> {
        let resample = duplicate(resample)?;
        let backend = Arc::clone(self.backend());
        self.bind(trigger, None, gsi, lease, |own, _| {
            self.serve(
                own,
                gsi,
                |routes| {
                    if !routes.iter().any(|r| r.ioapic_pin().is_some()) {
                        return Err(Error::Unsupported(
                            "resample a GSI that is not routed to an IOAPIC pin",
                        ));
                    }
                    let pins = self.router().diverted_pins();
                    let kernel = backend.supports_resample()
                        && routes
                            .iter()
                            .all(|r| backend.delivers(r) && !crate::router::reaches(pins, r));
                    if !kernel && self.delivery.ioapic.is_none() {
                        return Err(Error::Unsupported("resample without an IOAPIC to ack it"));
                    }
                    Ok(kernel)
                },
                Some(&resample),
                || self.join_resampler(own, duplicate(&resample)?, gsi),
            )
        })
    }

    /// Claims `fd`'s identity, lets `serve` bind vmirq's duplicate of it, and wraps the result;
    /// gives the identity back if binding fails.
    fn bind(
        self: &Arc<Self>,
        fd: &EventFd,
        id: Option<EventfdId>,
        gsi: Gsi,
        lease: Option<&Arc<GsiLease>>,
        serve: impl FnOnce(&EventFd, &Arc<Report>) -> Result<(IrqfdPath, Served), Error>,
    ) -> Result<Arc<IrqfdCore>, Error> {
        let id = self.claim(fd, id)?;
        let report = Arc::new(Report::default());
        let bound = duplicate(fd).and_then(|own| serve(&own, &report).map(|b| (own, b)));
        let (own, (path, served)) = match bound {
            Ok(b) => b,
            Err(e) => {
                self.unclaim(id);
                return Err(e);
            }
        };
        let binding = Binding {
            owner: Arc::clone(self),
            fd: own,
            id,
            served,
            lease: lease.cloned(),
        };
        Ok(Arc::new(IrqfdCore::new(gsi, path, report, binding)))
    }

    /// Picks the path from the published routes (`kernel` says whether the hypervisor serves
    /// them), calls `KVM_IRQFD` with no lock held, then checks that the routes did not change
    /// meanwhile (else undoes it and decides again). `user` binds the userspace path.
    fn serve(
        &self,
        own: &EventFd,
        gsi: Gsi,
        kernel: impl Fn(&[Route]) -> Result<bool, Error>,
        resample: Option<&EventFd>,
        user: impl FnOnce() -> Result<Served, Error>,
    ) -> Result<(IrqfdPath, Served), Error> {
        let backend = self.backend();
        for _ in 0..8 {
            let routes = self.router().load().get(gsi).to_vec();
            if routes.is_empty() {
                return Err(Error::NoRoute(gsi));
            }
            if !kernel(&routes)? {
                return Ok((IrqfdPath::User, user()?));
            }
            backend.assign_irqfd(own, gsi, resample).map_err(busy)?;
            let edge = resample.is_none();
            if self.router().register_kernel_irqfd(gsi, &routes, edge) {
                return Ok((IrqfdPath::Kernel, Served::Kernel { edge }));
            }
            backend.deassign_irqfd(own, gsi)?;
        }
        Err(Error::Unsupported(
            "bind an irqfd while its routes keep changing",
        ))
    }

    /// Joins `gsi`'s one resampler (under the map lock, so a leaving last member cannot
    /// retire it between lookup and join) and hands the trigger to the dispatcher.
    fn join_resampler(
        &self,
        trigger: &EventFd,
        resample: EventFd,
        gsi: Gsi,
    ) -> Result<Served, Error> {
        let delivery = &self.delivery;
        let (r, id) = {
            // Lock order: `resamplers`, then the resampler's members (in `join`).
            let mut resamplers = lock(&delivery.resamplers);
            let r = Arc::clone(
                resamplers
                    .entry(gsi)
                    .or_insert_with(|| Arc::new(Resampler::new(gsi))),
            );
            let id = r.join(resample);
            (r, id)
        };
        let token = duplicate(trigger).and_then(|dup| {
            self.dispatcher
                .add(dup, Action::Level(Arc::clone(&r)))
                .map_err(Error::Dispatcher)
        });
        match token {
            Ok(token) => Ok(Served::UserLevel {
                token,
                resampler: r,
                member: id,
            }),
            Err(e) => {
                leave_resampler(delivery, &r, id);
                Err(e)
            }
        }
    }

    /// Undoes a binding. No lock is held across the hypervisor call.
    pub(crate) fn unbind(&self, b: Binding, gsi: Gsi) -> Result<(), Error> {
        let result = match b.served {
            Served::Kernel { edge } => {
                self.router().forget_kernel_irqfd(gsi, edge);
                self.backend()
                    .deassign_irqfd(&b.fd, gsi)
                    .map_err(Error::from)
            }
            Served::User(token) => {
                self.dispatcher.remove(token);
                Ok(())
            }
            // Stop the trigger first, then leave the resampler: a deassigned irqfd neither
            // asserts nor is notified afterwards (model-checked in resample.rs).
            Served::UserLevel {
                token,
                resampler,
                member,
            } => {
                self.dispatcher.remove(token);
                leave_resampler(&self.delivery, &resampler, member);
                Ok(())
            }
        };
        self.unclaim(b.id);
        // Only now may the GSI be reclaimed: nothing can fire it from this eventfd any more.
        drop(b.lease);
        result
    }
}

/// A KVM EBUSY is the same error the user path gives for a bound eventfd.
fn busy(e: BackendError) -> Error {
    match e {
        BackendError::IrqfdBusy => Error::IrqfdBusy,
        e => Error::Backend(e),
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

/// Leaves `r`; the last member retires the GSI's resampler (under the map lock, see
/// [`Interrupts::join_resampler`]).
fn leave_resampler(delivery: &Delivery, r: &Arc<Resampler<EventFd>>, id: u64) {
    // Lock order: `resamplers`, then members, then the IOAPIC (the last member de-asserts).
    let mut resamplers = lock(&delivery.resamplers);
    if r.leave(id, delivery) {
        resamplers.remove(&r.gsi());
    }
}

/// A callback run on each signal of an eventfd; dropping it stops the callback (when drop
/// returns it will not run again, unless drop runs inside the callback itself).
pub struct Watch {
    interrupts: Arc<Interrupts>,
    token: u64,
}

impl Watch {
    /// The dispatcher token (for [`Interrupts::service_irq_event`]).
    pub fn token(&self) -> u64 {
        self.token
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.interrupts.dispatcher.remove(self.token);
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("token", &self.token).finish()
    }
}
