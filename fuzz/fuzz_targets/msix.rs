//! An MSI-X device as a hostile guest drives it, with vectors firing: any sequence of BAR
//! accesses (any offset and width), message-control writes, fires, vCPU runs, retries, resets
//! and refused route commits. Invariants: no panic; no interrupt without a fire (phantom); once
//! every vector is made deliverable, a fire on each is delivered; dropping the device gives
//! every GSI back.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmirq::msix::{MsixTable, MsixVectors};
use vmirq::{Config, Interrupts, IrqchipMode, SimBackend, X86Msi};

const VECTORS: u16 = 8;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A table write at entry `entry`, dword `word` (or anywhere in the BAR).
    Entry {
        entry: u8,
        word: u8,
        value: u32,
    },
    /// A valid message for an entry (vector 0x40 + entry), masked or not.
    Program {
        entry: u8,
        masked: bool,
    },
    Raw {
        offset: u16,
        data: Vec<u8>,
    },
    Read {
        offset: u16,
        len: u8,
    },
    Control(u16),
    Fire(u8),
    Run,
    Retry,
    Reset,
    RefuseCommit,
}

fn program(v: &MsixVectors, entry: u16, masked: bool) {
    let msg = X86Msi::fixed(0, 0x40 + entry as u8).encode().unwrap();
    let off = u64::from(entry) * 16;
    v.bar_write(off, &msg.address_lo().to_le_bytes());
    v.bar_write(off + 4, &msg.address_hi().to_le_bytes());
    v.bar_write(off + 8, &msg.data.to_le_bytes());
    v.bar_write(off + 12, &u32::from(masked).to_le_bytes());
}

fuzz_target!(|ops: Vec<Op>| {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    let free = irq.free_gsis();
    let vectors = MsixVectors::new(Arc::clone(&irq), MsixTable::new(VECTORS)).unwrap();
    let mut fires = 0u64;
    for op in ops.iter().take(500) {
        match op {
            Op::Entry { entry, word, value } => {
                let off = u64::from(*entry % (VECTORS as u8 + 1)) * 16 + u64::from(*word % 4) * 4;
                vectors.bar_write(off, &value.to_le_bytes());
            }
            Op::Program { entry, masked } => {
                program(&vectors, u16::from(*entry) % VECTORS, *masked)
            }
            Op::Raw { offset, data } => {
                vectors.bar_write(u64::from(*offset), &data[..data.len().min(9)]);
            }
            Op::Read { offset, len } => {
                let mut data = vec![0; usize::from(*len % 9)];
                vectors.bar_read(u64::from(*offset), &mut data);
            }
            Op::Control(value) => drop(vectors.write_message_control(*value)),
            Op::Fire(v) => {
                vectors.fire(u16::from(*v) % VECTORS).unwrap();
                fires += 1;
            }
            Op::Run => drop(sim.run_until_idle()),
            Op::Retry => drop(vectors.retry()),
            Op::Reset => drop(vectors.update(|t, fx| t.reset(fx))),
            Op::RefuseCommit => sim.refuse_next_commits(1),
        }
        sim.run_until_idle();
        assert!(sim.taken() <= fires, "an interrupt nobody fired");
    }
    // Every vector deliverable with a valid message of its own: a fire on each arrives.
    sim.refuse_next_commits(0);
    vectors.update(|t, fx| t.reset(fx));
    vectors.write_message_control(1 << 15);
    for v in 0..VECTORS {
        program(&vectors, v, false);
    }
    assert!(vectors.retry().is_empty());
    sim.run_until_idle();
    let before: Vec<u64> = (0..VECTORS).map(|v| sim.count(0, 0x40 + v as u8)).collect();
    for v in 0..VECTORS {
        vectors.fire(v).unwrap();
    }
    sim.run_until_idle();
    for v in 0..VECTORS {
        assert!(
            sim.count(0, 0x40 + v as u8) > before[usize::from(v)],
            "vector {v} fired while deliverable and nothing arrived"
        );
    }
    drop(vectors);
    assert_eq!(irq.free_gsis(), free, "a GSI leaked");
});
