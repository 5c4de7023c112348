//! The delivery state of one VM, shared by the public API, the dispatcher, the lines and the
//! backend's EOI reports: it turns a GSI, a line level or an EOI into backend calls, through the
//! userspace IOAPIC on a split irqchip.
//!
//! # Locks
//!
//! Each is held only to decide; every hypervisor call (`KVM_SIGNAL_MSI`, `KVM_IRQ_LINE`,
//! `KVM_SET_GSI_ROUTING`) is made after it is released:
//!
//! - `ioapic`: the IOAPIC model and the pins whose kernel route is being committed. An
//!   operation runs under it and returns its effects; routes are committed, MSIs delivered and
//!   resamplers notified after it is released. A pin's deliveries wait for its own route
//!   commit (KVM exits on the EOI of a level vector only if a committed route names it), held
//!   in `held` meanwhile; other pins' deliveries and EOIs never wait for it.
//! - `lines`, `storm`: leaves, held for a map or list operation.
//! - `resamplers`, then a resampler's members (see resample.rs); never taken under `ioapic`.
//!
//! Lock order: the router's writer, then `ioapic` (the router reads the pins' current messages
//! while committing them); `resamplers`, then members, then `ioapic`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{Backend, EoiSink};
use crate::dispatch::{Action, Dispatcher, Inject};
use crate::interrupts::Error;
use crate::ioapic::{Effects, Ioapic};
use crate::line::{LevelSink, Line};
use crate::msi::MsiMessage;
use crate::resample::{ResampledLine, Resampler};
use crate::route::{Gsi, IrqChip, Route};
use crate::router::{lock, Router};
use crate::xen::XenError;

/// How long the storm guard holds a re-delivery back (Linux ioapic.c: HZ / 100).
const STORM_DELAY: Duration = Duration::from_millis(10);

/// Counters of the userspace path; nothing it drops goes uncounted.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events the dispatcher injected.
    pub user_injections: AtomicU64,
    /// Events the dispatcher or the userspace IOAPIC could not deliver (logged with the reason,
    /// and reported to the irqfd's owner where there is one).
    pub user_inject_errors: AtomicU64,
    /// IOAPIC re-deliveries deferred by the interrupt-storm guard.
    pub storm_deferrals: AtomicU64,
    /// Deferred re-deliveries whose delay passed and which were carried out (re-evaluated:
    /// delivered if the line was still high).
    pub storm_redeliveries: AtomicU64,
    /// Guest EOIs that reached a userspace resampler.
    pub resamples: AtomicU64,
}

/// Where routes of kind [`Route::XenEvtchn`] deliver: the emulated event channels
/// (`crate::xen::EventChannels`). Must be lock-free: it runs on the irqfd fast path.
pub trait EventChannelSink: Send + Sync {
    /// Marks `port` pending for `vcpu`; an error says why nothing was marked.
    fn set_pending(&self, port: u32, vcpu: u32) -> Result<(), XenError>;

    /// Delivers an MSI that encodes a PIRQ (`crate::xen::msi_pirq`) to the port bound to it,
    /// as QEMU's `xen_evtchn_deliver_pirq_msi`; a PIRQ bound to no port drops it, as Xen
    /// does.
    fn deliver_pirq_msi(&self, msg: MsiMessage) -> Result<(), XenError>;

    /// An input of IOAPIC pin `gsi` (its line, or `resampled`: its level irqfds' input)
    /// changed to `level`. True if the guest mapped the GSI to a PIRQ (QEMU
    /// `xen_evtchn_set_gsi`): the level is the event channel's, not the IOAPIC's.
    fn set_gsi_level(&self, gsi: u32, resampled: bool, level: bool) -> bool;
}

/// The split irqchip's IOAPIC and what its route commits hold back.
pub(crate) struct IoapicState {
    pub(crate) chip: Ioapic,
    /// Per pin: route commits in flight.
    committing: Vec<u32>,
    /// Deliveries of pins with a commit in flight.
    held: Vec<(u32, MsiMessage)>,
}

