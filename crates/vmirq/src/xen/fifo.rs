//! The FIFO event-channel ABI (Xen xen/common/event_fifo.c, public/event_channel.h): 2^17
//! ports, 16 priority queues per vCPU, linked through words in guest memory.
//!
//! ```text
//! event word (u32, in event-array pages the guest adds with EVTCHNOP_expand_array):
//!   31 PENDING   30 MASKED   29 LINKED   28 BUSY   16:0 LINK (next port in the queue)
//! control block (per vCPU, EVTCHNOP_init_control; 72 bytes, 8-byte aligned, in one page):
//!   +0 READY (bit per priority)   +4 reserved   +8 HEAD[16]
//! ```
//!
//! # The linker and its lock
//!
//! Linking an event is three dependent updates (the port's LINKED, the old tail's LINK or the
//! queue's HEAD, the host's tail) that the guest races: it clears LINKED and LINK as it walks a
//! queue, sets and clears MASKED, clears PENDING. As in Xen, the host keeps each queue's tail
//! itself and takes a lock per (vCPU, priority) queue — here a spinlock bit in the same word
//! as the tail — and, when the port last sat on another queue, that queue's lock too, lower
//! index first. The tail is linked with a compare-exchange that only succeeds while the tail
//! is still LINKED; the guest editing the word makes it fail, so after one failure the host
//! sets BUSY (which a well-behaved guest honours by not unmasking) and retries at most
//! [`LINK_RETRIES`] times. READY is raised only for a new head.
//!
//! # A hostile guest
//!
//! The host never follows a LINK or reads a HEAD: it writes HEAD, the port's own word and the
//! tail's word, all at addresses it computed from ports it validated, inside pages it checked
//! are guest RAM. Every loop is bounded; what it gave up on is counted in [`GiveUps`]. A guest
//! scribbling over its words can only lose its own events.
//!
//! # No lock-free fast path
//!
//! The Xen-on-KVM design discussion proposed linking, without the lock, the one event that
//! becomes the head of an empty queue. It was built (commit a925755: one compare-exchange on
//! the queue word, tail plus a generation every release bumped; loom-checked) and measured
//! with `vmirq bench`, median of three runs: new heads 3% faster, links behind a tail 11%
//! slower (the failed first try's loads). An uncontended queue lock costs two atomics next to
//! the four or five the link needs on guest memory, so there is little to win; it was removed.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports the FIFO ABI addresses (`EVTCHN_FIFO_NR_CHANNELS`).
pub const FIFO_PORTS: u32 = 1 << 17;
/// Bits of the LINK field (`EVTCHN_FIFO_LINK_BITS`), reported by `init_control`.
pub const LINK_BITS: u8 = 17;
/// Priority queues per vCPU; 0 is the highest (`EVTCHN_FIFO_MAX_QUEUES`).
pub const PRIORITIES: u32 = 16;
/// Event words per event-array page.
pub const WORDS_PER_PAGE: u32 = 1024;
/// Event-array pages: enough for every port.
pub const MAX_PAGES: u32 = FIFO_PORTS / WORDS_PER_PAGE;
/// Bytes of a control block: READY, a reserved word, 16 HEADs.
pub const CONTROL_BLOCK_SIZE: u32 = 8 + 4 * PRIORITIES;
/// Offset of the first HEAD in the control block.
pub const HEAD_OFFSET: u32 = 8;
/// Compare-exchanges on a tail word with BUSY set before the link is given up (Xen: 4).
pub const LINK_RETRIES: u32 = 4;
/// Tries at locking a port's queues while it keeps moving (Xen: 3).
pub const LOCK_RETRIES: u32 = 3;

/// Event word bits.
pub mod bits {
    /// The event is pending.
    pub const PENDING: u32 = 1 << 31;
    /// The event is masked.
    pub const MASKED: u32 = 1 << 30;
    /// The event is on a queue.
    pub const LINKED: u32 = 1 << 29;
    /// The host is linking onto this word; the guest must not clear MASKED meanwhile.
    pub const BUSY: u32 = 1 << 28;
    /// The next port in the queue; 0 at the tail.
    pub const LINK: u32 = (1 << 17) - 1;
}
use bits::{BUSY, LINK, LINKED, MASKED, PENDING};

