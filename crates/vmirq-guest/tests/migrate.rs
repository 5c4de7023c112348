//! Live migration with devices firing: the guest takes interrupts from every path (MSI irqfds
//! kernel and user, an edge pin, a level pin with resample, MSI-X with random masking, Xen
//! 2-level ports) while a device streams on another kernel irqfd; every round fires each path
//! once inside one phase of a migration to a fresh VM (through the byte encoding), then checks
//! on the target that each trigger was delivered exactly once. 200 migrations (100 round
//! trips) per machine, both irqchips, on the simulator (both EOI timings) and KVM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmirq_guest::machine::{kvm_test_gate, mmio_read_op, BackendKind, Machine, Mode};
use vmirq_guest::migration::{
    msix_vcpu, msix_vector, Devices, Migrating, Phase, EDGE_VECTOR, LEVEL_PIN, LEVEL_VECTOR,
    MSIX_VECTORS, MSI_KERNEL_VECTOR, MSI_USER_VECTOR, PHASES, STREAM_VECTOR, XEN_PORTS,
};

const MIGRATIONS: usize = 200;
const WAIT: Duration = Duration::from_secs(10);

/// The paced paths' counters: (vCPU, vector) the guest counts, and Xen ports.
struct Counts {
    vectors: Vec<u64>,
    ports: Vec<u32>,
}

/// (vCPU, vector) of every paced vector path: MSI kernel, MSI user, edge pin, level pin, then
/// the MSI-X vectors.
fn paced_vectors() -> Vec<(usize, u8)> {
    let mut v = vec![
        (0, MSI_KERNEL_VECTOR),
        (1, MSI_USER_VECTOR),
        (0, EDGE_VECTOR),
        (1, LEVEL_VECTOR),
    ];
    v.extend((0..MSIX_VECTORS).map(|i| (msix_vcpu(i), msix_vector(i))));
    v
}

