//! The FIFO ABI through the hypercalls, with the guest's consumer (`fifo::consume`) reading
//! the same guest memory.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::abi::{self, errno::*, op};
use super::fifo::{self, bits, Atom, GuestPages, Words, PRIORITIES};
use super::tests::{vm_with, Vm};
use super::*;

/// Control block of vCPU `v`.
const fn control(v: u32) -> u64 {
    0x3_0000 + v as u64 * 0x80
}
/// The first event-array page; the others follow.
const ARRAY: u64 = 0x4_0000;

/// The guest's side of the FIFO ABI: its own mapping of the pages it registered, and each
/// vCPU's copy of its queue heads.
struct Guest {
    vm: Vm,
    pages: GuestPages,
    heads: Vec<[u32; PRIORITIES as usize]>,
}

impl Guest {
    /// A guest of `vcpus` vCPUs that switched to FIFO with `pages` event-array pages.
    fn new(vcpus: u32, pages: u32) -> Self {
        let vm = vm_with(true, vcpus);
        let g = Self {
            pages: GuestPages::new(vm.mem.clone(), vcpus),
            heads: vec![[0; PRIORITIES as usize]; vcpus as usize],
            vm,
        };
        for v in 0..vcpus {
            assert_eq!(g.init_control(v, control(v)), 0, "init_control vCPU {v}");
        }
        for _ in 0..pages {
            assert_eq!(g.expand(), 0);
        }
        g
    }

    fn init_control(&self, vcpu: u32, gpa: u64) -> i64 {
        let a = abi::InitControl {
            control_gfn: gpa >> 12,
            offset: (gpa & 0xfff) as u32,
            vcpu,
            ..Default::default()
        };
        let (rc, out) = self.vm.call(op::INIT_CONTROL, a);
        if rc == 0 {
            assert_eq!(out.link_bits, 17);
            self.pages.map_control(vcpu, gpa).unwrap();
        }
        rc
    }

    /// Adds the next event-array page, its words written masked as Linux's
    /// `init_array_page` does.
    fn expand(&self) -> i64 {
        self.add_page(Some(bits::MASKED))
    }

    /// Adds the next event-array page, every word written `fill` first (`None`: as it is).
    fn add_page(&self, fill: Option<u32>) -> i64 {
        let n = self.pages.count();
        let gpa = ARRAY + u64::from(n) * 0x1000;
        for i in 0..fifo::WORDS_PER_PAGE {
            if let Some(w) = fill {
                self.vm
                    .mem
                    .write_obj(w, GuestAddress(gpa + u64::from(i) * 4))
                    .unwrap();
            }
        }
        let rc = self.vm.call(
            op::EXPAND_ARRAY,
            abi::ExpandArray {
                array_gfn: gpa >> 12,
            },
        );
        if rc.0 == 0 {
            self.pages.add_page(gpa >> 12).unwrap();
        }
        rc.0
    }

    fn word(&self, port: u32) -> &std::sync::atomic::AtomicU32 {
        self.pages.event(port).expect("the port has a word")
    }

    fn unmask_local(&self, port: u32) {
        self.word(port).fetch_and(!bits::MASKED, Ordering::SeqCst);
    }

    /// An IPI port on `vcpu` at `priority`, unmasked.
    fn ipi(&self, vcpu: u32, priority: u32) -> u32 {
        let port = self.vm.bind_ipi(vcpu);
        self.set_priority(port, priority);
        self.unmask_local(port);
        port
    }

    fn set_priority(&self, port: u32, priority: u32) -> i64 {
        self.vm
            .call(op::SET_PRIORITY, abi::SetPriority { port, priority })
            .0
    }

    /// The guest's upcall on `vcpu`: clear upcall_pending, consume; returns the ports
    /// handled, in order.
    fn consume(&mut self, vcpu: u32) -> Vec<u32> {
        let vi = GuestAddress(SHINFO + self.vm.ec.layout().vcpu_info(vcpu));
        self.vm.mem.write_obj(0u8, vi).unwrap();
        let mut got = Vec::new();
        fifo::consume(
            &self.pages,
            vcpu,
            &mut self.heads[vcpu as usize],
            1 << 20,
            |p| got.push(p),
        );
        got
    }
}

use super::tests::SHINFO;

