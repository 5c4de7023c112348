//! The delivery state of one VM, shared by the public API, the dispatcher thread, the lines and
//! the backend's EOI reports: it turns a GSI, a line level or an EOI into backend calls, through
//! the userspace IOAPIC on a split irqchip.
//!
//! Lock order: a line's push lock or a dispatcher entry's `live` lock, then `resamplers`, then a
//! resampler's members, then `ioapic`, then the router's writer. Resamplers are notified after
//! the IOAPIC lock is released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{Backend, EoiSink};
use crate::interrupts::Error;
use crate::ioapic::{Effects, Ioapic};
use crate::irqfd::Inject;
use crate::line::{LevelSink, Line};
use crate::resample::{ResampledLine, Resampler};
use crate::route::{Gsi, IrqChip, Route};
use crate::router::{lock, Router};

/// Counters of the userspace path; nothing it drops goes uncounted.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events the dispatcher injected.
    pub user_injections: AtomicU64,
    /// Events the dispatcher or the userspace IOAPIC could not deliver (logged with the reason).
    pub user_inject_errors: AtomicU64,
    /// IOAPIC re-deliveries deferred by the interrupt-storm guard.
    pub storm_deferrals: AtomicU64,
    /// Guest EOIs that reached a userspace resampler.
    pub resamples: AtomicU64,
}

/// Where routes of kind [`Route::XenEvtchn`] deliver: the emulated event channels
/// (`crate::xen::EventChannels`). Must be lock-free: it runs on the irqfd fast path.
pub trait EventChannelSink: Send + Sync {
    /// Marks `port` pending for `vcpu`; an error says why nothing was marked.
    fn set_pending(&self, port: u32, vcpu: u32) -> Result<(), String>;
}

pub(crate) struct Delivery {
    pub(crate) router: Router,
    /// The emulated Xen event channels, once attached.
    pub(crate) xen: arc_swap::ArcSwapOption<Box<dyn EventChannelSink>>,
    /// Split irqchip only: the userspace IOAPIC.
    pub(crate) ioapic: Option<Mutex<Ioapic>>,
    pub(crate) stats: Stats,
    lines: Mutex<HashMap<Gsi, Arc<Line>>>,
    /// Split irqchip: the shared resampler of each GSI with level irqfds.
    pub(crate) resamplers: Mutex<HashMap<Gsi, Arc<Resampler<EventFd>>>>,
    me: Weak<Delivery>,
}

