//! A Xen vCPU's time and blocking: guest system time, the single-shot and periodic timers that
//! raise `VIRQ_TIMER` (Xen xen/common/sched/core.c `common_vcpu_op`, `vcpu_periodic_timer_work`),
//! and `SCHEDOP_poll` (`do_poll`, woken by `evtchn_check_pollers` and `vcpu_kick`).
//!
//! Timers run on the process-wide [`TimerService`]: one host thread for every vCPU of every
//! guest, started at the first arm. A vCPU's timers are created when first armed and kept: stop
//! only disarms them, so no timer is dropped while its table lock is held.
//!
//! Poll: the wake protocol is `super::poll`'s (model-checked).
//!
//! Locks: `vcpu_timers` → the timer service's state.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::abi::VIRQ_TIMER;
use super::timer::{Timer, TimerService};
use super::{EventChannels, XenError};

/// Xen `STIME_DELTA_MAX`: the longest period a periodic timer accepts.
pub const STIME_DELTA_MAX: u64 = u64::MAX >> 2;
/// Xen's floor for a periodic timer's period (`MILLISECS(1)`).
pub const MIN_PERIOD_NS: u64 = 1_000_000;
/// Xen `do_poll`'s "fairly arbitrary limit" of ports in one poll.
pub const MAX_POLL_PORTS: usize = 128;

/// The process-wide timer service every guest's vCPU timers share.
pub fn timer_service() -> &'static TimerService {
    static SERVICE: OnceLock<TimerService> = OnceLock::new();
    SERVICE.get_or_init(TimerService::new)
}

/// Xen system time: monotonic nanoseconds plus an offset the VMM sets to match the guest's
/// pvclock.
pub(super) struct GuestClock {
    epoch: Instant,
    offset: AtomicI64,
}

impl GuestClock {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            offset: AtomicI64::new(0),
        }
    }

    pub(super) fn now(&self) -> u64 {
        let elapsed = self.epoch.elapsed().as_nanos() as i64;
        elapsed.saturating_add(self.offset.load(Ordering::Acquire)) as u64
    }

    pub(super) fn set(&self, now_ns: u64) {
        let elapsed = self.epoch.elapsed().as_nanos() as i64;
        self.offset
            .store((now_ns as i64).wrapping_sub(elapsed), Ordering::Release);
    }

    /// The host instant of guest time `t`, and whether `t` has passed.
    fn instant(&self, t: u64) -> (Instant, bool) {
        let (guest_now, host_now) = (self.now(), Instant::now());
        if t <= guest_now {
            (host_now, true)
        } else {
            // Clamped to about 13 days, which no Instant overflows: a timer whose deadline is
            // further fires then and re-arms for the rest (singleshot_fired, periodic_fired).
            let wait = Duration::from_nanos((t - guest_now).min(1 << 50));
            (host_now.checked_add(wait).unwrap_or(host_now), false)
        }
    }
}

/// One vCPU's timers.
#[derive(Default)]
pub(super) struct VcpuTimers {
    singleshot: Option<Arc<Timer>>,
    /// The armed single-shot deadline, in guest time.
    singleshot_at: Option<u64>,
    periodic: Option<Arc<Timer>>,
    /// 0: stopped.
    period: u64,
    /// Guest time of the last periodic event (Xen `periodic_last_event`).
    last_event: u64,
}

/// A saved vCPU timer state (guest-time deadlines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct XenTimerState {
    /// The vCPU.
    pub vcpu: u32,
    /// The single-shot deadline, if armed.
    pub singleshot: Option<u64>,
    /// The periodic timer's period in ns (0: stopped).
    pub period: u64,
    /// Guest time of the last periodic event.
    pub last_event: u64,
}

impl EventChannels {
    /// Xen system time now, in ns.
    pub fn guest_time(&self) -> u64 {
        self.clock.now()
    }

    /// Sets Xen system time to `now_ns` (match the guest's pvclock); armed timers keep their
    /// guest-time deadlines.
    pub fn set_guest_time(self: &Arc<Self>, now_ns: u64) {
        self.clock.set(now_ns);
        let mut timers = self.lock_timers();
        for vcpu in 0..timers.len() as u32 {
            self.rearm(&mut timers, vcpu);
        }
    }