/// A 32-bit word the guest shares with the host: an event word, READY or a HEAD. Every
/// operation is sequentially consistent, as Xen's locked bit operations are.
pub trait Atom {
    /// Loads the word.
    fn get(&self) -> u32;
    /// ORs `v` in; returns the old word.
    fn or(&self, v: u32) -> u32;
    /// ANDs `v` in; returns the old word.
    fn and(&self, v: u32) -> u32;
    /// Stores `v`.
    fn put(&self, v: u32);
    /// Replaces `current` with `new`; returns the word found.
    fn cas(&self, current: u32, new: u32) -> u32;
}

macro_rules! atom_impl {
    ($t:ty) => {
        impl Atom for $t {
            fn get(&self) -> u32 {
                self.load(Ordering::SeqCst)
            }
            fn or(&self, v: u32) -> u32 {
                self.fetch_or(v, Ordering::SeqCst)
            }
            fn and(&self, v: u32) -> u32 {
                self.fetch_and(v, Ordering::SeqCst)
            }
            fn put(&self, v: u32) {
                self.store(v, Ordering::SeqCst)
            }
            fn cas(&self, current: u32, new: u32) -> u32 {
                match self.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(w) | Err(w) => w,
                }
            }
        }
    };
}
atom_impl!(std::sync::atomic::AtomicU32);
#[cfg(loom)]
atom_impl!(loom::sync::atomic::AtomicU32);

/// The guest words a set-pending touches.
pub trait Words {
    /// The word type.
    type A: Atom;
    /// The port's event word; `None` while its event-array page does not exist.
    fn event(&self, port: u32) -> Option<&Self::A>;
    /// The vCPU's control block: READY and the HEAD of `priority`; `None` before `init_control`.
    fn control(&self, vcpu: u32, priority: u32) -> Option<(&Self::A, &Self::A)>;
}

/// What the host gave up on, each a bounded wait or retry a guest can exhaust. Xen logs the
/// same cases (`gprintk` "lost event", "not linked", no control block).
#[derive(Debug, Default)]
pub struct GiveUps {
    /// Links abandoned after [`LINK_RETRIES`]: the guest kept changing the tail word.
    pub link: std::sync::atomic::AtomicU64,
    /// Events dropped because the port changed queues [`LOCK_RETRIES`] times meanwhile.
    pub lock: std::sync::atomic::AtomicU64,
    /// Events dropped because the vCPU has no control block (the guest must not unmask
    /// before `init_control`, so Xen drops them too).
    pub no_control_block: std::sync::atomic::AtomicU64,
    /// Closes that stopped waiting for the guest to unlink the port (it is not reused until
    /// it does).
    pub close_linked: std::sync::atomic::AtomicU64,
}

impl GiveUps {
    fn count(c: &std::sync::atomic::AtomicU64, what: &str, port: u32) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(port, "Xen FIFO: {what}");
    }

    /// The four counts: link, lock, no control block, close while linked.
    pub fn snapshot(&self) -> [u64; 4] {
        let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        [
            l(&self.link),
            l(&self.lock),
            l(&self.no_control_block),
            l(&self.close_linked),
        ]
    }
}

/// How a FIFO set-pending ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linked {
    /// The port's event-array page does not exist yet: remembered, raised when it is added.
    NoWord,
    /// Dropped: the vCPU has no control block, or the port kept changing queues.
    Dropped,
    /// PENDING set (`newly`: it was clear); not linked: masked, or on a queue already.
    Pending {
        /// PENDING went 0→1.
        newly: bool,
    },
    /// Linked behind the queue's tail.
    Appended {
        /// PENDING went 0→1.
        newly: bool,
    },
    /// Written as the queue's head.
    Head {
        /// PENDING went 0→1.
        newly: bool,
        /// The priority's READY bit went 0→1: the vCPU needs an upcall.
        ready: bool,
    },
}

impl Linked {
    /// PENDING went 0→1 (pollers of the port wake).
    pub fn newly_pending(self) -> bool {
        matches!(
            self,
            Linked::Pending { newly: true }
                | Linked::Appended { newly: true }
                | Linked::Head { newly: true, .. }
        )
    }
}

const Q_LOCKED: u32 = 1 << 31;

/// One (vCPU, priority) queue's host state in one word: the tail port (bits 16:0) and the
/// lock (bit 31).
#[derive(Debug, Default)]
pub struct Queue(AtomicU32);

