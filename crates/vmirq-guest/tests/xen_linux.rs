//! A Linux-shaped Xen HVM guest with 40 vCPUs, in Linux's boot order
//! (arch/x86/xen/enlighten_hvm.c, drivers/xen/events/): it maps shared_info where it wants it
//! (the VMM put it elsewhere), registers a vcpu_info for every vCPU (32 and above have no slot
//! in shared_info), and only then sets each vCPU's upcall vector, which injects. It binds a
//! timer VIRQ and two IPIs per vCPU and an interdomain port to a VMM backend, arms single-shot
//! timers, sends on every IPI, exchanges an event with the backend each way, and polls a masked
//! port until the VMM sends on it. Every event is counted by the guest's consumer: lost 0, none
//! twice. Sim and KVM, both irqchips.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmirq::xen::hypercall::{hvmop, nr, schedop, vcpuop, xenmem};
use vmirq::xen::{Hypercalls, DOMID_BACKEND};
use vmirq_guest::layout::{
    xen_vcpu_info, SCRATCH, XEN_SHARED_INFO, XEN_UPCALL_VECTOR, XEN_VCPU_INFO_EXT,
};
use vmirq_guest::machine::{hypercall_op, Machine, MachineConfig, Mode};
use vmirq_guest::migration::mask_xen_port;
use vmirq_guest::on_every_machine;
use vmirq_guest::xen::{serve_xen, xen_cmd};

const VCPUS: u32 = 40;
const WAIT: Duration = Duration::from_secs(20);
/// Bytes of argument space per hypercall of a batch.
const SLOT: u64 = 32;
const BIND_VIRQ: u32 = 1;
const SEND: u32 = 4;
const ALLOC_UNBOUND: u32 = 6;
const BIND_IPI: u32 = 7;
const VIRQ_TIMER: u32 = 0;

fn forty_vcpus(mode: Mode) -> MachineConfig {
    MachineConfig::new(VCPUS as usize, mode.irqchip())
}

/// The guest (vCPU 0) makes one hypercall per entry of `calls`, each with its own argument
/// words; returns the results and each call's argument words as the call left them.
fn batch(m: &dyn Machine, calls: &[(u32, Vec<u32>)]) -> Vec<(i64, Vec<u32>)> {
    let mut script = Vec::new();
    for (i, (cmd, words)) in calls.iter().enumerate() {
        let at = SCRATCH + i as u64 * SLOT;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        m.write_guest(at, &bytes).unwrap();
        script.push(hypercall_op(*cmd, at as u32));
    }
    let results = m.guest_mmio(&script).unwrap();
    calls
        .iter()
        .enumerate()
        .map(|(i, (_, words))| {
            let mut bytes = vec![0u8; words.len() * 4];
            m.read_guest(SCRATCH + i as u64 * SLOT, &mut bytes).unwrap();
            let out = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (i64::from(results[i] as i32), out)
        })
        .collect()
}

/// Runs `calls` (in batches the script holds) and returns each call's output word `at`,
/// asserting every call succeeded.
fn all_ok(m: &dyn Machine, calls: Vec<(u32, Vec<u32>)>, at: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for chunk in calls.chunks(40) {
        for (i, (r, words)) in batch(m, chunk).into_iter().enumerate() {
            assert_eq!(r, 0, "hypercall {:#x} #{i}", chunk[i].0);
            out.push(words.get(at).copied().unwrap_or(0));
        }
    }
    out
}