#[test]
fn fifo_errnos_follow_xen() {
    let g = Guest::new(2, 0);
    let vm = &g.vm;
    // A second block for the same vCPU; bad vCPU; offset past the page or misaligned; frame
    // outside RAM.
    assert_eq!(g.init_control(0, control(0) + 0x40), -EINVAL, "again");
    let fresh = vm_with(true, 2);
    let init = |vcpu, gfn, offset| {
        let a = abi::InitControl {
            control_gfn: gfn,
            offset,
            vcpu,
            ..Default::default()
        };
        fresh.call(op::INIT_CONTROL, a).0
    };
    assert_eq!(
        fresh
            .call(op::EXPAND_ARRAY, abi::ExpandArray { array_gfn: 0x40 })
            .0,
        -EOPNOTSUPP,
        "expand before init_control"
    );
    assert_eq!(init(2, 0x30, 0), -ENOENT);
    assert_eq!(init(0, 0x30, 0x1000 - 72 + 8), -EINVAL, "crosses the page");
    assert_eq!(init(0, 0x30, 4), -EINVAL, "misaligned");
    assert_eq!(init(0, 0x10_0000, 0), -EINVAL, "outside RAM");
    assert!(!fresh.ec.is_fifo(), "a failed init_control does not switch");
    assert_eq!(init(0, 0x30, 0x1000 - 72), 0, "the last slot that fits");
    assert!(fresh.ec.is_fifo());
    // expand_array: outside RAM, then full.
    assert_eq!(
        vm.call(op::EXPAND_ARRAY, abi::ExpandArray { array_gfn: 0x100 })
            .0,
        -EINVAL
    );
    for _ in 0..fifo::MAX_PAGES {
        assert_eq!(g.expand(), 0);
    }
    assert_eq!(g.expand(), -ENOSPC, "2^17 ports");
    // set_priority: 0..=15; ports beyond the table are invalid.
    let p = vm.bind_ipi(0);
    assert_eq!(g.set_priority(p, 16), -EINVAL);
    assert_eq!(g.set_priority(p, 15), 0);
    assert_eq!(g.set_priority(1 << 17, 3), -EINVAL);
    assert_eq!(g.set_priority(0, 3), 0, "port 0 is valid");
    // FIFO ports reach 2^17.
    assert_eq!(vm.ec.max_ports(), 1 << 17);
    assert_eq!(vm.port_op(op::SEND, (1 << 17) - 1), -EINVAL, "closed");
    assert_eq!(vm.port_op(op::SEND, 1 << 17), -EINVAL);
    // reset: back to 2-level.
    assert_eq!(vm.call(op::RESET, abi::Reset { dom: DOMID_SELF }).0, 0);
    assert!(!vm.ec.is_fifo());
    let p = vm.bind_ipi(0);
    assert_eq!(g.set_priority(p, 3), -ENOSYS, "2-level again");
    assert_eq!(vm.ec.max_ports(), 4096);
}

#[test]
fn higher_priority_is_consumed_first_and_one_queue_is_fifo() {
    let mut g = Guest::new(1, 1);
    let low = g.ipi(0, 9);
    let high = g.ipi(0, 2);
    let mid: Vec<u32> = (0..4).map(|_| g.ipi(0, 7)).collect();
    assert_eq!(g.vm.ec.notify_port(low), Ok(()));
    assert_eq!(g.vm.up.take(), vec![0], "the first head raises the upcall");
    for &p in &mid {
        g.vm.ec.notify_port(p).unwrap();
    }
    assert_eq!(
        g.vm.ec.set_pending(high, 0),
        Ok(SetPending::UpcallAlreadyPending),
        "a new head, READY newly set, upcall already pending"
    );
    assert_eq!(g.vm.ec.set_pending(mid[0], 0), Ok(SetPending::Coalesced));
    assert!(g.vm.up.take().is_empty());
    let got = g.consume(0);
    let mut want = vec![high];
    want.extend(&mid);
    want.push(low);
    assert_eq!(got, want);
    // Consumed: every word unlinked and not pending.
    for p in got {
        assert_eq!(
            g.word(p).load(Ordering::SeqCst) & (bits::LINKED | bits::PENDING),
            0
        );
    }
}