impl Queue {
    fn lock(&self) {
        let mut spins = 0u32;
        loop {
            let w = self.0.load(Ordering::Relaxed);
            if w & Q_LOCKED == 0
                && self
                    .0
                    .compare_exchange_weak(w, w | Q_LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            backoff(&mut spins);
        }
    }

    /// The tail (lock held, or a snapshot).
    pub fn tail(&self) -> u32 {
        self.0.load(Ordering::Acquire) & LINK
    }

    /// Sets the tail, lock held.
    fn set_tail(&self, tail: u32) {
        let w = self.0.load(Ordering::Relaxed);
        self.0.store((w & !LINK) | tail, Ordering::Relaxed);
    }

    /// Releases the lock.
    fn unlock(&self) {
        let w = self.0.load(Ordering::Relaxed);
        self.0.store(w & LINK, Ordering::Release);
    }

    /// Sets the tail (a port below 2^17) with no lock (restore, reset: nothing else runs).
    pub fn reset(&self, tail: u32) {
        self.0.store(tail, Ordering::SeqCst);
    }
}

/// Spins a little, then yields: a queue lock is held for a handful of atomic operations.
fn backoff(spins: &mut u32) {
    #[cfg(loom)]
    loom::thread::yield_now();
    if *spins < 64 {
        std::hint::spin_loop();
        *spins += 1;
    } else {
        std::thread::yield_now();
    }
}

/// Packs a queue into a port's `lastq`.
pub fn lastq(vcpu: u32, priority: u32) -> u32 {
    (vcpu & 0xffff) | (priority & 0xf) << 16
}

/// Every vCPU's queues.
#[derive(Debug)]
pub struct Queues {
    queues: Box<[Queue]>,
    /// What the linker gave up on.
    pub give_ups: GiveUps,
}

impl Queues {
    /// Queues for `vcpus` vCPUs, all empty.
    pub fn new(vcpus: u32) -> Self {
        Self {
            queues: (0..vcpus * PRIORITIES).map(|_| Queue::default()).collect(),
            give_ups: GiveUps::default(),
        }
    }

    /// The queue's index; a `lastq` naming a vCPU out of range (never written so) reads as
    /// vCPU 0's queue.
    fn index(&self, vcpu: u32, priority: u32) -> usize {
        let i = (vcpu * PRIORITIES + (priority & 0xf)) as usize;
        if i < self.queues.len() {
            i
        } else {
            (priority & 0xf) as usize
        }
    }

    /// The (vCPU, priority) queue.
    pub fn queue(&self, vcpu: u32, priority: u32) -> &Queue {
        &self.queues[self.index(vcpu, priority)]
    }

    /// Every queue, vCPU-major.
    pub fn all(&self) -> &[Queue] {
        &self.queues
    }

    /// Xen `evtchn_fifo_set_pending`: marks `port` pending for `vcpu` at `priority` and links
    /// it on that queue. `lastq` is the port's last queue; `early` its remembered event.
    pub fn set_pending<W: Words>(
        &self,
        words: &W,
        lastq: &AtomicU32,
        early: &impl EarlyFlag,
        port: u32,
        vcpu: u32,
        priority: u32,
    ) -> Linked {
        let Some(word) = words.event(port) else {
            early.remember();
            return Linked::NoWord;
        };
        self.locked(words, lastq, word, port, vcpu, priority)
    }

