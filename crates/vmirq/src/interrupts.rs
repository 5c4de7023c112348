//! [`Interrupts`]: the interrupt path of one VM, assembled from the router, the userspace
//! IOAPIC (split irqchip), the irqfd dispatcher and a [`Backend`].

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{Backend, BackendError, EoiSink, IrqchipMode};
use crate::ioapic::{Effects, Ioapic, IOAPIC_BASE, IOAPIC_MMIO_SIZE};
use crate::irqfd::{Dispatcher, Inject, IrqfdPath};
use crate::msi::MsiMessage;
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
    #[error("vmirq cannot yet {0}")]
    Unsupported(&'static str),
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

/// Counters of the userspace path; nothing it drops goes uncounted.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events the dispatcher injected.
    pub user_injections: AtomicU64,
    /// Events the dispatcher could not inject (logged with the reason).
    pub user_inject_errors: AtomicU64,
    /// IOAPIC re-deliveries deferred by the interrupt-storm guard.
    pub storm_deferrals: AtomicU64,
}

/// The delivery state shared with the dispatcher thread and the backend's EOI reports.
struct Delivery {
    router: Router,
    /// Split irqchip only: the userspace IOAPIC. Lock order: ioapic, then the router's writer.
    ioapic: Option<Mutex<Ioapic>>,
    stats: Stats,
    me: Weak<Delivery>,
}

/// The interrupt path of one VM. Create with [`Interrupts::new`]; share as `Arc`.
pub struct Interrupts {
    delivery: Arc<Delivery>,
    dispatcher: Arc<Dispatcher>,
    /// Caller descriptors that back an irqfd (one irqfd per eventfd), with their GSI.
    irqfds: Mutex<HashMap<RawFd, Gsi>>,
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
            IrqchipMode::Split { ioapic_pins } => Some(Mutex::new(Ioapic::new(ioapic_pins))),
        };
        let delivery = Arc::new_cyclic(|me| Delivery {
            router,
            ioapic,
            stats: Stats::default(),
            me: me.clone(),
        });
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
        let key = fd.as_raw_fd();
        if !crate::sim::is_open(key) {
            return Err(Error::BadEventFd);
        }
        let mut registry = lock(&self.irqfds);
        if registry.contains_key(&key) {
            return Err(Error::IrqfdBusy(key));
        }
        let own = fd.try_clone().map_err(|_| Error::BadEventFd)?;
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
                    .add(dup, gsi, &inject)
                    .map_err(Error::Dispatcher)?;
                Ok((IrqfdPath::User, Some(token)))
            }
        })?;
        registry.insert(key, gsi);
        Ok(Irqfd {
            owner: Arc::clone(self),
            fd: own,
            key,
            gsi,
            path,
            token,
            assigned: true,
        })
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
            (Some(ioapic), Some(off)) => {
                let mut fx = Effects::default();
                let mut ioapic = lock(ioapic);
                ioapic.mmio_write(off, data, &mut fx);
                self.delivery.apply(&ioapic, fx);
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

impl Delivery {
    fn backend(&self) -> &Arc<dyn Backend> {
        self.router.backend()
    }

    fn inject_edge(&self, gsi: Gsi) -> Result<(), Error> {
        let table = self.router.load();
        let routes = table.get(gsi);
        if routes.is_empty() {
            return Err(Error::NoRoute(gsi));
        }
        let mut line_pulsed = false;
        for route in routes {
            match *route {
                Route::Msi { msg, devid } => self.backend().signal_msi(msg, devid)?,
                Route::Irqchip { chip, pin } => match (&self.ioapic, chip) {
                    (Some(ioapic), IrqChip::Ioapic) => {
                        let mut fx = Effects::default();
                        let mut ioapic = lock(ioapic);
                        ioapic.set_line(pin, true, &mut fx);
                        ioapic.set_line(pin, false, &mut fx);
                        self.apply(&ioapic, fx);
                    }
                    (Some(_), _) => {
                        return Err(Error::Unsupported("drive a PIC on a split irqchip"))
                    }
                    // One KVM_IRQ_LINE pulse drives every irqchip route of the GSI.
                    (None, _) if !line_pulsed => {
                        self.backend().set_line(gsi, true)?;
                        self.backend().set_line(gsi, false)?;
                        line_pulsed = true;
                    }
                    (None, _) => {}
                },
                Route::XenEvtchn { .. } => {
                    return Err(Error::Unsupported("deliver Xen event channel routes"))
                }
            }
        }
        Ok(())
    }

    /// Carries out what the userspace IOAPIC asked for, with its lock held so effects apply
    /// in the order the IOAPIC produced them.
    fn apply(&self, ioapic: &Ioapic, fx: Effects) {
        for pin in fx.routes_changed {
            if let Err(e) = self.router.set_pin_msi(pin, ioapic.pin_msi(pin)) {
                self.stats
                    .user_inject_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("IOAPIC pin {pin}: kernel route update failed: {e}");
            }
        }
        for (pin, msg) in fx.deliver {
            if let Err(e) = self.backend().signal_msi(msg, None) {
                self.stats
                    .user_inject_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("IOAPIC pin {pin}: delivery failed: {e}");
            }
        }
        for pin in fx.deferred {
            // Linux ioapic.c: after IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT re-deliveries, wait ~10 ms.
            self.stats.storm_deferrals.fetch_add(1, Ordering::Relaxed);
            let me = self.me.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                if let Some(d) = me.upgrade() {
                    d.redeliver_deferred(pin);
                }
            });
        }
        // fx.resample: level resamplers arrive with the level-interrupt work.
    }

    fn redeliver_deferred(&self, pin: u32) {
        if let Some(ioapic) = &self.ioapic {
            let mut fx = Effects::default();
            let mut ioapic = lock(ioapic);
            ioapic.redeliver_deferred(pin, &mut fx);
            self.apply(&ioapic, fx);
        }
    }
}

impl EoiSink for Delivery {
    fn eoi(&self, vector: u8) {
        if let Some(ioapic) = &self.ioapic {
            let mut fx = Effects::default();
            let mut ioapic = lock(ioapic);
            ioapic.eoi(vector, &mut fx);
            self.apply(&ioapic, fx);
        }
    }
}

impl Inject for Delivery {
    fn inject_from_irqfd(&self, gsi: Gsi) {
        match self.inject_edge(gsi) {
            Ok(()) => self.stats.user_injections.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!("irqfd on {gsi}: injection failed: {e}");
                self.stats
                    .user_inject_errors
                    .fetch_add(1, Ordering::Relaxed)
            }
        };
    }
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
    assigned: bool,
}

impl Irqfd {
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
                if let Some(token) = self.token {
                    self.owner.dispatcher.remove(token);
                }
            }
        }
        Ok(())
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