#[test]
fn set_pending_outcomes_name_each_fifo_step() {
    let mut g = Guest::new(1, 1);
    let a = g.ipi(0, 7);
    let b = g.ipi(0, 7);
    assert_eq!(g.vm.ec.set_pending(a, 0), Ok(SetPending::Raised));
    assert_eq!(g.vm.ec.set_pending(b, 0), Ok(SetPending::Appended));
    assert_eq!(g.vm.ec.set_pending(b, 0), Ok(SetPending::Coalesced));
    assert_eq!(g.consume(0), vec![a, b]);
    // The queue is empty again: the next event is a head; READY was taken, upcall_pending
    // cleared by the consumer.
    assert_eq!(g.vm.ec.set_pending(b, 0), Ok(SetPending::Raised));
    // A head while READY is still set.
    let c = g.ipi(0, 3);
    let vi = GuestAddress(SHINFO);
    g.vm.mem.write_obj(0u8, vi).unwrap();
    let ready = g.pages.control(0, 0).unwrap().0;
    ready.fetch_or(1 << 3, Ordering::SeqCst);
    assert_eq!(g.vm.ec.set_pending(c, 0), Ok(SetPending::ReadyAlreadySet));
    assert_eq!(g.consume(0), vec![c, b]);
}

#[test]
fn masked_events_stay_pending_and_unmask_relinks_them() {
    let mut g = Guest::new(1, 1);
    let p = g.ipi(0, 7);
    g.word(p).fetch_or(bits::MASKED, Ordering::SeqCst);
    assert_eq!(g.vm.ec.set_pending(p, 0), Ok(SetPending::Masked));
    assert!(g.vm.up.take().is_empty());
    assert!(g.vm.pending(p) && g.vm.ec.port_status(p).masked);
    assert!(g.consume(0).is_empty(), "nothing linked");
    assert_eq!(g.vm.port_op(op::UNMASK, p), 0);
    assert_eq!(
        g.vm.up.take(),
        vec![0],
        "unmask links it and raises the upcall"
    );
    assert_eq!(g.consume(0), vec![p]);
}

#[test]
fn events_before_the_array_page_are_raised_when_it_is_added() {
    let mut g = Guest::new(1, 1);
    // Ports 1..1024 have words; bind ports into the second page.
    let ports: Vec<u32> = (0..1100).map(|_| g.vm.bind_ipi(0)).collect();
    let late = *ports.last().unwrap();
    assert!(late >= fifo::WORDS_PER_PAGE);
    assert_eq!(g.vm.ec.set_pending(late, 0), Ok(SetPending::Remembered));
    assert!(g.vm.up.take().is_empty());
    assert_eq!(g.expand(), 0);
    // Linux masks new words; the remembered event is pending there, masked.
    assert!(g.vm.pending(late));
    g.unmask_local(late);
    assert_eq!(g.vm.port_op(op::UNMASK, late), 0);
    assert_eq!(g.consume(0), vec![late]);
}

#[test]
fn switching_from_2level_keeps_pending_events() {
    let vm = vm_with(true, 2);
    let a = vm.bind_ipi(0);
    let b = vm.bind_ipi(1);
    vm.ec.notify_port(a).unwrap();
    vm.ec.notify_port(b).unwrap();
    assert!(vm.pending(a) && vm.pending(b));
    let mut g = Guest {
        pages: GuestPages::new(vm.mem.clone(), 2),
        heads: vec![[0; PRIORITIES as usize]; 2],
        vm,
    };
    for v in 0..2 {
        assert_eq!(g.init_control(v, control(v)), 0);
    }
    // Not pending under FIFO until the page exists (their words do not).
    assert!(!g.vm.pending(a));
    // Linux's array pages start masked; this one unmasked, so the carried events link.
    assert_eq!(g.add_page(Some(0)), 0);
    let mut up = g.vm.up.take();
    up.sort_unstable();
    assert_eq!(up, vec![0, 1], "each vCPU's carried event raised");
    assert_eq!(g.consume(0), vec![a]);
    assert_eq!(g.consume(1), vec![b]);
}

