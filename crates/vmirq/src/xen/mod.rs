//! Xen event channels for KVM guests, 2-level and FIFO ABIs, emulated entirely in userspace
//! (this host's KVM lacks `KVM_CAP_XEN_HVM`).
//!
//! The module owns the guest's port table, the VIRQ-to-port map and the VMM backend endpoints,
//! implements the `EVTCHNOP_*` hypercalls (Xen xen/common/event_channel.c, with QEMU
//! hw/i386/kvm/xen_evtchn.c's choices where Xen-on-KVM differs), and marks events the way the
//! guest's ABI says (`port_ops`): bits in `shared_info` (Xen event_2l.c) or FIFO event words
//! linked on per-vCPU priority queues ([`fifo`], Xen event_fifo.c; docs/xen-fifo.md). Raising
//! the upcall itself (vector, callback GSI) belongs to the caller's [`UpcallSink`].
//!
//! # Concurrency
//!
//! - **Lock-free**: [`EventChannels::set_pending`] (eventfd routes), [`EventChannels::notify_port`]
//!   and [`EventChannels::raise_virq`]. Each takes a per-port read hold with one `fetch_add` on
//!   the port's binding word, does the 2-level bit operations as atomic RMWs on guest memory,
//!   drops the hold, then raises the upcall. Nothing in them waits or retries. On FIFO they
//!   also take the port's (vCPU, priority) queue lock — a spinlock held for a handful of
//!   atomics, never across anything that waits — and retry a bounded number of times when
//!   the guest races them (see [`fifo`]).
//! - **One mutex** protects the slow-path [`ports::Table`] (full bindings, loopback peers,
//!   backend endpoints) and serializes every writer of the binding words and the VIRQ map:
//!   every hypercall, `bind_backend`, `unbind_backend`, `reset`. The mutex is never taken by
//!   the lock-free paths, so a hypercall can never wait on delivery.
//!
//! ## Close versus a concurrent send
//!
//! A delivery must never mark a closed port pending (a stale event would hit whatever the port
//! is reused for). The binding word carries a reader count and a `CLOSING` bit:
//!
//! 1. delivery: `old = fetch_add(READER)`; if `old` says closed or `CLOSING`, `fetch_sub` and
//!    drop the event (the send is ordered after the close, which Xen also allows);
//! 2. close (mutex held): `fetch_or(CLOSING)`, then wait until the reader count is 0. Any
//!    delivery that got in has finished its bit operations (its `fetch_sub` is a Release the
//!    closer's Acquire load synchronizes with); any later one backs off in step 1;
//! 3. close clears the port's pending bit (Xen `free_evtchn`: "avoid unexpected behavior on
//!    re-bind") — every bit set through this module before that point came from a delivery
//!    that finished, and none can come after;
//! 4. close clears the binding bits (closed, vCPU 0, not `CLOSING`), keeping the counts of
//!    readers that arrived meanwhile, who back off because the port now reads closed.
//!
//! All four steps act on one word with RMWs, so their total modification order decides every
//! race. A selector bit or `upcall_pending` left set by a finished delivery is harmless: the
//! guest scans `pending & !mask` and finds nothing, as on Xen.
//!
//! # Upcalls
//!
//! The sink is called when a vCPU's `evtchn_upcall_pending` goes 0→1, whatever
//! `evtchn_upcall_mask` says: Xen's `vcpu_mark_events_pending` asserts the HVM event-check
//! interrupt unconditionally; the mask byte only gates delivery for PV guests, and an HVM guest
//! masks with its interrupt flag. The sink is never called with the table mutex held: upcalls a
//! hypercall raises (unmask, bind_vcpu, a send) are raised once it is released, so no lock is
//! held across the upcall's `KVM_SIGNAL_MSI`. The sink must not call back into
//! [`EventChannels`].

pub mod abi;
pub mod fifo;
pub mod hypercall;
pub mod layout;
mod ops;
mod pirq;
mod poll;
mod port_ops;
pub mod ports;
mod shinfo;
mod state;
pub mod timer;
mod upcall;
mod vcpu;

