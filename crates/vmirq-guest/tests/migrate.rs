//! Live migration with devices firing: the guest takes interrupts from every path (MSI irqfds
//! kernel and user, an edge pin, a level pin with resample, MSI-X with random masking, Xen
//! 2-level ports) while a device streams on another kernel irqfd; every round fires each path
//! once inside one phase of a migration to a fresh VM (through the byte encoding), then checks
//! on the target that each trigger was delivered exactly once. 200 migrations (100 round
//! trips) per machine, both irqchips, on the simulator (both EOI timings) and KVM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmirq_guest::machine::{kvm_test_gate, mmio_read_op, BackendKind, Mode};
use vmirq_guest::migration::{
    migrate_round, Migrating, Round, LEVEL_PIN, LEVEL_VECTOR, STREAM_VECTOR,
};

const MIGRATIONS: usize = 200;
const WAIT: Duration = Duration::from_secs(10);

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
    let mut rng = 0x9E37_79B9_7F4A_7C15;
    let mut downtime = Duration::ZERO;
    for n in 0..MIGRATIONS {
        let round = Round::pick(n, &mut rng);
        let (next, outcome) = migrate_round(rig, &devices, &round, WAIT)
            .unwrap_or_else(|e| panic!("migration {n} ({round:?}): {e}"));
        rig = next;
        assert!(
            outcome.lost.is_empty(),
            "migration {n}: lost {:?}",
            outcome.lost
        );
        assert!(
            outcome.duplicated.is_empty(),
            "migration {n}: delivered twice {:?}",
            outcome.duplicated
        );
        assert_eq!(outcome.delivered, outcome.sent);
        downtime += outcome.migration.downtime;
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
    assert!(
        m.wait_count(1, STREAM_VECTOR, streamed_in + 1, WAIT) > streamed_in,
        "the stream's last signal was lost"
    );
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
    assert!(
        m.wait_count(1, LEVEL_VECTOR, level + 1, WAIT) > level,
        "the level pin stopped delivering after the migrations"
    );
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