#[test]
fn a_port_still_linked_is_not_reused_and_the_close_is_counted() {
    let mut g = Guest::new(1, 1);
    let a = g.ipi(0, 7);
    g.vm.ec.notify_port(a).unwrap();
    assert_eq!(g.vm.port_op(op::CLOSE, a), 0);
    assert_eq!(g.vm.ec.fifo_give_ups()[3], 1, "the close gave up waiting");
    assert!(!g.vm.pending(a), "close clears PENDING");
    let b = g.vm.bind_ipi(0);
    assert_ne!(b, a, "a linked port is not reused");
    // The guest walks the queue: a is unlinked (not pending: not handled); a is free again.
    assert!(g.consume(0).is_empty());
    assert_eq!(g.vm.bind_ipi(0), a);
}

#[test]
fn moving_a_port_between_queues_keeps_every_queue_consistent() {
    let mut g = Guest::new(2, 1);
    let p = g.ipi(0, 7);
    let q = g.ipi(0, 7);
    g.vm.ec.notify_port(p).unwrap();
    // p is the tail of (0, 7); the guest consumes it there, then p moves to (1, 4).
    assert_eq!(g.consume(0), vec![p]);
    g.set_priority(p, 4);
    assert_eq!(g.vm.bind_vcpu(p, 1), -EINVAL, "an IPI stays on its vCPU");
    let u = g.vm.alloc_unbound(DOMID_SELF);
    g.unmask_local(u);
    assert_eq!(g.vm.bind_vcpu(u, 1), 0);
    g.set_priority(u, 4);
    g.vm.ec.notify_port(u).unwrap();
    g.vm.ec.notify_port(p).unwrap();
    // p's old queue forgot its tail: q becomes that queue's head, not a link from p.
    g.vm.ec.notify_port(q).unwrap();
    assert_eq!(g.consume(1), vec![u]);
    assert_eq!(g.consume(0), vec![p, q]);
}

/// A word that changes every time the host tries to exchange it: the tail of a guest that
/// keeps editing it.
struct Flapping {
    words: Vec<std::sync::atomic::AtomicU32>,
    ready: std::sync::atomic::AtomicU32,
    heads: Vec<std::sync::atomic::AtomicU32>,
}

impl Words for Flapping {
    type A = std::sync::atomic::AtomicU32;
    fn event(&self, port: u32) -> Option<&Self::A> {
        self.words.get(port as usize)
    }
    fn control(&self, _: u32, priority: u32) -> Option<(&Self::A, &Self::A)> {
        Some((&self.ready, self.heads.get(priority as usize)?))
    }
}

#[test]
fn a_tail_the_guest_keeps_editing_is_given_up_after_bounded_retries() {
    // The tail word flips MASKED from another thread as fast as it can; every give-up is
    // counted, none loops, and every event still ends PENDING.
    let f = Arc::new(Flapping {
        words: (0..4)
            .map(|_| std::sync::atomic::AtomicU32::new(0))
            .collect(),
        ready: std::sync::atomic::AtomicU32::new(0),
        heads: (0..16)
            .map(|_| std::sync::atomic::AtomicU32::new(0))
            .collect(),
    });
    let queues = fifo::Queues::new(1);
    let lastq = std::sync::atomic::AtomicU32::new(fifo::lastq(0, 7));
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                f.words[1].fetch_xor(bits::MASKED, Ordering::SeqCst);
            }
        })
    };
    let slot = super::ports::PortSlot::default();
    for round in 0..2000 {
        // Port 1 is linked and the tail; link port 2 behind it, then reset both.
        f.words[1].fetch_or(bits::LINKED, Ordering::SeqCst);
        queues.queue(0, 7).reset(1);
        f.words[2].store(0, Ordering::SeqCst);
        let r = queues.set_pending(&*f, &lastq, &slot, 2, 0, 7);
        assert!(
            matches!(r, fifo::Linked::Appended { .. } | fifo::Linked::Head { .. }),
            "round {round}: {r:?}"
        );
        assert_ne!(f.words[2].load(Ordering::SeqCst) & bits::PENDING, 0);
        assert_eq!(
            f.words[1].load(Ordering::SeqCst) & bits::BUSY,
            0,
            "BUSY left set"
        );
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let gave_up = queues.give_ups.snapshot()[0];
    eprintln!("link give-ups in 2000 contended links: {gave_up}");
}