#[cfg(all(test, not(loom)))]
mod fifo_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vcpu_tests;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use abi::{errno, op, virq_is_global, NR_VIRQS};
pub use abi::{XenError, DOMID_BACKEND, DOMID_SELF};
pub use hypercall::Hypercalls;
pub use layout::Layout;
use layout::{SharedInfo, LEGACY_MAX_VCPUS, MAX_VCPUS, NOT_PLACED};
pub use pirq::{map_type, msi_pirq, pirq_msi, NR_PIRQS};
use poll::PollState;
use ports::{BackendSlot, Binding, PortSlot, Slots, Table};
pub use ports::{PortState, PortStatus, Remote};
pub(crate) use state::restore;
pub use state::{XenBackendState, XenFifoState, XenState};
pub use upcall::{attach, Callback, UpcallError, Upcalls};
pub use vcpu::{timer_service, XenTimerState, MAX_POLL_PORTS, MIN_PERIOD_NS, STIME_DELTA_MAX};
use vcpu::{GuestClock, VcpuTimers};

/// The guest's Xen setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct XenConfig {
    /// vCPUs, clamped to 1..=128 (Xen's HVM limit). vCPUs 0..32 start with their `vcpu_info`
    /// in `shared_info`; the others have none until they register one with
    /// [`EventChannels::register_vcpu_info`] (which any vCPU may do).
    pub vcpus: u32,
    /// 64-bit layout; else 32-bit compat (1024 ports, u32 words).
    pub long_mode: bool,
    /// Guest physical address of `shared_info` (page-aligned).
    pub shared_info_gpa: u64,
    /// The guest's own domain id; `DOMID_SELF` in arguments means this. Should not be 0,
    /// which [`DOMID_BACKEND`] claims first.
    pub domid: u16,
}

/// Raises upcalls; implemented by the core (per-vCPU vector or callback GSI). Called when a
/// vCPU's `evtchn_upcall_pending` goes 0→1 (see the module doc).
pub trait UpcallSink: Send + Sync {
    /// Raise `vcpu`'s upcall.
    fn upcall(&self, vcpu: u32);
}

/// How a set-pending ended (Xen event_2l.c `evtchn_2l_set_pending`, event_fifo.c
/// `evtchn_fifo_set_pending`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetPending {
    /// The pending bit was already set: coalesced with an earlier event.
    Coalesced,
    /// Pending now, but the port is masked: no selector bit, no upcall until unmask.
    Masked,
    /// Pending; the vCPU's selector bit for the word was already set, so the guest will find
    /// it on its current scan.
    SelectorAlreadySet,
    /// Pending and the selector bit set, but `upcall_pending` was already set.
    UpcallAlreadyPending,
    /// `upcall_pending` went 0→1 and the upcall was raised.
    Raised,
    /// FIFO: linked behind its queue's tail; the guest finds it walking the queue.
    Appended,
    /// FIFO: the queue's new head, but its priority's READY bit was already set.
    ReadyAlreadySet,
    /// FIFO: the port's event-array page does not exist yet; the event is raised when the
    /// guest adds it (EVTCHNOP_expand_array).
    Remembered,
    /// FIFO: dropped as Xen drops it (no control block, or the port kept changing queues);
    /// counted in [`EventChannels::fifo_give_ups`].
    Dropped,
    /// Pending, but the vCPU (32 or above) has registered no `vcpu_info` yet: nothing else is
    /// marked (Xen's `dummy_vcpu_info`); the registration finds the event.
    NoVcpuInfo,
}

/// The VMM side of an interdomain channel with the guest (a backend in "domain 0").
#[derive(Debug)]
pub struct BackendPort {
    /// The backend's port number (its `remote_port` in the guest's `EVTCHNOP_status`).
    pub port: u32,
    /// Written (eventfd counter +1) whenever the guest sends on its end.
    pub notify: EventFd,
}

