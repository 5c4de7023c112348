//! The port table.
//!
//! Each port has two halves:
//! - a [`PortSlot`]: one atomic word holding what delivery needs (state, vCPU, VIRQ number,
//!   priority) plus a reader count. Delivery reads it without a lock; only the holder of the
//!   [`Table`] mutex changes the binding bits.
//! - a [`PortState`] in the [`Table`], under the mutex: the whole binding, including peers and
//!   remote domains, which only the hypercall path needs.
//!
//! Ports live in buckets of [`BUCKET_PORTS`], allocated the first time a port of the bucket
//! is handed out and kept until the channels are dropped (Xen `evtchn_allocate_port` grows the
//! same way), so a guest with 64 ports holds one bucket however many ports its ABI addresses
//! (4096 for 2-level, 2^17 for FIFO). Free ports below the high-water mark sit in an ordered
//! set, so the lowest free port is found without scanning the table.
//!
//! The reader count is a per-port read-trylock in the spirit of Xen's `evtchn_read_trylock`
//! (Xen ≥ 4.15 event_channel.c): delivery takes it with one `fetch_add` and backs off if the port
//! is closed or being closed; close sets `CLOSING`, waits for the readers in flight to leave,
//! clears the pending bit, and only then marks the slot closed. See the module doc of `xen`.

use std::collections::BTreeSet;
use std::sync::OnceLock;

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::abi::stat;

/// Default FIFO priority (event_channel.h `EVTCHN_FIFO_PRIORITY_DEFAULT`); 2-level ignores it.
pub const DEFAULT_PRIORITY: u8 = 7;

/// Where the other end of an unbound or interdomain port lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Remote {
    /// The guest itself: a loopback pair.
    Guest,
    /// A VMM backend (domain 0); the port number is the backend's.
    Backend,
    /// Another domain, as `EVTCHNOP_alloc_unbound` named it: no such domain exists here, so
    /// the port stays unbound (status reports the domain).
    Domain(u16),
}

/// A port's binding, as `EVTCHNOP_status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PortState {
    /// `EVTCHNSTAT_closed`: free.
    Closed,
    /// `EVTCHNSTAT_unbound`: open, waiting for `remote` to bind the other end
    /// (`EVTCHNOP_alloc_unbound`, or a peer that went away).
    Unbound {
        /// Who may bind the other end.
        remote: Remote,
    },
    /// `EVTCHNSTAT_interdomain`: connected to `remote_port` of `remote`.
    Interdomain {
        /// Where the other end lives.
        remote: Remote,
        /// The other end's port: a guest port for [`Remote::Guest`], a backend port for
        /// [`Remote::Backend`].
        remote_port: u32,
    },
    /// `EVTCHNSTAT_pirq`: bound to this physical IRQ.
    Pirq(u32),
    /// `EVTCHNSTAT_virq`: bound to this VIRQ by `EVTCHNOP_bind_virq`.
    Virq(u32),
    /// `EVTCHNSTAT_ipi`: bound by `EVTCHNOP_bind_ipi`; a send notifies the port's own vCPU.
    Ipi,
}

impl PortState {
    /// The `EVTCHNSTAT_*` value for this state.
    pub fn stat(self) -> u32 {
        match self {
            PortState::Closed => stat::CLOSED,
            PortState::Unbound { .. } => stat::UNBOUND,
            PortState::Interdomain { .. } => stat::INTERDOMAIN,
            PortState::Pirq(_) => stat::PIRQ,
            PortState::Virq(_) => stat::VIRQ,
            PortState::Ipi => stat::IPI,
        }
    }
}

/// What [`crate::xen::EventChannels::port_status`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortStatus {
    /// The port's binding.
    pub state: PortState,
    /// The vCPU the port notifies.
    pub vcpu: u32,
    /// The port's bits in `shared_info` (false when shared_info is outside guest RAM).
    pub pending: bool,
    /// The port's mask bit in `shared_info` (false when shared_info is outside guest RAM).
    pub masked: bool,
}