    /// Xen's path, under the queue locks.
    fn locked<W: Words>(
        &self,
        words: &W,
        lastq_word: &AtomicU32,
        word: &W::A,
        port: u32,
        vcpu: u32,
        priority: u32,
    ) -> Linked {
        let qi = self.index(vcpu, priority);
        // Lock the queue and the one the port was last on, lower index first (Xen: address
        // order); retry if the port moved meanwhile.
        let mut tries = 0;
        let oi = loop {
            let last = lastq_word.load(Ordering::SeqCst);
            let oi = self.index(last & 0xffff, last >> 16);
            let (a, b) = (qi.min(oi), qi.max(oi));
            self.queues[a].lock();
            if b != a {
                self.queues[b].lock();
            }
            if lastq_word.load(Ordering::SeqCst) == last {
                break oi;
            }
            self.unlock(qi, oi);
            tries += 1;
            if tries == LOCK_RETRIES {
                GiveUps::count(
                    &self.give_ups.lock,
                    "lost event (too many queue changes)",
                    port,
                );
                return Linked::Dropped;
            }
        };
        let (q, old_q) = (&self.queues[qi], &self.queues[oi]);
        let Some((ready, head)) = words.control(vcpu, priority) else {
            self.unlock(qi, oi);
            GiveUps::count(&self.give_ups.no_control_block, "no control block", port);
            return Linked::Dropped;
        };
        // PENDING, then LINKED unless masked: only the setter of LINKED links the port.
        let newly = word.or(PENDING) & PENDING == 0;
        let link = word.get() & MASKED == 0 && word.or(LINKED) & LINKED == 0;
        let mut result = Linked::Pending { newly };
        if link {
            // If the port was a tail, its old queue is empty now: forget that tail, or an
            // event linked there later would corrupt this queue.
            if old_q.tail() == port {
                old_q.set_tail(0);
            }
            if oi != qi {
                lastq_word.store(lastq(vcpu, priority), Ordering::SeqCst);
            }
            let tail = q.tail();
            let appended = tail != 0
                && words
                    .event(tail)
                    .is_some_and(|t| self.set_link(t, port, tail));
            if appended {
                result = Linked::Appended { newly };
            } else {
                head.put(port);
                result = Linked::Head {
                    newly,
                    ready: false,
                };
            }
            q.set_tail(port);
        }
        self.unlock(qi, oi);
        if let Linked::Head { newly, .. } = result {
            let ready = ready.or(1 << priority) & (1 << priority) == 0;
            return Linked::Head { newly, ready };
        }
        result
    }

    fn unlock(&self, qi: usize, oi: usize) {
        self.queues[qi].unlock();
        if oi != qi {
            self.queues[oi].unlock();
        }
    }