/// The event channels of one guest. See the module doc for what runs lock-free.
pub struct EventChannels {
    memory: GuestMemoryMmap,
    /// The setup as created; the shared_info address and the width live below.
    config: XenConfig,
    /// The ABI width (KVM_XEN_ATTR_TYPE_LONG_MODE); switched with [`Self::set_long_mode`].
    long_mode: AtomicBool,
    /// Where shared_info is (XENMAPSPACE_shared_info); moved with [`Self::move_shared_info`].
    /// Deliveries load it after taking their port's hold, so a mover that publishes a new
    /// address and then sees every port without readers knows nobody uses the old page.
    shared_info_gpa: AtomicU64,
    upcall: Arc<dyn UpcallSink>,
    /// Binding words, indexed by port, in buckets.
    slots: Slots,
    /// The guest switched to the FIFO ABI (EVTCHNOP_init_control) and not back (reset).
    /// Deliveries read it after taking their port's hold (see `port_ops`).
    fifo_on: AtomicBool,
    /// FIFO: every vCPU's 16 queues.
    queues: fifo::Queues,
    /// FIFO: the event-array pages and control blocks.
    pages: fifo::GuestPages,
    /// Port bound to (vCPU, VIRQ), at `vcpu * NR_VIRQS + virq`; 0 when none. Global VIRQs
    /// live under vCPU 0 (Xen `virq_to_evtchn`). Written under the mutex.
    virqs: Box<[AtomicU32]>,
    /// Per vCPU: where the guest placed its `vcpu_info` (VCPUOP_register_vcpu_info), or
    /// [`NOT_PLACED`]. Read lock-free by the fast path; written under the table mutex.
    placed: Box<[AtomicU64]>,
    table: Mutex<Table>,
    /// Xen system time.
    clock: GuestClock,
    /// Per vCPU: its single-shot and periodic timers.
    vcpu_timers: Mutex<Vec<VcpuTimers>>,
    /// vCPUs blocked in SCHEDOP_poll.
    poll: PollState,
    /// The port bound to each PIRQ (0: none). Read lock-free by MSI delivery; written under
    /// the table mutex.
    pirq_ports: Box<[AtomicU32]>,
    /// Called after each EVTCHNOP_bind_pirq, with no lock held.
    pirq_hook: std::sync::RwLock<Option<Box<PirqHook>>>,
    /// Per IOAPIC pin: the PIRQ its GSI is mapped to (0: none). Read lock-free by the pin's
    /// level changes; written under the table mutex.
    gsi_pirqs: Box<[AtomicU32]>,
    /// Per IOAPIC pin mapped to a PIRQ: its inputs' levels (bit 0 line, bit 1 resampled).
    gsi_levels: Box<[std::sync::atomic::AtomicU8]>,
}

/// What [`EventChannels::set_pirq_bind_hook`] installs.
type PirqHook = dyn Fn(u32) + Send + Sync;

impl EventChannels {
    /// Event channels for the guest whose RAM is `memory`, raising upcalls through `upcall`.
    pub fn new(memory: GuestMemoryMmap, config: XenConfig, upcall: Arc<dyn UpcallSink>) -> Self {
        let config = XenConfig {
            vcpus: config.vcpus.clamp(1, MAX_VCPUS),
            ..config
        };
        Self {
            pages: fifo::GuestPages::new(memory.clone(), config.vcpus),
            queues: fifo::Queues::new(config.vcpus),
            fifo_on: AtomicBool::new(false),
            memory,
            long_mode: AtomicBool::new(config.long_mode),
            shared_info_gpa: AtomicU64::new(config.shared_info_gpa),
            upcall,
            slots: Slots::default(),
            placed: (0..config.vcpus)
                .map(|_| AtomicU64::new(NOT_PLACED))
                .collect(),
            virqs: (0..config.vcpus * NR_VIRQS)
                .map(|_| AtomicU32::new(0))
                .collect(),
            table: Mutex::new(Table::default()),
            clock: GuestClock::new(),
            vcpu_timers: Mutex::new((0..config.vcpus).map(|_| VcpuTimers::default()).collect()),
            poll: PollState::default(),
            pirq_ports: (0..NR_PIRQS).map(|_| AtomicU32::new(0)).collect(),
            pirq_hook: std::sync::RwLock::new(None),
            gsi_pirqs: (0..pirq::IOAPIC_PINS).map(|_| AtomicU32::new(0)).collect(),
            gsi_levels: (0..pirq::IOAPIC_PINS)
                .map(|_| std::sync::atomic::AtomicU8::new(0))
                .collect(),
            config,
        }
    }

    /// The setup (vCPUs clamped), with shared_info's current address and width.
    pub fn config(&self) -> XenConfig {
        XenConfig {
            long_mode: self.long_mode.load(Ordering::SeqCst),
            shared_info_gpa: self.shared_info_gpa.load(Ordering::SeqCst),
            ..self.config
        }
    }

    /// The current ABI width's shared_info layout.
    pub fn layout(&self) -> Layout {
        Layout::new(self.long_mode.load(Ordering::SeqCst))
    }