// Binding word: bits 2:0 state (EVTCHNSTAT_*), bit 3 CLOSING, bits 7:4 priority, bits 15:8
// VIRQ number, bits 31:16 vCPU, bits 63:32 readers in flight.
const STATE_MASK: u64 = 0x7;
const CLOSING: u64 = 1 << 3;
const PRIORITY_SHIFT: u32 = 4;
const VIRQ_SHIFT: u32 = 8;
const VCPU_SHIFT: u32 = 16;
const BINDING_BITS: u64 = 0xffff_ffff;
const READER: u64 = 1 << 32;

/// The delivery half of a binding, as packed into a [`PortSlot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The port's `EVTCHNSTAT_*` value (3 bits).
    pub stat: u32,
    /// FIFO priority (4 bits), [`DEFAULT_PRIORITY`] until `EVTCHNOP_set_priority`.
    pub priority: u8,
    /// The VIRQ number for a VIRQ port, the PIRQ for a PIRQ port, else 0.
    pub virq: u8,
    /// The vCPU the port notifies.
    pub vcpu: u16,
}

impl Binding {
    /// The delivery half of `state` bound to `vcpu`, at the default priority.
    pub fn new(state: PortState, vcpu: u32) -> Self {
        let virq = match state {
            PortState::Virq(n) | PortState::Pirq(n) => n as u8,
            _ => 0,
        };
        Self {
            stat: state.stat(),
            priority: DEFAULT_PRIORITY,
            virq,
            vcpu: vcpu as u16,
        }
    }

    /// The same binding at FIFO `priority` (0..=15).
    pub fn with_priority(self, priority: u8) -> Self {
        Self { priority, ..self }
    }

    fn encode(self) -> u64 {
        u64::from(self.stat) & STATE_MASK
            | u64::from(self.priority & 0xf) << PRIORITY_SHIFT
            | u64::from(self.virq) << VIRQ_SHIFT
            | u64::from(self.vcpu) << VCPU_SHIFT
    }

    fn decode(word: u64) -> Self {
        Self {
            stat: (word & STATE_MASK) as u32,
            priority: ((word >> PRIORITY_SHIFT) & 0xf) as u8,
            virq: (word >> VIRQ_SHIFT) as u8,
            vcpu: (word >> VCPU_SHIFT) as u16,
        }
    }
}

/// One port's atomic binding word, and the FIFO ABI's per-port host state.
#[derive(Debug)]
pub struct PortSlot {
    word: AtomicU64,
    /// FIFO: the queue the port was last linked on (Xen `fifo_lastq`: vCPU in bits 15:0,
    /// priority in bits 19:16). Changed only with that queue's and the new queue's locks held.
    pub lastq: AtomicU32,
    /// FIFO: an event arrived while the port's event-array page did not exist yet (Xen
    /// `evtchn->pending`); raised when the page is added.
    pub early: AtomicBool,
}

impl Default for PortSlot {
    fn default() -> Self {
        Self {
            word: AtomicU64::new(0),
            lastq: AtomicU32::new(0),
            early: AtomicBool::new(false),
        }
    }
}

/// A read hold on an open port: while it lives, the port cannot finish closing.
pub struct ReadGuard<'a> {
    slot: &'a PortSlot,
    /// The binding when the hold was taken; the port cannot finish closing while it is held.
    pub binding: Binding,
}

impl<'a> ReadGuard<'a> {
    /// The slot held.
    pub fn slot(&self) -> &'a PortSlot {
        self.slot
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        // Release: the guest-memory bit operations done under the guard happen before the
        // closer's Acquire load that sees the count drop.
        self.slot.word.fetch_sub(READER, Ordering::Release);
    }
}