impl Delivery {
    pub(crate) fn new(router: Router, ioapic: Option<Ioapic>) -> Arc<Self> {
        Arc::new_cyclic(|me| Delivery {
            router,
            ioapic: ioapic.map(Mutex::new),
            stats: Stats::default(),
            xen: arc_swap::ArcSwapOption::empty(),
            lines: Mutex::new(HashMap::new()),
            resamplers: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        self.router.backend()
    }

    /// The level line of `gsi` (one per GSI, created on first use).
    pub(crate) fn line(&self, gsi: Gsi) -> Arc<Line> {
        let mut lines = lock(&self.lines);
        Arc::clone(lines.entry(gsi).or_insert_with(|| {
            let sink: Arc<dyn LevelSink> = self.me.upgrade().expect("delivery is alive");
            Arc::new(Line::new(gsi, sink))
        }))
    }

    /// One edge interrupt on `gsi` through its current routes.
    pub(crate) fn inject_edge(&self, gsi: Gsi) -> Result<(), Error> {
        let table = self.router.load();
        let routes = table.get(gsi);
        if routes.is_empty() {
            return Err(Error::NoRoute(gsi));
        }
        let mut pulsed = false;
        for route in routes {
            match *route {
                Route::Msi { msg, devid } => self.backend().signal_msi(msg, devid)?,
                Route::Irqchip { chip, .. } => {
                    if self.ioapic.is_some() && chip != IrqChip::Ioapic {
                        return Err(Error::Unsupported("drive a PIC on a split irqchip"));
                    }
                    // One pulse of the GSI's line drives every irqchip route of it.
                    if !pulsed {
                        self.line(gsi).pulse();
                        pulsed = true;
                    }
                }
                Route::XenEvtchn { port, vcpu, .. } => {
                    let xen = self.xen.load();
                    let Some(xen) = xen.as_ref() else {
                        return Err(Error::Unsupported(
                            "deliver Xen event channel routes without event channels attached",
                        ));
                    };
                    xen.set_pending(port, vcpu).map_err(Error::Xen)?;
                }
            }
        }
        Ok(())
    }

    /// Runs `op` on the userspace IOAPIC, carries out its effects in order under the lock,
    /// then notifies the resamplers of acknowledged pins with the lock released.
    fn with_ioapic(&self, op: impl FnOnce(&mut Ioapic, &mut Effects)) {
        let Some(ioapic) = &self.ioapic else {
            return;
        };
        let mut fx = Effects::default();
        let resample = {
            let mut ioapic = lock(ioapic);
            op(&mut ioapic, &mut fx);
            self.apply(&ioapic, &mut fx);
            std::mem::take(&mut fx.resample)
        };
        if !resample.is_empty() {
            self.resample(&resample);
        }
    }

    pub(crate) fn ioapic_mmio_write(&self, offset: u64, data: &[u8]) {
        self.with_ioapic(|ioapic, fx| ioapic.mmio_write(offset, data, fx));
    }

    /// Effects other than resampling, in the order the IOAPIC requires: routes before delivery.
    fn apply(&self, ioapic: &Ioapic, fx: &mut Effects) {
        for pin in fx.routes_changed.drain(..) {
            if let Err(e) = self.router.set_pin_msi(pin, ioapic.pin_msi(pin)) {
                self.stats
                    .user_inject_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("IOAPIC pin {pin}: kernel route update failed: {e}");
            }
        }
        for (pin, msg) in fx.deliver.drain(..) {
            if let Err(e) = self.backend().signal_msi(msg, None) {
                self.stats
                    .user_inject_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("IOAPIC pin {pin}: delivery failed: {e}");
            }
        }
        for pin in fx.deferred.drain(..) {
            // Linux ioapic.c: after IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT re-deliveries, wait ~10 ms.
            self.stats.storm_deferrals.fetch_add(1, Ordering::Relaxed);
            let me = self.me.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                if let Some(d) = me.upgrade() {
                    d.with_ioapic(|ioapic, fx| ioapic.redeliver_deferred(pin, fx));
                }
            });
        }
    }

    /// The guest acknowledged `pins`: every resampler of a GSI routed to one of them notifies
    /// its members (the IOAPIC model has already dropped the resampled input).
    fn resample(&self, pins: &[u32]) {
        let resamplers = lock(&self.resamplers);
        let table = self.router.load();
        for (gsi, r) in resamplers.iter() {
            let on_pin = table
                .get(*gsi)
                .iter()
                .filter_map(Route::ioapic_pin)
                .any(|pin| pins.contains(&pin));
            if on_pin {
                self.stats.resamples.fetch_add(1, Ordering::Relaxed);
                r.acked();
            }
        }
    }
}

impl LevelSink for Delivery {
    fn set_level(&self, gsi: Gsi, level: bool) {
        let result = if self.ioapic.is_some() {
            let table = self.router.load();
            self.with_ioapic(|ioapic, fx| {
                for pin in table.get(gsi).iter().filter_map(Route::ioapic_pin) {
                    ioapic.set_line(pin, level, fx);
                }
            });
            Ok(())
        } else {
            self.backend().set_line(gsi, level)
        };
        if let Err(e) = result {
            self.stats
                .user_inject_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("{gsi}: setting the line to {level} failed: {e}");
        }
    }
}

impl ResampledLine for Delivery {
    fn set_resampled(&self, gsi: Gsi, level: bool) {
        let table = self.router.load();
        self.with_ioapic(|ioapic, fx| {
            for pin in table.get(gsi).iter().filter_map(Route::ioapic_pin) {
                ioapic.set_resampled_line(pin, level, fx);
            }
        });
    }
}

impl EoiSink for Delivery {
    fn eoi(&self, vector: u8) {
        self.with_ioapic(|ioapic, fx| ioapic.eoi(vector, fx));
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

    fn assert_resampled(&self, resampler: &Resampler<EventFd>) {
        resampler.assert(self);
        self.stats.user_injections.fetch_add(1, Ordering::Relaxed);
    }
}