    /// `EVTCHNOP` hypercall from `vcpu`: `cmd` and the guest physical address of its argument
    /// struct. Returns 0 or a negative Xen errno; out-fields are written back. Every command
    /// reads its argument first (-EFAULT outside guest RAM), as Xen's `do_event_channel_op`.
    /// All ops act on the domain, so `vcpu` only labels the trace.
    pub fn hypercall(&self, vcpu: u32, cmd: u32, args_gpa: u64) -> i64 {
        tracing::trace!(
            vcpu,
            cmd,
            args_gpa,
            abi = self.port_ops().name(),
            "EVTCHNOP"
        );
        if abi::arg_size(cmd).is_none() {
            return -errno::ENOSYS;
        }
        // Upcalls a hypercall raises (unmask, bind_vcpu, a send to self) wait until the table
        // mutex is released: no lock is held across the upcall's KVM_SIGNAL_MSI.
        let deferred = DeferredUpcalls::begin();
        let mut bound_pirq = None;
        let mut t = self.lock();
        let a = GuestAddress(args_gpa);
        let r = match cmd {
            op::ALLOC_UNBOUND => self.with_arg(a, true, |x| self.alloc_unbound(&mut t, x)),
            op::BIND_INTERDOMAIN => self.with_arg(a, true, |x| self.bind_interdomain(&mut t, x)),
            op::BIND_VIRQ => self.with_arg(a, true, |x| self.bind_virq(&mut t, x)),
            op::BIND_PIRQ => self.with_arg(a, true, |x: &mut abi::BindPirq| {
                x.port = self.bind_pirq(&mut t, x.pirq)?;
                bound_pirq = Some(x.pirq);
                Ok(())
            }),
            op::BIND_IPI => self.with_arg(a, true, |x| self.bind_ipi(&mut t, x)),
            op::CLOSE => self.with_arg(a, false, |x: &mut abi::PortArg| {
                self.check_port(x.port)?;
                self.close_port(&mut t, x.port)
            }),
            op::SEND => self.with_arg(a, false, |x| self.send(&t, x)),
            op::STATUS => self.with_arg(a, true, |x| self.status(&t, x)),
            op::BIND_VCPU => self.with_arg(a, false, |x| self.bind_vcpu(&mut t, x)),
            op::UNMASK => self.with_arg(a, false, |x: &mut abi::PortArg| {
                // Xen `evtchn_unmask`: any valid port, free ones and the reserved port 0
                // included (their vCPU is 0).
                if x.port >= self.max_ports() {
                    return Err(XenError::Invalid);
                }
                self.unmask_port(&t, x.port);
                Ok(())
            }),
            op::RESET => self.with_arg(a, false, |x: &mut abi::Reset| {
                self.check_dom(x.dom)?;
                self.close_all(&mut t);
                self.switch_to_2level();
                Ok(())
            }),
            // Xen `evtchn_reset(d, true)`: a reset here always completes in one call, so there
            // is never one to continue.
            op::RESET_CONT => self.with_arg(a, false, |x: &mut abi::Reset| {
                self.check_dom(x.dom)?;
                Err(XenError::Busy)
            }),
            op::INIT_CONTROL => self.with_arg(a, true, |x| self.init_control(&mut t, x)),
            op::EXPAND_ARRAY => self.with_arg(a, false, |x| self.expand_array(x)),
            op::SET_PRIORITY => self.with_arg(a, false, |x| self.set_priority(&mut t, x)),
            _ => Err(XenError::NoSys),
        };
        drop(t);
        for vcpu in deferred.finish() {
            self.upcall.upcall(vcpu);
        }
        if let (Ok(()), Some(pirq)) = (&r, bound_pirq) {
            self.pirq_bound(pirq);
        }
        match r {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        }
    }

    /// Marks `port` pending for `vcpu` (the eventfd route fast path, like KVM's
    /// `KVM_IRQ_ROUTING_XEN_EVTCHN {port, vcpu}`: the route names the vCPU). Lock-free. Errors:
    /// `Invalid` for a port outside 1..ports, `NoEntry` for a bad vCPU, `Closed` for a closed or
    /// closing port (the event is dropped), `Fault` when shared_info is outside guest RAM.
    pub fn set_pending(&self, port: u32, vcpu: u32) -> Result<SetPending, XenError> {
        self.check_port(port)?;
        if vcpu >= self.config.vcpus {
            return Err(XenError::NoEntry);
        }
        let guard = self.slot(port)?.try_read().ok_or(XenError::Closed)?;
        let r = self.mark_pending(port, vcpu, &guard);
        drop(guard);
        self.raise_if(r, vcpu)
    }