impl PortSlot {
    /// Takes a read hold if the port is open and not closing. Wait-free: one `fetch_add`, and
    /// one `fetch_sub` when backing off.
    pub fn try_read(&self) -> Option<ReadGuard<'_>> {
        // SeqCst: the holder's later load of the shared_info address is ordered after it, as
        // a mover's check for readers is after its store of the new address.
        let old = self.word.fetch_add(READER, Ordering::SeqCst);
        if old & STATE_MASK == u64::from(stat::CLOSED) || old & CLOSING != 0 {
            self.word.fetch_sub(READER, Ordering::Release);
            return None;
        }
        Some(ReadGuard {
            slot: self,
            binding: Binding::decode(old),
        })
    }

    /// The current binding, without taking a hold.
    pub fn binding(&self) -> Binding {
        Binding::decode(self.word.load(Ordering::Acquire))
    }

    /// Replaces the binding bits, keeping the reader count. Only the [`Table`] mutex holder
    /// calls this, so the binding bits cannot change between the load and the xor.
    pub fn publish(&self, binding: Binding) {
        let old = self.word.load(Ordering::Acquire) & BINDING_BITS;
        self.word
            .fetch_xor(old ^ binding.encode(), Ordering::AcqRel);
    }

    /// First half of a close (mutex held): stops new readers and waits for those in flight.
    pub fn begin_close(&self) {
        self.word.fetch_or(CLOSING, Ordering::AcqRel);
        self.wait_no_readers();
    }

    /// Waits until the port is held by no reader at some instant. Each reader holds it for a
    /// handful of atomic operations on guest memory and never blocks, so the wait is short; it
    /// yields after a few spins rather than burn a core.
    pub fn wait_no_readers(&self) {
        let mut spins = 0u32;
        // SeqCst after the caller's SeqCst store of what readers load (the shared_info
        // address): a reader counted in later loads the new value. loom models SeqCst as
        // AcqRel only, so its model reads with an RMW, which AcqRel alone orders the same way.
        #[cfg(not(loom))]
        let readers = || self.word.load(Ordering::SeqCst);
        #[cfg(loom)]
        let readers = || self.word.fetch_add(0, Ordering::SeqCst);
        while readers() >= READER {
            #[cfg(loom)]
            loom::thread::yield_now();
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Second half of a close: the slot reads closed, vCPU 0, and accepts readers again (who
    /// back off because it is closed). Readers that arrived meanwhile keep their count.
    pub fn finish_close(&self) {
        self.word.fetch_and(!BINDING_BITS, Ordering::AcqRel);
    }
}

/// Ports per bucket of the port table.
pub const BUCKET_PORTS: u32 = 256;
/// Ports any ABI addresses: FIFO's 2^17 (`EVTCHN_FIFO_NR_CHANNELS`).
pub const MAX_PORTS: u32 = 1 << 17;
/// Backend endpoints the VMM can open.
pub const MAX_BACKENDS: u32 = 4096;

/// The binding words, in buckets allocated on first use. Lookups are lock-free: a bucket,
/// once there, stays until the table is dropped.
pub struct Slots {
    buckets: Box<[OnceLock<Box<[PortSlot]>>]>,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            buckets: (0..MAX_PORTS / BUCKET_PORTS)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

impl Slots {
    /// The port's slot, if its bucket exists.
    pub fn get(&self, port: u32) -> Option<&PortSlot> {
        let bucket = self.buckets.get((port / BUCKET_PORTS) as usize)?.get()?;
        bucket.get((port % BUCKET_PORTS) as usize)
    }

    /// Allocates the bucket holding `port` (below [`MAX_PORTS`]) if it is not there yet.
    fn ensure(&self, port: u32) {
        if let Some(b) = self.buckets.get((port / BUCKET_PORTS) as usize) {
            b.get_or_init(|| (0..BUCKET_PORTS).map(|_| PortSlot::default()).collect());
        }
    }

    /// Every allocated slot, with its port.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &PortSlot)> {
        self.buckets.iter().enumerate().flat_map(|(b, bucket)| {
            bucket.get().into_iter().flat_map(move |slots| {
                slots
                    .iter()
                    .enumerate()
                    .map(move |(i, s)| (b as u32 * BUCKET_PORTS + i as u32, s))
            })
        })
    }

    /// Bytes the allocated buckets and the bucket directory take.
    pub fn bytes(&self) -> usize {
        let buckets = self.buckets.iter().filter(|b| b.get().is_some()).count();
        std::mem::size_of_val(&*self.buckets)
            + buckets * BUCKET_PORTS as usize * std::mem::size_of::<PortSlot>()
    }
}

/// A VMM backend endpoint, under the [`Table`] mutex.
#[derive(Debug)]
pub struct BackendSlot {
    /// The guest port it is connected to, 0 while unconnected.
    pub guest_port: u32,
    /// Signalled when the guest sends on the connected port.
    pub notify: EventFd,
}

/// The slow-path state, protected by the `EventChannels` mutex.
#[derive(Debug)]
pub struct Table {
    /// Indexed by port, grown a bucket at a time; entry 0 is never used.
    ports: Vec<(PortState, u32)>,
    /// Closed ports below `ports.len()`, port 0 excepted.
    free: BTreeSet<u32>,
    /// Indexed by backend port, grown on demand; entry 0 is never used.
    pub backends: Vec<Option<BackendSlot>>,
    /// Per PIRQ: handed out by PHYSDEVOP_get_free_pirq and not unmapped.
    pub pirqs: Vec<bool>,
    /// Per PIRQ: the GSI it is mapped to (PHYSDEVOP_map_pirq of type GSI).
    pub pirq_gsi: Vec<Option<u32>>,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            ports: Vec::new(),
            free: BTreeSet::new(),
            backends: vec![None],
            pirqs: vec![false; super::NR_PIRQS as usize],
            pirq_gsi: vec![None; super::NR_PIRQS as usize],
        }
    }
}