    /// Xen `evtchn_fifo_set_link`: sets the tail word's LINK to `port` while it is LINKED.
    /// False: the tail is not linked any more (the queue is empty).
    fn set_link(&self, tail: &impl Atom, port: u32, tail_port: u32) -> bool {
        let mut w = tail.get();
        if let Some(linked) = try_set_link(tail, &mut w, port) {
            return linked;
        }
        // Keep the guest from unmasking the tail while we retry.
        tail.or(BUSY);
        w = tail.get();
        for _ in 0..LINK_RETRIES {
            if let Some(linked) = try_set_link(tail, &mut w, port) {
                if !linked {
                    tail.and(!BUSY);
                }
                return linked;
            }
        }
        tail.and(!BUSY);
        GiveUps::count(
            &self.give_ups.link,
            "tail kept changing; event not linked",
            tail_port,
        );
        true
    }
}

/// One compare-exchange of a link: `Some(false)` if the word is not LINKED, `Some(true)` once
/// linked (BUSY cleared), `None` if the word changed (`w` holds the new one).
fn try_set_link(word: &impl Atom, w: &mut u32, port: u32) -> Option<bool> {
    if *w & LINKED == 0 {
        return Some(false);
    }
    let old = *w;
    let new = (old & !(BUSY | LINK)) | port;
    *w = word.cas(old, new);
    (*w == old).then_some(true)
}

/// Where a port remembers an event that arrived before its event-array page.
pub trait EarlyFlag {
    /// Remember the event.
    fn remember(&self);
}

impl EarlyFlag for super::ports::PortSlot {
    fn remember(&self) {
        self.early.store(true, Ordering::SeqCst);
    }
}

/// The guest's FIFO consumer on `vcpu`, as Linux's `__evtchn_fifo_handle_events` and
/// `consume_one_event` run it (drivers/xen/events/events_fifo.c): take READY with an exchange,
/// walk the queues from the highest priority, unlink each head (clear LINKED and LINK with a
/// compare-exchange; the old LINK is the next head), and handle it if PENDING and not MASKED,
/// clearing PENDING (only the consumer whose clear took it handles it). `heads` is the
/// consumer's copy of each queue's next head. Stops after `budget` unlinks; returns the
/// budget left. Used by the tests, the model checks and the simulated guest.
pub fn consume<W: Words>(
    words: &W,
    vcpu: u32,
    heads: &mut [u32; PRIORITIES as usize],
    mut budget: u32,
    mut handle: impl FnMut(u32),
) -> u32 {
    let Some((ready, _)) = words.control(vcpu, 0) else {
        return budget;
    };
    // READY bits past the last priority are garbage a consumer ignores.
    let valid = (1u32 << PRIORITIES) - 1;
    let mut local = swap(ready) & valid;
    while local != 0 && budget > 0 {
        budget -= 1;
        let q = local.trailing_zeros();
        let mut port = heads[q as usize];
        if port == 0 {
            port = words.control(vcpu, q).map_or(0, |(_, head)| head.get());
        }
        let Some(word) = words.event(port & LINK) else {
            local &= !(1 << q);
            heads[q as usize] = 0;
            continue;
        };
        // clear_linked: a compare-exchange loop (bounded: only a hostile host could make it
        // fail for ever).
        let mut w = word.get();
        for _ in 0..64 {
            let seen = word.cas(w, w & !(LINKED | LINK));
            if seen == w {
                break;
            }
            w = seen;
        }
        let next = w & LINK;
        if next == 0 {
            local &= !(1 << q);
        }
        let now = word.get();
        if now & PENDING != 0 && now & MASKED == 0 && word.and(!PENDING) & PENDING != 0 {
            handle(port & LINK);
        }
        heads[q as usize] = next;
        local |= swap(ready) & valid;
    }
    // Out of budget with queues left: hand their READY bits back for the next upcall.
    if local != 0 {
        ready.or(local);
    }
    budget
}

/// `xchg(word, 0)` through [`Atom`].
fn swap(a: &impl Atom) -> u32 {
    let mut w = a.get();
    loop {
        let seen = a.cas(w, 0);
        if seen == w {
            return w;
        }
        w = seen;
    }
}

/// The guest pages the FIFO ABI uses, each resolved to its host mapping once, when the guest
/// registers it, and checked to lie wholly in guest RAM then.
pub struct GuestPages {
    memory: vm_memory::GuestMemoryMmap,
    /// Host address of each event-array page; the first `count` exist.
    pages: Box<[std::sync::atomic::AtomicUsize]>,
    /// Guest address of each event-array page (for snapshots).
    page_gpas: Box<[std::sync::atomic::AtomicU64]>,
    count: std::sync::atomic::AtomicU32,
    /// Per vCPU: the control block's host address (0: none).
    control: Box<[std::sync::atomic::AtomicUsize]>,
    /// Per vCPU: the control block's guest address.
    control_gpas: Box<[std::sync::atomic::AtomicU64]>,
}

/// Guest words as the host sees them.
type GuestWord = std::sync::atomic::AtomicU32;

impl GuestPages {
    /// No pages, no control blocks, for `vcpus` vCPUs of the guest whose RAM is `memory`.
    pub fn new(memory: vm_memory::GuestMemoryMmap, vcpus: u32) -> Self {
        use std::sync::atomic::{AtomicU64, AtomicUsize};
        Self {
            memory,
            pages: (0..MAX_PAGES).map(|_| AtomicUsize::new(0)).collect(),
            page_gpas: (0..MAX_PAGES).map(|_| AtomicU64::new(0)).collect(),
            count: std::sync::atomic::AtomicU32::new(0),
            control: (0..vcpus).map(|_| AtomicUsize::new(0)).collect(),
            control_gpas: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The host address of `len` bytes at guest `gpa`, if they are all in one region of
    /// guest RAM and `align`-aligned.
    fn host(&self, gpa: u64, len: usize, align: usize) -> Option<usize> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let slice = self.memory.get_slice(GuestAddress(gpa), len).ok()?;
        let ptr = slice.ptr_guard().as_ptr() as usize;
        (ptr % align == 0).then_some(ptr)
    }

    /// Event-array pages added so far.
    pub fn count(&self) -> u32 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Adds the event-array page at guest frame `gfn` (Xen `add_page_to_event_array`):
    /// -ENOSPC past [`MAX_PAGES`], -EINVAL outside guest RAM. Returns the ports it covers.
    /// The caller serializes adds.
    pub fn add_page(&self, gfn: u64) -> Result<std::ops::Range<u32>, super::XenError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.count();
        if n >= MAX_PAGES {
            return Err(super::XenError::NoSpace);
        }
        let gpa = gfn.checked_mul(0x1000).ok_or(super::XenError::Invalid)?;
        let host = self.host(gpa, 0x1000, 4).ok_or(super::XenError::Invalid)?;
        self.pages[n as usize].store(host, SeqCst);
        self.page_gpas[n as usize].store(gpa, SeqCst);
        self.count.store(n + 1, SeqCst);
        Ok(n * WORDS_PER_PAGE..(n + 1) * WORDS_PER_PAGE)
    }