    /// Delivers to `port` on the vCPU it is bound to. Lock-free. Errors as `set_pending`.
    pub fn notify_port(&self, port: u32) -> Result<(), XenError> {
        self.check_port(port)?;
        self.deliver(port).map(drop)
    }

    /// Raises `virq`: a per-vCPU VIRQ on `vcpu`, a global one on the vCPU its port is bound to
    /// (`vcpu` ignored). A VIRQ nobody bound is dropped silently, as Xen does. Lock-free.
    pub fn raise_virq(&self, virq: u32, vcpu: u32) -> Result<(), XenError> {
        if virq >= NR_VIRQS {
            return Err(XenError::Invalid);
        }
        let owner = if virq_is_global(virq) { 0 } else { vcpu };
        if owner >= self.config.vcpus {
            return Err(XenError::NoEntry);
        }
        let index = (owner * NR_VIRQS + virq) as usize;
        let port = self
            .virqs
            .get(index)
            .map_or(0, |p| p.load(Ordering::Acquire));
        if port == 0 {
            return Ok(());
        }
        let Some(guard) = self.slot(port)?.try_read() else {
            return Ok(()); // Closed under us: dropped, as after the close.
        };
        // The map may be stale by one close and rebind; deliver only to a port still bound
        // to this VIRQ.
        let b = guard.binding;
        if b.stat != abi::stat::VIRQ || u32::from(b.virq) != virq {
            return Ok(());
        }
        let vcpu = u32::from(b.vcpu);
        let r = self.mark_pending(port, vcpu, &guard);
        drop(guard);
        self.raise_if(r, vcpu).map(drop)
    }

    /// Connects a VMM backend to the guest's unbound port `guest_port`, which the guest
    /// allocated with `remote_dom` [`DOMID_BACKEND`] (QEMU `xen_be_evtchn_bind_interdomain`).
    /// The guest's sends then write `notify`; the backend signals the guest with
    /// [`EventChannels::notify_port`]`(guest_port)`.
    pub fn bind_backend(&self, guest_port: u32) -> Result<BackendPort, XenError> {
        self.check_port(guest_port)?;
        let mut t = self.lock();
        if t.state(guest_port)
            != (PortState::Unbound {
                remote: Remote::Backend,
            })
        {
            return Err(XenError::Invalid);
        }
        let (be, notify) = self.new_backend(&mut t, guest_port)?;
        self.set_state(
            &mut t,
            guest_port,
            PortState::Interdomain {
                remote: Remote::Backend,
                remote_port: be,
            },
        );
        Ok(BackendPort { port: be, notify })
    }

    /// The backend on `backend_port` signals its guest end. Dropped silently if it is not
    /// connected (Xen: a send on an unconnected channel). Decided under the table mutex, so a
    /// guest port closed and reused meanwhile never receives a stale backend event.
    pub fn backend_send(&self, backend_port: u32) -> Result<(), XenError> {
        let t = self.lock();
        let slot = t
            .backends
            .get(backend_port as usize)
            .and_then(Option::as_ref)
            .ok_or(XenError::NoEntry)?;
        if !connected_to(&t, slot.guest_port, backend_port) {
            return Ok(());
        }
        // Lock-free delivery; holding the mutex only keeps the port from closing meanwhile.
        self.notify_port(slot.guest_port)
    }

    /// Opens an unconnected backend port for the guest to bind with
    /// `bind_interdomain(remote_dom = 0, remote_port = port)`.
    pub fn alloc_backend_unbound(&self) -> Result<BackendPort, XenError> {
        let mut t = self.lock();
        let (port, notify) = self.new_backend(&mut t, 0)?;
        Ok(BackendPort { port, notify })
    }