impl Table {
    /// Ports the table holds (the high-water mark, bucket-rounded).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        self.ports.len() as u32
    }

    /// Grows the table (and `slots`) by whole buckets until it holds `port`; false beyond
    /// [`MAX_PORTS`].
    pub fn reserve(&mut self, port: u32, slots: &Slots) -> bool {
        if port >= MAX_PORTS {
            return false;
        }
        while self.len() <= port {
            let start = self.len();
            slots.ensure(start);
            self.ports
                .resize((start + BUCKET_PORTS) as usize, (PortState::Closed, 0));
            self.free.extend(start.max(1)..start + BUCKET_PORTS);
        }
        true
    }

    /// The lowest free port below `limit` that is not `busy` (Xen `get_free_port`: a FIFO port
    /// still linked on a queue is not reused); port 0 is reserved. Grows the table when every
    /// port it holds is taken. Only busy ports are stepped over.
    pub fn free_port(
        &mut self,
        limit: u32,
        slots: &Slots,
        busy: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        loop {
            if let Some(p) = self.free.range(1..limit).copied().find(|&p| !busy(p)) {
                return Some(p);
            }
            let next = self.len();
            if next >= limit || !self.reserve(next, slots) {
                return None;
            }
        }
    }

    /// Sets the port's state and vCPU (the port must be below [`Self::len`]).
    pub fn set(&mut self, port: u32, state: PortState, vcpu: u32) {
        if let Some(entry) = self.ports.get_mut(port as usize) {
            *entry = (state, vcpu);
            if state == PortState::Closed {
                if port != 0 {
                    self.free.insert(port);
                }
            } else {
                self.free.remove(&port);
            }
        }
    }

    /// Every open port with its state and vCPU, lowest first.
    pub fn open(&self) -> impl Iterator<Item = (u32, PortState, u32)> + '_ {
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| *s != PortState::Closed)
            .map(|(p, (s, v))| (p as u32, *s, *v))
    }

    /// Bytes the table's own storage takes (entries, backends, PIRQ maps, the free set at
    /// about three words a port).
    pub fn bytes(&self) -> usize {
        use std::mem::size_of;
        self.ports.capacity() * size_of::<(PortState, u32)>()
            + self.free.len() * 3 * size_of::<u64>()
            + self.backends.capacity() * size_of::<Option<BackendSlot>>()
            + self.pirqs.capacity()
            + self.pirq_gsi.capacity() * size_of::<Option<u32>>()
    }

    /// The lowest free backend port, growing the backend table up to [`MAX_BACKENDS`].
    pub fn free_backend(&mut self) -> Option<u32> {
        if let Some(p) = (1..self.backends.len()).find(|&p| self.backends[p].is_none()) {
            return Some(p as u32);
        }
        if self.backends.len() >= MAX_BACKENDS as usize {
            return None;
        }
        self.backends.push(None);
        Some(self.backends.len() as u32 - 1)
    }

    /// Grows the backend table to hold `be` (below [`MAX_BACKENDS`]).
    pub fn reserve_backend(&mut self, be: u32) -> bool {
        if be >= MAX_BACKENDS {
            return false;
        }
        while self.backends.len() <= be as usize {
            self.backends.push(None);
        }
        true
    }

    /// The port's state; out-of-range ports read closed.
    pub fn state(&self, port: u32) -> PortState {
        self.ports
            .get(port as usize)
            .map_or(PortState::Closed, |p| p.0)
    }

    /// The vCPU the port notifies; 0 out of range.
    pub fn vcpu(&self, port: u32) -> u32 {
        self.ports.get(port as usize).map_or(0, |p| p.1)
    }
}

