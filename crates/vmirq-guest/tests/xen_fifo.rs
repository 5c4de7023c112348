//! Xen FIFO event channels end to end: the real-mode guest switches to the FIFO ABI
//! (EVTCHNOP_init_control for each vCPU, expand_array for its event-array pages) and its
//! upcall runs Linux's FIFO consumer (xchg READY, queues from the highest priority, unlink with
//! cmpxchg, ack PENDING). Sim and KVM, both irqchips.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmirq::xen::{EventChannels, Upcalls};
use vmirq_guest::layout::{
    xen_fifo_control, SCRATCH, XEN_FIFO_ARRAY, XEN_FIFO_DUPS, XEN_FIFO_FLAG, XEN_FIFO_LOG,
    XEN_FIFO_LOG_COUNT, XEN_FIFO_RECORD, XEN_FIFO_SEEN, XEN_FIFO_TOTAL, XEN_SHARED_INFO,
    XEN_UPCALL_VECTOR,
};
use vmirq_guest::machine::{Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmirq_guest::xen::{read_u32, write_u32};

const WAIT: Duration = Duration::from_secs(20);
const DOMID_SELF: u16 = 0x7FF0;
const SEND: u32 = 4;
const ALLOC_UNBOUND: u32 = 6;
const BIND_IPI: u32 = 7;
const BIND_VCPU: u32 = 8;
const UNMASK: u32 = 9;
const INIT_CONTROL: u32 = 11;
const EXPAND_ARRAY: u32 = 12;
const SET_PRIORITY: u32 = 13;
const MASKED: u32 = 1 << 30;
const PENDING: u32 = 1 << 31;
const LINKED: u32 = 1 << 29;

fn two_vcpus(mode: Mode) -> MachineConfig {
    MachineConfig::new(2, mode.irqchip())
}

fn word_gpa(port: u32) -> u64 {
    XEN_FIFO_ARRAY + u64::from(port) * 4
}

/// The guest (vCPU 0) issues EVTCHNOP `cmd` with the argument words `fields` at their byte
/// offsets in a struct of `len` bytes; returns the result and the struct as left.
fn call(m: &dyn Machine, cmd: u32, fields: &[(usize, u32)], len: usize) -> (i64, Vec<u8>) {
    let mut b = vec![0u8; len];
    for &(off, v) in fields {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    vmirq_guest::xen::hypercall(m, cmd, &b).unwrap()
}

fn ok(m: &dyn Machine, cmd: u32, fields: &[(usize, u32)], len: usize) -> Vec<u8> {
    let (r, out) = call(m, cmd, fields, len);
    assert_eq!(r, 0, "{}: EVTCHNOP {cmd} {fields:?}", m.kind());
    out
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

struct Fifo {
    ch: Arc<EventChannels>,
    up: Arc<Upcalls>,
    vcpus: u32,
}

/// Event channels served from the guest's doorbell; the guest switches to FIFO (its consumer
/// flag, a control block per vCPU, `pages` event-array pages, every word unmasked) and, with
/// `vectors`, sets each vCPU's upcall vector (whose injection is waited for).
fn fifo(m: &dyn Machine, vcpus: u32, pages: u32, vectors: bool) -> Fifo {
    let (ch, up) = vmirq_guest::xen::attach_compat(m, vcpus, XEN_SHARED_INFO);
    let c = Arc::clone(&ch);
    m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, args: u64| {
        c.hypercall(vcpu as u32, cmd, args)
    }));
    write_u32(m, XEN_FIFO_FLAG, 1 | XEN_FIFO_RECORD);
    for v in 0..vcpus {
        let cb = xen_fifo_control(v as usize);
        let out = ok(
            m,
            INIT_CONTROL,
            &[(0, (cb >> 12) as u32), (8, (cb & 0xfff) as u32), (12, v)],
            24,
        );
        assert_eq!(out[16], 17, "link_bits");
    }
    assert!(ch.is_fifo());
    let f = Fifo { ch, up, vcpus };
    f.add_pages(m, pages);
    if vectors {
        f.vectors(m);
    }
    f
}

impl Fifo {
    fn add_pages(&self, m: &dyn Machine, pages: u32) {
        for _ in 0..pages {
            let n = (0..128u64)
                .find(|p| self.ch.fifo_pages() <= *p as u32)
                .unwrap();
            let gpa = XEN_FIFO_ARRAY + n * 0x1000;
            m.write_guest(gpa, &[0u8; 0x1000]).unwrap();
            ok(m, EXPAND_ARRAY, &[(0, (gpa >> 12) as u32)], 8);
        }
    }

    fn vectors(&self, m: &dyn Machine) {
        for v in 0..self.vcpus {
            self.up
                .set_upcall_vector(v, Some(XEN_UPCALL_VECTOR))
                .unwrap();
            assert!(
                m.wait_isr(Some(v as usize), XEN_UPCALL_VECTOR, WAIT)
                    .is_some(),
                "{}: vCPU {v}'s upcall vector injected nothing",
                m.kind()
            );
        }
    }

    fn ipi(&self, m: &dyn Machine, vcpu: u32, priority: u32) -> u32 {
        let port = u32_at(&ok(m, BIND_IPI, &[(0, vcpu)], 8), 4);
        ok(m, SET_PRIORITY, &[(0, port), (4, priority)], 8);
        port
    }
}

/// Waits until the guest's consumer handled `n` events in all; panics after [`WAIT`].
fn wait_total(m: &dyn Machine, n: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        m.pump();
        let total = read_u32(m, XEN_FIFO_TOTAL);
        if total >= n {
            assert_eq!(total, n, "{}: more events handled than sent", m.kind());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {total} of {n} events handled",
            m.kind()
        );
        std::thread::yield_now();
    }
}