    /// Closes a backend port; a guest port connected to it goes back to unbound for domain 0
    /// (QEMU `xen_be_evtchn_unbind`).
    pub fn unbind_backend(&self, backend_port: u32) -> Result<(), XenError> {
        let mut t = self.lock();
        let slot = t
            .backends
            .get_mut(backend_port as usize)
            .and_then(Option::take)
            .ok_or(XenError::NoEntry)?;
        if connected_to(&t, slot.guest_port, backend_port) {
            let unbound = PortState::Unbound {
                remote: Remote::Backend,
            };
            self.set_state(&mut t, slot.guest_port, unbound);
        }
        Ok(())
    }

    /// VCPUOP_register_vcpu_info: `vcpu`'s `vcpu_info` moves to guest physical `gpa`, as Xen
    /// `map_guest_area` places it:
    /// - once per vCPU: a second registration is -EBUSY (`vcpu_info_area` already mapped);
    /// - within one page, aligned to the ABI's word (8 bytes, 4 for a compat guest): else
    ///   -ENXIO; in guest RAM: else -EINVAL. Any address is honoured, 0 included.
    ///
    /// The old contents are copied over (`vcpu_info_populate`); a vCPU from 32 on had none and
    /// gets zeros with `evtchn_upcall_mask` set. Then every selector bit and `upcall_pending` are
    /// set and the upcall is raised whatever `upcall_pending` was (`arch_evtchn_inject`), so
    /// no event is lost across the move, including those sent while the vCPU had no
    /// `vcpu_info`.
    pub fn register_vcpu_info(&self, vcpu: u32, gpa: u64) -> Result<(), XenError> {
        use vm_memory::Bytes;
        let slot = self.placed.get(vcpu as usize).ok_or(XenError::NoEntry)?;
        // One registration at a time: the copy and the publication are not interleaved with
        // another vCPU's (or a second one of this vCPU's).
        let t = self.lock();
        if slot.load(Ordering::Acquire) != NOT_PLACED {
            return Err(XenError::Busy);
        }
        if gpa % self.layout().word_bytes != 0 || gpa % 0x1000 + layout::VCPU_INFO_SIZE > 0x1000 {
            return Err(XenError::BadArea);
        }
        let mut old = [0u8; layout::VCPU_INFO_SIZE as usize];
        if vcpu < LEGACY_MAX_VCPUS {
            let from = self.shared_info_gpa.load(Ordering::SeqCst) + self.layout().vcpu_info(vcpu);
            self.memory
                .read_slice(&mut old, GuestAddress(from))
                .map_err(|_| XenError::Invalid)?;
        } else {
            old[layout::UPCALL_MASK as usize] = 1;
        }
        self.memory
            .write_slice(&old, GuestAddress(gpa))
            .map_err(|_| XenError::Invalid)?;
        slot.store(gpa, Ordering::Release);
        let sh = self.shared();
        sh.set_all_selectors(vcpu)?;
        sh.test_and_set_upcall_pending(vcpu)?;
        drop(t);
        self.poll.check(None, Some(vcpu));
        self.upcall.upcall(vcpu);
        Ok(())
    }

    /// Where `vcpu`'s `vcpu_info` is: the guest address it registered, or `None` while it uses
    /// the legacy slot in `shared_info` (or, from vCPU 32 on, has none).
    pub fn vcpu_info_gpa(&self, vcpu: u32) -> Option<u64> {
        let gpa = self.placed.get(vcpu as usize)?.load(Ordering::Acquire);
        (gpa != NOT_PLACED).then_some(gpa)
    }

    /// Bit 0 of the vCPU's `evtchn_upcall_pending` (false for a bad vCPU or an unreachable
    /// shared_info).
    pub fn upcall_pending(&self, vcpu: u32) -> bool {
        let sh = self.shared();
        vcpu < self.config.vcpus
            && sh.has_vcpu_info(vcpu)
            && sh.upcall_pending(vcpu).unwrap_or(false)
    }

    /// What EVTCHNOP_status would say of `port`.
    pub fn port_status(&self, port: u32) -> PortStatus {
        let t = self.lock();
        let valid = self.check_port(port).is_ok();
        let ops = self.port_ops();
        PortStatus {
            state: t.state(port),
            vcpu: t.vcpu(port),
            pending: valid && ops.is_pending(self, port),
            masked: valid && ops.is_masked(self, port),
        }
    }

    /// Closes every port and goes back to the 2-level ABI (`EVTCHNOP_reset` on the guest's
    /// behalf, e.g. at guest reboot). Backend endpoints stay open, unconnected.
    pub fn reset(&self) {
        let mut t = self.lock();
        self.close_all(&mut t);
        self.switch_to_2level();
    }