/// Model checks of the close/send protocol (`RUSTFLAGS="--cfg loom" cargo test -p vmirq
/// --lib loom`; CI runs it). The guest's pending bit is modelled as an atomic; the closer runs
/// the same steps as `EVTCHNOP_close` (begin_close, clear the pending bit, finish_close).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    fn open_slot() -> Arc<PortSlot> {
        let slot = Arc::new(PortSlot::default());
        slot.publish(Binding::new(PortState::Ipi, 0));
        slot
    }

    /// A sender: mark pending only under a read hold (as `EventChannels::set_pending`).
    fn send(slot: &PortSlot, pending: &AtomicBool) -> bool {
        match slot.try_read() {
            Some(_hold) => {
                pending.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    fn close(slot: &PortSlot, pending: &AtomicBool) {
        slot.begin_close();
        pending.store(false, Ordering::SeqCst);
        slot.finish_close();
    }

    #[test]
    fn loom_a_closed_port_is_never_left_pending() {
        loom::model(|| {
            let slot = open_slot();
            let pending = Arc::new(AtomicBool::new(false));
            let sender = {
                let (slot, pending) = (slot.clone(), pending.clone());
                thread::spawn(move || send(&slot, &pending))
            };
            close(&slot, &pending);
            sender.join().unwrap();
            assert!(!pending.load(Ordering::SeqCst), "a closed port is pending");
            assert!(slot.try_read().is_none(), "a closed port accepts senders");
        });
    }

    /// A shared_info move against a delivery (`xen::shinfo`): copy, publish the new page,
    /// quiesce the port, merge what the old page got meanwhile. The event always ends on the
    /// new page.
    #[test]
    fn loom_a_send_racing_a_shared_info_move_lands_on_the_new_page() {
        use loom::sync::atomic::AtomicUsize;
        loom::model(|| {
            let slot = open_slot();
            let page = Arc::new(AtomicUsize::new(0));
            let bits = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let sender = {
                let (slot, page, bits) = (slot.clone(), page.clone(), bits.clone());
                thread::spawn(move || {
                    let hold = slot.try_read().expect("the port is open");
                    bits[page.load(Ordering::SeqCst)].fetch_or(true, Ordering::SeqCst);
                    drop(hold);
                })
            };
            // The mover: copy, publish, quiesce, merge.
            if bits[0].load(Ordering::SeqCst) {
                bits[1].fetch_or(true, Ordering::SeqCst);
            }
            page.store(1, Ordering::SeqCst);
            slot.wait_no_readers();
            if bits[0].load(Ordering::SeqCst) {
                bits[1].fetch_or(true, Ordering::SeqCst);
            }
            sender.join().unwrap();
            assert!(
                bits[1].load(Ordering::SeqCst),
                "the event was lost in the move"
            );
        });
    }

    #[test]
    fn loom_a_send_before_close_is_delivered_or_the_close_drops_it_never_half() {
        loom::model(|| {
            let slot = open_slot();
            let pending = Arc::new(AtomicBool::new(false));
            let senders: Vec<_> = (0..2)
                .map(|_| {
                    let (slot, pending) = (slot.clone(), pending.clone());
                    thread::spawn(move || send(&slot, &pending))
                })
                .collect();
            close(&slot, &pending);
            for s in senders {
                s.join().unwrap();
            }
            // Whatever interleaving: nothing marked after the close, no hold left behind.
            assert!(!pending.load(Ordering::SeqCst));
            assert!(
                slot.word.load(Ordering::SeqCst) < READER,
                "a sender's hold leaked"
            );
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    // Written to kill mutants cargo-mutants found surviving (docs/mutants.md): the loom model
    // checks the close protocol, but under `cfg(loom)` only.

    fn open(slot: &PortSlot) -> Binding {
        let b = Binding {
            stat: stat::INTERDOMAIN,
            priority: 0xA,
            virq: 0xC3,
            vcpu: 0xBEEF,
        };
        slot.publish(b);
        b
    }

    #[test]
    fn every_binding_field_survives_the_packed_word() {
        let slot = PortSlot::default();
        let b = open(&slot);
        assert_eq!(slot.binding(), b);
        let guard = slot.try_read().expect("an open port reads");
        assert_eq!(guard.binding, b);
        drop(guard);
        // Publishing again keeps no bit of the old binding.
        let other = Binding {
            stat: stat::INTERDOMAIN,
            priority: 0x5,
            virq: 0x3C,
            vcpu: 0x4110,
        };
        slot.publish(other);
        assert_eq!(slot.binding(), other);
    }

    #[test]
    fn a_closing_port_refuses_readers_and_a_closed_one_reads_closed() {
        let slot = PortSlot::default();
        open(&slot);
        slot.begin_close();
        assert!(
            slot.try_read().is_none(),
            "a reader got into a closing port"
        );
        slot.finish_close();
        assert_eq!(slot.binding().stat, stat::CLOSED);
        assert_eq!(slot.binding().vcpu, 0);
        assert!(slot.try_read().is_none(), "a reader got into a closed port");
        // Reopened, it reads again: the reader count came back to zero.
        let b = open(&slot);
        assert_eq!(slot.try_read().map(|g| g.binding), Some(b));
    }

    #[test]
    fn closing_waits_for_the_reader_in_flight() {
        let slot = Arc::new(PortSlot::default());
        open(&slot);
        let guard_slot = Arc::clone(&slot);
        let guard = guard_slot.try_read().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let closer = {
            let (slot, closed) = (Arc::clone(&slot), Arc::clone(&closed));
            std::thread::spawn(move || {
                slot.begin_close();
                closed.store(true, Ordering::SeqCst);
            })
        };
        // The closer is running: new readers are refused...
        let deadline = Instant::now() + Duration::from_secs(5);
        while slot.try_read().is_some() {
            assert!(Instant::now() < deadline, "the closer never started");
            std::thread::yield_now();
        }
        // ...and it cannot finish while the reader holds the port.
        for _ in 0..1000 {
            assert!(!closed.load(Ordering::SeqCst), "closed under a reader");
            std::thread::yield_now();
        }
        drop(guard);
        closer.join().expect("the closer panicked");
        assert!(closed.load(Ordering::SeqCst));
        // finish_close keeps a reader that arrived meanwhile counted: it backs off cleanly.
        slot.finish_close();
        let b = open(&slot);
        assert_eq!(slot.binding(), b);
    }
}