/// The storm guard's deferred re-deliveries and its one timer.
#[derive(Default)]
struct Storm {
    due: Vec<(u32, Instant)>,
    timer: Option<Arc<Timer>>,
}

pub(crate) struct Delivery {
    pub(crate) router: Router,
    /// The emulated Xen event channels, once attached.
    pub(crate) xen: arc_swap::ArcSwapOption<Box<dyn EventChannelSink>>,
    /// Split irqchip only: the userspace IOAPIC.
    pub(crate) ioapic: Option<Mutex<IoapicState>>,
    pub(crate) stats: Stats,
    /// Live lines (weak: their handles own them).
    lines: Mutex<HashMap<Gsi, Weak<Line>>>,
    /// Split irqchip: the shared resampler of each GSI with level irqfds.
    pub(crate) resamplers: Mutex<HashMap<Gsi, Arc<Resampler<EventFd>>>>,
    storm: Mutex<Storm>,
    /// Runs the storm timer (set once the VM's dispatcher exists).
    pub(crate) dispatcher: OnceLock<Weak<Dispatcher>>,
    me: Weak<Delivery>,
}

impl Delivery {
    pub(crate) fn new(router: Router, ioapic: Option<Ioapic>) -> Arc<Self> {
        Arc::new_cyclic(|me| Delivery {
            router,
            ioapic: ioapic.map(|chip| {
                Mutex::new(IoapicState {
                    committing: vec![0; chip.pins() as usize],
                    held: Vec::new(),
                    chip,
                })
            }),
            stats: Stats::default(),
            xen: arc_swap::ArcSwapOption::empty(),
            lines: Mutex::new(HashMap::new()),
            resamplers: Mutex::new(HashMap::new()),
            storm: Mutex::new(Storm::default()),
            dispatcher: OnceLock::new(),
            me: me.clone(),
        })
    }

    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        self.router.backend()
    }

    /// The line of `gsi` (one per GSI while anyone holds it), for an edge pulse.
    pub(crate) fn line(&self, gsi: Gsi) -> Arc<Line> {
        Self::line_in(&mut lock(&self.lines), gsi, &self.me)
    }

    /// The level line of `gsi`, for level sources. In the kernel irqchip mode it drives
    /// `KVM_IRQ_LINE`, whose source ID kernel edge irqfds share: refused on a pin a kernel edge
    /// irqfd reaches ([`crate::RouterError::SharedLineSource`]), and while it lives, edge
    /// irqfds on its pins go through it on the user path.
    pub(crate) fn level_line(&self, gsi: Gsi) -> Result<Arc<Line>, Error> {
        // Lock order: `lines`, then the router's writer.
        let mut lines = lock(&self.lines);
        self.router.register_level_line(gsi)?;
        Ok(Self::line_in(&mut lines, gsi, &self.me))
    }

    fn line_in(lines: &mut HashMap<Gsi, Weak<Line>>, gsi: Gsi, me: &Weak<Self>) -> Arc<Line> {
        if let Some(line) = lines.get(&gsi).and_then(Weak::upgrade) {
            return line;
        }
        let sink: Arc<dyn LevelSink> = me.upgrade().expect("called through a live Arc");
        let line = Arc::new(Line::new(gsi, sink));
        lines.insert(gsi, Arc::downgrade(&line));
        line
    }

    /// Injects `msg`, or marks the Xen event channel it encodes a PIRQ for.
    pub(crate) fn signal_msi(&self, msg: MsiMessage, devid: Option<u32>) -> Result<(), Error> {
        if crate::xen::msi_pirq(msg).is_some() {
            if let Some(xen) = self.xen.load().as_ref() {
                return Ok(xen.deliver_pirq_msi(msg)?);
            }
        }
        Ok(self.backend().signal_msi(msg, devid)?)
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
                Route::Msi { msg, devid } => self.signal_msi(msg, devid)?,
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
                    xen.set_pending(port, vcpu)?;
                }
            }
        }
        Ok(())
    }

    /// Runs `op` on the userspace IOAPIC under its lock, then, with the lock released, commits
    /// the pins' changed routes, delivers, arms the storm timer and notifies resamplers.
    pub(crate) fn with_ioapic(&self, op: impl FnOnce(&mut Ioapic, &mut Effects)) {
        let Some(ioapic) = &self.ioapic else {
            return;
        };
        let mut fx = Effects::default();
        let mut deliver = Vec::new();
        {
            let mut st = lock(ioapic);
            op(&mut st.chip, &mut fx);
            fx.routes_changed.sort_unstable();
            fx.routes_changed.dedup();
            for &pin in &fx.routes_changed {
                st.committing[pin as usize] += 1;
            }
            for (pin, msg) in fx.deliver.drain(..) {
                if st.committing[pin as usize] > 0 {
                    st.held.push((pin, msg));
                } else {
                    deliver.push((pin, msg));
                }
            }
        }
        if !fx.routes_changed.is_empty() {
            self.commit_pin_routes(ioapic, &fx.routes_changed, &mut deliver);
        }
        for (pin, msg) in deliver {
            if let Err(e) = self.backend().signal_msi(msg, None) {
                self.stats
                    .user_inject_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("IOAPIC pin {pin}: delivery failed: {e}");
            }
        }
        for pin in fx.deferred.drain(..) {
            self.defer(pin);
        }
        if !fx.resample.is_empty() {
            self.resample(&fx.resample);
        }
    }

    /// What a snapshot keeps of the delivery state: the userspace IOAPIC, and the GSIs whose
    /// lines hold their irqchip input high.
    pub(crate) fn save_state(&self) -> (Option<crate::ioapic::IoapicState>, Vec<Gsi>) {
        let Delivery {
            // Saved by the caller (leases and routes).
            router: _,
            // Saved by the event channels' owner (`EventChannels::save`).
            xen: _,
            ioapic: _,
            // Host counters, not guest state.
            stats: _,
            lines: _,
            // Membership is the level irqfds' (bound again on the target); the resampled
            // level is in the IOAPIC (userspace or in-kernel).
            resamplers: _,
            // A deferred pin is asserted, unmasked, Remote IRR clear in the IOAPIC state: the
            // target's resume evaluates every pin and delivers it.
            storm: _,
            dispatcher: _,
            me: _,
        } = self;
        (self.save_ioapic(), self.high_lines())
    }

    /// GSIs whose lines hold their irqchip input high now.
    pub(crate) fn high_lines(&self) -> Vec<Gsi> {
        let mut high: Vec<Gsi> = lock(&self.lines)
            .iter()
            .filter_map(|(gsi, line)| line.upgrade().map(|l| (*gsi, l)))
            .filter(|(_, line)| line.pushed_level())
            .map(|(gsi, _)| gsi)
            .collect();
        high.sort_unstable();
        high
    }

    /// The userspace IOAPIC's state (split irqchip).
    pub(crate) fn save_ioapic(&self) -> Option<crate::ioapic::IoapicState> {
        self.ioapic.as_ref().map(|io| lock(io).chip.save())
    }

    /// Restores the userspace IOAPIC (delivering nothing) and commits its pins' kernel
    /// routes. `Ok(false)`: this VM has no userspace IOAPIC.
    pub(crate) fn restore_ioapic(&self, state: &crate::ioapic::IoapicState) -> Result<bool, Error> {
        let Some(ioapic) = &self.ioapic else {
            return Ok(false);
        };
        let pins: Vec<u32> = {
            let mut st = lock(ioapic);
            st.chip.restore(state)?;
            (0..st.chip.pins()).collect()
        };
        self.router
            // Lock order: the router's writer, then the IOAPIC.
            .refresh_pin_msis(&pins, |pin| lock(ioapic).chip.pin_msi(pin))?;
        Ok(true)
    }

    /// Evaluates every pin of the userspace IOAPIC: delivers each asserted, unmasked level
    /// pin whose Remote IRR is clear (after a restore, which delivers nothing itself).
    pub(crate) fn evaluate_pins(&self) {
        self.with_ioapic(|chip, fx| {
            for pin in 0..chip.pins() {
                chip.redeliver_deferred(pin, fx);
            }
        });
    }

    /// Commits `pins`' kernel routes (their messages as they are at commit time), then
    /// releases the deliveries that waited for them into `deliver`.
    fn commit_pin_routes(
        &self,
        ioapic: &Mutex<IoapicState>,
        pins: &[u32],
        deliver: &mut Vec<(u32, MsiMessage)>,
    ) {
        let committed = self
            .router
            // Lock order: the router's writer (held by refresh_pin_msis), then the IOAPIC.
            .refresh_pin_msis(pins, |pin| lock(ioapic).chip.pin_msi(pin));
        if let Err(e) = committed {
            self.stats
                .user_inject_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("IOAPIC pins {pins:?}: kernel route update failed: {e}");
        }
        let mut st = lock(ioapic);
        for &pin in pins {
            st.committing[pin as usize] -= 1;
        }
        let st = &mut *st;
        let committing = &st.committing;
        st.held.retain(|&(pin, msg)| {
            let release = committing[pin as usize] == 0;
            if release {
                deliver.push((pin, msg));
            }
            !release
        });
    }

    pub(crate) fn ioapic_mmio_write(&self, offset: u64, data: &[u8]) {
        self.with_ioapic(|ioapic, fx| ioapic.mmio_write(offset, data, fx));
    }

    /// Linux ioapic.c: after IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT re-deliveries, wait ~10 ms. One
    /// timer per chip, served by the dispatcher (its thread or the VMM's event loop).
    fn defer(&self, pin: u32) {
        self.stats.storm_deferrals.fetch_add(1, Ordering::Relaxed);
        let mut storm = lock(&self.storm);
        storm.due.push((pin, Instant::now() + STORM_DELAY));
        if storm.timer.is_none() {
            match self.storm_timer() {
                Ok(timer) => storm.timer = Some(timer),
                Err(e) => {
                    // Without a timer the pin would wait for its next EOI forever: deliver
                    // now instead (the guard's delay is lost, never the interrupt).
                    tracing::warn!("IOAPIC storm guard: no timer ({e}); re-delivering at once");
                    storm.due.clear();
                    drop(storm);
                    self.with_ioapic(|ioapic, fx| ioapic.redeliver_deferred(pin, fx));
                    return;
                }
            }
        }
        let first = storm.due.iter().map(|(_, at)| *at).min();
        if let (Some(timer), Some(at)) = (&storm.timer, first) {
            timer.arm(at.saturating_duration_since(Instant::now()));
        }
    }

    fn storm_timer(&self) -> std::io::Result<Arc<Timer>> {
        let dispatcher = self
            .dispatcher
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| std::io::Error::other("the dispatcher is gone"))?;
        let timer = Arc::new(Timer::new()?);
        let me = self.me.clone();
        dispatcher.add_entry(
            Box::new(Arc::clone(&timer)),
            Timer::consume,
            Action::Callback(Arc::new(move || {
                if let Some(d) = me.upgrade() {
                    d.redeliver_due();
                }
            })),
        )?;
        Ok(timer)
    }

    /// The storm timer fired: re-deliver every deferral whose delay has passed.
    fn redeliver_due(&self) {
        let now = Instant::now();
        let due: Vec<u32> = {
            let mut storm = lock(&self.storm);
            let (due, later): (Vec<_>, Vec<_>) =
                storm.due.drain(..).partition(|(_, at)| *at <= now);
            storm.due = later;
            let next = storm.due.iter().map(|(_, at)| *at).min();
            if let (Some(timer), Some(at)) = (&storm.timer, next) {
                timer.arm(at.saturating_duration_since(now));
            }
            due.into_iter().map(|(pin, _)| pin).collect()
        };
        for pin in due {
            self.with_ioapic(|ioapic, fx| ioapic.redeliver_deferred(pin, fx));
            self.stats
                .storm_redeliveries
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The guest acknowledged `pins`: every resampler of a GSI routed to one of them notifies
    /// its members (the IOAPIC model has already dropped the resampled input).
    fn resample(&self, pins: &[u32]) {
        // Lock order: `resamplers`, then each resampler's members (in `acked`). The IOAPIC's
        // lock was released before this call.
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

    fn count_inject(&self, result: Result<(), Error>) -> Result<(), Error> {
        let counter = match result {
            Ok(()) => &self.stats.user_injections,
            Err(_) => &self.stats.user_inject_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }
}

impl Delivery {
    /// Whether a Xen PIRQ took this input of pin `gsi` (see [`EventChannelSink::set_gsi_level`]).
    fn diverted(&self, gsi: Gsi, resampled: bool, level: bool) -> bool {
        let pin = gsi.raw();
        if pin >= 64 || self.router.diverted_pins() & 1 << pin == 0 {
            return false;
        }
        self.xen
            .load()
            .as_ref()
            .is_some_and(|x| x.set_gsi_level(pin, resampled, level))
    }

    /// Pin `gsi`'s inputs go to the IOAPIC again, at `line` and `resampled`.
    pub(crate) fn give_back_pin(&self, gsi: Gsi, line: bool, resampled: bool) {
        self.set_level(gsi, line);
        if self.ioapic.is_some() {
            self.set_resampled(gsi, resampled);
        }
    }

    /// The guest EOIed pin `gsi`'s PIRQ (PHYSDEVOP_eoi): its level irqfds' resamplefds fire, as
    /// at an IOAPIC EOI.
    pub(crate) fn resample_gsi(&self, gsi: Gsi) {
        // Lock order: `resamplers`, then the resampler's members (in `acked`).
        let resamplers = lock(&self.resamplers);
        if let Some(r) = resamplers.get(&gsi) {
            r.acked();
        }
    }
}

impl LevelSink for Delivery {
    fn set_level(&self, gsi: Gsi, level: bool) {
        if self.diverted(gsi, false, level) {
            return;
        }
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

    fn line_dropped(&self, gsi: Gsi) {
        // Lock order: `lines`, then the router's writer.
        let mut lines = lock(&self.lines);
        if lines.get(&gsi).is_some_and(|w| w.strong_count() == 0) {
            lines.remove(&gsi);
            self.router.forget_level_line(gsi);
        }
    }
}

impl ResampledLine for Delivery {
    fn set_resampled(&self, gsi: Gsi, level: bool) {
        if self.diverted(gsi, true, level) {
            return;
        }
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
    fn inject_edge(&self, gsi: Gsi) -> Result<(), Error> {
        let result = Delivery::inject_edge(self, gsi);
        self.count_inject(result)
    }

    fn assert_resampled(&self, resampler: &Resampler<EventFd>) {
        resampler.assert(self);
        self.stats.user_injections.fetch_add(1, Ordering::Relaxed);
    }
}

/// A one-shot monotonic timerfd (non-blocking), armed from any thread.
pub(crate) struct Timer(OwnedFd);

impl Timer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; a negative result is an error.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once after `after` (at least 1 ns: a zero value would disarm it).
    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            tracing::warn!(
                "IOAPIC storm timer: arming failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Consumes an expiry; false if the timer had not fired.
    fn consume(fd: RawFd) -> bool {
        let mut expiries = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from the timer's descriptor.
        let n = unsafe { libc::read(fd, (&mut expiries as *mut u64).cast(), 8) };
        n == 8
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