fn log(m: &dyn Machine) -> Vec<u32> {
    let n = read_u32(m, XEN_FIFO_LOG_COUNT).min(4096);
    (0..n)
        .map(|i| read_u32(m, XEN_FIFO_LOG + u64::from(i) * 4))
        .collect()
}

on_every_machine!(
    fifo_higher_priorities_are_consumed_first,
    two_vcpus,
    |m: &dyn Machine, _| {
        // No upcall vector yet: the events queue up, then setting the vector injects and the
        // guest walks the queues once.
        let f = fifo(m, 2, 1, false);
        let low = f.ipi(m, 0, 12);
        let high = f.ipi(m, 0, 1);
        let mid: Vec<u32> = (0..3).map(|_| f.ipi(m, 0, 7)).collect();
        f.ch.notify_port(low).unwrap();
        for &p in &mid {
            f.ch.notify_port(p).unwrap();
        }
        f.ch.notify_port(high).unwrap();
        assert_eq!(read_u32(m, XEN_FIFO_TOTAL), 0, "no vector, no upcall");
        f.vectors(m);
        wait_total(m, 5);
        let mut want = vec![high];
        want.extend(&mid);
        want.push(low);
        assert_eq!(log(m), want, "{}", m.kind());
        for p in want {
            assert_eq!(read_u32(m, word_gpa(p)) & (PENDING | LINKED), 0);
        }
    }
);

on_every_machine!(
    fifo_masked_events_wait_for_unmask,
    two_vcpus,
    |m: &dyn Machine, _| {
        let f = fifo(m, 2, 1, true);
        let p = f.ipi(m, 1, 7);
        write_u32(m, word_gpa(p), MASKED);
        // The guest sends to its own IPI: pending, masked, not linked.
        ok(m, SEND, &[(0, p)], 4);
        assert_eq!(read_u32(m, word_gpa(p)), MASKED | PENDING, "{}", m.kind());
        // Positive evidence the path is live: another port on vCPU 1 gets through.
        let q = f.ipi(m, 1, 7);
        ok(m, SEND, &[(0, q)], 4);
        wait_total(m, 1);
        assert_eq!(log(m), vec![q]);
        // Linux unmasks a pending port by hypercall; Xen relinks it.
        write_u32(m, word_gpa(p), PENDING);
        ok(m, UNMASK, &[(0, p)], 4);
        wait_total(m, 2);
        assert_eq!(log(m), vec![q, p], "{}", m.kind());
    }
);

on_every_machine!(
    switching_from_2level_to_fifo_keeps_pending_events,
    two_vcpus,
    |m: &dyn Machine, _| {
        let (ch, up) = vmirq_guest::xen::attach_compat(m, 2, XEN_SHARED_INFO);
        let c = Arc::clone(&ch);
        m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, args: u64| {
            c.hypercall(vcpu as u32, cmd, args)
        }));
        // 2-level: two IPIs sent before any upcall vector exists: pending in shared_info.
        let a = u32_at(&ok(m, BIND_IPI, &[(0, 0)], 8), 4);
        let b = u32_at(&ok(m, BIND_IPI, &[(0, 1)], 8), 4);
        ok(m, SEND, &[(0, a)], 4);
        ok(m, SEND, &[(0, b)], 4);
        assert!(ch.port_status(a).pending && ch.port_status(b).pending);
        // The guest switches; the events come back once the page holding their words exists.
        let f = Fifo { ch, up, vcpus: 2 };
        write_u32(m, XEN_FIFO_FLAG, 1 | XEN_FIFO_RECORD);
        for v in 0..2 {
            let cb = xen_fifo_control(v as usize);
            ok(
                m,
                INIT_CONTROL,
                &[(0, (cb >> 12) as u32), (8, (cb & 0xfff) as u32), (12, v)],
                24,
            );
        }
        f.vectors(m);
        assert_eq!(read_u32(m, XEN_FIFO_TOTAL), 0, "no event array yet");
        f.add_pages(m, 1);
        wait_total(m, 2);
        let mut got = log(m);
        got.sort_unstable();
        assert_eq!(got, vec![a, b], "{}", m.kind());
        assert_eq!(f.ch.fifo_give_ups(), [0; 4]);
    }
);

