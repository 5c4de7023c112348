//! One set of port operations, two ABIs (Xen `struct evtchn_port_ops`, event_2l.c and
//! event_fifo.c). Every EVTCHNOP, route, VIRQ, PIRQ and backend path calls these, so nothing
//! else knows which ABI the guest chose. The FIFO ABI's own hypercalls (init_control,
//! expand_array, the switch from 2-level and back) are here too.
//!
//! # Switching ABIs
//!
//! The choice is one flag deliveries read after taking their port's hold. The switch (table
//! mutex held) flips it and then waits until no port is held, as a `shared_info` move does:
//! every delivery that read the old ABI has finished, every later one uses the new one. Only
//! then are the 2-level pending bits carried over.

use std::sync::atomic::Ordering;

use super::abi::{self, XenError};
use super::fifo::{self, Linked, Words};
use super::ports::{Binding, PortSlot, PortState, Table};
use super::{EventChannels, SetPending};

/// The operations whose meaning depends on the ABI. `port` is below
/// [`EventChannels::max_ports`].
pub(super) trait PortOps: Sync {
    /// The ABI's name, for traces.
    fn name(&self) -> &'static str;
    /// Marks `port` (its `slot`) pending for `vcpu` and raises what the ABI raises; the
    /// caller holds the port and raises the upcall if the result is [`SetPending::Raised`].
    fn set_pending(
        &self,
        ch: &EventChannels,
        port: u32,
        slot: &PortSlot,
        vcpu: u32,
        priority: u8,
    ) -> Result<SetPending, XenError>;
    /// Clears the port's pending bit (close).
    fn clear_pending(&self, ch: &EventChannels, port: u32);
    /// EVTCHNOP_unmask; the caller raises what it returns.
    fn unmask(&self, ch: &EventChannels, port: u32, vcpu: u32, priority: u8) -> SetPending;
    /// The port is pending.
    fn is_pending(&self, ch: &EventChannels, port: u32) -> bool;
    /// The port is masked.
    fn is_masked(&self, ch: &EventChannels, port: u32) -> bool;
    /// The port is still on a queue, so a free port cannot be reused yet.
    fn is_busy(&self, _ch: &EventChannels, _port: u32) -> bool {
        false
    }
    /// EVTCHNOP_set_priority on a valid port.
    fn set_priority(
        &self,
        ch: &EventChannels,
        t: &mut Table,
        port: u32,
        priority: u32,
    ) -> Result<(), XenError>;
    /// The port's bits, for a trace (Xen `print_state`).
    fn print_state(&self, ch: &EventChannels, port: u32) -> String;
}

/// The 2-level ABI: bits in `shared_info`.
pub(super) struct TwoLevel;
/// The FIFO ABI: event words and per-vCPU queues.
pub(super) struct Fifo;

impl PortOps for TwoLevel {
    fn name(&self) -> &'static str {
        "2-level"
    }

    /// Xen event_2l.c `evtchn_2l_set_pending`, in its strict order.
    fn set_pending(
        &self,
        ch: &EventChannels,
        port: u32,
        _slot: &PortSlot,
        vcpu: u32,
        _priority: u8,
    ) -> Result<SetPending, XenError> {
        let sh = ch.shared();
        if sh.test_and_set_pending(port)? {
            return Ok(SetPending::Coalesced);
        }
        let r = if sh.test_mask(port)? {
            Ok(SetPending::Masked)
        } else {
            ch.mark_vcpu(&sh, port, vcpu)
        };
        // Xen evtchn_2l_set_pending ends with evtchn_check_pollers, masked or not; an upcall
        // raised kicks its vCPU too (vcpu_mark_events_pending → vcpu_kick). One look at the
        // pollers for both.
        let raised = (r == Ok(SetPending::Raised)).then_some(vcpu);
        ch.poll.check(Some(port), raised);
        r
    }

    fn clear_pending(&self, ch: &EventChannels, port: u32) {
        let _ = ch.shared().clear_pending(port);
    }

    /// Xen `evtchn_2l_unmask`: clear the mask bit; if it was set and the port is pending,
    /// set the selector bit and upcall_pending as in set-pending.
    fn unmask(&self, ch: &EventChannels, port: u32, vcpu: u32, _priority: u8) -> SetPending {
        let sh = ch.shared();
        if sh.test_and_clear_mask(port) != Ok(true) || sh.test_pending(port) != Ok(true) {
            return SetPending::Masked;
        }
        let r = ch.mark_vcpu(&sh, port, vcpu).unwrap_or(SetPending::Masked);
        if r == SetPending::Raised {
            ch.poll.check(None, Some(vcpu));
        }
        r
    }

    fn is_pending(&self, ch: &EventChannels, port: u32) -> bool {
        ch.shared().test_pending(port).unwrap_or(false)
    }

    fn is_masked(&self, ch: &EventChannels, port: u32) -> bool {
        ch.shared().test_mask(port).unwrap_or(false)
    }

    /// The 2-level ABI has no priorities (`evtchn_port_set_priority` without the op).
    fn set_priority(
        &self,
        _: &EventChannels,
        _: &mut Table,
        _: u32,
        _: u32,
    ) -> Result<(), XenError> {
        Err(XenError::NoSys)
    }

    fn print_state(&self, ch: &EventChannels, port: u32) -> String {
        format!(
            "2-level port {port}: pending {} masked {}",
            self.is_pending(ch, port),
            self.is_masked(ch, port)
        )
    }
}