    // ---- helpers ----

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shared(&self) -> SharedInfo<'_> {
        SharedInfo::new(
            &self.memory,
            self.shared_info_gpa.load(Ordering::SeqCst),
            self.layout(),
            &self.placed,
        )
    }

    /// Waits until no delivery holds a port: every delivery that read the shared_info address
    /// or width before they changed has finished. A port held continuously by a stream of
    /// deliveries is seen free between two of them.
    fn quiesce(&self) {
        for (_, slot) in self.slots.iter() {
            slot.wait_no_readers();
        }
    }

    fn slot(&self, port: u32) -> Result<&PortSlot, XenError> {
        // A port whose bucket was never allocated was never opened.
        self.slots.get(port).ok_or(XenError::Closed)
    }

    /// Port 0 is never valid (QEMU `valid_port`; Xen keeps it reserved).
    fn check_port(&self, port: u32) -> Result<(), XenError> {
        if port == 0 || port >= self.max_ports() {
            return Err(XenError::Invalid);
        }
        Ok(())
    }

    fn is_self(&self, dom: u16) -> bool {
        dom == DOMID_SELF || dom == self.config.domid
    }

    /// Ops acting on a domain (alloc_unbound, status, reset) accept only this one. Domain 0
    /// exists (the VMM's backends answer as it) but a guest may not act on it: Xen's default
    /// XSM policy (`xsm_default_action`, XSM_TARGET) gives -EPERM. Any other domain does not
    /// exist here: -ESRCH (`rcu_lock_domain_by_any_id`).
    fn check_dom(&self, dom: u16) -> Result<(), XenError> {
        if self.is_self(dom) {
            Ok(())
        } else if dom == DOMID_BACKEND {
            Err(XenError::Permission)
        } else {
            Err(XenError::NoSuchDomain)
        }
    }

    /// Reads the argument struct (-EFAULT outside guest RAM), runs `f`, and on success writes
    /// the struct back if it has OUT fields.
    fn with_arg<T: ByteValued>(
        &self,
        gpa: GuestAddress,
        write_back: bool,
        f: impl FnOnce(&mut T) -> Result<(), XenError>,
    ) -> Result<(), XenError> {
        let mut arg: T = self.memory.read_obj(gpa).map_err(|_| XenError::Fault)?;
        f(&mut arg)?;
        if write_back {
            // Xen: a failed copy-back after success is -EFAULT, and nothing is undone.
            self.memory
                .write_obj(arg, gpa)
                .map_err(|_| XenError::Fault)?;
        }
        Ok(())
    }

    fn alloc(&self, t: &mut Table, state: PortState, vcpu: u32) -> Result<u32, XenError> {
        let port = self.free_port(t).ok_or(XenError::NoSpace)?;
        t.set(port, state, vcpu);
        self.slot(port)?.publish(Binding::new(state, vcpu));
        Ok(port)
    }

    /// The lowest port free for a new binding (a FIFO port still on a queue is not).
    fn free_port(&self, t: &mut Table) -> Option<u32> {
        let ops = self.port_ops();
        t.free_port(self.max_ports(), &self.slots, |p| ops.is_busy(self, p))
    }

    /// Changes an open port's state, keeping its vCPU and priority.
    fn set_state(&self, t: &mut Table, port: u32, state: PortState) {
        let vcpu = t.vcpu(port);
        if let Ok(slot) = self.slot(port) {
            let priority = slot.binding().priority;
            t.set(port, state, vcpu);
            slot.publish(Binding::new(state, vcpu).with_priority(priority));
        }
    }

    fn new_backend(&self, t: &mut Table, guest_port: u32) -> Result<(u32, EventFd), XenError> {
        let be = t.free_backend().ok_or(XenError::NoSpace)?;
        let io = |e: std::io::Error| XenError::Io(e.raw_os_error().unwrap_or(0));
        let notify = EventFd::new(EFD_NONBLOCK).map_err(io)?;
        let ours = notify.try_clone().map_err(io)?;
        t.backends[be as usize] = Some(BackendSlot {
            guest_port,
            notify: ours,
        });
        Ok((be, notify))
    }

    /// Delivers to an open port on its bound vCPU, lock-free.
    fn deliver(&self, port: u32) -> Result<SetPending, XenError> {
        let guard = self.slot(port)?.try_read().ok_or(XenError::Closed)?;
        let vcpu = u32::from(guard.binding.vcpu);
        let r = self.mark_pending(port, vcpu, &guard);
        drop(guard);
        self.raise_if(r, vcpu)
    }

    /// Marks the port pending through the guest's ABI, on `vcpu` at the priority of the
    /// binding `hold` took. (The fast path names the two implementations itself: a direct
    /// call the compiler inlines.)
    fn mark_pending(
        &self,
        port: u32,
        vcpu: u32,
        hold: &ports::ReadGuard<'_>,
    ) -> Result<SetPending, XenError> {
        use port_ops::PortOps;
        let (slot, priority) = (hold.slot(), hold.binding.priority);
        if self.fifo_on.load(Ordering::SeqCst) {
            port_ops::Fifo.set_pending(self, port, slot, vcpu, priority)
        } else {
            port_ops::TwoLevel.set_pending(self, port, slot, vcpu, priority)
        }
    }

    /// Sets the selector bit of the port's word, then `upcall_pending`.
    fn mark_vcpu(&self, sh: &SharedInfo<'_>, port: u32, vcpu: u32) -> Result<SetPending, XenError> {
        if !sh.has_vcpu_info(vcpu) {
            return Ok(SetPending::NoVcpuInfo);
        }
        let (word, _) = sh.layout.word_and_bit(port);
        if sh.test_and_set_selector(vcpu, word)? {
            return Ok(SetPending::SelectorAlreadySet);
        }
        if sh.test_and_set_upcall_pending(vcpu)? {
            return Ok(SetPending::UpcallAlreadyPending);
        }
        Ok(SetPending::Raised)
    }

    /// Raises the upcall `r` says went 0→1 (a poller was kicked by whoever marked it).
    fn raise_if(&self, r: Result<SetPending, XenError>, vcpu: u32) -> Result<SetPending, XenError> {
        if r == Ok(SetPending::Raised) && !DeferredUpcalls::defer(vcpu) {
            self.upcall.upcall(vcpu);
        }
        r
    }

    /// EVTCHNOP_unmask through the guest's ABI, on the port's vCPU and priority (vCPU 0 and
    /// the default priority for a free port); the upcall it raises is raised (deferred while
    /// a hypercall holds the table mutex).
    fn unmask_port(&self, t: &Table, port: u32) {
        let vcpu = t.vcpu(port);
        let priority = match self.slots.get(port) {
            Some(s) if t.state(port) != PortState::Closed => s.binding().priority,
            _ => ports::DEFAULT_PRIORITY,
        };
        let r = self.port_ops().unmask(self, port, vcpu, priority);
        let _ = self.raise_if(Ok(r), vcpu);
    }
}