/// What a hostile guest can do between host operations.
#[derive(Clone, Debug)]
enum Op {
    /// The host delivers to port `i` (of vCPU `i % 2`).
    Send(u8),
    /// The guest writes anything into one of vCPU 0's event words.
    Scribble(u8, u32),
    /// The guest writes anything into vCPU 0's READY or a HEAD.
    ScribbleControl(u8, u32),
    /// The guest consumes on vCPU 0 with a small budget (it may follow garbage links).
    Consume0(u8),
    /// The guest moves port `i` of vCPU 0 to a priority.
    Priority(u8, u8),
    /// The guest unmasks port `i` by hypercall.
    Unmask(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Send),
        3 => (any::<u8>(), any::<u32>()).prop_map(|(i, w)| Op::Scribble(i, w)),
        1 => (0u8..17, any::<u32>()).prop_map(|(i, w)| Op::ScribbleControl(i, w)),
        1 => (1u8..8).prop_map(Op::Consume0),
        1 => (any::<u8>(), 0u8..16).prop_map(|(i, p)| Op::Priority(i, p)),
        1 => any::<u8>().prop_map(Op::Unmask),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// vCPU 0's guest scribbles over its event words and control block at any point (its
    /// LINKs and HEADs name its own ports, so that its own consumer does not take vCPU 1's
    /// events: that would be the guest's doing, not the host's); vCPU 1's ports behave. Nothing panics or loops, vCPU 1 loses nothing and gets nothing
    /// twice, and nothing outside the registered pages changes.
    #[test]
    fn a_hostile_vcpu_cannot_hurt_the_host_or_the_other_vcpu(ops in proptest::collection::vec(op(), 1..80)) {
        let mut g = Guest::new(2, 1);
        const N: u32 = 16;
        // Ports 1..=32, alternately on vCPU 0 and vCPU 1 (IPIs).
        let ports: Vec<u32> = (0..2 * N).map(|i| g.ipi(i % 2, 7)).collect();
        let guard = vec![0xA5u8; 0x1000];
        g.vm.mem.write_slice(&guard, GuestAddress(ARRAY + 0x1000)).unwrap();
        // A word with its LINK turned to one of vCPU 0's ports (or 0).
        let own = |w: u32| {
            let k = (w & bits::LINK) % (N + 1);
            (w & !bits::LINK) | if k == 0 { 0 } else { ports[(2 * (k - 1)) as usize] }
        };
        let mut sent1 = std::collections::HashMap::<u32, u32>::new();
        let mut got1 = std::collections::HashMap::<u32, u32>::new();
        for op in ops {
            match op {
                Op::Send(i) => {
                    let port = ports[(i as u32 % (2 * N)) as usize];
                    let vcpu = g.vm.ec.port_status(port).vcpu;
                    let was = g.vm.pending(port);
                    let _ = g.vm.ec.notify_port(port);
                    if vcpu == 1 && !was {
                        *sent1.entry(port).or_default() += 1;
                    }
                }
                Op::Scribble(i, w) => {
                    let port = ports[(2 * (i as u32 % N)) as usize];
                    g.word(port).store(own(w), Ordering::SeqCst);
                }
                Op::ScribbleControl(i, w) => {
                    let (gpa, w) = if i == 0 {
                        (control(0), w)
                    } else {
                        (control(0) + 4 + 4 * u64::from(i), own(w) & bits::LINK)
                    };
                    g.vm.mem.write_obj(w, GuestAddress(gpa)).unwrap();
                }
                Op::Consume0(budget) => {
                    let vi = GuestAddress(SHINFO);
                    g.vm.mem.write_obj(0u8, vi).unwrap();
                    fifo::consume(&g.pages, 0, &mut g.heads[0], u32::from(budget), |_| {});
                }
                Op::Priority(i, p) => {
                    let port = ports[(2 * (i as u32 % N)) as usize];
                    prop_assert_eq!(g.set_priority(port, u32::from(p)), 0);
                }
                Op::Unmask(i) => {
                    let port = ports[(2 * (i as u32 % N)) as usize];
                    prop_assert_eq!(g.vm.port_op(op::UNMASK, port), 0);
                }
            }
            for p in g.consume(1) {
                *got1.entry(p).or_default() += 1;
            }
        }
        prop_assert_eq!(sent1, got1, "vCPU 1's events");
        let mut after = vec![0u8; 0x1000];
        g.vm.mem.read_slice(&mut after, GuestAddress(ARRAY + 0x1000)).unwrap();
        prop_assert!(after == guard, "the host wrote outside the registered pages");
    }
}