impl PortOps for Fifo {
    fn name(&self) -> &'static str {
        "FIFO"
    }

    /// Xen `evtchn_fifo_set_pending`, then `vcpu_mark_events_pending` for a new head whose
    /// READY bit went 0→1, and `evtchn_check_pollers` if PENDING went 0→1.
    fn set_pending(
        &self,
        ch: &EventChannels,
        port: u32,
        slot: &PortSlot,
        vcpu: u32,
        priority: u8,
    ) -> Result<SetPending, XenError> {
        let linked = ch.queues.set_pending(
            &ch.pages,
            &slot.lastq,
            slot,
            port,
            vcpu,
            u32::from(priority),
        );
        let r = match linked {
            Linked::NoWord => SetPending::Remembered,
            Linked::Dropped => SetPending::Dropped,
            Linked::Pending { newly: false } => SetPending::Coalesced,
            Linked::Pending { newly: true } => SetPending::Masked,
            Linked::Appended { .. } => SetPending::Appended,
            Linked::Head { ready: false, .. } => SetPending::ReadyAlreadySet,
            Linked::Head { ready: true, .. } => ch.mark_upcall(vcpu),
        };
        let raised = (r == SetPending::Raised).then_some(vcpu);
        let newly = linked.newly_pending().then_some(port);
        if newly.is_some() || raised.is_some() {
            ch.poll.check(newly, raised);
        }
        Ok(r)
    }

    fn clear_pending(&self, ch: &EventChannels, port: u32) {
        if let Some(w) = ch.pages.event(port) {
            w.fetch_and(!fifo::bits::PENDING, Ordering::SeqCst);
        }
    }

    /// Xen `evtchn_fifo_unmask`: clear MASKED; if PENDING, link it as set-pending does.
    /// Nothing to do for a port without an event word or a slot (never bound).
    fn unmask(&self, ch: &EventChannels, port: u32, vcpu: u32, priority: u8) -> SetPending {
        let (Some(w), Ok(slot)) = (ch.pages.event(port), ch.slot(port)) else {
            return SetPending::Masked;
        };
        w.fetch_and(!fifo::bits::MASKED, Ordering::SeqCst);
        if w.load(Ordering::SeqCst) & fifo::bits::PENDING == 0 {
            return SetPending::Masked;
        }
        self.set_pending(ch, port, slot, vcpu, priority)
            .unwrap_or(SetPending::Dropped)
    }

    fn is_pending(&self, ch: &EventChannels, port: u32) -> bool {
        ch.pages
            .event(port)
            .is_some_and(|w| w.load(Ordering::SeqCst) & fifo::bits::PENDING != 0)
    }

    /// A port without an event word reads masked (Xen `evtchn_fifo_is_masked`).
    fn is_masked(&self, ch: &EventChannels, port: u32) -> bool {
        ch.pages
            .event(port)
            .is_none_or(|w| w.load(Ordering::SeqCst) & fifo::bits::MASKED != 0)
    }

    fn is_busy(&self, ch: &EventChannels, port: u32) -> bool {
        ch.pages
            .event(port)
            .is_some_and(|w| w.load(Ordering::SeqCst) & fifo::bits::LINKED != 0)
    }

    /// Xen `evtchn_fifo_set_priority`: 0..=15, else -EINVAL. An open port's next event goes
    /// to the new queue (its old queue's tail is fixed up then, through `lastq`); a free
    /// port's priority is reset when it is bound, so nothing is kept for it.
    fn set_priority(
        &self,
        ch: &EventChannels,
        t: &mut Table,
        port: u32,
        priority: u32,
    ) -> Result<(), XenError> {
        if priority >= fifo::PRIORITIES {
            return Err(XenError::Invalid);
        }
        let state = t.state(port);
        if state != PortState::Closed {
            let b = Binding::new(state, t.vcpu(port)).with_priority(priority as u8);
            ch.slot(port)?.publish(b);
        }
        Ok(())
    }

    fn print_state(&self, ch: &EventChannels, port: u32) -> String {
        let w = ch.pages.event(port).map(|w| w.load(Ordering::SeqCst));
        format!("FIFO port {port}: word {w:x?}")
    }
}