on_every_machine!(
    fifo_ports_move_between_priorities_and_vcpus_while_events_flow,
    two_vcpus,
    |m: &dyn Machine, _| {
        let f = fifo(m, 2, 1, true);
        const PORTS: u32 = 16;
        // Loopback-unbound ports: bind_vcpu may move them.
        let ports: Vec<u32> = (0..PORTS)
            .map(|_| {
                u32_at(
                    &ok(
                        m,
                        ALLOC_UNBOUND,
                        &[(0, u32::from(DOMID_SELF) | 0x7FF0 << 16)],
                        8,
                    ),
                    4,
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let sender = {
            let (ch, stop, rounds, ports) =
                (f.ch.clone(), stop.clone(), rounds.clone(), ports.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for &p in &ports {
                        // The vCPU the route names may be stale by one bind_vcpu: the event
                        // then goes to the old vCPU's queue, as with a KVM route.
                        let v = ch.port_status(p).vcpu;
                        ch.set_pending(p, v).unwrap();
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        while rounds.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        // The guest moves ports meanwhile, one hypercall script after another.
        for i in 0..64u32 {
            let p = ports[(i % PORTS) as usize];
            ok(m, SET_PRIORITY, &[(0, p), (4, (i * 5) % 16)], 8);
            ok(m, BIND_VCPU, &[(0, p), (4, i % 2)], 8);
        }
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
        assert!(rounds.load(Ordering::Relaxed) > 0);
        // Lost nothing: every pending event gets handled, so every word drains (an event
        // pending on no queue would stay PENDING).
        let drained = || {
            m.pump();
            ports
                .iter()
                .all(|&p| read_u32(m, word_gpa(p)) & (PENDING | LINKED) == 0)
        };
        let deadline = Instant::now() + WAIT;
        while !drained() {
            assert!(
                Instant::now() < deadline,
                "{}: events left pending",
                m.kind()
            );
            std::thread::yield_now();
        }
        // The queues are whole: fresh ports on the same queues, one event each, each handled
        // exactly once (their counters start at 0; the moved ports' late handling cannot
        // touch them).
        let fresh: Vec<u32> = (0..PORTS).map(|i| f.ipi(m, i % 2, (i * 5) % 16)).collect();
        for &p in &fresh {
            f.ch.notify_port(p).unwrap();
        }
        assert!(
            m.wait_until(WAIT, &mut || fresh.iter().all(|&p| m.port_counter(p) >= 1)),
            "{}: fresh ports not handled",
            m.kind()
        );
        for &p in &fresh {
            assert_eq!(m.port_counter(p), 1, "{}: port {p}", m.kind());
        }
        assert_eq!(f.ch.fifo_give_ups(), [0; 4], "{}", m.kind());
    }
);

on_every_machine!(
    a_hundred_thousand_fifo_ports_bound_and_signalled,
    two_vcpus,
    |m: &dyn Machine, _| {
        const N: u32 = 100_000;
        let f = fifo(m, 2, N / 1024 + 1, true);
        // Bound by the VMM through the same hypercall entry (a guest script per port would
        // only add exits), on both vCPUs, at every priority.
        let mut ports = Vec::with_capacity(N as usize);
        for i in 0..N {
            m.write_guest(SCRATCH, &[i % 2, 0].map(u32::to_le_bytes).concat())
                .unwrap();
            assert_eq!(f.ch.hypercall(0, BIND_IPI, SCRATCH), 0);
            let port = read_u32(m, SCRATCH + 4);
            let prio = [port, i % 16].map(u32::to_le_bytes).concat();
            m.write_guest(SCRATCH, &prio).unwrap();
            assert_eq!(f.ch.hypercall(0, SET_PRIORITY, SCRATCH), 0);
            ports.push(port);
        }
        assert_eq!(*ports.iter().max().unwrap(), N);
        for &p in &ports {
            f.ch.notify_port(p).unwrap();
        }
        wait_total(m, N);
        assert_eq!(read_u32(m, XEN_FIFO_DUPS), 0, "{}", m.kind());
        for &p in &ports {
            let bit = read_u32(m, XEN_FIFO_SEEN + u64::from(p / 32) * 4) >> (p % 32) & 1;
            assert_eq!(bit, 1, "{}: port {p} never handled", m.kind());
        }
        assert_eq!(f.ch.fifo_give_ups(), [0; 4]);
    }
);