#[test]
fn events_flow_while_ports_move_between_priorities_and_vcpus() {
    let g = Guest::new(2, 1);
    const PORTS: u32 = 24;
    let ports: Vec<u32> = (0..PORTS)
        .map(|_| {
            let p = g.vm.alloc_unbound(DOMID_SELF);
            g.unmask_local(p);
            p
        })
        .collect();
    let ec = g.vm.ec.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU32::new(0));
    let sender = {
        let (ec, stop, ports) = (ec.clone(), stop.clone(), ports.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for &p in &ports {
                    let _ = ec.notify_port(p);
                }
                n += 1;
            }
            n
        })
    };
    // Consumers on both vCPUs, in this thread and another.
    let pages = Arc::new(g.pages);
    let consumer1 = {
        let (pages, stop, handled) = (pages.clone(), stop.clone(), handled.clone());
        std::thread::spawn(move || {
            let mut heads = [0; PRIORITIES as usize];
            while !stop.load(Ordering::Relaxed) {
                fifo::consume(&*pages, 1, &mut heads, 1 << 16, |_| {
                    handled.fetch_add(1, Ordering::Relaxed);
                });
            }
            heads
        })
    };
    let mut heads0 = [0; PRIORITIES as usize];
    let vm = &g.vm;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut moves = 0u32;
    while handled.load(Ordering::Relaxed) < 20_000 || moves < 2_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "events stopped flowing"
        );
        let p = ports[(moves % PORTS) as usize];
        let prio = (moves * 7) % 16;
        let r = vm.call(
            op::SET_PRIORITY,
            abi::SetPriority {
                port: p,
                priority: prio,
            },
        );
        assert_eq!(r.0, 0);
        assert_eq!(vm.bind_vcpu(p, moves % 3 % 2), 0);
        moves += 1;
        fifo::consume(&*pages, 0, &mut heads0, 1 << 16, |_| {
            handled.fetch_add(1, Ordering::Relaxed);
        });
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = sender.join().unwrap();
    let mut heads1 = consumer1.join().unwrap();
    assert!(rounds > 0);
    // Drain both vCPUs; then nothing may be left pending or linked: an event pending but on
    // no queue would be lost.
    for _ in 0..4 {
        fifo::consume(&*pages, 0, &mut heads0, 1 << 20, |_| {});
        fifo::consume(&*pages, 1, &mut heads1, 1 << 20, |_| {});
    }
    for &p in &ports {
        let w = pages.event(p).unwrap().load(Ordering::SeqCst);
        assert_eq!(w & (bits::PENDING | bits::LINKED), 0, "port {p}: {w:#x}");
    }
    // And the queues still work: one more event per port, each consumed once.
    let mut got = Vec::new();
    for &p in &ports {
        vm.ec.notify_port(p).unwrap();
    }
    for _ in 0..2 {
        fifo::consume(&*pages, 0, &mut heads0, 1 << 20, |p| got.push(p));
        fifo::consume(&*pages, 1, &mut heads1, 1 << 20, |p| got.push(p));
    }
    got.sort_unstable();
    assert_eq!(got, ports);
    assert_eq!(
        vm.ec.fifo_give_ups(),
        [0; 4],
        "a behaving guest costs no give-up"
    );
}

#[test]
fn a_guest_with_64_ports_holds_one_bucket_whatever_its_abi_addresses() {
    let g = Guest::new(1, 1);
    let empty = g.vm.ec.port_table_bytes();
    for _ in 0..64 {
        g.vm.bind_ipi(0);
    }
    let small = g.vm.ec.port_table_bytes();
    assert!(small > empty, "no bucket allocated");
    // One bucket of 256 binding words, not 2^17 (2 MiB) or 4096 (64 KiB).
    assert!(small < 32 << 10, "64 ports take {small} bytes");
    for _ in 64..100_000 {
        g.vm.bind_ipi(0);
    }
    let big = g.vm.ec.port_table_bytes();
    assert!(big > 20 * small, "100,000 ports take {big} bytes");
    eprintln!("port table: {empty} B empty, {small} B with 64 ports, {big} B with 100,000");
}