fn counts(rig: &Migrating) -> Counts {
    let m = rig.machine();
    Counts {
        vectors: paced_vectors()
            .iter()
            .map(|(c, v)| m.count(*c, *v))
            .collect(),
        ports: (0..XEN_PORTS)
            .map(|i| m.port_counter(rig.port(i)))
            .collect(),
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Fires every paced path once: MSI-X vector `v`, Xen port `p`.
fn fire(devices: &Devices, v: u16, p: usize) {
    for fd in [
        &devices.msi_kernel,
        &devices.msi_user,
        &devices.edge,
        &devices.level,
    ] {
        fd.write(1).unwrap();
    }
    devices.msix[usize::from(v)].write(1).unwrap();
    devices.xen[p].write(1).unwrap();
}

fn wait_until(m: &dyn Machine, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{}: {what}", m.kind());
        m.pump();
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn ping_pong(kind: BackendKind, mode: Mode) {
    let (mut rig, devices) = Migrating::boot(kind, mode.irqchip()).unwrap();
    let devices = Arc::new(devices);
    // A device that never stops: it signals its kernel irqfd throughout every migration.
    let stop = Arc::new(AtomicBool::new(false));
    let streamed = Arc::new(AtomicU64::new(0));
    let streamer = {
        let (devices, stop, streamed) = (devices.clone(), stop.clone(), streamed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                devices.stream.write(1).unwrap();
                streamed.fetch_add(1, Ordering::Relaxed);
                // The device's pace, not a synchronisation.
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut downtime = Duration::ZERO;
    for round in 0..MIGRATIONS {
        let phase = PHASES[round % PHASES.len()];
        let v = (rng.next() % u64::from(MSIX_VECTORS)) as u16;
        let p = (rng.next() % XEN_PORTS as u64) as usize;
        let (mask_msix, mask_port) = (rng.next() % 2 == 0, rng.next() % 2 == 0);
        // Masked on the source: the trigger must come out at the unmask on the target.
        if mask_msix {
            assert!(rig.mask_msix(v, true));
        }
        if mask_port {
            rig.mask_port(p).unwrap();
        }
        let before = counts(&rig);
        let mut fired = false;
        let (next, migration) = rig
            .migrate(&devices, |now: Phase, _m: &dyn Machine| {
                if now == phase {
                    fire(&devices, v, p);
                    fired = true;
                }
            })
            .unwrap_or_else(|e| panic!("migration {round}: {e}"));
        assert!(fired);
        rig = next;
        downtime += migration.downtime;
        if mask_msix {
            assert!(rig.mask_msix(v, false));
        }
        if mask_port {
            rig.unmask_port(p).unwrap();
        }
        let m = rig.machine();
        let vectors = paced_vectors();
        // The four pin and MSI paths each fired once, and MSI-X vector `v`.
        let msix_index = 4 + usize::from(v);
        let expect = |i: usize| before.vectors[i] + u64::from(i < 4 || i == msix_index);
        for (i, (vcpu, vector)) in vectors.iter().enumerate() {
            let expect = expect(i);
            wait_until(
                m,
                &format!("migration {round} ({phase:?}): vector {vector:#x} on vCPU {vcpu} lost"),
                || m.count(*vcpu, *vector) >= expect,
            );
        }
        wait_until(
            m,
            &format!("migration {round} ({phase:?}): Xen port {p} lost its event"),
            || m.port_counter(rig.port(p)) > before.ports[p],
        );
        wait_until(m, "the level pin's resample", || {
            devices.resample.read().is_ok()
        });
        // Nothing twice: whatever was pending on a vCPU is taken before its control.
        m.control(0);
        m.control(1);
        for (i, (vcpu, vector)) in vectors.iter().enumerate() {
            let expect = expect(i);
            assert_eq!(
                m.count(*vcpu, *vector),
                expect,
                "migration {round} ({phase:?}): vector {vector:#x} on vCPU {vcpu} delivered twice"
            );
        }
        for i in 0..XEN_PORTS {
            let expect = before.ports[i] + u32::from(i == p);
            assert_eq!(
                m.port_counter(rig.port(i)),
                expect,
                "migration {round} ({phase:?}): Xen port {i}"
            );
        }
    }
    // The stream: stopped, then one last signal must still be delivered.
    stop.store(true, Ordering::Relaxed);
    streamer.join().unwrap();
    let m = rig.machine();
    m.control(1);
    let streamed_in = m.count(1, STREAM_VECTOR);
    assert!(
        streamed_in <= streamed.load(Ordering::Relaxed),
        "more stream interrupts than signals"
    );
    assert!(streamed_in > 0);
    devices.stream.write(1).unwrap();
    wait_until(m, "the stream's last signal", || {
        m.count(1, STREAM_VECTOR) > streamed_in
    });
    // No Remote IRR left stuck on the level pin, and it still delivers.
    let entry = m
        .guest_mmio(&[
            (0xFEC0_0000, 0x10 + 2 * LEVEL_PIN),
            mmio_read_op(0xFEC0_0010),
        ])
        .unwrap()[1];
    assert_eq!(
        entry & 1 << 14,
        0,
        "Remote IRR stuck after {MIGRATIONS} migrations"
    );
    let level = m.count(1, LEVEL_VECTOR);
    devices.level.write(1).unwrap();
    wait_until(m, "the level pin after the migrations", || {
        m.count(1, LEVEL_VECTOR) > level
    });
    eprintln!(
        "{kind:?}/{mode:?}: {MIGRATIONS} migrations, mean downtime {:?}",
        downtime / MIGRATIONS as u32
    );
}

macro_rules! migrates {
    ($name:ident, $kind:expr, $mode:expr) => {
        #[test]
        fn $name() {
            if $kind == BackendKind::Kvm && !kvm_test_gate(concat!("migrate::", stringify!($name)))
            {
                return;
            }
            ping_pong($kind, $mode);
        }
    };
}

migrates!(sim_kernel, BackendKind::Sim, Mode::Kernel);
migrates!(sim_split, BackendKind::Sim, Mode::Split);
migrates!(sim_guest_eoi_kernel, BackendKind::SimGuestEoi, Mode::Kernel);
migrates!(sim_guest_eoi_split, BackendKind::SimGuestEoi, Mode::Split);
migrates!(kvm_kernel, BackendKind::Kvm, Mode::Kernel);
migrates!(kvm_split, BackendKind::Kvm, Mode::Split);