impl EventChannels {
    /// The ABI the guest uses now.
    pub(super) fn port_ops(&self) -> &'static dyn PortOps {
        if self.fifo_on.load(Ordering::SeqCst) {
            &Fifo
        } else {
            &TwoLevel
        }
    }

    /// The port's bits under the guest's ABI, for a log line (Xen's `print_state`).
    pub fn describe_port(&self, port: u32) -> String {
        let ops = self.port_ops();
        if port >= self.max_ports() {
            return format!("{} port {port}: out of range", ops.name());
        }
        ops.print_state(self, port)
    }

    /// The guest memory the FIFO ABI writes, as `[start, end)` guest physical ranges: each
    /// vCPU's control block and each event-array page (what a VMM tracking dirty pages or
    /// checking writes needs). Empty on 2-level.
    pub fn fifo_guest_areas(&self) -> Vec<(u64, u64)> {
        let blocks = self.pages.control_gpas().into_iter().flatten();
        let blocks = blocks.map(|g| (g, g + u64::from(fifo::CONTROL_BLOCK_SIZE)));
        let pages = self.pages.page_gpas().into_iter().map(|g| (g, g + 0x1000));
        blocks.chain(pages).collect()
    }

    /// Bytes the port table holds: the buckets of binding words allocated so far, the bucket
    /// directory, and the slow-path table with its free set. Grows a bucket (256 ports) at a
    /// time, so a guest with 64 ports pays for one bucket, not for its ABI's 4096 or 2^17.
    pub fn port_table_bytes(&self) -> usize {
        self.slots.bytes() + self.lock().bytes()
    }

    /// FIFO event-array pages the guest added (1024 ports each).
    pub fn fifo_pages(&self) -> u32 {
        self.pages.count()
    }

    /// Whether the guest switched to the FIFO ABI.
    pub fn is_fifo(&self) -> bool {
        self.fifo_on.load(Ordering::SeqCst)
    }

    /// Ports the guest's ABI addresses: 4096 (1024 compat) for 2-level, 2^17 for FIFO.
    pub fn max_ports(&self) -> u32 {
        if self.fifo_on.load(Ordering::SeqCst) {
            fifo::FIFO_PORTS
        } else {
            self.layout().ports
        }
    }

    /// What the FIFO linker gave up on so far: [link retries, queue changes, no control
    /// block, closes that left a port linked]. A hostile or broken guest makes them grow.
    pub fn fifo_give_ups(&self) -> [u64; 4] {
        self.queues.give_ups.snapshot()
    }

    /// Sets `upcall_pending` for a FIFO event (Xen `vcpu_mark_events_pending`).
    fn mark_upcall(&self, vcpu: u32) -> SetPending {
        let sh = self.shared();
        if !sh.has_vcpu_info(vcpu) {
            return SetPending::NoVcpuInfo;
        }
        match sh.test_and_set_upcall_pending(vcpu) {
            Ok(false) => SetPending::Raised,
            _ => SetPending::UpcallAlreadyPending,
        }
    }

    /// EVTCHNOP_init_control (Xen `evtchn_fifo_init_control`): the vCPU (-ENOENT), the offset
    /// (inside the page, 8-byte aligned: -EINVAL), the frame (guest RAM, once per vCPU:
    /// -EINVAL). The first one switches the domain to FIFO, carrying pending events over.
    pub(super) fn init_control(
        &self,
        t: &mut Table,
        a: &mut abi::InitControl,
    ) -> Result<(), XenError> {
        a.link_bits = fifo::LINK_BITS;
        if a.vcpu >= self.config.vcpus {
            return Err(XenError::NoEntry);
        }
        if a.offset > 0x1000 - fifo::CONTROL_BLOCK_SIZE || a.offset % 8 != 0 {
            return Err(XenError::Invalid);
        }
        let gpa = a
            .control_gfn
            .checked_mul(0x1000)
            .and_then(|g| g.checked_add(u64::from(a.offset)))
            .ok_or(XenError::Invalid)?;
        self.pages.map_control(a.vcpu, gpa)?;
        if !self.fifo_on.load(Ordering::SeqCst) {
            self.switch_to_fifo(t);
        }
        Ok(())
    }

    /// Xen `setup_ports`: every open port keeps its 2-level pending state, raised once its
    /// event-array page exists. (Xen also resets priorities here; every port already has the
    /// default: a bind sets it and 2-level refuses `set_priority`.)
    fn switch_to_fifo(&self, t: &Table) {
        self.fifo_on.store(true, Ordering::SeqCst);
        self.quiesce();
        for (port, _, _) in t.open() {
            if let (true, Ok(slot)) = (TwoLevel.is_pending(self, port), self.slot(port)) {
                slot.early.store(true, Ordering::SeqCst);
            }
        }
        tracing::debug!("Xen event channels switched to FIFO");
    }

    /// EVTCHNOP_expand_array (Xen `evtchn_fifo_expand_array`): -EOPNOTSUPP before
    /// init_control, -ENOSPC past 2^17 ports, -EINVAL for a frame outside guest RAM. Events
    /// that arrived for the new page's ports before it existed are raised now.
    pub(super) fn expand_array(&self, a: &abi::ExpandArray) -> Result<(), XenError> {
        if !self.fifo_on.load(Ordering::SeqCst) {
            return Err(XenError::NotSupported);
        }
        let ports = self.pages.add_page(a.array_gfn)?;
        // A delivery that looked before the page existed remembers its event; wait for those
        // in flight, then raise what they remembered.
        for port in ports {
            let Some(slot) = self.slots.get(port) else {
                break;
            };
            slot.wait_no_readers();
            if slot.early.swap(false, Ordering::SeqCst) {
                let _ = self.deliver(port);
            }
        }
        Ok(())
    }

    /// Back to 2-level (Xen `evtchn_reset` → `evtchn_fifo_destroy`); every port is closed
    /// already.
    pub(super) fn switch_to_2level(&self) {
        if !self.fifo_on.swap(false, Ordering::SeqCst) {
            return;
        }
        self.quiesce();
        self.pages.clear();
        for q in self.queues.all() {
            q.reset(0);
        }
        for (_, slot) in self.slots.iter() {
            slot.lastq.store(0, Ordering::SeqCst);
            slot.early.store(false, Ordering::SeqCst);
        }
        tracing::debug!("Xen event channels back to 2-level");
    }

    /// The FIFO part of a close: the port forgets a remembered event and, with `wait`, the
    /// guest gets a short while to unlink it (Linux unlinks as it walks); if it does not, the
    /// port is not reused until it does ([`PortOps::is_busy`]) and the give-up is counted.
    pub(super) fn fifo_close(&self, port: u32, wait: bool) {
        if let Ok(slot) = self.slot(port) {
            slot.early.store(false, Ordering::SeqCst);
        }
        let Some(w) = self.pages.event(port).filter(|_| wait) else {
            return;
        };
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        while w.load(Ordering::SeqCst) & fifo::bits::LINKED != 0 {
            if std::time::Instant::now() >= deadline {
                self.queues
                    .give_ups
                    .close_linked
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(port, "Xen FIFO: closed port still linked");
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// How long a close waits for the guest to unlink a FIFO port.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_micros(100);