    /// Maps `vcpu`'s control block at `gpa` (Xen `map_control_block`): -EINVAL if it has one
    /// or `gpa` is not guest RAM. The caller checked alignment and the page bound.
    pub fn map_control(&self, vcpu: u32, gpa: u64) -> Result<(), super::XenError> {
        use std::sync::atomic::Ordering::SeqCst;
        let slot = self
            .control
            .get(vcpu as usize)
            .ok_or(super::XenError::NoEntry)?;
        if slot.load(SeqCst) != 0 {
            return Err(super::XenError::Invalid);
        }
        let host = self
            .host(gpa, CONTROL_BLOCK_SIZE as usize, 8)
            .ok_or(super::XenError::Invalid)?;
        self.control_gpas[vcpu as usize].store(gpa, SeqCst);
        slot.store(host, SeqCst);
        Ok(())
    }

    /// Forgets every page and control block (the domain goes back to 2-level).
    pub fn clear(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.count.store(0, SeqCst);
        for p in self.pages.iter().chain(self.control.iter()) {
            p.store(0, SeqCst);
        }
    }

    /// The event-array pages' guest addresses, in order.
    pub fn page_gpas(&self) -> Vec<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        (0..self.count() as usize)
            .map(|i| self.page_gpas[i].load(SeqCst))
            .collect()
    }

    /// Per vCPU: its control block's guest address, if it has one.
    pub fn control_gpas(&self) -> Vec<Option<u64>> {
        use std::sync::atomic::Ordering::SeqCst;
        self.control
            .iter()
            .zip(self.control_gpas.iter())
            .map(|(h, g)| (h.load(SeqCst) != 0).then(|| g.load(SeqCst)))
            .collect()
    }

    fn word_at(host: usize, index: u32) -> &'static GuestWord {
        // SAFETY: `host` is the mapping of a 4-byte-aligned range of guest RAM that `host()`
        // checked holds the word (a page, or a control block), and `memory` keeps every region
        // mapped while `self` lives. Guest RAM is shared with the guest, which changes it
        // concurrently: every access goes through the atomic. The 'static lifetime is narrowed
        // to `&self`'s by the callers.
        unsafe { &*(host as *const GuestWord).add(index as usize) }
    }
}

impl Words for GuestPages {
    type A = GuestWord;

    fn event(&self, port: u32) -> Option<&GuestWord> {
        use std::sync::atomic::Ordering::SeqCst;
        let page = port / WORDS_PER_PAGE;
        if port >= FIFO_PORTS || page >= self.count() {
            return None;
        }
        let host = self.pages[page as usize].load(SeqCst);
        (host != 0).then(|| Self::word_at(host, port % WORDS_PER_PAGE))
    }

    fn control(&self, vcpu: u32, priority: u32) -> Option<(&GuestWord, &GuestWord)> {
        use std::sync::atomic::Ordering::SeqCst;
        let host = self.control.get(vcpu as usize)?.load(SeqCst);
        if host == 0 || priority >= PRIORITIES {
            return None;
        }
        Some((
            Self::word_at(host, 0),
            Self::word_at(host, HEAD_OFFSET / 4 + priority),
        ))
    }
}