/// An event word the guest edits between the host's reads and its compare-exchanges: each
/// of the first `edits` exchanges finds the word changed (the guest flipped MASKED, or, with
/// `unlink`, cleared LINKED and LINK). Every value the word takes is recorded.
struct Edited {
    word: std::sync::atomic::AtomicU32,
    edits: std::sync::atomic::AtomicU32,
    unlink: bool,
    seen: std::sync::Mutex<Vec<u32>>,
}

impl Edited {
    fn new(w: u32, edits: u32, unlink: bool) -> Self {
        Self {
            word: std::sync::atomic::AtomicU32::new(w),
            edits: std::sync::atomic::AtomicU32::new(edits),
            unlink,
            seen: std::sync::Mutex::new(vec![w]),
        }
    }
    fn note(&self) {
        self.seen
            .lock()
            .unwrap()
            .push(self.word.load(Ordering::SeqCst));
    }
}

impl fifo::Atom for Edited {
    fn get(&self) -> u32 {
        self.word.load(Ordering::SeqCst)
    }
    fn or(&self, v: u32) -> u32 {
        let old = self.word.fetch_or(v, Ordering::SeqCst);
        self.note();
        old
    }
    fn and(&self, v: u32) -> u32 {
        let old = self.word.fetch_and(v, Ordering::SeqCst);
        self.note();
        old
    }
    fn put(&self, v: u32) {
        self.word.store(v, Ordering::SeqCst);
        self.note();
    }
    fn cas(&self, current: u32, new: u32) -> u32 {
        let left = self.edits.load(Ordering::SeqCst);
        if left > 0 {
            self.edits.store(left - 1, Ordering::SeqCst);
            let edited = if self.unlink {
                self.word
                    .fetch_and(!(bits::LINKED | bits::LINK), Ordering::SeqCst);
                self.word.load(Ordering::SeqCst)
            } else {
                self.word.fetch_xor(bits::MASKED, Ordering::SeqCst) ^ bits::MASKED
            };
            self.note();
            return edited;
        }
        let r = match self
            .word
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(w) | Err(w) => w,
        };
        self.note();
        r
    }
}

/// Port 1 is the queue's linked tail (an `Edited` word); port 2 is sent.
struct TailWords {
    tail: Edited,
    port: Edited,
    ready: Edited,
    head: Edited,
}

impl Words for TailWords {
    type A = Edited;
    fn event(&self, port: u32) -> Option<&Edited> {
        match port {
            1 => Some(&self.tail),
            2 => Some(&self.port),
            _ => None,
        }
    }
    fn control(&self, _: u32, priority: u32) -> Option<(&Edited, &Edited)> {
        (priority == 7).then_some((&self.ready, &self.head))
    }
}

/// Sends port 2 behind tail port 1, whose word the guest edits `edits` times.
fn link_behind_edited_tail(edits: u32, unlink: bool) -> (fifo::Linked, TailWords, fifo::Queues) {
    let w = TailWords {
        tail: Edited::new(bits::LINKED | bits::PENDING, edits, unlink),
        port: Edited::new(0, 0, false),
        ready: Edited::new(0, 0, false),
        head: Edited::new(0, 0, false),
    };
    let queues = fifo::Queues::new(1);
    queues.queue(0, 7).reset(1);
    let lastq = std::sync::atomic::AtomicU32::new(fifo::lastq(0, 7));
    let slot = super::ports::PortSlot::default();
    let r = queues.set_pending(&w, &lastq, &slot, 2, 0, 7);
    (r, w, queues)
}

#[test]
fn a_tail_edited_once_is_linked_after_busy_is_set_and_busy_is_cleared() {
    let (r, w, queues) = link_behind_edited_tail(1, false);
    assert_eq!(r, fifo::Linked::Appended { newly: true });
    let seen = w.tail.seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|v| v & bits::BUSY != 0),
        "BUSY never set while retrying: {seen:x?}"
    );
    let end = w.tail.get();
    assert_eq!(end & bits::LINK, 2, "linked to port 2");
    assert_eq!(end & bits::BUSY, 0, "BUSY left set");
    assert_ne!(end & bits::LINKED, 0);
    assert_eq!(queues.queue(0, 7).tail(), 2);
    assert_eq!(w.head.get(), 0, "no new head");
    assert_eq!(queues.give_ups.snapshot(), [0; 4]);
}