thread_local! {
    /// Upcalls raised on this thread while a hypercall holds the table mutex.
    static DEFERRED: std::cell::RefCell<Option<Vec<u32>>> = const { std::cell::RefCell::new(None) };
}

/// Collects the upcalls a hypercall raises, to raise them once its table mutex is released.
/// (A hypercall never runs another one on the same thread: the sink does not call back.)
struct DeferredUpcalls;

impl DeferredUpcalls {
    fn begin() -> Self {
        DEFERRED.with(|d| *d.borrow_mut() = Some(Vec::new()));
        DeferredUpcalls
    }

    /// Records `vcpu`'s upcall if a hypercall is collecting; false if the caller raises it.
    fn defer(vcpu: u32) -> bool {
        DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            Some(list) => {
                list.push(vcpu);
                true
            }
            None => false,
        })
    }

    fn finish(self) -> Vec<u32> {
        DEFERRED.with(|d| d.borrow_mut().take().unwrap_or_default())
    }
}

impl Drop for DeferredUpcalls {
    fn drop(&mut self) {
        DEFERRED.with(|d| d.borrow_mut().take());
    }
}

/// Whether guest port `guest_port` is the live interdomain end of backend port `backend_port`.
fn connected_to(t: &Table, guest_port: u32, backend_port: u32) -> bool {
    let connected = PortState::Interdomain {
        remote: Remote::Backend,
        remote_port: backend_port,
    };
    guest_port != 0 && t.state(guest_port) == connected
}