/// Model checks of the host linker against a concurrent guest consumer (`RUSTFLAGS="--cfg
/// loom" cargo test -p vmirq --lib loom`; CI runs them). The guest's words are loom atomics;
/// the linker and the consumer are the code above, unchanged. Every interleaving must end with
/// each event handled exactly once and every word unlinked.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    struct Model {
        words: Vec<AtomicU32>,
        ready: AtomicU32,
        heads: Vec<AtomicU32>,
    }

    impl Words for Model {
        type A = AtomicU32;
        fn event(&self, port: u32) -> Option<&AtomicU32> {
            self.words.get(port as usize)
        }
        fn control(&self, _: u32, priority: u32) -> Option<(&AtomicU32, &AtomicU32)> {
            Some((&self.ready, self.heads.get(priority as usize)?))
        }
    }

    struct Port {
        lastq: AtomicU32,
        early: std::sync::atomic::AtomicBool,
    }

    impl EarlyFlag for Port {
        fn remember(&self) {
            self.early.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    struct World {
        m: Model,
        q: Queues,
        ports: Vec<Port>,
        handled: Vec<AtomicU32>,
    }

    fn world(ports: u32) -> Arc<World> {
        let q = Queues::new(1);
        Arc::new(World {
            m: Model {
                words: (0..ports).map(|_| AtomicU32::new(0)).collect(),
                ready: AtomicU32::new(0),
                heads: (0..PRIORITIES).map(|_| AtomicU32::new(0)).collect(),
            },
            q,
            ports: (0..ports)
                .map(|_| Port {
                    lastq: AtomicU32::new(lastq(0, 7)),
                    early: std::sync::atomic::AtomicBool::new(false),
                })
                .collect(),
            handled: (0..ports).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    impl World {
        fn send(&self, port: u32, priority: u32) -> Linked {
            let p = &self.ports[port as usize];
            self.q.set_pending(&self.m, &p.lastq, p, port, 0, priority)
        }

        fn consume(&self, heads: &mut [u32; 16]) {
            consume(&self.m, 0, heads, 8, |p| {
                self.handled[p as usize].fetch_add(1, Ordering::SeqCst);
            });
        }

        /// After everything joined: drain, then every event was handled once and nothing
        /// is left linked or pending.
        fn check(&self, heads: &mut [u32; 16], sent: &[u32]) {
            self.consume(heads);
            for &p in sent {
                assert_eq!(
                    self.handled[p as usize].load(Ordering::SeqCst),
                    1,
                    "port {p} handled"
                );
                let w = self.m.words[p as usize].load(Ordering::SeqCst);
                assert_eq!(w & (LINKED | PENDING), 0, "port {p} left {w:#x}");
            }
        }
    }

    /// The guest's consumer on another vCPU thread: one pass; returns its head copies.
    fn spawn_consumer(w: &Arc<World>) -> thread::JoinHandle<[u32; 16]> {
        let w = w.clone();
        thread::spawn(move || {
            let mut heads = [0; 16];
            w.consume(&mut heads);
            heads
        })
    }

    #[test]
    fn loom_fifo_linker_vs_guest_consumer() {
        loom::model(move || {
            let w = world(3);
            let consumer = spawn_consumer(&w);
            w.send(1, 7);
            w.send(2, 7);
            let mut heads = consumer.join().unwrap();
            w.check(&mut heads, &[1, 2]);
        });
    }

    /// Two producers on one queue (the lock), then the guest.
    #[test]
    fn loom_fifo_two_linkers_one_queue() {
        loom::model(|| {
            let w = world(3);
            let other = {
                let w = w.clone();
                thread::spawn(move || {
                    w.send(2, 7);
                })
            };
            w.send(1, 7);
            other.join().unwrap();
            let mut heads = [0; 16];
            w.check(&mut heads, &[1, 2]);
        });
    }

    /// A port consumed on one queue and sent again on another while a second port is sent
    /// on the old queue and a third on the new one: the old queue's stale tail (the moved
    /// port) must not take the second port into the new queue, where the third would
    /// overwrite its link and lose it.
    #[test]
    fn loom_fifo_a_port_changing_queues_leaves_no_stale_tail() {
        loom::model(|| {
            let w = world(4);
            w.send(1, 7);
            let consumer = spawn_consumer(&w);
            w.send(1, 3);
            w.send(2, 7);
            w.send(3, 3);
            let mut heads = consumer.join().unwrap();
            w.consume(&mut heads);
            // Port 1 was sent twice; it may have been handled once (coalesced) or twice.
            let h1 = w.handled[1].load(Ordering::SeqCst);
            assert!((1..=2).contains(&h1), "port 1 handled {h1} times");
            for p in 2..4 {
                assert_eq!(w.handled[p].load(Ordering::SeqCst), 1, "port {p} lost");
            }
            for p in 1..4 {
                let word = w.m.words[p].load(Ordering::SeqCst);
                assert_eq!(word & (LINKED | PENDING), 0, "port {p} left {word:#x}");
            }
        });
    }
}