#[test]
fn a_tail_unlinked_while_retrying_makes_a_new_head_and_loses_its_busy_bit() {
    let (r, w, queues) = link_behind_edited_tail(1, true);
    assert_eq!(
        r,
        fifo::Linked::Head {
            newly: true,
            ready: true
        }
    );
    assert_eq!(
        w.tail.get(),
        bits::PENDING,
        "BUSY cleared, nothing else touched"
    );
    assert_eq!(w.head.get(), 2);
    assert_eq!(w.ready.get(), 1 << 7);
    assert_eq!(queues.queue(0, 7).tail(), 2);
}

#[test]
fn a_tail_the_guest_never_stops_editing_is_given_up_after_four_retries() {
    let (r, w, queues) = link_behind_edited_tail(100, false);
    // Xen reports the link done (the event is lost to the guest's own edits) and counts it.
    assert_eq!(r, fifo::Linked::Appended { newly: true });
    assert_eq!(queues.give_ups.snapshot(), [1, 0, 0, 0]);
    assert_eq!(
        w.tail.edits.load(Ordering::SeqCst),
        100 - 1 - fifo::LINK_RETRIES,
        "one try, then four with BUSY set"
    );
    let end = w.tail.get();
    assert_eq!(end & bits::BUSY, 0, "BUSY left set");
    assert_eq!(
        end & (bits::LINKED | bits::PENDING),
        bits::LINKED | bits::PENDING
    );
}

#[test]
fn a_masked_event_wakes_a_vcpu_polling_its_port() {
    // Xen evtchn_fifo_set_pending ends with evtchn_check_pollers when PENDING went 0->1,
    // masked or not: nothing is linked and no upcall raised, only the poll wakes.
    let g = Guest::new(1, 1);
    let p = g.ipi(0, 7);
    g.word(p).fetch_or(bits::MASKED, Ordering::SeqCst);
    let ec = Arc::clone(&g.vm.ec);
    let poller = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let deadline = ec.guest_time() + 10_000_000_000;
        ec.poll(0, &[p], deadline).unwrap();
        t0.elapsed()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while g.vm.ec.pollers() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPU never polled"
        );
        std::thread::yield_now();
    }
    assert_eq!(g.vm.ec.set_pending(p, 0), Ok(SetPending::Masked));
    let waited = poller.join().unwrap();
    assert!(
        waited < std::time::Duration::from_secs(5),
        "the poll slept through its event ({waited:?})"
    );
    assert!(g.vm.up.take().is_empty(), "no upcall for a masked event");
}

#[test]
fn reset_forgets_the_queues_so_a_fifo_guest_starting_again_finds_its_events() {
    let mut g = Guest::new(1, 1);
    let p = g.ipi(0, 7);
    g.vm.ec.notify_port(p).unwrap();
    // The guest never consumes p: it stays linked, the queue's tail. Then it resets.
    assert_eq!(g.vm.call(op::RESET, abi::Reset { dom: DOMID_SELF }).0, 0);
    assert!(!g.vm.ec.is_fifo());
    assert_eq!(
        g.vm.ec.fifo_give_ups()[3],
        0,
        "a reset does not wait for its linked ports (FIFO is gone with it)"
    );
    // It comes back to FIFO on the same pages (p's word still LINKED there) and binds again:
    // the port after p (p is busy) on the same queue. With the old tail remembered it would
    // be linked behind p, which no HEAD reaches.
    g.vm.mem
        .write_slice(&[0u8; 72], GuestAddress(control(0)))
        .unwrap();
    g.heads = vec![[0; PRIORITIES as usize]];
    g.pages = GuestPages::new(g.vm.mem.clone(), 1);
    assert_eq!(g.init_control(0, control(0)), 0);
    assert_eq!(g.add_page(None), 0);
    let q = g.ipi(0, 7);
    assert_ne!(q, p, "a port still linked is not reused");
    g.vm.ec.notify_port(q).unwrap();
    assert_eq!(g.consume(0), vec![q], "q reached from the new HEAD");
}