    /// VCPUOP_set_singleshot_timer from `caller` for `vcpu`: `VIRQ_TIMER` at guest time
    /// `timeout_abs_ns`, at once if it passed. Only a vCPU's own timer (-EINVAL otherwise).
    pub fn set_singleshot_timer(
        self: &Arc<Self>,
        caller: u32,
        vcpu: u32,
        timeout_abs_ns: u64,
    ) -> Result<(), XenError> {
        self.check_vcpu(vcpu)?;
        if caller != vcpu {
            return Err(XenError::Invalid);
        }
        let mut timers = self.lock_timers();
        let t = &mut timers[vcpu as usize];
        if timeout_abs_ns < self.clock.now() {
            // Xen: "Simplify the logic if the timeout has already expired and just inject the
            // event."
            t.singleshot_at = None;
            if let Some(timer) = &t.singleshot {
                timer.disarm();
            }
            drop(timers);
            return self.raise_virq(VIRQ_TIMER, vcpu);
        }
        t.singleshot_at = Some(timeout_abs_ns);
        self.rearm(&mut timers, vcpu);
        Ok(())
    }

    /// VCPUOP_stop_singleshot_timer (a vCPU's own only: -EINVAL otherwise).
    pub fn stop_singleshot_timer(&self, caller: u32, vcpu: u32) -> Result<(), XenError> {
        self.check_vcpu(vcpu)?;
        if caller != vcpu {
            return Err(XenError::Invalid);
        }
        let mut timers = self.lock_timers();
        let t = &mut timers[vcpu as usize];
        t.singleshot_at = None;
        let timer = t.singleshot.clone();
        drop(timers);
        if let Some(timer) = timer {
            // No VIRQ_TIMER from this timer once stop returns.
            timer.disarm();
            timer.wait_idle();
        }
        Ok(())
    }

    /// VCPUOP_set_periodic_timer: `VIRQ_TIMER` every `period_ns` (1 ms ..= `STIME_DELTA_MAX`,
    /// else -EINVAL); an event is due at once if a period has passed since the last one
    /// (Xen `vcpu_periodic_timer_work`).
    pub fn set_periodic_timer(self: &Arc<Self>, vcpu: u32, period_ns: u64) -> Result<(), XenError> {
        self.check_vcpu(vcpu)?;
        if !(MIN_PERIOD_NS..=STIME_DELTA_MAX).contains(&period_ns) {
            return Err(XenError::Invalid);
        }
        let mut timers = self.lock_timers();
        timers[vcpu as usize].period = period_ns;
        self.rearm(&mut timers, vcpu);
        Ok(())
    }

    /// VCPUOP_stop_periodic_timer.
    pub fn stop_periodic_timer(&self, vcpu: u32) -> Result<(), XenError> {
        self.check_vcpu(vcpu)?;
        let mut timers = self.lock_timers();
        let t = &mut timers[vcpu as usize];
        t.period = 0;
        let timer = t.periodic.clone();
        drop(timers);
        if let Some(timer) = timer {
            // No VIRQ_TIMER from this timer once stop returns (a firing in flight is waited
            // for with no lock held: it takes the timer table).
            timer.disarm();
            timer.wait_idle();
        }
        Ok(())
    }

    /// Arms `vcpu`'s timers for their guest-time deadlines (called with the table locked).
    fn rearm(self: &Arc<Self>, timers: &mut [VcpuTimers], vcpu: u32) {
        let t = &mut timers[vcpu as usize];
        if let Some(at) = t.singleshot_at {
            let me = Arc::downgrade(self);
            let timer = t.singleshot.get_or_insert_with(|| {
                Arc::new(timer_service().timer(move || singleshot_fired(&me, vcpu)))
            });
            timer.arm(self.clock.instant(at).0);
        }
        if t.period != 0 {
            let next = t.last_event.saturating_add(t.period);
            let me = Arc::downgrade(self);
            let timer = t.periodic.get_or_insert_with(|| {
                Arc::new(timer_service().timer(move || periodic_fired(&me, vcpu)))
            });
            timer.arm(self.clock.instant(next).0);
        }
    }