on_every_machine!(
    a_linux_shaped_guest_with_40_vcpus_loses_nothing,
    forty_vcpus,
    |m: &dyn Machine, _| {
        // The VMM put shared_info elsewhere; the guest maps it where its consumer looks.
        let (channels, upcalls) =
            vmirq_guest::xen::attach_compat(m, VCPUS, XEN_SHARED_INFO + 0x8000);
        serve_xen(
            m,
            Arc::new(Hypercalls::new(Arc::clone(&channels), Arc::clone(&upcalls))),
        );
        let gpfn = (XEN_SHARED_INFO >> 12) as u32;
        let add = xen_cmd(nr::MEMORY_OP, xenmem::ADD_TO_PHYSMAP, 0);
        all_ok(m, vec![(add, vec![0x7FF0, 0, 0, gpfn])], 0);
        assert_eq!(channels.config().shared_info_gpa, XEN_SHARED_INFO);
        // xen_vcpu_setup for every possible CPU: {mfn (u64), offset, rsvd}.
        let register = (0..VCPUS)
            .map(|v| {
                let gpa = xen_vcpu_info(v as usize);
                let cmd = xen_cmd(nr::VCPU_OP, vcpuop::REGISTER_VCPU_INFO, v);
                (cmd, vec![(gpa >> 12) as u32, 0, (gpa & 0xfff) as u32, 0])
            })
            .collect();
        all_ok(m, register, 0);
        assert_eq!(channels.vcpu_info_gpa(39), Some(XEN_VCPU_INFO_EXT + 7 * 64));
        // Then each vCPU's upcall vector: the injection reaches every vCPU.
        let vectors = (0..VCPUS)
            .map(|v| {
                let cmd = xen_cmd(nr::HVM_OP, hvmop::SET_EVTCHN_UPCALL_VECTOR, 0);
                (cmd, vec![v, u32::from(XEN_UPCALL_VECTOR)])
            })
            .collect();
        all_ok(m, vectors, 0);
        for v in 0..VCPUS as usize {
            assert!(
                m.wait_isr(Some(v), XEN_UPCALL_VECTOR, WAIT).is_some(),
                "vCPU {v} never got its upcall after setting its vector"
            );
        }
        // Ports: a timer VIRQ and two IPIs per vCPU, and one for a VMM backend.
        let timers = all_ok(
            m,
            (0..VCPUS)
                .map(|v| (BIND_VIRQ, vec![VIRQ_TIMER, v, 0]))
                .collect(),
            2,
        );
        let ipis = all_ok(
            m,
            (0..2 * VCPUS)
                .map(|i| (BIND_IPI, vec![i % VCPUS, 0]))
                .collect(),
            1,
        );
        let self_dom = u32::from(vmirq::xen::DOMID_SELF);
        let unbound = all_ok(
            m,
            vec![(
                ALLOC_UNBOUND,
                vec![self_dom | u32::from(DOMID_BACKEND) << 16, 0],
            )],
            1,
        )[0];
        let backend = channels.bind_backend(unbound).unwrap();
        // Single-shot timers: vCPU 0 arms its own; the others as their vCPUs' dispatchers do
        // (the test guest's hypercalls come from vCPU 0).
        let at = channels.guest_time() + 2_000_000;
        let set = xen_cmd(nr::VCPU_OP, vcpuop::SET_SINGLESHOT_TIMER, 0);
        all_ok(m, vec![(set, vec![at as u32, (at >> 32) as u32, 0, 0])], 0);
        for v in 1..VCPUS {
            channels.set_singleshot_timer(v, v, at).unwrap();
        }
        // Every IPI port once, and the backend port once.
        all_ok(m, ipis.iter().map(|p| (SEND, vec![*p])).collect(), 0);
        all_ok(m, vec![(SEND, vec![unbound])], 0);
        assert_eq!(backend.notify.read().unwrap(), 1, "guest send → backend");
        channels.backend_send(backend.port).unwrap();
        // Every event arrives (exactly once: checked after the controls below).
        let expected: Vec<u32> = timers
            .iter()
            .chain(&ipis)
            .copied()
            .chain([unbound])
            .collect();
        assert_eq!(expected.len(), 3 * VCPUS as usize + 1);
        for &p in &expected {
            m.wait_port_count(p, 1, WAIT);
        }
        // A masked port polled by vCPU 0 until a VMM thread sends on it. A poll returns at
        // once while vCPU 0 has an upcall to take (Xen local_events_need_delivery), and the
        // guest then polls again, as Linux's xen_poll_irq callers do.
        let polled = all_ok(m, vec![(BIND_IPI, vec![0, 0])], 1)[0];
        mask_xen_port(m, polled).unwrap();
        let ports_at = SCRATCH + 0x8000;
        m.write_guest(ports_at, &polled.to_le_bytes()).unwrap();
        let waker = vmirq_guest::xen::wake_poller(&channels, polled, WAIT);
        let poll = xen_cmd(nr::SCHED_OP, schedop::POLL, 0);
        let deadline = Instant::now() + WAIT;
        while !channels.port_status(polled).pending {
            assert!(
                Instant::now() < deadline,
                "the poll never ended on its port"
            );
            all_ok(m, vec![(poll, vec![ports_at as u32, 1, 0, 0])], 0);
            // vCPU 0 takes what made the poll return early, then polls again.
            assert!(m.wait_until(WAIT, &mut || !channels.upcall_pending(0)));
        }
        waker.join().unwrap();
        // A control per vCPU: once consumed, that vCPU has consumed every port before it.
        let controls = all_ok(m, (0..VCPUS).map(|v| (BIND_IPI, vec![v, 0])).collect(), 1);
        all_ok(m, controls.iter().map(|p| (SEND, vec![*p])).collect(), 0);
        for &c in &controls {
            assert_eq!(m.wait_port_count(c, 1, WAIT), 1, "control port {c}");
        }
        let lost: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|p| m.port_counter(*p) == 0)
            .collect();
        let twice: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|p| m.port_counter(*p) > 1)
            .collect();
        println!(
            "{}: {} events on {VCPUS} vCPUs, lost {}, twice {}",
            m.kind(),
            expected.len(),
            lost.len(),
            twice.len()
        );
        assert!(lost.is_empty(), "lost: {lost:?}");
        assert!(twice.is_empty(), "consumed twice: {twice:?}");
        assert_eq!(m.port_counter(polled), 0, "a masked port was consumed");
    }
);