    /// SCHEDOP_poll: blocks the calling thread (`vcpu`'s) until one of `ports` is pending
    /// (masked or not), an upcall is raised on `vcpu`, guest time `timeout_abs_ns` passes
    /// (0: no timeout), or [`EventChannels::kick`] names `vcpu`. A single-port poll wakes only
    /// on its port (and kicks); several ports wake on any port of the domain, as Xen's
    /// `evtchn_check_pollers`. -EINVAL for more than 128 ports or a bad port. Returns at once
    /// if `vcpu`'s upcall is pending (Xen `local_events_need_delivery`).
    pub fn poll(&self, vcpu: u32, ports: &[u32], timeout_abs_ns: u64) -> Result<(), XenError> {
        self.check_vcpu(vcpu)?;
        if ports.len() > MAX_POLL_PORTS {
            return Err(XenError::Invalid);
        }
        let single = (ports.len() == 1).then(|| ports[0]);
        let polling = self.poll.enter(vcpu, single);
        // Checked after counting in: a delivery from now on sees the poller.
        let ops = self.port_ops();
        let mut ready = self.upcall_pending(vcpu);
        for &port in ports {
            if port >= self.max_ports() {
                return Err(XenError::Invalid);
            }
            ready |= ops.is_pending(self, port);
        }
        if !ready {
            let deadline = (timeout_abs_ns != 0).then(|| self.clock.instant(timeout_abs_ns));
            match deadline {
                Some((_, true)) => {}
                Some((at, false)) => polling.wait(Some(at)),
                None => polling.wait(None),
            }
        }
        Ok(())
    }

    /// Wakes `vcpu` from a poll (Xen `vcpu_kick`); a VMM calls it before pausing vCPUs.
    pub fn kick(&self, vcpu: u32) {
        self.poll.check(None, Some(vcpu));
    }

    /// Wakes `vcpu`'s poll, if any (an upcall raised outside set-pending).
    pub(super) fn poll_kick(&self, vcpu: u32) {
        self.poll.check(None, Some(vcpu));
    }

    /// vCPUs blocked in [`EventChannels::poll`] right now.
    pub fn pollers(&self) -> usize {
        self.poll.pollers()
    }

    /// The vCPUs' timers, for a snapshot.
    pub(super) fn save_timers(&self) -> Vec<XenTimerState> {
        let timers = self.lock_timers();
        timers
            .iter()
            .enumerate()
            .filter(|(_, t)| t.singleshot_at.is_some() || t.period != 0)
            .map(|(vcpu, t)| XenTimerState {
                vcpu: vcpu as u32,
                singleshot: t.singleshot_at,
                period: t.period,
                last_event: t.last_event,
            })
            .collect()
    }

    /// Arms the saved timers (guest time already set).
    pub(super) fn restore_timers(self: &Arc<Self>, saved: &[XenTimerState]) {
        let mut timers = self.lock_timers();
        for s in saved {
            if let Some(t) = timers.get_mut(s.vcpu as usize) {
                t.singleshot_at = s.singleshot;
                t.period = s.period;
                t.last_event = s.last_event;
                self.rearm(&mut timers, s.vcpu);
            }
        }
    }

    fn lock_timers(&self) -> MutexGuard<'_, Vec<VcpuTimers>> {
        self.vcpu_timers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_vcpu(&self, vcpu: u32) -> Result<(), XenError> {
        if vcpu < self.config.vcpus {
            Ok(())
        } else {
            Err(XenError::NoEntry)
        }
    }

    /// Reads `n` ports from the guest array at `gpa` (-EFAULT outside guest RAM).
    pub(super) fn read_ports(&self, gpa: u64, n: u32) -> Result<Vec<u32>, XenError> {
        if n as usize > MAX_POLL_PORTS {
            return Err(XenError::Invalid);
        }
        let mut bytes = vec![0u8; n as usize * 4];
        self.memory
            .read_slice(&mut bytes, GuestAddress(gpa))
            .map_err(|_| XenError::Fault)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn singleshot_fired(me: &Weak<EventChannels>, vcpu: u32) {
    let Some(ch) = me.upgrade() else { return };
    {
        let mut timers = ch.lock_timers();
        let t = &mut timers[vcpu as usize];
        // Re-armed for later, or stopped, while this firing was on its way: not ours.
        match t.singleshot_at {
            Some(at) if at <= ch.clock.now() => t.singleshot_at = None,
            Some(_) => {
                ch.rearm(&mut timers, vcpu);
                return;
            }
            None => return,
        }
    }
    let _ = ch.raise_virq(VIRQ_TIMER, vcpu);
}

fn periodic_fired(me: &Weak<EventChannels>, vcpu: u32) {
    let Some(ch) = me.upgrade() else { return };
    let fire = {
        let mut timers = ch.lock_timers();
        let now = ch.clock.now();
        let t = &mut timers[vcpu as usize];
        if t.period == 0 {
            return;
        }
        // Xen vcpu_periodic_timer_work: the next event a period after this one.
        let due = t.last_event.saturating_add(t.period) <= now;
        if due {
            t.last_event = now;
        }
        ch.rearm(&mut timers, vcpu);
        due
    };
    if fire {
        let _ = ch.raise_virq(VIRQ_TIMER, vcpu);
    }
}
